"""archive: originals onto an archive disk, versions in their place online; never an original lost."""

from __future__ import annotations

import io
import signal
import time

import pytest
from PIL import Image

import mitwelten_storage as ms
from conftest import files_under
from devkit import sample_data


def bucket_keys(world, bucket: str) -> set[str]:
    pages = world.s3.get_paginator('list_objects_v2').paginate(Bucket=bucket)
    return {obj['Key'] for page in pages for obj in page.get('Contents', [])}


def setup(world, count=6, group='image', **kwargs):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend(label='Archive 01')
    if group == 'image':
        files = world.images_on_s3(count, active, **kwargs)
    else:
        files = world.recordings_on_s3(count, active, **kwargs)
    return bucket, active, archive, disk, files


def assert_archived_and_replaced(world, bucket, active, archive, disk, files, version_type, group='image'):
    """The end state: every original on the disk with its bytes and recorded there; the version
    in its place at ACTIVE, recorded as such; no original left at ACTIVE."""
    version = ms.VERSIONS[(group, version_type)]
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    assert world.rows(archive, group) == {f.file_id: 0 for f in files}
    assert world.rows(active, group) == {f.file_id: version_type for f in files}
    assert bucket_keys(world, bucket) == {version.object_name(f.object_name) for f in files}
    for f in files:
        version.check(world.s3_bytes(bucket, version.object_name(f.object_name)),
                      ms.CatalogFile(f.file_id, f.object_name, len(f.data), f.sha256))


def test_archive_replace_with_webp(world):
    bucket, active, archive, disk, files = setup(world, 6, width=2400, height=1800)
    report = world.archive(active, archive, replace_with=1)
    assert report.exit_status == 0 and report.counts == {'replaced': 6}, report.failures
    assert_archived_and_replaced(world, bucket, active, archive, disk, files, 1)
    for f in files:
        obj = world.s3.get_object(Bucket=bucket, Key=f.object_name.replace('.jpg', '.webp'))
        assert obj['ContentType'] == 'image/webp'
        assert Image.open(io.BytesIO(obj['Body'].read())).size == (1920, 1440)
    again = world.archive(active, archive, replace_with=1)
    assert again.exit_status == 0 and again.counts == {}


@pytest.mark.parametrize('group, version_type', [('audio', 1), ('audio', 10), ('image', 2), ('image', 10)])
def test_archive_replace_with_each_version(world, group, version_type):
    kwargs = {'channels': 2, 'bit_depth': 24} if group == 'audio' else {}
    bucket, active, archive, disk, files = setup(world, 3, group, **kwargs)
    batch = 'all_audio' if group == 'audio' else 'all_images'
    report = world.archive(active, archive, batch, replace_with=version_type)
    assert report.exit_status == 0 and report.counts == {'replaced': 3}, report.failures
    assert_archived_and_replaced(world, bucket, active, archive, disk, files, version_type, group)


def test_archive_delete_original(world):
    bucket, active, archive, disk, files = setup(world, 4)
    result = world.cli('archive', '-s', active, '-t', archive, 'all_images', '--delete-original')
    assert result.returncode == 0, result.stderr
    assert '4 deleted' in result.stdout
    assert bucket_keys(world, bucket) == set()
    assert world.rows(active) == {}
    assert world.rows(archive) == {f.file_id: 0 for f in files}
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}


def test_archive_to_s3_from_a_disk_works_the_other_way_round_too(world):
    """ACTIVE and ARCHIVE can be any backends: here a disk's originals go to a bucket and the
    disk keeps gzip versions."""
    disk_id, disk = world.create_local_backend()
    files = sample_data.sample_images(3, seed=31)
    world.files_on_disk(files, disk_id, disk)
    bucket = world.new_bucket()
    s3_id = world.create_s3_backend(bucket, priority=1)
    report = world.archive(disk_id, s3_id, replace_with=10)
    assert report.exit_status == 0 and report.counts == {'replaced': 3}, report.failures
    assert files_under(disk / 'archive') == {f.object_name + '.gz': ms.make_gzip(f.data, ms.CatalogFile(
        0, f.object_name, len(f.data), f.sha256)) for f in files}
    assert {k: world.s3_bytes(bucket, k) for k in bucket_keys(world, bucket)} == {f.object_name: f.data for f in files}


def test_min_copies_keeps_the_original_until_enough_copies_are_recorded(world):
    bucket, active, archive, disk, files = setup(world, 3)
    report = world.archive(active, archive, replace_with=1, min_copies=2)
    assert report.exit_status == 0 and report.counts == {'kept': 3}
    assert report.notes == ['3 originals kept at ACTIVE: fewer than --min-copies 2 sound originals are recorded '
                            'on other backends']
    # Archived and recorded, but nothing at ACTIVE changed.
    assert world.rows(archive) == {f.file_id: 0 for f in files}
    assert world.rows(active) == {f.file_id: 0 for f in files}
    assert bucket_keys(world, bucket) == {f.object_name for f in files}
    # A second checked copy elsewhere, and the same command goes through.
    second, second_disk = world.create_local_backend(label='Archive 02')
    assert world.copy(active, second).count('copied') == 3
    assert world.archive(active, archive, replace_with=1, min_copies=2).counts == {'replaced': 3}
    assert_archived_and_replaced(world, bucket, active, archive, disk, files, 1)


def test_an_original_archived_and_recorded_already_is_not_written_again(world):
    bucket, active, archive, disk, files = setup(world, 3)
    assert world.copy(active, archive).count('copied') == 3
    stamps = {p: p.stat().st_mtime_ns for p in (disk / 'archive').rglob('*.jpg')}
    report = world.archive(active, archive, replace_with=2)
    assert report.exit_status == 0 and report.counts == {'replaced': 3}, report.failures
    assert {p: p.stat().st_mtime_ns for p in (disk / 'archive').rglob('*.jpg')} == stamps
    assert_archived_and_replaced(world, bucket, active, archive, disk, files, 2)


def test_an_original_whose_version_cannot_be_made_is_archived_and_kept_online(world):
    """Rule 7: a truncated JPEG is research data as the camera wrote it, and its sha256 is the
    catalog's: it is archived and recorded, stays on ACTIVE (no version replaces it), and the
    summary names it; the run exits 1."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend()
    good = sample_data.sample_images(3, seed=41)
    broken = sample_data.sample_images(1, seed=42, start=3)[0]
    broken.data = broken.data[:len(broken.data) // 2]     # truncated, and catalogued that way
    sample_data.upload(world.s3, bucket, good + [broken])
    sample_data.add_to_catalog(world.conn, good + [broken], active)
    args = ('archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 1)
    result = world.cli(*args)
    assert result.returncode == 1
    failed = f'{broken.object_name}: archived, version failed: cannot make a WebP of it: image file is truncated'
    assert f'FAILED {failed}' in result.stderr and f'    {failed}' in result.stdout
    assert '3 replaced' in result.stdout
    assert world.rows(archive) == {f.file_id: 0 for f in good + [broken]}
    assert (disk / 'archive' / broken.object_name).read_bytes() == broken.data
    assert world.rows(active)[broken.file_id] == 0
    assert world.s3_bytes(bucket, broken.object_name) == broken.data
    assert {f.file_id for f in good} == {i for i, t in world.rows(active).items() if t == 1}
    # Run again: the file is named again, nothing is written twice, nothing changes.
    stamp = (disk / 'archive' / broken.object_name).stat().st_mtime_ns
    again = world.cli(*args)
    assert again.returncode == 1 and f'FAILED {failed}' in again.stderr
    assert (disk / 'archive' / broken.object_name).stat().st_mtime_ns == stamp
    assert world.rows(active)[broken.file_id] == 0 and world.rows(archive)[broken.file_id] == 0


def test_a_corrupted_original_is_neither_archived_nor_replaced(world):
    bucket, active, archive, disk, files = setup(world, 3)
    world.s3.put_object(Bucket=bucket, Key=files[1].object_name, Body=files[1].data[:-10] + b'0123456789')
    report = world.archive(active, archive, delete_originals=True)
    assert report.exit_status == 1 and report.counts == {'deleted': 2, 'failed': 1}
    assert [(name, reason[:7]) for name, reason in report.failures] == [(files[1].object_name, 'sha256 ')]
    assert world.rows(active) == {files[1].file_id: 0}
    assert files[1].file_id not in world.rows(archive)
    assert not (disk / 'archive' / files[1].object_name).exists()


def test_archive_holding_another_version_is_a_named_failure(world):
    bucket, active, archive, disk, files = setup(world, 2)
    world.query('INSERT INTO mm_files_image_storage (file_id, storage_id, type) VALUES (%s, %s, 10)',
                (files[0].file_id, archive))
    report = world.archive(active, archive, replace_with=1)
    assert report.exit_status == 1
    assert [(name, 'holds version 10 of this file' in reason) for name, reason in report.failures] == [
        (files[0].object_name, True)]
    assert world.rows(active)[files[0].file_id] == 0 and world.rows(active)[files[1].file_id] == 1


def test_archive_usage_errors(world):
    bucket, active, archive, disk, files = setup(world, 1)
    cases = [(('--replace-with', 0), 'replace the original with itself'),
             (('--replace-with', 3), 'no version type 3'),
             (('--delete-original', '--min-copies', 0), "must be at least 1"),
             ((), 'one of the arguments --replace-with --delete-original is required'),
             (('--replace-with', 1, '--delete-original'), 'not allowed with argument')]
    for extra, message in cases:
        result = world.cli('archive', '-s', active, '-t', archive, 'all_images', *extra)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
    assert world.rows(active) == {files[0].file_id: 0} and world.rows(archive) == {}


def test_dry_run_changes_nothing(world):
    bucket, active, archive, disk, files = setup(world, 3)
    result = world.cli('archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 1, '--dry-run')
    assert result.returncode == 0
    assert 'would archive 3 files' in result.stdout and files[0].object_name in result.stdout
    assert bucket_keys(world, bucket) == {f.object_name for f in files}
    assert files_under(disk / 'archive') == {} and world.rows(archive) == {}


# --- kills --------------------------------------------------------------------------------------

def assert_no_original_lost(world, bucket, active, archive, disk, files, version_type):
    """At any moment: every file has at least one recorded original whose bytes are there."""
    active_rows, archive_rows = world.rows(active), world.rows(archive)
    on_disk = files_under(disk / 'archive')
    keys = bucket_keys(world, bucket)
    for f in files:
        safe_on_disk = archive_rows.get(f.file_id) == 0 and on_disk.get(f.object_name) == f.data
        safe_at_active = active_rows.get(f.file_id) == 0 and f.object_name in keys \
            and world.s3_bytes(bucket, f.object_name) == f.data
        assert safe_on_disk or safe_at_active, f.object_name


@pytest.mark.parametrize('crash_at', ['after-archive-write:3', 'before-rename:4', 'after-commit:1',
                                      'after-version-write:3', 'after-original-delete:3', 'after-commit:2'])
def test_crash_at_each_step_of_archive_then_rerun(world, crash_at):
    bucket, active, archive, disk, files = setup(world, 24)
    args = ('archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 2, '--jobs', 3)
    first = world.cli(*args, env={'MITWELTEN_CRASH_AT': crash_at})
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert_no_original_lost(world, bucket, active, archive, disk, files, 2)
    second = world.cli(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert_archived_and_replaced(world, bucket, active, archive, disk, files, 2)
    assert [p for p in disk.rglob('*') if p.name.endswith(ms.TMP_SUFFIX)] == []


def test_kill_9_in_the_middle_of_archive_then_rerun_loses_nothing(world):
    bucket, active, archive, disk, files = setup(world, 150, width=480, height=360)
    args = ('archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 2, '--jobs', 4)
    process = world.popen(*args)
    deadline = time.monotonic() + 120
    while len([k for k in bucket_keys(world, bucket) if k.endswith('.webp')]) < 20 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert process.poll() is None, 'archive finished before it could be killed'
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert_no_original_lost(world, bucket, active, archive, disk, files, 2)
    rerun = world.cli(*args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_archived_and_replaced(world, bucket, active, archive, disk, files, 2)
