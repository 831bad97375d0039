"""A test OpenID provider for the storage service: RSA keys made here, its discovery document
and JWKS served over HTTP on loopback, and tokens minted with whatever claims a test (or `make
serve`) needs. Keycloak-shaped by default (a realm URL, realm roles), and standard where asked: a
trailing-slash issuer, roles as `scope` or as client roles. Never for production.

    with TestIssuer() as issuer:
        issuer.url                 # 'http://127.0.0.1:PORT/realms/mitwelten' (the tokens' iss)
        issuer.discovery_url       # issuer.url + '/.well-known/openid-configuration'
        issuer.jwks_url            # the discovery document's jwks_uri
        issuer.token(roles=['internal'])                       # realm_access.roles
        issuer.token(roles=['internal'], roles_at='scope')     # scope: 'internal'
        issuer.rotate()            # a new signing key; the JWKS then lists both

    TestIssuer(path='/', trailing_slash=True)   # iss 'http://127.0.0.1:PORT/', as node-oidc-provider,
                                                # Auth0 and Azure AD v1 give it

A real provider (node-oidc-provider) for the same tests: devkit/node-oidc/README.md.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

AUDIENCE = 'mitwelten-storage'
REALM_PATH = '/realms/mitwelten'


class SigningKey:
    def __init__(self):
        self.kid = uuid.uuid4().hex[:16]
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict:
        return {**json.loads(RSAAlgorithm.to_jwk(self.private.public_key())), 'kid': self.kid, 'use': 'sig',
                'alg': 'RS256'}


class TestIssuer:
    def __init__(self, audience: str = AUDIENCE, *, path: str = REALM_PATH, trailing_slash: bool = False):
        self.audience = audience
        self.path = '/' + path.strip('/') if path.strip('/') else ''
        self.trailing_slash = trailing_slash
        self.keys = [SigningKey()]
        self.jwks_requests = 0
        self.discovery_requests = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == issuer.jwks_path:
                    issuer.jwks_requests += 1
                    document = {'keys': [key.jwk() for key in issuer.keys]}
                elif self.path == issuer.path + '/.well-known/openid-configuration':
                    issuer.discovery_requests += 1
                    document = issuer.discovery()
                else:
                    self.send_error(404)
                    return
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f'http://127.0.0.1:{self.server.server_address[1]}'

    @property
    def url(self) -> str:
        """The issuer, exactly as the tokens' iss says it."""
        return self.base + self.path + ('/' if self.trailing_slash else '')

    @property
    def jwks_path(self) -> str:
        return self.path + '/protocol/openid-connect/certs'

    @property
    def jwks_url(self) -> str:
        return self.base + self.jwks_path

    @property
    def discovery_url(self) -> str:
        return self.base + self.path + '/.well-known/openid-configuration'

    def discovery(self) -> dict:
        """The OpenID Provider Metadata a standard provider publishes (the parts a resource
        server reads)."""
        return {'issuer': self.url, 'jwks_uri': self.jwks_url,
                'token_endpoint': self.base + self.path + '/protocol/openid-connect/token',
                'id_token_signing_alg_values_supported': ['RS256'],
                'grant_types_supported': ['client_credentials'], 'scopes_supported': ['internal', 'storage-admin']}

    def token(self, roles=('internal', 'storage-admin'), *, audience: str | None = None, issuer: str | None = None,
              expires_in: float = 3600, key: SigningKey | None = None, algorithm: str = 'RS256',
              roles_at: str = 'realm_access.roles', **claims) -> str:
        """A token with the roles at the dotted path `roles_at`: Keycloak's realm roles by
        default, `resource_access.CLIENT.roles`, `roles`, `groups`, or `scope` (a space-separated
        string, as RFC 9068 has it). Other claims as given (they win)."""
        now = int(time.time())
        key = key or self.keys[-1]
        payload = {'iss': issuer or self.url, 'aud': audience or self.audience, 'sub': 'researcher',
                   'iat': now, 'exp': now + int(expires_in), 'azp': 'mitwelten-storage-cli',
                   'preferred_username': 'researcher'}
        *parents, last = roles_at.split('.')
        where = payload
        for part in parents:
            where = where.setdefault(part, {})
        where[last] = ' '.join(roles) if last == 'scope' else list(roles)
        payload.update(claims)
        if algorithm == 'HS256':
            return jwt.encode(payload, 'a-shared-secret-that-no-service-trusts', algorithm='HS256',
                              headers={'kid': key.kid})
        return jwt.encode(payload, key.private, algorithm='RS256', headers={'kid': key.kid})

    def rotate(self, keep_old: bool = True) -> SigningKey:
        key = SigningKey()
        self.keys = (self.keys if keep_old else []) + [key]
        return key

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> 'TestIssuer':
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
