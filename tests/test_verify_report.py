"""verify, report, and disks found wherever they are mounted."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest

import mitwelten_storage as ms
from conftest import copied_to_disk, files_under


def test_verify_of_a_sound_disk_and_bucket_exits_0(world):
    bucket, source, disk_id, disk, files = copied_to_disk(world)
    world.recordings_on_s3(2, source)
    assert world.copy(source, disk_id, 'all_audio', version_type=1).counts == {'made': 2}
    for storage_id in (disk_id, source):
        result = world.main('verify', storage_id)
        assert result.returncode == 0, result.stdout + result.stderr
        assert 'all is well' in result.stdout
    assert '8 files sound' in world.main('verify', disk_id).stdout


def test_corrupt_missing_and_unknown_are_named_fix_removes_two_rows_and_copy_restores(world):
    bucket, source, disk_id, disk, files = copied_to_disk(world)
    corrupt, missing = files[1], files[4]
    path = disk / 'archive' / corrupt.object_name
    data = bytearray(path.read_bytes())
    data[500] ^= 0x01
    path.write_bytes(bytes(data))
    (disk / 'archive' / missing.object_name).unlink()
    stray = disk / 'archive' / files[0].object_name.rsplit('/', 1)[0] / 'notes-from-the-field.txt'
    stray.write_text('not a catalogued file')
    rows_before = world.rows(disk_id)

    result = world.main('verify', disk_id)
    assert result.returncode == 1
    assert f'1 missing (recorded, not there):\n    {missing.object_name}' in result.stdout
    assert f'1 corrupt (there, but not sound):\n    {corrupt.object_name}: sha256' in result.stdout
    assert f"{stray.relative_to(disk / 'archive')}" in result.stdout and '1 unknown' in result.stdout
    assert world.rows(disk_id) == rows_before      # without --fix nothing changes

    fixed = world.main('verify', disk_id, '--fix')
    assert fixed.returncode == 1
    assert 'removed the catalog rows of 2 missing or corrupt files' in fixed.stdout
    assert set(rows_before) - set(world.rows(disk_id)) == {corrupt.file_id, missing.file_id}
    assert path.read_bytes() == bytes(data) and stray.exists()      # --fix never touches a file

    restored = world.copy(source, disk_id)
    assert restored.exit_status == 0 and restored.counts == {'copied': 2}
    assert path.read_bytes() == corrupt.data
    stray.unlink()                        # the researcher deals with the file the catalog does not know
    final = world.verify(disk_id)
    assert final.exit_status == 0 and final.count('sound') == 6, final.failures
    assert world.rows(disk_id) == rows_before


def test_verify_fix_with_a_catalog_that_refuses_says_so_and_still_lists_the_findings(world, readonly_dsn):
    bucket, source, disk_id, disk, files = copied_to_disk(world, 3)
    (disk / 'archive' / files[0].object_name).unlink()
    result = world.main('verify', disk_id, '--fix', env={'MITWELTEN_DB': readonly_dsn})
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert f'1 missing (recorded, not there):\n    {files[0].object_name}' in result.stdout
    assert 'stopped early: --fix could not remove the rows: catalog: ERROR:  permission denied' in result.stdout
    assert files[0].file_id in world.rows(disk_id)


def test_verify_of_a_bucket_names_missing_and_corrupt_objects(world):
    bucket, source, disk_id, disk, files = copied_to_disk(world, 4)
    world.s3.delete_object(Bucket=bucket, Key=files[0].object_name)
    world.s3.put_object(Bucket=bucket, Key=files[2].object_name, Body=b'x' * len(files[2].data))
    report = world.verify(source)
    assert report.exit_status == 1 and report.count('sound') == 2
    assert report.found['missing'] == [(files[0].object_name, '')]
    assert [(name, reason[:6]) for name, reason in report.found['corrupt']] == [(files[2].object_name, 'sha256')]
    fixed = world.verify(source, fix=True)
    assert fixed.exit_status == 1 and sorted(fixed.removed) == sorted([files[0].object_name, files[2].object_name])
    assert set(world.rows(source)) == {files[1].file_id, files[3].file_id}
    assert world.verify(source).exit_status == 0


@pytest.mark.parametrize('group, version_type', [('image', 1), ('image', 10), ('audio', 1), ('audio', 10)])
def test_verify_checks_versions_decode(world, group, version_type):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    files = (world.images_on_s3(2, source) if group == 'image' else world.recordings_on_s3(2, source))
    batch = 'all_images' if group == 'image' else 'all_audio'
    assert world.copy(source, disk_id, batch, version_type=version_type).counts == {'made': 2}
    assert world.verify(disk_id).exit_status == 0
    name = ms.VERSIONS[(group, version_type)].object_name(files[0].object_name)
    stored = disk / 'archive' / name
    data = bytearray(stored.read_bytes())
    if version_type == 1 and group == 'image':
        # Lossy WebP has no checksum: damage inside the picture decodes to wrong pixels without
        # an error, so a cut-off file is what a check can find.
        data = data[:len(data) * 2 // 3]
    else:
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)     # FLAC frames and gzip carry CRCs
    stored.write_bytes(bytes(data))
    report = world.verify(disk_id)
    assert report.exit_status == 1 and report.count('sound') == 1
    assert [found for found, _ in report.found['corrupt']] == [name]


def test_verify_with_a_batch_checks_only_its_files(world):
    bucket, source, disk_id, disk, files = copied_to_disk(world, 6)
    fs2 = [f for f in files if f.node_label == '1874-8542']
    others = [f for f in files if f not in fs2]
    (disk / 'archive' / others[0].object_name).unlink()
    assert world.verify(disk_id, 'fs2_images').exit_status == 0
    report = world.verify(disk_id, 'fs1_images')
    assert report.exit_status == 1 and report.found['missing'] == [(others[0].object_name, '')]


def test_verify_lists_leftover_temporary_files(world):
    bucket, source, disk_id, disk, files = copied_to_disk(world, 2)
    leftover = disk / 'archive' / f'.x.jpg.0123456789-abcdef01{ms.TMP_SUFFIX}'
    leftover.write_bytes(b'partial')
    result = world.main('verify', disk_id)
    assert result.returncode == 1
    assert f'{leftover.name}: a temporary file left by an interrupted run: safe to delete' in result.stdout


# --- report ---------------------------------------------------------------------------------------

def test_report_manifest_passes_sha256sum_and_the_disk_reads_without_the_database(world):
    bucket, source, disk_id, disk, files = copied_to_disk(world, 6)
    recordings = world.recordings_on_s3(3, source)
    assert world.copy(source, disk_id, 'all_audio').count('copied') == 3
    result = world.main('report', disk_id)
    assert result.returncode == 0, result.stderr
    for name in ('manifest-sha256.txt', 'REPORT.md', 'archive_index.db'):
        assert f'wrote {disk / name}' in result.stdout
    check = subprocess.run(['sha256sum', '-c', 'manifest-sha256.txt'], cwd=disk, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(': OK') == len(files) + len(recordings)
    manifest = (disk / 'manifest-sha256.txt').read_text().splitlines()
    assert sorted(manifest) == sorted(f'{f.sha256}  archive/{f.object_name}' for f in files + recordings)

    report = (disk / 'REPORT.md').read_text()
    image_bytes = sum(len(f.data) for f in files)
    assert f'| image | 0 | original | 6 | {ms.human_bytes(image_bytes)} |' in report
    assert '| audio | 0 | original | 3 |' in report
    assert 'from 5 nodes' in report and '## Deployments (5,' in report
    assert '| 0344-6782 | Pollinator Cam | FS1 | Pollinator Cam at Merian Gardens | 2021-06-01 to 2021-09-29 |' in report
    first = min(f.time for f in files + recordings)
    last = max(f.time for f in files + recordings)
    assert f"First sample: {first.strftime('%Y-%m-%d %H:%M:%S')} UTC. Last sample: " \
           f"{last.strftime('%Y-%m-%d %H:%M:%S')} UTC." in report
    assert 'Report made ' in report

    index = sqlite3.connect(disk / 'archive_index.db')
    rows = index.execute('SELECT object_name, sha256, version_type FROM files_image ORDER BY object_name').fetchall()
    assert rows == sorted((f.object_name, f.sha256, 0) for f in files)
    assert index.execute('SELECT count(*) FROM files_audio').fetchone() == (3,)
    labels = {r[0] for r in index.execute('SELECT node_label FROM nodes')}
    assert labels == {'0344-6782', '1874-8542', '6444-8804', '4258-6870', '2061-6644'}
    joined = index.execute('SELECT count(*) FROM files_image f JOIN deployments d USING (deployment_id) '
                           "JOIN deployment_tags t USING (deployment_id) WHERE t.tag = 'FS1'").fetchone()[0]
    assert joined == len([f for f in files if f.node_label in ('0344-6782', '6444-8804')])
    index.close()
    assert [p for p in disk.iterdir() if p.name.endswith(ms.TMP_SUFFIX)] == []


def test_report_lists_versions_but_hashes_only_originals(world):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    world.images_on_s3(3, source)
    assert world.copy(source, disk_id, version_type=10).counts == {'made': 3}
    written = ms.write_report(world.settings, disk_id)
    assert (written.originals, written.index_rows['files_image']) == (0, 3)
    assert (disk / 'manifest-sha256.txt').read_text() == ''
    assert '| image | 10 | gzip -9 | 3 | (not recorded) |' in (disk / 'REPORT.md').read_text()


def test_manifest_lines_for_awkward_names_are_what_sha256sum_accepts(tmp_path):
    name = 'archive/node\\with backslash/x y.jpg'
    path = tmp_path / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b'awkward')
    (tmp_path / 'manifest-sha256.txt').write_text(ms.manifest_line(ms.hashlib.sha256(b'awkward').hexdigest(), name))
    check = subprocess.run(['sha256sum', '-c', 'manifest-sha256.txt'], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_report_refuses_a_bucket_and_a_wrong_disk(world):
    s3_id = world.create_s3_backend()
    result = world.main('report', s3_id)
    assert result.returncode == 2 and 'writes onto a local disk' in result.stderr
    disk_id, disk = world.create_local_backend()
    other_id, other = world.create_local_backend(label='other')
    result = world.main('report', disk_id, '--path', other)
    assert result.returncode == 2 and 'wrong disk' in result.stderr
    assert not (other / 'REPORT.md').exists()


# --- where is the disk? ----------------------------------------------------------------------------

def test_a_disk_moved_to_another_mount_root_is_found_by_copy_verify_report_and_info(world, tmp_path):
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    disk_id, disk = world.create_local_backend(label='Archive 07')
    files = world.images_on_s3(4, source)
    assert world.copy(source, disk_id, limit=2).count('copied') == 2
    media = tmp_path / 'run-media' / 'researcher'
    media.mkdir(parents=True)
    decoy_id, decoy = world.create_local_backend(label='decoy')           # another disk, also mounted
    shutil.move(str(decoy), media / 'DECOY')
    moved = media / 'ARCHIVE07'
    shutil.move(str(disk), moved)
    roots = {'MITWELTEN_MOUNT_ROOTS': f"{tmp_path / 'nothing-here'}:{tmp_path / 'run-media'}/*"}

    listing = json.loads(world.main('info', '--json', env=roots).stdout)
    entry = next(e for e in listing if e['storage_id'] == disk_id)
    assert entry['online'] is True and entry['mounted_at'] == str(moved)
    assert f'mounted at {moved}, not at its recorded path' in world.main('info', env=roots).stdout

    result = world.main('copy', '-s', source, '-t', disk_id, 'all_images', env=roots)
    assert result.returncode == 0, result.stderr
    assert f'found it at {moved}' in result.stderr
    assert files_under(moved / 'archive') == {f.object_name: f.data for f in files}
    assert not disk.exists()
    result = world.main('verify', disk_id, env=roots)
    assert result.returncode == 0 and 'all is well' in result.stdout
    assert world.main('report', disk_id, env=roots).returncode == 0 and (moved / 'REPORT.md').exists()
    # Without the mount roots to look in, the disk is not found, and the message says what to do.
    lost = world.main('verify', disk_id)
    assert lost.returncode == 2 and 'is not mounted' in lost.stderr and '--path' in lost.stderr


def test_a_disk_under_the_mount_roots_with_a_different_identity_is_never_used(world, tmp_path):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    world.images_on_s3(2, source)
    impostor = tmp_path / 'mnt' / 'IMPOSTOR'
    impostor.mkdir(parents=True)
    (impostor / 'archive').mkdir()
    text = (disk / ms.DOT_FILE).read_text()
    (impostor / ms.DOT_FILE).write_text('\n'.join('created_at=2020-01-01 00:00:00+00:00'
                                                  if line.startswith('created_at=') else line
                                                  for line in text.splitlines()))
    shutil.rmtree(disk)
    result = world.main('copy', '-s', source, '-t', disk_id, 'all_images',
                       env={'MITWELTEN_MOUNT_ROOTS': str(tmp_path / 'mnt')})
    assert result.returncode == 2 and 'is not mounted' in result.stderr
    assert list((impostor / 'archive').iterdir()) == []
