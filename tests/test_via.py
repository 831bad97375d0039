"""The workstation side: `copy` and `archive` with `--via URL`, through the storage service, with
no S3 keys and a catalog role that may only read. Everything the tool promises holds through
the service: checked originals, atomic writes, resume, summaries and exit codes, kill -9 then
the same command again, a dropped connection resumed with a Range request, and several
workstations and service processes at once."""

from __future__ import annotations

import re
import signal
import socket
import threading

import pytest

import mitwelten_storage as ms
from conftest import files_under, service_process, wait_for

NO_S3_KEYS = ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_DEFAULT_REGION', 'AWS_PROFILE')


def bucket_keys(world, bucket: str) -> set[str]:
    pages = world.s3.get_paginator('list_objects_v2').paginate(Bucket=bucket)
    return {obj['Key'] for page in pages for obj in page.get('Contents', [])}


def via(world, service, *args, env: dict | None = None, **kwargs):
    """The tool through the service: a token, no S3 keys."""
    return world.cli(*args, '--via', service.url, env={**service.env(), **(env or {})}, unset=NO_S3_KEYS, **kwargs)


@pytest.fixture
def online(world, service):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend(label='Workstation disk')
    files = world.images_on_s3(6, active, width=2400, height=1800)
    return bucket, active, archive, disk, files


def test_archive_through_the_service_with_no_s3_keys_and_a_catalog_it_may_only_read(world, service, online,
                                                                                      readonly_dsn, tmp_path):
    bucket, active, archive, disk, files = online
    token_file = tmp_path / 'token'
    token_file.write_text(service.token() + '\n')
    result = world.cli('archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 1,
                       '--via', service.url, env={'MITWELTEN_DB': readonly_dsn, 'MITWELTEN_TOKEN_FILE': str(token_file)},
                       unset=NO_S3_KEYS + ('MITWELTEN_TOKEN',))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '6 replaced' in result.stdout and 'through the storage service at' in result.stdout
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    assert world.rows(archive) == {f.file_id: 0 for f in files}
    assert world.rows(active) == {f.file_id: 1 for f in files}
    assert bucket_keys(world, bucket) == {f.object_name.replace('.jpg', '.webp') for f in files}
    again = world.cli('archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 1, '--via', service.url,
                      env={'MITWELTEN_DB': readonly_dsn, **service.env()}, unset=NO_S3_KEYS)
    assert again.returncode == 0 and 'nothing to do' in again.stdout


def test_copy_and_delete_original_through_the_service(world, service, online):
    bucket, active, archive, disk, files = online
    copied = via(world, service, 'copy', '-s', active, '-t', archive, 'all_images', '--limit', 2)
    assert copied.returncode == 0 and '2 copied' in copied.stdout, copied.stdout + copied.stderr
    assert len(world.rows(archive)) == 2 and len(files_under(disk / 'archive')) == 2
    refused = via(world, service, 'copy', '-s', active, '-t', archive, 'all_images', '--type', 1)
    assert refused.returncode == 2 and 'only originals are copied' in refused.stderr
    deleted = via(world, service, 'archive', '-s', active, '-t', archive, 'all_images', '--delete-original')
    assert deleted.returncode == 0 and '6 deleted' in deleted.stdout, deleted.stdout + deleted.stderr
    assert bucket_keys(world, bucket) == set() and world.rows(active) == {}
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}


def test_min_copies_of_the_workstation_and_rule_7_hold_through_the_service(world, service, online):
    bucket, active, archive, disk, files = online
    broken = files[0]
    truncated = broken.data[:len(broken.data) // 2]
    world.s3.put_object(Bucket=bucket, Key=broken.object_name, Body=truncated)
    world.query('UPDATE files_image SET sha256 = %s, file_size = %s WHERE file_id = %s',
                (ms.hashlib.sha256(truncated).hexdigest(), len(truncated), broken.file_id))
    kept = via(world, service, 'archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 1,
               '--min-copies', 2)
    assert kept.returncode == 0 and '6 kept' in kept.stdout, kept.stdout + kept.stderr
    assert set(world.rows(active).values()) == {0} and len(world.rows(archive)) == 6
    result = via(world, service, 'archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 1)
    assert result.returncode == 1
    assert f'{broken.object_name}: archived, version failed: cannot make a WebP of it: image file is truncated' \
        in result.stdout
    assert '5 replaced' in result.stdout
    assert world.rows(active)[broken.file_id] == 0 and world.s3_bytes(bucket, broken.object_name) == truncated
    assert (disk / 'archive' / broken.object_name).read_bytes() == truncated


def test_a_corrupted_original_is_never_archived_through_the_service(world, service, online):
    bucket, active, archive, disk, files = online
    bad = bytearray(files[1].data)
    bad[1000] ^= 0x55
    world.s3.put_object(Bucket=bucket, Key=files[1].object_name, Body=bytes(bad))
    result = via(world, service, 'archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 2)
    assert result.returncode == 1
    assert f'FAILED {files[1].object_name}: sha256' in result.stderr
    assert files[1].file_id not in world.rows(archive) and world.rows(active)[files[1].file_id] == 0
    assert not (disk / 'archive' / files[1].object_name).exists()
    assert [p for p in disk.rglob('*') if p.name.endswith(ms.TMP_SUFFIX)] == []


def test_originals_missing_online_fail_their_files_not_the_run(world, service, online):
    """The service answers 502 (original missing on the online tier) for three files in a row:
    each is named as missing, and the run goes on with the rest."""
    bucket, active, archive, disk, files = online
    for f in files[:3]:
        world.s3.delete_object(Bucket=bucket, Key=f.object_name)
    result = via(world, service, 'copy', '-s', active, '-t', archive, 'all_images', '--jobs', 1)
    assert result.returncode == 1 and 'stopped early' not in result.stdout, result.stdout
    assert '3 copied' in result.stdout and '3 failed' in result.stdout
    for f in files[:3]:
        assert f'FAILED {f.object_name}: object {f.object_name} is missing' in result.stderr
    assert set(world.rows(archive)) == {f.file_id for f in files[3:]}


def test_the_source_must_be_the_active_tier(world, service, online):
    bucket, active, archive, disk, files = online
    public = world.create_s3_backend(priority=0)
    world.query('UPDATE storage_backend SET priority = 1 WHERE storage_id = %s', (active,))
    result = via(world, service, 'archive', '-s', active, '-t', archive, 'all_images', '--delete-original')
    assert result.returncode == 2
    assert 'the source must be the active tier' in result.stderr and f'backend {public} (s3' in result.stderr
    assert world.rows(archive) == {}


def test_tokens_and_an_unreachable_service_are_refused_before_anything_is_done(world, service, online):
    bucket, active, archive, disk, files = online
    args = ('archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 1)
    no_token = world.cli(*args, '--via', service.url, unset=NO_S3_KEYS + ('MITWELTEN_TOKEN', 'MITWELTEN_TOKEN_FILE'))
    assert no_token.returncode == 2 and 'set MITWELTEN_TOKEN, or MITWELTEN_TOKEN_FILE' in no_token.stderr
    missing_file = world.cli(*args, '--via', service.url, env={'MITWELTEN_TOKEN_FILE': '/nonexistent/token'},
                             unset=NO_S3_KEYS + ('MITWELTEN_TOKEN',))
    assert missing_file.returncode == 2 and 'MITWELTEN_TOKEN_FILE=/nonexistent/token' in missing_file.stderr
    expired = world.cli(*args, '--via', service.url, env={'MITWELTEN_TOKEN': service.token(expires_in=-120)},
                        unset=NO_S3_KEYS)
    assert expired.returncode == 2 and 'refused the token (401' in expired.stderr
    reader = world.cli(*args, '--via', service.url, env={'MITWELTEN_TOKEN': service.token(roles=['other'])},
                       unset=NO_S3_KEYS)
    assert reader.returncode == 2 and "lacks the read role 'internal' and the write role 'storage-admin'" in reader.stderr
    nobody = world.cli(*args, '--via', 'http://127.0.0.1:1', env={**service.env(), 'MITWELTEN_CONNECT_TIMEOUT': '1',
                                                                  'MITWELTEN_ATTEMPTS': '1'}, unset=NO_S3_KEYS)
    assert nobody.returncode == 2 and 'cannot reach the storage service at http://127.0.0.1:1' in nobody.stderr
    for result in (no_token, missing_file, expired, reader, nobody):
        assert 'Traceback' not in result.stderr
    assert world.rows(archive) == {} and files_under(disk / 'archive') == {}


def test_kill_9_in_the_middle_of_archive_through_the_service_then_rerun(world, service):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend()
    files = world.images_on_s3(120, active, width=480, height=360)
    args = ('archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 2, '--jobs', 4,
            '--via', service.url)
    process = world.popen(*args, env=service.env())
    wait_for(lambda: sum(k.endswith('.webp') for k in bucket_keys(world, bucket)) >= 10 or process.poll() is not None,
             'replacements')
    assert process.poll() is None, 'the run finished before it could be killed'
    process.kill()
    process.wait()
    archived, at_active, on_disk = world.rows(archive), world.rows(active), files_under(disk / 'archive')
    keys = bucket_keys(world, bucket)
    for f in files:      # no original lost: whole and recorded on the disk, or still online
        assert (archived.get(f.file_id) == 0 and on_disk.get(f.object_name) == f.data) or (
            at_active.get(f.file_id) == 0 and f.object_name in keys), f.object_name
    rerun = via(world, service, *args[:-2])
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert world.rows(archive) == {f.file_id: 0 for f in files} and world.rows(active) == {f.file_id: 2 for f in files}
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    assert bucket_keys(world, bucket) == {f.object_name.replace('.jpg', '.webp') for f in files}


class CuttingProxy:
    """A TCP proxy in front of the service that cuts the connection once, in the middle of the
    first answer to a GET of an original, after `cut_after` bytes; and notes the requests."""

    def __init__(self, target_port: int, cut_after: int):
        self.target_port, self.cut_after = target_port, cut_after
        self.cut_done = False
        self.requests: list[str] = []
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(('127.0.0.1', self.target_port))
        current = {'head': '', 'sent': 0}

        def to_service():
            try:
                while data := client.recv(65536):
                    if re.match(rb'(GET|HEAD|POST|DELETE) ', data):
                        current['head'], current['sent'] = data.decode('latin-1'), 0
                        self.requests.append(current['head'])
                    upstream.sendall(data)
                upstream.shutdown(socket.SHUT_WR)
            except OSError:          # the other direction closed both sockets
                pass

        threading.Thread(target=to_service, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                current['sent'] += len(data)
                head = current['head']
                if (not self.cut_done and head.startswith('GET ') and '/original' in head and 'Range:' not in head
                        and current['sent'] > self.cut_after):
                    self.cut_done = True
                    client.sendall(data[:len(data) // 2])
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):     # shutdown first: it wakes the other thread's recv
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_dropped_connection_mid_file_is_resumed_with_a_range_request(world, service, online):
    bucket, active, archive, disk, files = online
    proxy = CuttingProxy(int(service.url.rsplit(':', 1)[1]), cut_after=200_000)
    try:
        result = world.cli('copy', '-s', active, '-t', archive, 'all_images', '--jobs', 1,
                           '--via', f'http://127.0.0.1:{proxy.port}', env=service.env(), unset=NO_S3_KEYS)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert proxy.cut_done
    resumed = [r for r in proxy.requests if re.search(r'(?im)^range: bytes=[1-9]\d*-\r?$', r)]
    assert len(resumed) == 1, proxy.requests
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    assert world.rows(archive) == {f.file_id: 0 for f in files}


def test_two_services_and_two_workstations_at_once_act_once_on_each_file(world, issuer):
    """Two service processes on one catalog; two `archive --via` runs over overlapping batches
    (FS1's images and all images) onto two disks at once. Every original ends on at least one
    disk, whole, each disk recording it at most once; every original online is replaced exactly
    once; no row is lost or doubled."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    disk_a, root_a = world.create_local_backend(label='Workstation A')
    disk_b, root_b = world.create_local_backend(label='Workstation B')
    files = world.images_on_s3(60, active, width=320, height=240)
    services = [service_process(world, issuer) for _ in range(2)]
    token = {'MITWELTEN_TOKEN': issuer.token()}
    try:
        runs = [world.popen('archive', '-s', active, '-t', disk, batch, '--replace-with', 2, '--jobs', 3,
                            '--via', url, env=token)
                for (disk, batch), (_, url) in zip(((disk_a, 'fs1_images'), (disk_b, 'all_images')), services)]
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        for process, _ in services:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stdout + stderr
    fs1 = {f.file_id for f in files if f.node_label in ('0344-6782', '6444-8804')}
    rows_a, rows_b = world.rows(disk_a), world.rows(disk_b)
    assert set(rows_a) == fs1 and set(rows_a.values()) == {0}
    assert set(rows_b) >= {f.file_id for f in files} - fs1 and set(rows_b.values()) == {0}
    on_a, on_b = files_under(root_a / 'archive'), files_under(root_b / 'archive')
    for f in files:
        for rows, on_disk in ((rows_a, on_a), (rows_b, on_b)):
            if f.file_id in rows:
                assert on_disk[f.object_name] == f.data
    assert world.rows(active) == {f.file_id: 2 for f in files}
    assert bucket_keys(world, bucket) == {f.object_name.replace('.jpg', '.webp') for f in files}
    counts = world.query('SELECT count(*), count(DISTINCT (file_id, storage_id)) FROM mm_files_image_storage')[0]
    assert counts[0] == counts[1] == len(rows_a) + len(rows_b) + len(files)
    # Each replacement was done by one run; the other, if it asked, found it done.
    replaced_by = {}
    for log in world.log_dir.glob('*-archive-*.log'):
        for line in log.read_text().splitlines():
            fields = line.split('\t')
            if len(fields) == 6 and fields[1] == 'replaced' and 'already' not in fields[5]:
                replaced_by.setdefault(int(fields[2]), []).append(log.name)
    assert {file_id: len(logs) for file_id, logs in replaced_by.items()} == {f.file_id: 1 for f in files}
