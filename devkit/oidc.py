"""A test OIDC issuer, as Mitwelten's Keycloak realm would be for the storage service: RSA keys
made here, their JWKS served over HTTP on loopback, and tokens minted with whatever claims a test
(or `make serve`) needs. Never for production.

    with TestIssuer() as issuer:
        issuer.url                 # 'http://127.0.0.1:PORT/realms/mitwelten' (the tokens' iss)
        issuer.jwks_url            # issuer.url + '/protocol/openid-connect/certs'
        issuer.token(roles=['internal'])
        issuer.rotate()            # a new signing key; the JWKS then lists both
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
    def __init__(self, audience: str = AUDIENCE):
        self.audience = audience
        self.keys = [SigningKey()]
        self.jwks_requests = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != REALM_PATH + '/protocol/openid-connect/certs':
                    self.send_error(404)
                    return
                issuer.jwks_requests += 1
                body = json.dumps({'keys': [key.jwk() for key in issuer.keys]}).encode()
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
    def url(self) -> str:
        return f'http://127.0.0.1:{self.server.server_address[1]}{REALM_PATH}'

    @property
    def jwks_url(self) -> str:
        return self.url + '/protocol/openid-connect/certs'

    def token(self, roles=('internal', 'storage-admin'), *, audience: str | None = None, issuer: str | None = None,
              expires_in: float = 3600, key: SigningKey | None = None, algorithm: str = 'RS256', **claims) -> str:
        """A token as Keycloak issues it: realm roles under realm_access.roles."""
        now = int(time.time())
        key = key or self.keys[-1]
        payload = {'iss': issuer or self.url, 'aud': audience or self.audience, 'sub': 'researcher',
                   'iat': now, 'exp': now + int(expires_in), 'azp': 'mitwelten-storage-cli',
                   'preferred_username': 'researcher', 'realm_access': {'roles': list(roles)}, **claims}
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
