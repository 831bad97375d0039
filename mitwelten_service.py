#!/usr/bin/env python3
"""mitwelten-storage service: the storage service near S3, a thin HTTP layer over the tool.

It runs close to S3, so that a workstation can archive without S3 keys and the CPU work of
making versions (WebP, FLAC) happens next to the data. Only the service holds S3 credentials and
write access to the catalog; a workstation needs a token (and, for its batch selections, read
access to the catalog). Every storage rule lives in the engine, `mitwelten_storage.py`; this file
adds HTTP: routes, authentication, problem answers and connection pooling.

    python mitwelten_service.py [--host 127.0.0.1] [--port 8080] [--workers N]
    uvicorn mitwelten_service:app

Configuration, from the environment:

    MITWELTEN_DB, MITWELTEN_DB_SCHEMA    the catalog, as for the tool
    AWS_* / ~/.aws, per-host profiles    S3 credentials, as for the tool
    MITWELTEN_OIDC_ISSUER                the Keycloak realm URL (the tokens' `iss`)
    MITWELTEN_OIDC_AUDIENCE              the tokens' `aud`
    MITWELTEN_OIDC_JWKS_URL              default: issuer + /protocol/openid-connect/certs
    MITWELTEN_READ_ROLE                  realm role for GET and HEAD (default: internal)
    MITWELTEN_WRITE_ROLE                 realm role for POST and DELETE (default: storage-admin)
    MITWELTEN_MIN_COPIES                 checked originals elsewhere before one leaves (default 1)

Endpoints (KIND is `images` or `audio`):

    GET       /KIND/ID              the file's state and every copy, as `whereis --json` prints them
    GET, HEAD /KIND/ID/original     the original, streamed and sha256-checked; Range supported
    POST      /KIND/ID/archive      {"storage_id": S, "sha256": H}: archive S holds the original
    POST      /KIND/ID/scaled       {"type": N}: version N in place of the original online
    DELETE    /KIND/ID/original     with If-Match: "<sha256>": the original leaves the online tier
    GET       /coverage?batch=B&by=D   what `coverage --json` prints
    GET       /backends             what `info --json` prints
    GET       /healthz              database and S3 reachable (no token)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import itertools
import logging
import os
import queue
import re
import sys
from typing import Annotated, Iterator

import botocore.exceptions
import jwt
import psycopg2
import uvicorn
from fastapi import Depends, FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import mitwelten_storage as ms

log = logging.getLogger('mitwelten_service')

PIECE = 1024 * 1024         # the size of the pieces an original is streamed in


# =================================================================================================
# Configuration
# =================================================================================================

@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    catalog: ms.Settings
    issuer: str
    audience: str
    jwks_url: str
    read_role: str = 'internal'
    write_role: str = 'storage-admin'
    min_copies: int = 1
    jwks_cooldown: float = 30.0       # seconds before an unknown key id makes the JWKS be fetched again

    @classmethod
    def from_env(cls) -> 'ServiceConfig':
        issuer = os.environ.get('MITWELTEN_OIDC_ISSUER', '').strip().rstrip('/')
        audience = os.environ.get('MITWELTEN_OIDC_AUDIENCE', '').strip()
        missing = [name for name, value in (('MITWELTEN_OIDC_ISSUER', issuer),
                                            ('MITWELTEN_OIDC_AUDIENCE', audience)) if not value]
        if missing:
            raise ms.ConfigError(f"set {' and '.join(missing)}: the service checks every token's issuer and "
                                 'audience (the Keycloak realm URL and the client the tokens are for)')
        min_copies = ms.env_number('MITWELTEN_MIN_COPIES', 1, int, 1)
        return cls(catalog=ms.Settings.from_env(), issuer=issuer, audience=audience,
                   jwks_url=os.environ.get('MITWELTEN_OIDC_JWKS_URL') or f'{issuer}/protocol/openid-connect/certs',
                   read_role=os.environ.get('MITWELTEN_READ_ROLE') or 'internal',
                   write_role=os.environ.get('MITWELTEN_WRITE_ROLE') or 'storage-admin',
                   min_copies=min_copies)


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


# The status, title and any hint of each problem type that stands for an error of the engine
# (ms.SERVICE_PROBLEMS, which the --via client turns back into the error).
ANSWERS = {
    'too-few-copies': (409, 'Too few copies elsewhere', ''),
    'version-conflict': (409, 'Another version is recorded', ''),
    'busy': (409, 'File busy', ''),
    'invalid-archive': (422, 'Not an archive of this original', ''),
    'version-failed': (422, 'Version cannot be made', ''),
    'original-changed': (412, 'Precondition failed', ''),
    'original-corrupt': (502, 'Original corrupt on the online tier', ': run `verify` on the active backend'),
    'original-missing': (502, 'Original missing on the online tier',
                         ', though the catalog records it there: run `verify` on the active backend'),
}


def as_failure(exc: BaseException) -> Failure:
    """What an error of the engine, the catalog or S3 means for the client."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, ms.NotFound):
        if exc.subject == 'original':
            return Failure(404, 'original-not-online', 'Original not online', str(exc))
        return Failure(404, f'{exc.subject}-not-found', f'Unknown {exc.subject}', str(exc))
    for kind, error in ms.SERVICE_PROBLEMS.items():
        if isinstance(exc, error):
            status, title, hint = ANSWERS[kind]
            return Failure(status, kind, title, f'{exc}{hint}')
    if ms.catalog_outage(exc) or (isinstance(exc, ms.ConfigError) and 'connect to the catalog' in str(exc)):
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
                401: 'no token, or a token that is not valid (WWW-Authenticate: Bearer)',
                403: 'a valid token without the role', 404: 'unknown file or backend, or the original not online',
                409: 'refused: too few copies elsewhere, or another version recorded',
                412: 'If-Match is not the original', 416: 'Range not satisfiable', 428: 'If-Match missing',
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

    def __init__(self, settings: ms.Settings, size: int = 16):
        self.settings = settings
        self.idle: queue.LifoQueue = queue.LifoQueue(maxsize=size)

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
# Authentication: Keycloak's bearer tokens
# =================================================================================================

class Authenticator:
    """RS256 JWTs checked against the realm's JWKS (keys cached; a new key id fetches it again,
    so a rotation is followed), with issuer, audience and expiry; roles from realm_access.roles.
    The token itself is never logged."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.jwks = jwt.PyJWKClient(config.jwks_url, cache_keys=False, lifespan=300, timeout=10,
                                    cooldown_duration=config.jwks_cooldown)

    def claims(self, authorization: str | None) -> dict:
        challenge = {'WWW-Authenticate': f'Bearer realm="{self.config.issuer}"'}
        match = re.fullmatch(r'\s*Bearer\s+(\S+)\s*', authorization or '', re.I)
        if not match:
            raise Failure(401, 'unauthorized', 'Unauthorized', 'this request needs Authorization: Bearer <token>',
                          challenge)
        token = match.group(1)
        invalid = {'WWW-Authenticate': f'Bearer realm="{self.config.issuer}", error="invalid_token"'}
        try:
            key = self.jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise Failure(503, 'identity-provider-unavailable', 'Identity provider unavailable',
                          f'the keys to check tokens cannot be fetched from {self.config.jwks_url}: {exc}') from None
        except (jwt.PyJWKClientError, jwt.InvalidTokenError) as exc:
            raise Failure(401, 'invalid-token', 'Invalid token', f'the token cannot be checked: {exc}', invalid) from None
        try:
            return jwt.decode(token, key.key, algorithms=['RS256'], audience=self.config.audience,
                              issuer=self.config.issuer, options={'require': ['exp', 'iss', 'aud']}, leeway=30)
        except jwt.InvalidTokenError as exc:
            raise Failure(401, 'invalid-token', 'Invalid token', f'the token is not valid: {exc}', invalid) from None

    def require(self, claims: dict, role: str) -> dict:
        roles = (claims.get('realm_access') or {}).get('roles') or []
        if role not in roles:
            raise Failure(403, 'forbidden', 'Forbidden', f"the token does not carry the realm role '{role}'")
        return claims


# =================================================================================================
# The service
# =================================================================================================

class Authentication:
    """ASGI middleware: every request but /healthz shows a valid token first, before its path
    or body is looked at (401 with WWW-Authenticate otherwise); the routes then check the role
    they need from the claims it leaves in the request's state. Pure ASGI, so the originals
    stream through it untouched."""

    def __init__(self, app, authenticator):
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http' and scope['path'] != '/healthz':
            header = next((value.decode('latin-1') for name, value in scope['headers'] if name == b'authorization'),
                          None)
            try:
                claims = await run_in_threadpool(self.authenticator().claims, header)
            except Failure as exc:
                response = problem_response(exc.status, exc.kind, exc.title, exc.detail, exc.headers)
                await response(scope, receive, send)
                return
            scope.setdefault('state', {})['claims'] = claims
        await self.app(scope, receive, send)


class Service:
    """What every request shares: the configuration, the catalog's connections, the backends
    (S3 clients built once), the token checks."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.pool = CatalogPool(config.catalog)
        self.backends = ms.BackendCache(config.catalog)
        self.auth = Authenticator(config)
        quick = dataclasses.replace(config.catalog, connect_timeout=2.0, read_timeout=3.0, attempts=1)
        self.health_backends = ms.BackendCache(quick)


class ArchiveRecord(BaseModel):
    storage_id: int = Field(description='the archive backend (priority 2) that holds the checked original')
    sha256: str = Field(pattern=r'^[0-9a-fA-F]{64}$', description="the original's sha256, hex")


class ScaledRequest(BaseModel):
    type: int = Field(ge=0, le=32767, description='the version to put in place of the original (see the README)')


class VersionHeld(BaseModel):
    storage_id: int
    type: int
    version: str
    backend_type: str
    priority: int
    object_name: str | None


class FileStateModel(BaseModel):
    group: str
    file_id: int
    object_name: str
    file_size: int
    sha256: str
    outcome: str
    active: VersionHeld | None
    held: list[VersionHeld]


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
    the whole (no Range, a malformed one, or several ranges, which are answered whole: RFC 9110
    lets a server ignore Range)."""
    if not header:
        return None
    match = re.fullmatch(r'\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*', header)
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


def etag_matches(if_match: str, sha256_hex: str) -> bool:
    """If-Match against the original's strong ETag; '*' matches an original that exists."""
    tags = [tag.strip() for tag in if_match.split(',')]
    return '*' in tags or any(tag.strip('"').lower() == sha256_hex for tag in tags if not tag.startswith('W/'))


def create_app(config: ServiceConfig | None = None) -> FastAPI:
    """The service as an ASGI app; its configuration from the environment unless given."""
    state: dict = {}

    def service() -> Service:
        if 'service' not in state:
            state['service'] = Service(config or ServiceConfig.from_env())
        return state['service']

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service()            # a configuration error shows at start, not at the first request
        yield

    app = FastAPI(title='mitwelten-storage service', version='1', lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description='Originals of the Mitwelten catalog, archived without S3 keys: see the README.')

    app.add_middleware(Authentication, authenticator=lambda: service().auth)

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
        return problem_response(exc.status_code, 'http-error', str(exc.detail), str(exc.detail), exc.headers)

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
        return itertools.chain([first] if first is not None else [], chunks)

    def get_original(kind: Kind, file_id: FileId, request: Request, claims: dict = Depends(reader),
                     range: Annotated[str | None, Header()] = None,
                     if_range: Annotated[str | None, Header()] = None):
        with service().pool.connection() as conn:
            file, backend = ms.active_original(conn, service().backends, kind.group, file_id)
        headers = {'ETag': f'"{file.sha256}"', 'Accept-Ranges': 'bytes',
                   'Repr-Digest': ms.repr_digest(file.sha256)}
        content_type = ms.content_type_of(ms.VERSIONS[(kind.group, 0)], file.object_name)
        wanted = (parse_range(range, file.file_size)
                  if not if_range or if_range.strip() == f'"{file.sha256}"' else None)    # If-Range: a strong ETag
        if wanted == 'unsatisfiable':
            raise Failure(416, 'range-not-satisfiable', 'Range not satisfiable',
                          f'the original has {file.file_size} bytes; {range!r} asks for none of them',
                          {'Content-Range': f'bytes */{file.file_size}', **headers})
        if request.method == 'HEAD':
            if backend.size(file.object_name) is None:
                raise ms.SourceMissing(f'{backend.describe()} does not hold {file.object_name}', file.object_name)
            first, last = wanted or (0, file.file_size - 1)
            if wanted:
                headers['Content-Range'] = f'bytes {first}-{last}/{file.file_size}'
            return Response(status_code=206 if wanted else 200, media_type=content_type,
                            headers={**headers, 'Content-Length': str(last - first + 1)})
        if wanted:
            # A part cannot be checked against the whole's sha256: the client checks what it
            # puts together against Repr-Digest, as --via does.
            first, last = wanted
            headers.update({'Content-Range': f'bytes {first}-{last}/{file.file_size}',
                            'Content-Length': str(last - first + 1)})
            body = started(backend.read(file.object_name, start=first, end=last, piece=PIECE), kind, file_id)
            return StreamingResponse(body, status_code=206, media_type=content_type, headers=headers)
        headers['Content-Length'] = str(file.file_size)
        body = ms.CheckedStream(started(backend.read(file.object_name, piece=PIECE), kind, file_id), file,
                                withhold_last=True)
        return StreamingResponse(checked_body(body, kind, file_id), media_type=content_type, headers=headers)

    for method in ('GET', 'HEAD'):
        app.add_api_route('/{kind}/{file_id}/original', get_original, methods=[method], response_class=Response,
                          operation_id=f'{method.lower()}_original',
                          summary="The file's original, streamed from the online tier" + (
                              ' (its headers only)' if method == 'HEAD' else ''),
                          responses={200: {'description': 'the whole original',
                                           'content': {t: {} for t in original_types}},
                                     206: {'description': 'the range asked for',
                                           'content': {t: {} for t in original_types}},
                                     **problems(401, 403, 404, 416)})

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
                         **problems(401, 403, 404, 409, 422)})
    def post_archive(kind: Kind, file_id: FileId, body: ArchiveRecord, claims: dict = Depends(writer)):
        with service().pool.connection() as conn:
            state = ms.record_archived(conn, kind.group, file_id, body.storage_id, body.sha256)
        return JSONResponse(state.as_dict(), status_code=201 if state.outcome == 'created' else 200)

    @app.post('/{kind}/{file_id}/scaled', response_model=FileStateModel,
              summary='Make a version from the original online and put it in its place',
              responses=problems(401, 403, 404, 409, 422))
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
                responses=problems(401, 403, 404, 409, 412, 428))
    def delete_original(kind: Kind, file_id: FileId, claims: dict = Depends(writer),
                        if_match: Annotated[str | None, Header()] = None):
        if not if_match:
            raise Failure(428, 'if-match-required', 'Precondition required',
                          'deleting an original needs If-Match: "<its sha256>"')
        with service().pool.connection() as conn:
            file = ms.fetch_file(conn, kind.group, file_id)
            if not etag_matches(if_match, file.sha256):
                raise ms.OriginalChanged(f"If-Match {if_match} is not the original's ETag \"{file.sha256}\"")
            ms.delete_original(conn, service().backends, kind.group, file_id, file.sha256,
                               service().config.min_copies)
        return Response(status_code=204)

    @app.get('/backends', summary='The backends, as `info --json` lists them', responses=problems(401, 403))
    def get_backends(claims: dict = Depends(reader)) -> list[dict]:
        with service().pool.connection() as conn:
            return ms.list_backends(service().config.catalog, conn=conn)

    @app.get('/healthz', summary='Whether the catalog and the S3 servers answer (no token)',
             responses={503: PROBLEMS[503]})
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


def checked_body(chunks: Iterator[bytes], kind: Kind, file_id: int) -> Iterator[bytes]:
    """The original's pieces; a mismatch with the catalog's sha256 is logged and raised, which
    aborts the connection before the last piece: the client never sees a clean end."""
    try:
        yield from chunks
    except ms.ChecksumMismatch as exc:
        log.error('GET /%s/%s/original aborted: %s', kind.value, file_id, exc)
        raise


app = create_app()


# =================================================================================================
# Command line
# =================================================================================================

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='mitwelten_service.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1)')
    parser.add_argument('--port', type=int, default=8080, help='port (default 8080)')
    parser.add_argument('--workers', type=int, default=1, help='worker processes (default 1)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s: %(name)s: %(message)s')
    try:
        ServiceConfig.from_env()
    except ms.ConfigError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return ms.EXIT_USAGE
    uvicorn.run('mitwelten_service:app', host=args.host, port=args.port, workers=args.workers,
                proxy_headers=True, forwarded_allow_ips=os.environ.get('FORWARDED_ALLOW_IPS', '127.0.0.1'))
    return ms.EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
