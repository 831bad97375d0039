"""The engine as a library: operations that return and never print, the per-file operations the
storage service calls (each keeping the rules), and the layout the design asks of the file."""

from __future__ import annotations

import logging
import re
import threading

import pytest

import mitwelten_storage as ms
from conftest import ROOT, files_under


def bucket_keys(world, bucket: str) -> set[str]:
    pages = world.s3.get_paginator('list_objects_v2').paginate(Bucket=bucket)
    return {obj['Key'] for page in pages for obj in page.get('Contents', [])}


# --- a library that returns and never prints ------------------------------------------------------

def test_operations_print_nothing_and_tell_through_their_reports_and_the_logger(world, capsys, caplog):
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    disk_id, disk = world.create_local_backend()
    files = world.images_on_s3(4, source)
    world.s3.put_object(Bucket=bucket, Key=files[0].object_name, Body=b'not the original')
    with caplog.at_level(logging.INFO, logger='mitwelten_storage'):
        copied = world.copy(source, disk_id)
        verified = world.verify(disk_id)
        listing = ms.list_backends(world.settings)
        written = ms.write_report(world.settings, disk_id)
        archived = world.archive(source, disk_id, replace_with=2)
    assert capsys.readouterr() == ('', '')
    assert copied.counts == {'copied': 3, 'failed': 1} and copied.exit_status == 1
    assert copied.log_path.exists() and copied.recorded == 3 and copied.unrecorded == 0
    assert [name for name, _ in copied.failures] == [files[0].object_name]
    assert f'FAILED {files[0].object_name}: 16 bytes' in caplog.text
    assert verified.count('sound') == 3 and verified.exit_status == 0
    assert [entry['storage_id'] for entry in listing] == [source, disk_id]
    assert written.originals == 3 and (disk / 'REPORT.md').exists()
    assert archived.counts == {'replaced': 3, 'failed': 1}


def test_a_plan_streams_what_a_dry_run_would_do(world):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    files = world.images_on_s3(3, source)
    assert world.copy(source, disk_id, limit=1).count('copied') == 1
    with ms.plan_copy(world.settings, source, disk_id, 'all_images', version_type=0, options=world.options()) as plan:
        assert [(action, file.object_name) for action, file in plan] == [('copy', f.object_name) for f in files[1:]]
        assert plan.notes == ["1 of the batch's 3 files at the source were at the target already"]
    with ms.plan_archive(world.settings, source, disk_id, 'all_images', delete_originals=True,
                         options=world.options()) as plan:
        assert [action for action, _ in plan] == ['prove the archive copy and delete', 'archive and delete',
                                                 'archive and delete']
    assert plan.frame.reader.closed, 'a closed plan keeps no connection open'
    assert len(world.rows(disk_id)) == 1 and len(files_under(disk / 'archive')) == 1


def test_an_unknown_crash_point_is_refused(world):
    result = world.cli('info', env={'MITWELTEN_CRASH_AT': 'after-lunch:1'})
    assert result.returncode == 2
    assert "MITWELTEN_CRASH_AT='after-lunch:1'" in result.stderr and 'after-commit' in result.stderr


def test_the_service_refuses_an_unknown_fault_point_too(world, issuer):
    import subprocess
    import sys
    from conftest import ROOT
    result = subprocess.run([sys.executable, str(ROOT / 'mitwelten_service.py'), '--port', '1'],
                            env={**world.env, 'MITWELTEN_FAULT_AT': 'fsnyc:2', 'MITWELTEN_OIDC_ISSUER': issuer.url,
                                 'MITWELTEN_OIDC_AUDIENCE': issuer.audience},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MITWELTEN_FAULT_AT='fsnyc:2'" in result.stderr and 'rename' in result.stderr
    assert 'Traceback' not in result.stderr


def test_bad_network_settings_are_named(world):
    result = world.cli('info', env={'MITWELTEN_READ_TIMEOUT': 'soon'})
    assert result.returncode == 2 and "MITWELTEN_READ_TIMEOUT='soon' is not a number" in result.stderr
    result = world.cli('info', env={'MITWELTEN_ATTEMPTS': '0'})
    assert result.returncode == 2 and "MITWELTEN_ATTEMPTS='0' must be at least 1" in result.stderr


def sections(source: str) -> dict[str, str]:
    """The module's sections, by their banner's title."""
    parts = re.split(r'^# =+\n# (.+)\n# =+\n', source, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_file_keeps_its_layout():
    """Printing happens in the command line only; backends are used by capability, never by
    class; the sections come in the order the docstring gives; no package shadows the module."""
    source = (ROOT / 'mitwelten_storage.py').read_text()
    found = sections(source)
    assert list(found) == ['Errors', 'Test hooks', 'Configuration', 'Catalog', 'Backends',
                           'Versions (the original is type 0)',
                           'Runs: options, progress, log file, interruption, faults, the frame of a batch run',
                           'The model process', "The storage service's client (--via URL)", 'Operations',
                           'Command line']
    for title, text in found.items():
        if title != 'Command line':
            assert not re.search(r'(?<![.\w])print\(', text), title
            assert 'tqdm' not in text.replace('tqdm is imported by', ''), title
        if title != 'Backends':
            assert not re.search(r'isinstance\([^)]*(LocalBackend|S3Backend)', text), title
    assert not (ROOT / 'mitwelten_storage').exists()
    # Every error the tool reports is defined in the Errors section, and carries its problem type
    # there: the service's table and the client's are derived from the classes.
    for title, text in found.items():
        if title != 'Errors':
            assert not re.search(r'^class \w+\((\w*Error|\w*Failure|Refusal|NotFound|Exception)\)', text, re.M), title
    assert all(hasattr(ms, name) for name in ms.__all__)
    assert set(ms.SERVICE_PROBLEMS.values()) >= {ms.TooFewCopies, ms.ChecksumMismatch, ms.CatalogUnavailable}
    main_source = re.search(r'^def main\(.*?(?=^\S)', found['Command line'], re.M | re.S).group(0)
    assert len(main_source.strip().splitlines()) <= 8, 'main stays a few lines: each command is its own function'
    for rule in range(1, 9):
        assert f'\n    {rule}. ' in ms.__doc__


# --- one file at a time: what the service calls -----------------------------------------------------

@pytest.fixture
def one_file(world):
    """An image on the active bucket, an archive disk, and the catalog that knows both."""
    bucket = world.new_bucket()
    active = world.create_s3_backend(bucket)
    archive, disk = world.create_local_backend()
    image, = world.images_on_s3(1, active, width=2400, height=1800)
    conn = ms.connect_catalog(world.settings)
    yield bucket, active, archive, disk, image, conn, ms.BackendCache(world.settings)
    conn.close()


def test_record_archived_inserts_once_and_refuses_what_it_should(world, one_file):
    bucket, active, archive, disk, image, conn, backends = one_file
    record = lambda storage_id, sha: ms.record_archived(conn, 'image', image.file_id, storage_id, sha)
    with pytest.raises(ms.InvalidArchive, match="not the catalog's sha256"):
        record(archive, '0' * 64)
    with pytest.raises(ms.InvalidArchive, match='not an archive backend'):
        record(active, image.sha256)
    with pytest.raises(ms.NotFound) as missing:
        record(999, image.sha256)
    assert missing.value.subject == 'backend'
    with pytest.raises(ms.NotFound) as unknown:
        ms.record_archived(conn, 'image', 424242, archive, image.sha256)
    assert unknown.value.subject == 'file'
    assert world.rows(archive) == {}
    assert record(archive, image.sha256.upper()).outcome == 'created'
    state = record(archive, image.sha256)
    assert state.outcome == 'exists' and world.rows(archive) == {image.file_id: 0}
    assert [(h['storage_id'], h['type']) for h in state.as_dict()['rows']] == [(active, 0), (archive, 0)]
    world.query('UPDATE mm_files_image_storage SET type = 10 WHERE storage_id = %s', (archive,))
    with pytest.raises(ms.VersionConflict):
        record(archive, image.sha256)


def test_make_version_in_place_needs_copies_then_replaces_once(world, one_file):
    bucket, active, archive, disk, image, conn, backends = one_file
    make = lambda: ms.make_version_in_place(conn, backends, 'image', image.file_id, 1, min_copies=1)
    with pytest.raises(ms.TooFewCopies, match='0 sound originals'):
        make()
    assert bucket_keys(world, bucket) == {image.object_name}
    world.query('INSERT INTO mm_files_image_storage (file_id, storage_id, type) VALUES (%s, %s, 0)',
                (image.file_id, archive))
    state = make()
    webp = image.object_name.replace('.jpg', '.webp')
    assert state.outcome == 'replaced' and state.active.type == 1
    assert bucket_keys(world, bucket) == {webp}
    assert world.rows(active) == {image.file_id: 1}
    assert make().outcome == 'already replaced' and bucket_keys(world, bucket) == {webp}
    with pytest.raises(ms.VersionConflict, match='holds version 1'):
        ms.make_version_in_place(conn, backends, 'image', image.file_id, 2)


def test_make_version_in_place_of_an_unmakeable_version_changes_nothing(world, one_file):
    bucket, active, archive, disk, image, conn, backends = one_file
    world.s3.put_object(Bucket=bucket, Key=image.object_name, Body=image.data)
    truncated = image.data[:len(image.data) // 2]
    world.query('UPDATE files_image SET sha256 = %s, file_size = %s WHERE file_id = %s',
                (ms.hashlib.sha256(truncated).hexdigest(), len(truncated), image.file_id))
    world.s3.put_object(Bucket=bucket, Key=image.object_name, Body=truncated)
    world.query('INSERT INTO mm_files_image_storage (file_id, storage_id, type) VALUES (%s, %s, 0)',
                (image.file_id, archive))
    with pytest.raises(ms.ConversionError, match='image file is truncated'):
        ms.make_version_in_place(conn, backends, 'image', image.file_id, 1)
    assert bucket_keys(world, bucket) == {image.object_name} and world.rows(active) == {image.file_id: 0}


def test_an_original_gone_before_its_row_changed_is_finished_by_the_next_request(world, one_file):
    """The original deleted, the row not yet changed (as an earlier tool left it when cut
    off): the repeat finds the version in place and only corrects the row."""
    bucket, active, archive, disk, image, conn, backends = one_file
    world.query('INSERT INTO mm_files_image_storage (file_id, storage_id, type) VALUES (%s, %s, 0)',
                (image.file_id, archive))
    version = ms.VERSIONS[('image', 1)]
    record = ms.CatalogFile(image.file_id, image.object_name, len(image.data), image.sha256)
    webp = version.object_name(image.object_name)
    world.s3.put_object(Bucket=bucket, Key=webp, Body=version.make(image.data, record))
    world.s3.delete_object(Bucket=bucket, Key=image.object_name)
    assert ms.make_version_in_place(conn, backends, 'image', image.file_id, 1).outcome == 'replaced'
    assert world.rows(active) == {image.file_id: 1} and bucket_keys(world, bucket) == {webp}


def test_delete_original_checks_if_match_and_copies(world, one_file):
    bucket, active, archive, disk, image, conn, backends = one_file
    delete = lambda sha, copies=1: ms.delete_original(conn, backends, 'image', image.file_id, sha, copies)
    with pytest.raises(ms.OriginalChanged):
        delete('0' * 64)
    with pytest.raises(ms.TooFewCopies):
        delete(image.sha256)
    world.query('INSERT INTO mm_files_image_storage (file_id, storage_id, type) VALUES (%s, %s, 0)',
                (image.file_id, archive))
    with pytest.raises(ms.TooFewCopies, match='1 sound originals'):
        delete(image.sha256, copies=2)
    assert bucket_keys(world, bucket) == {image.object_name}
    assert delete(image.sha256).outcome == 'deleted'
    assert bucket_keys(world, bucket) == set() and world.rows(active) == {}
    with pytest.raises(ms.NotFound) as gone:
        delete(image.sha256)
    assert gone.value.subject == 'original'


def test_two_requests_for_one_file_at_once_never_both_act(world, one_file):
    """Row locks: two connections (as two service processes would have) ask for the same
    replacement at the same moment; one replaces, the other waits and finds it done."""
    bucket, active, archive, disk, image, conn, backends = one_file
    world.query('INSERT INTO mm_files_image_storage (file_id, storage_id, type) VALUES (%s, %s, 0)',
                (image.file_id, archive))
    outcomes, start = [], threading.Barrier(2)

    def request():
        own = ms.connect_catalog(world.settings)
        try:
            start.wait()
            outcomes.append(ms.make_version_in_place(own, ms.BackendCache(world.settings), 'image', image.file_id, 2)
                            .outcome)
        finally:
            own.close()
    threads = [threading.Thread(target=request) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ['already replaced', 'replaced']
    assert world.rows(active) == {image.file_id: 2}


def test_active_original_names_why_it_cannot_be_read(world, one_file):
    bucket, active, archive, disk, image, conn, backends = one_file
    file, backend = ms.active_original(conn, backends, 'image', image.file_id)
    assert file.sha256 == image.sha256 and backend.row.storage_id == active
    assert b''.join(ms.CheckedStream(backend.read(file.object_name), file)) == image.data
    world.query('DELETE FROM mm_files_image_storage WHERE storage_id = %s', (active,))
    with pytest.raises(ms.NotFound) as offline:
        ms.active_original(conn, backends, 'image', image.file_id)
    assert offline.value.subject == 'original' and 'no longer online' in str(offline.value)


def test_one_file_copy_and_archive(world, one_file):
    bucket, active, archive, disk, image, conn, backends = one_file
    state = ms.copy_file(world.settings, 'image', image.file_id, active, archive)
    assert state.outcome == 'copied' and (disk / 'archive' / image.object_name).read_bytes() == image.data
    assert ms.copy_file(world.settings, 'image', image.file_id, active, archive).outcome == 'exists'
    state = ms.archive_file(world.settings, 'image', image.file_id, active, archive, replace_with=2)
    assert state.outcome == 'replaced' and state.active.type == 2
    assert world.rows(active) == {image.file_id: 2} and world.rows(archive) == {image.file_id: 0}
