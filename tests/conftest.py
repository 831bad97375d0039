"""Fixtures: a real PostgreSQL and a real S3 endpoint over TCP, started once per test session
(or MITWELTEN_TEST_DB's server instead of the throwaway PostgreSQL), a fresh catalog schema and
fresh buckets and disks per test, and a helper that runs the real command line."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import psycopg2
import psycopg2.extensions
import pytest
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mitwelten_storage as ms  # noqa: E402
from devkit import sample_data  # noqa: E402
from devkit.services import throwaway_services  # noqa: E402


# The tests never look for disks under the machine's own mount roots; a test that wants disks
# found sets MITWELTEN_MOUNT_ROOTS itself.
os.environ['MITWELTEN_MOUNT_ROOTS'] = ''


@pytest.fixture(scope='session')
def services():
    with throwaway_services(pg_dsn=os.environ.get('MITWELTEN_TEST_DB')) as svc:
        yield svc


class World:
    """One test's catalog schema, S3 server and folders, and the command line to drive them."""

    def __init__(self, services, schema: str, tmp_path: Path):
        self.services = services
        self.schema = schema
        self.tmp_path = tmp_path
        self.settings = ms.Settings(dsn=services.pg_dsn, schema=schema)
        self.log_dir = tmp_path / 'logs'
        self.s3 = boto3.client('s3', endpoint_url=services.s3_endpoint,
                               config=Config(s3={'addressing_style': 'path'}, region_name='us-east-1'))
        self.conn = None

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update(MITWELTEN_DB=self.services.pg_dsn, MITWELTEN_DB_SCHEMA=self.schema,
                   MITWELTEN_LOG_DIR=str(self.log_dir), PYTHONUNBUFFERED='1',
                   MITWELTEN_MOUNT_ROOTS=os.environ['MITWELTEN_MOUNT_ROOTS'])
        env.pop('MITWELTEN_CRASH_AT', None)
        env.pop('MITWELTEN_FAULT_AT', None)
        return env

    def cli(self, *args, env: dict | None = None, unset: tuple = (), **kwargs) -> subprocess.CompletedProcess:
        full_env = {k: v for k, v in {**self.env, **(env or {})}.items() if k not in unset}
        return subprocess.run([sys.executable, str(ROOT / 'mitwelten_storage.py'), *map(str, args)],
                              capture_output=True, text=True, env=full_env, timeout=300, **kwargs)

    def main(self, *args, env: dict | None = None) -> subprocess.CompletedProcess:
        """The command line in this process (`ms.main`), as `cli` runs it in another: the same
        environment, its exit status, stdout and stderr. For what needs no process of its own
        (signals, kills and test hooks do)."""
        import io
        changed = {'MITWELTEN_DB': self.services.pg_dsn, 'MITWELTEN_DB_SCHEMA': self.schema,
                   'MITWELTEN_LOG_DIR': str(self.log_dir), **(env or {})}
        saved = {name: os.environ.get(name) for name in changed}
        out, err = io.StringIO(), io.StringIO()
        os.environ.update({k: str(v) for k, v in changed.items()})
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = ms.main([str(a) for a in args])
                except SystemExit as exit:          # argparse's usage errors
                    status = exit.code
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        return subprocess.CompletedProcess(['mitwelten_storage.py', *map(str, args)], status, out.getvalue(),
                                           err.getvalue())

    # -- the engine, in-process (for logic; the command line is for exit status, signals, messages)
    def options(self, **options) -> ms.RunOptions:
        return ms.RunOptions(**{'jobs': 4, 'log_dir': self.log_dir, **options})

    def copy(self, source: int, target: int, batch: str = 'all_images', *, version_type: int = 0,
             **options) -> ms.RunReport:
        return ms.copy_batch(self.settings, source, target, batch, version_type=version_type,
                             options=self.options(**options))

    def archive(self, active: int, archive: int, batch: str = 'all_images', *, replace_with: int | None = None,
                delete_originals: bool = False, min_copies: int = 1, **options) -> ms.RunReport:
        return ms.archive_batch(self.settings, active, archive, batch, replace_with=replace_with,
                                delete_originals=delete_originals, min_copies=min_copies,
                                options=self.options(**options))

    def verify(self, storage_id: int, batch: str | None = None, *, fix: bool = False, path=None,
               not_checked_within: float | None = None, max_files: int | None = None,
               max_minutes: float | None = None, **options) -> ms.VerifyReport:
        return ms.verify_backend(self.settings, storage_id, batch, fix=fix, path=path and str(path),
                                 options=self.options(**options), not_checked_within=not_checked_within,
                                 max_files=max_files, max_minutes=max_minutes)

    def popen(self, *args, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / 'mitwelten_storage.py'), *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**self.env, **(env or {})})

    def query(self, text: str, params=()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(text, params)
            rows = cur.fetchall() if cur.description else []
        self.conn.commit()
        return rows

    # -- backends ------------------------------------------------------------------------------
    def new_bucket(self) -> str:
        name = f'mw-{uuid.uuid4().hex[:12]}'
        self.s3.create_bucket(Bucket=name)
        return name

    def s3_url(self, bucket: str, prefix: str = '') -> str:
        return f'{self.services.s3_endpoint}/{bucket}' + (f'/{prefix}' if prefix else '')

    def create_s3_backend(self, bucket: str | None = None, priority: int = 0, prefix: str = '') -> int:
        bucket = bucket or self.new_bucket()
        return ms.create_s3_backend(self.settings, self.s3_url(bucket, prefix), priority, 'test bucket').storage_id

    def new_disk(self, name: str = 'disk') -> Path:
        path = self.tmp_path / f'{name}-{uuid.uuid4().hex[:6]}'
        path.mkdir()
        return path

    def create_local_backend(self, path: Path | None = None, label: str = 'Test Disk') -> tuple[int, Path]:
        path = path or self.new_disk()
        return ms.create_local_backend(self.settings, str(path), 2, label).storage_id, path

    def backend(self, storage_id: int) -> ms.BackendRow:
        conn = ms.connect_catalog(self.settings)
        try:
            return ms.fetch_backend(conn, storage_id)
        finally:
            conn.close()

    # -- files ---------------------------------------------------------------------------------
    def images_on_s3(self, count: int, storage_id: int, **kwargs) -> list[sample_data.SampleFile]:
        files = sample_data.sample_images(count, seed=uuid.uuid4().int, **kwargs)
        record = self.backend(storage_id)
        where = ms.S3Location.parse(record.url_prefix)
        sample_data.upload(self.s3, where.bucket, files, where.prefix)
        sample_data.add_to_catalog(self.conn, files, storage_id)
        return files

    def recordings_on_s3(self, count: int, storage_id: int, **kwargs) -> list[sample_data.SampleFile]:
        files = sample_data.sample_recordings(count, seed=uuid.uuid4().int, **kwargs)
        where = ms.S3Location.parse(self.backend(storage_id).url_prefix)
        sample_data.upload(self.s3, where.bucket, files, where.prefix)
        sample_data.add_to_catalog(self.conn, files, storage_id)
        return files

    def files_on_disk(self, files, storage_id: int, root: Path) -> None:
        sample_data.write_local(root, files)
        sample_data.add_to_catalog(self.conn, files, storage_id)

    def rows(self, storage_id: int, group: str = 'image') -> dict[int, int]:
        """file_id -> version type of the rows recording files on the backend."""
        return dict(self.query(f'SELECT file_id, type FROM mm_files_{group}_storage WHERE storage_id = %s',
                               (storage_id,)))

    def s3_bytes(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)['Body'].read()
        except self.s3.exceptions.NoSuchKey:
            return None


def copied_to_disk(world, count=6, **kwargs):
    """Images on a new bucket, copied (and recorded) onto a new archive disk, 'Archive 07'."""
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    disk_id, disk = world.create_local_backend(label='Archive 07')
    files = world.images_on_s3(count, source, **kwargs)
    assert world.copy(source, disk_id).count('copied') == count
    return bucket, source, disk_id, disk, files


BATCH_CLASS = """
from dataclasses import dataclass

@dataclass(frozen=True)
class Batch:
    id: str
    group: str
    description: str
    sql: str
"""


def batches_py(*batches: str) -> str:
    """A batches.py of a researcher's own: its Batch class and BATCHES, one `Batch(…)` each."""
    return BATCH_CLASS + '\nBATCHES = [\n' + ''.join(f'    {batch},\n' for batch in batches) + ']\n'


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> dict[str, bytes]:
    """Every regular file under root, by path relative to root (hidden ones included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@contextlib.contextmanager
def new_world(services, tmp_path: Path):
    """A fresh catalog schema on `services` (anything with pg_dsn and s3_endpoint)."""
    schema = f'mwtest_{uuid.uuid4().hex[:10]}'
    w = World(services, schema, tmp_path)
    ms.init_db(w.settings)
    w.conn = ms.connect_catalog(w.settings)
    try:
        yield w
    finally:
        with contextlib.suppress(psycopg2.Error):
            w.conn.close()
        with contextlib.suppress(psycopg2.Error):     # a test may have stopped its own server
            admin = psycopg2.connect(services.pg_dsn, connect_timeout=5)
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            admin.close()


@pytest.fixture
def world(services, tmp_path):
    with new_world(services, tmp_path) as w:
        yield w


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.005)


@pytest.fixture
def readonly_dsn(world, services):
    """A catalog role that may only SELECT, as a workstation's would be."""
    role = f'mw_reader_{uuid.uuid4().hex[:8]}'
    admin = psycopg2.connect(services.pg_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE ROLE {role} LOGIN')
        cur.execute(f'GRANT USAGE ON SCHEMA "{world.schema}" TO {role}')
        cur.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{world.schema}" TO {role}')
    params = psycopg2.extensions.parse_dsn(services.pg_dsn)
    params['user'] = role
    yield ' '.join(f'{k}={v}' for k, v in params.items())
    with admin.cursor() as cur:
        cur.execute(f'DROP OWNED BY {role}')
        cur.execute(f'DROP ROLE {role}')
    admin.close()


# --- the storage service --------------------------------------------------------------------------

@pytest.fixture(scope='session')
def issuer():
    """A test OIDC issuer: an RSA key made here, its JWKS served over HTTP on loopback."""
    from devkit.oidc import TestIssuer
    with TestIssuer() as test_issuer:
        yield test_issuer


class ServiceUnderTest:
    """The storage service on loopback, with a client to talk to it as anyone would."""

    def __init__(self, url: str, issuer, world):
        import urllib3
        self.url = url
        self.issuer = issuer
        self.world = world
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))

    def token(self, roles=('internal', 'storage-admin'), **claims) -> str:
        return self.issuer.token(roles, **claims)

    def request(self, method: str, path: str, *, token: str | None = '', json_body=None, headers=None,
                stream: bool = False):
        headers = dict(headers or {})
        if token == '':
            token = self.token()
        if token:
            headers['Authorization'] = f'Bearer {token}'
        body = None
        if json_body is not None:
            import json
            body = json.dumps(json_body).encode()
            headers['Content-Type'] = 'application/json'
        return self.http.request(method, self.url + path, body=body, headers=headers, preload_content=not stream)

    def env(self) -> dict:
        """What the tool needs to go through this service: its URL and a token; no S3 keys."""
        return {'MITWELTEN_TOKEN': self.token()}


def service_config(world, issuer, config: dict | None = None, **settings):
    """The service's configuration for a world: `settings` change the catalog's, `config` the
    service's own (roles_claim, jwks_url=None for discovery, ...)."""
    import mitwelten_service as service
    return service.ServiceConfig(catalog=dataclasses.replace(world.settings, **settings), issuer=issuer.url,
                                 audience=issuer.audience, **{'jwks_url': issuer.jwks_url, 'jwks_cooldown': 0,
                                                              **(config or {})})


@contextlib.contextmanager
def service_in_thread(config):
    """uvicorn serving the service in a thread of this process, on a free loopback port."""
    import threading
    import uvicorn
    import mitwelten_service as service
    from devkit.services import free_port
    server = uvicorn.Server(uvicorn.Config(service.create_app(config), host='127.0.0.1', port=free_port(),
                                           log_config=None, access_log=True, lifespan='on'))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 'the service to start', 30)
    assert server.started, 'the service did not start'
    try:
        yield f'http://127.0.0.1:{server.config.port}'
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def service(world, issuer):
    with service_in_thread(service_config(world, issuer)) as url:
        yield ServiceUnderTest(url, issuer, world)


def service_process(world, issuer, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """The service as its own process (`python mitwelten_service.py`), to kill or to run several of."""
    from devkit.services import free_port
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / 'mitwelten_service.py'), '--port', str(port)],
        env={**world.env, 'MITWELTEN_OIDC_ISSUER': issuer.url, 'MITWELTEN_OIDC_AUDIENCE': issuer.audience,
             **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f'http://127.0.0.1:{port}'

    def answers() -> bool:
        import urllib.request
        if process.poll() is not None:
            return True
        try:
            urllib.request.urlopen(url + '/healthz', timeout=2).close()
            return True
        except OSError:
            return False
    wait_for(answers, 'the service process to answer', 60)
    assert process.poll() is None, process.stdout.read()
    return process, url
