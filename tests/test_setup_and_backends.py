"""init-db, create, info: the catalog schema and registering and listing backends."""

from __future__ import annotations

import json
import os

import psycopg2.extensions
import pytest

import mitwelten_storage as ms
from conftest import files_under

PRODUCTION_COLUMNS = {
    'storage_backend': ['storage_id', 'url_prefix', 'type', 'priority', 'notes', 'created_at', 'updated_at'],
    'mm_files_image_storage': ['file_id', 'storage_id', 'type', 'created_at', 'updated_at'],
    'mm_files_audio_storage': ['file_id', 'storage_id', 'type', 'created_at', 'updated_at'],
    'files_image': ['file_id', 'object_name', 'sha256', 'time', 'deployment_id', 'file_size', 'resolution',
                    'created_at', 'updated_at'],
    'files_audio': ['file_id', 'object_name', 'sha256', 'time', 'deployment_id', 'duration', 'serial_number',
                    'format', 'file_size', 'sample_rate', 'bit_depth', 'channels', 'battery', 'temperature', 'gain',
                    'filter', 'source', 'rec_end_status', 'comment', 'class', 'created_at', 'updated_at'],
    'deployments': ['deployment_id', 'node_id', 'location', 'description', 'period'],
    'nodes': ['node_id', 'node_label', 'type', 'serial_number', 'platform', 'connectivity', 'power',
              'hardware_version', 'software_version', 'firmware_version', 'description', 'created_at', 'updated_at'],
    'tags': ['tag_id', 'name', 'created_at', 'updated_at'],
    'mm_tags_deployments': ['tags_tag_id', 'deployments_deployment_id'],
}


# --- init-db ----------------------------------------------------------------------------------

def test_init_db_creates_production_compatible_tables_idempotently(world):
    for _ in range(2):
        result = world.cli('init-db')
        assert result.returncode == 0, result.stderr
        assert f"catalog schema '{world.schema}' is ready" in result.stdout
    for table, columns in PRODUCTION_COLUMNS.items():
        found = [r[0] for r in world.query(
            'SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s '
            'ORDER BY ordinal_position', (world.schema, table))]
        assert found == columns, table
    types = dict(world.query("SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_schema = %s AND table_name = 'deployments'", (world.schema,)))
    assert types['location'] == 'point' and types['period'] == 'tstzrange'


def test_init_db_creates_a_new_schema_and_keeps_existing_rows(world, services):
    storage_id = world.create_s3_backend()
    new_schema = world.schema + '_b'
    try:
        result = world.cli('--schema', new_schema, 'init-db')
        assert result.returncode == 0, result.stderr
        assert world.query('SELECT count(*) FROM pg_tables WHERE schemaname = %s', (new_schema,))[0][0] == 10
        assert world.cli('init-db').returncode == 0
        assert world.query('SELECT storage_id FROM storage_backend') == [(storage_id,)]
    finally:
        world.query(f'DROP SCHEMA IF EXISTS "{new_schema}" CASCADE')


def test_schema_comes_from_env_and_a_missing_one_is_named(world):
    result = world.cli('info', env={'MITWELTEN_DB_SCHEMA': 'no_such_schema'})
    assert result.returncode == 2
    assert "schema 'no_such_schema'" in result.stderr and 'init-db' in result.stderr
    assert 'Traceback' not in result.stderr


def test_db_flag_overrides_env_and_unreachable_database_is_a_clear_error(world):
    result = world.cli('--db', 'host=127.0.0.1 port=1 user=postgres password=hunter2-secret connect_timeout=2',
                       'info')
    assert result.returncode == 2
    assert 'cannot connect to the catalog' in result.stderr and '127.0.0.1:1' in result.stderr
    assert 'hunter2-secret' not in result.stderr + result.stdout
    assert 'Traceback' not in result.stderr


def test_libpq_defaults_are_used_without_db_or_env(world, services):
    params = psycopg2.extensions.parse_dsn(services.pg_dsn)
    env = {'PGHOST': params.get('host', ''), 'PGPORT': params.get('port', '5432'),
           'PGUSER': params.get('user', 'postgres'), 'PGDATABASE': params.get('dbname', 'postgres')}
    if params.get('password'):
        env['PGPASSWORD'] = params['password']
    result = world.cli('info', env=env, unset=('MITWELTEN_DB',))
    assert result.returncode == 0, result.stderr
    assert 'no storage backends yet' in result.stdout


# --- create local ------------------------------------------------------------------------------

def test_create_local_writes_dot_file_readme_archive_and_row(world):
    disk = world.new_disk()
    result = world.cli('create', '-t', 'local', '-p', '2', '-n', 'Archive 07 (WD 4TB)', disk)
    assert result.returncode == 0, result.stderr
    (storage_id, url, kind, priority, notes, created_at), = world.query(
        'SELECT storage_id, url_prefix, type, priority, notes, created_at FROM storage_backend')
    assert f'created storage backend {storage_id}' in result.stdout
    assert (url, kind, priority, notes) == (str(disk), 'local', 2, 'Archive 07 (WD 4TB)')
    dot = ms.read_dot_file(disk)
    assert dot == {'storage_id': str(storage_id), 'created_at': str(created_at), 'storage_dir': 'archive',
                   'url_prefix': str(disk), 'device_label': 'Archive 07 (WD 4TB)'}
    assert (disk / 'archive').is_dir() and not any((disk / 'archive').iterdir())
    readme = (disk / 'README.md').read_text()
    assert f'storage backend **{storage_id}**' in readme and 'Archive 07 (WD 4TB)' in readme
    assert ms.dot_file_mismatch(disk, world.backend(storage_id)) is None


def test_dot_file_written_by_the_earlier_script_is_accepted(world):
    """The earlier script wrote str() of the timestamp in the server's time zone; the instant counts."""
    storage_id, disk = world.create_local_backend()
    created = world.backend(storage_id).created_at
    import datetime as dt
    zurich = created.astimezone(dt.timezone(dt.timedelta(hours=1)))
    (disk / ms.DOT_FILE).write_text(f'storage_id={storage_id}\ncreated_at={zurich}\nstorage_dir=archive\n'
                                    f'url_prefix={disk}\ndevice_label=Test Disk\n')
    assert ms.dot_file_mismatch(disk, world.backend(storage_id)) is None


@pytest.mark.parametrize('case', ['missing', 'is_file', 'already_backend', 'readme_exists', 'archive_exists'])
def test_create_local_refuses_and_leaves_nothing_behind(world, case):
    disk = world.new_disk()
    if case == 'missing':
        disk = disk / 'not-mounted'
    elif case == 'is_file':
        disk = disk / 'a-file'
        disk.write_text('x')
    elif case == 'already_backend':
        world.create_local_backend(disk)
    elif case == 'readme_exists':
        (disk / 'README.md').write_text('my notes')
    elif case == 'archive_exists':
        (disk / 'archive').mkdir()
    before = files_under(disk.parent)
    rows_before = world.query('SELECT count(*) FROM storage_backend')[0][0]
    result = world.cli('create', '-t', 'local', '-p', '2', '-n', 'Second', disk)
    assert result.returncode == 2
    assert str(disk) in result.stderr and 'Traceback' not in result.stderr
    assert files_under(disk.parent) == before
    assert world.query('SELECT count(*) FROM storage_backend')[0][0] == rows_before


def test_create_local_refuses_a_path_already_registered(world):
    storage_id, disk = world.create_local_backend()
    for name in (ms.DOT_FILE, 'README.md'):
        (disk / name).unlink()
    (disk / 'archive').rmdir()
    result = world.cli('create', '-t', 'local', '-p', '2', '-n', 'Again', disk)
    assert result.returncode == 2
    assert f'already registered as storage backend {storage_id}' in result.stderr
    assert not (disk / ms.DOT_FILE).exists() and not (disk / 'archive').exists()


def test_create_local_leaves_nothing_when_the_catalog_refuses(world):
    """A failure after the files are written (here: the database is unreachable) removes them."""
    disk = world.new_disk()
    result = world.cli('--db', 'host=127.0.0.1 port=1 connect_timeout=2', 'create', '-t', 'local', '-p', '2',
                       '-n', 'X', disk)
    assert result.returncode == 2
    assert list(disk.iterdir()) == []


# --- create s3 ---------------------------------------------------------------------------------

def test_create_s3_checks_the_bucket_and_records_the_url(world):
    bucket = world.new_bucket()
    url = world.s3_url(bucket, 'originals/2021') + '/'
    result = world.cli('create', '-t', 's3', '-p', '0', '-n', 'active, public', url)
    assert result.returncode == 0, result.stderr
    (storage_id, stored_url, kind), = world.query('SELECT storage_id, url_prefix, type FROM storage_backend')
    assert stored_url == world.s3_url(bucket, 'originals/2021') and kind == 's3'
    assert f'created storage backend {storage_id}' in result.stdout
    again = world.cli('create', '-t', 's3', '-p', '0', '-n', 'again', world.s3_url(bucket, 'originals/2021'))
    assert again.returncode == 2 and f'already registered as storage backend {storage_id}' in again.stderr


@pytest.mark.parametrize('url, message', [
    ('{endpoint}/no-such-bucket', "bucket 'no-such-bucket' does not exist"),
    ('http://127.0.0.1:1/bucket', 'cannot reach the S3 server http://127.0.0.1:1'),
    ('ftp://host/bucket', 'must look like http[s]://HOST[:PORT]/BUCKET'),
    ('{endpoint}', 'names no bucket'),
    ('{endpoint}/Bad_Bucket', 'not a valid bucket name'),
    ('http://key:secret-in-url@127.0.0.1:9000/bucket', 'must not contain credentials'),
])
def test_create_s3_refuses_bad_urls_and_missing_buckets(world, url, message):
    url = url.format(endpoint=world.services.s3_endpoint)
    result = world.cli('create', '-t', 's3', '-p', '0', '-n', 'x', url)
    assert result.returncode == 2
    assert message in result.stderr
    assert 'secret-in-url' not in result.stderr + result.stdout
    assert 'Traceback' not in result.stderr
    assert world.query('SELECT count(*) FROM storage_backend')[0][0] == 0


def test_aws_profile_named_after_the_host_is_used_for_that_server(world, tmp_path, monkeypatch):
    config = tmp_path / 'aws-config'
    config.write_text('[profile 127.0.0.1:9000]\naws_access_key_id = KEY-FOR-9000\naws_secret_access_key = s1\n'
                      '[profile minio.example.org]\naws_access_key_id = KEY-FOR-MINIO\naws_secret_access_key = s2\n')
    monkeypatch.setenv('AWS_CONFIG_FILE', str(config))
    key = lambda url: ms.s3_session(ms.S3Location.parse(url)).get_credentials().access_key
    assert key('http://127.0.0.1:9000/bucket') == 'KEY-FOR-9000'
    assert key('https://minio.example.org:9443/bucket') == 'KEY-FOR-MINIO'
    assert key('http://127.0.0.1:9001/bucket') == os.environ['AWS_ACCESS_KEY_ID']


def test_credentials_never_appear_in_output_or_logs(world):
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    target, disk = world.create_local_backend()
    world.images_on_s3(3, source)
    outputs = [world.cli('info'), world.cli('info', '--json'), world.cli('copy', '-s', source, '-t', target,
                                                                          'all_images')]
    text = ''.join(r.stdout + r.stderr for r in outputs)
    text += ''.join(p.read_text() for p in world.log_dir.glob('*.log'))
    assert outputs[-1].returncode == 0
    assert os.environ['AWS_SECRET_ACCESS_KEY'] not in text and os.environ['AWS_ACCESS_KEY_ID'] not in text


# --- info ---------------------------------------------------------------------------------------

def test_info_lists_backends_as_table_and_json(world):
    s3_id = world.create_s3_backend(priority=0)
    local_id, disk = world.create_local_backend(label='Archive 01')
    offline_id, offline_disk = world.create_local_backend(label='In the drawer')
    offline_disk.rename(offline_disk.with_name('moved-away'))
    images = world.images_on_s3(3, s3_id)
    recordings = world.recordings_on_s3(2, s3_id)
    table = world.cli('info')
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ['ID', 'TYPE', 'PRIO', 'PATH', 'OR', 'URL', 'CREATED', 'STATUS', 'NOTES']
    assert lines[1].split()[:4] == [str(s3_id), 's3', '0', world.s3_url(world.backend(s3_id).url_prefix
                                                                           .rsplit('/', 1)[1])]
    image_bytes = ms.human_bytes(sum(len(f.data) for f in images))
    assert lines[2].strip() == (f'image original: 3 files, {image_bytes}; audio original: 2 files, '
                                f'{ms.human_bytes(sum(len(f.data) for f in recordings))}')
    assert lines[3].split()[:4] == [str(local_id), 'local', '2', str(disk)] and 'online' in lines[3]
    assert lines[4].strip() == 'no files recorded'
    assert 'offline' in lines[5] and 'In the drawer' in lines[5]
    listing = json.loads(world.cli('info', '--json').stdout)
    assert [e['storage_id'] for e in listing] == [s3_id, local_id, offline_id]
    for entry in listing:
        assert {'storage_id', 'type', 'url_prefix', 'priority', 'notes', 'created_at'} <= set(entry)
    assert listing[1]['online'] is True and listing[2]['online'] is False
    assert listing[0]['versions'] == [
        {'group': 'image', 'type': 0, 'version': 'original', 'files': 3, 'bytes': sum(len(f.data) for f in images)},
        {'group': 'audio', 'type': 0, 'version': 'original', 'files': 2,
         'bytes': sum(len(f.data) for f in recordings)}]


def test_info_batches_lists_every_batch(world):
    result = world.cli('info', '--batches')
    assert result.returncode == 0
    for batch in ('all_images', 'all_audio', 'fs1_images', 'pollinator_cams', 'fs3_merian_cams',
                  'images_2021_summer'):
        assert batch in result.stdout
    listing = json.loads(world.cli('info', '--batches', '--json').stdout)
    assert {'id': 'all_audio', 'group': 'audio', 'description': 'every audio recording in the catalog'} in listing


def test_usage_errors_exit_2(world):
    assert world.cli().returncode == 2
    result = world.cli('copy', '-s', 'one', '-t', '2', 'all_images')
    assert result.returncode == 2 and "invalid int value: 'one'" in result.stderr
    result = world.cli('copy', '-s', '1', '-t', '2', 'all_images', '--jobs', '0')
    assert result.returncode == 2 and 'must be at least 1' in result.stderr
    assert world.cli('create', '-t', 'tape', '-p', '1', '-n', 'x', '/tmp').returncode == 2
