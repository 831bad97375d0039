"""restore: originals back from an archive disk to the active tier, archive backwards, with the
same care: read and checked, written durably, recorded, and only then the version removed; a
damaged disk copy never restored from; a kill at each step and the same command again."""

from __future__ import annotations

import signal

import pytest

import mitwelten_storage as ms
from conftest import files_under


def bucket_keys(world, bucket: str) -> set[str]:
    pages = world.s3.get_paginator('list_objects_v2').paginate(Bucket=bucket)
    return {obj['Key'] for page in pages for obj in page.get('Contents', [])}


def archived(world, count=6, replace_with=1, group='image', **kwargs):
    """Originals archived onto a disk and replaced (or deleted) on the active bucket."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend(label='Archive 01')
    files = (world.images_on_s3(count, active, **kwargs) if group == 'image'
             else world.recordings_on_s3(count, active, **kwargs))
    batch = 'all_images' if group == 'image' else 'all_audio'
    report = world.archive(active, archive, batch, replace_with=replace_with,
                           delete_originals=replace_with is None)
    assert report.exit_status == 0, report.failures
    return bucket, active, archive, disk, files


def restore(world, archive, active, batch='all_images', **options) -> ms.RunReport:
    return ms.restore_batch(world.settings, archive, active, batch, options=world.options(**options))


def fixity(world, storage_id: int, event: str = 'restore') -> dict[int, list[str]]:
    rows = world.query('SELECT file_id, outcome FROM storage_fixity WHERE storage_id = %s AND event = %s '
                       'ORDER BY check_id', (storage_id, event))
    found: dict[int, list[str]] = {}
    for file_id, outcome in rows:
        found.setdefault(file_id, []).append(outcome)
    return found


def assert_restored(world, bucket, active, archive, disk, files, group='image'):
    """Every original back at ACTIVE with its bytes, recorded as type 0; no version left there;
    the archive untouched."""
    assert {k: world.s3_bytes(bucket, k) for k in bucket_keys(world, bucket)} == {f.object_name: f.data for f in files}
    assert world.rows(active, group) == {f.file_id: 0 for f in files}
    assert world.rows(archive, group) == {f.file_id: 0 for f in files}
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}


def test_restore_after_replace_with_webp(world):
    bucket, active, archive, disk, files = archived(world, 5, replace_with=1)
    assert bucket_keys(world, bucket) == {f.object_name.replace('.jpg', '.webp') for f in files}
    report = restore(world, archive, active)
    assert report.exit_status == 0 and report.counts == {'restored': 5}, report.failures
    assert_restored(world, bucket, active, archive, disk, files)
    # Each restored original: its archive copy checked, and the new copy at ACTIVE.
    assert fixity(world, archive) == {f.file_id: ['ok'] for f in files}
    assert fixity(world, active) == {f.file_id: ['ok'] for f in files}
    again = restore(world, archive, active)
    assert again.exit_status == 0 and again.counts == {}
    assert again.notes == ['5 files of the batch are at ACTIVE as originals already']


def test_restore_after_delete_original_makes_new_rows(world):
    bucket, active, archive, disk, files = archived(world, 4, replace_with=None)
    assert bucket_keys(world, bucket) == set() and world.rows(active) == {}
    result = world.cli('restore', '-s', archive, '-t', active, 'all_images')
    assert result.returncode == 0, result.stdout + result.stderr
    assert '4 restored' in result.stdout and 'log:' in result.stdout
    assert_restored(world, bucket, active, archive, disk, files)


def test_restore_of_audio_replaced_with_flac(world):
    bucket, active, archive, disk, files = archived(world, 2, replace_with=1, group='audio')
    report = restore(world, archive, active, 'all_audio')
    assert report.exit_status == 0 and report.counts == {'restored': 2}, report.failures
    assert_restored(world, bucket, active, archive, disk, files, 'audio')


def test_dry_run_and_limit(world):
    bucket, active, archive, disk, files = archived(world, 4, replace_with=2)
    dry = world.cli('restore', '-s', archive, '-t', active, 'all_images', '--dry-run')
    assert dry.returncode == 0 and 'would restore 4 files' in dry.stdout, dry.stdout + dry.stderr
    assert files[0].object_name in dry.stdout
    assert world.rows(active) == {f.file_id: 2 for f in files}
    limited = world.cli('restore', '-s', archive, '-t', active, 'all_images', '--limit', 1, '--jobs', 2)
    assert limited.returncode == 0 and '1 restored' in limited.stdout, limited.stdout + limited.stderr
    assert sorted(world.rows(active).values()) == [0, 2, 2, 2]


def test_a_damaged_disk_copy_is_never_restored(world):
    """Bytes overwritten on the disk: found corrupt while reading, named, exit 1, the version
    stays online; the fixity log says so, and the next run refuses it from the log unread."""
    bucket, active, archive, disk, files = archived(world, 4, replace_with=1)
    damaged = files[1]
    path = disk / 'archive' / damaged.object_name
    path.write_bytes(damaged.data[:-10] + b'0123456789')
    result = world.cli('restore', '-s', archive, '-t', active, 'all_images')
    assert result.returncode == 1, result.stdout + result.stderr
    assert f'FAILED {damaged.object_name}: sha256' in result.stderr and '3 restored' in result.stdout
    assert world.rows(active)[damaged.file_id] == 1
    assert world.s3_bytes(bucket, damaged.object_name) is None
    assert world.s3_bytes(bucket, damaged.object_name.replace('.jpg', '.webp')) is not None
    assert fixity(world, archive)[damaged.file_id] == ['corrupt']
    again = world.cli('restore', '-s', archive, '-t', active, 'all_images')
    assert again.returncode == 1
    assert f'FAILED {damaged.object_name}: its copy at backend {archive}' in again.stderr
    assert 'was found corrupt by its last check' in again.stderr
    assert world.rows(active)[damaged.file_id] == 1


def test_a_disk_copy_marked_corrupt_by_verify_is_not_read(world):
    bucket, active, archive, disk, files = archived(world, 3, replace_with=1)
    world.query("INSERT INTO storage_fixity (file_group, file_id, storage_id, type, outcome, event, agent) "
                "VALUES ('image', %s, %s, 0, 'corrupt', 'verify', 'test')", (files[0].file_id, archive))
    report = restore(world, archive, active)
    assert report.exit_status == 1 and report.counts == {'restored': 2, 'failed': 1}
    assert report.failures[0][0] == files[0].object_name and 'rule 8' in report.failures[0][1]
    assert world.rows(active)[files[0].file_id] == 1


def test_gzip_on_the_disk_is_the_original(world):
    """The disk holds gzip of the originals only (type 10); the online originals are gone:
    restore reads gzip, decompresses, checks, and puts the originals back."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend()
    files = world.images_on_s3(3, active)
    assert world.copy(active, archive, version_type=10).count('made') == 3
    for f in files:
        world.s3.delete_object(Bucket=bucket, Key=f.object_name)
    world.query('DELETE FROM mm_files_image_storage WHERE storage_id = %s', (active,))
    report = restore(world, archive, active)
    assert report.exit_status == 0 and report.counts == {'restored': 3}, report.failures
    assert {k: world.s3_bytes(bucket, k) for k in bucket_keys(world, bucket)} == {f.object_name: f.data for f in files}
    assert world.rows(active) == {f.file_id: 0 for f in files}
    assert world.rows(archive) == {f.file_id: 10 for f in files}


# --- kills --------------------------------------------------------------------------------------

def assert_nothing_lost(world, bucket, active, archive, disk, files):
    """At any moment: the archive's originals are whole and recorded, and ACTIVE's row speaks
    of an object that is there."""
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    keys = bucket_keys(world, bucket)
    for f, (file_id, version_type) in zip(files, sorted(world.rows(active).items())):
        name = ms.VERSIONS[('image', version_type)].object_name(f.object_name)
        assert name in keys, (f.object_name, version_type)


@pytest.mark.parametrize('crash_at', ['after-restore-write:3', 'after-commit:1',
                                      'after-restore-commit:1', 'after-version-delete:2'])
def test_crash_at_each_step_of_restore_then_rerun(world, crash_at):
    bucket, active, archive, disk, files = archived(world, 12, replace_with=2)
    args = ('restore', '-s', archive, '-t', active, 'all_images', '--jobs', 3)
    first = world.cli(*args, env={'MITWELTEN_CRASH_AT': crash_at})
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert_nothing_lost(world, bucket, active, archive, disk, files)
    second = world.cli(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    if crash_at.startswith(('after-restore-commit', 'after-version-delete')):
        assert 'finished' in second.stdout      # the versions left beside restored originals: removed
    assert_restored(world, bucket, active, archive, disk, files)
    third = world.cli(*args)
    assert third.returncode == 0 and 'nothing to do' in third.stdout, third.stdout


# --- through the service: PUT …/original and restore --via ------------------------------------------

NO_S3_KEYS = ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_DEFAULT_REGION', 'AWS_PROFILE')


def problem_type(response) -> str:
    import json
    assert response.headers['Content-Type'] == 'application/problem+json', response.data[:300]
    return json.loads(response.data)['type'].removeprefix(ms.PROBLEM)


def test_put_original_stores_only_the_original(world, service):
    bucket, active, archive, disk, files = archived(world, 2, replace_with=1)
    image = files[0]
    webp = image.object_name.replace('.jpg', '.webp')
    path = f'/images/{image.file_id}/original'
    wrong = service.http.request('PUT', service.url + path, body=image.data[:-3] + b'abc',
                                 headers={'Authorization': f'Bearer {service.token()}'})
    assert wrong.status == 422 and problem_type(wrong) == 'wrong-original'
    assert world.s3_bytes(bucket, image.object_name) is None and world.rows(active)[image.file_id] == 1
    larger = service.http.request('PUT', service.url + path, body=image.data + b'x',
                                  headers={'Authorization': f'Bearer {service.token()}'})
    assert larger.status == 413 and problem_type(larger) == 'too-large'
    unlengthed = service.http.request('PUT', service.url + path, body=iter([image.data]), chunked=True,
                                      headers={'Authorization': f'Bearer {service.token()}'})
    assert unlengthed.status == 411 and problem_type(unlengthed) == 'length-required'
    unknown = service.http.request('PUT', service.url + '/images/999999/original', body=b'12345',
                                   headers={'Authorization': f'Bearer {service.token()}'})
    assert unknown.status == 404
    reader = service.http.request('PUT', service.url + path, body=image.data,
                                  headers={'Authorization': f"Bearer {service.token(roles=('internal',))}"})
    assert reader.status == 403
    assert world.s3_bytes(bucket, image.object_name) is None and world.s3_bytes(bucket, webp) is not None
    good = service.http.request('PUT', service.url + path, body=image.data,
                                headers={'Authorization': f'Bearer {service.token()}'})
    assert good.status == 201, good.data
    assert world.s3_bytes(bucket, image.object_name) == image.data and world.s3_bytes(bucket, webp) is None
    assert world.rows(active) == {image.file_id: 0, files[1].file_id: 1}
    again = service.http.request('PUT', service.url + path, body=image.data,
                                 headers={'Authorization': f'Bearer {service.token()}'})
    assert again.status == 200, again.data
    got = service.request('GET', path)
    assert got.status == 200 and got.data == image.data


def test_restore_via_the_service_with_no_s3_keys(world, service, readonly_dsn):
    bucket, active, archive, disk, files = archived(world, 4, replace_with=None)
    damaged = files[2]
    (disk / 'archive' / damaged.object_name).write_bytes(damaged.data[:-5] + b'!!!!!')
    args = ('restore', '-s', archive, '-t', active, 'all_images', '--via', service.url)
    env = {**service.env(), 'MITWELTEN_DB': readonly_dsn}
    result = world.cli(*args, env=env, unset=NO_S3_KEYS)
    assert result.returncode == 1, result.stdout + result.stderr
    assert '3 restored' in result.stdout and f'FAILED {damaged.object_name}: sha256' in result.stderr
    good = [f for f in files if f is not damaged]
    assert {k: world.s3_bytes(bucket, k) for k in bucket_keys(world, bucket)} == {f.object_name: f.data for f in good}
    assert world.rows(active) == {f.file_id: 0 for f in good}
    (disk / 'archive' / damaged.object_name).write_bytes(damaged.data)
    again = world.cli(*args, env=env, unset=NO_S3_KEYS)
    assert again.returncode == 0 and '1 restored' in again.stdout, again.stdout + again.stderr
    assert_restored(world, bucket, active, archive, disk, files)
    wrong_target = world.cli('restore', '-s', archive, '-t', archive, 'all_images', '--via', service.url,
                             env=env, unset=NO_S3_KEYS)
    assert wrong_target.returncode == 2


def test_restore_via_finishes_a_put_cut_off_after_its_commit(world, issuer):
    """The service killed between its commit and the version's removal: the next restore --via
    sends the file again, and the service removes the version left beside the original."""
    from conftest import service_process
    bucket, active, archive, disk, files = archived(world, 3, replace_with=1)
    process, url = service_process(world, issuer, env={'MITWELTEN_CRASH_AT': 'after-restore-commit:2'})
    token = issuer.token(('internal', 'storage-admin'))
    args = ('restore', '-s', archive, '-t', active, 'all_images', '--via', url, '--jobs', 1)
    try:
        first = world.cli(*args, env={'MITWELTEN_TOKEN': token, 'MITWELTEN_ATTEMPTS': '1'}, unset=NO_S3_KEYS)
        assert first.returncode != 0
        process.wait(30)
    finally:
        process.kill()
    assert sorted(world.rows(active).values()) == [0, 0, 1]
    assert len([k for k in bucket_keys(world, bucket) if k.endswith('.webp')]) == 2   # one left beside its original
    process, url = service_process(world, issuer)
    try:
        args = args[:-3] + (url, '--jobs', 1)
        second = world.cli(*args, env={'MITWELTEN_TOKEN': token}, unset=NO_S3_KEYS)
        assert second.returncode == 0, second.stdout + second.stderr
    finally:
        process.terminate()
        process.wait(30)
    assert_restored(world, bucket, active, archive, disk, files)


def test_get_original_where_the_active_tier_holds_gzip(world, service):
    """gzip is the original: GET …/original serves it decompressed, checked, with the same
    ETag and Repr-Digest; HEAD and ranges too."""
    bucket, active, archive, disk, files = archived(world, 2, replace_with=10, group='audio')
    recording = files[0]
    assert world.s3_bytes(bucket, recording.object_name) is None
    path = f'/audio/{recording.file_id}/original'
    got = service.request('GET', path)
    assert got.status == 200 and got.data == recording.data
    assert got.headers['ETag'] == f'"{recording.sha256}"'
    assert got.headers['Repr-Digest'] == ms.repr_digest(recording.sha256)
    head = service.request('HEAD', path)
    assert head.status == 200 and head.headers['Content-Length'] == str(len(recording.data))
    part = service.request('GET', path, headers={'Range': 'bytes=100-1099'})
    assert part.status == 206 and part.data == recording.data[100:1100]
    # A damaged gzip is never served as the original: found before the answer starts, a 502.
    world.s3.put_object(Bucket=bucket, Key=files[1].object_name + '.gz', Body=b'\x1f\x8b' + b'0' * 50)
    broken = service.request('GET', f'/audio/{files[1].file_id}/original')
    assert broken.status == 502 and problem_type(broken) == 'original-corrupt'


def test_restore_without_the_fixity_log_then_a_kill_after_the_commit(world):
    """Production before `init-db` has no fixity log: restore works, and a version left beside
    a restored original by a kill is found (a HEAD per version name of the restored files)."""
    bucket, active, archive, disk, files = archived(world, 5, replace_with=1)
    world.query('DROP TABLE storage_fixity')
    args = ('restore', '-s', archive, '-t', active, 'all_images', '--jobs', 2)
    first = world.cli(*args, env={'MITWELTEN_CRASH_AT': 'after-restore-commit:1'})
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert any(k.endswith('.webp') for k in bucket_keys(world, bucket))
    second = world.cli(*args)
    assert second.returncode == 0 and 'finished' in second.stdout, second.stdout + second.stderr
    assert_restored(world, bucket, active, archive, disk, files)
    third = world.cli(*args)
    assert third.returncode == 0 and 'nothing to do' in third.stdout, third.stdout


def test_restore_to_a_disk_from_a_bucket(world):
    """Any direction: a disk that keeps gzip versions gets its originals back from a bucket,
    written atomically and synced before they are recorded."""
    from devkit import sample_data
    disk_id, disk = world.create_local_backend()
    files = sample_data.sample_images(3, seed=57)
    world.files_on_disk(files, disk_id, disk)
    bucket = world.new_bucket()
    s3_id = world.create_s3_backend(bucket, priority=1)
    assert world.archive(disk_id, s3_id, replace_with=10).counts == {'replaced': 3}
    report = restore(world, s3_id, disk_id)
    assert report.exit_status == 0 and report.counts == {'restored': 3}, report.failures
    assert files_under(disk / 'archive') == {f.object_name: f.data for f in files}
    assert world.rows(disk_id) == {f.file_id: 0 for f in files}
    assert [p for p in disk.rglob('*') if p.name.endswith(ms.TMP_SUFFIX)] == []


def test_a_row_changed_by_another_run_meanwhile_keeps_its_version(world):
    """Between the restore's write and its commit another run changes the row at ACTIVE (here a
    trigger makes the update find nothing to change, as a changed row would): the version that
    row records is not deleted; the file is named; the next run, once the row is as it was,
    finishes the restore."""
    bucket, active, archive, disk, files = archived(world, 3, replace_with=1)
    contested = files[1]
    world.query(f'''CREATE FUNCTION "{world.schema}".hold_row() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN IF NEW.file_id = {contested.file_id} THEN RETURN NULL; END IF; RETURN NEW; END $$''')
    world.query(f'CREATE TRIGGER hold BEFORE UPDATE ON mm_files_image_storage FOR EACH ROW '
                f'EXECUTE FUNCTION "{world.schema}".hold_row()')
    report = restore(world, archive, active)
    assert report.count('restored') == 2 and [name for name, _ in report.failures] == [contested.object_name]
    assert 'changed by another run' in report.failures[0][1]
    webp = contested.object_name.replace('.jpg', '.webp')
    assert world.rows(active)[contested.file_id] == 1 and world.s3_bytes(bucket, webp) is not None
    world.query('DROP TRIGGER hold ON mm_files_image_storage')
    again = restore(world, archive, active)
    assert again.exit_status == 0 and again.count('restored') == 1, again.failures
    assert world.rows(active) == {f.file_id: 0 for f in files}
    assert bucket_keys(world, bucket) == {f.object_name for f in files}
