"""The fixity log (storage_fixity): rows appended by copy and verify with the run's commits; rule 8
for copy's source (a copy found damaged is never read); scrubs that finish (least recently
checked first, --not-checked-within, --max-files, --max-time); `info --due`; and the disk's
SQLite index carrying each file's last check. Each test computes the truth itself: which copies
it wrote, damaged or backdated, and so which rows, order and counts must follow."""

from __future__ import annotations

import json
import signal
import sqlite3
import time

import pytest

import mitwelten_storage as ms

COLUMNS = 'file_group, file_id, storage_id, type, outcome, event, agent, detail'


def fixity(world, where: str = 'TRUE', params=()) -> list[tuple]:
    return world.query(f'SELECT {COLUMNS} FROM storage_fixity WHERE {where} ORDER BY check_id', params)


def verify_rows(world, storage_id: int) -> list[tuple]:
    """(file_id, outcome) of verify's rows on the backend, in the order they were appended."""
    return [(r[1], r[4]) for r in fixity(world, "storage_id = %s AND event = 'verify'", (storage_id,))]


def backdate(world, storage_id: int, file_id: int, days: float, group: str = 'image') -> None:
    """The copy was written a day before `days` ago and last checked `days` ago (counted from the
    world's fixed moment, so that equal ages are equal times: ties)."""
    world.query(f"UPDATE mm_files_{group}_storage SET created_at = %s::timestamptz - interval '1 day' * %s "
                'WHERE storage_id = %s AND file_id = %s', (moment(world), days + 1, storage_id, file_id))
    world.query("UPDATE storage_fixity SET checked_at = %s::timestamptz - interval '1 day' * %s "
                'WHERE file_group = %s AND storage_id = %s AND file_id = %s',
                (moment(world), days, group, storage_id, file_id))


def moment(world):
    if not hasattr(world, 'moment'):
        world.moment = world.query('SELECT now()')[0][0]
    return world.moment


def never_checked(world, storage_id: int, file_id: int, group: str = 'image') -> None:
    """A copy of the earlier script's: no time of writing recorded, no check logged."""
    world.query(f'UPDATE mm_files_{group}_storage SET created_at = NULL WHERE storage_id = %s AND file_id = %s',
                (storage_id, file_id))
    world.query('DELETE FROM storage_fixity WHERE file_group = %s AND storage_id = %s AND file_id = %s',
                (group, storage_id, file_id))


def damage(disk, file) -> None:
    """Bytes overwritten on the disk, the size kept: only reading and hashing finds it."""
    path = disk / 'archive' / file.object_name
    data = bytearray(path.read_bytes())
    data[200:264] = bytes(64)
    path.write_bytes(bytes(data))


def on_disk(world, count: int = 6):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend(label='Archive 07')
    files = world.images_on_s3(count, source)
    assert world.copy(source, disk_id).count('copied') == count
    return source, disk_id, disk, files


# --- rows appended by copy and verify ---------------------------------------------------------------

def test_copy_appends_an_ok_row_per_copy_written_in_the_commit_that_records_it(world):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    images = world.images_on_s3(5, source)
    recordings = world.recordings_on_s3(2, source)
    assert world.copy(source, disk_id).counts == {'copied': 5}
    assert world.copy(source, disk_id, 'all_audio', version_type=1).counts == {'made': 2}

    agent = ms.fixity_agent()
    assert agent.startswith(f'mitwelten-storage {ms.__version__} ') and '@' in agent
    expected = sorted([('image', f.file_id, disk_id, 0, 'ok', 'copy', agent, f'copied from backend {source}')
                       for f in images] +
                      [('audio', f.file_id, disk_id, 1, 'ok', 'copy', agent, f'made from the original at backend {source}')
                       for f in recordings])
    assert sorted(fixity(world)) == expected
    # Each row went in with the catalog row of its copy: one transaction, so one now().
    for group in ('image', 'audio'):
        unmatched = world.query(f"SELECT s.file_id FROM mm_files_{group}_storage s JOIN storage_fixity x "
                                f"ON x.file_group = '{group}' AND x.file_id = s.file_id AND x.storage_id = s.storage_id "
                                'WHERE s.storage_id = %s AND x.checked_at <> s.created_at', (disk_id,))
        assert unmatched == []
    assert world.copy(source, disk_id).counts == {}          # nothing left to do: no row either
    assert len(fixity(world)) == 7


def test_a_copy_killed_before_its_commit_logs_nothing_and_a_copy_found_at_the_target_is_logged_as_found(world):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    files = world.images_on_s3(6, source)
    killed = world.cli('copy', '-s', source, '-t', disk_id, 'all_images', '--jobs', 2,
                       env={'MITWELTEN_CRASH_AT': 'after-write:3'})
    assert killed.returncode == -signal.SIGKILL
    assert world.rows(disk_id) == {} and fixity(world) == []      # nothing recorded, nothing logged
    placed = disk / 'archive' / files[0].object_name               # written by a run killed before its commit
    placed.parent.mkdir(parents=True, exist_ok=True)
    placed.write_bytes(files[0].data)
    report = world.copy(source, disk_id)
    assert report.exit_status == 0 and report.count('found') >= 1
    rows = fixity(world)
    assert sorted(r[1] for r in rows) == sorted(f.file_id for f in files) and {r[4] for r in rows} == {'ok'}
    found = [r[1] for r in rows if r[7] == 'found written by an earlier run, read back and checked']
    assert len(found) == report.count('found') and files[0].file_id in found


def test_the_one_file_copy_logs_its_check(world):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    image, = world.images_on_s3(1, source)
    assert ms.copy_file(world.settings, 'image', image.file_id, source, disk_id).outcome == 'copied'
    assert [r[:6] for r in fixity(world)] == [('image', image.file_id, disk_id, 0, 'ok', 'copy')]


def test_verify_appends_ok_missing_and_corrupt_and_nothing_for_what_it_could_not_check(world):
    source, disk_id, disk, files = on_disk(world, 6)
    recordings = world.recordings_on_s3(2, source)
    assert world.copy(source, disk_id, 'all_audio', version_type=10).counts == {'made': 2}
    corrupt, missing, odd = files[1], files[3], files[5]
    damage(disk, corrupt)
    (disk / 'archive' / missing.object_name).unlink()
    world.query('UPDATE mm_files_image_storage SET type = 7 WHERE storage_id = %s AND file_id = %s',
                (disk_id, odd.file_id))         # a version this tool does not know: 'unchecked', not a check
    (disk / 'archive' / 'stray.txt').write_text('unknown to the catalog')
    before = len(fixity(world))

    report = world.verify(disk_id)
    assert report.exit_status == 1
    assert report.found['unchecked'][0][0] == odd.object_name and 'stray.txt' in dict(report.found['unknown'])
    rows = fixity(world, "event = 'verify'")
    assert len(fixity(world)) == before + len(rows)
    agent = ms.fixity_agent()
    truth = {('image', f.file_id, 0, 'ok') for f in files if f not in (corrupt, missing, odd)}
    truth |= {('audio', f.file_id, 10, 'ok') for f in recordings}
    truth |= {('image', corrupt.file_id, 0, 'corrupt'), ('image', missing.file_id, 0, 'missing')}
    assert {(r[0], r[1], r[3], r[4]) for r in rows} == truth and len(rows) == len(truth)
    assert all(r[2] == disk_id and r[5] == 'verify' and r[6] == agent for r in rows)
    assert next(r[7] for r in rows if r[1] == corrupt.file_id and r[0] == 'image').startswith('sha256')
    assert report.checks_logged == len(truth)
    # Batched: the rows went in with a commit per group every 500 rows or 5 seconds (each commit one
    # now()), not a commit per file: the 6 image rows of this short run in one commit, or two if slow.
    commits = dict(world.query("SELECT file_group, count(DISTINCT checked_at) FROM storage_fixity "
                               "WHERE event = 'verify' GROUP BY file_group"))
    assert commits['audio'] == 1 and commits['image'] <= 2


def test_verify_with_a_catalog_it_may_only_read_checks_and_says_the_checks_were_not_logged(world, readonly_dsn):
    source, disk_id, disk, files = on_disk(world, 4)
    before = fixity(world)
    result = world.cli('verify', disk_id, env={'MITWELTEN_DB': readonly_dsn})
    assert result.returncode == 0, result.stdout + result.stderr
    assert '4 files sound' in result.stdout and 'Traceback' not in result.stderr
    assert ('note: 4 checks were done but not logged in the fixity log (storage_fixity): this catalog role may not '
            'append to it: a role granted INSERT on storage_fixity keeps them') in result.stdout
    assert result.stderr.count('this catalog role may not append to the fixity log') == 1
    assert fixity(world) == before


def test_a_role_granted_its_rights_before_the_log_existed_copies_and_records_as_before(world, services):
    """Production roles granted on the tables of the day: none on storage_fixity, made later."""
    import uuid
    import psycopg2
    import psycopg2.extensions
    source, disk_a, disk, files = on_disk(world, 3)
    disk_b, other = world.create_local_backend(label='b')
    role = f'mw_writer_{uuid.uuid4().hex[:8]}'
    admin = psycopg2.connect(services.pg_dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE ROLE {role} LOGIN')
            cur.execute(f'GRANT USAGE ON SCHEMA "{world.schema}" TO {role}')
            cur.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{world.schema}" TO {role}')
            cur.execute(f'REVOKE ALL ON "{world.schema}".storage_fixity FROM {role}')
        params = psycopg2.extensions.parse_dsn(services.pg_dsn)
        params['user'] = role
        dsn = ' '.join(f'{k}={v}' for k, v in params.items())
        before = fixity(world)
        result = world.cli('copy', '-s', disk_a, '-t', disk_b, 'all_images', env={'MITWELTEN_DB': dsn})
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr.count('this catalog role may not read the fixity log (storage_fixity)') == 1
        assert world.rows(disk_b) == {f.file_id: 0 for f in files} and fixity(world) == before
        with admin.cursor() as cur:
            cur.execute(f'GRANT SELECT ON "{world.schema}".storage_fixity TO {role}')
        world.query('DELETE FROM mm_files_image_storage WHERE storage_id = %s', (disk_b,))
        result = world.cli('copy', '-s', disk_a, '-t', disk_b, 'all_images', env={'MITWELTEN_DB': dsn})
        assert result.returncode == 0, result.stdout + result.stderr
        assert 'copies written are recorded all the same, but checks are not logged' in result.stderr
        assert world.rows(disk_b) == {f.file_id: 0 for f in files} and fixity(world) == before
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP OWNED BY {role}')
            cur.execute(f'DROP ROLE {role}')
        admin.close()


def test_without_the_fixity_log_copy_verify_scrubs_and_info_work_as_before_and_say_so_once(world):
    world.query('DROP TABLE storage_fixity')
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    other_id, other = world.create_local_backend(label='other')
    files = world.images_on_s3(4, source)
    note = 'note: the catalog has no fixity log (storage_fixity): `init-db` would create it'
    for args in (('copy', '-s', source, '-t', disk_id, 'all_images'),
                 ('copy', '-s', disk_id, '-t', other_id, 'all_images'),
                 ('verify', disk_id),
                 ('verify', disk_id, '--not-checked-within', 0, '--max-files', 3),
                 ('info', '--due')):
        result = world.cli(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert result.stderr.count(note) == 1, (args, result.stderr)
    assert world.rows(other_id) == {f.file_id: 0 for f in files}
    assert 'copies remain due' in world.cli('verify', disk_id, '--not-checked-within', 0, '--max-files', 1).stdout
    report = world.verify(disk_id)
    assert report.exit_status == 0 and report.count('sound') == 4 and report.checks_logged == 0
    world.query('UPDATE mm_files_image_storage SET created_at = NULL WHERE file_id = %s', (files[2].file_id,))
    due = {e['storage_id']: e for e in ms.due_checks(world.settings, 30)}
    assert (due[disk_id]['copies'], due[disk_id]['due'], due[disk_id]['never_checked']) == (4, 1, 1)
    assert ms.write_report(world.settings, disk_id).index_rows['files_image'] == 4


# --- rule 8: a damaged copy is never a source ---------------------------------------------------------

def test_a_copy_found_damaged_is_not_a_source_until_written_again(world):
    source, disk_a, disk, files = on_disk(world, 5)
    disk_b, other = world.create_local_backend(label='Archive 08')
    corrupt, missing = files[1], files[2]
    damage(disk, corrupt)
    (disk / 'archive' / missing.object_name).unlink()
    assert world.verify(disk_a).exit_status == 1          # the check finds them and logs it

    plan = ms.plan_copy(world.settings, disk_a, disk_b, 'all_images', options=world.options())
    assert sorted(f.file_id for _, f in plan) == sorted(f.file_id for f in files if f not in (corrupt, missing))
    assert any(note.startswith("2 files skipped: the source's copy was found damaged") for note in plan.notes)
    report = world.copy(disk_a, disk_b)
    assert report.exit_status == 0 and report.counts == {'copied': 3}
    assert any(note.startswith("2 files skipped: the source's copy was found damaged (missing or corrupt) by its "
                               'last check: copy them from another backend') for note in report.notes)
    assert set(world.rows(disk_b)) == {f.file_id for f in files} - {corrupt.file_id, missing.file_id}
    # Versions are not made from a damaged original either.
    bucket_id = world.create_s3_backend(priority=1)
    assert world.copy(disk_a, bucket_id, version_type=10).counts == {'made': 3}
    # The one-file copy refuses it by name.
    with pytest.raises(ms.DamagedCopy, match='found corrupt: copy it from another backend'):
        ms.copy_file(world.settings, 'image', corrupt.file_id, disk_a, disk_b)

    # verify --fix removes the rows; copied back from the bucket, the copies count again.
    assert world.verify(disk_a, fix=True).removed is not None
    assert world.copy(source, disk_a).counts == {'copied': 2}
    assert world.copy(disk_a, disk_b).counts == {'copied': 2}
    assert world.rows(disk_b) == {f.file_id: 0 for f in files}
    assert {p.name for p in (other / 'archive').rglob('*.jpg')} == {f.object_name.rsplit('/', 1)[1] for f in files}
    for f in files:
        assert (other / 'archive' / f.object_name).read_bytes() == f.data
    assert ms.sound_originals_elsewhere(world.conn, ms.GROUPS['image'], [corrupt.file_id], source) == \
        {corrupt.file_id: 2}


def test_a_damaged_copy_checked_before_it_was_written_again_does_not_count_against_it(world):
    """A damaged row older than the copy's storage row speaks of an earlier copy."""
    source, disk_a, disk, files = on_disk(world, 2)
    disk_b, _ = world.create_local_backend(label='b')
    world.query("INSERT INTO storage_fixity (file_group, file_id, storage_id, type, outcome, event, agent, checked_at) "
                "VALUES ('image', %s, %s, 0, 'corrupt', 'verify', 'test', now() - interval '3 days')",
                (files[0].file_id, disk_a))
    assert world.copy(disk_a, disk_b).counts == {'copied': 2}


# --- scrubs ---------------------------------------------------------------------------------------------

def aged_disk(world, ages: list):
    """A disk whose copies were last checked `ages` days ago (None: never checked)."""
    source, disk_id, disk, files = on_disk(world, len(ages))
    for f, age in zip(files, ages):
        if age is None:
            never_checked(world, disk_id, f.file_id)
        else:
            backdate(world, disk_id, f.file_id, age)
    return source, disk_id, disk, files


def slice_of(world, storage_id: int, **budget) -> tuple[ms.VerifyReport, dict]:
    """One slice of a scrub, and the checks it logged: {file_id: outcome}."""
    before = len(verify_rows(world, storage_id))
    report = world.verify(storage_id, **budget)
    return report, dict(verify_rows(world, storage_id)[before:])


def test_a_scrub_checks_the_least_recently_checked_first_and_slices_cover_the_disk(world):
    ages = [10, None, 400, 100, 100, 30, None, 5]
    source, disk_id, disk, files = aged_disk(world, ages)
    # The truth: never checked first, then the oldest last check first; ties (two never checked,
    # two checked 100 days ago to the microsecond) by file.
    order = sorted(range(len(files)), key=lambda i: (ages[i] is not None, -(ages[i] or 0), files[i].file_id))
    truth = [files[i].file_id for i in order]
    assert truth[2:5] == [files[2].file_id, files[3].file_id, files[4].file_id]

    first, checked = slice_of(world, disk_id, max_files=4)      # ends between the two of a tie
    assert first.exit_status == 0 and first.count('sound') == 4
    assert set(checked) == set(truth[:4]) and set(checked.values()) == {'ok'}
    assert (first.remaining, first.budget_spent) == (4, '--max-files 4')
    second, checked = slice_of(world, disk_id, max_files=4)
    assert set(checked) == set(truth[4:]) and second.remaining == 4
    # Every copy checked once in two slices; the third starts the round again with the first slice's.
    third, checked = slice_of(world, disk_id, max_files=4)
    assert set(checked) == set(truth[:4])
    assert sorted(fid for fid, _ in verify_rows(world, disk_id)) == sorted(truth + truth[:4])

    result = world.cli('verify', disk_id, '--max-files', 5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'stopped at its budget (--max-files 5): no new file was started after it' in result.stdout
    assert '3 copies were not reached by this slice: the next one starts with them' in result.stdout
    assert 'unknown files are looked for on a full pass' in result.stdout
    full = world.cli('verify', disk_id, '--max-files', 8)
    assert full.returncode == 0 and 'every copy selected was checked' in full.stdout
    assert 'stopped at its budget' not in full.stdout


def test_not_checked_within_checks_only_the_copies_due_and_says_how_many_remain(world):
    ages = [10, None, 400, 100, 45, 5]
    source, disk_id, disk, files = aged_disk(world, ages)
    due = {f.file_id for f, age in zip(files, ages) if age is None or age > 30}
    damage(disk, files[3])            # due, and found corrupt by the scrub: checked, so no longer due
    result = world.cli('verify', disk_id, '--not-checked-within', 30, '--max-files', 3)
    assert result.returncode == 1, result.stdout                       # a corrupt file is a failure
    assert '1 copy remains due (not checked within 30 days): run the same command again' in result.stdout
    checked = dict(verify_rows(world, disk_id))
    assert checked == {files[1].file_id: 'ok', files[2].file_id: 'ok', files[3].file_id: 'corrupt'}
    last, checked = slice_of(world, disk_id, not_checked_within=30)
    assert last.exit_status == 0 and checked == {files[4].file_id: 'ok'} and last.remaining == 0
    assert {fid for fid, _ in verify_rows(world, disk_id)} == due
    again = world.cli('verify', disk_id, '--not-checked-within', 30)
    assert again.returncode == 0 and 'no copies remain due: all were checked within 30 days' in again.stdout
    assert len(verify_rows(world, disk_id)) == len(due)


def test_max_time_starts_no_file_after_the_budget_and_logs_the_files_in_flight(world, monkeypatch):
    source, disk_id, disk, files = on_disk(world, 12)
    started = []
    real = ms.verify_file

    def slow(backend, held, progress):          # a slow disk: a second a file
        started.append(held.file.file_id)
        time.sleep(1.0)
        return real(backend, held, progress)
    monkeypatch.setattr(ms, 'verify_file', slow)
    report = world.verify(disk_id, max_minutes=0.05, jobs=2)       # 3 seconds: about six files
    assert report.exit_status == 0 and report.failures == []
    assert 1 <= len(started) < 12
    # Every file started was finished and logged; the rest are left for the next slice.
    assert sorted(fid for fid, outcome in verify_rows(world, disk_id) if outcome == 'ok') == sorted(started)
    assert report.count('sound') == len(started)
    assert report.remaining == 12 - len(started) and report.budget_spent == '--max-time 0.05'


def test_verify_options_are_checked(world):
    source, disk_id, disk, files = on_disk(world, 1)
    for args in (('--max-files', 0), ('--max-time', 0), ('--not-checked-within', -1), ('--max-time', 'soon')):
        result = world.cli('verify', disk_id, *args)
        assert result.returncode == 2 and 'error' in result.stderr, args


# --- info --due -------------------------------------------------------------------------------------------

def test_info_due_counts_per_backend_what_is_due_and_since_when_it_was_checked_in_full(world):
    ages = [10, 400, 100, 45, 5]
    source, disk_id, disk, files = aged_disk(world, ages)
    fresh_id, fresh = world.create_local_backend(label='fresh')
    assert world.copy(source, fresh_id).count('copied') == 5
    fs2 = [f for f in files if f.node_label == '1874-8542']
    assert fs2 == [files[1], files[4]]              # the sample cameras take turns: 0344, 1874, 6444, …
    damage(disk, files[1])
    world.verify(disk_id, 'fs2_images')             # files[1] (found corrupt) and files[4] checked now
    ages_now = [10, 0, 100, 45, 0]

    result = world.cli('info', '--due', '--every', 90, '--json')
    assert result.returncode == 0, result.stderr
    listing = {e['storage_id']: e for e in json.loads(result.stdout)}
    entry = listing[disk_id]
    assert (entry['copies'], entry['every_days'], entry['never_checked'], entry['damaged']) == (5, 90, 0, 1)
    assert entry['due'] == sum(age > 90 for age in ages_now) == 1
    assert entry['oldest_check'] == entry['checked_in_full']
    oldest = world.query('SELECT extract(epoch FROM %s::timestamptz - %s::timestamptz) / 86400',
                         (moment(world), entry['oldest_check']))[0][0]
    assert abs(float(oldest) - max(ages_now)) < 1e-6
    assert entry['online'] is True and entry['notes'] == 'Archive 07'
    assert (listing[fresh_id]['copies'], listing[fresh_id]['due'], listing[fresh_id]['damaged']) == (5, 0, 0)
    assert (listing[source]['copies'], listing[source]['due'], listing[source]['never_checked']) == (5, 0, 0)

    never_checked(world, fresh_id, files[2].file_id)
    entry = next(e for e in ms.due_checks(world.settings, 90) if e['storage_id'] == fresh_id)
    assert (entry['due'], entry['never_checked'], entry['checked_in_full']) == (1, 1, None)
    assert entry['oldest_check'] is not None

    text = world.cli('info', '--due', '--every', 90)
    assert text.returncode == 0, text.stderr
    assert 'copies due a check: last checked more than 90 days ago, or never' in text.stdout
    assert f'backend {disk_id} (Archive 07): 1 copy due: verify {disk_id} --not-checked-within 90' in text.stdout
    assert f'backend {disk_id}: 1 copy found missing or corrupt by their last check, counting for nothing: ' \
           f'verify {disk_id} --fix, then copy them back' in text.stdout
    assert world.cli('info', '--due', '--batches').returncode == 2


def test_info_due_defaults_to_a_year(world):
    source, disk_id, disk, files = aged_disk(world, [400, 200, None])
    entry = next(e for e in ms.due_checks(world.settings) if e['storage_id'] == disk_id)
    assert (entry['every_days'], entry['due'], entry['never_checked'], entry['checked_in_full']) == (365, 2, 1, None)
    assert entry['oldest_check'] is not None


# --- the disk's index ------------------------------------------------------------------------------------

def test_the_disk_index_carries_each_files_last_check(world):
    source, disk_id, disk, files = on_disk(world, 4)
    assert [f.node_label == '1874-8542' for f in files] == [False, True, False, False]
    backdate(world, disk_id, files[0].file_id, 200)
    damage(disk, files[1])
    world.verify(disk_id, 'fs2_images')                  # files[1]: corrupt
    never_checked(world, disk_id, files[3].file_id)
    world.verify(disk_id, not_checked_within=100)        # files[0] and files[3]: due
    truth = {}
    for f in files:
        outcome, checked_at, event = world.query(
            'SELECT outcome, checked_at, event FROM storage_fixity WHERE storage_id = %s AND file_id = %s '
            'ORDER BY checked_at DESC, check_id DESC LIMIT 1', (disk_id, f.file_id))[0]
        truth[f.object_name] = (checked_at.isoformat(), outcome, event)
    assert [truth[f.object_name][1:] for f in files] == [('ok', 'verify'), ('corrupt', 'verify'), ('ok', 'copy'),
                                                         ('ok', 'verify')]
    assert ms.write_report(world.settings, disk_id).index_rows['files_image'] == 4
    index = sqlite3.connect(disk / 'archive_index.db')
    rows = {name: (checked_at, outcome, event) for name, checked_at, outcome, event in
            index.execute('SELECT object_name, checked_at, outcome, check_event FROM files_image')}
    index.close()
    assert rows == truth
    assert 'SELECT min(checked_at) FROM files_image' in (disk / 'REPORT.md').read_text()
