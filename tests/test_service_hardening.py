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
from conftest import ROOT, ServiceUnderTest, service_config, service_in_thread, service_process
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
