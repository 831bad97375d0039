"""coverage and whereis: is every original safe, and where is each copy? Against a world whose
truth the test sets up copy by copy and counts itself: files with 0, 1, 2, 3 and 4 sound copies
of the original, a gzip copy that counts, a copy a check found corrupt that does not (and an
older finding about an earlier copy that is ignored), a copy never checked, a backdated check,
and an original held only on a disk that is not mounted."""

from __future__ import annotations

import collections
import datetime as dt
import json
import re
import shutil
import subprocess
import types
from html.parser import HTMLParser

import pytest

import mitwelten_storage as ms

UTC = dt.timezone.utc
OLD_CHECK = dt.datetime(2020, 3, 4, 5, 6, 7, tzinfo=UTC)


def bucket_of(n: int) -> str:
    return '3+' if n >= 3 else str(n)


@pytest.fixture
def safe_world(world):
    """Eight images and two recordings, copied for real (S3 → disk 1, gzip onto a second bucket),
    then arranged so that each image has a known set of sound copies of its original."""
    w = world
    active = w.create_s3_backend(priority=0)
    gzips = w.create_s3_backend(priority=1)
    disk1, root1 = w.create_local_backend(label='Archive 01')
    disk2, root2 = w.create_local_backend(label='Archive 02')
    disk3, root3 = w.create_local_backend(label='Archive 03')
    images = w.images_on_s3(8, active)
    recordings = w.recordings_on_s3(2, active)
    assert w.copy(active, disk1).count('copied') == 8
    assert w.copy(active, gzips, version_type=10).count('made') == 8
    i = images

    def rows(sql, *params):
        return w.query(sql, params)

    # i0: nothing sound left: a WebP in the original's place online, the gzip gone, and the disk
    # copy found corrupt by a check (newer than the copy's row, as `verify` appends it).
    rows('UPDATE mm_files_image_storage SET type = 1 WHERE file_id = %s AND storage_id = %s', i[0].file_id, active)
    rows('DELETE FROM mm_files_image_storage WHERE file_id = %s AND storage_id = %s', i[0].file_id, gzips)
    rows("INSERT INTO storage_fixity (file_group, file_id, storage_id, type, checked_at, outcome, event, agent, detail) "
         "VALUES ('image', %s, %s, 0, now() + interval '1 second', 'corrupt', 'verify', 'test', 'sha256 differs')",
         i[0].file_id, disk1)
    # i1: only the active bucket's original.
    rows('DELETE FROM mm_files_image_storage WHERE file_id = %s AND storage_id IN (%s, %s)', i[1].file_id, disk1, gzips)
    # i2: two; a corrupt finding older than the disk copy's row speaks of an earlier copy: ignored.
    rows('DELETE FROM mm_files_image_storage WHERE file_id = %s AND storage_id = %s', i[2].file_id, gzips)
    rows("INSERT INTO storage_fixity (file_group, file_id, storage_id, type, checked_at, outcome, event, agent) "
         "SELECT 'image', file_id, storage_id, 0, created_at - interval '1 day', 'corrupt', 'verify', 'test' "
         'FROM mm_files_image_storage WHERE file_id = %s AND storage_id = %s', i[2].file_id, disk1)
    # i3: three, the gzip among them. i4: four (disk 2 too). i6: four, disk 2's never checked.
    rows('INSERT INTO mm_files_image_storage (file_id, storage_id, type, created_at) VALUES (%s, %s, 0, now())',
         i[4].file_id, disk2)
    rows('INSERT INTO mm_files_image_storage (file_id, storage_id, type, created_at) VALUES (%s, %s, 0, NULL)',
         i[6].file_id, disk2)
    # i5: only on disk 3, which is then unplugged (its folder moved away: no longer at its path).
    rows('DELETE FROM mm_files_image_storage WHERE file_id = %s', i[5].file_id)
    (root3 / 'archive').mkdir(exist_ok=True)
    rows('INSERT INTO mm_files_image_storage (file_id, storage_id, type, created_at) VALUES (%s, %s, 0, now())',
         i[5].file_id, disk3)
    unplugged = root3.with_name(root3.name + '-unplugged')
    shutil.move(root3, unplugged)
    # i7: three; its disk copy last checked long ago (backdated, as a scrub's row would be).
    rows('UPDATE mm_files_image_storage SET created_at = %s WHERE file_id = %s AND storage_id = %s',
         OLD_CHECK, i[7].file_id, disk1)
    rows('UPDATE storage_fixity SET checked_at = %s WHERE file_id = %s AND storage_id = %s', OLD_CHECK,
         i[7].file_id, disk1)

    # (file, the backends holding a sound copy of its original)
    sound = list(zip(i, [set(), {active}, {active, disk1}, {active, disk1, gzips}, {active, disk1, gzips, disk2},
                         {disk3}, {active, disk1, gzips, disk2}, {active, disk1, gzips}]))
    sound += [(r, {active}) for r in recordings]
    deployments = dict(w.query('SELECT n.node_label, d.deployment_id FROM deployments d JOIN nodes n USING (node_id)'))
    tags = collections.defaultdict(set)
    for label, tag in w.query('SELECT n.node_label, t.name FROM deployments d JOIN nodes n USING (node_id) '
                              'JOIN mm_tags_deployments md ON md.deployments_deployment_id = d.deployment_id '
                              'JOIN tags t ON t.tag_id = md.tags_tag_id'):
        tags[label].add(tag)
    return types.SimpleNamespace(world=w, active=active, gzips=gzips, disk1=disk1, disk2=disk2, disk3=disk3,
                                 root1=root1, unplugged=unplugged, images=images, recordings=recordings, sound=sound,
                                 deployments=deployments, tags=tags, s3_ids={active, gzips})


def expected_rows(o, key_of) -> dict:
    """The rows coverage must give, counted here from the world's truth: (group, key) → row."""
    rows = {}
    for f, backends in o.sound:
        for key in key_of(f):
            row = rows.setdefault((f.group, key), {'files': 0, 'bytes': 0, 'copies': dict.fromkeys(ms.COPY_BUCKETS, 0),
                                                   'online': 0, 'offline_only': 0})
            row['files'] += 1
            row['bytes'] += len(f.data)
            row['copies'][bucket_of(len(backends))] += 1
            row['online'] += bool(backends & o.s3_ids)
            row['offline_only'] += bool(backends) and not backends & o.s3_ids
    return rows


def coverage_json(o, *args) -> dict:
    result = o.world.cli('coverage', *args, '--json')
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def as_expected(document: dict) -> dict:
    return {(r['group'], r['key']): {k: r[k] for k in ('files', 'bytes', 'copies', 'online', 'offline_only')}
            for r in document['rows']}


def test_coverage_by_deployment_counts_sound_copies_of_the_original(safe_world):
    o = safe_world
    result = o.world.cli('coverage', '--json')
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {'rows', 'at_risk'} and document['at_risk'] == []
    for row in document['rows']:
        assert {'group', 'key', 'files', 'bytes', 'copies', 'online', 'offline_only', 'never_checked',
                'oldest_check'} <= set(row)
        assert set(row['copies']) == {'0', '1', '2', '3+'}
    assert as_expected(document) == expected_rows(o, lambda f: [o.deployments[f.node_label]])
    # the checks: disk 2's copy of i6 was never checked; i7's disk copy was last proven long ago
    never = {(r['group'], r['key']): r['never_checked'] for r in document['rows']}
    assert never[('image', o.deployments[o.images[6].node_label])] == 1
    assert sum(never.values()) == 1
    oldest = {r['key']: r['oldest_check'] for r in document['rows'] if r['group'] == 'image'}
    assert dt.datetime.fromisoformat(oldest[o.deployments[o.images[7].node_label]]) == OLD_CHECK
    damaged = sum(r['damaged'] for r in document['rows'])
    assert damaged == 1                                   # i0's disk copy; i2's old finding is ignored


def test_coverage_text_names_the_columns_and_what_is_unsafe(safe_world):
    o = safe_world
    result = o.world.cli('coverage')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith('GROUP'))
    assert re.search(r'DEPLOYMENT\s+FILES\s+BYTES\s+0\s+1\s+2\s+3\+\s+ONLINE\s+OFFLINE ONLY\s+NEVER CHECKED', header)
    total = next(line for line in lines if line.startswith('image') and ' all ' in line)
    # 8 files; copies 0: i0; 1: i1, i5; 2: i2; 3+: i3, i4, i6, i7; online 6; offline only 1
    assert re.search(r'\s8\s+\S+ \S?B\s+1\s+2\s+1\s+4\s+6\s+1\s', total), total
    assert 'image: 1 of 8 files have NO sound copy of their original' in result.stdout
    assert 'audio: all 2 files have a sound copy of their original; 2 of them only one' in result.stdout


def test_at_risk_lists_the_files_below_n_with_where_their_copies_are_and_exits_1(safe_world):
    o = safe_world
    i = o.images
    result = o.world.cli('coverage', '--at-risk', '--json')
    assert result.returncode == 1, result.stderr
    at_risk = json.loads(result.stdout)['at_risk']
    expected = {(f.group, f.file_id): len(b) for f, b in o.sound if len(b) < 2}
    assert {(e['group'], e['file_id']): e['copies'] for e in at_risk} == expected
    assert all(set(e) == {'group', 'file_id', 'object_name', 'copies', 'where'} for e in at_risk)
    first = next(e for e in at_risk if e['file_id'] == i[0].file_id and e['group'] == 'image')
    assert first['object_name'] == i[0].object_name
    places = {(p['storage_id'], p['type'], p['sound'], p['outcome']) for p in first['where']}
    assert places == {(o.active, 1, False, None), (o.disk1, 0, False, 'corrupt')}

    text = o.world.cli('coverage', '--at-risk', '1')
    assert text.returncode == 1
    assert 'at risk: 1 files with fewer than 1 sound copy of the original:' in text.stdout
    assert (f'image {i[0].file_id} {i[0].object_name}: 0 sound copies; backend {o.active} "test bucket" '
            f'(WebP 1920×1440); backend {o.disk1} "Archive 01" (original, corrupt)') in text.stdout
    none = o.world.cli('coverage', 'fs2_images', '--at-risk', '1')     # i0 is not an FS2 image
    assert none.returncode == 0 and 'at risk: none' in none.stdout


@pytest.mark.parametrize('by', ['node', 'tag', 'month', 'backend', 'batch'])
def test_coverage_by_each_dimension(safe_world, by):
    o = safe_world
    document = coverage_json(o, '--by', by)
    if by == 'node':
        expected = expected_rows(o, lambda f: [f.node_label])
    elif by == 'tag':
        expected = expected_rows(o, lambda f: sorted(o.tags[f.node_label]))
    elif by == 'month':
        expected = expected_rows(o, lambda f: [f.time.astimezone(UTC).strftime('%Y-%m')])
    elif by == 'backend':
        held = collections.defaultdict(set)
        for group in ('image', 'audio'):
            for file_id, storage_id in o.world.query(f'SELECT file_id, storage_id FROM mm_files_{group}_storage'):
                held[(group, file_id)].add(storage_id)
        expected = expected_rows(o, lambda f: sorted(held[(f.group, f.file_id)]))
        rows = {(r['group'], r['key']): r for r in document['rows']}
        # what each backend holds: disk 1 the sound originals of i2, i3, i4, i6, i7 and i0's corrupt copy
        assert rows[('image', o.disk1)]['originals'] == 5 and rows[('image', o.disk1)]['damaged'] == 1
        assert rows[('image', o.active)]['versions'] == 1
        assert rows[('image', o.disk2)]['never_checked'] == 1
        assert dt.datetime.fromisoformat(rows[('image', o.disk1)]['oldest_check']) == OLD_CHECK
        assert rows[('image', o.disk1)]['label'] == 'Archive 01'
    else:
        batches = ms.load_batches()
        members = collections.defaultdict(set)
        for batch in batches.values():
            for (file_id,) in o.world.query(f'SELECT file_id FROM ({ms.batch_sql(batch)}) b'):
                members[(batch.group, file_id)].add(batch.id)
        expected = expected_rows(o, lambda f: sorted(members[(f.group, f.file_id)]))
    assert as_expected(document) == expected


def test_coverage_of_a_batch_and_bad_input(safe_world):
    o = safe_world
    document = coverage_json(o, 'all_audio', '--by', 'month')
    assert sorted((r['group'], r['key'], r['files'], r['copies']['1']) for r in document['rows']) == sorted(
        ('audio', f.time.strftime('%Y-%m'), 1, 1) for f in o.recordings)
    unknown = o.world.cli('coverage', 'no_such_batch')
    assert unknown.returncode == 2 and "unknown batch 'no_such_batch'" in unknown.stderr
    bad = o.world.cli('coverage', '--by', 'colour')
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr
    nowhere = o.world.cli('coverage', '--html', o.world.tmp_path / 'no' / 'such' / 'page.html')
    assert nowhere.returncode == 2 and 'does not exist' in nowhere.stderr


def test_coverage_without_a_fixity_log_counts_every_recorded_original(safe_world):
    o = safe_world
    o.world.query('DROP TABLE storage_fixity')
    result = o.world.cli('coverage', '--json')
    assert result.returncode == 0, result.stderr
    assert 'init-db' in result.stderr
    rows = [r for r in json.loads(result.stdout)['rows'] if r['group'] == 'image']
    # i0's disk copy counts again: nothing says it is damaged
    assert sum(r['copies']['0'] for r in rows) == 0 and sum(r['damaged'] for r in rows) == 0


# --- whereis ---------------------------------------------------------------------------------------

def test_whereis_lists_every_copy_with_its_last_check(safe_world):
    o = safe_world
    f = o.images[0]
    result = o.world.cli('whereis', 'image', f.file_id, '--json')
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {'file', 'copies'}
    assert document['file']['object_name'] == f.object_name and document['file']['sha256'] == f.sha256
    assert document['file']['sound_copies'] == 0
    copies = {c['storage_id']: c for c in document['copies']}
    assert set(copies) == {o.active, o.disk1}
    assert copies[o.active]['type'] == 1 and copies[o.active]['version'] == 'WebP 1920×1440'
    assert copies[o.active]['online'] is True and copies[o.active]['priority'] == 0
    assert copies[o.active]['location'].endswith('/' + f.object_name.rsplit('.', 1)[0] + '.webp')
    disk = copies[o.disk1]
    assert disk['online'] is True and disk['label'] == 'Archive 01' and disk['sound'] is False
    assert disk['last_check']['outcome'] == 'corrupt' and disk['last_check']['event'] == 'verify'
    assert disk['location'] == str(o.root1 / 'archive' / f.object_name)

    text = o.world.cli('whereis', 'image', f.object_name)
    assert text.returncode == 0
    assert f'image {f.file_id} {f.object_name}' in text.stdout
    assert re.search(rf'{o.disk1}\s+0 original\s+2 offline archive disk\s+yes, DAMAGED\s+\S+ \S+ corrupt \(verify\)',
                     text.stdout), text.stdout

    old = json.loads(o.world.cli('whereis', 'image', o.images[7].file_id, '--json').stdout)
    checked = {c['storage_id']: c['last_check'] for c in old['copies']}
    assert dt.datetime.fromisoformat(checked[o.disk1]['checked_at']) == OLD_CHECK
    never = json.loads(o.world.cli('whereis', 'image', o.images[6].file_id, '--json').stdout)
    assert {c['storage_id']: c['last_check'] for c in never['copies']}[o.disk2] is None


def test_whereis_names_the_disk_to_mount_for_an_original_offline_only(safe_world):
    o = safe_world
    f = o.images[5]
    result = o.world.cli('whereis', 'image', f.file_id)
    assert result.returncode == 0, result.stderr
    assert 'the original is offline only: mount disk' in result.stdout and '"Archive 03"' in result.stdout
    document = json.loads(o.world.cli('whereis', 'image', f.file_id, '--json').stdout)
    assert document['file']['offline_only'] is True and document['file']['online_original'] is False
    assert [d['storage_id'] for d in document['file']['disks_to_mount']] == [o.disk3]
    assert document['copies'][0]['online'] is False
    # plugged in under a mount root, it is found: nothing to mount any more
    mounted = o.world.cli('whereis', 'image', f.file_id, '--json',
                          env={'MITWELTEN_MOUNT_ROOTS': str(o.unplugged.parent)})
    found = json.loads(mounted.stdout)
    assert found['file']['disks_to_mount'] == [] and found['copies'][0]['online'] is True
    assert found['copies'][0]['mounted_at'] == str(o.unplugged)


def test_whereis_of_an_unknown_file_exits_2(safe_world):
    o = safe_world
    for args in (('image', '999999'), ('audio', 'no/such/name.wav')):
        result = o.world.cli('whereis', *args)
        assert result.returncode == 2, result.stdout
        assert f"no {args[0]} file with id or object name '{args[1]}'" in result.stderr
        assert 'Traceback' not in result.stderr
    assert o.world.cli('whereis', 'video', '1').returncode == 2


# --- the service: GET /KIND/ID ----------------------------------------------------------------------

def test_the_service_answers_a_files_state_as_whereis_json(safe_world, service):
    o = safe_world
    for group, kind, f in (('image', 'images', o.images[0]), ('image', 'images', o.images[5]),
                           ('audio', 'audio', o.recordings[1])):
        response = service.request('GET', f'/{kind}/{f.file_id}')
        assert response.status == 200, response.data[:300]
        assert json.loads(response.data) == json.loads(o.world.cli('whereis', group, f.file_id, '--json').stdout)
    unknown = service.request('GET', '/images/999999')
    assert unknown.status == 404 and unknown.headers['Content-Type'] == 'application/problem+json'
    assert json.loads(unknown.data)['type'] == ms.PROBLEM + 'file-not-found'
    assert service.request('GET', f'/images/{o.images[0].file_id}', token=None).status == 401
    assert service.request('GET', f'/images/{o.images[0].file_id}', token=service.token(roles=())).status == 403
    refused = service.request('DELETE', f'/images/{o.images[0].file_id}')
    assert refused.status == 405 and refused.headers['Allow'] == 'GET'


# --- coverage --html ---------------------------------------------------------------------------------

class PageCells(HTMLParser):
    """The table rows of the page: (group, key) → {field: data-value}; and the due table."""

    def __init__(self):
        super().__init__()
        self.rows, self.due, self.row, self.due_row, self.field, self.text = {}, {}, None, None, None, ''
        self.svgs = 0
        self.external = []
        self.titles, self.in_title = [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'title':
            self.in_title = True
            self.titles.append('')
        if tag == 'svg':
            self.svgs += 1
        if tag in ('script', 'link', 'img', 'iframe') or any(
                v and v.startswith(('http:', 'https:', '//')) for k, v in attrs if k in ('src', 'href')):
            self.external.append((tag, a))
        if tag == 'tr' and 'data-group' in a:
            self.row = self.rows.setdefault((a['data-group'], a['data-key']), {})
        elif tag == 'tr' and 'data-storage-id' in a:
            self.due_row = self.due.setdefault(int(a['data-storage-id']), {})
        elif tag == 'td' and 'data-field' in a:
            if self.row is not None and 'data-value' in a:
                self.row[a['data-field']] = a['data-value']
            elif self.due_row is not None:
                self.field, self.text = a['data-field'], ''

    def handle_data(self, data):
        if self.field:
            self.text += data
        if self.in_title:
            self.titles[-1] += data

    def handle_endtag(self, tag):
        if tag == 'title':
            self.in_title = False
        if tag == 'td' and self.field:
            self.due_row[self.field] = self.text.strip()
            self.field = None
        elif tag == 'tr':
            self.row = self.due_row = None


def test_the_html_page_shows_the_catalogs_numbers_and_renders(safe_world):
    o = safe_world
    page = o.world.tmp_path / 'coverage.html'
    result = o.world.cli('coverage', '--by', 'node', '--at-risk', '--html', page)
    assert result.returncode == 1, result.stderr          # files at risk
    assert f'wrote {page}' in result.stdout
    text = page.read_text(encoding='utf-8')
    cells = PageCells()
    cells.feed(text)
    assert cells.external == [] and cells.svgs >= 3       # self-contained, with its charts
    document = coverage_json(o, '--by', 'node')
    assert document['rows']
    for row in document['rows']:
        shown = cells.rows[(row['group'], str(row['key']))]
        for field in ('files', 'bytes', 'online', 'offline_only', 'never_checked', 'damaged'):
            assert int(shown[field]) == row[field], (row, field)
        for bucket, n in row['copies'].items():
            assert int(shown[bucket]) == n
    # the totals, counted from the world's truth
    for group in ('image', 'audio'):
        truth = [b for f, b in o.sound if f.group == group]
        total = cells.rows[(group, 'all')]
        assert int(total['files']) == len(truth)
        assert int(total['0']) == sum(not b for b in truth) and int(total['1']) == sum(len(b) == 1 for b in truth)
    # due a check: disk 1 holds i7's copy written long ago; disk 2 holds i6's copy never checked
    assert cells.due[o.disk1]['due'] == '1' and cells.due[o.disk2]['due'] == '1'
    assert cells.due[o.disk2]['never_checked'] == '1' and cells.due[o.disk1]['oldest_check'] == '2020-03-04'
    assert o.active not in cells.due
    assert o.images[0].object_name in text                 # the at-risk list names the files
    # the chart of deployments by month: each cell's files by copies, as counted from the world
    cells_drawn = {}
    for title in cells.titles:
        found = re.match(r'(image|audio) (\d+) \S+, (\d{4}-\d{2}): (\d+) files; (.*)', title)
        if found:
            group, deployment, month, files, by_copies = found.groups()
            cells_drawn[(group, int(deployment), month)] = (int(files), by_copies)
    expected = collections.defaultdict(lambda: [0, collections.Counter()])
    for f, backends in o.sound:
        cell = expected[(f.group, o.deployments[f.node_label], f.time.astimezone(UTC).strftime('%Y-%m'))]
        cell[0] += 1
        cell[1][ms.COPY_WORDS[bucket_of(len(backends))]] += 1
    assert {key: files for key, (files, _) in cells_drawn.items()} == {key: v[0] for key, v in expected.items()}
    for key, (files, by_copies) in cells_drawn.items():
        assert by_copies == ', '.join(f'{n} {word}' for word, n in sorted(
            expected[key][1].items(), key=lambda item: list(ms.COPY_WORDS.values()).index(item[0])))
    chromium = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
    if chromium is None:
        pytest.skip('no chromium on PATH: the page was checked, not rendered')
    shot = o.world.tmp_path / 'coverage.png'
    rendered = subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu',
                               '--disable-background-networking', f'--screenshot={shot}', '--window-size=1400,2000',
                               page.as_uri()], capture_output=True, text=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 20_000, rendered.stderr[-2000:]


def test_the_service_answers_coverage_as_coverage_json(safe_world, service):
    o = safe_world
    for query, args in (('', ()), ('?by=month', ('--by', 'month')), ('?batch=fs1_images&by=backend',
                                                                       ('fs1_images', '--by', 'backend'))):
        response = service.request('GET', '/coverage' + query)
        assert response.status == 200, response.data[:300]
        assert json.loads(response.data) == coverage_json(o, *args)
    unknown = service.request('GET', '/coverage?batch=no_such_batch')
    assert unknown.status == 404 and json.loads(unknown.data)['type'] == ms.PROBLEM + 'batch-not-found'
    assert service.request('GET', '/coverage?by=colour').status == 422


def test_a_copy_verify_found_corrupt_no_longer_counts(world):
    """The fixity log as `verify` writes it: a disk copy damaged, verified, then counted."""
    active = world.create_s3_backend()
    disk, root = world.create_local_backend(label='Archive 09')
    files = world.images_on_s3(3, active)
    assert world.copy(active, disk).count('copied') == 3
    before = coverage_json(types.SimpleNamespace(world=world))
    assert sum(r['copies']['2'] for r in before['rows']) == 3
    damaged = root / 'archive' / files[1].object_name
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert world.verify(disk).exit_status == 1
    assert world.query("SELECT file_id FROM storage_fixity WHERE event = 'verify' AND outcome = 'corrupt'") == [
        (files[1].file_id,)]
    after = coverage_json(types.SimpleNamespace(world=world), '--at-risk')
    assert sum(r['copies']['1'] for r in after['rows']) == 1 and sum(r['damaged'] for r in after['rows']) == 1
    assert [(e['file_id'], e['copies']) for e in after['at_risk']] == [(files[1].file_id, 1)]
