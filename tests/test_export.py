"""export: a researcher's working copy of a batch in a plain folder, each file from the most
accessible backend that holds it soundly, checked, with a manifest; a recall plan for the files
held only on disks that are not mounted, and the same command again after mounting one."""

from __future__ import annotations

import shutil
import subprocess

import mitwelten_storage as ms
from conftest import copied_to_disk, files_under


def export(world, batch, folder, **kwargs) -> ms.ExportReport:
    options = {k: kwargs.pop(k) for k in ('jobs',) if k in kwargs}
    return ms.export_batch(world.settings, batch, str(folder), options=world.options(**options), **kwargs)


def fixity(world, event='export') -> list[tuple]:
    return world.query('SELECT file_id, storage_id, type, outcome FROM storage_fixity WHERE event = %s '
                       'ORDER BY file_id, check_id', (event,))


def sha256sum_check(folder) -> subprocess.CompletedProcess:
    return subprocess.run(['sha256sum', '--strict', '-c', ms.EXPORT_MANIFEST], cwd=folder, capture_output=True,
                          text=True)


def test_the_recall_plan_is_the_fewest_disks_largest_first():
    plan = ms.recall_plan({1: (7,), 2: (7,), 3: (7, 8), 4: (8, 9), 5: (9,), 6: (8,)},
                          {7: 'Archive 07 (WD 4TB)', 8: 'Archive 08', 9: 'Archive 09'})
    assert [(s.storage_id, s.files) for s in plan] == [(7, 3), (8, 2), (9, 1)]
    assert plan[0].describe() == 'mount backend 7 "Archive 07 (WD 4TB)" for 3 files'
    assert [(s.storage_id, s.files) for s in ms.recall_plan({1: (3, 4), 2: (4,), 3: (3, 4)}, {})] == [(4, 3)]
    assert ms.recall_plan({}, {}) == []


def test_export_from_s3_and_disks_with_a_recall_plan_then_continuing_after_mounting(world, tmp_path):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    disk_a, path_a = world.create_local_backend(label='Archive 07 (WD 4TB)')
    disk_b, path_b = world.create_local_backend(label='Archive 08')
    files = world.images_on_s3(6, active)
    assert world.archive(active, disk_a, delete_originals=True).counts == {'deleted': 6}
    assert world.copy(disk_a, disk_b, limit=2).count('copied') == 2        # files 0 and 1 on disk B too
    # A file back online: read from S3, the most accessible.
    assert world.copy(disk_a, active, limit=1).count('copied') == 1
    mount = tmp_path / 'mnt'
    mount.mkdir()
    shutil.move(path_a, mount / 'archive07')                                 # disk A: not mounted where recorded
    folder = tmp_path / 'work'
    result = world.cli('export', 'all_images', '--to', folder)
    assert result.returncode == 1, result.stdout + result.stderr
    assert '2 exported' in result.stdout and '4 offline' in result.stdout
    assert f'mount backend {disk_a} "Archive 07 (WD 4TB)" for 4 files' in result.stdout
    assert files_under(folder) == {ms.EXPORT_MANIFEST: (folder / ms.EXPORT_MANIFEST).read_bytes(),
                                   **{f.object_name: f.data for f in files[:2]}}
    assert sha256sum_check(folder).returncode == 0
    assert [(file_id, storage_id) for file_id, storage_id, _, _ in fixity(world)] == [
        (files[0].file_id, active), (files[1].file_id, disk_b)]
    rows_before = world.query('SELECT file_id, storage_id, type FROM mm_files_image_storage ORDER BY 1, 2')
    # "Mounting" disk A: it is found under the mount roots, and the same command continues.
    again = world.cli('export', 'all_images', '--to', folder, env={'MITWELTEN_MOUNT_ROOTS': str(mount)})
    assert again.returncode == 0, again.stdout + again.stderr
    assert '4 exported' in again.stdout and '2 present' in again.stdout and 'recall plan' not in again.stdout
    exported = files_under(folder)
    assert exported.pop(ms.EXPORT_MANIFEST).decode().count('\n') == 6
    assert exported == {f.object_name: f.data for f in files}
    check = sha256sum_check(folder)
    assert check.returncode == 0 and check.stdout.count(': OK') == 6, check.stdout + check.stderr
    # Nothing in the catalog changed but the fixity log.
    assert world.query('SELECT file_id, storage_id, type FROM mm_files_image_storage ORDER BY 1, 2') == rows_before


def test_from_names_and_orders_the_backends(world, tmp_path):
    bucket, active, disk, path, files = copied_to_disk(world, 3)
    report = export(world, 'all_images', tmp_path / 'a', from_ids=[disk, active])
    assert report.exit_status == 0 and report.counts == {'exported': 3}
    assert {storage_id for _, storage_id, _, _ in fixity(world)} == {disk}
    # Only a backend that holds none of them: each file named, exit 1.
    other, _ = world.create_local_backend(label='empty')
    none = world.cli('export', 'all_images', '--to', tmp_path / 'b', '--from', other)
    assert none.returncode == 1 and '3 failed' in none.stdout
    # One reason for three files: said once on the way (for whichever failed first), counted in the summary.
    assert none.stderr.count(': no backend to read it from records a sound copy') == 1
    assert any(f'FAILED {f.object_name}: no backend to read it from' in none.stderr for f in files)
    bad = world.cli('export', 'all_images', '--to', tmp_path / 'c', '--from', '99')
    assert bad.returncode == 2 and '--from: no storage backend with id 99' in bad.stderr


def test_a_damaged_source_is_named_and_logged_and_a_file_in_the_folder_is_checked(world, tmp_path):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    files = world.images_on_s3(3, active)
    world.s3.put_object(Bucket=bucket, Key=files[0].object_name, Body=files[0].data[:-4] + b'XXXX')
    folder = tmp_path / 'work'
    report = export(world, 'all_images', folder)
    assert report.exit_status == 1 and report.counts == {'exported': 2, 'failed': 1}
    assert report.failures[0][0] == files[0].object_name
    assert not (folder / files[0].object_name).exists()
    assert (files[0].file_id, active, 0, 'corrupt') in fixity(world)
    # The log now says the copy is corrupt: it is no longer a source (rule 8).
    again = export(world, 'all_images', folder)
    assert again.counts == {'present': 2, 'failed': 1} and 'no backend to read it from' in again.failures[0][1]
    # A file in the folder that was changed is fetched again.
    (folder / files[1].object_name).write_bytes(b'edited')
    world.query("DELETE FROM storage_fixity")
    world.s3.put_object(Bucket=bucket, Key=files[0].object_name, Body=files[0].data)
    third = export(world, 'all_images', folder)
    assert third.exit_status == 0 and third.counts == {'exported': 2, 'present': 1}
    assert (folder / files[1].object_name).read_bytes() == files[1].data
    assert sha256sum_check(folder).returncode == 0


def test_gzip_as_the_only_other_copy_is_exported_as_the_original(world, tmp_path):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    disk, path = world.create_local_backend()
    files = world.recordings_on_s3(2, active)
    assert world.archive(active, disk, 'all_audio', replace_with=1).counts == {'replaced': 2}
    # The disk keeps gzip of the originals only.
    gz = world.new_disk('gz')
    gz_id, _ = world.create_local_backend(gz, label='gzip disk')
    world.query('DELETE FROM mm_files_audio_storage WHERE storage_id = %s', (disk,))
    for f in files:
        packed = ms.make_gzip(f.data, ms.CatalogFile(f.file_id, f.object_name, len(f.data), f.sha256))
        target = gz / 'archive' / (f.object_name + '.gz')
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(packed)
        world.query('INSERT INTO mm_files_audio_storage (file_id, storage_id, type) VALUES (%s, %s, 10)',
                    (f.file_id, gz_id))
    report = export(world, 'all_audio', tmp_path / 'work')
    assert report.exit_status == 0 and report.counts == {'exported': 2}, report.failures
    assert files_under(tmp_path / 'work') == {ms.EXPORT_MANIFEST: (tmp_path / 'work' / ms.EXPORT_MANIFEST).read_bytes(),
                                              **{f.object_name: f.data for f in files}}
    flac = export(world, 'all_audio', tmp_path / 'flac', version_type=1)
    assert flac.exit_status == 0 and flac.counts == {'exported': 2}
    assert sha256sum_check(tmp_path / 'flac').returncode == 0


def test_export_refuses_a_backend_folder_and_dry_run_writes_nothing(world, tmp_path):
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    disk, path = world.create_local_backend()
    world.images_on_s3(2, active)
    refused = world.cli('export', 'all_images', '--to', path)
    assert refused.returncode == 2 and 'is a storage backend' in refused.stderr
    dry = world.cli('export', 'all_images', '--to', tmp_path / 'work', '--dry-run')
    assert dry.returncode == 0 and 'would export 2 files' in dry.stdout and f'read from backend {active}' in dry.stdout
    assert not (tmp_path / 'work').exists()


def test_export_never_writes_outside_the_folder(world, tmp_path):
    """Rule 4 for the working copy: a folder in DIR that is a link leading elsewhere is refused."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    files = world.images_on_s3(2, active)
    folder, elsewhere = tmp_path / 'work', tmp_path / 'elsewhere'
    folder.mkdir()
    elsewhere.mkdir()
    first_part = files[0].object_name.split('/')[0]
    (folder / first_part).symlink_to(elsewhere)
    report = export(world, 'all_images', folder)
    assert report.exit_status == 1 and any('leads outside' in reason for _, reason in report.failures)
    assert list(elsewhere.rglob('*')) == []


def test_a_damaged_copy_is_passed_over_for_the_next_backend_in_the_same_run(world, tmp_path):
    bucket, active, disk, path, files = copied_to_disk(world, 2)
    world.s3.put_object(Bucket=bucket, Key=files[0].object_name, Body=files[0].data[:-4] + b'XXXX')
    report = export(world, 'all_images', tmp_path / 'work')
    assert report.exit_status == 0 and report.counts == {'exported': 2}, report.failures
    assert (tmp_path / 'work' / files[0].object_name).read_bytes() == files[0].data
    assert fixity(world) == [(files[0].file_id, active, 0, 'corrupt'), (files[0].file_id, disk, 0, 'ok'),
                             (files[1].file_id, active, 0, 'ok')]
