"""The storage service against hostile requests, real HTTP clients (curl, wget, aria2c) and
standard identity providers (issue 17): roles that are not a list of strings, bodies refused
unread, ranges checked whole, conditional requests, Allow, discovery, GET /me, metrics and
the request log. Each against a real uvicorn on loopback, the suite's PostgreSQL and S3."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import types
from pathlib import Path

import pytest
import urllib3

import mitwelten_service
import mitwelten_storage as ms
from conftest import ROOT, ServiceUnderTest, service_config, service_in_thread, service_process, wait_for
from devkit import oidc

MiB = 1024 * 1024


def problem(response, status: int, kind: str) -> dict:
    assert response.status == status, (response.status, response.data[:500])
    assert response.headers['Content-Type'] == 'application/problem+json'
    body = json.loads(response.data)
    assert body['type'] == ms.PROBLEM + kind and body['status'] == status and body['detail']
    return body


@pytest.fixture
def online(world, service):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    image, = world.images_on_s3(1, active, width=2400, height=1800)
    return types.SimpleNamespace(bucket=bucket, active=active, image=image, service=service, world=world,
                                 path=f'/images/{image.file_id}/original')


@pytest.fixture
def large(world, service):
    """A camera image of several MiB (so that clients split it into segments), sound in S3."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    image, = world.images_on_s3(1, active, width=5200, height=3900)
    assert len(image.data) > 4 * MiB
    return types.SimpleNamespace(bucket=bucket, active=active, image=image, service=service, world=world,
                                 path=f'/images/{image.file_id}/original', url=service.url + f'/images/{image.file_id}/original')


def corrupt(o, at: float = 0.9) -> None:
    """One byte flipped at `at` of the object in S3 (same size; the catalog unchanged)."""
    data = bytearray(o.image.data)
    data[int(len(data) * at)] ^= 0xFF
    o.world.s3.put_object(Bucket=o.bucket, Key=o.image.object_name, Body=bytes(data))


# --- security ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('claim', [
    {'realm_access': {'roles': 'not-internal'}}, {'realm_access': {'roles': 'internal'}},
    {'realm_access': {'roles': ['internal', 5]}}, {'realm_access': {'roles': {'internal': True}}},
    {'realm_access': {'roles': [['internal']]}}, {'realm_access': ['internal']}, {'realm_access': 'internal'},
    {'realm_access': None}, {'realm_access': 7}, {'realm_access': {}}, {}])
def test_a_roles_claim_that_is_not_a_list_of_strings_grants_nothing(online, claim):
    service = online.service
    token = service.issuer.token(roles=(), **claim) if claim else service.issuer.token(roles=(), realm_access=None)
    for method, path in (('GET', '/backends'), ('GET', online.path), ('HEAD', online.path)):
        response = service.request(method, path, token=token)
        assert response.status == 403, (claim, method, path, response.status)
        assert 'error="insufficient_scope"' in response.headers['WWW-Authenticate']
    problem(service.request('GET', '/backends', token=token), 403, 'forbidden')
    problem(service.request('POST', f'/images/{online.image.file_id}/scaled', token=token, json_body={'type': 1}),
            403, 'forbidden')
    me = service.request('GET', '/me', token=token)
    assert me.status == 200 and json.loads(me.data)['roles'] == [] and not json.loads(me.data)['can_read']
    # The keep-alive connection survived every answer: one connection served them all.
    assert service.http.connection_from_url(service.url).num_connections == 1


def raw_request(url: str, head: str, body_part: bytes, timeout: float = 60) -> tuple[bytes, bool]:
    """Send a request's head and only the first part of its body, then read the answer: what
    came back, and whether the service closed the connection with the rest of the body unsent.
    A service that read the whole body before answering would never answer (the read times out)."""
    host, port = url.removeprefix('http://').split(':')
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode('latin-1') + body_part)
        answer = b''
        while True:
            data = sock.recv(65536)
            if not data:
                return answer, True
            answer += data
            if b'\r\n\r\n' in answer:
                headers, _, rest = answer.partition(b'\r\n\r\n')
                length = int(next((line.split(b':')[1] for line in headers.split(b'\r\n')
                                   if line.lower().startswith(b'content-length:')), b'0'))
                if len(rest) >= length:
                    # The whole answer is in: the connection must now be closed by the service.
                    try:
                        closed = sock.recv(65536) == b''
                    except ConnectionResetError:
                        closed = True
                    return answer, closed


@pytest.mark.parametrize('who, status', [('no role', 403), ('writer', 413)])
def test_a_large_body_is_refused_unread_after_the_token_and_role(online, who, status):
    service = online.service
    token = service.issuer.token(roles=()) if who == 'no role' else service.token()
    big = 200 * 1000 * 1000
    head = (f'POST /images/{online.image.file_id}/scaled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n'
            f'Content-Type: application/json\r\nContent-Length: {big}\r\n\r\n')
    answer, closed = raw_request(service.url, head, b'{"type": 1, "pad": "' + b'x' * 65536)
    assert answer.startswith(f'HTTP/1.1 {status} '.encode()), answer[:300]
    assert b'application/problem+json' in answer and closed
    if who == 'writer':
        # Chunked, without a length: refused as soon as it passes 64 KiB.
        head = (f'POST /images/{online.image.file_id}/scaled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n'
                'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n')
        chunk = b'x' * 40000
        chunks = (f'{len(chunk):x}\r\n'.encode() + chunk + b'\r\n') * 3
        answer, closed = raw_request(service.url, head, chunks)
        assert answer.startswith(b'HTTP/1.1 413 '), answer[:300]
        assert closed
    assert online.world.rows(online.active) == {online.image.file_id: 0}       # nothing was done
    # A body under the limit is read as always.
    problem(service.request('POST', f'/images/{online.image.file_id}/scaled', json_body={'type': 1, 'pad': 'x' * 60000}),
            409, 'too-few-copies')


@pytest.mark.parametrize('header', ['bytes=0-' + '9' * 5000, 'bytes=' + '1' * 5000 + '-', 'bytes=-' + '7' * 5000,
                                    'bytes=0-' + '9' * 19])
def test_range_numbers_of_thousands_of_digits_are_ignored(online, header):
    data = online.image.data
    response = online.service.request('GET', online.path, headers={'Range': header})
    assert response.status == 200 and response.data == data
    head = online.service.request('HEAD', online.path, headers={'Range': header})
    assert head.status == 200 and head.headers['Content-Length'] == str(len(data))


# --- HTTP conformance ---------------------------------------------------------------------------------

def test_head_ignores_range(online):
    head = online.service.request('HEAD', online.path, headers={'Range': 'bytes=0-9'})
    assert head.status == 200 and head.data == b''
    assert head.headers['Content-Length'] == str(len(online.image.data)) and 'Content-Range' not in head.headers


def test_401_and_403_say_why_in_www_authenticate(online):
    service = online.service
    missing = service.request('GET', '/backends', token=None)
    assert missing.status == 401 and missing.headers['WWW-Authenticate'].startswith('Bearer')
    assert 'error=' not in missing.headers['WWW-Authenticate']          # no token given: no error (RFC 6750 3.1)
    for bad in ('not-a-jwt', service.issuer.token(expires_in=-3600)):
        response = service.request('GET', '/backends', token=bad)
        assert response.status == 401 and 'error="invalid_token"' in response.headers['WWW-Authenticate']
    forbidden = service.request('DELETE', online.path, token=service.issuer.token(roles=['internal']),
                                headers={'If-Match': f'"{online.image.sha256}"'})
    problem(forbidden, 403, 'forbidden')
    assert forbidden.headers['WWW-Authenticate'].startswith('Bearer')
    assert 'error="insufficient_scope"' in forbidden.headers['WWW-Authenticate']


def test_405_names_exactly_the_methods_the_path_has(online):
    service = online.service
    documented = json.loads(service.request('GET', '/openapi.json').data)['paths']
    for path, template in ((online.path, '/{kind}/{file_id}/original'), ('/backends', '/backends'),
                           ('/healthz', '/healthz'), ('/me', '/me')):
        has = {method.upper() for method in documented[template]}
        for method in {'PUT', 'PATCH', 'POST', 'DELETE'} - has:
            response = service.request(method, path, headers={'Content-Length': '0'})
            problem(response, 405, 'http-error')
            assert {m.strip() for m in response.headers['Allow'].split(',')} == has, (method, path)
    response = service.request('PUT', online.path, headers={'Content-Length': '0'})
    if 'put' not in documented['/{kind}/{file_id}/original']:
        assert response.headers['Allow'] == 'GET, HEAD, DELETE'


def test_head_healthz_answers_monitors(online):
    head = online.service.request('HEAD', '/healthz', token=None)
    assert head.status == 200 and head.data == b''


def test_conditional_get(online):
    service, image, path = online.service, online.image, online.path
    etag = f'"{image.sha256}"'
    for header in (etag, f'W/{etag}', f'"0000", {etag}', '*'):
        for method in ('GET', 'HEAD'):
            response = service.request(method, path, headers={'If-None-Match': header})
            assert response.status == 304 and response.data == b'' and response.headers['ETag'] == etag, header
    assert service.request('GET', path, headers={'If-None-Match': '"0000"'}).data == image.data
    problem(service.request('GET', path, headers={'If-Match': '"nope"'}), 412, 'original-changed')
    problem(service.request('GET', path, headers={'If-Match': f'W/{etag}'}), 412, 'original-changed')
    assert service.request('HEAD', path, headers={'If-Match': '"nope"'}).status == 412
    for header in (etag, '*', f'"0000", {etag}'):
        ok = service.request('GET', path, headers={'If-Match': header})
        assert ok.status == 200 and ok.data == image.data
    problem(service.request('GET', path, headers={'If-Match': image.sha256}), 400, 'invalid-precondition')
    problem(service.request('GET', path, headers={'If-None-Match': image.sha256}), 400, 'invalid-precondition')
    # If-Match fails first, whatever Range asks (RFC 9110 13.2.2).
    assert service.request('GET', path, headers={'If-Match': '"nope"', 'Range': 'bytes=0-9'}).status == 412


def test_delete_refuses_an_unquoted_if_match(online):
    """An unquoted sha256 is not an entity-tag: 400 (a malformed request, not 412: nothing changed)."""
    service, image = online.service, online.image
    online.world.query('INSERT INTO mm_files_image_storage (file_id, storage_id, type) VALUES (%s, %s, 0)',
                       (image.file_id, online.world.create_local_backend()[0]))
    body = problem(service.request('DELETE', online.path, headers={'If-Match': image.sha256}), 400,
                   'invalid-precondition')
    assert 'double quotes' in body['detail']
    assert online.world.s3_bytes(online.bucket, image.object_name) == image.data
    assert service.request('DELETE', online.path, headers={'If-Match': f'"{image.sha256}"'}).status == 204


# --- ranges are checked too ----------------------------------------------------------------------------

@pytest.mark.parametrize('where', ['bytes=0-1048575', 'bytes=100-199', 'bytes=-1000'])
def test_a_range_of_a_corrupted_original_is_cut_off(large, where, caplog):
    corrupt(large)
    response = large.service.request('GET', large.path, headers={'Range': where}, stream=True)
    assert response.status == 206
    with caplog.at_level(logging.ERROR, logger='mitwelten_service'), \
            pytest.raises(urllib3.exceptions.ProtocolError):
        received = b''.join(response.stream(65536))
        assert len(received) == int(response.headers['Content-Length']), 'the range ended cleanly'
    assert 'aborted' in caplog.text
    metrics = large.service.request('GET', '/metrics', token=None).data.decode()
    assert 'mitwelten_originals_failed_check_total{kind="images"} 1.0' in metrics


def test_a_checked_original_is_trusted_for_ranges_only_while_its_etag_holds(large):
    service, data = large.service, large.image.data
    assert service.request('GET', large.path).data == data               # checked whole: trusted a while
    part = service.request('GET', large.path, headers={'Range': 'bytes=1000-1999'})
    assert part.status == 206 and part.data == data[1000:2000]
    corrupt(large)                                                        # a new object, a new ETag
    response = service.request('GET', large.path, headers={'Range': 'bytes=1000-1999'}, stream=True)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        b''.join(response.stream(65536))


def test_checked_range_reads_a_part_alone_once_the_object_checked_out(world):
    """In the engine: the first range costs a whole read, the next ones (same ETag) only their part."""
    bucket = world.new_bucket()
    storage_id = world.create_s3_backend(bucket)
    image, = world.images_on_s3(1, storage_id, width=2400, height=1800)
    backend = ms.open_backend(world.backend(storage_id), world.settings)
    conn = ms.connect_catalog(world.settings)
    file = ms.fetch_file(conn, 'image', image.file_id)
    conn.close()
    read = backend.read
    sizes = []

    def counted(*args, **kwargs):
        for chunk in read(*args, **kwargs):
            sizes.append(len(chunk))
            yield chunk
    backend.read = counted
    checked = ms.CheckedObjects(ttl=300)
    assert b''.join(ms.checked_range(backend, file, 10, 19, checked=checked, piece=MiB)) == image.data[10:20]
    assert sum(sizes) == len(image.data)
    sizes.clear()
    assert b''.join(ms.checked_range(backend, file, 30, 39, checked=checked, piece=MiB)) == image.data[30:40]
    assert sum(sizes) == 10
    sizes.clear()
    assert b''.join(ms.checked_range(backend, file, 30, 39, checked=ms.CheckedObjects(ttl=0),
                                     piece=MiB)) == image.data[30:40]
    assert sum(sizes) == len(image.data)                                  # TTL 0: nothing is trusted


def curl(*args, token: str) -> subprocess.CompletedProcess:
    return subprocess.run(['curl', '-sS', '-H', f'Authorization: Bearer {token}', *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not shutil.which('curl'), reason='curl is not installed')
@pytest.mark.parametrize('sound', [True, False], ids=['sound', 'corrupted'])
def test_curl_range_then_resume_never_ends_with_a_damaged_original(large, tmp_path, sound):
    if not sound:
        corrupt(large)
    out = tmp_path / 'image.jpg'
    token = large.service.token()
    first = curl('-r', '0-1048575', '-o', out, large.url, token=token)
    rest = curl('-C', '-', '-o', out, large.url, token=token)
    right = out.exists() and hashlib.sha256(out.read_bytes()).hexdigest() == large.image.sha256
    if sound:
        assert first.returncode == 0 and rest.returncode == 0 and right, (first.stderr, rest.stderr)
    else:
        assert first.returncode != 0 and rest.returncode != 0, (first.stderr, rest.stderr)
        assert not right


@pytest.mark.skipif(not shutil.which('wget'), reason='wget is not installed')
@pytest.mark.parametrize('sound', [True, False], ids=['sound', 'corrupted'])
def test_wget_continue_never_ends_with_a_damaged_original(large, tmp_path, sound):
    if not sound:
        corrupt(large)
    out = tmp_path / 'image.jpg'
    out.write_bytes(large.image.data[:MiB])            # a download cut off after its first MiB
    result = subprocess.run(['wget', '-q', '-c', '--tries=2', '--waitretry=0', '-O', str(out),
                             f'--header=Authorization: Bearer {large.service.token()}', large.url],
                            capture_output=True, text=True, timeout=120)
    right = hashlib.sha256(out.read_bytes()).hexdigest() == large.image.sha256
    if sound:
        assert result.returncode == 0 and right, result.stderr
    else:
        assert result.returncode != 0 and not right, result.stderr


@pytest.mark.skipif(not shutil.which('aria2c'), reason='aria2c is not installed (Debian package aria2)')
@pytest.mark.parametrize('sound', [True, False], ids=['sound', 'corrupted'])
def test_aria2c_segments_never_end_with_a_damaged_original(large, tmp_path, sound):
    if not sound:
        corrupt(large)
    result = subprocess.run(['aria2c', '-x4', '-s4', '-k1M', '--min-split-size=1M', '--max-tries=2',
                             '--retry-wait=0', '--console-log-level=warn', '--summary-interval=0',
                             '--allow-overwrite=true', '--auto-file-renaming=false', '-d', str(tmp_path),
                             '-o', 'image.jpg', f'--header=Authorization: Bearer {large.service.token()}', large.url],
                            capture_output=True, text=True, timeout=180)
    out = tmp_path / 'image.jpg'
    right = out.exists() and hashlib.sha256(out.read_bytes()).hexdigest() == large.image.sha256
    if sound:
        assert result.returncode == 0 and right, result.stdout + result.stderr
    else:
        assert result.returncode != 0 and not right, result.stdout + result.stderr


# --- a standard provider -----------------------------------------------------------------------------

def test_a_trailing_slash_issuer_is_compared_exactly_and_its_keys_found_by_discovery(world):
    with oidc.TestIssuer(path='/', trailing_slash=True) as issuer, \
            service_in_thread(service_config(world, issuer, config={'jwks_url': None})) as url:
        assert issuer.url.endswith('/') and issuer.url.count('/') == 3
        service = ServiceUnderTest(url, issuer, world)
        for _ in range(3):
            assert service.request('GET', '/backends').status == 200
        assert issuer.discovery_requests == 1 and issuer.jwks_requests >= 1        # fetched once, kept
        problem(service.request('GET', '/backends', token=issuer.token(issuer=issuer.url.rstrip('/'))),
                401, 'invalid-token')
    # Configured without the slash the provider's discovery document has: said, not guessed.
    with oidc.TestIssuer(path='/', trailing_slash=True) as issuer:
        stated = types.SimpleNamespace(url=issuer.url.rstrip('/'), audience=issuer.audience, jwks_url=None)
        with service_in_thread(service_config(world, stated, config={'jwks_url': None})) as url:
            body = problem(ServiceUnderTest(url, issuer, world).request('GET', '/backends'), 503,
                           'identity-provider-unavailable')
            assert issuer.url in body['detail'] and 'exactly' in body['detail']


def test_a_keycloak_realm_found_by_discovery(world):
    with oidc.TestIssuer() as issuer, service_in_thread(service_config(world, issuer, config={'jwks_url': None})) as url:
        assert ServiceUnderTest(url, issuer, world).request('GET', '/backends').status == 200
        assert issuer.discovery_requests == 1


@pytest.mark.parametrize('claim', ['scope', 'resource_access.mitwelten-storage.roles', 'roles', 'groups'])
def test_roles_from_the_claim_configured(world, issuer, claim):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    image, = world.images_on_s3(1, active)
    with service_in_thread(service_config(world, issuer, config={'roles_claim': claim})) as url:
        service = ServiceUnderTest(url, issuer, world)
        reader = issuer.token(roles=['internal'], roles_at=claim)
        writer = issuer.token(roles=['internal', 'storage-admin'], roles_at=claim)
        realm_only = issuer.token(roles=['internal', 'storage-admin'])            # Keycloak's realm roles
        got = service.request('GET', f'/images/{image.file_id}/original', token=reader)
        assert got.status == 200 and got.data == image.data
        problem(service.request('POST', f'/images/{image.file_id}/scaled', token=reader, json_body={'type': 1}),
                403, 'forbidden')
        problem(service.request('POST', f'/images/{image.file_id}/scaled', token=writer, json_body={'type': 1}),
                409, 'too-few-copies')                          # past the role check
        problem(service.request('GET', '/backends', token=realm_only), 403, 'forbidden')
        me = json.loads(service.request('GET', '/me', token=writer).data)
        assert me['roles'] == ['internal', 'storage-admin'] and me['can_read'] and me['can_write']
        if claim == 'scope':
            # A scope that merely contains the role's name is not the role.
            tricky = issuer.token(roles=(), scope='internal-not storage-admins')
            problem(service.request('GET', '/backends', token=tricky), 403, 'forbidden')


def test_token_leeway(world, issuer):
    late = issuer.token(expires_in=-10)
    with service_in_thread(service_config(world, issuer)) as url:
        assert ServiceUnderTest(url, issuer, world).request('GET', '/backends', token=late).status == 200
    with service_in_thread(service_config(world, issuer, config={'token_leeway': 0})) as url:
        problem(ServiceUnderTest(url, issuer, world).request('GET', '/backends', token=late), 401, 'invalid-token')


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv('MITWELTEN_OIDC_ISSUER', 'https://id.example.org/')
    monkeypatch.setenv('MITWELTEN_OIDC_AUDIENCE', 'mitwelten-storage')
    for name in ('MITWELTEN_OIDC_JWKS_URL', 'MITWELTEN_ROLES_CLAIM', 'MITWELTEN_TOKEN_LEEWAY', 'MITWELTEN_METRICS',
                 'MITWELTEN_LOG_FORMAT', 'MITWELTEN_RANGE_CHECK_MAX', 'MITWELTEN_CHECKED_TTL'):
        monkeypatch.delenv(name, raising=False)
    config = mitwelten_service.ServiceConfig.from_env()
    assert (config.issuer, config.jwks_url, config.roles_claim, config.token_leeway, config.metrics,
            config.log_format, config.range_check_max, config.checked_ttl) == (
        'https://id.example.org/', None, 'realm_access.roles', 30, True, 'text', 256 * MiB, 300)
    monkeypatch.setenv('MITWELTEN_TOKEN_LEEWAY', '5')
    monkeypatch.setenv('MITWELTEN_ROLES_CLAIM', 'scope')
    monkeypatch.setenv('MITWELTEN_METRICS', '0')
    monkeypatch.setenv('MITWELTEN_LOG_FORMAT', 'json')
    monkeypatch.setenv('MITWELTEN_CHECKED_TTL', '0')
    config = mitwelten_service.ServiceConfig.from_env()
    assert (config.token_leeway, config.roles_claim, config.metrics, config.log_format, config.checked_ttl) == (
        5, 'scope', False, 'json', 0)
    for name, value in (('MITWELTEN_TOKEN_LEEWAY', 'soon'), ('MITWELTEN_ROLES_CLAIM', 'realm_access..roles'),
                        ('MITWELTEN_LOG_FORMAT', 'xml'), ('MITWELTEN_METRICS', 'maybe'),
                        ('MITWELTEN_RANGE_CHECK_MAX', '-1')):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(ms.ConfigError, match=name):
                mitwelten_service.ServiceConfig.from_env()


NODE_OIDC = ROOT / 'devkit' / 'node-oidc'


@pytest.mark.skipif(not shutil.which('node') or not (NODE_OIDC / 'node_modules' / 'oidc-provider').is_dir(),
                    reason='node-oidc-provider needs node and `npm ci` in devkit/node-oidc (see its README.md)')
def test_node_oidc_provider_client_credentials_tokens(world):
    """A certified provider, not our test issuer: node-oidc-provider, client credentials, RS256
    JWT access tokens, roles as scopes, an issuer with a trailing slash found by discovery."""
    from devkit.services import free_port
    import base64
    import urllib.parse
    import urllib.request
    port = free_port()
    provider = subprocess.Popen(['node', str(NODE_OIDC / 'provider.mjs'), str(port)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        for line in provider.stdout:
            if line.startswith('ready '):
                issuer_url = line.split()[1]
                break
        else:
            pytest.fail('node-oidc-provider did not start')

        def token(client: str, secret: str, scope: str) -> str:
            request = urllib.request.Request(
                issuer_url + 'token', data=urllib.parse.urlencode({'grant_type': 'client_credentials',
                                                                    'scope': scope}).encode(),
                headers={'Authorization': 'Basic ' + base64.b64encode(f'{client}:{secret}'.encode()).decode()})
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())['access_token']
        bucket = world.new_bucket()
        active = world.create_s3_backend(bucket)
        image, = world.images_on_s3(1, active)
        provider_issuer = types.SimpleNamespace(url=issuer_url, audience='mitwelten-storage', jwks_url=None)
        with service_in_thread(service_config(world, provider_issuer,
                                              config={'jwks_url': None, 'roles_claim': 'scope'})) as url:
            service = ServiceUnderTest(url, None, world)
            writer = token('mitwelten-storage-cli', 'cli-secret', 'internal storage-admin')
            reader = token('mitwelten-storage-reader', 'reader-secret', 'internal')
            got = service.request('GET', f'/images/{image.file_id}/original', token=writer)
            assert got.status == 200 and got.data == image.data
            me = json.loads(service.request('GET', '/me', token=writer).data)
            assert me == {'subject': 'mitwelten-storage-cli', 'roles': ['internal', 'storage-admin'],
                          'can_read': True, 'can_write': True, 'read_role': 'internal',
                          'write_role': 'storage-admin'}
            assert service.request('GET', f'/images/{image.file_id}/original', token=reader).status == 200
            problem(service.request('POST', f'/images/{image.file_id}/scaled', token=reader, json_body={'type': 1}),
                    403, 'forbidden')
            problem(service.request('GET', '/backends', token=writer[:-4] + 'AAAA'), 401, 'invalid-token')
    finally:
        provider.terminate()
        provider.wait(30)


# --- GET /me and the workstation's check ---------------------------------------------------------------

def test_me_says_who_the_token_is(online):
    service = online.service
    me = service.request('GET', '/me')
    assert me.status == 200 and json.loads(me.data) == {
        'subject': 'researcher', 'roles': ['internal', 'storage-admin'], 'can_read': True, 'can_write': True,
        'read_role': 'internal', 'write_role': 'storage-admin'}
    none = json.loads(service.request('GET', '/me', token=service.issuer.token(roles=['offline_access'])).data)
    assert none['roles'] == ['offline_access'] and not none['can_read'] and not none['can_write']
    problem(service.request('GET', '/me', token=None), 401, 'unauthorized')


NO_S3_KEYS = ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_DEFAULT_REGION', 'AWS_PROFILE')


@pytest.mark.parametrize('command', [('copy',), ('archive', '--replace-with', 1), ('archive', '--delete-original')])
@pytest.mark.parametrize('roles, missing', [(['internal'], "the write role 'storage-admin'"),
                                            (['storage-admin'], "the read role 'internal'")])
def test_via_with_a_token_lacking_a_role_stops_before_anything_is_done(world, service, command, roles, missing):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend()
    files = world.images_on_s3(2, active)
    result = world.cli(command[0], '-s', active, '-t', archive, 'all_images', *command[1:], '--via', service.url,
                       env={'MITWELTEN_TOKEN': service.issuer.token(roles=roles)}, unset=NO_S3_KEYS)
    assert result.returncode == 2, result.stdout + result.stderr
    assert missing in result.stderr and 'Traceback' not in result.stderr
    assert not [p for p in disk.rglob('*') if p.is_file() and p.parent != disk]          # no file written
    assert world.rows(archive) == {} and world.rows(active) == {f.file_id: 0 for f in files}
    assert {o['Key'] for o in world.s3.list_objects_v2(Bucket=bucket)['Contents']} == {f.object_name for f in files}


# --- operable: metrics and the request log ---------------------------------------------------------------

def metric(text: str, line_start: str) -> float:
    values = [float(line.rsplit(' ', 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    assert values, f'no {line_start} in the metrics'
    return sum(values)


def test_metrics_in_the_prometheus_text_format(online):
    service, image = online.service, online.image
    assert service.request('GET', online.path).data == image.data
    problem(service.request('GET', '/images/424242/original'), 404, 'file-not-found')
    response = service.request('GET', '/metrics', token=None)
    assert response.status == 200 and response.headers['Content-Type'].startswith('text/plain; version=')
    text = response.data.decode()
    route = '/{kind}/{file_id}/original'
    assert metric(text, f'mitwelten_http_requests_total{{method="GET",route="{route}",status="200"}}') == 1
    assert metric(text, f'mitwelten_http_requests_total{{method="GET",route="{route}",status="404"}}') == 1
    assert metric(text, f'mitwelten_http_sent_bytes_total{{route="{route}"}}') >= len(image.data)
    assert metric(text, 'mitwelten_http_request_duration_seconds_count{method="GET",route="' + route) == 2
    assert metric(text, 'mitwelten_s3_request_duration_seconds_count{operation="GetObject"}') >= 1
    assert metric(text, 'mitwelten_catalog_query_duration_seconds_count') >= 2
    assert metric(text, 'mitwelten_originals_failed_check_total') == 0
    assert '424242' not in text                     # routes by template: ids never become labels


def test_metrics_off(world, issuer):
    with service_in_thread(service_config(world, issuer, config={'metrics': False})) as url:
        response = ServiceUnderTest(url, issuer, world).request('GET', '/metrics', token=None)
        problem(response, 404, 'http-error')
        assert b'mitwelten_http' not in response.data


def test_one_log_line_per_request_never_the_token(online, caplog):
    service = online.service
    token = service.token()
    with caplog.at_level(logging.INFO, logger='mitwelten_service'):
        service.request('GET', online.path, token=token)
        service.request('GET', '/backends', token=token + 'x')
        # The line is written once the answer is out: the client may have it a moment before.
        wait_for(lambda: len([r for r in caplog.records if r.name == 'mitwelten_service.access']) >= 2,
                 'two request log lines', 30)
    lines = [r for r in caplog.records if r.name == 'mitwelten_service.access']
    assert len(lines) == 2
    first = lines[0].request
    assert (first['method'], first['path'], first['route'], first['status'], first['bytes'], first['subject']) == (
        'GET', online.path, '/{kind}/{file_id}/original', 200, len(online.image.data), 'researcher')
    assert lines[1].request['status'] == 401 and lines[1].request['subject'] is None
    assert token not in caplog.text and token.split('.')[2] not in caplog.text


def test_json_logs_of_the_service_process(world, issuer):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    image, = world.images_on_s3(1, active)
    process, url = service_process(world, issuer, {'MITWELTEN_LOG_FORMAT': 'json'})
    token = issuer.token()
    try:
        client = ServiceUnderTest(url, issuer, world)
        assert client.request('GET', f'/images/{image.file_id}/original', token=token).data == image.data
        assert client.request('GET', '/healthz', token=None).status == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    entries = [json.loads(line) for line in output.splitlines() if line.startswith('{')]
    assert entries and len(entries) == len(output.strip().splitlines()), output[-2000:]     # every line JSON
    requests = [e for e in entries if e.get('route') == '/{kind}/{file_id}/original']
    assert len(requests) == 1
    assert (requests[0]['status'], requests[0]['bytes'], requests[0]['subject']) == (200, len(image.data), 'researcher')
    assert requests[0]['duration_ms'] > 0
    assert token not in output and os.environ.get('AWS_SECRET_ACCESS_KEY', 'no-key-set') not in output


def test_an_original_over_the_range_check_limit_is_sent_as_read(world, issuer):
    """Over MITWELTEN_RANGE_CHECK_MAX a range is not worth a whole read: it is sent as S3 gives
    it, and the client checks the whole against Repr-Digest (as --via does)."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    image, = world.images_on_s3(1, active, width=2400, height=1800)
    o = types.SimpleNamespace(world=world, bucket=bucket, image=image)
    corrupt(o, 0.5)
    with service_in_thread(service_config(world, issuer, config={'range_check_max': 1000})) as url:
        service = ServiceUnderTest(url, issuer, world)
        part = service.request('GET', f'/images/{image.file_id}/original', headers={'Range': 'bytes=0-99'})
        assert part.status == 206 and part.data == image.data[:100]
        assert part.headers['Repr-Digest'] == ms.repr_digest(image.sha256)


def test_metrics_of_several_workers_are_summed(world, issuer):
    from devkit.services import free_port
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    image, = world.images_on_s3(1, active)
    port = free_port()
    process = subprocess.Popen([os.sys.executable, str(ROOT / 'mitwelten_service.py'), '--port', str(port),
                                '--workers', '2'],
                               env={**world.env, 'MITWELTEN_OIDC_ISSUER': issuer.url,
                                    'MITWELTEN_OIDC_AUDIENCE': issuer.audience},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f'http://127.0.0.1:{port}'
    try:
        http = urllib3.PoolManager(retries=urllib3.Retry(connect=100, backoff_factor=0.1))
        deadline = time.monotonic() + 120
        while True:
            try:
                http.request('GET', url + '/healthz', timeout=2)
                break
            except urllib3.exceptions.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None, 'the service did not start'
                time.sleep(0.2)
        token = issuer.token()
        for _ in range(12):         # new connections: spread over the workers
            answer = urllib3.PoolManager().request('GET', url + f'/images/{image.file_id}/original',
                                                   headers={'Authorization': f'Bearer {token}'})
            assert answer.status == 200
        for _ in range(4):          # whichever worker answers, the sum of all of them
            text = urllib3.PoolManager().request('GET', url + '/metrics').data.decode()
            assert metric(text, 'mitwelten_http_requests_total{method="GET",route="/{kind}/{file_id}/original",'
                                'status="200"}') == 12
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert token not in output


def test_an_original_that_failed_its_check_is_named_by_its_digest_when_asked_again(large):
    """A client resuming a cut download of a corrupted original: the answer's Repr-Digest is what
    the object online hashes to (so a client that checks it, as --via does, names the damage),
    and the answer is cut all the same (for those that do not)."""
    corrupt(large)
    service = large.service
    first = service.request('GET', large.path, stream=True)
    assert first.headers['Repr-Digest'] == ms.repr_digest(large.image.sha256)     # not known yet
    with pytest.raises(urllib3.exceptions.ProtocolError):
        b''.join(first.stream(65536))
    damaged = bytearray(large.image.data)
    damaged[int(len(damaged) * 0.9)] ^= 0xFF
    for headers in ({'Range': 'bytes=1000-'}, {}):
        again = service.request('GET', large.path, headers=headers, stream=True)
        assert again.headers['Repr-Digest'] == ms.repr_digest(hashlib.sha256(damaged).hexdigest())
        with pytest.raises(urllib3.exceptions.ProtocolError):
            b''.join(again.stream(65536))
    large.world.s3.put_object(Bucket=large.bucket, Key=large.image.object_name, Body=large.image.data)   # repaired
    assert service.request('GET', large.path, headers={'Range': 'bytes=1000-'}).data == large.image.data[1000:]
