"""copy: originals between backends in every direction, checked, atomic, resumable; the rules of
"Never lose data" under bad input, wrong disks, crashes, kill -9 and Ctrl-C."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import signal
from pathlib import Path

import pytest

import mitwelten_storage as ms
from conftest import files_under, wait_for
from devkit import sample_data


def archive_files(disk: Path) -> dict[str, bytes]:
    return files_under(disk / 'archive')


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob('*') if p.name.endswith(ms.TMP_SUFFIX)]


def expected(files) -> dict[str, bytes]:
    return {f.object_name: f.data for f in files}


def assert_disk_agrees_with_catalog(world, storage_id: int, disk: Path, files) -> None:
    """Every recorded file is on the disk with the original's bytes, and no partial file stands
    under a final name (rules 1 and 2)."""
    by_id = {f.file_id: f for f in files}
    on_disk = archive_files(disk)
    for file_id in world.rows(storage_id):
        f = by_id[file_id]
        assert on_disk.get(f.object_name) == f.data, f.object_name
    for name, data in on_disk.items():
        assert name.endswith(ms.TMP_SUFFIX) or data == expected(files)[name], name


# --- the happy paths --------------------------------------------------------------------------

def test_copy_s3_to_local_copies_checks_and_records_every_original(world):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(12, source)
    result = world.cli('copy', '-s', source, '-t', target, 'all_images', '--jobs', 4)
    assert result.returncode == 0, result.stderr
    assert archive_files(disk) == expected(files)
    assert world.rows(target) == {f.file_id: 0 for f in files}
    assert '12 copied' in result.stdout and 'log: ' in result.stdout
    log_text = Path(result.stdout.split('log: ')[1].strip()).read_text()
    for f in files:
        assert f'\tcopied\t{f.file_id}\t{len(f.data)}\t{f.object_name}\t' in log_text
    # Re-running the same command does only what is left: nothing, and touches no file.
    mtimes = {p: p.stat().st_mtime_ns for p in (disk / 'archive').rglob('*.jpg')}
    again = world.cli('copy', '-s', source, '-t', target, 'all_images')
    assert again.returncode == 0 and 'nothing to do' in again.stdout
    assert '12 of the batch' in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (disk / 'archive').rglob('*.jpg')} == mtimes


@pytest.mark.parametrize('stream', ['received into the buffer', 'read through the public API'])
def test_copy_from_s3_with_and_without_the_private_stream(world, monkeypatch, stream):
    """S3 objects are received straight into a reused buffer through private attributes of
    botocore and urllib3; where a library version lacks them, the public API does the same job."""
    used = []
    real = ms.raw_http_stream
    if stream == 'read through the public API':
        monkeypatch.setattr(ms, 'raw_http_stream', lambda body: used.append('public') or None)
    else:
        monkeypatch.setattr(ms, 'raw_http_stream', lambda body: used.append('private') or real(body))
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(6, source)
    report = world.copy(source, target, jobs=2)
    assert report.exit_status == 0 and report.count('copied') == 6, report.failures
    assert archive_files(disk) == expected(files)
    assert used and set(used) == {'public' if 'public' in stream else 'private'}


def test_copy_audio_recordings_s3_to_local(world):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.recordings_on_s3(4, source, channels=2)
    report = world.copy(source, target, 'all_audio')
    assert report.exit_status == 0 and report.count('copied') == 4, report.failures
    assert archive_files(disk) == expected(files)
    assert world.rows(target, 'audio') == {f.file_id: 0 for f in files}


def test_copy_s3_to_s3_with_prefix_sets_content_type(world):
    source = world.create_s3_backend()
    target_bucket = world.new_bucket()
    target = world.create_s3_backend(target_bucket, priority=1, prefix='archive/v1')
    files = world.images_on_s3(5, source)
    report = world.copy(source, target)
    assert report.exit_status == 0, report.failures
    for f in files:
        obj = world.s3.get_object(Bucket=target_bucket, Key=f'archive/v1/{f.object_name}')
        assert obj['Body'].read() == f.data and obj['ContentType'] == 'image/jpeg'
    assert world.rows(target) == {f.file_id: 0 for f in files}


def test_copy_local_to_s3_and_local_to_local(world):
    disk_id, disk = world.create_local_backend()
    files = sample_data.sample_images(6, seed=11)
    world.files_on_disk(files, disk_id, disk)
    bucket = world.new_bucket()
    s3_id = world.create_s3_backend(bucket)
    other_id, other_disk = world.create_local_backend(label='Second copy')
    assert world.copy(disk_id, s3_id).count('copied') == 6
    assert world.copy(disk_id, other_id).count('copied') == 6
    for f in files:
        assert world.s3_bytes(bucket, f.object_name) == f.data
    assert archive_files(other_disk) == expected(files)
    assert world.rows(s3_id) == world.rows(other_id) == {f.file_id: 0 for f in files}


def test_large_originals_stream_in_pieces_both_ways(world):
    """A 40 MB recording is larger than one read (8 MB) and one PUT (32 MB): it streams from S3
    in pieces and goes back up as a multipart upload, with the same bytes and checks."""
    data = os.urandom(40 * 1024 * 1024 + 123)
    assert len(data) > ms.S3Backend.SINGLE_PUT_LIMIT > ms.S3Backend.WHOLE_READ_LIMIT
    big = sample_data.SampleFile('audio', '4258-6870/2021-07-27/05/4258-6870_2021-07-27T05-00-00Z.wav', data,
                                 dt.datetime(2021, 7, 27, 5, tzinfo=dt.timezone.utc),
                                 '4258-6870', sample_rate=48000, channels=1, bit_depth=16, duration=440.0)
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    sample_data.upload(world.s3, bucket, [big], '')
    sample_data.add_to_catalog(world.conn, [big], source)
    disk_id, disk = world.create_local_backend()
    other_bucket = world.new_bucket()
    target = world.create_s3_backend(other_bucket)
    assert world.copy(source, disk_id, 'all_audio').count('copied') == 1
    assert world.copy(disk_id, target, 'all_audio').count('copied') == 1
    assert (disk / 'archive' / big.object_name).read_bytes() == data
    assert world.s3_bytes(other_bucket, big.object_name) == data
    assert world.rows(disk_id, 'audio') == world.rows(target, 'audio') == {big.file_id: 0}


def test_copy_only_the_batch_and_only_what_the_source_holds(world):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    images = world.images_on_s3(9, source)   # cameras of FS1 and FS2 in turn
    unrelated = sample_data.sample_images(2, seed=99)
    for f in unrelated:
        f.object_name = 'elsewhere/' + f.object_name
    sample_data.add_to_catalog(world.conn, unrelated, None)    # in the catalog, on no backend
    report = world.copy(source, target, 'fs2_images')
    assert report.exit_status == 0, report.failures
    fs2 = [f for f in images if f.node_label == '1874-8542']
    assert fs2 and archive_files(disk) == expected(fs2)


def test_dry_run_says_what_it_would_copy_and_writes_nothing(world):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(4, source)
    result = world.cli('copy', '-s', source, '-t', target, 'all_images', '--dry-run')
    assert result.returncode == 0, result.stderr
    for f in files:
        assert f.object_name in result.stdout
    assert 'would copy 4 files' in result.stdout
    assert archive_files(disk) == {} and world.rows(target) == {}


def test_limit_copies_that_many_and_a_rerun_does_the_rest(world):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(7, source)
    assert world.copy(source, target, limit=3).count('copied') == 3
    assert len(world.rows(target)) == 3 and len(archive_files(disk)) == 3
    assert world.copy(source, target).count('copied') == 4
    assert archive_files(disk) == expected(files)


# --- bad input: named failures, the rest done --------------------------------------------------

def test_checksum_mismatch_is_a_named_failure_with_no_row_and_no_file(world):
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    target, disk = world.create_local_backend()
    s3_target_bucket = world.new_bucket()
    s3_target = world.create_s3_backend(s3_target_bucket)
    files = world.images_on_s3(5, source)
    same_size = bytearray(files[1].data)
    same_size[len(same_size) // 2] ^= 0xFF
    world.s3.put_object(Bucket=bucket, Key=files[1].object_name, Body=bytes(same_size))
    world.s3.put_object(Bucket=bucket, Key=files[3].object_name, Body=files[3].data[:1000])   # truncated
    for target_id in (target, s3_target):
        result = world.cli('copy', '-s', source, '-t', target_id, 'all_images')
        assert result.returncode == 1
        assert f'FAILED {files[1].object_name}' in result.stderr and 'sha256' in result.stderr
        assert f'FAILED {files[3].object_name}' in result.stderr and '1,000 bytes' in result.stderr
        assert '3 copied' in result.stdout and '2 failed' in result.stdout
        good = {f.file_id for i, f in enumerate(files) if i not in (1, 3)}
        assert set(world.rows(target_id)) == good
    assert archive_files(disk) == {f.object_name: f.data for i, f in enumerate(files) if i not in (1, 3)}
    assert world.s3_bytes(s3_target_bucket, files[1].object_name) is None
    assert world.s3_bytes(s3_target_bucket, files[3].object_name) is None


def test_object_missing_at_the_source_is_a_named_failure(world):
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    target, disk = world.create_local_backend()
    files = world.images_on_s3(3, source)
    world.s3.delete_object(Bucket=bucket, Key=files[0].object_name)
    report = world.copy(source, target)
    assert report.exit_status == 1 and report.count('copied') == 2
    assert report.failures == [(files[0].object_name, f'object {files[0].object_name} is missing in '
                                f'backend {source} (s3 {world.backend(source).url_prefix})')]
    assert set(world.rows(target)) == {files[1].file_id, files[2].file_id}


@pytest.mark.parametrize('bad_name', ['../escaped.jpg', '../../escaped.jpg', '/tmp/absolute-escape.jpg',
                                      'a//b.jpg', 'a/./b.jpg', 'a/../../escaped.jpg', 'line\nbreak.jpg'])
def test_object_names_never_lead_outside_the_root(world, tmp_path, bad_name):
    source_id, source_disk = world.create_local_backend(label='source')
    target_id, target_disk = world.create_local_backend(label='target')
    good, bad = sample_data.sample_images(2, seed=5)
    bad.object_name = bad_name
    world.files_on_disk([good], source_id, source_disk)
    sample_data.add_to_catalog(world.conn, [bad], source_id)
    # Where a naive join of root and name would read from and write to:
    for base in (source_disk / 'archive', target_disk / 'archive'):
        escape = Path(os.path.normpath(str(base) + '/' + bad_name)) if not bad_name.startswith('/') else None
        if escape and not str(escape).startswith(str(base)):
            escape.parent.mkdir(parents=True, exist_ok=True)
            escape.write_bytes(bad.data)
    before = files_under(tmp_path)
    report = world.copy(source_id, target_id)
    assert report.exit_status == 1 and report.count('copied') == 1
    assert [name for name, reason in report.failures if reason.startswith('unsafe object name')] == [bad_name]
    after = files_under(tmp_path)
    changed = {p for p in after if before.get(p) != after[p]} | (set(before) - set(after))
    assert all(p.startswith(str(target_disk.relative_to(tmp_path)) + '/archive/') or p.startswith('logs/')
               or p.endswith(ms.LOCK_FILE) for p in changed), changed
    assert archive_files(target_disk) == {good.object_name: good.data}
    assert not Path('/tmp/absolute-escape.jpg').exists()
    assert set(world.rows(target_id)) == {good.file_id}


def test_a_symlink_inside_the_archive_is_never_written_through(world, tmp_path):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(3, source)
    outside = tmp_path / 'outside'
    outside.mkdir()
    node_dir = files[0].object_name.split('/')[0]
    (disk / 'archive' / node_dir).symlink_to(outside)
    report = world.copy(source, target)
    assert report.exit_status == 1
    assert [name for name, reason in report.failures if 'not a plain folder' in reason] == [files[0].object_name]
    assert list(outside.iterdir()) == []


# --- wrong disk, moved disk, busy disk ----------------------------------------------------------

@pytest.mark.parametrize('tamper', ['storage_id', 'created_at', 'missing_dot_file'])
def test_wrong_disk_at_the_recorded_path_is_refused_and_nothing_written(world, tamper):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    world.images_on_s3(3, source)
    dot = disk / ms.DOT_FILE
    text = dot.read_text()
    if tamper == 'storage_id':
        dot.write_text(text.replace(f'storage_id={target}', 'storage_id=4711'))
    elif tamper == 'created_at':
        dot.write_text('\n'.join('created_at=2020-01-01 00:00:00+00:00' if line.startswith('created_at=') else line
                                 for line in text.splitlines()))
    else:
        dot.unlink()
    before = files_under(disk)
    with pytest.raises(ms.ConfigError) as refused:
        world.copy(source, target)
    assert f'backend {target}' in str(refused.value)
    if tamper == 'storage_id':
        assert 'storage_id=4711' in str(refused.value) and 'wrong disk' in str(refused.value)
    elif tamper == 'created_at':
        assert 'created_at=2020-01-01' in str(refused.value) and 'wrong disk' in str(refused.value)
    assert files_under(disk) == before and world.rows(target) == {}


def test_disk_mounted_elsewhere_is_used_through_target_and_source_path(world):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(3, source)
    moved = disk.with_name(disk.name + '-mounted-elsewhere')
    disk.rename(moved)
    with pytest.raises(ms.ConfigError, match='not mounted.*--target-path'):
        world.copy(source, target)
    assert world.copy(source, target, target_path=str(moved)).count('copied') == 3
    assert archive_files(moved) == expected(files)
    # ... and as a source, a disk somewhere else: --source-path.
    other, other_disk = world.create_local_backend(label='copy of the copy')
    assert world.copy(target, other, source_path=str(moved)).count('copied') == 3
    assert archive_files(other_disk) == expected(files)
    # A different disk at the given path is still refused.
    with pytest.raises(ms.ConfigError, match='wrong disk'):
        world.copy(source, target, target_path=str(other_disk))


def test_a_disk_in_use_by_another_run_is_refused(world):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    world.images_on_s3(2, source)
    with open(disk / ms.LOCK_FILE, 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(ms.ConfigError, match='in use by another mitwelten-storage run'):
            world.copy(source, target)
    assert world.rows(target) == {}


def test_unknown_batch_backend_and_source_equal_target_exit_2(world):
    source = world.create_s3_backend()
    target, _ = world.create_local_backend()
    cases = [(('copy', '-s', source, '-t', target, 'no_such_batch'), "unknown batch 'no_such_batch'"),
             (('copy', '-s', source, '-t', 99, 'all_images'), 'no storage backend with id 99'),
             (('copy', '-s', source, '-t', source, 'all_images'), 'same backend'),
             (('copy', '-s', source, '-t', target, 'all_images', '--type', 7), 'no version type 7')]
    for args, message in cases:
        result = world.cli(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert 'Traceback' not in result.stderr


def test_s3_server_down_is_a_clear_error(world):
    target, disk = world.create_local_backend()
    world.query("INSERT INTO storage_backend (url_prefix, type, priority) VALUES ('http://127.0.0.1:1/gone', 's3', 0)")
    source = world.query("SELECT storage_id FROM storage_backend WHERE type = 's3'")[0][0]
    result = world.cli('copy', '-s', source, '-t', target, 'all_images')
    assert result.returncode == 2 and 'cannot reach the S3 server http://127.0.0.1:1' in result.stderr
    assert 'Traceback' not in result.stderr


# --- resuming after a crash ---------------------------------------------------------------------

def test_a_file_already_at_the_target_without_a_row_is_checked_and_recorded_not_copied(world):
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    target, disk = world.create_local_backend()
    files = world.images_on_s3(3, source)
    placed = disk / 'archive' / files[0].object_name
    placed.parent.mkdir(parents=True)
    placed.write_bytes(files[0].data)
    os.utime(placed, ns=(1_000_000_000, 1_000_000_000))
    wrong = disk / 'archive' / files[1].object_name
    wrong.parent.mkdir(parents=True, exist_ok=True)
    wrong.write_bytes(b'x' * len(files[1].data))      # right size, wrong bytes: copied over
    leftover = placed.with_name(f'.{placed.name}.0123456789ab{ms.TMP_SUFFIX}')
    leftover.write_bytes(files[0].data[:100])
    report = world.copy(source, target)
    assert report.counts == {'found': 1, 'copied': 2}
    assert placed.stat().st_mtime_ns == 1_000_000_000      # recorded, not rewritten
    assert archive_files(disk) == expected(files)           # leftover temporary file removed too
    assert world.rows(target) == {f.file_id: 0 for f in files}


@pytest.mark.parametrize('crash_at', ['before-rename:4', 'after-write:4', 'after-commit:1'])
def test_crash_at_each_step_then_rerun_ends_with_disk_and_catalog_agreeing(world, crash_at):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(40, source)
    first = world.cli('copy', '-s', source, '-t', target, 'all_images', '--jobs', 3,
                      env={'MITWELTEN_CRASH_AT': crash_at})
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert_disk_agrees_with_catalog(world, target, disk, files)
    if crash_at.startswith('after-commit'):
        assert world.rows(target), 'killed right after a commit: the rows it committed stand'
    else:
        in_place = [name for name in archive_files(disk) if not name.endswith(ms.TMP_SUFFIX)]
        assert len(in_place) < len(files), 'killed before the end: not every file is in place yet'
    second = world.cli('copy', '-s', source, '-t', target, 'all_images', '--jobs', 3)
    assert second.returncode == 0, second.stderr
    assert archive_files(disk) == expected(files)
    assert world.rows(target) == {f.file_id: 0 for f in files}
    assert temp_files(disk) == []


def count_final_files(disk: Path) -> int:
    return sum(1 for p in (disk / 'archive').rglob('*.jpg') if p.is_file())


def copy_under_way(world, jobs: int, files_first: int):
    """A copy of 300 small images from S3 to a disk, running, with `files_first` already there."""
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(300, source, width=160, height=120)
    process = world.popen('copy', '-s', source, '-t', target, 'all_images', '--jobs', jobs)
    wait_for(lambda: count_final_files(disk) >= files_first or process.poll() is not None, 'files on the disk')
    assert process.poll() is None, 'the copy finished before it could be stopped'
    return source, target, disk, files, process


def test_kill_9_in_the_middle_of_a_copy_then_rerun_loses_nothing(world):
    source, target, disk, files, process = copy_under_way(world, jobs=2, files_first=30)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert 0 < count_final_files(disk) < len(files)
    assert_disk_agrees_with_catalog(world, target, disk, files)
    rerun = world.cli('copy', '-s', source, '-t', target, 'all_images', '--jobs', 2)
    assert rerun.returncode == 0, rerun.stderr
    assert archive_files(disk) == expected(files)
    assert world.rows(target) == {f.file_id: 0 for f in files}


def test_ctrl_c_finishes_and_records_the_files_in_flight_and_exits_130(world):
    source, target, disk, files, process = copy_under_way(world, jobs=4, files_first=20)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert 'interrupted' in stdout and 'Traceback' not in stderr
    on_disk = archive_files(disk)
    assert 0 < len(on_disk) < len(files)
    # Everything finished is recorded, and everything recorded is there.
    by_name = {f.object_name: f for f in files}
    assert set(world.rows(target)) == {by_name[name].file_id for name in on_disk}
    assert all(by_name[name].data == data for name, data in on_disk.items())
    rerun = world.cli('copy', '-s', source, '-t', target, 'all_images')
    assert rerun.returncode == 0
    assert archive_files(disk) == expected(files)


def test_cleaning_up_leftovers_never_touches_a_write_in_flight(world):
    """Two files in one folder: while one is being written, clearing leftovers for the other must
    leave its temporary file alone (a run's threads share folders)."""
    import threading
    storage_id, disk = world.create_local_backend()
    backend = ms.LocalBackend(world.backend(storage_id))
    backend.check(writing=True)
    half_written, go_on = threading.Event(), threading.Event()

    def slow_chunks():
        yield b'a' * 1000
        half_written.set()
        go_on.wait(30)
        yield b'b' * 1000

    writer = threading.Thread(target=backend.write, args=('node/first.jpg', slow_chunks(), 2000, 'image/jpeg'))
    writer.start()
    assert half_written.wait(30)
    leftover = disk / 'archive' / 'node' / f'.old.jpg.deadbeef00-12345678{ms.TMP_SUFFIX}'
    leftover.write_bytes(b'left by a killed run')
    # Another thread's first look at the folder (a fresh view of the disk: nothing cleaned yet).
    ms.LocalBackend(world.backend(storage_id)).tidy('node/second.jpg')
    go_on.set()
    writer.join(30)
    assert (disk / 'archive' / 'node' / 'first.jpg').read_bytes() == b'a' * 1000 + b'b' * 1000
    assert not leftover.exists()
