"""Faults injected into real runs of the command line: an S3 server killed and frozen, the
catalog's PostgreSQL stopped, a disk full, read-only, pulled out, and failing its fsync. Each
run must end with its summary and log path, record no file that is not whole on the disk
(rule 1), leave no temporary file once run again, and the run again must complete with disk
and catalog in agreement (rule 5)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import types
from pathlib import Path

import psycopg2
import pytest

import mitwelten_storage as ms
from conftest import files_under, new_world, wait_for
from devkit import sample_data
from devkit.services import ThrowawayPostgres, ThrowawayS3

# Short network timeouts, as a test can afford: a frozen server is given up on in seconds.
QUICK = {'MITWELTEN_CONNECT_TIMEOUT': '1', 'MITWELTEN_READ_TIMEOUT': '2', 'MITWELTEN_ATTEMPTS': '2'}


def archive_files(disk: Path) -> dict[str, bytes]:
    return {name: data for name, data in files_under(disk / 'archive').items()}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob('*') if p.name.endswith(ms.TMP_SUFFIX)]


def final_files(disk: Path) -> int:
    return sum(1 for p in (disk / 'archive').rglob('*.jpg') if p.is_file())


def assert_recorded_files_are_whole(world, storage_id: int, disk: Path, files) -> None:
    """Rule 1: every row names a file that is on the disk with the original's bytes; and no
    partial file stands under a final name (rule 2)."""
    by_id = {f.file_id: f for f in files}
    by_name = {f.object_name: f.data for f in files}
    on_disk = archive_files(disk)
    for file_id in world.rows(storage_id):
        assert on_disk.get(by_id[file_id].object_name) == by_id[file_id].data, by_id[file_id].object_name
    for name, data in on_disk.items():
        assert name.rsplit('/', 1)[-1].endswith(ms.TMP_SUFFIX) or data == by_name[name], name


def assert_summary(stdout: str, *phrases: str) -> None:
    """The run ended with its summary: the title, the counts (or nothing to do), the phrases,
    and the log's path."""
    assert re.search(r'^(copy|archive) .+\n  (\d+ \w+|nothing to do)', stdout, re.M), stdout
    for phrase in phrases:
        assert phrase in stdout, (phrase, stdout)
    log_path = Path(re.search(r'^  log: (.+)$', stdout, re.M).group(1))
    assert log_path.exists()


def rerun_completes(world, source: int, target: int, disk: Path, files, *args, env=None) -> str:
    rerun = world.cli('copy', '-s', source, '-t', target, 'all_images', *args, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert archive_files(disk) == {f.object_name: f.data for f in files}
    assert world.rows(target) == {f.file_id: 0 for f in files}
    assert temp_files(disk) == []
    return rerun.stdout


def copy_started(world, source: int, target: int, disk: Path, env: dict, first: int = 20, jobs: int = 2):
    process = world.popen('copy', '-s', source, '-t', target, 'all_images', '--jobs', jobs, env=env)
    wait_for(lambda: final_files(disk) >= first or process.poll() is not None, 'files on the disk')
    assert process.poll() is None, 'the copy finished before the fault could strike'
    return process


# --- the S3 server ------------------------------------------------------------------------------

@pytest.fixture
def own_s3(services, tmp_path):
    """An S3 server of this test's own, to kill or freeze."""
    server = ThrowawayS3(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def s3_world(services, own_s3, tmp_path):
    with new_world(types.SimpleNamespace(pg_dsn=services.pg_dsn, s3_endpoint=own_s3.endpoint), tmp_path) as w:
        yield w


def test_s3_server_killed_mid_copy_stops_the_run_and_a_rerun_completes(s3_world, own_s3):
    world = s3_world
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    target, disk = world.create_local_backend()
    files = world.images_on_s3(400, source, width=160, height=120)
    process = copy_started(world, source, target, disk, QUICK)
    own_s3.signal(signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stdout + stderr
    assert_summary(stdout, 'stopped early: cannot reach the S3 server', 'transfers in a row', 'failed')
    assert 'Traceback' not in stderr
    assert_recorded_files_are_whole(world, target, disk, files)
    # The server comes back, with its data.
    own_s3.start(port=own_s3.port)
    world.s3.create_bucket(Bucket=bucket)
    sample_data.upload(world.s3, bucket, files)
    rerun_completes(world, source, target, disk, files)


def test_a_frozen_s3_server_is_given_up_on_and_the_run_says_it_was_waiting(s3_world, own_s3):
    """SIGSTOP: the server accepts connections and never answers. With the test's short
    timeouts the run sees the stall, says it is waiting, gives up after its attempts, cancels
    the files not yet started, and ends with its summary."""
    world = s3_world
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(400, source, width=160, height=120)
    process = copy_started(world, source, target, disk, QUICK)
    own_s3.signal(signal.SIGSTOP)
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        own_s3.signal(signal.SIGCONT)
    assert process.returncode == 1, stdout + stderr
    assert 'note: waiting: no data for' in stderr
    assert_summary(stdout, 'stopped early: the S3 server did not answer in time')
    copied = int(re.search(r'(\d+) copied', stdout).group(1))
    failed = int(re.search(r'(\d+) failed:', stdout).group(1))
    assert copied + failed < len(files) and failed <= 4       # the rest was cancelled, not tried
    assert_recorded_files_are_whole(world, target, disk, files)
    rerun_completes(world, source, target, disk, files)


# --- the catalog's server ---------------------------------------------------------------------------

@pytest.fixture
def own_postgres(services, tmp_path):
    """A PostgreSQL server of this test's own, to stop and start again."""
    server = ThrowawayPostgres(tmp_path / 'own-postgres', durable=True).start()
    yield server
    server.stop()


@pytest.fixture
def pg_world(services, own_postgres, tmp_path):
    with new_world(types.SimpleNamespace(pg_dsn=own_postgres.dsn(), s3_endpoint=services.s3_endpoint),
                   tmp_path) as w:
        yield w


def rows_committed(world, storage_id: int) -> int:
    try:
        return len(world.rows(storage_id))
    except psycopg2.Error:
        world.conn.rollback()
        return 0


def test_catalog_gone_mid_copy_ends_with_the_summary_and_the_rerun_adopts_the_written_files(pg_world,
                                                                                             own_postgres):
    world = pg_world
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(1500, source, width=64, height=48)
    process = world.popen('copy', '-s', source, '-t', target, 'all_images', '--jobs', 1)
    wait_for(lambda: rows_committed(world, target) > 0 or process.poll() is not None, 'a first commit')
    assert process.poll() is None, 'the copy finished before the catalog could go away'
    own_postgres.stop()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stdout + stderr
    assert_summary(stdout, 'stopped early: the catalog went away (', 'files were recorded;',
                   'Run the same command again once the database is back')
    assert 'Traceback' not in stderr and 'OperationalError' not in stdout + stderr
    recorded = int(re.search(r'after (\d+) files were recorded', stdout).group(1))
    unrecorded = int(re.search(r'(\d+) written files are not recorded: the next run checks them and records them',
                               stdout).group(1))
    own_postgres.launch(own_postgres.port)
    world.conn = ms.connect_catalog(world.settings)
    assert len(world.rows(target)) == recorded
    assert final_files(disk) == recorded + unrecorded
    assert_recorded_files_are_whole(world, target, disk, files)
    rerun = rerun_completes(world, source, target, disk, files)
    assert f'{unrecorded} found' in rerun


def test_catalog_gone_mid_archive_never_releases_an_unrecorded_original(pg_world, own_postgres):
    world = pg_world
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend()
    files = world.images_on_s3(600, active, width=64, height=48)
    args = ('archive', '-s', active, '-t', archive, 'all_images', '--delete-original', '--jobs', 2)
    process = world.popen(*args)
    wait_for(lambda: rows_committed(world, archive) > 20 or process.poll() is not None, 'archive rows')
    assert process.poll() is None, 'the archive run finished before the catalog could go away'
    own_postgres.stop()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stdout + stderr
    assert_summary(stdout, 'stopped early: the catalog went away (')
    own_postgres.launch(own_postgres.port)
    world.conn = ms.connect_catalog(world.settings)
    archived = world.rows(archive)
    at_active = world.rows(active)
    on_disk = archive_files(disk)
    keys = {obj['Key'] for page in world.s3.get_paginator('list_objects_v2').paginate(Bucket=bucket)
            for obj in page.get('Contents', [])}
    for f in files:     # every original is recorded where it is whole
        safe_on_disk = archived.get(f.file_id) == 0 and on_disk.get(f.object_name) == f.data
        assert safe_on_disk or (at_active.get(f.file_id) == 0 and f.object_name in keys), f.object_name
    rerun = world.cli(*args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert world.rows(archive) == {f.file_id: 0 for f in files} and world.rows(active) == {}
    assert archive_files(disk) == {f.object_name: f.data for f in files} and temp_files(disk) == []


# --- disks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('command, fault', [('copy', 'fsync:2'), ('archive', 'fsync:12'), ('copy', 'rename:5')])
def test_a_disk_whose_fsync_fails_records_nothing_written_since_its_last_good_sync(world, command, fault):
    """MITWELTEN_FAULT_AT=fsync:N: from the N-th sync of the disk on (a folder's fsync, or the
    syncfs of a group of files a copy writes), it fails with EIO, as on a dying disk. What was
    synced before is recorded; nothing written after is."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend()
    files = world.images_on_s3(200 if command == 'copy' else 60, active, width=64, height=48)
    if command == 'copy':
        # A copy syncs its files in groups (one syncfs each) and their folders before each
        # commit: the disk starts failing at its second sync, after a first run recorded 40.
        # A rename that fails in the middle of a synced group leaves the rest of it under
        # temporary names: nothing of the run may be recorded after that either.
        args = ('copy', '-s', active, '-t', archive, 'all_images', '--jobs', 2)
        assert world.cli(*args, '--limit', 40).returncode == 0
    else:
        args = ('archive', '-s', active, '-t', archive, 'all_images', '--delete-original', '--jobs', 2)
    before = world.rows(archive)
    first = world.cli(*args, env={'MITWELTEN_FAULT_AT': fault})
    assert first.returncode == 1, first.stdout + first.stderr
    assert_summary(first.stdout, 'Input/output error', f'(`verify {archive}`), then run the same command again')
    recorded = world.rows(archive)
    assert 0 < len(recorded) < len(files)
    if command == 'copy':
        assert recorded == before
    assert_recorded_files_are_whole(world, archive, disk, files)
    if command == 'archive':
        assert set(world.rows(active)) | set(recorded) == {f.file_id for f in files}   # no original lost
    rerun = world.cli(*args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert world.rows(archive) == {f.file_id: 0 for f in files}
    if command == 'archive':
        assert world.rows(active) == {}
    assert archive_files(disk) == {f.object_name: f.data for f in files} and temp_files(disk) == []


def needs_root(what: str):
    if os.geteuid() != 0 or shutil.which('mount') is None:
        pytest.skip(f'{what} needs root (CI runs as root)')


@pytest.fixture
def small_tmpfs(tmp_path):
    path = tmp_path / 'small-disk'
    path.mkdir()
    needs_root('mounting a file system')
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=20m', 'tmpfs', str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip('cannot mount a tmpfs here')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], capture_output=True)


class Ext4Disk:
    """An ext4 file system in an image file on a loop device: a disk that can be cut off
    (EXT4_IOC_SHUTDOWN without flushing its journal, as an unplugged USB disk loses what was not
    synced), pulled out (a lazy unmount) and plugged in again."""

    SHUTDOWN = 0x8004587D          # EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32)
    NOLOGFLUSH = 2                 # EXT4_GOING_FLAGS_NOLOGFLUSH

    def __init__(self, tmp_path: Path):
        self.image = tmp_path / 'disk.img'
        self.mount_point = tmp_path / 'usb-disk'
        self.mount_point.mkdir()
        with open(self.image, 'wb') as image:
            image.truncate(96 * 1024 * 1024)
        subprocess.run(['mkfs.ext4', '-q', '-F', str(self.image)], check=True, capture_output=True)
        self.plug_in()

    def plug_in(self) -> None:
        subprocess.run(['mount', '-o', 'loop', str(self.image), str(self.mount_point)], check=True,
                       capture_output=True)

    def cut_off(self) -> None:
        fd = os.open(self.mount_point, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, self.SHUTDOWN, struct.pack('I', self.NOLOGFLUSH))
        finally:
            os.close(fd)

    def pull_out(self) -> None:
        subprocess.run(['umount', '-l', str(self.mount_point)], check=True, capture_output=True)

    def unmount(self) -> None:
        subprocess.run(['umount', str(self.mount_point)], capture_output=True)


@pytest.fixture
def ext4_disk(tmp_path):
    needs_root('a loop-mounted ext4 disk')
    if shutil.which('mkfs.ext4') is None:
        pytest.skip('mkfs.ext4 is not installed')
    try:
        disk = Ext4Disk(tmp_path)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f'cannot mount a loop device here: {exc.stderr.decode(errors="replace").strip()}')
    yield disk
    subprocess.run(['umount', '-l', str(disk.mount_point)], capture_output=True)


def test_a_full_disk_stops_the_run_with_its_summary_and_no_partial_file(world, small_tmpfs):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend(small_tmpfs)
    subprocess.run(['mount', '-o', 'remount,size=1m', str(small_tmpfs)], check=True)
    files = world.images_on_s3(40, source, width=640, height=480)    # about 3 MB in all
    result = world.cli('copy', '-s', source, '-t', target, 'all_images', '--jobs', 2)
    assert result.returncode == 1
    assert_summary(result.stdout, f'stopped early: backend {target} (local {small_tmpfs}) is full')
    assert 'Traceback' not in result.stderr
    assert temp_files(disk) == []
    assert_recorded_files_are_whole(world, target, disk, files)
    assert 0 < len(world.rows(target)) < len(files)
    subprocess.run(['mount', '-o', 'remount,size=20m', str(small_tmpfs)], check=True)
    rerun_completes(world, source, target, disk, files)


def test_a_disk_mounted_read_only_is_refused_before_anything_is_done(world, small_tmpfs):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend(small_tmpfs)
    files = world.images_on_s3(5, source)
    subprocess.run(['mount', '-o', 'remount,ro', str(small_tmpfs)], check=True)
    result = world.cli('copy', '-s', source, '-t', target, 'all_images')
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert f'{small_tmpfs}/archive is not writable (backend {target}' in result.stderr
    subprocess.run(['mount', '-o', 'remount,rw', str(small_tmpfs)], check=True)
    rerun_completes(world, source, target, disk, files)


def test_a_disk_pulled_out_mid_copy_stops_the_run_and_plugged_in_again_the_rerun_completes(world, ext4_disk):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend(ext4_disk.mount_point)
    files = world.images_on_s3(400, source, width=160, height=120)
    process = copy_started(world, source, target, disk, {})
    ext4_disk.pull_out()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stdout + stderr
    assert_summary(stdout, f'stopped early: backend {target} (local {disk}) disappeared',
                   'is the disk still attached?')
    assert 'Traceback' not in stderr
    ext4_disk.plug_in()
    assert_recorded_files_are_whole(world, target, disk, files)
    rerun_completes(world, source, target, disk, files)


@pytest.mark.parametrize('attempt', range(3))
def test_a_disk_cut_off_mid_copy_loses_no_recorded_file(world, ext4_disk, attempt):
    """The data-loss case of issue 11: an ext4 disk shut down without flushing its journal while
    a copy writes to it. After it is mounted again (its journal replayed), every file the
    catalog records is on it, whole; the rerun completes."""
    source = world.create_s3_backend()
    target, disk = world.create_local_backend(ext4_disk.mount_point)
    files = world.images_on_s3(400, source, width=160, height=120)
    process = copy_started(world, source, target, disk, {}, first=20 + 40 * attempt)
    ext4_disk.cut_off()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stdout + stderr
    assert_summary(stdout, 'stopped early:', 'Input/output error')
    assert 'Traceback' not in stderr
    ext4_disk.unmount()
    ext4_disk.plug_in()
    assert_recorded_files_are_whole(world, target, disk, files)
    rerun_completes(world, source, target, disk, files)


# --- signals -----------------------------------------------------------------------------------------

def copy_of_many(world):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(300, source, width=160, height=120)
    return source, target, disk, files


def test_sigterm_finishes_the_files_in_flight_and_records_them(world):
    source, target, disk, files = copy_of_many(world)
    process = copy_started(world, source, target, disk, {})
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert_summary(stdout, 'interrupted: the files in flight were finished and recorded')
    assert_recorded_files_are_whole(world, target, disk, files)
    assert set(world.rows(target)) == {f.file_id for f in files if (disk / 'archive' / f.object_name).exists()}
    rerun_completes(world, source, target, disk, files)


def test_a_second_sigterm_while_the_server_hangs_stops_at_once_with_the_summary(s3_world, own_s3):
    """The first signal waits for the files in flight; they hang on a frozen server; the second
    signal stops the run at once, and it still ends with its summary."""
    world = s3_world
    source, target, disk, files = copy_of_many(world)
    process = copy_started(world, source, target, disk, {})
    own_s3.signal(signal.SIGSTOP)
    try:
        process.send_signal(signal.SIGTERM)
        while 'interrupted: finishing the files in flight' not in process.stderr.readline():
            pass
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        own_s3.signal(signal.SIGCONT)
    assert process.returncode == 130, stdout + stderr
    assert_summary(stdout, 'stopped early: stopped at once by a second interrupt', 'interrupted: run the same')
    assert 'Traceback' not in stderr
    assert_recorded_files_are_whole(world, target, disk, files)
    rerun_completes(world, source, target, disk, files)
