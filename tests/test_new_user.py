"""What a new user hit (issue 16, part 3): disks inside one another, a disk copied whole, paths
stored with a trailing slash, a typo in a batch's SQL and the catalog gone while a selection
streams, the path option each command has, priorities, a frozen server's transfers in flight,
and the output of failures, rates and times."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest

import mitwelten_storage as ms
from conftest import ROOT, batches_py, files_under, wait_for
from test_faults import (QUICK, assert_recorded_files_are_whole, assert_summary, copy_started, own_postgres,  # noqa: F401
                         own_s3, pg_world, rerun_completes, s3_world, small_tmpfs)


def nothing_written(world, before_files: dict, before_rows: int) -> None:
    assert files_under(world.tmp_path) == before_files
    assert world.query('SELECT count(*) FROM storage_backend')[0][0] == before_rows


# --- create: a disk inside another, or holding one ----------------------------------------------

@pytest.mark.parametrize('where', ['archive', 'archive/x', 'x', 'parent', 'link to it', 'x, disk unplugged'])
def test_create_local_refuses_a_folder_inside_another_disk_or_holding_one(world, where):
    usb = world.tmp_path / 'usb'
    usb.mkdir()
    (usb / 'disk').mkdir()
    storage_id, disk = world.create_local_backend(usb / 'disk')
    if where == 'parent':
        path = usb
    elif where == 'link to it':
        path = world.tmp_path / 'link'
        path.symlink_to(disk)
    else:
        path = disk / where.split(',')[0]
        path.mkdir(exist_ok=True)
    if where.endswith('unplugged'):        # only the catalog knows where the disk belongs
        for name in (ms.DOT_FILE, 'README.md'):
            (disk / name).unlink()
        (disk / 'archive').rmdir()
    before = files_under(world.tmp_path), world.query('SELECT count(*) FROM storage_backend')[0][0]
    result = world.cli('create', '-t', 'local', '-p', '2', '-n', 'Second', path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr and str(path) in result.stderr
    assert f'backend {storage_id}' in result.stderr or ms.DOT_FILE in result.stderr, result.stderr
    if where in ('parent', 'x, disk unplugged'):
        assert f'backend {storage_id}' in result.stderr
    nothing_written(world, *before)


# --- a disk copied whole ----------------------------------------------------------------------------

def test_a_disk_copied_whole_is_refused_while_the_disk_is_online(world, tmp_path):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend(label='Archive 07')
    other_id, other_disk = world.create_local_backend(label='Archive 08')
    world.images_on_s3(4, source)
    assert world.copy(source, disk_id, limit=2).count('copied') == 2
    copy = tmp_path / 'rsync-copy'
    subprocess.run(['cp', '-a', f'{disk}/.', str(copy)], check=True)       # as rsync -a: the dot-file too
    assert (copy / ms.DOT_FILE).read_text() == (disk / ms.DOT_FILE).read_text()
    before = files_under(tmp_path), dict(world.rows(disk_id)), dict(world.rows(other_id))
    for args in (('copy', '-s', source, '-t', disk_id, 'all_images', '--target-path', copy),
                 ('archive', '-s', source, '-t', disk_id, 'all_images', '--delete-original', '--target-path', copy),
                 ('copy', '-s', disk_id, '-t', other_id, 'all_images', '--source-path', copy),
                 ('verify', disk_id, '--fix', '--path', copy),
                 ('report', disk_id, '--path', copy)):
        result = world.cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert f'two folders claim to be backend {disk_id}: {copy} and {disk}' in result.stderr
        assert 'Traceback' not in result.stderr
    assert files_under(tmp_path) == before[0]
    assert (world.rows(disk_id), world.rows(other_id)) == before[1:]
    # The disk itself, named through a link, is no copy of itself.
    link = tmp_path / 'link-to-the-disk'
    link.symlink_to(disk)
    assert world.copy(source, disk_id, target_path=str(link)).count('copied') == 2


def test_a_disk_and_its_copy_under_the_mount_roots_are_both_refused(world, tmp_path):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    world.images_on_s3(2, source)
    media = tmp_path / 'media'
    media.mkdir()
    shutil.copytree(disk, media / 'COPY')
    shutil.move(str(disk), media / 'DISK')
    result = world.cli('copy', '-s', source, '-t', disk_id, 'all_images', env={'MITWELTEN_MOUNT_ROOTS': str(media)})
    assert result.returncode == 2 and f'two folders claim to be backend {disk_id}:' in result.stderr, result.stderr
    assert world.rows(disk_id) == {} and not any((media / 'COPY' / 'archive').iterdir())


# --- a url_prefix stored with a trailing slash ----------------------------------------------------

def test_a_path_stored_with_a_trailing_slash_is_online_not_moved(world):
    """The earlier Mitwelten script stored the path as typed: '/media/archive07/'."""
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    world.images_on_s3(2, source)
    world.query('UPDATE storage_backend SET url_prefix = %s WHERE storage_id = %s', (f'{disk}/', disk_id))
    table = world.cli('info')
    line = next(line for line in table.stdout.splitlines() if line.startswith(f'{disk_id} '))
    assert ' online ' in line and 'moved' not in table.stdout and 'not at its recorded path' not in table.stdout
    entry = next(e for e in json.loads(world.cli('info', '--json').stdout) if e['storage_id'] == disk_id)
    assert entry['online'] is True and entry['moved'] is False
    assert world.copy(source, disk_id).count('copied') == 2
    disk.rename(disk.with_name('unplugged'))           # the disk away, its mount point empty
    disk.mkdir()
    for path in (disk, f'{disk}//', f'{disk}/../{disk.name}'):
        result = world.cli('create', '-t', 'local', '-p', '2', '-n', 'Again', path)
        assert result.returncode == 2 and f'already registered as storage backend {disk_id}' in result.stderr


# --- batches: a typo is a configuration error, an outage is not ------------------------------------

BATCHES = batches_py(
    "Batch('all_images', 'image', 'every image', 'SELECT file_id, object_name, file_size, sha256 FROM files_image')",
    "Batch('typo', 'image', 'a researcher typed SELET', 'SELET file_id, object_name, file_size, sha256 FROM files_image')",
    "Batch('slow', 'image', 'a selection that takes a while', "
    "'SELECT f.file_id, f.object_name, f.file_size, f.sha256 FROM files_image f '"
    "'CROSS JOIN LATERAL (SELECT pg_sleep(0.25)) AS pause')")


@pytest.fixture
def tool_with_batches(tmp_path):
    """The tool as a researcher has it, beside a batches.py of their own."""
    folder = tmp_path / 'workstation'
    folder.mkdir()
    shutil.copy(ROOT / 'mitwelten_storage.py', folder)
    (folder / 'batches.py').write_text(BATCHES)
    return folder / 'mitwelten_storage.py'


def run_tool(world, tool: Path, *args, **kwargs):
    """The tool run from the researcher's folder: its ./batches.py is the one read."""
    return subprocess.run([sys.executable, str(tool), *map(str, args)], capture_output=True, text=True,
                          env=world.env, timeout=300, cwd=tool.parent, **kwargs)


@pytest.mark.parametrize('command', ['copy', 'archive'])
def test_a_typo_in_a_batch_is_a_configuration_error_before_anything_is_done(world, tool_with_batches, command):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    world.images_on_s3(2, source)
    args = ('--replace-with', 1) if command == 'archive' else ()
    result = run_tool(world, tool_with_batches, command, '-s', source, '-t', disk_id, 'typo', *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"batch 'typo' ({tool_with_batches.parent / 'batches.py'}) cannot be selected" in result.stderr
    assert 'syntax error' in result.stderr
    assert 'stopped early' not in result.stdout and 'Traceback' not in result.stderr
    assert not world.log_dir.exists() or list(world.log_dir.iterdir()) == []      # no run was started
    assert world.rows(disk_id) == {} and list((disk / 'archive').iterdir()) == []


def test_the_catalog_gone_while_the_selection_streams_is_an_outage_not_the_batch(pg_world, own_postgres,
                                                                                tool_with_batches):
    world = pg_world
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    world.images_on_s3(40, source, width=64, height=48)      # 40 × 0.25 s of selection
    process = subprocess.Popen([sys.executable, str(tool_with_batches), 'copy', '-s', str(source), '-t', str(disk_id),
                                'slow'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=world.env,
                               cwd=tool_with_batches.parent)
    wait_for(lambda: (world.log_dir.exists() and any(world.log_dir.iterdir())) or process.poll() is not None,
             'the run to start')
    assert process.poll() is None, process.communicate()
    own_postgres.stop()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stdout + stderr
    assert_summary(stdout, 'stopped early: the catalog went away (', 'Run the same command again once the database '
                                                                     'is back')
    assert 'cannot be selected' not in stdout + stderr and 'Traceback' not in stderr


def test_a_connection_lost_without_a_sqlstate_is_an_outage_and_a_wrong_query_is_not():
    """libpq's own errors carry no SQLSTATE, and psycopg2 may raise a connection lost while
    rows stream as a plain DatabaseError: the catalog went away, the batch is not to blame."""
    batch = types.SimpleNamespace(id='all_images')
    lost = psycopg2.DatabaseError('server closed the connection unexpectedly')
    assert ms.catalog_outage(lost) and ms.selection_error(batch, lost) is lost
    assert ms.explain_fault(lost, ms.RunReport('copy'), ()).startswith(
        'the catalog went away (server closed the connection unexpectedly) after 0 files were recorded')
    wrong = psycopg2.errors.SyntaxError('syntax error at or near "SELET"')
    assert not ms.catalog_outage(wrong)
    assert "batch 'all_images' (" in str(ms.selection_error(batch, wrong))
    assert "batches.py) cannot be selected: syntax error" in str(ms.selection_error(batch, wrong))


# --- the option that names where a disk is ----------------------------------------------------------

def test_each_command_names_its_own_option_for_where_the_disk_is(world, tmp_path):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    other_id, other = world.create_local_backend()
    world.images_on_s3(2, source)
    disk.rename(tmp_path / 'unplugged')
    for args, option in ((('verify', disk_id), '--path'), (('report', disk_id), '--path'),
                         (('copy', '-s', disk_id, '-t', other_id, 'all_images'), '--source-path'),
                         (('copy', '-s', source, '-t', disk_id, 'all_images'), '--target-path'),
                         (('archive', '-s', disk_id, '-t', other_id, 'all_images', '--delete-original'),
                          '--source-path'),
                         (('archive', '-s', source, '-t', disk_id, 'all_images', '--delete-original'),
                          '--target-path')):
        result = world.cli(*args)
        assert result.returncode == 2 and 'is not mounted' in result.stderr, (args, result.stderr)
        named = set(re.findall(r'--(?:source-|target-)?path', result.stderr))
        assert named == {option}, (args, result.stderr)


# --- priorities ------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind, priority, message', [
    ('local', '-1', 'is negative'), ('s3', '-1', 'is negative'),
    ('local', '0', 'a local disk is an offline archive, priority 2'),
    ('local', '1', 'a local disk is an offline archive, priority 2'),
    ('s3', '2', 'an S3 bucket is an online tier, priority 0'),
])
def test_create_refuses_priorities_outside_the_tiers(world, kind, priority, message):
    location = world.new_disk() if kind == 'local' else world.s3_url(world.new_bucket())
    before = files_under(world.tmp_path), 0
    result = world.cli('create', '-t', kind, '-p', priority, '-n', 'x', location)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr
    nothing_written(world, *before)


def test_create_takes_the_tiers_of_the_spec(world):
    for kind, priority, location in (('s3', 0, world.s3_url(world.new_bucket())),
                                     ('s3', 1, world.s3_url(world.new_bucket())),
                                     ('local', 2, world.new_disk()), ('local', 3, world.new_disk())):
        result = world.cli('create', '-t', kind, '-p', priority, '-n', 'x', location)
        assert result.returncode == 0, result.stderr


# --- a frozen server: the transfers in flight are not waited for ---------------------------------------

def test_a_run_that_decided_to_stop_abandons_work_in_flight_that_moves_nothing(tmp_path):
    """The frame of every run: once it stops (a server judged not answering), work in flight
    that moves no data is abandoned, as a second Ctrl-C abandons it, and nothing of it is handled."""
    report = ms.RunReport('copy', 'test')
    frozen = threading.Event()
    handled = []

    def work(item):
        if item == 'frozen':
            frozen.wait(120)            # a transfer on a server that never answers
            return 'late'
        return item

    def done(item, future):
        try:
            handled.append((item, future.result()))
        except ms.Cancelled:            # fed before the stop, started after it: left for the next run
            return
        if item == 'decides':
            run.stop('the S3 server did not answer in time (3 transfers in a row)')

    with ms.Run(report, ms.RunOptions(jobs=2, log_dir=tmp_path), stall_after=1.0) as run:
        pipeline = ms.Pipeline(2, run)
        pipeline.drive(iter(['frozen', 'decides', 'never started']), work, done)
    try:
        assert not frozen.is_set()
        assert handled == [('decides', 'decides')]
        assert report.stopped.startswith('the S3 server did not answer in time (3 transfers in a row); 1 files in '
                                         'flight were abandoned')
        assert 'nothing of them is recorded' in report.stopped
        assert 'abandoned' in report.log_path.read_text()
    finally:
        frozen.set()


def test_a_frozen_server_with_many_jobs_ends_with_the_summary_and_records_nothing_unfinished(s3_world, own_s3):
    """Issue 16: READ_TIMEOUT=4, ATTEMPTS=2, --jobs 8. The run stops with its summary; a file
    whose transfer was abandoned has no row, and the run again completes. (Measured by hand: the
    run decided to stop 12.1 s after the freeze and ended at 14.2 s; before this, at 24.3 s.)"""
    world = s3_world
    source = world.create_s3_backend()
    target, disk = world.create_local_backend()
    files = world.images_on_s3(400, source, width=160, height=120)
    env = {**QUICK, 'MITWELTEN_READ_TIMEOUT': '4'}
    process = copy_started(world, source, target, disk, env, jobs=8)
    own_s3.signal(signal.SIGSTOP)
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        own_s3.signal(signal.SIGCONT)
    assert process.returncode == 1, stdout + stderr
    assert_summary(stdout, 'stopped early: the S3 server did not answer in time')
    assert 'Traceback' not in stderr
    log_text = Path(re.search(r'^  log: (.+)$', stdout, re.M).group(1)).read_text()
    copied = {line.split('\t')[4] for line in log_text.splitlines() if '\tcopied\t' in line}
    assert {f.object_name for f in files if f.file_id in world.rows(target)} == copied
    assert_recorded_files_are_whole(world, target, disk, files)
    rerun_completes(world, source, target, disk, files)


# --- output -----------------------------------------------------------------------------------------

def test_a_full_disk_says_no_space_once_with_the_count_and_the_log_names_every_file(world, small_tmpfs):
    source = world.create_s3_backend()
    target, disk = world.create_local_backend(small_tmpfs)
    subprocess.run(['mount', '-o', 'remount,size=1m', str(small_tmpfs)], check=True)
    world.images_on_s3(40, source, width=640, height=480)
    result = world.cli('copy', '-s', source, '-t', target, 'all_images', '--jobs', 8)
    assert result.returncode == 1
    failed = int(re.search(r'(\d+) failed:', result.stdout).group(1))
    assert failed > 1
    assert result.stderr.count('No space left on device') == 1, result.stderr
    assert re.search(rf'^    {failed} files \(\S+ and {failed - 1} more, named in the log\): No space left on device$',
                     result.stdout, re.M), result.stdout
    log_path = Path(re.search(r'^  log: (.+)$', result.stdout, re.M).group(1))
    named = [line for line in log_path.read_text().splitlines() if '\tfailed\t' in line]
    assert len(named) == failed and all(line.endswith('No space left on device') for line in named)


def test_an_unreachable_s3_server_is_said_once(world):
    result = world.cli('create', '-t', 's3', '-p', '0', '-n', 'x', 'http://127.0.0.1:1/bucket')
    assert result.returncode == 2
    assert result.stderr.count('cannot reach the S3 server') == 1, result.stderr
    assert 'cannot reach the S3 server http://127.0.0.1:1 (new backend http://127.0.0.1:1/bucket): Connection ' \
           'refused' in result.stderr


def test_no_rate_when_nothing_moved(world):
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    target, disk = world.create_local_backend()
    files = world.images_on_s3(3, source)
    for f in files:
        world.s3.delete_object(Bucket=bucket, Key=f.object_name)
    result = world.cli('copy', '-s', source, '-t', target, 'all_images')
    assert result.returncode == 1
    assert re.search(r'^  3 failed; 0 B in \d+\.\d s$', result.stdout, re.M), result.stdout
    assert '/s)' not in result.stdout
    world.s3.put_object(Bucket=bucket, Key=files[0].object_name, Body=files[0].data)
    moved = world.cli('copy', '-s', source, '-t', target, 'all_images')
    assert re.search(r'^  1 copied, 2 failed; [\d.]+ [KM]?B in \d+\.\d s \([\d.]+ [KM]?B/s\)$', moved.stdout,
                     re.M), moved.stdout


def test_info_shows_when_a_backend_was_created_in_utc(world):
    storage_id = world.create_s3_backend()
    created = world.backend(storage_id).created_at.astimezone(dt.timezone.utc)
    table = world.cli('info', env={'PGTZ': 'America/New_York'})     # whatever zone the session has
    line = table.stdout.splitlines()[1]
    assert created.strftime('%Y-%m-%d %H:%M:%S UTC') in line, table.stdout


# --- verify --fix: where to copy back from --------------------------------------------------------

def test_verify_fix_names_the_backends_to_copy_back_from(world):
    source = world.create_s3_backend()
    second = world.create_s3_backend(priority=1)
    disk_id, disk = world.create_local_backend()
    files = world.images_on_s3(4, source)
    assert world.copy(source, disk_id).count('copied') == 4
    assert world.copy(source, second, limit=1).count('copied') == 1       # files[0] on a second bucket too
    world.recordings_on_s3(1, source)
    (disk / 'archive' / files[0].object_name).unlink()
    (disk / 'archive' / files[1].object_name).write_bytes(b'damaged')
    result = world.cli('verify', disk_id, '--fix')
    assert result.returncode == 1
    assert 'removed the catalog rows of 2 missing or corrupt files' in result.stdout
    assert (f'2 of them (image) recorded as originals on backend {source} (s3 {world.backend(source).url_prefix}): '
            f'`copy -s {source} -t {disk_id} all_images` puts them back') in result.stdout, result.stdout
    assert (f'1 of them (image) recorded as originals on backend {second} ' in result.stdout
            and f'`copy -s {second} -t {disk_id} all_images`' in result.stdout)
    assert result.stdout.index(f'copy -s {source} ') < result.stdout.index(f'copy -s {second} ')   # online first
    restored = world.cli('copy', '-s', source, '-t', disk_id, 'all_images')
    assert restored.returncode == 0 and world.verify(disk_id).exit_status == 0
