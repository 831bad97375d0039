#!/usr/bin/env python3
"""mitwelten-storage service: the storage service near S3, a thin HTTP layer over the tool.

It runs close to S3, so that a workstation can archive without S3 keys and the CPU work of
making versions (WebP, FLAC) happens next to the data. Only the service holds S3 credentials and
write access to the catalog; a workstation needs a token (and, for its batch selections, read
access to the catalog). Every storage rule lives in the engine, `mitwelten_storage.py`; this file
adds HTTP: routes, authentication, problem answers and connection pooling.

    python mitwelten_service.py [--host 127.0.0.1] [--port 8080] [--workers N]
    uvicorn mitwelten_service:app

Configuration, from the environment (the README says more):

    MITWELTEN_DB, MITWELTEN_DB_SCHEMA    the catalog, as for the tool
    AWS_* / ~/.aws, per-host profiles    S3 credentials, as for the tool
    MITWELTEN_OIDC_ISSUER                the tokens' `iss`, compared exactly as given (a trailing / too)
    MITWELTEN_OIDC_AUDIENCE              the tokens' `aud`
    MITWELTEN_OIDC_JWKS_URL              default: the jwks_uri of the issuer's /.well-known/openid-configuration
    MITWELTEN_ROLES_CLAIM                where the roles are: a dotted path (default realm_access.roles)
    MITWELTEN_READ_ROLE                  role for GET and HEAD (default: internal)
    MITWELTEN_WRITE_ROLE                 role for POST, PUT and DELETE (default: storage-admin)
    MITWELTEN_TOKEN_LEEWAY               seconds of clock skew allowed on exp and nbf (default 30)
    MITWELTEN_MIN_COPIES                 checked originals elsewhere before one leaves (default 1)
    MITWELTEN_RANGE_CHECK_MAX            a ranged GET of an original up to this size reads and checks it
                                         whole (default 268435456, 256 MiB)
    MITWELTEN_CHECKED_TTL                seconds an original that checked out is trusted for ranges (300)
    MITWELTEN_METRICS                    0: no GET /metrics (default 1)
    MITWELTEN_LOG_FORMAT                 text (default) or json: one line per request

Endpoints (KIND is `images` or `audio`):

    GET       /KIND/ID              the file's state and every copy, as `whereis --json` prints them
    GET, HEAD /KIND/ID/original     the original, streamed and sha256-checked; Range (checked too),
                                    If-Match, If-None-Match
    POST      /KIND/ID/archive      {"storage_id": S, "sha256": H}: archive S holds the original
    POST      /KIND/ID/scaled       {"type": N}: version N in place of the original online
    DELETE    /KIND/ID/original     with If-Match: "<sha256>": the original leaves the online tier
    PUT       /KIND/ID/original     the original's bytes: restored online (checked), the version removed
    GET       /coverage?batch=B&by=D   what `coverage --json` prints
    GET       /backends             what `info --json` prints
    GET       /me                   who the token is, and whether it may read and write
    GET, HEAD /healthz              database and S3 reachable (no token)
    GET       /metrics              Prometheus metrics (no token)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import importlib.util
import itertools
import json
import logging
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Annotated, Iterator, Literal

# Installed with pip or pipx, the mitwelten-service command is there without the `service` extra too
# (pip installs every entry point): run as a command, say what to install rather than fail with a
# traceback. (Imported, a missing module is the ImportError it is.)
_MISSING = [name for name in ('fastapi', 'starlette', 'pydantic', 'uvicorn', 'jwt', 'cryptography')
            if importlib.util.find_spec(name) is None]
if _MISSING and (__name__ == '__main__' or os.path.basename(sys.argv[0]) == 'mitwelten-service'):
    print(f"error: the storage service needs {', '.join(_MISSING)}: install the tool with its service extra "
          "(pipx install '.[service]', pip install '.[service]') or requirements-service.txt", file=sys.stderr)
    sys.exit(2)

import anyio.from_thread
import botocore.exceptions
import jwt
import prometheus_client
import psycopg2
import psycopg2.extensions
import uvicorn
from fastapi import Depends, FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

import mitwelten_storage as ms

log = logging.getLogger('mitwelten_service')

PIECE = 1024 * 1024         # the size of the pieces an original is streamed in
BODY_LIMIT = 64 * 1024      # the largest JSON body a request may have
OPEN_PATHS = {'/healthz', '/metrics'}      # answered without a token
ROLE_FREE_PATHS = {'/me'}                  # any valid token, whatever its roles


# =================================================================================================
# Configuration
# =================================================================================================

@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    catalog: ms.Settings
    issuer: str
    audience: str
    jwks_url: str | None = None       # None: the jwks_uri of the issuer's discovery document
    read_role: str = 'internal'
    write_role: str = 'storage-admin'
    roles_claim: str = 'realm_access.roles'
    token_leeway: float = 30.0
    min_copies: int = 1
    range_check_max: int = 256 * 1024 * 1024
    checked_ttl: float = 300.0
    metrics: bool = True
    log_format: str = 'text'
    jwks_cooldown: float = 30.0       # seconds before an unknown key id makes the JWKS be fetched again

    @classmethod
    def from_env(cls) -> 'ServiceConfig':
        issuer = os.environ.get('MITWELTEN_OIDC_ISSUER', '').strip()      # exactly as given: a trailing / counts
        audience = os.environ.get('MITWELTEN_OIDC_AUDIENCE', '').strip()
        missing = [name for name, value in (('MITWELTEN_OIDC_ISSUER', issuer),
                                            ('MITWELTEN_OIDC_AUDIENCE', audience)) if not value]
        if missing:
            raise ms.ConfigError(f"set {' and '.join(missing)}: the service checks every token's issuer and "
                                 'audience (the Keycloak realm URL and the client the tokens are for)')
        roles_claim = os.environ.get('MITWELTEN_ROLES_CLAIM', '').strip() or cls.roles_claim
        if not all(roles_claim.split('.')):
            raise ms.ConfigError(f'MITWELTEN_ROLES_CLAIM={roles_claim!r} is not a dotted path to a claim, like '
                                 'realm_access.roles, resource_access.CLIENT.roles, roles, groups or scope')
        log_format = (os.environ.get('MITWELTEN_LOG_FORMAT', '').strip() or 'text').lower()
        if log_format not in ('text', 'json'):
            raise ms.ConfigError(f'MITWELTEN_LOG_FORMAT={log_format!r} must be text or json')
        metrics = (os.environ.get('MITWELTEN_METRICS', '').strip() or '1').lower()
        if metrics not in ('0', '1', 'false', 'true', 'no', 'yes', 'off', 'on'):
            raise ms.ConfigError(f'MITWELTEN_METRICS={metrics!r} must be 1 (GET /metrics) or 0 (none)')
        return cls(catalog=ms.Settings.from_env(), issuer=issuer, audience=audience,
                   jwks_url=os.environ.get('MITWELTEN_OIDC_JWKS_URL', '').strip() or None,
                   read_role=os.environ.get('MITWELTEN_READ_ROLE') or 'internal',
                   write_role=os.environ.get('MITWELTEN_WRITE_ROLE') or 'storage-admin',
                   roles_claim=roles_claim,
                   token_leeway=ms.env_number('MITWELTEN_TOKEN_LEEWAY', cls.token_leeway, float, 0),
                   min_copies=ms.env_number('MITWELTEN_MIN_COPIES', 1, int, 1),
                   range_check_max=ms.env_number('MITWELTEN_RANGE_CHECK_MAX', cls.range_check_max, int, 0),
                   checked_ttl=ms.env_number('MITWELTEN_CHECKED_TTL', cls.checked_ttl, float, 0),
                   metrics=metrics in ('1', 'true', 'yes', 'on'), log_format=log_format)


FileId = Annotated[int, Path(ge=1, le=2**31 - 1, description="the file's id in files_image or files_audio")]


class Kind(str, enum.Enum):
    images = 'images'
    audio = 'audio'

    @property
    def group(self) -> str:
        return next(group for group, kind in ms.KINDS.items() if kind == self.value)


# =================================================================================================
# Problems (RFC 9457)
# =================================================================================================

class Problem(BaseModel):
    """An error, as application/problem+json."""
    type: str
    title: str
    status: int
    detail: str


class Failure(Exception):
    """An answer that is a problem: raised anywhere, answered by the handler below."""

    def __init__(self, status: int, kind: str, title: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail, self.headers = status, kind, title, detail, headers or {}


def problem_response(status: int, kind: str, title: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({'type': ms.PROBLEM + kind, 'title': title, 'status': status, 'detail': detail},
                        status_code=status, headers=headers, media_type='application/problem+json')


def as_failure(exc: BaseException) -> Failure:
    """What an error of the engine, the catalog or S3 means for the client: the engine's errors
    carry their problem type, status and title (ms.StorageError); the rest are classified here."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, ms.StorageError) and exc.problem_type:
        headers = {'Retry-After': str(exc.retry_after)} if exc.retry_after else None
        return Failure(exc.status, exc.problem_type, exc.title, f'{exc}{exc.hint}', headers)
    if ms.catalog_outage(exc):
        return Failure(503, 'catalog-unavailable', 'Catalog unavailable',
                       f'the catalog database is unreachable: {ms.pg_error_line(exc)}', {'Retry-After': '10'})
    if isinstance(exc, ms.S3_CONNECTION_ERRORS):
        return Failure(503, 's3-unavailable', 'S3 unavailable',
                       f'the S3 server is unreachable: {ms.describe_exception(exc)}', {'Retry-After': '10'})
    if isinstance(exc, (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)):
        return Failure(502, 's3-error', 'S3 error', ms.describe_exception(exc))
    if isinstance(exc, psycopg2.Error):
        return Failure(500, 'catalog-error', 'Catalog error', ms.pg_error_line(exc))
    if isinstance(exc, ms.StorageError):
        return Failure(500, 'storage-error', 'Storage error', str(exc))
    return Failure(500, 'internal-error', 'Internal error', 'the service failed; its log says why')


PROBLEMS = {status: {'model': Problem, 'description': description,
                     'content': {'application/problem+json': {'schema': {'$ref': '#/components/schemas/Problem'}}}}
            for status, description in {
                400: 'If-Match or If-None-Match is not "*" or a list of entity-tags',
                401: 'no token, or a token that is not valid (WWW-Authenticate: Bearer)',
                403: 'a valid token without the role (WWW-Authenticate: Bearer error="insufficient_scope")',
                404: 'unknown file or backend, or the original not online',
                405: 'a method the path does not have (Allow names those it has)',
                409: 'refused: too few copies elsewhere, or another version recorded',
                412: 'If-Match is not the original', 413: 'a JSON body over 64 KiB (not read)',
                416: 'Range not satisfiable', 428: 'If-Match missing',
                422: 'the request cannot be done as asked', 500: 'the service failed',
                502: 'the online tier does not hold what the catalog records', 503: 'the catalog or S3 is down'}.items()}


def problems(*statuses: int) -> dict:
    return {status: PROBLEMS[status] for status in (*statuses, 500, 502, 503)}


# =================================================================================================
# The catalog's connections
# =================================================================================================

class CatalogPool:
    """Catalog connections, made by the engine and kept for the next request. When one finds
    the catalog gone, every idle one is dropped, so a database that comes back is used again at
    once."""

    def __init__(self, settings: ms.Settings, size: int = 16, cursor_factory=None):
        self.settings = settings
        self.idle: queue.LifoQueue = queue.LifoQueue(maxsize=size)
        self.cursor_factory = cursor_factory        # a cursor class that times the queries, for the metrics

    def clear(self) -> None:
        while True:
            try:
                conn = self.idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator:
        try:
            conn = self.idle.get_nowait()
        except queue.Empty:
            conn = ms.connect_catalog(self.settings)
            if self.cursor_factory is not None:
                conn.cursor_factory = self.cursor_factory
        healthy = False
        try:
            yield conn
            healthy = not conn.closed
        except BaseException as exc:
            healthy = not conn.closed and not ms.catalog_outage(exc)
            if ms.catalog_outage(exc):
                self.clear()            # the others went with it: the next request connects anew
            raise
        finally:
            if healthy:
                with contextlib.suppress(psycopg2.Error):
                    conn.rollback()
                try:
                    self.idle.put_nowait(conn)
                    conn = None
                except queue.Full:
                    pass
            if conn is not None:
                with contextlib.suppress(psycopg2.Error):
                    conn.close()


# =================================================================================================
# Authentication: bearer tokens of Keycloak or any standard OpenID provider
# =================================================================================================

def roles_at(claims: dict, path: str) -> list[str]:
    """The roles the claim at the dotted `path` grants: a list of strings (or, for `scope`, a
    space-separated string). Anything else (a string where a list belongs, a list holding other
    things, a path through something that is not an object) grants nothing."""
    value = claims
    for part in path.split('.'):
        if not isinstance(value, dict):
            return []
        value = value.get(part)
    if isinstance(value, str) and path.rsplit('.', 1)[-1] == 'scope':
        return value.split()
    if isinstance(value, list) and all(isinstance(role, str) for role in value):
        return list(value)
    return []


class Authenticator:
    """RS256 JWTs checked against the provider's JWKS (keys cached; a new key id fetches it
    again, so a rotation is followed), with issuer (exactly as configured), audience and expiry;
    roles from the claim MITWELTEN_ROLES_CLAIM names. Without MITWELTEN_OIDC_JWKS_URL the JWKS
    is where the issuer's discovery document says (fetched once). The token is never logged."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self._jwks: jwt.PyJWKClient | None = None
        self._discovering = threading.Lock()
        if config.jwks_url:
            self._jwks = self._jwks_client(config.jwks_url)
        self.jwks_url = config.jwks_url

    def _jwks_client(self, url: str) -> jwt.PyJWKClient:
        return jwt.PyJWKClient(url, cache_keys=False, lifespan=300, timeout=10,
                               cooldown_duration=self.config.jwks_cooldown)

    @property
    def discovery_url(self) -> str:
        return self.config.issuer.rstrip('/') + '/.well-known/openid-configuration'

    def jwks(self) -> jwt.PyJWKClient:
        """The JWKS client; the first time without a configured URL, the discovery document is
        asked for its jwks_uri (503 while the provider cannot be reached, asked again next time)."""
        with self._discovering:
            if self._jwks is None:
                self._discover()
        return self._jwks

    def _discover(self) -> None:
        """The jwks_uri of the issuer's discovery document (OpenID Connect Discovery 1.0)."""
        url = self.discovery_url
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={'Accept': 'application/json'}),
                                        timeout=10) as answer:
                document = json.loads(answer.read(1024 * 1024))
        except (OSError, ValueError) as exc:
            raise Failure(503, 'identity-provider-unavailable', 'Identity provider unavailable',
                          f'the discovery document {url} cannot be read ({exc}): set MITWELTEN_OIDC_JWKS_URL, '
                          'or check MITWELTEN_OIDC_ISSUER') from None
        jwks_uri = document.get('jwks_uri') if isinstance(document, dict) else None
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(('http://', 'https://')):
            raise Failure(503, 'identity-provider-unavailable', 'Identity provider unavailable',
                          f'the discovery document {url} names no jwks_uri: set MITWELTEN_OIDC_JWKS_URL')
        if document.get('issuer') != self.config.issuer:
            raise Failure(503, 'identity-provider-unavailable', 'Identity provider unavailable',
                          f"the discovery document {url} is for the issuer {document.get('issuer')!r}, not "
                          f'MITWELTEN_OIDC_ISSUER={self.config.issuer!r} (compared exactly, a trailing / too)')
        self.jwks_url = jwks_uri
        self._jwks = self._jwks_client(jwks_uri)
        log.info('keys of %s from %s', self.config.issuer, jwks_uri)

    def claims(self, authorization: str | None) -> dict:
        challenge = {'WWW-Authenticate': f'Bearer realm="{self.config.issuer}"'}
        match = re.fullmatch(r'\s*Bearer\s+(\S+)\s*', authorization or '', re.I)
        if not match:
            raise Failure(401, 'unauthorized', 'Unauthorized', 'this request needs Authorization: Bearer <token>',
                          challenge)
        token = match.group(1)
        invalid = {'WWW-Authenticate': f'Bearer realm="{self.config.issuer}", error="invalid_token"'}
        jwks = self.jwks()
        try:
            key = jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise Failure(503, 'identity-provider-unavailable', 'Identity provider unavailable',
                          f'the keys to check tokens cannot be fetched from {self.jwks_url}: {exc}') from None
        except (jwt.PyJWKClientError, jwt.InvalidTokenError) as exc:
            raise Failure(401, 'invalid-token', 'Invalid token', f'the token cannot be checked: {exc}', invalid) from None
        try:
            claims = jwt.decode(token, key.key, algorithms=['RS256'], audience=self.config.audience,
                                issuer=self.config.issuer, options={'require': ['exp', 'iss', 'aud']},
                                leeway=self.config.token_leeway)
        except jwt.InvalidTokenError as exc:
            raise Failure(401, 'invalid-token', 'Invalid token', f'the token is not valid: {exc}', invalid) from None
        if not isinstance(claims, dict):
            raise Failure(401, 'invalid-token', 'Invalid token', 'the token\'s payload is not a JSON object', invalid)
        return claims

    def roles(self, claims: dict) -> list[str]:
        return roles_at(claims, self.config.roles_claim)

    def require(self, claims: dict, role: str) -> dict:
        if role not in self.roles(claims):
            raise Failure(403, 'forbidden', 'Forbidden',
                          f"the token does not carry the role '{role}' (in its claim {self.config.roles_claim})",
                          {'WWW-Authenticate': f'Bearer realm="{self.config.issuer}", error="insufficient_scope"'})
        return claims


class Authentication:
    """ASGI middleware: every request but /healthz and /metrics shows a valid token first (401
    with WWW-Authenticate otherwise), then the role its method needs (403; /me needs none),
    before its path or body is looked at; a body (but a PUT's, the original's bytes, which its
    route bounds) of more than 64 KiB is refused unread (413). A refused request's body is
    never read: the answer closes the connection. The claims are left in the request's state.
    Pure ASGI, so the originals stream through it untouched."""

    def __init__(self, app, authenticator, roles):
        self.app = app
        self.authenticator = authenticator
        self.roles = roles          # () -> (read role, write role)

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http' or scope['path'] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {name: value.decode('latin-1') for name, value in scope['headers']}
        try:
            auth = self.authenticator()
            claims = await run_in_threadpool(auth.claims, headers.get(b'authorization'))
            scope.setdefault('state', {})['claims'] = claims
            if scope['path'] not in ROLE_FREE_PATHS:
                read_role, write_role = self.roles()
                auth.require(claims, read_role if scope['method'] in ('GET', 'HEAD') else write_role)
            if scope['method'] != 'PUT':
                receive = await bounded_body(headers, receive)
        except Failure as exc:
            close = {'Connection': 'close'} if has_body(headers) else {}
            response = problem_response(exc.status, exc.kind, exc.title, exc.detail, {**exc.headers, **close})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def has_body(headers: dict) -> bool:
    return headers.get(b'content-length', '0').strip() not in ('', '0') or b'transfer-encoding' in headers


async def bounded_body(headers: dict, receive):
    """`receive`, for a body of at most BODY_LIMIT bytes; Failure 413 before a byte of a larger
    one is read (by its Content-Length), or as soon as a chunked one passes the limit."""
    too_large = Failure(413, 'content-too-large', 'Content too large',
                        f'a request body may have at most {BODY_LIMIT:,} bytes (JSON); this one has more')
    length = headers.get(b'content-length')
    if length is not None:
        length = length.strip()
        if not length.isdigit() or len(length) > 18 or int(length) > BODY_LIMIT:
            raise too_large
        return receive
    if b'transfer-encoding' not in headers:
        return receive
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message['type'] != 'http.request':
            break
        size += len(message.get('body', b''))
        if size > BODY_LIMIT:
            raise too_large
        if not message.get('more_body'):
            break

    async def replay():
        return messages.pop(0) if messages else await receive()
    return replay


class Metrics:
    """The service's Prometheus metrics (prometheus-client), in a registry of their own. With
    PROMETHEUS_MULTIPROC_DIR set (`--workers N` sets it), every worker writes its values there
    and GET /metrics answers the sum of all of them."""

    LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self.requests = prometheus_client.Counter(
            'mitwelten_http_requests', 'Requests answered, by method, route template and status',
            ['method', 'route', 'status'], registry=r)
        self.sent = prometheus_client.Counter(
            'mitwelten_http_sent_bytes', 'Bytes of answer bodies sent, by route template', ['route'], registry=r)
        self.duration = prometheus_client.Histogram(
            'mitwelten_http_request_duration_seconds', 'Time from a request to the end of its answer',
            ['method', 'route'], buckets=self.LATENCY, registry=r)
        self.failed_checks = prometheus_client.Counter(
            'mitwelten_originals_failed_check', "Originals whose bytes did not hash to the catalog's sha256 "
            'while being served (the answer was cut off)', ['kind'], registry=r)
        for kind in Kind:
            self.failed_checks.labels(kind.value)       # 0 from the start, for alerts on its rate
        self.s3 = prometheus_client.Histogram(
            'mitwelten_s3_request_duration_seconds', "S3 requests, until their answer's headers, by operation",
            ['operation'], buckets=self.LATENCY, registry=r)
        self.catalog = prometheus_client.Histogram(
            'mitwelten_catalog_query_duration_seconds', 'Catalog queries (execute)', buckets=self.LATENCY,
            registry=r)
        metrics = self

        class TimedCursor(psycopg2.extensions.cursor):
            def execute(self, query, vars=None):
                started = time.perf_counter()
                try:
                    return super().execute(query, vars)
                finally:
                    metrics.catalog.observe(time.perf_counter() - started)
        self.cursor_factory = TimedCursor

    def watch_s3(self, client) -> None:
        """Time every request of a boto3 S3 client, through its events."""
        def started(context, **_):
            context['mitwelten_started'] = time.perf_counter()

        def done(context, model=None, **_):
            began = context.pop('mitwelten_started', None)
            if began is not None:
                self.s3.labels(model.name if model is not None else 'failed').observe(time.perf_counter() - began)
        client.meta.events.register('before-call.s3', started)
        client.meta.events.register('after-call.s3', done)
        client.meta.events.register('after-call-error.s3', done)

    def exposition(self) -> tuple[bytes, str]:
        registry = self.registry
        if os.environ.get('PROMETHEUS_MULTIPROC_DIR'):
            from prometheus_client import multiprocess
            registry = prometheus_client.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


class MeteredBackends(ms.BackendCache):
    """The engine's backends, with their S3 requests timed for the metrics."""

    def __init__(self, settings: ms.Settings, metrics: Metrics | None):
        super().__init__(settings)
        self.metrics = metrics
        self.watched: set[int] = set()

    def get(self, backend_row: ms.BackendRow) -> ms.Backend:
        backend = super().get(backend_row)
        client = getattr(backend, 'client', None)
        if self.metrics is not None and client is not None and id(client) not in self.watched:
            self.watched.add(id(client))
            self.metrics.watch_s3(client)
        return backend


class Observe:
    """ASGI middleware, outermost: one log line per request (method, path, route, status, bytes
    sent, duration, the token's subject; never the token) and the request metrics."""

    access = logging.getLogger('mitwelten_service.access')

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics      # () -> Metrics | None

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        answer = {'status': 0, 'bytes': 0}

        async def counted(message):
            if message['type'] == 'http.response.start':
                answer['status'] = message['status']
            elif message['type'] == 'http.response.body':
                answer['bytes'] += len(message.get('body', b''))
            await send(message)
        try:
            await self.app(scope, receive, counted)
        finally:
            duration = time.perf_counter() - began
            # The route's template, never the raw path, labels the metrics (ids would explode them).
            route = scope['path'] if scope['path'] in OPEN_PATHS else getattr(scope.get('route'), 'path', '(none)')
            status = answer['status'] or 499         # cut off before an answer started
            claims = (scope.get('state') or {}).get('claims') or {}
            subject = claims.get('sub') if isinstance(claims.get('sub'), str) else None
            self.access.info('%s %s %s %s %d %.1f ms %s', scope['method'], scope['path'], route, status,
                             answer['bytes'], duration * 1000, subject or '-',
                             extra={'request': {'method': scope['method'], 'path': scope['path'], 'route': route,
                                                'status': status, 'bytes': answer['bytes'],
                                                'duration_ms': round(duration * 1000, 3), 'subject': subject}})
            metrics = self.metrics()
            if metrics is not None:
                metrics.requests.labels(scope['method'], route, str(status)).inc()
                metrics.sent.labels(route).inc(answer['bytes'])
                metrics.duration.labels(scope['method'], route).observe(duration)


class JsonLines(logging.Formatter):
    """A log record as one JSON object a line (MITWELTEN_LOG_FORMAT=json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {'time': self.formatTime(record, '%Y-%m-%dT%H:%M:%S') + f'.{int(record.msecs):03d}',
                 'level': record.levelname.lower(), 'logger': record.name}
        entry.update(getattr(record, 'request', None) or {'message': record.getMessage()})
        if record.exc_info:
            entry['exception'] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_format: str) -> None:
    """Log lines to stderr, as text or JSON, unless logging is set up already (by a host that
    imports the app). uvicorn's own access log is left off: the service logs every request."""
    logging.getLogger('uvicorn.access').disabled = True
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if log_format == 'json' else
                         logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# =================================================================================================
# The service
# =================================================================================================

class Service:
    """What every request shares: the configuration, the catalog's connections, the backends
    (S3 clients built once), the token checks."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.metrics = Metrics() if config.metrics else None
        self.pool = CatalogPool(config.catalog, cursor_factory=self.metrics and self.metrics.cursor_factory)
        self.backends = MeteredBackends(config.catalog, self.metrics)
        self.auth = Authenticator(config)
        self.checked = ms.CheckedObjects(config.checked_ttl)
        quick = dataclasses.replace(config.catalog, connect_timeout=2.0, read_timeout=3.0, attempts=1)
        self.health_backends = ms.BackendCache(quick)


class ArchiveRecord(BaseModel):
    storage_id: int = Field(description='the archive backend (priority 2) that holds the checked original')
    sha256: str = Field(pattern=r'^[0-9a-fA-F]{64}$', description="the original's sha256, hex")
    outcome: Literal['ok', 'repaired'] = Field('ok', description="the workstation's check of its copy, for the "
                                                                 "fixity log: 'repaired' where it wrote it again")
    event: Literal['archive', 'release'] = Field('archive', description="'release': proven before asking for a "
                                                                        'release (rule 3)')


class ScaledRequest(BaseModel):
    type: int = Field(ge=0, le=32767, description='the version to put in place of the original (see the README)')


class VersionHeld(BaseModel):
    storage_id: int
    type: int
    version: str
    backend_type: str
    priority: int
    object_name: str | None


class Me(BaseModel):
    subject: str | None = Field(description="the token's sub")
    roles: list[str] = Field(description='the roles the token carries (MITWELTEN_ROLES_CLAIM)')
    can_read: bool = Field(description='whether the token carries the read role')
    can_write: bool = Field(description='whether the token carries the write role')
    read_role: str
    write_role: str


class FileStateModel(BaseModel):
    group: str
    file_id: int
    object_name: str
    file_size: int
    sha256: str
    outcome: str
    active: VersionHeld | None
    rows: list[VersionHeld]


class LastCheck(BaseModel):
    checked_at: str = Field(description="the copy's last check, else when it was written (ISO 8601)")
    outcome: str = Field(description="'ok', 'missing', 'corrupt' or 'repaired'")
    event: str | None = Field(description="what checked it ('copy', 'verify', …), or 'written'")


class CopyWhereabouts(BaseModel):
    storage_id: int
    type: int
    version: str
    backend_type: str
    priority: int
    tier: str
    url_prefix: str
    location: str = Field(description="the copy's URL or path")
    label: str | None
    online: bool = Field(description='S3: configured; a disk: its dot-file found at its path or under the mount roots')
    mounted_at: str | None
    original: bool = Field(description="the original's exact bytes (the original or its gzip)")
    sound: bool = Field(description='a copy of the original not found missing or corrupt by its last check')
    last_check: LastCheck | None


class DiskToMount(BaseModel):
    storage_id: int
    label: str | None
    url_prefix: str


class FileSummary(BaseModel):
    group: str
    file_id: int
    object_name: str
    file_size: int
    sha256: str
    time: str | None
    deployment_id: int | None
    node_label: str | None
    sound_copies: int
    online_original: bool
    offline_only: bool
    disks_to_mount: list[DiskToMount]


class FileWhereabouts(BaseModel):
    """What `whereis --json` prints."""
    file: FileSummary
    copies: list[CopyWhereabouts]


class Dimension(str, enum.Enum):
    batch = 'batch'
    deployment = 'deployment'
    node = 'node'
    tag = 'tag'
    month = 'month'
    backend = 'backend'


class CoverageCounts(BaseModel):
    group: str
    key: int | str | None = Field(description='deployment id, node label, tag, YYYY-MM, storage id or batch id')
    label: str | None
    files: int
    bytes: int
    copies: dict[str, int] = Field(description='files by their number of sound copies of the original: '
                                               '{"0": n, "1": n, "2": n, "3+": n}')
    online: int
    offline_only: int
    never_checked: int
    oldest_check: str | None
    damaged: int
    originals: int | None = None
    versions: int | None = None


class Coverage(BaseModel):
    """What `coverage --json` prints."""
    rows: list[CoverageCounts]
    at_risk: list[dict]


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The byte range a Range header asks for, as (first, last); 'unsatisfiable'; or None for
    the whole (no Range, a malformed one, numbers of more than 18 digits, or several ranges,
    which are answered whole: RFC 9110 lets a server ignore Range)."""
    if not header:
        return None
    match = re.fullmatch(r'\s*bytes\s*=\s*(\d{0,18})\s*-\s*(\d{0,18})\s*', header)
    if not match or not any(match.groups()):
        return None
    first, last = match.groups()
    if not first:                                   # the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            return 'unsatisfiable'
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return 'unsatisfiable'
    return start, min(end, size - 1)


ENTITY_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"'
ENTITY_TAGS = re.compile(rf'\s*(?:\*|{ENTITY_TAG}(?:\s*,\s*{ENTITY_TAG})*)\s*')


def entity_tags(header: str, name: str) -> list[str]:
    """The entity-tags of an If-Match or If-None-Match ('*' or a list of them, RFC 9110), in
    lower case; 400 for anything else, such as a sha256 without its double quotes."""
    if not ENTITY_TAGS.fullmatch(header):
        raise Failure(400, 'invalid-precondition', 'Invalid precondition',
                      f'{name}: {header[:100]!r} is not "*" or a list of entity-tags; the ETag of an original '
                      'is its sha256 in double quotes, "<sha256 hex>"')
    return [tag.lower() for tag in re.findall(rf'\*|{ENTITY_TAG}', header)]


def etag_matches(if_match: str, sha256_hex: str) -> bool:
    """If-Match against the original's strong ETag (strong comparison: a weak tag never
    matches); '*' matches an original that exists. 400 if it is not an entity-tag list."""
    tags = entity_tags(if_match, 'If-Match')
    return '*' in tags or f'"{sha256_hex}"' in tags


def etag_none_match(if_none_match: str, sha256_hex: str) -> bool:
    """Whether If-None-Match lets the request through (weak comparison: W/ is ignored)."""
    tags = entity_tags(if_none_match, 'If-None-Match')
    return not ('*' in tags or any(tag.removeprefix('w/') == f'"{sha256_hex}"' for tag in tags))


def allowed_methods(app, scope) -> list[str]:
    """The methods of every route whose path matches the request's, in the usual order."""
    methods: set[str] = set()
    for route in app.routes:
        if getattr(route, 'methods', None) and route.matches(scope)[0] in (Match.PARTIAL, Match.FULL):
            methods |= set(route.methods)
    order = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']
    return sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m))


def create_app(config: ServiceConfig | None = None) -> FastAPI:
    """The service as an ASGI app; its configuration from the environment unless given."""
    state: dict = {}

    def service() -> Service:
        if 'service' not in state:
            state['service'] = Service(config or ServiceConfig.from_env())
        return state['service']

    @contextlib.asynccontextmanager
    async def lifespan(app):
        ms.FAULTS.check()    # a test hook naming no point is refused, as by the tool
        setup_logging(service().config.log_format)   # a configuration error shows at start, not later
        yield

    app = FastAPI(title='mitwelten-storage service', version='1', lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description='Originals of the Mitwelten catalog, archived without S3 keys: see the README.')

    app.add_middleware(Authentication, authenticator=lambda: service().auth,
                       roles=lambda: (service().config.read_role, service().config.write_role))
    app.add_middleware(Observe, metrics=lambda: service().metrics)      # added last: the outermost

    async def engine_error(request: Request, exc: Exception):
        failure = as_failure(exc)
        if failure.status >= 500:
            log.error('%s %s: %s', request.method, request.url.path, failure.detail)
        return problem_response(failure.status, failure.kind, failure.title, failure.detail, failure.headers)

    for kind in (ms.StorageError, psycopg2.Error, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        app.add_exception_handler(kind, engine_error)
    # Anything else is a bug: answered as a problem too, and the server logs its traceback.
    app.add_exception_handler(Exception, engine_error)

    @app.exception_handler(Failure)
    async def failed(request: Request, exc: Failure):
        return problem_response(exc.status, exc.kind, exc.title, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        detail = '; '.join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors())
        return problem_response(422, 'invalid-request', 'Invalid request', detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        detail = str(exc.detail)
        if exc.status_code == 405:      # Allow: every method the path has, not only one route's
            headers['Allow'] = ', '.join(allowed_methods(request.app, request.scope))
            detail = f"{request.url.path} answers {headers['Allow']}, not {request.method}"
        return problem_response(exc.status_code, 'http-error', str(exc.detail), detail, headers)

    def reader(request: Request) -> dict:
        return service().auth.require(request.state.claims, service().config.read_role)

    def writer(request: Request) -> dict:
        return service().auth.require(request.state.claims, service().config.write_role)

    original_types = sorted(set(ms.ORIGINAL_CONTENT_TYPES.values()) | {'application/octet-stream'})

    def started(chunks: Iterator[bytes], kind: Kind, file_id: int) -> Iterator[bytes]:
        """The chunks, with the first one read already: S3 is asked before the answer starts, so
        that its being down or the object missing is a proper status, not a cut connection. An
        object gone since the catalog was asked is looked up again: replaced or deleted by
        another request meanwhile, the original is no longer online (404), not missing (502)."""
        chunks = iter(chunks)
        try:
            first = next(chunks, None)
        except ms.SourceMissing:
            with service().pool.connection() as conn:
                ms.active_original(conn, service().backends, kind.group, file_id)   # NotFound if it left
            raise
        return itertools.chain([first] if first else [], chunks)

    def get_original(kind: Kind, file_id: FileId, request: Request, claims: dict = Depends(reader),
                     range: Annotated[str | None, Header()] = None,
                     if_range: Annotated[str | None, Header()] = None,
                     if_match: Annotated[str | None, Header()] = None,
                     if_none_match: Annotated[str | None, Header()] = None):
        with service().pool.connection() as conn:
            file, backend = ms.active_original(conn, service().backends, kind.group, file_id)
        headers = {'ETag': f'"{file.sha256}"', 'Accept-Ranges': 'bytes',
                   'Repr-Digest': ms.repr_digest(file.sha256)}
        # The preconditions in RFC 9110's order: If-Match, If-None-Match, then Range and If-Range.
        if if_match is not None and not etag_matches(if_match, file.sha256):
            raise ms.OriginalChanged(f"If-Match {if_match[:200]} is not the original's ETag \"{file.sha256}\"")
        if if_none_match is not None and not etag_none_match(if_none_match, file.sha256):
            return Response(status_code=304, headers={'ETag': headers['ETag']})
        content_type = ms.content_type_of(ms.VERSIONS[(kind.group, 0)], file.object_name)
        if request.method == 'HEAD':            # Range is for GET only (RFC 9110 14.2)
            if backend.size(file.object_name) is None:
                raise ms.SourceMissing(f'{backend.describe()} does not hold {file.object_name}', file.object_name)
            return Response(status_code=200, media_type=content_type,
                            headers={**headers, 'Content-Length': str(file.file_size)})
        wanted = (parse_range(range, file.file_size)
                  if not if_range or if_range.strip() == f'"{file.sha256}"' else None)    # If-Range: a strong ETag
        if wanted == 'unsatisfiable':
            raise Failure(416, 'range-not-satisfiable', 'Range not satisfiable',
                          f'the original has {file.file_size} bytes; {range[:200]!r} asks for none of them',
                          {'Content-Range': f'bytes */{file.file_size}', **headers})
        first, last = wanted or (0, file.file_size - 1)
        if wanted:
            headers['Content-Range'] = f'bytes {first}-{last}/{file.file_size}'
        headers['Content-Length'] = str(last - first + 1)
        if wanted and file.file_size > service().config.range_check_max:
            # Too large to read whole for a part: the client checks what it puts together
            # against Repr-Digest, as --via does.
            body = started(backend.read(file.object_name, start=first, end=last, piece=PIECE), kind, file_id)
        else:
            # The whole is read and hashed even for a part, whose last piece waits for the
            # digest: no client can put a damaged original together from checked answers.
            try:
                body = started(ms.checked_range(backend, file, first, last, checked=service().checked,
                                                piece=PIECE), kind, file_id)
            except ms.ChecksumMismatch as exc:
                if not getattr(exc, 'actual_sha256', None):
                    raise
                # It failed its check moments ago (a client resuming the download it saw cut):
                # the headers say what the object online is, and the answer is cut at once.
                headers['Repr-Digest'] = ms.repr_digest(exc.actual_sha256)
                body = failing(exc)
            body = checked_body(body, kind, file_id, service().metrics)
        return StreamingResponse(body, status_code=206 if wanted else 200, media_type=content_type, headers=headers)

    for method in ('GET', 'HEAD'):
        app.add_api_route('/{kind}/{file_id}/original', get_original, methods=[method], response_class=Response,
                          operation_id=f'{method.lower()}_original',
                          summary="The file's original, streamed from the online tier" + (
                              ' (its headers only)' if method == 'HEAD' else ''),
                          responses={200: {'description': 'the whole original',
                                           'content': {t: {} for t in original_types}},
                                     206: {'description': 'the range asked for (GET only)',
                                           'content': {t: {} for t in original_types}},
                                     304: {'description': 'If-None-Match matched: the client has it'},
                                     **problems(400, 401, 403, 404, 412, 416)})

    @app.get('/{kind}/{file_id}', response_model=FileWhereabouts,
             summary="The file's state: its catalog row and every copy, as `whereis --json` prints them",
             responses=problems(401, 403, 404))
    def get_file(kind: Kind, file_id: FileId, claims: dict = Depends(reader)):
        with service().pool.connection() as conn:
            return ms.where_is(service().config.catalog, kind.group, file_id, conn=conn).as_dict()

    @app.get('/coverage', response_model=Coverage, response_model_exclude_unset=True,
             summary='Files counted by their sound copies of the original, as `coverage --json` prints them',
             responses=problems(401, 403, 404))
    def get_coverage(batch: str | None = None, by: Dimension = Dimension.deployment, claims: dict = Depends(reader)):
        if batch is not None:
            try:
                ms.find_batch(batch)
            except ms.ConfigError as exc:
                raise Failure(404, 'batch-not-found', 'Unknown batch', str(exc)) from None
        with service().pool.connection() as conn:
            return ms.coverage(service().config.catalog, batch, by=by.value, conn=conn).as_dict()

    @app.post('/{kind}/{file_id}/archive', response_model=FileStateModel, status_code=201,
              summary='Record that an archive backend holds the checked original',
              responses={200: {'model': FileStateModel, 'description': 'recorded before'},
                         **problems(401, 403, 404, 409, 413, 422)})
    def post_archive(kind: Kind, file_id: FileId, body: ArchiveRecord, claims: dict = Depends(writer)):
        with service().pool.connection() as conn:
            state = ms.record_archived(conn, kind.group, file_id, body.storage_id, body.sha256, outcome=body.outcome,
                                       event=body.event, agent=f"mitwelten-service {claims.get('sub', '?')}")
        return JSONResponse(state.as_dict(), status_code=201 if state.outcome == 'created' else 200)

    @app.post('/{kind}/{file_id}/scaled', response_model=FileStateModel,
              summary='Make a version from the original online and put it in its place',
              responses=problems(401, 403, 404, 409, 413, 422))
    def post_scaled(kind: Kind, file_id: FileId, body: ScaledRequest, claims: dict = Depends(writer)):
        try:
            ms.find_version(kind.group, body.type)
        except ms.ConfigError as exc:
            raise Failure(422, 'unknown-version', 'Unknown version', str(exc)) from None
        with service().pool.connection() as conn:
            state = ms.make_version_in_place(conn, service().backends, kind.group, file_id, body.type,
                                             service().config.min_copies)
        return state.as_dict()

    @app.delete('/{kind}/{file_id}/original', status_code=204, response_class=Response,
                summary='Delete the original from the online tier',
                responses=problems(400, 401, 403, 404, 409, 412, 428))
    def delete_original(kind: Kind, file_id: FileId, claims: dict = Depends(writer),
                        if_match: Annotated[str | None, Header()] = None):
        if not if_match:
            raise Failure(428, 'if-match-required', 'Precondition required',
                          'deleting an original needs If-Match: "<its sha256>"')
        with service().pool.connection() as conn:
            file = ms.fetch_file(conn, kind.group, file_id)
            if not etag_matches(if_match, file.sha256):
                raise ms.OriginalChanged(f"If-Match {if_match[:200]} is not the original's ETag \"{file.sha256}\"")
            ms.delete_original(conn, service().backends, kind.group, file_id, file.sha256,
                               service().config.min_copies)
        return Response(status_code=204)

    body_problems = {status: {'model': Problem, 'description': description, 'content': {
        'application/problem+json': {'schema': {'$ref': '#/components/schemas/Problem'}}}}
        for status, description in {411: 'no Content-Length', 413: "more bytes than the catalog's size of the original"
                                    }.items()}

    @app.put('/{kind}/{file_id}/original', response_model=FileStateModel, status_code=201,
             summary='Restore the original at the online tier from its bytes (the body)',
             responses={200: {'model': FileStateModel, 'description': 'the original was there already'},
                        **problems(401, 403, 404, 409, 422), **body_problems},
             openapi_extra={'requestBody': {'required': True, 'content': {
                 'application/octet-stream': {'schema': {'type': 'string', 'format': 'binary'}}}}})
    async def put_original(kind: Kind, file_id: FileId, request: Request, claims: dict = Depends(writer)):
        length = request.headers.get('content-length', '')
        if not length.isdigit():
            raise Failure(411, 'length-required', 'Length required',
                          'send the original with a Content-Length (its size in bytes)')
        stream = request.stream()

        def body() -> Iterator[bytes]:
            while True:
                try:
                    chunk = anyio.from_thread.run(stream.__anext__)
                except StopAsyncIteration:
                    return
                if chunk:
                    yield chunk

        def restore() -> ms.FileState:
            chunks = body()
            with service().pool.connection() as conn:
                state = ms.restore_original(conn, service().backends, kind.group, file_id, chunks, int(length),
                                            agent=f"mitwelten-service {claims.get('sub', '?')}")
            for _ in chunks:            # the original was there already: the rest is read and dropped
                pass
            return state
        try:
            state = await run_in_threadpool(restore)
        except ms.ChecksumMismatch as exc:     # here: the bytes sent are not the original (not S3's fault)
            raise Failure(422, 'wrong-original', 'Not the original', f'{exc}; nothing was stored') from None
        return JSONResponse(state.as_dict(), status_code=201 if state.outcome == 'restored' else 200)

    @app.get('/backends', summary='The backends, as `info --json` lists them', responses=problems(401, 403))
    def get_backends(claims: dict = Depends(reader)) -> list[dict]:
        with service().pool.connection() as conn:
            return ms.list_backends(service().config.catalog, conn=conn)

    @app.get('/me', response_model=Me, summary='Who the token is, and whether it may read and write',
             responses=problems(401))
    def get_me(request: Request) -> dict:
        config, claims = service().config, request.state.claims
        roles = service().auth.roles(claims)
        subject = claims.get('sub')
        return {'subject': subject if isinstance(subject, str) else None, 'roles': roles,
                'can_read': config.read_role in roles, 'can_write': config.write_role in roles,
                'read_role': config.read_role, 'write_role': config.write_role}

    @app.get('/metrics', include_in_schema=False)
    def get_metrics() -> Response:
        if service().metrics is None:
            raise Failure(404, 'http-error', 'Not Found', 'metrics are off here (MITWELTEN_METRICS=0)')
        body, content_type = service().metrics.exposition()
        return Response(body, media_type=content_type)

    def healthz() -> dict:
        down, status = [], {'catalog': 'ok', 's3': {}}
        try:
            with service().pool.connection() as conn:
                backends = ms.fetch_backends(conn)
        except Exception as exc:
            raise Failure(503, 'catalog-unavailable', 'Catalog unavailable',
                          f'the catalog database is unreachable: {ms.pg_error_line(exc)}') from None
        for backend_row in backends:
            if backend_row.type != 's3':
                continue
            try:
                service().health_backends.get(backend_row).check(writing=False)
                status['s3'][backend_row.url_prefix] = 'ok'
            except Exception as exc:
                status['s3'][backend_row.url_prefix] = str(exc)
                down.append(f'{backend_row.describe()}: {exc}')
        if down:
            raise Failure(503, 's3-unavailable', 'S3 unavailable', '; '.join(down))
        return {'status': 'ok', **status}

    for method in ('GET', 'HEAD'):          # monitors use HEAD
        app.add_api_route('/healthz', healthz, methods=[method], operation_id=f'{method.lower()}_healthz',
                          summary='Whether the catalog and the S3 servers answer (no token)',
                          responses={503: PROBLEMS[503]})

    def openapi() -> dict:
        """FastAPI's schema, saying what the handlers and the token check do themselves: every
        operation but /healthz needs a bearer token, and DELETE needs If-Match (answered 428
        without it, as RFC 6585 says, rather than 422)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for parameter in schema['paths']['/{kind}/{file_id}/original']['delete'].get('parameters', []):
                if parameter['name'].lower() == 'if-match':
                    parameter['required'] = True
            schema.setdefault('components', {})['securitySchemes'] = {
                'keycloak': {'type': 'http', 'scheme': 'bearer', 'bearerFormat': 'JWT'}}
            for path, operations in schema['paths'].items():
                for operation in operations.values():
                    operation['security'] = [] if path == '/healthz' else [{'keycloak': []}]
                    if path != '/healthz':
                        operation.setdefault('responses', {}).setdefault('401', PROBLEMS[401] | {
                            'content': {'application/problem+json': {'schema': {'$ref': '#/components/schemas/Problem'}}}})
                        operation['responses']['401'].pop('model', None)
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi

    @app.get('/openapi.json', include_in_schema=False)
    def get_openapi_document(claims: dict = Depends(reader)) -> JSONResponse:
        return JSONResponse(openapi())

    return app


def failing(exc: BaseException) -> Iterator[bytes]:
    raise exc
    yield b''       # a generator: the answer's headers go out, then it is cut


def checked_body(chunks: Iterator[bytes], kind: Kind, file_id: int, metrics: Metrics | None) -> Iterator[bytes]:
    """The original's pieces; a mismatch with the catalog's sha256 is logged, counted and
    raised, which aborts the connection before the last piece: the client never sees a clean end."""
    try:
        yield from chunks
    except ms.ChecksumMismatch as exc:
        log.error('GET /%s/%s/original aborted: %s', kind.value, file_id, exc)
        if metrics is not None:
            metrics.failed_checks.labels(kind.value).inc()
        raise


app = create_app()


# =================================================================================================
# Command line
# =================================================================================================

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])  # prog: as called
    parser.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1)')
    parser.add_argument('--port', type=int, default=8080, help='port (default 8080)')
    parser.add_argument('--workers', type=int, default=1, help='worker processes (default 1)')
    args = parser.parse_args(argv)
    try:
        ms.FAULTS.check()
        config = ServiceConfig.from_env()
    except ms.ConfigError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return ms.EXIT_USAGE
    setup_logging(config.log_format)
    metrics_dir = None
    if args.workers > 1 and config.metrics and not os.environ.get('PROMETHEUS_MULTIPROC_DIR'):
        # Each worker is a process with metrics of its own: they write them to files in this
        # folder, and whichever worker answers GET /metrics sums them (prometheus-client's
        # multiprocess mode).
        metrics_dir = tempfile.mkdtemp(prefix='mitwelten-service-metrics-')
        os.environ['PROMETHEUS_MULTIPROC_DIR'] = metrics_dir
    try:
        uvicorn.run('mitwelten_service:app', host=args.host, port=args.port, workers=args.workers,
                    access_log=False, log_config=None, proxy_headers=True,
                    forwarded_allow_ips=os.environ.get('FORWARDED_ALLOW_IPS', '127.0.0.1'))
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return ms.EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
