"""Rule 3 at the moment of the release: an original leaves ACTIVE only against an archive copy
proven then (written in this run from the checked original, or read back and hashed right before
the release). A recorded copy that is missing, truncated or overwritten is written again from the
checked original ('repaired'), or the original stays online. These tests damage a disk copy
between `copy` and `archive`, as days on a shelf or the earlier Mitwelten script do, and check
that afterwards every released original has a sound copy on the disk.

With the old check (`target_type == 0` taken as proof) every damaged case here releases the
original against the bad copy and loses it: these tests fail."""

from __future__ import annotations

import hashlib

import pytest

import mitwelten_storage as ms
from conftest import copied_to_disk, files_under
from devkit import sample_data
from test_via import NO_S3_KEYS, bucket_keys


def damage(disk, file, how: str) -> None:
    path = disk / 'archive' / file.object_name
    if how == 'overwritten':            # four bytes changed in place, the size kept
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
        path.write_bytes(bytes(data))
    elif how == 'truncated':
        path.write_bytes(path.read_bytes()[:len(file.data) // 2])
    elif how == 'deleted':
        path.unlink()
    else:
        raise ValueError(how)


def fixity(world, storage_id: int) -> list[tuple]:
    return world.query('SELECT file_id, outcome, event FROM storage_fixity WHERE storage_id = %s '
                       'ORDER BY check_id', (storage_id,))


def assert_every_released_original_is_sound_on_disk(world, bucket, active, disk, files):
    """Whatever left ACTIVE has its exact bytes on the disk."""
    online = bucket_keys(world, bucket)
    on_disk = files_under(disk / 'archive')
    for f in files:
        if f.object_name not in online:
            assert hashlib.sha256(on_disk.get(f.object_name, b'')).hexdigest() == f.sha256, f.object_name


@pytest.mark.parametrize('how', ['overwritten', 'truncated', 'deleted'])
@pytest.mark.parametrize('release', ['replace', 'delete'])
def test_a_damaged_archive_copy_is_written_again_before_the_original_leaves(world, how, release):
    bucket, active, archive, disk, files = copied_to_disk(world, 4)
    damaged = files[1]
    damage(disk, damaged, how)
    request = {'replace_with': 1} if release == 'replace' else {'delete_originals': True}
    report = world.archive(active, archive, **request)
    outcome = 'replaced' if release == 'replace' else 'deleted'
    assert report.exit_status == 0, report.failures
    assert report.counts == {outcome: 4, 'repaired': 1}
    assert any(damaged.object_name in note and 'written again' in note for note in report.notes), report.notes
    # The damaged copy is whole again, and every released original is on the disk, sound.
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    assert_every_released_original_is_sound_on_disk(world, bucket, active, disk, files)
    assert bucket_keys(world, bucket) == ({f.object_name.replace('.jpg', '.webp') for f in files}
                                          if release == 'replace' else set())
    # The fixity log says so: the damaged copy repaired at the release, the others proven.
    checks = [row for row in fixity(world, archive) if row[2] == 'release']
    assert sorted(checks) == sorted((f.file_id, 'repaired' if f is damaged else 'ok', 'release') for f in files)


def test_a_legacy_row_over_a_truncated_file_is_repaired_before_the_release(world):
    """The earlier Mitwelten script recorded whatever was on the disk: here a row says the disk
    holds an original that is a truncated file, and no check was ever logged."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend(label='Legacy disk')
    files = world.images_on_s3(3, active)
    legacy = files[0]
    truncated = sample_data.SampleFile(**{**legacy.__dict__, 'data': legacy.data[:1000]})
    sample_data.write_local(disk, [truncated])
    world.query('INSERT INTO mm_files_image_storage (file_id, storage_id, type) VALUES (%s, %s, 0)',
                (legacy.file_id, archive))
    report = world.archive(active, archive, delete_originals=True)
    assert report.exit_status == 0 and report.counts == {'deleted': 3, 'repaired': 1}, report.failures
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    assert bucket_keys(world, bucket) == set()


def test_a_copy_found_damaged_by_verify_is_written_again_at_once(world):
    """A copy whose last check found it corrupt counts for nothing (rule 8): the archive step
    writes it again from the original it reads, before anything is released."""
    bucket, active, archive, disk, files = copied_to_disk(world, 3)
    damage(disk, files[2], 'overwritten')
    found = world.verify(archive)
    assert [name for name, _ in found.found['corrupt']] == [files[2].object_name]
    world.query("INSERT INTO storage_fixity (file_group, file_id, storage_id, type, outcome, event, agent) "
                "VALUES ('image', %s, %s, 0, 'corrupt', 'verify', 'test')", (files[2].file_id, archive))
    plan = ms.plan_archive(world.settings, active, archive, 'all_images', replace_with=2, options=world.options())
    with plan:
        actions = {f.object_name: action for action, f in plan}
    assert actions[files[2].object_name].startswith('repair the archive copy')
    assert actions[files[0].object_name] == 'prove the archive copy and replace'
    report = world.archive(active, archive, replace_with=2)
    assert report.exit_status == 0 and report.counts == {'replaced': 3, 'repaired': 1}, report.failures
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    assert (files[2].file_id, 'repaired', 'archive') in fixity(world, archive)


def test_an_archive_copy_that_cannot_be_written_again_keeps_the_original_online(world):
    bucket, active, archive, disk, files = copied_to_disk(world, 3)
    damage(disk, files[0], 'truncated')
    # The disk fails every rename from the first on: the repair cannot be put in place.
    result = world.cli('archive', '-s', active, '-t', archive, 'all_images', '--delete-original',
                       '--jobs', 1, env={'MITWELTEN_FAULT_AT': 'rename:1'})
    assert result.returncode == 1, result.stdout + result.stderr
    assert files[0].object_name in result.stdout and 'the original stays online' in result.stdout
    assert files[0].object_name in bucket_keys(world, bucket)
    assert world.rows(active)[files[0].file_id] == 0
    assert_every_released_original_is_sound_on_disk(world, bucket, active, disk, files)
    assert (files[0].file_id, 'corrupt', 'release') in fixity(world, archive)


@pytest.mark.parametrize('release', [('--replace-with', '1'), ('--delete-original',)])
def test_through_the_service_the_workstation_proves_its_disk_copy_first(world, service, release):
    bucket, active, archive, disk, files = copied_to_disk(world, 4, width=2400, height=1800)
    for f, how in zip(files, ('overwritten', 'truncated', 'deleted')):
        damage(disk, f, how)
    result = world.cli('archive', '-s', active, '-t', archive, 'all_images', *release, '--via', service.url,
                       env=service.env(), unset=NO_S3_KEYS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '3 repaired' in result.stdout
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    assert_every_released_original_is_sound_on_disk(world, bucket, active, disk, files)
    assert not any(f.object_name in bucket_keys(world, bucket) for f in files)
    # The workstation may only read the catalog: the service logged its proofs.
    releases = {(file_id, outcome) for file_id, outcome, event in fixity(world, archive) if event == 'release'}
    assert releases == {(f.file_id, 'repaired') for f in files[:3]} | {(files[3].file_id, 'ok')}


def test_too_few_copies_reachable_means_no_download_and_no_version(world):
    """--min-copies 2 with one copy in reach: what is not archived yet is archived, nothing else
    is read and no version is made; a dry run says so."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend(label='Archive 01')
    files = world.images_on_s3(4, active, width=2400, height=1800)
    assert world.copy(active, archive, limit=2).count('copied') == 2
    plan = ms.plan_archive(world.settings, active, archive, 'all_images', replace_with=1, min_copies=2,
                           options=world.options())
    with plan:
        actions = sorted(action for action, _ in plan)
    assert actions == ['archive, keep (1 of --min-copies 2 sound copies)'] * 2 + \
        ['keep (1 of --min-copies 2 sound copies)'] * 2
    report = world.archive(active, archive, replace_with=1, min_copies=2)
    assert report.exit_status == 0 and report.counts == {'kept': 4}
    # Only the two originals the disk lacked were downloaded; no WebP was made or written.
    assert report.bytes_done == sum(len(f.data) for f in files[2:])
    assert bucket_keys(world, bucket) == {f.object_name for f in files}
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}


def test_a_dry_run_names_the_files_the_real_run_will_fail(world):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend(label='Archive 01')
    files = world.images_on_s3(3, active)
    world.query('INSERT INTO mm_files_image_storage (file_id, storage_id, type) VALUES (%s, %s, 1)',
                (files[0].file_id, archive))
    result = world.cli('archive', '-s', active, '-t', archive, 'all_images', '--replace-with', 1, '--dry-run')
    assert result.returncode == 0, result.stderr
    assert f'fail (the archive holds version 1): {files[0].object_name}' in result.stdout
    real = world.archive(active, archive, replace_with=1)
    assert [name for name, _ in real.failures] == [files[0].object_name]


def test_the_one_file_api_proves_the_archive_copy_too(world):
    bucket, active, archive, disk, files = copied_to_disk(world, 2)
    image = files[0]
    with pytest.raises(ms.ConfigError, match='replace the original with itself'):
        ms.archive_file(world.settings, 'image', image.file_id, active, archive, replace_with=0)
    assert world.rows(active) == {f.file_id: 0 for f in files}
    damage(disk, image, 'truncated')
    state = ms.archive_file(world.settings, 'image', image.file_id, active, archive, replace_with=1)
    assert state.outcome == 'replaced'
    assert (disk / 'archive' / image.object_name).read_bytes() == image.data
    assert (image.file_id, 'repaired', 'release') in fixity(world, archive)
    assert world.rows(active)[image.file_id] == 1
