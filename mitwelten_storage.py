#!/usr/bin/env python3
"""mitwelten-storage: keep Mitwelten's research files safe across storage tiers.

A PostgreSQL catalog knows every file (files_image, files_audio) and which storage backend holds
which version of it (mm_files_image_storage, mm_files_audio_storage). Backends are S3 buckets
(online tiers) and local archive disks. This tool registers backends, lists them, and copies
batches of files between them so that one unaltered, checked original of every file always
exists and the catalog always tells the truth.

The module is laid out in sections, in the order a run needs them:

    errors · configuration · catalog · backends · versions · runs · operations · command line

Operations are plain functions (init_db, create_local_backend, create_s3_backend,
list_backends, copy_batch) that the command line calls and the tests call too.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import glob
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable, Iterator

import botocore.exceptions
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from PIL import Image, UnidentifiedImageError
from psycopg2 import sql
from tqdm import tqdm
# boto3 itself is imported where an S3 backend is opened: it takes a tenth of a second to load,
# which a run from disk to disk (a researcher at a workstation) need not pay.

with warnings.catch_warnings():
    # pydub warns at import when ffmpeg is not on PATH (we point it at imageio-ffmpeg's binary)
    # and, on Python 3.11 and 3.12, that the audioop module it uses is deprecated.
    warnings.simplefilter('ignore', RuntimeWarning)
    warnings.simplefilter('ignore', DeprecationWarning)
    from pydub import AudioSegment
    from pydub.audio_segment import extract_wav_headers, read_wav_audio
    from pydub.exceptions import CouldntDecodeError

log = logging.getLogger('mitwelten_storage')

TOOL_DIR = Path(__file__).resolve().parent
SCHEMA_FILE = TOOL_DIR / 'sql' / 'schema.sql'
DEFAULT_SCHEMA = 'prod'
DEFAULT_JOBS = 8
CHUNK = 1024 * 1024

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# =================================================================================================
# Errors
# =================================================================================================

class StorageError(Exception):
    """Base of every error this tool reports to its user as a message rather than a traceback."""


class ConfigError(StorageError):
    """Usage or configuration is wrong (unknown backend or batch, wrong disk, server down at
    start). Nothing has been done; the command exits with status 2."""


class RunAborted(StorageError):
    """A run cannot go on (disk full, disk gone, server unreachable): the files in flight are
    finished and recorded, the rest is left for the next run."""


class FileFailure(StorageError):
    """One file could not be handled; the run goes on with the others and exits with status 1."""

    def __init__(self, message: str, object_name: str | None = None):
        super().__init__(message)
        self.object_name = object_name


class ChecksumMismatch(FileFailure):
    pass


class UnsafeObjectName(FileFailure):
    pass


class SourceMissing(FileFailure):
    pass


def crash_point(name: str) -> None:
    """Test hook for rule 5: with MITWELTEN_CRASH_AT=NAME:N in the environment, the process kills
    itself with SIGKILL the N-th time it passes the point NAME, so the tests can crash a run at
    each step that matters and check that running the command again ends well."""
    if _CRASH_AT and _CRASH_AT[0] == name:
        with _CRASH_LOCK:
            _CRASH_AT[2] += 1
            if _CRASH_AT[2] == _CRASH_AT[1]:
                os.kill(os.getpid(), signal.SIGKILL)


def _parse_crash_at(value: str) -> list | None:
    name, _, count = value.partition(':')
    return [name, int(count or 1), 0] if name else None


_CRASH_AT = _parse_crash_at(os.environ.get('MITWELTEN_CRASH_AT', ''))
_CRASH_LOCK = threading.Lock()


# =================================================================================================
# Configuration
# =================================================================================================

@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the catalog is: a libpq DSN ('' means libpq's own defaults: PGHOST, ~/.pgpass, …)
    and the schema that holds Mitwelten's tables."""
    dsn: str = ''
    schema: str = DEFAULT_SCHEMA

    @classmethod
    def from_env(cls, dsn: str | None = None, schema: str | None = None) -> 'Settings':
        return cls(dsn=dsn if dsn is not None else os.environ.get('MITWELTEN_DB', ''),
                   schema=schema or os.environ.get('MITWELTEN_DB_SCHEMA') or DEFAULT_SCHEMA)


def describe_dsn(dsn: str) -> str:
    """The connection target without its password, for messages."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn) if dsn else {}
    except psycopg2.ProgrammingError:
        return 'the database given by --db / MITWELTEN_DB (not a valid connection string)'
    host = params.get('host') or os.environ.get('PGHOST') or 'local socket'
    port = params.get('port') or os.environ.get('PGPORT') or '5432'
    dbname = params.get('dbname') or os.environ.get('PGDATABASE') or '(default database)'
    user = params.get('user') or os.environ.get('PGUSER') or '(default user)'
    return f"database '{dbname}' on {host}:{port} as {user}"


@dataclasses.dataclass(frozen=True)
class S3Location:
    """An S3 backend's url_prefix, `http[s]://HOST[:PORT]/BUCKET[/PREFIX]`, taken apart."""
    endpoint: str     # http[s]://HOST[:PORT]
    netloc: str       # HOST[:PORT]: also the name of the AWS profile used for this server
    bucket: str
    prefix: str       # '' or 'some/prefix/': prepended to object names to make keys

    BUCKET_RE = re.compile(r'^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$')

    @classmethod
    def parse(cls, url: str) -> 'S3Location':
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise ConfigError(f"S3 URL '{url}' must look like http[s]://HOST[:PORT]/BUCKET[/PREFIX]")
        if parts.username or parts.password:
            raise ConfigError('S3 URL must not contain credentials: put them in an AWS profile named after '
                              f'the host ({parts.hostname}) or in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY')
        if parts.query or parts.fragment:
            raise ConfigError(f"S3 URL '{url}' must not have a query or fragment")
        path = [p for p in parts.path.split('/') if p]
        if not path:
            raise ConfigError(f"S3 URL '{url}' names no bucket: http[s]://HOST[:PORT]/BUCKET[/PREFIX]")
        bucket = path[0]
        if not cls.BUCKET_RE.match(bucket) or '..' in bucket:
            raise ConfigError(f"'{bucket}' in S3 URL '{url}' is not a valid bucket name")
        if any(p in ('.', '..') for p in path[1:]):
            raise ConfigError(f"S3 URL '{url}' has '.' or '..' in its prefix")
        prefix = '/'.join(path[1:]) + '/' if len(path) > 1 else ''
        netloc = parts.netloc.lower()
        return cls(f'{parts.scheme}://{netloc}', netloc, bucket, prefix)

    @property
    def url(self) -> str:
        return f'{self.endpoint}/{self.bucket}' + (f'/{self.prefix.rstrip("/")}' if self.prefix else '')


def s3_session(location: S3Location):
    """boto3's standard credential chain, except that an AWS profile named exactly like the
    server (`HOST:PORT`, else `HOST`) is used for it: several servers with different keys then
    work side by side."""
    import boto3
    session = boto3.Session()
    host = location.netloc.split(':')[0]
    for profile in (location.netloc, host):
        if profile in session.available_profiles:
            return boto3.Session(profile_name=profile)
    return session


def s3_client(location: S3Location, **options):
    """An S3 client for the server of `location`, with its credentials (see s3_session)."""
    from botocore.config import Config
    session = s3_session(location)
    return session.client('s3', endpoint_url=location.endpoint,
                          config=Config(region_name=session.region_name or 'us-east-1',
                                        s3={'addressing_style': 'path'}, **options))


# =================================================================================================
# Catalog
# =================================================================================================

@dataclasses.dataclass(frozen=True)
class Group:
    """A kind of file in the catalog: its table and its storage table."""
    name: str
    files_table: str
    storage_table: str


GROUPS = {
    'image': Group('image', 'files_image', 'mm_files_image_storage'),
    'audio': Group('audio', 'files_audio', 'mm_files_audio_storage'),
}


@dataclasses.dataclass(frozen=True)
class BackendRecord:
    storage_id: int
    url_prefix: str
    type: str
    priority: int
    notes: str | None
    created_at: dt.datetime

    def describe(self) -> str:
        return f'backend {self.storage_id} ({self.type} {self.url_prefix})'


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """One file of a batch, as the selection yields it."""
    file_id: int
    object_name: str
    file_size: int
    sha256: str
    source_type: int = 0              # the version the source backend holds
    target_type: int | None = None    # the version the target holds, if any (archive)


def connect_catalog(settings: Settings, *, require_tables: bool = True):
    """A connection to the catalog with search_path set to the schema.

    With `require_tables`, checks that the schema holds the storage tables, so that a wrong
    --schema gives a clear message instead of failing halfway through a run."""
    try:
        conn = psycopg2.connect(settings.dsn, application_name='mitwelten-storage', connect_timeout=15)
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else 'connection failed'
        raise ConfigError(f'cannot connect to the catalog, {describe_dsn(settings.dsn)}: {reason} '
                          '(set --db or MITWELTEN_DB)') from None
    except psycopg2.ProgrammingError as exc:
        raise ConfigError(f'--db / MITWELTEN_DB is not a valid connection string: {exc}') from None
    with conn.cursor() as cur:
        cur.execute(sql.SQL('SET search_path TO {}').format(sql.Identifier(settings.schema)))
        if require_tables:
            cur.execute('SELECT to_regclass(%s)', ('storage_backend',))
            if cur.fetchone()[0] is None:
                conn.close()
                raise ConfigError(f"schema '{settings.schema}' in {describe_dsn(settings.dsn)} has no "
                                  'table storage_backend: run `mitwelten_storage.py init-db`, or name '
                                  'the right schema with --schema / MITWELTEN_DB_SCHEMA')
    conn.commit()
    return conn


BACKEND_COLUMNS = 'storage_id, url_prefix, type, priority, notes, created_at'


def fetch_backend(conn, storage_id: int) -> BackendRecord:
    with conn.cursor() as cur:
        cur.execute(f'SELECT {BACKEND_COLUMNS} FROM storage_backend WHERE storage_id = %s', (storage_id,))
        row = cur.fetchone()
    conn.commit()
    if row is None:
        raise ConfigError(f'no storage backend with id {storage_id} in the catalog (see `info`)')
    return BackendRecord(*row)


def fetch_backends(conn) -> list[BackendRecord]:
    with conn.cursor() as cur:
        cur.execute(f'SELECT {BACKEND_COLUMNS} FROM storage_backend ORDER BY storage_id')
        rows = cur.fetchall()
    conn.commit()
    return [BackendRecord(*row) for row in rows]


class CatalogWriter:
    """Collects the row changes a run makes and commits them in batches: inserts (a backend now
    holds a version), type changes (a backend's version replaced) and removals.

    A change is handed over only once the bytes it speaks of are durable and checked at the
    backend (rule 1), so committing later can lose changes to a crash but never record a file
    that is not there; the next run finds such files and records them then."""

    def __init__(self, conn, group: Group, every_rows: int = 500, every_seconds: float = 5.0,
                 backends: tuple = ()):
        self.conn = conn
        self.backends = backends       # synced before every commit: what is recorded is durable
        self.table = sql.Identifier(group.storage_table)
        self.every_rows = every_rows
        self.every_seconds = every_seconds
        self.inserts: list[tuple[int, int, int]] = []
        self.type_changes: list[tuple[int, int, int, int]] = []
        self.removals: list[tuple[int, int]] = []
        self.last_flush = time.monotonic()

    @property
    def pending(self) -> int:
        return len(self.inserts) + len(self.type_changes) + len(self.removals)

    def add(self, file_id: int, storage_id: int, version_type: int) -> None:
        self.inserts.append((file_id, storage_id, version_type))

    def change_type(self, file_id: int, storage_id: int, old_type: int, new_type: int) -> None:
        self.type_changes.append((file_id, storage_id, old_type, new_type))

    def remove(self, file_id: int, storage_id: int) -> None:
        self.removals.append((file_id, storage_id))

    def due(self) -> bool:
        return self.pending >= self.every_rows or (
            self.pending > 0 and time.monotonic() - self.last_flush >= self.every_seconds)

    def maybe_flush(self) -> None:
        if self.due():
            self.flush()

    def flush(self) -> None:
        if self.pending:
            for backend in self.backends:
                backend.sync()
            with self.conn.cursor() as cur:
                if self.inserts:
                    psycopg2.extras.execute_values(cur, sql.SQL(
                        'INSERT INTO {} (file_id, storage_id, type, created_at, updated_at) VALUES %s '
                        'ON CONFLICT (file_id, storage_id) DO NOTHING').format(self.table).as_string(cur),
                        self.inserts, template='(%s, %s, %s, now(), now())', page_size=1000)
                if self.type_changes:
                    psycopg2.extras.execute_values(cur, sql.SQL(
                        'UPDATE {} AS s SET type = v.new_type, updated_at = now() '
                        'FROM (VALUES %s) AS v (file_id, storage_id, old_type, new_type) '
                        'WHERE s.file_id = v.file_id AND s.storage_id = v.storage_id AND s.type = v.old_type'
                    ).format(self.table).as_string(cur), self.type_changes, page_size=1000)
                if self.removals:
                    psycopg2.extras.execute_values(cur, sql.SQL(
                        'DELETE FROM {} AS s USING (VALUES %s) AS v (file_id, storage_id) '
                        'WHERE s.file_id = v.file_id AND s.storage_id = v.storage_id').format(self.table).as_string(cur),
                        self.removals, page_size=1000)
            self.conn.commit()
            crash_point('after-commit')
            self.inserts.clear()
            self.type_changes.clear()
            self.removals.clear()
        self.last_flush = time.monotonic()

    def originals_elsewhere(self, file_ids: list[int], storage_id: int) -> dict[int, int]:
        """How many committed rows record the original of each file on backends other than
        `storage_id`: the checked copies that let an original leave it (rule 3)."""
        if not file_ids:
            return {}
        with self.conn.cursor() as cur:
            cur.execute(sql.SQL('SELECT file_id, count(*) FROM {} WHERE file_id = ANY(%s) AND storage_id <> %s '
                                'AND type = 0 GROUP BY file_id').format(self.table), (file_ids, storage_id))
            counts = dict(cur.fetchall())
        self.conn.commit()
        return counts


# --- batches -------------------------------------------------------------------------------------

def load_batches(path: Path | None = None) -> dict:
    """The batches defined in batches.py (next to this tool), by id."""
    path = path or TOOL_DIR / 'batches.py'
    if not path.exists():
        raise ConfigError(f'{path} not found: it defines the batches')
    spec = importlib.util.spec_from_file_location('batches', path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a researcher's edit broke the file: say where
        raise ConfigError(f'{path} cannot be loaded: {type(exc).__name__}: {exc}') from None
    batches = {}
    for batch in getattr(module, 'BATCHES', []):
        if batch.group not in GROUPS:
            raise ConfigError(f"{path}: batch '{batch.id}' has group '{batch.group}'; use 'image' or 'audio'")
        if batch.id in batches:
            raise ConfigError(f"{path}: batch id '{batch.id}' is defined twice")
        batches[batch.id] = batch
    return batches


def find_batch(batch_id: str, path: Path | None = None):
    batches = load_batches(path)
    if batch_id not in batches:
        known = ', '.join(sorted(batches)) or '(none)'
        raise ConfigError(f"unknown batch '{batch_id}'; batches.py defines: {known}")
    return batches[batch_id]


def batch_sql(batch) -> str:
    """The batch's SELECT, ready to nest as a subquery. Its text is never passed through
    psycopg2's parameter formatting, so a researcher can write LIKE 'FS1%' as it is."""
    text = batch.sql.strip().rstrip(';').strip()
    if not text:
        raise ConfigError(f"batch '{batch.id}' has no SQL")
    return text


class Selection:
    """The files of a batch that SOURCE holds, streamed from a server-side cursor: a production
    batch holds 1.7 million files and is never loaded whole.

    For `copy` (archive=False): files SOURCE holds as version `version_type` or as the original,
    and TARGET holds in no version. For `archive`: files SOURCE (the active tier) holds as the
    original, with whatever version TARGET (the archive) already holds of them."""

    def __init__(self, conn, batch, source_id: int, target_id: int, version_type: int,
                 limit: int | None = None, archive: bool = False):
        self.conn = conn
        self.batch = batch
        self.group = GROUPS[batch.group]
        self.params = {'source': source_id, 'target': target_id, 'type': version_type,
                       'types': (0,) if archive else (version_type, 0)}
        self.todo = 'TRUE' if archive else 't.file_id IS NULL'
        self.limit = limit

    def _compose(self, head: str, tail: str) -> str:
        storage = self.group.storage_table
        joins = (') AS b\n'
                 f'JOIN {storage} s ON s.file_id = b.file_id AND s.storage_id = %(source)s AND s.type IN %(types)s\n'
                 f'LEFT JOIN {storage} t ON t.file_id = b.file_id AND t.storage_id = %(target)s\n')
        with self.conn.cursor() as cur:
            head = cur.mogrify(head, self.params).decode()
            tail = cur.mogrify(joins + tail, self.params).decode()
        return f'{head}\n{batch_sql(self.batch)}\n{tail}'

    def _run(self, cur, text: str) -> None:
        try:
            cur.execute(text)
        except psycopg2.Error as exc:
            self.conn.rollback()
            detail = (exc.pgerror or str(exc)).strip().splitlines()[0]
            raise ConfigError(f"batch '{self.batch.id}' (batches.py) cannot be selected: {detail}") from None

    def counts(self) -> dict:
        """How many files of the batch are to do (and their bytes), how many TARGET holds as
        the version asked for already, and how many in another version."""
        head = (f'SELECT count(*) FILTER (WHERE {self.todo}),\n'
                f'       coalesce(sum(b.file_size) FILTER (WHERE {self.todo}), 0),\n'
                '       count(*) FILTER (WHERE t.type = %(type)s),\n'
                '       count(*) FILTER (WHERE t.type <> %(type)s),\n'
                '       count(*)\n'
                'FROM (')
        with self.conn.cursor() as cur:
            self._run(cur, self._compose(head, ''))
            todo, todo_bytes, done, other, at_source = cur.fetchone()
        self.conn.commit()
        if self.limit is not None and todo > self.limit:
            todo, todo_bytes = self.limit, None
        return {'todo': todo, 'todo_bytes': todo_bytes, 'done': done, 'other_version': other,
                'at_source': at_source}

    def __iter__(self) -> Iterator[FileRecord]:
        head = 'SELECT b.file_id, b.object_name, b.file_size, b.sha256, s.type, t.type FROM ('
        tail = f'WHERE {self.todo} ORDER BY b.file_id'
        if self.limit is not None:
            tail += f' LIMIT {int(self.limit)}'
        cur = self.conn.cursor(name=f'selection_{uuid.uuid4().hex[:8]}')
        cur.itersize = 2000
        try:
            self._run(cur, self._compose(head, tail))
            last_id = None
            for file_id, object_name, file_size, sha256, source_type, target_type in cur:
                if file_id == last_id:   # a batch whose joins repeat a file
                    continue
                last_id = file_id
                yield FileRecord(file_id, object_name, int(file_size), (sha256 or '').strip().lower(),
                                 source_type, target_type)
        finally:
            with contextlib.suppress(psycopg2.Error):
                cur.close()
                self.conn.commit()


# =================================================================================================
# Backends
# =================================================================================================

DOT_FILE = '.mitwelten-storage-id'
LOCK_FILE = '.mitwelten-storage.lock'
TMP_SUFFIX = '.mwtmp'
# Marks this process's temporary files: a run holds the disk's lock, so a temporary file without
# this mark is a leftover of a killed run, and one with it belongs to a write in flight.
RUN_MARK = uuid.uuid4().hex[:10]
_TMP_NUMBERS = itertools.count()


def safe_object_parts(object_name: str) -> list[str]:
    """The path parts of an object name, refusing any name that could lead outside a backend's
    root (rule 4): absolute names, '..', '.', empty parts, control characters."""
    if not object_name or object_name.startswith('/'):
        raise UnsafeObjectName(f'unsafe object name {object_name!r}: empty or absolute', object_name)
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in object_name):
        raise UnsafeObjectName(f'unsafe object name {object_name!r}: control character', object_name)
    parts = object_name.split('/')
    if any(part in ('', '.', '..') for part in parts):
        raise UnsafeObjectName(f"unsafe object name {object_name!r}: empty, '.' or '..' part", object_name)
    return parts


def sha256_hex_to_b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def full_fsync(fd: int) -> None:
    """fsync that reaches the disk: on macOS plain fsync stops at the drive's cache."""
    if hasattr(fcntl, 'F_FULLFSYNC'):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    try:
        full_fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path):
    """A file written under a temporary name in the same folder, fsynced, then renamed into
    place: `path` is either its old self or the whole new file, never half written (rule 2)."""
    tmp = path.with_name(f'.{path.name}.{RUN_MARK}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}')
    try:
        with open(tmp, 'x', encoding='utf-8') as handle:
            yield handle
            handle.flush()
            full_fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def read_dot_file(root: Path) -> dict[str, str]:
    """The key=value lines of a disk's .mitwelten-storage-id, as the earlier Mitwelten script
    wrote them (storage_id, created_at, storage_dir, url_prefix, device_label)."""
    values = {}
    for line in (root / DOT_FILE).read_text(encoding='utf-8').splitlines():
        line = line.strip()
        if line and not line.startswith('#') and '=' in line:
            key, value = line.split('=', 1)
            values[key.strip()] = value.strip()
    return values


def parse_timestamp(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


def dot_file_mismatch(root: Path, record: BackendRecord) -> str | None:
    """Why the disk at `root` is not backend `record`, or None when its dot-file matches the
    catalog row (storage_id and created_at)."""
    dot_path = root / DOT_FILE
    if not dot_path.is_file():
        return f'{dot_path} not found: the disk of {record.describe()} is not mounted there'
    try:
        values = read_dot_file(root)
    except (OSError, UnicodeDecodeError) as exc:
        return f'cannot read {dot_path}: {exc}'
    found_id = values.get('storage_id', '?')
    created = parse_timestamp(values.get('created_at', ''))
    if found_id != str(record.storage_id) or created != record.created_at:
        return (f'wrong disk at {root}: its {DOT_FILE} says storage_id={found_id}, created_at='
                f"{values.get('created_at', '?')}, but the catalog's backend {record.storage_id} was created "
                f'at {record.created_at}')
    return None


DEFAULT_MOUNT_ROOTS = ('/Volumes', '/media/*', '/run/media/*/*', '/mnt')


def mount_roots() -> list[str]:
    """Where disks get mounted (glob patterns): macOS, Linux desktops, by hand.
    MITWELTEN_MOUNT_ROOTS (separated by ':') replaces the list."""
    configured = os.environ.get('MITWELTEN_MOUNT_ROOTS')
    if configured is not None:
        return [root for root in configured.split(os.pathsep) if root]
    return list(DEFAULT_MOUNT_ROOTS)


def find_disk(record: BackendRecord) -> Path | None:
    """The folder, under the mount roots, whose dot-file matches the backend: each root itself
    and the folders in it (a disk, or a backend folder at the top of a disk)."""
    for pattern in mount_roots():
        for candidate in sorted(glob.glob(os.path.expanduser(pattern))):
            places = [Path(candidate)]
            with contextlib.suppress(OSError), os.scandir(candidate) as entries:
                places += sorted(Path(e.path) for e in entries if not e.name.startswith('.') and e.is_dir())
            for place in places:
                with contextlib.suppress(OSError):
                    if (place / DOT_FILE).is_file() and dot_file_mismatch(place, record) is None:
                        return place
    return None


def notice(text: str) -> None:
    """A message for the user that is neither a result nor an error."""
    tqdm.write(f'note: {text}', file=sys.stderr)


class Backend:
    """What every backend offers: streamed reads, atomic checked writes, and deletes of
    objects named by their catalog object_name. LocalBackend and S3Backend implement it."""

    record: BackendRecord
    kind: str

    def location(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return f'backend {self.record.storage_id} ({self.kind} {self.location()})'

    def check(self, writing: bool) -> None:
        """Raise ConfigError unless the backend is reachable (and writable, if `writing`)."""
        raise NotImplementedError

    def size(self, object_name: str) -> int | None:
        """The stored object's size, or None if it is not there."""
        raise NotImplementedError

    def read(self, object_name: str) -> Iterator[bytes]:
        """The object's bytes in chunks; SourceMissing if it is not there."""
        raise NotImplementedError

    def write(self, object_name: str, chunks: Iterable[bytes], size: int, content_type: str,
              sha256_hex: str | None = None, tags: dict | None = None) -> None:
        """Store the object so that it is whole and durable under its final name when this
        returns, and never partly there: if `chunks` raises, nothing stands under the name."""
        raise NotImplementedError

    def delete(self, object_name: str) -> None:
        """Remove the object; removing one that is not there is not an error."""
        raise NotImplementedError

    def tags(self, object_name: str) -> dict | None:
        """The object's tags, where the backend keeps tags (S3)."""
        return None

    @contextlib.contextmanager
    def writing(self):
        """Held while a run writes to the backend."""
        yield

    def tidy(self, object_name: str) -> None:
        """Remove what a killed run may have left beside the object (temporary files)."""

    def sync(self) -> None:
        """Make the writes and deletes so far durable: called before the catalog records them."""


class LocalBackend(Backend):
    """An archive disk: ROOT/.mitwelten-storage-id, ROOT/README.md, ROOT/archive/<object name>."""

    kind = 'local'

    def __init__(self, record: BackendRecord, root: Path | None = None):
        self.record = record
        self.given_path = root is not None        # --path / --source-path / --target-path
        self.root = Path(root or record.url_prefix)
        self.archive = self.root / 'archive'
        self.found_elsewhere = False
        self._checked_dirs: set[Path] = set()
        self._cleaned_dirs: set[Path] = set()
        self._unsynced_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def location(self) -> str:
        return str(self.root)

    def check(self, writing: bool) -> None:
        """Find the disk and make sure it is this backend: its dot-file must match the catalog
        row (storage_id and created_at). Not at its recorded path, the disk is looked for under
        the usual mount roots; a path given by the user is used as it is."""
        problem = dot_file_mismatch(self.root, self.record)
        if problem and not self.given_path:
            found = find_disk(self.record)
            if found:
                notice(f'{self.describe()} is not at its recorded path; found it at {found} (its {DOT_FILE} '
                       'matches)')
                self.root, self.found_elsewhere, problem = found, True, None
        if problem:
            hint = '--target-path' if writing else '--source-path'
            if not self.root.is_dir():
                raise ConfigError(f'{self.describe()} is not mounted: {self.root} does not exist and no disk with '
                                  f'its {DOT_FILE} is mounted under {", ".join(mount_roots())}; pass {hint} (or '
                                  '--path) where the disk is mounted now')
            raise ConfigError(f'refusing to use {self.describe()}: {problem}')
        storage_dir = read_dot_file(self.root).get('storage_dir') or 'archive'
        if '/' in storage_dir or storage_dir in ('.', '..'):
            raise ConfigError(f"{self.root / DOT_FILE}: storage_dir '{storage_dir}' must be a folder name")
        self.archive = self.root / storage_dir
        if not self.archive.is_dir():
            raise ConfigError(f'{self.archive} is missing on {self.describe()}')
        if writing and not os.access(self.archive, os.W_OK):
            raise ConfigError(f'{self.archive} is not writable ({self.describe()})')

    @contextlib.contextmanager
    def writing(self):
        # One writer per disk: any temporary file found during a run is then a leftover of a
        # killed run, safe to remove.
        lock_path = self.root / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f'{self.describe()} is in use by another mitwelten-storage run '
                              f'(lock {lock_path}); wait for it to finish') from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def path(self, object_name: str) -> Path:
        return self.archive.joinpath(*safe_object_parts(object_name))

    def _ensure_dir(self, directory: Path) -> None:
        """Create `directory` under the archive root, refusing to pass through symlinks, so no
        object name can lead a write outside the root (rule 4)."""
        if directory in self._checked_dirs:
            return
        created = []
        current = self.archive
        for part in directory.relative_to(self.archive).parts:
            current = current / part
            try:
                os.mkdir(current)
                created.append(current)
            except FileExistsError:
                pass
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                raise UnsafeObjectName(f'{current} is not a plain folder (a link or a file): refusing to write '
                                       'through it')
        for new_dir in created:   # make the new folders' entries durable too
            fsync_dir(new_dir.parent)
        with self._dirs_lock:
            self._checked_dirs.add(directory)

    def tidy(self, object_name: str) -> None:
        directory = self.path(object_name).parent
        if directory.is_dir():
            self._remove_leftovers(directory)

    def _remove_leftovers(self, directory: Path) -> None:
        """Remove temporary files that a killed run left in `directory` (once per run; the
        run holds the disk's lock, so no other run is writing them)."""
        with self._dirs_lock:
            if directory in self._cleaned_dirs:
                return
            self._cleaned_dirs.add(directory)
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(TMP_SUFFIX) and entry.name.startswith('.') and RUN_MARK not in entry.name \
                        and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        log.info('removed leftover temporary file %s', entry.path)

    def size(self, object_name: str) -> int | None:
        try:
            st = os.lstat(self.path(object_name))
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def read(self, object_name: str) -> Iterator[bytes]:
        path = self.path(object_name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))
        except FileNotFoundError:
            raise SourceMissing(f'{path} is missing on {self.describe()}', object_name) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeObjectName(f'{path} is a symbolic link: refusing to read through it',
                                       object_name) from None
            raise
        with open(fd, 'rb', buffering=0) as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    def write(self, object_name: str, chunks: Iterable[bytes], size: int, content_type: str,
              sha256_hex: str | None = None, tags: dict | None = None) -> None:
        final = self.path(object_name)
        self._ensure_dir(final.parent)
        self._remove_leftovers(final.parent)
        # Temporary name in the same folder (rename stays atomic), hidden, and recognisable by
        # its suffix for the clean-up above (rule 2).
        tmp = final.with_name(f'.{final.name[:200]}.{RUN_MARK}-{next(_TMP_NUMBERS)}{TMP_SUFFIX}')
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0), 0o644)
        try:
            with open(fd, 'wb', buffering=0) as handle:    # chunks are large: no second buffer
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[handle.write(view):]
                full_fsync(handle.fileno())
                written = os.fstat(handle.fileno()).st_size
            if written != size:
                raise FileFailure(f'{tmp}: wrote {written} bytes, expected {size}', object_name)
            crash_point('before-rename')
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._changed(final.parent)

    def delete(self, object_name: str) -> None:
        path = self.path(object_name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            self._changed(path.parent)

    def _changed(self, directory: Path) -> None:
        with self._dirs_lock:
            self._unsynced_dirs.add(directory)

    def sync(self) -> None:
        # The renames and removals since the last commit reach the disk in one go per folder,
        # before the catalog records them (rule 1): one fsync per folder, not per file.
        with self._dirs_lock:
            directories, self._unsynced_dirs = self._unsynced_dirs, set()
        for directory in directories:
            fsync_dir(directory)


def is_md5_etag(etag: str) -> bool:
    return bool(re.fullmatch(r'[0-9a-f]{32}', etag))


class S3Backend(Backend):
    """A bucket (and optional key prefix) on an S3 server: AWS, MinIO, or any compatible one."""

    kind = 's3'
    # Up to this size an object is read into memory and written with one PUT whose checksums
    # the server verifies; larger ones stream through the transfer manager's multipart upload.
    SINGLE_PUT_LIMIT = 32 * 1024 * 1024
    WHOLE_READ_LIMIT = 8 * 1024 * 1024

    def __init__(self, record: BackendRecord, jobs: int = DEFAULT_JOBS):
        from boto3.s3.transfer import TransferConfig
        self.record = record
        self.where = S3Location.parse(record.url_prefix)
        self.client = s3_client(
            self.where,
            max_pool_connections=max(10, jobs + 4),
            retries={'max_attempts': 5, 'mode': 'standard'},
            connect_timeout=10, read_timeout=120,
            # The tool checks every byte itself (sha256 against the catalog) and sends
            # ChecksumSHA256 with its uploads; botocore's own CRC32 on top only costs CPU.
            request_checksum_calculation='when_required', response_checksum_validation='when_required',
        )
        self.transfer_config = TransferConfig(multipart_threshold=self.SINGLE_PUT_LIMIT,
                                              multipart_chunksize=16 * 1024 * 1024, max_concurrency=2)

    def location(self) -> str:
        return self.where.url

    def key(self, object_name: str) -> str:
        safe_object_parts(object_name)
        return self.where.prefix + object_name

    def check(self, writing: bool) -> None:
        check_bucket(self.client, self.where, self.describe())

    def size(self, object_name: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.where.bucket, Key=self.key(object_name))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get('Error', {}).get('Code') in ('404', 'NoSuchKey', 'NotFound'):
                return None
            raise
        return head['ContentLength']

    def read(self, object_name: str) -> Iterator[bytes]:
        try:
            response = self.client.get_object(Bucket=self.where.bucket, Key=self.key(object_name))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get('Error', {}).get('Code') in ('404', 'NoSuchKey', 'NotFound'):
                raise SourceMissing(f'object {self.key(object_name)} is missing in {self.describe()}',
                                    object_name) from None
            raise
        body = response['Body']
        try:
            # A camera image in one read: far less per-byte Python than 1 MiB chunks. Larger
            # objects stream in pieces of that size, so memory stays bounded by --jobs.
            if response.get('ContentLength', self.WHOLE_READ_LIMIT + 1) <= self.WHOLE_READ_LIMIT:
                yield body.read()
            else:
                yield from body.iter_chunks(self.WHOLE_READ_LIMIT)
        finally:
            body.close()

    def write(self, object_name: str, chunks: Iterable[bytes], size: int, content_type: str,
              sha256_hex: str | None = None, tags: dict | None = None) -> None:
        key = self.key(object_name)
        extra = {'ContentType': content_type}
        if tags:
            extra['Tagging'] = urllib.parse.urlencode(tags)
        if size <= self.SINGLE_PUT_LIMIT:
            data = b''.join(chunks)   # a checksum mismatch raises here, before anything is sent
            if sha256_hex:
                extra['ChecksumSHA256'] = sha256_hex_to_b64(sha256_hex)
            response = self.client.put_object(Bucket=self.where.bucket, Key=key, Body=data, **extra)
            # Servers that verify ChecksumSHA256 have refused a corrupted body already; for
            # the others, a plain (unencrypted, single-part) object's ETag is its MD5.
            etag = response.get('ETag', '').strip('"')
            if not response.get('ServerSideEncryption') and is_md5_etag(etag) \
                    and etag != hashlib.md5(data).hexdigest():
                self._delete_key(key)
                raise FileFailure(f'{self.describe()} stored {key} with a different MD5 than was sent',
                                  object_name)
        else:
            self.client.upload_fileobj(ChunkReader(chunks), self.where.bucket, key, ExtraArgs=extra,
                                       Config=self.transfer_config)
            stored = self.size(object_name)
            if stored != size:
                self._delete_key(key)
                raise FileFailure(f'{self.describe()} stored {key} with {stored} bytes, expected {size}',
                                  object_name)

    def _delete_key(self, key: str) -> None:
        with contextlib.suppress(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            self.client.delete_object(Bucket=self.where.bucket, Key=key)

    def delete(self, object_name: str) -> None:
        self.client.delete_object(Bucket=self.where.bucket, Key=self.key(object_name))

    def tags(self, object_name: str) -> dict | None:
        try:
            response = self.client.get_object_tagging(Bucket=self.where.bucket, Key=self.key(object_name))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get('Error', {}).get('Code') in ('NotImplemented', 'NoSuchKey', '404', 'NotFound'):
                return None     # a server without tagging, or an object gone: nothing to carry over
            raise
        return {tag['Key']: tag['Value'] for tag in response.get('TagSet', [])} or None


class ChunkReader(io.RawIOBase):
    """A read()-able view of a chunk iterator, for boto3's upload_fileobj."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buffer = b''

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            size = len(self._buffer)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def check_bucket(client, where: S3Location, what: str) -> None:
    try:
        client.head_bucket(Bucket=where.bucket)
    except botocore.exceptions.NoCredentialsError:
        raise ConfigError(f'no S3 credentials for {where.netloc}: set AWS_ACCESS_KEY_ID and '
                          f"AWS_SECRET_ACCESS_KEY, or create an AWS profile named '{where.netloc}'") from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError) as exc:
        raise ConfigError(f'cannot reach the S3 server {where.endpoint} ({what}): {exc}') from None
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get('Error', {}).get('Code')
        if code in ('404', 'NoSuchBucket', 'NotFound'):
            raise ConfigError(f"bucket '{where.bucket}' does not exist at {where.endpoint} ({what})") from None
        if code in ('403', 'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch'):
            raise ConfigError(f"access to bucket '{where.bucket}' at {where.endpoint} denied ({what}): "
                              f"check the credentials (AWS profile '{where.netloc}' or the default ones)") from None
        raise ConfigError(f"S3 error on bucket '{where.bucket}' at {where.endpoint} ({what}): {code}") from None


def open_backend(record: BackendRecord, *, path: str | None = None, jobs: int = DEFAULT_JOBS) -> Backend:
    if record.type == 'local':
        return LocalBackend(record, Path(path).expanduser().absolute() if path else None)
    if path:
        raise ConfigError(f'{record.describe()} is an S3 backend: a path applies to local disks only')
    if record.type == 's3':
        return S3Backend(record, jobs=jobs)
    raise ConfigError(f"{record.describe()} has type '{record.type}'; this tool knows 'local' and 's3'")


# =================================================================================================
# Versions
# =================================================================================================
#
# The version table: every version of a file the catalog can record, how its object name is
# formed from the original's, its content type, how it is made from the original (in memory),
# and how stored bytes of it are checked. Type 0 is the original everywhere.

class ConversionError(FileFailure):
    """A version could not be made from the original (or did not check out)."""


# One more than the cores: a conversion also waits (on ffmpeg's pipes, on the GIL), and a core
# should not idle meanwhile (FLAC of 20 recordings on 2 cores: 2.74 s with 2 slots, 2.61 with 3).
CPU_SLOTS = threading.BoundedSemaphore(1 + (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                                            else os.cpu_count() or 2))


@dataclasses.dataclass(frozen=True)
class Version:
    group: str
    type: int
    label: str
    content_type: str | None                       # None: by the original's extension
    name: Callable[[str], str]                     # the version's object name, from the original's
    make: Callable[[bytes, FileRecord], bytes] | None     # original bytes -> version bytes, checked
    check: Callable[[bytes, FileRecord], None]     # are these stored bytes a sound copy of the version?

    def object_name(self, original_name: str) -> str:
        return self.name(original_name)

    def describe(self) -> str:
        return f'{self.group} type {self.type} ({self.label})'

    def made_from(self, original: bytes, record: FileRecord) -> bytes:
        # Conversions take a CPU slot: more of them at once than there are cores would not go
        # faster, only hold more decoded pictures and sample buffers in memory.
        with CPU_SLOTS:
            return self.make(original, record)

    def confirm(self, stored: bytes, record: FileRecord) -> None:
        """`check`, in a CPU slot: checking a stored version decodes it (WebP, FLAC, gzip) as a
        conversion does. Never called from within `made_from`, which already holds a slot."""
        with CPU_SLOTS:
            self.check(stored, record)


def same_name(name: str) -> str:
    return name


def with_extension(extension: str) -> Callable[[str], str]:
    """'a/b/c.jpg' -> 'a/b/c.webp': the extension of the last part replaced (or added)."""
    def name(original: str) -> str:
        folder, _, base = original.rpartition('/')
        stem = base.rsplit('.', 1)[0] if '.' in base.lstrip('.') else base
        return f'{folder}/{stem}{extension}' if folder else f'{stem}{extension}'
    return name


def with_suffix(suffix: str) -> Callable[[str], str]:
    return lambda original: original + suffix


def check_original_bytes(data: bytes, record: FileRecord) -> None:
    check_original(record, len(data), hashlib.sha256(data).hexdigest())


# --- gzip ------------------------------------------------------------------------------------------

def make_gzip(original: bytes, record: FileRecord) -> bytes:
    # mtime=0: the same original always gives the same bytes.
    packed = gzip.compress(original, compresslevel=9, mtime=0)
    check_gzip(packed, record)
    return packed


def check_gzip(packed: bytes, record: FileRecord) -> None:
    try:
        unpacked = gzip.decompress(packed)
    except (OSError, EOFError, zlib.error) as exc:
        raise ConversionError(f'gzip version does not decompress: {exc}', record.object_name) from None
    try:
        check_original_bytes(unpacked, record)
    except ChecksumMismatch as exc:
        raise ConversionError(f'gzip version does not decompress to the original: {exc}',
                              record.object_name) from None


# --- WebP ------------------------------------------------------------------------------------------

WEBP_QUALITY = 80


def fitted_size(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The size of an image of `size` scaled down (never up) to fit in `box`, aspect kept: the
    same rounding as Pillow's thumbnail()."""
    width, height = size
    if width <= box[0] and height <= box[1]:
        return size
    if box[0] / width <= box[1] / height:
        return box[0], max(1, round(height * box[0] / width))
    return max(1, round(width * box[1] / height)), box[1]


def downscaled(original: bytes, record: FileRecord, box: tuple[int, int]) -> tuple[Image.Image, dict]:
    """The image fitted in `box` (downscaled only, aspect kept, pixels not rotated), and what
    to carry over into its version: EXIF (orientation included) and the ICC profile.

    A big JPEG is decoded at 1/2, 1/4 or 1/8 scale where that still covers the target
    (Pillow's draft: the DCT does the first step of the downscale), then resampled with
    LANCZOS. Truncated or unreadable images fail: LOAD_TRUNCATED_IMAGES stays off, so no
    half-grey picture is ever made."""
    try:
        with Image.open(io.BytesIO(original)) as image:
            target = fitted_size(image.size, box)
            if image.format == 'JPEG' and target != image.size:
                image.draft('RGB', target)
            image.load()
            keep = {key: image.info[key] for key in ('exif', 'icc_profile') if image.info.get(key)}
            if image.mode not in ('RGB', 'RGBA'):
                has_alpha = 'A' in image.mode or 'transparency' in image.info
                image = image.convert('RGBA' if has_alpha else 'RGB')
            if image.size != target:
                image = image.resize(target, Image.Resampling.LANCZOS)
            else:
                image = image.copy()
    except UnidentifiedImageError:
        raise ConversionError('not an image that can be read (cannot make a WebP of it)', record.object_name) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ConversionError(f'cannot make a WebP of it: {exc}', record.object_name) from None
    return image, keep


def make_webp(original: bytes, record: FileRecord, box: tuple[int, int]) -> bytes:
    """WebP of the original fitting in `box`, Pillow's encoder at quality 80."""
    image, keep = downscaled(original, record, box)
    out = io.BytesIO()
    try:
        image.save(out, 'WEBP', quality=WEBP_QUALITY, **keep)
    except (OSError, ValueError) as exc:
        raise ConversionError(f'cannot encode the WebP version: {exc}', record.object_name) from None
    webp = out.getvalue()
    check_webp(webp, record, box, expected_size=image.size)
    return webp


def check_webp(data: bytes, record: FileRecord, box: tuple[int, int],
               expected_size: tuple[int, int] | None = None) -> None:
    """A WebP version decodes, at a size that fits the box. Just made (`expected_size` given),
    the encoder's own output is checked by its header alone: decoding it again would cost a
    tenth of the conversion, and `verify` decodes every stored one."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if expected_size is None:
                image.load()
            form, size = image.format, image.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise ConversionError(f'WebP version does not decode: {exc}', record.object_name) from None
    if form != 'WEBP':
        raise ConversionError(f'version is {form}, not WebP', record.object_name)
    if size[0] > box[0] or size[1] > box[1] or (expected_size and size != expected_size):
        raise ConversionError(f'WebP version is {size[0]}×{size[1]}, expected '
                              f'{expected_size or box}', record.object_name)


# --- FLAC ------------------------------------------------------------------------------------------

PCM_FORMATS = {16: 's16le', 24: 's24le'}   # what ffmpeg's FLAC encoder keeps exactly, by bits per sample
_FFMPEG: list[str] = []


def ffmpeg_executable() -> str:
    """ffmpeg from PATH, else the one in the imageio-ffmpeg wheel: nothing to install by hand."""
    if not _FFMPEG:
        found = shutil.which('ffmpeg')
        if not found:
            import imageio_ffmpeg
            found = imageio_ffmpeg.get_ffmpeg_exe()
        _FFMPEG.append(found)
        AudioSegment.converter = found     # pydub uses the same binary
    return _FFMPEG[0]


def run_ffmpeg(args: list[str], data: bytes, record: FileRecord, what: str) -> bytes:
    """ffmpeg with the input on stdin and the output on stdout: no temporary files.

    Not subprocess.run(input=…): its communicate() feeds the pipe 4 KiB at a time, and with
    several conversions at once those thousands of small writes per recording fight over the
    GIL (measured: more system time than ffmpeg's own encoding). Here the pipes are widened
    to 1 MiB where Linux allows it and each stream has its own thread doing large writes."""
    try:
        process = subprocess.Popen([ffmpeg_executable(), '-hide_banner', '-nostdin', '-loglevel', 'error', *args],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise ConversionError(f'cannot run ffmpeg to {what}: {exc.strerror}', record.object_name) from None
    for pipe in (process.stdin, process.stdout):
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1024 * 1024)
    stderr: list[bytes] = []

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError):    # ffmpeg gave up early: its stderr says why
            process.stdin.write(data)
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()

    threads = [threading.Thread(target=feed, daemon=True),
               threading.Thread(target=lambda: stderr.append(process.stderr.read()), daemon=True)]
    for thread in threads:
        thread.start()
    output = process.stdout.read()
    for thread in threads:
        thread.join()
    process.stdout.close()
    process.stderr.close()
    if process.wait() != 0 or not output:
        reason = b''.join(stderr).decode(errors='replace').strip().splitlines()
        raise ConversionError(f'ffmpeg could not {what}: {reason[-1] if reason else "no output"}',
                              record.object_name)
    return output


@dataclasses.dataclass(frozen=True)
class PcmAudio:
    channels: int
    sample_rate: int
    bits: int
    samples: bytes          # interleaved, signed little-endian, as in the WAV's data chunk

    @property
    def frames(self) -> int:
        return len(self.samples) // (self.channels * self.bits // 8)


def read_wav(original: bytes, record: FileRecord) -> PcmAudio:
    """The PCM samples of a WAV recording (through pydub's WAV reader), refusing what FLAC cannot
    hold losslessly and recordings whose data is cut short."""
    try:
        headers = extract_wav_headers(original)
        wav = read_wav_audio(original, headers)
    except (CouldntDecodeError, struct.error, IndexError, ValueError) as exc:
        raise ConversionError(f'not a WAV recording: {exc}', record.object_name) from None
    if wav.bits_per_sample not in PCM_FORMATS:
        raise ConversionError(f'unsupported sample format: {wav.bits_per_sample}-bit PCM (FLAC versions are made '
                              f'of 16- and 24-bit recordings)', record.object_name)
    if not 1 <= wav.channels <= 8 or not 1 <= wav.sample_rate <= 655350:
        raise ConversionError(f'unsupported WAV: {wav.channels} channels at {wav.sample_rate} Hz',
                              record.object_name)
    declared = headers[-1].size
    frame_bytes = wav.channels * wav.bits_per_sample // 8
    if len(wav.raw_data) < declared or len(wav.raw_data) % frame_bytes:
        raise ConversionError(f'truncated recording: {len(wav.raw_data):,} bytes of samples, the WAV header '
                              f'says {declared:,}', record.object_name)
    return PcmAudio(wav.channels, wav.sample_rate, wav.bits_per_sample, wav.raw_data)


def flac_stream_info(flac: bytes) -> dict:
    """The STREAMINFO block at the start of a FLAC stream."""
    if flac[:4] != b'fLaC' or len(flac) < 42 or flac[4] & 0x7F != 0:
        raise ValueError('no FLAC STREAMINFO block')
    info = flac[8:42]
    return {'sample_rate': int.from_bytes(info[10:13], 'big') >> 4,
            'channels': ((info[12] >> 1) & 0x07) + 1,
            'bits': (((info[12] & 0x01) << 4) | (info[13] >> 4)) + 1,
            'frames': ((info[13] & 0x0F) << 32) | int.from_bytes(info[14:18], 'big'),
            'md5': info[18:34]}


def complete_stream_info(flac: bytes, audio: PcmAudio) -> bytes:
    """ffmpeg writing to a pipe cannot go back to fill in STREAMINFO's sample count and MD5;
    fill them in from the original, so the FLAC checks itself (`flac -t`, and `verify`)."""
    patched = bytearray(flac)
    frames = audio.frames
    patched[8 + 13] = (patched[8 + 13] & 0xF0) | ((frames >> 32) & 0x0F)
    patched[8 + 14:8 + 18] = (frames & 0xFFFFFFFF).to_bytes(4, 'big')
    patched[8 + 18:8 + 34] = hashlib.md5(audio.samples).digest()
    return bytes(patched)


def make_flac(original: bytes, record: FileRecord) -> bytes:
    """Lossless FLAC of a WAV recording, counted only once it decodes to exactly the original's
    samples (16- and 24-bit, any channel count and sample rate)."""
    audio = read_wav(original, record)
    flac = run_ffmpeg(['-f', 'wav', '-i', 'pipe:0', '-map_metadata', '0', '-c:a', 'flac',
                       '-compression_level', '5', '-f', 'flac', 'pipe:1'], original, record, 'encode FLAC')
    try:
        flac = complete_stream_info(flac, audio)
        info = flac_stream_info(flac)
    except (ValueError, IndexError) as exc:
        raise ConversionError(f'FLAC version is malformed: {exc}', record.object_name) from None
    if (info['channels'], info['sample_rate'], info['bits']) != (audio.channels, audio.sample_rate, audio.bits):
        raise ConversionError(f"FLAC version is {info['channels']} channels, {info['sample_rate']} Hz, "
                              f"{info['bits']} bits; the recording is {audio.channels}, {audio.sample_rate} Hz, "
                              f'{audio.bits} bits', record.object_name)
    decoded = decode_flac(flac, audio.bits, record)
    if decoded != audio.samples:
        raise ConversionError('FLAC version does not decode to the original samples', record.object_name)
    return flac


def decode_flac(flac: bytes, bits: int, record: FileRecord) -> bytes:
    pcm = PCM_FORMATS[bits]
    return run_ffmpeg(['-f', 'flac', '-i', 'pipe:0', '-f', pcm, '-c:a', f'pcm_{pcm}', 'pipe:1'],
                      flac, record, 'decode the FLAC version')


def check_flac(flac: bytes, record: FileRecord) -> None:
    """A stored FLAC decodes, and its samples match the MD5 its STREAMINFO carries."""
    try:
        info = flac_stream_info(flac)
    except (ValueError, IndexError) as exc:
        raise ConversionError(f'not a FLAC stream: {exc}', record.object_name) from None
    if info['bits'] not in PCM_FORMATS:
        raise ConversionError(f"FLAC version has {info['bits']}-bit samples", record.object_name)
    decoded = decode_flac(flac, info['bits'], record)
    frames = len(decoded) // (info['channels'] * info['bits'] // 8)
    if info['frames'] and frames != info['frames']:
        raise ConversionError(f"FLAC version decodes to {frames:,} frames, its header says {info['frames']:,}",
                              record.object_name)
    if any(info['md5']) and hashlib.md5(decoded).digest() != info['md5']:
        raise ConversionError('FLAC version does not decode to the samples its MD5 records', record.object_name)


# --- the table -------------------------------------------------------------------------------------

ORIGINAL = 'original'
WEBP_LARGE, WEBP_SMALL = (1920, 1440), (640, 480)


def _webp(box):
    return (lambda data, record: make_webp(data, record, box)), (lambda data, record: check_webp(data, record, box))


VERSIONS: dict[tuple[str, int], Version] = {(v.group, v.type): v for v in [
    Version('image', 0, ORIGINAL, None, same_name, None, check_original_bytes),
    Version('image', 1, 'WebP 1920×1440', 'image/webp', with_extension('.webp'), *_webp(WEBP_LARGE)),
    Version('image', 2, 'WebP 640×480', 'image/webp', with_extension('.webp'), *_webp(WEBP_SMALL)),
    Version('image', 10, 'gzip -9', 'application/gzip', with_suffix('.gz'), make_gzip, check_gzip),
    Version('audio', 0, ORIGINAL, None, same_name, None, check_original_bytes),
    Version('audio', 1, 'FLAC', 'audio/flac', with_extension('.flac'), make_flac, check_flac),
    Version('audio', 10, 'gzip -9', 'application/gzip', with_suffix('.gz'), make_gzip, check_gzip),
]}


def find_version(group: str, version_type: int) -> Version:
    try:
        return VERSIONS[(group, version_type)]
    except KeyError:
        known = ', '.join(f'{t} ({v.label})' for (g, t), v in sorted(VERSIONS.items()) if g == group)
        raise ConfigError(f'no version type {version_type} for {group} files; known types: {known}') from None


ORIGINAL_CONTENT_TYPES = {'.jpg': 'image/jpeg', '.jpeg': 'image/jpeg', '.png': 'image/png', '.tif': 'image/tiff',
                          '.tiff': 'image/tiff', '.wav': 'audio/wav', '.flac': 'audio/flac', '.mp3': 'audio/mpeg'}


def content_type_of(version: Version, object_name: str) -> str:
    if version.content_type:
        return version.content_type
    return ORIGINAL_CONTENT_TYPES.get(Path(object_name).suffix.lower(), 'application/octet-stream')


class CheckedStream:
    """Passes a source's chunks through while hashing them; at the end, raises ChecksumMismatch
    unless the size and sha256 match the catalog's. A writer that consumes it therefore never
    finishes a file whose bytes are not the original's."""

    def __init__(self, chunks: Iterable[bytes], record: FileRecord, progress: Callable[[int], None] | None = None):
        self.chunks = chunks
        self.record = record
        self.progress = progress

    def __iter__(self) -> Iterator[bytes]:
        digest = hashlib.sha256()
        total = 0
        for chunk in self.chunks:
            digest.update(chunk)
            total += len(chunk)
            if total > self.record.file_size:
                raise ChecksumMismatch(f'larger at the source than the catalog\'s {self.record.file_size:,} bytes',
                                       self.record.object_name)
            if self.progress:
                self.progress(len(chunk))
            yield chunk
        check_original(self.record, total, digest.hexdigest())


def check_original(record: FileRecord, size: int, sha256_hex: str) -> None:
    if size != record.file_size:
        raise ChecksumMismatch(f'{size:,} bytes, the catalog says {record.file_size:,}: not the original',
                               record.object_name)
    if sha256_hex != record.sha256:
        raise ChecksumMismatch(f'sha256 {sha256_hex} does not match the catalog\'s {record.sha256}: not the '
                               'original', record.object_name)


def read_original(backend: 'Backend', record: FileRecord, progress: Callable[[int], None] | None = None) -> bytes:
    """The original's bytes, read once and checked against the catalog's size and sha256."""
    return b''.join(CheckedStream(backend.read(record.object_name), record, progress))


def hash_chunks(chunks: Iterable[bytes]) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


# =================================================================================================
# Runs: progress, log file, interruption, outcome counts
# =================================================================================================

def human_bytes(n: float | None) -> str:
    if n is None:
        return '?'
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if abs(n) < 1000 or unit == 'TB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000
    return f'{n:.1f} TB'


def default_log_dir() -> Path:
    if os.environ.get('MITWELTEN_LOG_DIR'):
        return Path(os.environ['MITWELTEN_LOG_DIR'])
    state = os.environ.get('XDG_STATE_HOME') or Path.home() / '.local' / 'state'
    return Path(state) / 'mitwelten-storage' / 'logs'


@dataclasses.dataclass
class RunReport:
    """What a run did, for its summary, its exit status and the tests."""
    command: str
    counts: dict = dataclasses.field(default_factory=dict)
    failures: list = dataclasses.field(default_factory=list)   # (object_name, reason)
    bytes_done: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    aborted: str | None = None
    log_path: Path | None = None
    notes: list = dataclasses.field(default_factory=list)

    @property
    def exit_status(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILURES if (self.failures or self.aborted) else EXIT_OK

    def count(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)


class Run:
    """The frame around a long operation: a log file with every file's outcome, a progress bar
    in bytes, Ctrl-C handling, and the report. Use as a context manager."""

    def __init__(self, command: str, title: str, total_files: int | None, total_bytes: int | None,
                 log_dir: Path | None = None, show_progress: bool | None = None):
        self.report = RunReport(command)
        self.title = title
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.log_dir = Path(log_dir) if log_dir else default_log_dir()
        self.show_progress = show_progress
        self.stop_requested = False
        self.started = time.monotonic()
        self.files_done = 0
        self._lock = threading.Lock()
        self._log_file = None
        self._old_handlers = {}
        self._connection_failures = 0
        self.bar = None

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> 'Run':
        stamp = dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.report.log_path = self.log_dir / f'{stamp}-{self.report.command}-{os.getpid()}.log'
            self._log_file = open(self.report.log_path, 'a', encoding='utf-8', buffering=1)
        except OSError as exc:
            raise ConfigError(f'cannot write the log file in {self.log_dir}: {exc.strerror} '
                              '(set MITWELTEN_LOG_DIR to a writable folder)') from None
        self._log_file.write(f'# mitwelten-storage {self.title}\n# started {stamp}\n'
                             '# time\toutcome\tfile_id\tbytes\tobject_name\tdetail\n')
        self.bar = tqdm(total=self.total_bytes, unit='B', unit_scale=True, unit_divisor=1000,
                        desc=self.report.command, disable=self._progress_disabled(), dynamic_ncols=True,
                        smoothing=0.05, file=sys.stderr)
        self._update_postfix()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self.report.seconds = time.monotonic() - self.started
        if self.bar is not None:
            self.bar.close()
        if self._log_file:
            self._log_file.write(f'# ended after {self.report.seconds:.1f} s: {json.dumps(self.report.counts)}'
                                 f'{", interrupted" if self.report.interrupted else ""}'
                                 f'{", aborted: " + self.report.aborted if self.report.aborted else ""}\n')
            self._log_file.close()

    def _progress_disabled(self) -> bool | None:
        if self.show_progress is None:
            return None   # tqdm: shown on a terminal only
        return not self.show_progress

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.report.interrupted = True
        self.message('interrupted: finishing the files in flight and recording them '
                     '(press Ctrl-C again to stop at once)')

    # -- reporting -------------------------------------------------------------------------------
    def message(self, text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    def progress(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def _update_postfix(self) -> None:
        total = f'/{self.total_files}' if self.total_files is not None else ''
        failed = len(self.report.failures)
        self.bar.set_postfix_str(f'files {self.files_done}{total}' + (f', failed {failed}' if failed else ''),
                                 refresh=False)

    def outcome(self, record: FileRecord, outcome: str, nbytes: int = 0, detail: str = '') -> None:
        """Count and log one file's outcome."""
        with self._lock:
            if outcome != 'failed':
                self._connection_failures = 0
            self.report.counts[outcome] = self.report.counts.get(outcome, 0) + 1
            self.report.bytes_done += nbytes
            self.files_done += 1
            now = dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z'
            self._log_file.write(f'{now}\t{outcome}\t{record.file_id}\t{nbytes}\t{record.object_name}\t'
                                 f'{detail}\n')
            self._update_postfix()

    def set_totals(self, counts: dict) -> None:
        """The progress bar's totals, once the selection has been counted."""
        if counts and self.total_files is None:
            self.total_files = counts['todo']
            self.total_bytes = counts['todo_bytes']
            if self.total_bytes is not None and self.bar is not None:
                self.bar.total = self.total_bytes
                self.bar.refresh()
            self._update_postfix()

    @property
    def stopping(self) -> bool:
        return self.stop_requested or bool(self.report.aborted)

    def failure(self, record: FileRecord, reason: str) -> None:
        self.report.failures.append((record.object_name, reason))
        self.message(f'FAILED {record.object_name}: {reason}')
        self.outcome(record, 'failed', 0, reason)

    def file_failed(self, record: FileRecord, exc: BaseException, backend: 'Backend') -> None:
        """Name the file's failure; stop the run when no further file can succeed (the disk is
        full or gone, the server has stopped answering)."""
        self.failure(record, describe_exception(exc))
        reason = fatal_reason(exc, backend)
        if isinstance(exc, CONNECTION_ERRORS):
            self._connection_failures += 1
            if self._connection_failures >= 24:
                reason = f'{self._connection_failures} transfers in a row could not reach the S3 server'
        else:
            self._connection_failures = 0
        if reason and not self.report.aborted:
            self.report.aborted = reason
            self.message(f'stopping: {reason}')

    def log_line(self, text: str) -> None:
        self._log_file.write(f'# {text}\n')


def describe_exception(exc: BaseException) -> str:
    """A one-line reason for a file's failure, with no credentials and no traceback."""
    if isinstance(exc, StorageError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f' ({exc.filename})' if exc.filename else ''
        return f'{exc.strerror or exc}{where}'
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get('Error', {})
        return f"S3 {exc.operation_name}: {error.get('Code')} {error.get('Message', '')}".strip()
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return f'S3: {exc}'
    return f'{type(exc).__name__}: {exc}'


def fatal_reason(exc: BaseException, target: Backend) -> str | None:
    """Why no further file can succeed (so the run stops), or None for a failure of one file."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f'{target.describe()} is full'
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EIO, errno.ENODEV, errno.ENXIO):
        return f'{target.describe()}: {exc.strerror}; is the disk still attached?'
    if isinstance(target, LocalBackend) and not target.archive.is_dir():
        return f'{target.describe()} disappeared ({target.archive} is gone); is the disk still attached?'
    return None


CONNECTION_ERRORS = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
                     botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)


class Pipeline:
    """Work for a run on `jobs` threads. Items are fed from an iterator as slots free up (so a
    selection of millions is never held whole); each finished piece of work is handed to its
    handler on this thread, which may submit follow-up work. Stops feeding when the run is
    interrupted or aborted; the work in flight finishes."""

    def __init__(self, jobs: int, run: Run):
        self.jobs = jobs
        self.run = run
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix='mitwelten')
        self.pending: dict = {}

    def submit(self, work: Callable, item, on_done: Callable) -> None:
        self.pending[self.pool.submit(work, item)] = (item, on_done)

    def drive(self, items: Iterable, work: Callable, on_done: Callable,
              between: Callable[[bool], None] = lambda idle: None, held: Callable[[], int] = lambda: 0) -> None:
        """`between(idle)` runs after every round, with idle=True once nothing is in flight and
        nothing more will be fed; `held()` counts items waiting outside the pool (they hold
        memory, so they count against the number in flight)."""
        iterator = iter(items)
        exhausted = False
        try:
            while True:
                while not exhausted and not self.run.stopping and len(self.pending) + held() < self.jobs * 2:
                    item = next(iterator, None)
                    if item is None:
                        exhausted = True
                        break
                    self.submit(work, item, on_done)
                if self.pending:
                    done, _ = wait(self.pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        item, handler = self.pending.pop(future)
                        handler(item, future)
                idle = not self.pending and (exhausted or self.run.stopping)
                between(idle)
                if idle and not self.pending:
                    break
        except KeyboardInterrupt:
            # Second Ctrl-C: do not wait for the work in flight; its temporary files are cleaned
            # up by the next run, and nothing unfinished is recorded.
            self.run.report.interrupted = True
            self.pool.shutdown(wait=False, cancel_futures=True)
            raise
        self.pool.shutdown(wait=True)


# =================================================================================================
# Operations
# =================================================================================================

def init_db(settings: Settings) -> str:
    """Create the schema (if missing) and apply sql/schema.sql; idempotent."""
    conn = connect_catalog(settings, require_tables=False)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL('CREATE SCHEMA IF NOT EXISTS {}').format(sql.Identifier(settings.schema)))
            cur.execute(sql.SQL('SET search_path TO {}').format(sql.Identifier(settings.schema)))
            cur.execute(SCHEMA_FILE.read_text(encoding='utf-8'))
            cur.execute('SELECT count(*) FROM pg_tables WHERE schemaname = %s', (settings.schema,))
            tables = cur.fetchone()[0]
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        detail = (exc.pgerror or str(exc)).strip().splitlines()[0]
        raise ConfigError(f"cannot create the catalog schema '{settings.schema}': {detail}") from None
    finally:
        conn.close()
    return f"catalog schema '{settings.schema}' is ready in {describe_dsn(settings.dsn)} ({tables} tables)"


DISK_README = """\
---
title: Mitwelten Storage Backend
storage_id: {storage_id}
created_at: {created_at}
device_label: {label}
priority: {priority}
storage_dir: archive
---

# Mitwelten archive disk {storage_id}: {label}

This disk is storage backend **{storage_id}** of Mitwelten's research data catalog, created
{created_at} (priority {priority}: {tier}). It holds original camera-trap images and audio
recordings under `archive/`, each at the path of its object name in the catalog:
object `0344-6782/2021-07-27/14/0344-6782_2021-07-27T14-42-33Z.jpg` is
`archive/0344-6782/2021-07-27/14/0344-6782_2021-07-27T14-42-33Z.jpg`.

- `.mitwelten-storage-id` identifies this disk to the catalog: do not edit or copy it.
- Do not add, rename or delete files under `archive/` by hand: the catalog records what is
  here, and `mitwelten_storage.py verify {storage_id}` checks it.
- When the disk is mounted somewhere else than `{root}`, name where with `--source-path`,
  `--target-path` or `--path`.

Copy a batch onto this disk:

    python mitwelten_storage.py copy -s SOURCE_ID -t {storage_id} BATCH
"""

PRIORITY_TIERS = {0: 'online S3, public', 1: 'online S3, not public', 2: 'offline archive disk'}


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as handle:
        handle.write(text)


def create_local_backend(settings: Settings, path: str, priority: int, label: str) -> BackendRecord:
    """Register the folder at `path` (an archive disk's mount point) as a local backend: the
    catalog row, the dot-file, README.md and archive/. Refuses, leaving nothing behind, a
    missing folder, one that is already a backend, or a path already registered."""
    root = Path(path).expanduser().absolute()
    if not root.is_dir():
        raise ConfigError(f'{root} does not exist or is not a folder: mount the disk first')
    if (root / DOT_FILE).exists():
        raise ConfigError(f'{root} is already a storage backend ({root / DOT_FILE} exists)')
    for existing in ('README.md', 'archive'):
        if (root / existing).exists():
            raise ConfigError(f'{root / existing} already exists: refusing to overwrite it; '
                              'use an empty disk or folder')
    if not os.access(root, os.W_OK):
        raise ConfigError(f'{root} is not writable')
    label = ' '.join(label.split()).replace('\n', ',')[:128]
    if not label:
        raise ConfigError('the label (-n) must not be empty: name the disk as written on it')
    conn = connect_catalog(settings)
    created: list[Path] = []
    try:
        record = _insert_backend(conn, str(root), 'local', priority, label)
        dot_lines = [f'storage_id={record.storage_id}', f'created_at={record.created_at}',
                     'storage_dir=archive', f'url_prefix={root}', f'device_label={label}']
        try:
            _write_text(root / DOT_FILE, '\n'.join(dot_lines) + '\n')
            created.append(root / DOT_FILE)
            _write_text(root / 'README.md', DISK_README.format(
                storage_id=record.storage_id, created_at=record.created_at.strftime('%Y-%m-%d %H:%M:%S %Z'),
                label=label, priority=priority, tier=PRIORITY_TIERS.get(priority, 'custom tier'), root=root))
            created.append(root / 'README.md')
            os.mkdir(root / 'archive')
            created.append(root / 'archive')
            fsync_dir(root)
            conn.commit()
        except BaseException as exc:
            conn.rollback()
            for item in reversed(created):
                with contextlib.suppress(OSError):
                    item.rmdir() if item.is_dir() else item.unlink()
            if isinstance(exc, OSError):
                raise ConfigError(f'cannot write to {root}: {exc.strerror}') from None
            raise
        return record
    finally:
        conn.close()


def create_s3_backend(settings: Settings, url: str, priority: int, notes: str) -> BackendRecord:
    """Register a bucket (with optional prefix) as an S3 backend, after checking it exists."""
    where = S3Location.parse(url)
    client = s3_client(where, retries={'max_attempts': 2, 'mode': 'standard'}, connect_timeout=10, read_timeout=30)
    check_bucket(client, where, f'new backend {where.url}')
    conn = connect_catalog(settings)
    try:
        record = _insert_backend(conn, where.url, 's3', priority, notes.strip())
        conn.commit()
        return record
    finally:
        conn.close()


def _insert_backend(conn, url_prefix: str, kind: str, priority: int, notes: str) -> BackendRecord:
    with conn.cursor() as cur:
        cur.execute('SELECT storage_id FROM storage_backend WHERE url_prefix IN (%s, %s)',
                    (url_prefix, url_prefix.rstrip('/') + '/'))
        row = cur.fetchone()
        if row:
            raise ConfigError(f'{url_prefix} is already registered as storage backend {row[0]}')
        try:
            cur.execute(f'INSERT INTO storage_backend (url_prefix, type, priority, notes) '
                        f'VALUES (%s, %s, %s, %s) RETURNING {BACKEND_COLUMNS}', (url_prefix, kind, priority, notes))
        except psycopg2.errors.UniqueViolation:
            conn.rollback()
            raise ConfigError(f'{url_prefix} is already registered as a storage backend') from None
        return BackendRecord(*cur.fetchone())


def version_counts(conn) -> dict[int, list[dict]]:
    """Per backend: files per group and version, with the bytes of the originals (the catalog
    records the size of originals only). One aggregate query per group."""
    counts: dict[int, list[dict]] = {}
    for group in GROUPS.values():
        query = sql.SQL('SELECT s.storage_id, s.type, count(*), sum(f.file_size) FROM {} s '
                        'JOIN {} f ON f.file_id = s.file_id GROUP BY s.storage_id, s.type '
                        'ORDER BY s.storage_id, s.type').format(sql.Identifier(group.storage_table),
                                                                 sql.Identifier(group.files_table))
        with conn.cursor() as cur:
            cur.execute(query)
            for storage_id, version_type, files, size in cur:
                version = VERSIONS.get((group.name, version_type))
                counts.setdefault(storage_id, []).append({
                    'group': group.name, 'type': version_type, 'version': version.label if version else 'unknown',
                    'files': files, 'bytes': int(size) if version_type == 0 else None})
    conn.commit()
    return counts


def list_backends(settings: Settings) -> list[dict]:
    """Every backend, with its files per version and, for a disk, whether it is online: its
    dot-file found and matching at the recorded path, or else under the mount roots."""
    conn = connect_catalog(settings)
    try:
        records = fetch_backends(conn)
        counts = version_counts(conn)
    finally:
        conn.close()
    listing = []
    for record in records:
        entry = {'storage_id': record.storage_id, 'type': record.type, 'url_prefix': record.url_prefix,
                 'priority': record.priority, 'notes': record.notes,
                 'created_at': record.created_at.isoformat(), 'versions': counts.get(record.storage_id, [])}
        if record.type == 'local':
            at_recorded_path = dot_file_mismatch(Path(record.url_prefix), record) is None
            mounted_at = Path(record.url_prefix) if at_recorded_path else find_disk(record)
            entry['online'] = mounted_at is not None
            entry['mounted_at'] = str(mounted_at) if mounted_at else None
        listing.append(entry)
    return listing


def _open_pair(conn, source_id: int, target_id: int, source_path: str | None, target_path: str | None,
               jobs: int, source_writing: bool = False):
    if source_id == target_id:
        raise ConfigError('source and target are the same backend')
    source = open_backend(fetch_backend(conn, source_id), path=source_path, jobs=jobs)
    target = open_backend(fetch_backend(conn, target_id), path=target_path, jobs=jobs)
    source.check(writing=source_writing)
    target.check(writing=True)
    return source, target


def count_in_background(settings: Settings, selection: 'Selection') -> tuple[threading.Thread, dict]:
    """The selection's counts, on a connection of their own, while the run already transfers:
    on a batch of a million files the count takes seconds the first file need not wait for.
    Only the progress bar's totals and the summary's notes depend on them."""
    counts: dict = {}

    def work() -> None:
        try:
            conn = connect_catalog(settings)
            try:
                counts.update(Selection(conn, selection.batch, selection.params['source'],
                                        selection.params['target'], selection.params['type'], selection.limit,
                                        archive=selection.todo == 'TRUE').counts())
            finally:
                conn.close()
        except (StorageError, psycopg2.Error):
            pass
    thread = threading.Thread(target=work, name='counts', daemon=True)
    thread.start()
    return thread, counts


def _check_run_options(jobs: int, limit: int | None) -> None:
    if jobs < 1:
        raise ConfigError('--jobs must be at least 1')
    if limit is not None and limit < 0:
        raise ConfigError('--limit must not be negative')


def copy_batch(settings: Settings, source_id: int, target_id: int, batch_id: str, *, version_type: int = 0,
               jobs: int = DEFAULT_JOBS, dry_run: bool = False, limit: int | None = None,
               source_path: str | None = None, target_path: str | None = None,
               log_dir: Path | None = None, show_progress: bool | None = None,
               out: Callable[[str], None] = print) -> RunReport:
    """Copy version `version_type` of every file in the batch that SOURCE holds and TARGET does
    not: the bytes where SOURCE holds that version, made in memory from SOURCE's original
    otherwise. Each file is read, checked, written at the target atomically, then recorded."""
    _check_run_options(jobs, limit)
    batch = find_batch(batch_id)
    version = find_version(batch.group, version_type)
    reader = connect_catalog(settings)
    writer_conn = None
    try:
        source, target = _open_pair(reader, source_id, target_id, source_path, target_path, jobs)
        selection = Selection(reader, batch, source_id, target_id, version_type, limit)
        title = f"{version.label} versions of batch '{batch.id}' from {source.describe()} to {target.describe()}"
        if version.type == 0:
            title = f"originals of batch '{batch.id}' from {source.describe()} to {target.describe()}"
        if dry_run:
            return _dry_run('copy', selection, title, _selection_notes(selection.counts()), out,
                            lambda r: 'copy' if r.source_type == version.type else f'make {version.label} of')
        counting, counts = count_in_background(settings, selection)
        writer_conn = connect_catalog(settings)
        catalog = CatalogWriter(writer_conn, GROUPS[batch.group], backends=(target,))
        with target.writing(), Run('copy', title, None, None, log_dir, show_progress) as run:
            copy_tags = isinstance(source, S3Backend) and isinstance(target, S3Backend)

            def on_done(record: FileRecord, future) -> None:
                try:
                    outcome, nbytes = future.result()
                except Exception as exc:
                    run.file_failed(record, exc, target)
                    return
                catalog.add(record.file_id, target.record.storage_id, version.type)
                run.outcome(record, outcome, nbytes)

            def between(idle: bool) -> None:
                run.set_totals(counts)
                catalog.flush() if idle else catalog.maybe_flush()

            try:
                Pipeline(jobs, run).drive(
                    selection, lambda record: copy_file(record, source, target, version, run.progress, copy_tags),
                    on_done, between=between)
            finally:
                _flush_or_explain(catalog, run)
                _note_counts(run, counting, counts, _selection_notes)
        out(format_summary(run.report, title))
        return run.report
    finally:
        reader.close()
        if writer_conn is not None:
            writer_conn.close()


def _note_counts(run: Run, counting: threading.Thread, counts: dict, notes: Callable[[dict], list]) -> None:
    counting.join(timeout=30)
    if counts:
        run.log_line(f"batch: {counts['at_source']} files at the source, {counts['done']} of them at the target "
                     f"already, {counts['todo']} to do")
        run.report.notes.extend(notes(counts))


def _flush_or_explain(catalog: CatalogWriter, run: Run) -> None:
    try:
        catalog.flush()
    except psycopg2.Error as exc:
        run.report.aborted = (f'the catalog could not record {catalog.pending} changes for files already written '
                              f'({str(exc).strip().splitlines()[0]}); run the same command again to record them')
        run.message(f'error: {run.report.aborted}')


def _selection_notes(counts: dict) -> list[str]:
    notes = []
    if not counts['at_source']:
        notes.append('the source holds none of the files of this batch, as that version or as the original')
    if counts['done']:
        notes.append(f"{counts['done']} of the batch's {counts['at_source']} files at the source were at the "
                     'target already')
    if counts['other_version']:
        notes.append(f"{counts['other_version']} files skipped: the target holds another version of them "
                     f'(one version per backend)')
    return notes


def copy_file(record: FileRecord, source: Backend, target: Backend, version: Version,
              progress: Callable[[int], None], copy_tags: bool = False) -> tuple[str, int]:
    """Copy one file's version from source to target: ('copied' | 'made' | 'found', bytes)."""
    object_name = version.object_name(record.object_name)
    target.tidy(object_name)
    content_type = content_type_of(version, object_name)
    if found_at(target, record, version):
        progress(record.file_size)
        return 'found', record.file_size
    if record.source_type == version.type:
        tags = source.tags(object_name) if copy_tags else None
        if version.type == 0:
            chunks = CheckedStream(source.read(record.object_name), record, progress)
            target.write(object_name, chunks, record.file_size, content_type, record.sha256, tags)
            crash_point('after-write')
            return 'copied', record.file_size
        data = b''.join(source.read(object_name))
        progress(len(data))
        version.confirm(data, record)
        target.write(object_name, [data], len(data), content_type, tags=tags)
        return 'copied', len(data)
    original = read_original(source, record, progress)
    data = version.made_from(original, record)
    target.write(object_name, [data], len(data), content_type,
                 tags=source.tags(record.object_name) if copy_tags else None)
    crash_point('after-write')
    return 'made', len(data)


def found_at(backend: Backend, record: FileRecord, version: Version) -> bool:
    """Whether a disk already holds a sound copy of the version, unrecorded (a run was killed
    before it could record it): then it is recorded without being written again. Only where
    stored bytes can be checked strictly without the original (the original, gzip)."""
    if not isinstance(backend, LocalBackend) or version.type not in (0, 10):
        return False
    object_name = version.object_name(record.object_name)
    size = backend.size(object_name)
    if size is None or (version.type == 0 and size != record.file_size):
        return False
    try:
        version.confirm(b''.join(backend.read(object_name)), record)
    except FileFailure:
        return False    # not sound: it is written over
    fsync_dir(backend.path(object_name).parent)    # the killed run may not have synced its rename
    return True


def _dry_run(command: str, selection: Selection, title: str, notes: list[str], out,
             action: Callable[[FileRecord], str]) -> RunReport:
    report = RunReport(command)
    out(f'dry run: would {command} {title}')
    for record in selection:
        out(f'  {action(record)}: {record.object_name} ({human_bytes(record.file_size)})')
        report.counts['would do'] = report.count('would do') + 1
        report.bytes_done += record.file_size
    out(f"dry run: would {command} {report.count('would do')} files, {human_bytes(report.bytes_done)}; "
        'nothing was written')
    report.notes.extend(notes)
    for note in report.notes:
        out(f'  note: {note}')
    return report


# --- archive -------------------------------------------------------------------------------------

@dataclasses.dataclass
class ArchiveStep:
    """What the first half of `archive` did for one file, for the second half."""
    record: FileRecord
    version_bytes: bytes | None = None
    tags: dict | None = None
    archived_now: bool = False       # this run wrote (or found) the original at ARCHIVE: record it
    missing: bool = False            # the original is no longer at ACTIVE (an earlier run was cut off)
    version_present: bool = False    # ... and the replacement version is there, sound


def archive_batch(settings: Settings, active_id: int, archive_id: int, batch_id: str, *,
                  replace_with: int | None = None, delete_original: bool = False, min_copies: int = 1,
                  jobs: int = DEFAULT_JOBS, dry_run: bool = False, limit: int | None = None,
                  active_path: str | None = None, archive_path: str | None = None,
                  log_dir: Path | None = None, show_progress: bool | None = None,
                  out: Callable[[str], None] = print) -> RunReport:
    """The model process, one pass and one download per file: read the original from ACTIVE and
    check it; make version N in memory (--replace-with N); write the original to ARCHIVE and
    record it; then, while at least `min_copies` checked originals are recorded on other
    backends, put version N in the original's place at ACTIVE, or delete the original there.

    Order per file, chosen so that a kill at any moment followed by the same command ends well:
    the archive row is committed before anything at ACTIVE changes; the version is written
    before the original is deleted; the ACTIVE row changes only after both. A run cut off after
    the delete finds the original gone, the version there and the copies recorded, and only
    fixes the row."""
    _check_run_options(jobs, limit)
    if (replace_with is None) == (not delete_original):
        raise ConfigError('say what happens at ACTIVE: --replace-with N or --delete-original')
    if min_copies < 1:
        raise ConfigError('--min-copies must be at least 1: an original never leaves ACTIVE without a copy')
    batch = find_batch(batch_id)
    version = find_version(batch.group, replace_with) if replace_with is not None else None
    if version is not None and version.type == 0:
        raise ConfigError('--replace-with 0 would replace the original with itself; name a version such as 1')
    reader = connect_catalog(settings)
    writer_conn = None
    try:
        active, archive = _open_pair(reader, active_id, archive_id, active_path, archive_path, jobs,
                                     source_writing=True)
        selection = Selection(reader, batch, active_id, archive_id, 0, limit, archive=True)
        then = f'replacing them with {version.label} versions' if version else 'deleting them there'
        title = f"originals of batch '{batch.id}' from {active.describe()} to {archive.describe()}, {then}"

        def archive_notes(counts: dict) -> list[str]:
            return ([f"{counts['other_version']} files fail: the archive holds another version of them"]
                    if counts['other_version'] else [])
        if dry_run:
            at_active = 'replace' if version else 'delete'
            return _dry_run('archive', selection, title, archive_notes(selection.counts()), out,
                            lambda r: at_active if r.target_type == 0 else f'archive and {at_active}')
        counting, counts = count_in_background(settings, selection)
        writer_conn = connect_catalog(settings)
        catalog = CatalogWriter(writer_conn, GROUPS[batch.group], every_rows=200, every_seconds=2.0,
                                backends=(archive, active))
        with archive.writing(), active.writing(), Run('archive', title, None, None, log_dir, show_progress) as run:
            pipeline = Pipeline(jobs, run)
            awaiting: list[ArchiveStep] = []   # first half done; waiting for the archive rows' commit
            kept = [0]

            original = VERSIONS[(batch.group, 0)]

            def first_half(record: FileRecord) -> ArchiveStep:
                return archive_first_half(record, active, archive, original, version, run.progress)

            def second_half(step: ArchiveStep) -> str:
                return archive_second_half(step, active, version)

            def after_first(record: FileRecord, future) -> None:
                try:
                    step = future.result()
                except Exception as exc:
                    run.file_failed(record, exc, archive)
                    return
                if step.archived_now:
                    catalog.add(record.file_id, archive.record.storage_id, 0)
                awaiting.append(step)

            def after_second(step: ArchiveStep, future) -> None:
                record = step.record
                try:
                    outcome = future.result()
                except Exception as exc:
                    run.file_failed(record, exc, active)
                    return
                if outcome == 'replaced':
                    catalog.change_type(record.file_id, active.record.storage_id, 0, version.type)
                else:
                    catalog.remove(record.file_id, active.record.storage_id)
                detail = (f'archived at {archive.record.storage_id}' if step.archived_now else
                          'the original had left ACTIVE in an earlier run that was cut off; row corrected'
                          if step.missing else 'archived earlier')
                run.outcome(record, outcome, record.file_size, detail)

            def between(idle: bool) -> None:
                run.set_totals(counts)
                if awaiting and (idle or len(awaiting) >= jobs or catalog.due()):
                    # Rule 3: the archive rows are committed before any original leaves ACTIVE,
                    # and only originals with enough checked copies recorded elsewhere leave.
                    catalog.flush()
                    copies = catalog.originals_elsewhere([s.record.file_id for s in awaiting],
                                                         active.record.storage_id)
                    for step in awaiting:
                        found = copies.get(step.record.file_id, 0)
                        if found >= min_copies:
                            pipeline.submit(second_half, step, after_second)
                        elif step.missing:
                            run.file_failed(step.record, FileFailure(
                                f'the original is missing at {active.describe()} and only {found} checked '
                                f'originals are recorded elsewhere', step.record.object_name), active)
                        else:
                            kept[0] += 1
                            run.outcome(step.record, 'kept', step.record.file_size,
                                        f'{found} checked originals recorded elsewhere, --min-copies {min_copies}'
                                        + (f'; archived at {archive.record.storage_id}' if step.archived_now else ''))
                    awaiting.clear()
                elif idle or catalog.due():
                    catalog.flush()

            try:
                pipeline.drive(selection, first_half, after_first, between=between, held=lambda: len(awaiting))
            finally:
                _flush_or_explain(catalog, run)
                _note_counts(run, counting, counts, archive_notes)
            if kept[0]:
                run.report.notes.append(f'{kept[0]} originals kept at ACTIVE: fewer than --min-copies {min_copies} '
                                        'checked originals are recorded on other backends')
        out(format_summary(run.report, title))
        return run.report
    finally:
        reader.close()
        if writer_conn is not None:
            writer_conn.close()


def archive_first_half(record: FileRecord, active: Backend, archive: Backend, original_version: Version,
                       version: Version | None, progress: Callable[[int], None]) -> ArchiveStep:
    """Read the original from ACTIVE once and check it; make the version; write the original
    to ARCHIVE (unless it is recorded there already). Nothing at ACTIVE changes here."""
    step = ArchiveStep(record)
    if record.target_type not in (None, 0):
        raise FileFailure(f'{archive.describe()} holds version {record.target_type} of this file, so its original '
                          'cannot be archived there', record.object_name)
    archived = record.target_type == 0
    if archived and version is None:
        progress(record.file_size)      # recorded at ARCHIVE already: nothing to read
        return step
    archive.tidy(record.object_name)
    try:
        original = read_original(active, record, progress)
    except SourceMissing:
        step.missing = True
        if version is not None:
            step.version_present = version_sound_at(active, record, version)
        return step
    if version is not None:
        step.version_bytes = version.made_from(original, record)
        step.tags = active.tags(record.object_name)
    if not archived:
        if not found_at(archive, record, original_version):
            archive.write(record.object_name, [original], record.file_size,
                          content_type_of(original_version, record.object_name), record.sha256)
            crash_point('after-archive-write')
        step.archived_now = True
    return step


def version_sound_at(backend: Backend, record: FileRecord, version: Version) -> bool:
    object_name = version.object_name(record.object_name)
    if backend.size(object_name) is None:
        return False
    try:
        version.confirm(b''.join(backend.read(object_name)), record)
    except FileFailure:
        return False
    return True


def archive_second_half(step: ArchiveStep, active: Backend, version: Version | None) -> str:
    """With the original's copies recorded elsewhere: put the version in its place at ACTIVE
    (written before the original is deleted), or delete it. Returns 'replaced' or 'deleted'."""
    record = step.record
    if step.missing:
        # An earlier run was cut off after removing the original: only the row is left to fix.
        if version is None:
            return 'deleted'
        if step.version_present:
            return 'replaced'
        raise FileFailure(f'the original is missing at {active.describe()} and its {version.label} version is not '
                          'there either; its original is archived: copy it back, or run `verify --fix`',
                          record.object_name)
    if version is not None:
        version_name = version.object_name(record.object_name)
        active.write(version_name, [step.version_bytes], len(step.version_bytes),
                     content_type_of(version, version_name), tags=step.tags)
        crash_point('after-version-write')
        if version_name != record.object_name:
            active.delete(record.object_name)
        crash_point('after-original-delete')
        return 'replaced'
    active.delete(record.object_name)
    crash_point('after-original-delete')
    return 'deleted'


# --- verify --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HeldFile:
    """A file the catalog records on a backend: which group, which version, under which name."""
    group: str
    record: FileRecord
    version_type: int

    @property
    def version(self) -> Version | None:
        return VERSIONS.get((self.group, self.version_type))

    @property
    def stored_name(self) -> str:
        return self.version.object_name(self.record.object_name) if self.version else self.record.object_name


def held_files(conn, storage_id: int, batch=None) -> tuple[Iterator[HeldFile], dict]:
    """Every file the catalog records on the backend (of the batch, if given), streamed in
    folder order: by the folders of the name, part by part, then by name (COLLATE "C" orders
    like Python's str), so a disk's folders can be walked alongside. Also the totals."""
    groups = [GROUPS[batch.group]] if batch else list(GROUPS.values())
    parts = []
    for group in groups:
        source = f'({batch_sql(batch)})' if batch else group.files_table
        parts.append(f"SELECT '{group.name}' AS grp, f.file_id, f.object_name, f.file_size, f.sha256, s.type "
                     f'FROM {group.storage_table} s JOIN {source} AS f ON f.file_id = s.file_id '
                     f'WHERE s.storage_id = {int(storage_id)}')
    union = '\nUNION ALL\n'.join(parts)
    folders = "(string_to_array(object_name, '/'))[1:cardinality(string_to_array(object_name, '/')) - 1]"
    totals_query = (f'SELECT count(*), coalesce(sum(file_size) FILTER (WHERE type = 0), 0), '
                    f'count(*) FILTER (WHERE type <> 0) FROM ({union}) AS held')
    with conn.cursor() as cur:
        try:
            cur.execute(totals_query)
        except psycopg2.Error as exc:
            conn.rollback()
            detail = (exc.pgerror or str(exc)).strip().splitlines()[0]
            raise ConfigError(f"batch '{batch.id}' (batches.py) cannot be selected: {detail}") from None
        files, original_bytes, versions = cur.fetchone()
    conn.commit()

    def stream() -> Iterator[HeldFile]:
        cur = conn.cursor(name=f'held_{uuid.uuid4().hex[:8]}')
        cur.itersize = 2000
        try:
            cur.execute(f'SELECT * FROM ({union}) AS held ORDER BY {folders} COLLATE "C", object_name COLLATE "C"')
            for group, file_id, object_name, file_size, sha256, version_type in cur:
                yield HeldFile(group, FileRecord(file_id, object_name, int(file_size),
                                                 (sha256 or '').strip().lower()), version_type)
        finally:
            with contextlib.suppress(psycopg2.Error):
                cur.close()
                conn.commit()
    return stream(), {'files': files, 'original_bytes': original_bytes, 'versions': versions}


def disk_folders(archive_root: Path) -> Iterator[tuple[tuple[str, ...], list[os.DirEntry]]]:
    """Every folder under the archive root with the entries in it that are not folders, in the
    order held_files() yields names: parent before children, siblings sorted."""
    def walk(folder: Path, parts: tuple[str, ...]):
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError:
            entries = []
        yield parts, [e for e in entries if not e.is_dir(follow_symlinks=False)]
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from walk(Path(entry.path), parts + (entry.name,))
    yield from walk(archive_root, ())


def verify_backend(settings: Settings, storage_id: int, batch_id: str | None = None, *, fix: bool = False,
                   path: str | None = None, jobs: int = DEFAULT_JOBS, log_dir: Path | None = None,
                   show_progress: bool | None = None, out: Callable[[str], None] = print) -> RunReport:
    """Check every file the catalog records on the backend (in the batch, if given): there, and
    sound (originals hash to the catalog's sha256, gzip versions decompress to it, WebP and FLAC
    versions decode). On a disk, without a batch, also list the files the catalog does not know.
    With `fix`, remove the catalog rows of missing and corrupt files (never a file)."""
    _check_run_options(jobs, None)
    batch = find_batch(batch_id) if batch_id else None
    conn = connect_catalog(settings)
    try:
        backend = open_backend(fetch_backend(conn, storage_id), path=path, jobs=jobs)
    finally:
        conn.close()
    backend.check(writing=False)
    reader = connect_catalog(settings)
    writer_conn = connect_catalog(settings)
    try:
        files, totals = held_files(reader, storage_id, batch)
        title = f'{backend.describe()}' + (f", batch '{batch.id}'" if batch else '')
        found: dict[str, list] = {'missing': [], 'corrupt': [], 'unknown': [], 'unchecked': []}
        # Versions' sizes are not in the catalog: with versions on the backend, count files only.
        total_bytes = totals['original_bytes'] if not totals['versions'] else None
        with Run('verify', title, totals['files'], total_bytes, log_dir, show_progress) as run:
            def finding(kind: str, held: HeldFile | None, name: str, reason: str = '') -> None:
                found[kind].append((held, name, reason))
                run.report.failures.append((name, reason or kind))
                if held:
                    run.outcome(held.record, kind, 0, reason)
                run.message(f'{kind.upper()} {name}' + (f': {reason}' if reason else ''))

            def on_done(held: HeldFile, future) -> None:
                try:
                    nbytes = future.result()
                except SourceMissing:
                    finding('missing', held, held.stored_name)
                except FileFailure as exc:
                    finding('corrupt', held, held.stored_name, str(exc))
                except Exception as exc:
                    finding('unchecked', held, held.stored_name, describe_exception(exc))
                else:
                    run.outcome(held.record, 'sound', nbytes)

            def checkable(held: HeldFile) -> bool:
                if held.version is None:
                    finding('unchecked', held, held.record.object_name,
                            f'version type {held.version_type} is unknown to this tool')
                    return False
                try:
                    safe_object_parts(held.stored_name)
                except UnsafeObjectName as exc:
                    finding('corrupt', held, held.stored_name, str(exc))
                    return False
                return True

            items = (held for held in files if checkable(held))
            if isinstance(backend, LocalBackend) and batch is None:
                items = _walk_alongside(items, backend, finding)
            Pipeline(jobs, run).drive(items, lambda held: verify_file(backend, held, run.progress), on_done)
            removed = _remove_rows(writer_conn, storage_id, found, run) if fix and not run.stop_requested else None
        out(format_verify_report(run.report, title, found, removed, bool(batch), backend))
        return run.report
    finally:
        reader.close()
        writer_conn.close()


def _walk_alongside(items: Iterator[HeldFile], backend: LocalBackend, finding: Callable) -> Iterator[HeldFile]:
    """Merge the catalog's files (in folder order) with a walk of the disk's folders, one folder
    at a time: what only the catalog has is missing, what only the disk has is unknown, what
    both have is checked. Memory holds one folder, whatever the size of the disk."""
    def by_folder(held_items):
        for folder, group in itertools.groupby(held_items, key=lambda h: tuple(h.stored_name.split('/')[:-1])):
            yield folder, list(group)

    catalog, disk = by_folder(items), disk_folders(backend.archive)
    cat, here = next(catalog, None), next(disk, None)
    while cat is not None or here is not None:
        if here is None or (cat is not None and cat[0] < here[0]):
            for held in cat[1]:
                finding('missing', held, held.stored_name)
            cat = next(catalog, None)
        elif cat is None or here[0] < cat[0]:
            for entry in here[1]:
                _unknown(finding, here[0], entry)
            here = next(disk, None)
        else:
            entries = {entry.name: entry for entry in here[1]}
            for held in cat[1]:
                entry = entries.pop(held.stored_name.rsplit('/', 1)[-1], None)
                if entry is None:
                    finding('missing', held, held.stored_name)
                else:
                    yield held
            for entry in entries.values():
                _unknown(finding, here[0], entry)
            cat, here = next(catalog, None), next(disk, None)


def _unknown(finding: Callable, folder: tuple[str, ...], entry: os.DirEntry) -> None:
    name = '/'.join(folder + (entry.name,))
    if entry.name.endswith(TMP_SUFFIX):
        finding('unknown', None, name, 'a temporary file left by an interrupted run: safe to delete')
    elif entry.is_symlink():
        finding('unknown', None, name, 'a symbolic link')
    else:
        finding('unknown', None, name)


def verify_file(backend: Backend, held: HeldFile, progress: Callable[[int], None]) -> int:
    """Read the stored file once and check it; returns the bytes read."""
    record, version = held.record, held.version
    if version.type == 0:
        for _ in CheckedStream(backend.read(record.object_name), record, progress):
            pass
        return record.file_size
    data = b''.join(backend.read(held.stored_name))
    progress(len(data))
    version.confirm(data, record)
    return len(data)


def _remove_rows(conn, storage_id: int, found: dict, run: Run) -> list[HeldFile]:
    removed = [held for kind in ('missing', 'corrupt') for held, _, _ in found[kind] if held is not None]
    for group in GROUPS.values():
        writer = CatalogWriter(conn, group)
        for held in removed:
            if held.group == group.name:
                writer.remove(held.record.file_id, storage_id)
        writer.flush()
    for held in removed:
        run.log_line(f'--fix removed the row of file {held.record.file_id} ({held.stored_name})')
    return removed


def format_verify_report(report: RunReport, title: str, found: dict, removed: list | None, with_batch: bool,
                         backend: Backend) -> str:
    lines = [f'verify {title}']
    sound = report.count('sound')
    problems = sum(len(entries) for entries in found.values())
    lines.append(f'  {sound:,} files sound; {human_bytes(report.bytes_done)} read in {report.seconds:.1f} s'
                 + ('' if problems else '; all is well'))
    headings = {'missing': 'missing (recorded, not there)', 'corrupt': 'corrupt (there, but not sound)',
                'unknown': f'unknown (under {getattr(backend, "archive", "archive/")}, not in the catalog)',
                'unchecked': 'could not be checked'}
    for kind, heading in headings.items():
        if found[kind]:
            lines.append(f'  {len(found[kind])} {heading}:')
            for _, name, reason in found[kind][:50]:
                lines.append(f'    {name}' + (f': {reason}' if reason else ''))
            if len(found[kind]) > 50:
                lines.append(f'    … and {len(found[kind]) - 50} more (see the log)')
    if isinstance(backend, LocalBackend) and with_batch:
        lines.append('  (unknown files are looked for when the whole backend is verified, without a batch)')
    if removed is not None:
        lines.append(f'  --fix: removed the catalog rows of {len(removed)} missing or corrupt files (no file was '
                     'touched); `copy` puts them back' if removed else '  --fix: no rows to remove')
    elif found['missing'] or found['corrupt']:
        lines.append('  run again with --fix to remove the rows of the missing and corrupt files, then `copy` '
                     'to put them back')
    if report.interrupted:
        lines.append('  interrupted: not every file was checked')
    if report.log_path:
        lines.append(f'  log: {report.log_path}')
    return '\n'.join(lines)


# --- report --------------------------------------------------------------------------------------

REPORT_FILES = ('manifest-sha256.txt', 'REPORT.md', 'archive_index.db')


def manifest_line(sha256_hex: str, relative_path: str) -> str:
    """A line `sha256sum -c` accepts: names with a backslash or newline are escaped, and the
    line then starts with a backslash (GNU coreutils' convention)."""
    if '\\' in relative_path or '\n' in relative_path:
        escaped = relative_path.replace('\\', '\\\\').replace('\n', '\\n')
        return f'\\{sha256_hex}  {escaped}\n'
    return f'{sha256_hex}  {relative_path}\n'


def write_report(settings: Settings, storage_id: int, *, path: str | None = None,
                 out: Callable[[str], None] = print) -> dict:
    """Write onto a local disk what makes it readable without the database: a sha256 manifest
    of its originals, REPORT.md, and archive_index.db (SQLite) with the catalog rows of
    everything on it. Each file is written atomically."""
    conn = connect_catalog(settings)
    try:
        record = fetch_backend(conn, storage_id)
        backend = open_backend(record, path=path)
        if not isinstance(backend, LocalBackend):
            raise ConfigError(f'{record.describe()} is an S3 backend: `report` writes onto a local disk')
        backend.check(writing=True)
        with backend.writing():
            made = dt.datetime.now(dt.timezone.utc)
            manifest = _write_manifest(conn, backend)
            summary = _write_index(conn, backend, made)
            _write_report_md(conn, backend, settings, made, manifest, summary)
    finally:
        conn.close()
    for name in REPORT_FILES:
        out(f'wrote {backend.root / name}')
    out(f"  {manifest['originals']:,} originals in the manifest ({human_bytes(manifest['bytes'])}); check them "
        f'without the database: cd {backend.root} && sha256sum -c manifest-sha256.txt')
    return {'manifest': manifest, **summary, 'root': backend.root}


def _write_manifest(conn, backend: LocalBackend) -> dict:
    """manifest-sha256.txt: `<sha256>  archive/<object name>` for every original recorded on the
    disk (the BagIt manifest convention), which `sha256sum -c` accepts from the disk's root."""
    originals = size = 0
    prefix = backend.archive.name
    with atomic_output(backend.root / 'manifest-sha256.txt') as manifest:
        for group in GROUPS.values():
            cur = conn.cursor(name=f'manifest_{uuid.uuid4().hex[:8]}')
            cur.itersize = 5000
            cur.execute(sql.SQL('SELECT f.object_name, f.sha256, f.file_size FROM {} s JOIN {} f '
                                'ON f.file_id = s.file_id WHERE s.storage_id = %s AND s.type = 0 '
                                'ORDER BY f.object_name COLLATE "C"').format(
                sql.Identifier(group.storage_table), sql.Identifier(group.files_table)), (backend.record.storage_id,))
            for object_name, sha256_hex, file_size in cur:
                manifest.write(manifest_line(sha256_hex.strip().lower(), f'{prefix}/{object_name}'))
                originals += 1
                size += file_size
            cur.close()
            conn.commit()
    return {'originals': originals, 'bytes': size}


def _sqlite_value(value):
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    if isinstance(value, psycopg2.extras.Range):
        return json.dumps([_sqlite_value(value.lower), _sqlite_value(value.upper)])
    if value is None or isinstance(value, (int, float, str, bytes)):
        return value
    return str(value)


def _copy_query(conn, index, table: str, query: sql.Composable, params=()) -> int:
    """Stream a query's rows into a new SQLite table of the same column names."""
    cur = conn.cursor(name=f'index_{uuid.uuid4().hex[:8]}')
    cur.itersize = 5000
    cur.execute(query, params)
    rows = iter(cur)
    first = next(rows, None)      # a named cursor describes its columns once it has fetched
    columns = [d[0] for d in cur.description]
    index.execute(f'CREATE TABLE {table} ({", ".join(columns)})')
    insert = f'INSERT INTO {table} VALUES ({", ".join("?" for _ in columns)})'
    count = 0
    for row in itertools.chain([first] if first is not None else [], rows):
        index.execute(insert, [_sqlite_value(v) for v in row])
        count += 1
    cur.close()
    conn.commit()
    return count


def _write_index(conn, backend: LocalBackend, made: dt.datetime) -> dict:
    import sqlite3
    final = backend.root / 'archive_index.db'
    tmp = final.with_name(f'.{final.name}.{RUN_MARK}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}')
    storage_id = backend.record.storage_id
    counts = {}
    try:
        index = sqlite3.connect(tmp)
        with index:
            for group in GROUPS.values():
                counts[group.files_table] = _copy_query(conn, index, group.files_table, sql.SQL(
                    'SELECT f.*, s.type AS version_type FROM {} s JOIN {} f ON f.file_id = s.file_id '
                    'WHERE s.storage_id = %s ORDER BY f.file_id').format(
                    sql.Identifier(group.storage_table), sql.Identifier(group.files_table)), (storage_id,))
            on_disk = sql.SQL(' UNION ').join(
                sql.SQL('SELECT f.deployment_id FROM {} s JOIN {} f ON f.file_id = s.file_id WHERE s.storage_id = {}')
                .format(sql.Identifier(g.storage_table), sql.Identifier(g.files_table), sql.Literal(storage_id))
                for g in GROUPS.values())
            counts['deployments'] = _copy_query(conn, index, 'deployments', sql.SQL(
                'SELECT d.deployment_id, d.node_id, d.location::text AS location, d.description, '
                'lower(d.period) AS period_start, upper(d.period) AS period_end FROM deployments d '
                'WHERE d.deployment_id IN ({}) ORDER BY d.deployment_id').format(on_disk))
            counts['nodes'] = _copy_query(conn, index, 'nodes', sql.SQL(
                'SELECT n.* FROM nodes n WHERE n.node_id IN (SELECT node_id FROM deployments '
                'WHERE deployment_id IN ({})) ORDER BY n.node_id').format(on_disk))
            counts['tags'] = _copy_query(conn, index, 'deployment_tags', sql.SQL(
                'SELECT md.deployments_deployment_id AS deployment_id, t.name AS tag FROM mm_tags_deployments md '
                'JOIN tags t ON t.tag_id = md.tags_tag_id WHERE md.deployments_deployment_id IN ({}) '
                'ORDER BY 1, 2').format(on_disk))
            index.execute('CREATE TABLE about (key, value)')
            index.executemany('INSERT INTO about VALUES (?, ?)', [
                ('storage_id', storage_id), ('url_prefix', backend.record.url_prefix),
                ('device_label', backend.record.notes), ('made_at', made.isoformat()),
                ('versions', json.dumps({f'{g}:{t}': v.label for (g, t), v in VERSIONS.items()}))])
            for group in GROUPS.values():
                index.execute(f'CREATE INDEX {group.files_table}_object_name ON {group.files_table} (object_name)')
                index.execute(f'CREATE INDEX {group.files_table}_time ON {group.files_table} (time)')
        index.close()
        with open(tmp, 'rb+') as handle:
            full_fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)
    return counts


def _write_report_md(conn, backend: LocalBackend, settings: Settings, made: dt.datetime, manifest: dict,
                     summary: dict) -> None:
    storage_id = backend.record.storage_id
    with conn.cursor() as cur:
        contents, deployments = [], []
        first = last = None
        for group in GROUPS.values():
            cur.execute(sql.SQL('SELECT s.type, count(*), sum(f.file_size), min(f.time), max(f.time) FROM {} s '
                                'JOIN {} f ON f.file_id = s.file_id WHERE s.storage_id = %s GROUP BY s.type '
                                'ORDER BY s.type').format(sql.Identifier(group.storage_table),
                                                          sql.Identifier(group.files_table)), (storage_id,))
            for version_type, files, size, earliest, latest in cur.fetchall():
                version = VERSIONS.get((group.name, version_type))
                contents.append((group.name, version_type, version.label if version else 'unknown', files,
                                 int(size) if version_type == 0 else None))
                first = earliest if first is None else min(first, earliest)
                last = latest if last is None else max(last, latest)
        on_disk = sql.SQL(' UNION ALL ').join(
            sql.SQL('SELECT f.deployment_id, f.time FROM {} s JOIN {} f ON f.file_id = s.file_id '
                    'WHERE s.storage_id = {}').format(sql.Identifier(g.storage_table), sql.Identifier(g.files_table),
                                                     sql.Literal(storage_id)) for g in GROUPS.values())
        cur.execute(sql.SQL(
            'SELECT d.deployment_id, n.node_label, n.type, d.description, lower(d.period), upper(d.period), '
            'count(*), min(x.time), max(x.time), '
            "(SELECT string_agg(t.name, ', ' ORDER BY t.name) FROM mm_tags_deployments md JOIN tags t "
            'ON t.tag_id = md.tags_tag_id WHERE md.deployments_deployment_id = d.deployment_id) '
            'FROM ({}) x JOIN deployments d ON d.deployment_id = x.deployment_id JOIN nodes n ON n.node_id = d.node_id '
            'GROUP BY d.deployment_id, n.node_label, n.type ORDER BY n.node_label, d.deployment_id').format(on_disk))
        deployments = cur.fetchall()
    conn.commit()
    day = lambda value: '' if value is None or not isinstance(value, dt.datetime) else value.strftime('%Y-%m-%d')
    moment = lambda value: value.astimezone(dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC') if value else '–'
    total_files = sum(row[3] for row in contents)
    lines = [
        f'# Mitwelten archive disk {storage_id}: {backend.record.notes or ""}'.rstrip(),
        '',
        f'Report made {moment(made)} by mitwelten-storage from the catalog (schema `{settings.schema}`). It describes',
        'what the catalog records on this disk; `manifest-sha256.txt` and `archive_index.db` beside it make the disk',
        'readable and checkable without the database.',
        '',
        '## Contents',
        '',
        '| group | type | version | files | bytes |',
        '|---|---|---|---:|---:|',
    ]
    for group, version_type, label, files, size in contents:
        lines.append(f'| {group} | {version_type} | {label} | {files:,} | '
                     f'{human_bytes(size) if size is not None else "(not recorded)"} |')
    lines += ['', f'{total_files:,} files in all; originals: {manifest["originals"]:,} files, '
                  f'{human_bytes(manifest["bytes"])} ({manifest["bytes"]:,} bytes).', '',
              f'First sample: {moment(first)}. Last sample: {moment(last)}.', '',
              f'## Deployments ({len(deployments)}, from {len({row[1] for row in deployments})} nodes)', '',
              '| deployment | node | node type | tags | description | period | files | samples from | to |',
              '|---:|---|---|---|---|---|---:|---|---|']
    for dep_id, label, kind, description, start, end, files, earliest, latest, tags in deployments:
        period = f'{day(start) or "…"} to {day(end) or "…"}'
        text = (description or '').replace('|', '/').replace('\n', ' ')
        lines.append(f'| {dep_id} | {label} | {kind} | {tags or ""} | {text} | {period} | {files:,} | '
                     f'{moment(earliest)} | {moment(latest)} |')
    lines += ['', '## Without the database', '',
              'Check every original against its sha256 (from this folder):', '',
              '    sha256sum -c manifest-sha256.txt', '',
              'Search the catalog rows of the files here (SQLite):', '',
              '    sqlite3 archive_index.db "SELECT object_name, time FROM files_image WHERE deployment_id = 1"', '',
              f'`archive_index.db` holds the tables files_image ({summary["files_image"]:,} rows), files_audio '
              f'({summary["files_audio"]:,}), deployments ({summary["deployments"]:,}), nodes ({summary["nodes"]:,}) '
              'and deployment_tags; `version_type` says which version of a file is here (0 is the original).', '']
    with atomic_output(backend.root / 'REPORT.md') as report:
        report.write('\n'.join(lines))


def format_summary(report: RunReport, title: str) -> str:
    seconds = max(report.seconds, 1e-9)
    lines = [f'{report.command} {title}']
    parts = [f'{n} {outcome}' for outcome, n in sorted(report.counts.items()) if n]
    if parts:
        lines.append(f"  {', '.join(parts)}; {human_bytes(report.bytes_done)} in {report.seconds:.1f} s "
                     f'({human_bytes(report.bytes_done / seconds)}/s)')
    else:
        lines.append('  nothing to do')
    for note in report.notes:
        lines.append(f'  note: {note}')
    if report.failures:
        lines.append(f'  {len(report.failures)} failed:')
        for object_name, reason in report.failures[:20]:
            lines.append(f'    {object_name}: {reason}')
        if len(report.failures) > 20:
            lines.append(f'    … and {len(report.failures) - 20} more (see the log)')
    if report.aborted:
        lines.append(f'  stopped early: {report.aborted}')
    if report.interrupted:
        lines.append('  interrupted: the files in flight were finished and recorded; run the same command '
                     'again to do the rest')
    if report.log_path:
        lines.append(f'  log: {report.log_path}')
    return '\n'.join(lines)


# =================================================================================================
# Command line
# =================================================================================================

EPILOG = """\
examples:
  mitwelten_storage.py init-db
  mitwelten_storage.py create -t local -p 2 -n "Archive 07 (WD 4TB)" /media/archive07
  mitwelten_storage.py create -t s3 -p 0 -n "active, public" https://minio.example.org/mitwelten
  mitwelten_storage.py info
  mitwelten_storage.py info --batches
  mitwelten_storage.py copy -s 1 -t 3 all_images --dry-run --limit 10
  mitwelten_storage.py copy -s 1 -t 3 all_images --jobs 8
  mitwelten_storage.py copy -s 1 -t 2 all_images --type 2          # WebP 640x480 made from the originals
  mitwelten_storage.py archive -s 1 -t 3 fs1_images --replace-with 1
  mitwelten_storage.py verify 3 --fix
  mitwelten_storage.py report 3

database: --db DSN, else $MITWELTEN_DB, else libpq's defaults (PGHOST, PGUSER, ~/.pgpass, …);
schema: --schema, else $MITWELTEN_DB_SCHEMA, else 'prod'. S3 credentials come from boto3's
chain; an AWS profile named like the server's HOST:PORT (or HOST) is used for that server.
exit status: 0 all done, 1 some files failed, 2 usage or configuration error, 130 interrupted.
"""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f'{self.prog}: error: {message}\n')


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must not be negative")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog='mitwelten_storage.py', description=__doc__.split('\n\n')[0],
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--db', metavar='DSN', help='libpq connection string or URI of the catalog')
    parser.add_argument('--schema', metavar='NAME', help="catalog schema (default: $MITWELTEN_DB_SCHEMA or 'prod')")
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    commands.add_parser('init-db', help='create the catalog schema and tables (idempotent)')

    create = commands.add_parser('create', help='register a new backend: a local disk or an S3 bucket',
                                 epilog='examples:\n  create -t local -p 2 -n "Archive 07" /media/archive07\n'
                                        '  create -t s3 -p 0 -n "active" http://minio:9000/mitwelten',
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    create.add_argument('-t', '--type', choices=('local', 's3'), required=True)
    create.add_argument('-p', '--priority', type=non_negative_int, required=True,
                        help='0 online S3 public, 1 online S3 not public, 2 offline archive disk')
    create.add_argument('-n', '--notes', required=True, metavar='LABEL',
                        help='for a disk, its label (as written on it); for S3, notes')
    create.add_argument('location', metavar='PATH|URL',
                        help='local: the folder where the disk is mounted; s3: http[s]://HOST[:PORT]/BUCKET[/PREFIX]')

    info = commands.add_parser('info', help='list the backends (or, with --batches, the batches)')
    info.add_argument('--batches', action='store_true', help='list the batches defined in batches.py')
    info.add_argument('--json', action='store_true', help='print JSON instead of a table')

    copy = commands.add_parser(
        'copy', help='copy a batch of files from one backend to another',
        epilog='examples:\n  copy -s 1 -t 3 all_images --dry-run\n  copy -s 1 -t 3 fs1_images --jobs 16\n'
               '  copy -s 3 -t 4 all_images --source-path /Volumes/archive07',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    copy.add_argument('-s', '--source', type=int, required=True, metavar='ID', help='source storage id')
    copy.add_argument('-t', '--target', type=int, required=True, metavar='ID', help='target storage id')
    copy.add_argument('batch', help='batch id from batches.py (see `info --batches`)')
    copy.add_argument('--type', type=non_negative_int, default=0, dest='version_type', metavar='N',
                      help='version to copy (default 0, the original)')
    copy.add_argument('--jobs', type=positive_int, default=DEFAULT_JOBS, metavar='N',
                      help=f'parallel transfers (default {DEFAULT_JOBS})')
    copy.add_argument('--dry-run', action='store_true', help='say what would be copied; write nothing')
    copy.add_argument('--limit', type=non_negative_int, metavar='N', help='copy at most N files')
    copy.add_argument('--source-path', metavar='P', help='where the source disk is mounted, if not at its recorded path')
    copy.add_argument('--target-path', metavar='P', help='where the target disk is mounted, if not at its recorded path')

    archive = commands.add_parser(
        'archive', help='archive originals from the active tier and replace them there with a version (or delete them)',
        description='For every file of the batch whose original ACTIVE holds: read it once and check it, write '
                    'it to ARCHIVE and record it, then put version N in its place at ACTIVE (--replace-with N) '
                    'or delete it there (--delete-original). An original leaves ACTIVE only while at least '
                    '--min-copies checked originals are recorded on other backends.',
        epilog='examples:\n  archive -s 1 -t 3 fs1_images --replace-with 1\n'
               '  archive -s 1 -t 3 fs1_audio --replace-with 1 --min-copies 2\n'
               '  archive -s 2 -t 3 all_images --delete-original --dry-run\n\n'
               'versions: image 1 WebP 1920x1440, 2 WebP 640x480, 10 gzip -9; audio 1 FLAC, 10 gzip -9',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    archive.add_argument('-s', '--source', type=int, required=True, metavar='ACTIVE', help='active storage id')
    archive.add_argument('-t', '--target', type=int, required=True, metavar='ARCHIVE', help='archive storage id')
    archive.add_argument('batch', help='batch id from batches.py (see `info --batches`)')
    then = archive.add_mutually_exclusive_group(required=True)
    then.add_argument('--replace-with', type=non_negative_int, metavar='N',
                      help='put version N in place of the original at ACTIVE')
    then.add_argument('--delete-original', action='store_true', help='delete the original at ACTIVE')
    archive.add_argument('--min-copies', type=positive_int, default=1, metavar='N',
                         help='checked originals that must be recorded on other backends (default 1)')
    archive.add_argument('--jobs', type=positive_int, default=DEFAULT_JOBS, metavar='N',
                         help=f'parallel transfers (default {DEFAULT_JOBS})')
    archive.add_argument('--dry-run', action='store_true', help='say what would be done; change nothing')
    archive.add_argument('--limit', type=non_negative_int, metavar='N', help='archive at most N files')
    archive.add_argument('--source-path', metavar='P', help='where ACTIVE is mounted, if a disk not at its recorded path')
    archive.add_argument('--target-path', metavar='P', help='where the archive disk is mounted, if not at its recorded path')

    verify = commands.add_parser(
        'verify', help='check the files the catalog records on a backend',
        description='Checks every file the catalog records on STORAGE (in BATCH, if given): there, and sound '
                    '(originals hash to the catalog sha256, gzip versions decompress to it, WebP and FLAC versions '
                    'decode). Lists what is missing or corrupt and, on a disk, files the catalog does not know.',
        epilog='examples:\n  verify 3\n  verify 3 fs1_images --path /Volumes/archive07\n  verify 3 --fix',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument('storage', type=int, metavar='STORAGE', help='storage id')
    verify.add_argument('batch', nargs='?', help='only the files of this batch')
    verify.add_argument('--fix', action='store_true',
                        help='remove the catalog rows of missing and corrupt files (never a file), so `copy` puts '
                             'them back')
    verify.add_argument('--path', metavar='P', help='where the disk is mounted, if not at its recorded path')
    verify.add_argument('--jobs', type=positive_int, default=DEFAULT_JOBS, metavar='N',
                        help=f'files checked in parallel (default {DEFAULT_JOBS})')

    report = commands.add_parser(
        'report', help='write REPORT.md, a sha256 manifest and a SQLite index onto a disk',
        description='Writes onto a local disk what makes it readable without the database: REPORT.md, '
                    'manifest-sha256.txt (for `sha256sum -c` from the disk\'s root) and archive_index.db (SQLite).',
        epilog='example:\n  report 3\n  cd /media/archive07 && sha256sum -c manifest-sha256.txt',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument('storage', type=int, metavar='STORAGE', help='storage id of a local disk')
    report.add_argument('--path', metavar='P', help='where the disk is mounted, if not at its recorded path')
    return parser


def print_backends(listing: list[dict], out=print) -> None:
    if not listing:
        out('no storage backends yet: add one with `create`')
        return
    rows = [('ID', 'TYPE', 'PRIO', 'PATH OR URL', 'CREATED', 'STATUS', 'NOTES')]
    for entry in listing:
        status = ''
        if entry['type'] == 'local':
            status = 'offline' if not entry['online'] else 'online' if entry['mounted_at'] == entry['url_prefix'] \
                else 'moved'

        rows.append((str(entry['storage_id']), entry['type'], str(entry['priority']), entry['url_prefix'],
                     entry['created_at'][:19].replace('T', ' '), status, (entry['notes'] or '').replace('\n', ' ')))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    out('  '.join(cell.ljust(width) for cell, width in zip(rows[0], widths)) + '  ' + rows[0][-1])
    for row, entry in zip(rows[1:], listing):
        out('  '.join(cell.ljust(width) for cell, width in zip(row, widths)) + '  ' + row[-1])
        held = [f"{c['group']} {c['version']}: {c['files']:,} files"
                + (f", {human_bytes(c['bytes'])}" if c['bytes'] is not None else '') for c in entry['versions']]
        out('      ' + ('; '.join(held) if held else 'no files recorded'))
        if entry.get('mounted_at') and entry['mounted_at'] != entry['url_prefix']:
            out(f"      mounted at {entry['mounted_at']}, not at its recorded path")


def print_batches(batches: dict, as_json: bool, out=print) -> None:
    if as_json:
        out(json.dumps([{'id': b.id, 'group': b.group, 'description': b.description} for b in batches.values()],
                       indent=2))
        return
    width = max((len(b) for b in batches), default=2)
    out(f"{'ID'.ljust(width)}  GROUP  DESCRIPTION")
    for batch in batches.values():
        out(f'{batch.id.ljust(width)}  {batch.group.ljust(5)}  {batch.description}')


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    settings = Settings.from_env(args.db, args.schema)
    try:
        if args.command == 'init-db':
            print(init_db(settings))
        elif args.command == 'create':
            if args.type == 'local':
                record = create_local_backend(settings, args.location, args.priority, args.notes)
            else:
                record = create_s3_backend(settings, args.location, args.priority, args.notes)
            print(f'created storage backend {record.storage_id}: {record.type} {record.url_prefix} '
                  f'(priority {record.priority})')
        elif args.command == 'info':
            if args.batches:
                print_batches(load_batches(), args.json)
            else:
                listing = list_backends(settings)
                print(json.dumps(listing, indent=2)) if args.json else print_backends(listing)
        elif args.command == 'copy':
            report = copy_batch(settings, args.source, args.target, args.batch, version_type=args.version_type,
                                jobs=args.jobs, dry_run=args.dry_run, limit=args.limit,
                                source_path=args.source_path, target_path=args.target_path)
            return report.exit_status
        elif args.command == 'verify':
            return verify_backend(settings, args.storage, args.batch, fix=args.fix, path=args.path,
                                  jobs=args.jobs).exit_status
        elif args.command == 'report':
            write_report(settings, args.storage, path=args.path)
        elif args.command == 'archive':
            report = archive_batch(settings, args.source, args.target, args.batch, replace_with=args.replace_with,
                                   delete_original=args.delete_original, min_copies=args.min_copies,
                                   jobs=args.jobs, dry_run=args.dry_run, limit=args.limit,
                                   active_path=args.source_path, archive_path=args.target_path)
            return report.exit_status
        return EXIT_OK
    except ConfigError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    except (StorageError, psycopg2.Error, botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError, OSError) as exc:
        print(f'error: {describe_exception(exc)}', file=sys.stderr)
        return EXIT_FAILURES


if __name__ == '__main__':
    status = main()
    if status == EXIT_INTERRUPTED:
        # A second Ctrl-C leaves transfer threads running; do not wait for them at exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
