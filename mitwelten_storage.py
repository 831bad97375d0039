#!/usr/bin/env python3
"""mitwelten-storage: keep Mitwelten's research files safe across storage tiers.

A PostgreSQL catalog knows every file (files_image, files_audio) and which storage backend holds
which version of it (mm_files_image_storage, mm_files_audio_storage). Backends are S3 buckets
(online tiers) and local archive disks. This tool registers backends, lists them, and copies and
archives batches of files between them so that one unaltered, checked original of every file
always exists and the catalog always tells the truth.

Never lose data: the rules, numbered as SPEC.md numbers them; the code cites them by number.

    1. A catalog row is written only after the bytes are durable at the backend and checked. When
       a sync (fsync) fails, nothing written since the last successful sync is recorded.
    2. No partial file ever stands under its final name (temporary name, fsync, rename).
    3. No original is removed or overwritten unless --min-copies other checked originals are
       recorded.
    4. Nothing is written outside a backend's root, whatever an object name holds (`..`,
       absolute paths).
    5. A crash or kill at any moment, then the same command again, ends with disk and catalog
       agreeing and nothing lost.
    6. Bad input gets a clear message naming the file or setting, never a traceback; a run that
       has started always ends with its summary and log path.
    7. An original whose version cannot be made is still archived (and kept on the active tier).

The module is one file, laid out in sections in the order a run needs them:

    errors · configuration · catalog · backends · the storage service's client · originals ·
    versions · runs · operations · command line

As a library, its operations return what they did and never print; progress and notices go
through the `mitwelten_storage` logger and an optional `Progress` object. The command line (the
last section) does all the printing. The tests call the operations in-process:

    import mitwelten_storage as ms
    settings = ms.Settings.from_env()                       # MITWELTEN_DB, MITWELTEN_DB_SCHEMA, …
    report = ms.copy_batch(settings, 1, 3, 'fs1_images', options=ms.RunOptions(jobs=8))
    report.counts, report.failures, report.log_path, report.exit_status

Batch operations: copy_batch, archive_batch, verify_backend, write_report, list_backends,
init_db, create_local_backend, create_s3_backend, plan_batch (a dry run). Per-file operations
(what the storage service calls): fetch_file, file_state, active_original, copy_file,
archive_file, record_archived, make_version_in_place, delete_original.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import dataclasses
import datetime as dt
import errno
import fcntl
import functools
import glob
import gzip
import hashlib
import http.client
import importlib.util
import io
import itertools
import json
import logging
import mmap
import os
import re
import shutil
import signal
import stat
import struct
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable, Iterator

import botocore.exceptions
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from PIL import Image, UnidentifiedImageError
from psycopg2 import sql
# boto3 itself is imported where an S3 backend is opened: it takes a tenth of a second to load,
# which a run from disk to disk (a researcher at a workstation) need not pay; numpy and soundfile
# where a FLAC is made or checked (audio_libraries). tqdm is imported by the command line only.

with warnings.catch_warnings():
    # pydub warns at import when ffmpeg is not on PATH (we point it at imageio-ffmpeg's binary)
    # and, on Python 3.11 and 3.12, that the audioop module it uses is deprecated.
    warnings.simplefilter('ignore', RuntimeWarning)
    warnings.simplefilter('ignore', DeprecationWarning)
    from pydub import AudioSegment
    from pydub.exceptions import CouldntDecodeError

log = logging.getLogger('mitwelten_storage')

TOOL_DIR = Path(__file__).resolve().parent
SCHEMA_FILE = TOOL_DIR / 'sql' / 'schema.sql'
DEFAULT_SCHEMA = 'prod'
DEFAULT_JOBS = 8
CHUNK = 1024 * 1024
# Originals pass from S3 to a disk through one reused, page-aligned buffer per transfer thread:
# no new memory per file (no page faults), and aligned for O_DIRECT writes.
IO_BUFFER_SIZE = 8 * 1024 * 1024
DIRECT_ALIGN = 4096
_thread_io = threading.local()


def io_buffer() -> memoryview:
    """This thread's transfer buffer (IO_BUFFER_SIZE bytes, page-aligned, reused)."""
    view = getattr(_thread_io, 'view', None)
    if view is None:
        view = _thread_io.view = memoryview(mmap.mmap(-1, IO_BUFFER_SIZE))
    return view


def buffer_address(view: memoryview) -> int | None:
    """The address of a writable buffer's first byte, None for a read-only one."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# =================================================================================================
# Errors
# =================================================================================================

class StorageError(Exception):
    """Base of every error this tool reports to its user as a message rather than a traceback."""


class ConfigError(StorageError):
    """Usage or configuration is wrong (unknown backend or batch, wrong disk, server down at
    start). Nothing has been done; the command exits with status 2."""


class FileFailure(StorageError):
    """One file could not be handled; the run goes on with the others and exits with status 1."""

    def __init__(self, message: str, object_name: str | None = None):
        super().__init__(message)
        self.object_name = object_name


class ChecksumMismatch(FileFailure):
    """The bytes are not the original's: their size or sha256 differs from the catalog's."""


class UnsafeObjectName(FileFailure):
    """An object name that could lead outside a backend's root (rule 4)."""


class SourceMissing(FileFailure):
    """The object is not where the catalog says it is."""


class ConversionError(FileFailure):
    """A version could not be made from the original (or stored bytes of it did not check out)."""


class Unreachable(StorageError):
    """A server (S3, the storage service) did not answer, after the retries the settings allow."""


# --- refusals of the per-file operations ---------------------------------------------------------
# What the storage service answers with a 4xx status; each changes nothing.

class Refusal(StorageError):
    """A per-file operation that was refused and changed nothing."""


class NotFound(Refusal):
    """`subject` is 'file' (not in the catalog), 'backend', or 'original' (no longer online)."""

    def __init__(self, message: str, subject: str):
        super().__init__(message)
        self.subject = subject


class TooFewCopies(Refusal):
    """Fewer than min-copies checked originals are recorded elsewhere (rule 3)."""


class VersionConflict(Refusal):
    """The backend records another version of the file than the one the operation needs."""


class InvalidArchive(Refusal):
    """An archive cannot be recorded as asked: not the catalog's sha256, or not an archive backend."""


class Busy(Refusal):
    """Another request holds the file's rows for longer than a request should wait."""


class OriginalChanged(Refusal):
    """The caller's idea of the original (If-Match) is not the catalog's."""


# --- crash and fault points: how the tests break runs on purpose -----------------------------------

CRASH_POINTS = frozenset({
    'before-rename',            # a file written and fsynced under its temporary name
    'after-write',              # a file in place at the target, not yet recorded
    'after-commit',             # a batch of rows committed
    'after-archive-write',      # an original written to the archive, not yet recorded
    'after-version-write',      # a version written at ACTIVE, the original still there
    'after-original-delete',    # the original deleted at ACTIVE, the row not yet changed
})
FAULT_POINTS = frozenset({
    'fsync',                    # from the N-th sync of a disk on (folder fsync, syncfs), it fails with EIO
    'rename',                   # from the N-th rename of a synced file into place on, it fails with EIO
})


class TestFaults:
    """Test hooks for rules 1 and 5, from the environment:

    MITWELTEN_CRASH_AT=POINT:N  the process kills itself with SIGKILL the N-th time it passes
                                POINT (one of CRASH_POINTS);
    MITWELTEN_FAULT_AT=POINT:N  from the N-th time on, POINT fails as a dying disk would (one of
                                FAULT_POINTS: 'fsync' raises OSError(EIO)).

    An unknown point is refused by the command line (`problem`) rather than silently ignored."""

    def __init__(self, environ=os.environ):
        self.problem = None
        self.crash = self._parse(environ.get('MITWELTEN_CRASH_AT', ''), CRASH_POINTS, 'MITWELTEN_CRASH_AT')
        self.fault = self._parse(environ.get('MITWELTEN_FAULT_AT', ''), FAULT_POINTS, 'MITWELTEN_FAULT_AT')
        self.passed: dict[str, int] = {}
        self.lock = threading.Lock()

    def _parse(self, value: str, known: frozenset, variable: str) -> tuple[str, int] | None:
        if not value:
            return None
        name, _, count = value.partition(':')
        if name not in known or not (count or '1').isdigit():
            self.problem = (f"{variable}={value!r}: expected POINT[:N] with POINT one of "
                            f"{', '.join(sorted(known))}")
            return None
        return name, int(count or 1)

    def _count(self, name: str) -> int:
        with self.lock:
            self.passed[name] = self.passed.get(name, 0) + 1
            return self.passed[name]

    def crash_point(self, name: str) -> None:
        if self.crash and self.crash[0] == name and self._count(name) == self.crash[1]:
            os.kill(os.getpid(), signal.SIGKILL)

    def fault_point(self, name: str, path: object = None) -> None:
        if self.fault and self.fault[0] == name and self._count(name) >= self.fault[1]:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path) if path is not None else None)


TEST_FAULTS = TestFaults()
crash_point = TEST_FAULTS.crash_point


# =================================================================================================
# Configuration
# =================================================================================================

def env_number(name: str, default: float, kind: type = float, minimum: float = 0.001):
    """A number from the environment variable `name`, or `default`; ConfigError naming it."""
    text = os.environ.get(name, '').strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a {'whole ' if kind is int else ''}number") from None
    if value < minimum:
        raise ConfigError(f'{name}={text!r} must be at least {minimum:g}')
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the catalog is: a libpq DSN ('' means libpq's own defaults: PGHOST, ~/.pgpass, …)
    and the schema that holds Mitwelten's tables; and how long to wait for the network.

    connect_timeout and read_timeout (seconds) and attempts apply to every S3 server and to
    the storage service: a server that accepts connections and never answers is given up on
    after about attempts × read_timeout seconds (plus a few seconds of backoff), and the run
    stops there. A read timeout is the longest silence within one answer, not the time a whole
    transfer may take: 20 s fits a camera image on any line that can carry one."""
    dsn: str = ''
    schema: str = DEFAULT_SCHEMA
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    attempts: int = 3

    @classmethod
    def from_env(cls, dsn: str | None = None, schema: str | None = None) -> 'Settings':
        """--db and --schema as given, else MITWELTEN_DB, MITWELTEN_DB_SCHEMA; the network
        timeouts from MITWELTEN_CONNECT_TIMEOUT, MITWELTEN_READ_TIMEOUT, MITWELTEN_ATTEMPTS."""
        return cls(dsn=dsn if dsn is not None else os.environ.get('MITWELTEN_DB', ''),
                   schema=schema or os.environ.get('MITWELTEN_DB_SCHEMA') or DEFAULT_SCHEMA,
                   connect_timeout=env_number('MITWELTEN_CONNECT_TIMEOUT', cls.connect_timeout),
                   read_timeout=env_number('MITWELTEN_READ_TIMEOUT', cls.read_timeout),
                   attempts=env_number('MITWELTEN_ATTEMPTS', cls.attempts, int, 1))


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


def s3_client(location: S3Location, settings: Settings, pool_size: int = 10):
    """An S3 client for the server of `location`, with its credentials (see s3_session) and the
    settings' timeouts and attempts (botocore's standard retry mode backs off between them)."""
    from botocore.config import Config
    session = s3_session(location)
    return session.client('s3', endpoint_url=location.endpoint, config=Config(
        region_name=session.region_name or 'us-east-1', s3={'addressing_style': 'path'},
        max_pool_connections=pool_size, connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout, retries={'max_attempts': settings.attempts, 'mode': 'standard'},
        # The tool checks every byte itself (sha256 against the catalog) and sends
        # ChecksumSHA256 with its uploads; botocore's own CRC32 on top only costs CPU.
        request_checksum_calculation='when_required', response_checksum_validation='when_required'))


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError ('NoSuchKey', '404', 'AccessDenied', …)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get('Error', {}).get('Code')
    return None


S3_NOT_FOUND = ('404', 'NoSuchKey', 'NotFound')
S3_CONNECTION_ERRORS = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)


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


def find_group(name: str) -> Group:
    try:
        return GROUPS[name]
    except KeyError:
        raise ConfigError(f"unknown group '{name}'; use 'image' or 'audio'") from None


@dataclasses.dataclass(frozen=True)
class BackendRow:
    """A row of storage_backend: one S3 bucket (and prefix) or one archive disk."""
    storage_id: int
    url_prefix: str
    type: str
    priority: int
    notes: str | None
    created_at: dt.datetime

    def describe(self) -> str:
        return f'backend {self.storage_id} ({self.type} {self.url_prefix})'


@dataclasses.dataclass(frozen=True)
class CatalogFile:
    """A file of the catalog (its row in files_image or files_audio), as a selection yields it:
    with the version the source backend holds and the version the target holds, if any."""
    file_id: int
    object_name: str
    file_size: int
    sha256: str
    source_type: int = 0
    target_type: int | None = None


def pg_error_line(exc: BaseException) -> str:
    """The first line of a PostgreSQL error, without libpq's context lines and Python's names."""
    text = (getattr(exc, 'pgerror', None) or str(exc) or type(exc).__name__).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def catalog_outage(exc: BaseException) -> bool:
    """Whether `exc` says the catalog's server is gone (not that a query was wrong). Every
    error the server sends has a SQLSTATE; libpq's own (a connection lost while rows stream)
    has none, and psycopg2 may raise it as a plain DatabaseError."""
    return (isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
            or (type(exc) is psycopg2.DatabaseError and not getattr(exc, 'pgcode', None)))


def connect_catalog(settings: Settings, *, require_tables: bool = True):
    """A connection to the catalog with search_path set to the schema.

    With `require_tables`, checks that the schema holds the storage tables, so that a wrong
    --schema gives a clear message instead of failing halfway through a run."""
    try:
        # TCP keepalives: a catalog server that went away (its machine down, the network cut) is
        # noticed within about a minute, not when the kernel gives up hours later.
        conn = psycopg2.connect(settings.dsn, application_name='mitwelten-storage', connect_timeout=15,
                                keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
    except psycopg2.OperationalError as exc:
        raise ConfigError(f'cannot connect to the catalog, {describe_dsn(settings.dsn)}: {pg_error_line(exc)} '
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


def streamed_rows(conn, query, params=None, itersize: int = 2000, columns: list | None = None) -> Iterator[tuple]:
    """The rows of a query from a server-side cursor, `itersize` at a time: a selection of
    millions of files is never held whole. The cursor's transaction ends when the rows do.
    `columns`, if given, is filled with the column names once the first rows have come."""
    cur = conn.cursor(name=f'stream_{uuid.uuid4().hex[:8]}')
    cur.itersize = itersize
    try:
        cur.execute(query, params)
        rows = iter(cur)
        first = next(rows, None)     # a named cursor describes its columns once it has fetched
        if columns is not None:
            columns.extend(d[0] for d in cur.description)
        if first is not None:
            yield first
            yield from rows
    finally:
        with contextlib.suppress(psycopg2.Error):
            cur.close()
            conn.commit()


BACKEND_COLUMNS = 'storage_id, url_prefix, type, priority, notes, created_at'


def fetch_backend(conn, storage_id: int) -> BackendRow:
    with conn.cursor() as cur:
        cur.execute(f'SELECT {BACKEND_COLUMNS} FROM storage_backend WHERE storage_id = %s', (storage_id,))
        row = cur.fetchone()
    conn.commit()
    if row is None:
        raise ConfigError(f'no storage backend with id {storage_id} in the catalog (see `info`)')
    return BackendRow(*row)


def fetch_backends(conn) -> list[BackendRow]:
    with conn.cursor() as cur:
        cur.execute(f'SELECT {BACKEND_COLUMNS} FROM storage_backend ORDER BY storage_id')
        rows = cur.fetchall()
    conn.commit()
    return [BackendRow(*row) for row in rows]


class SyncFailed(StorageError):
    """A backend could not make its writes durable (fsync failed): nothing written since its
    last successful sync is recorded (rule 1), and the run stops."""

    def __init__(self, backend: 'Backend', error: OSError):
        super().__init__(f'{backend.describe()} could not make its writes durable '
                         f'(fsync: {error.strerror or error})')
        self.backend = backend


class Recorder:
    """Collects what a run has done, as row changes, and records them in batches: inserts (a
    backend now holds a version), type changes (a backend's version replaced) and removals.

    A change is handed over only once the bytes it speaks of are written and checked; before
    every recording the backends are synced, so what is recorded is durable (rule 1). When a
    sync fails, the pending changes are dropped, never recorded, and nothing more is recorded
    by this recorder: on a disk that failed an fsync, nothing written since its last good sync
    can be trusted. The next run finds such files, checks them and records them, or writes them
    again. Subclasses say where the changes go: CatalogWriter (the catalog) and ServiceRecorder
    (the storage service)."""

    def __init__(self, conn, group: Group, backends: tuple = (), every_rows: int = 500,
                 every_seconds: float = 5.0):
        self.conn = conn                # for the counts of copies elsewhere (and a CatalogWriter's commits)
        self.group = group
        self.backends = backends
        self.every_rows = every_rows
        self.every_seconds = every_seconds
        self.inserts: list[tuple[CatalogFile, int, int]] = []
        self.type_changes: list[tuple[int, int, int, int]] = []
        self.removals: list[tuple[int, int]] = []
        self.last_flush = time.monotonic()
        self.recorded = 0               # inserts recorded
        self.unrecorded = 0             # inserts dropped: their files are written but not recorded
        self.failed: SyncFailed | None = None

    @property
    def pending(self) -> int:
        return len(self.inserts) + len(self.type_changes) + len(self.removals)

    @property
    def pending_inserts(self) -> int:
        return len(self.inserts)

    def add(self, file: CatalogFile, storage_id: int, version_type: int) -> None:
        self.inserts.append((file, storage_id, version_type))

    def change_type(self, file_id: int, storage_id: int, old_type: int, new_type: int) -> None:
        self.type_changes.append((file_id, storage_id, old_type, new_type))

    def remove(self, file_id: int, storage_id: int) -> None:
        self.removals.append((file_id, storage_id))

    def due(self) -> bool:
        return self.pending >= self.every_rows or (
            self.pending > 0 and time.monotonic() - self.last_flush >= self.every_seconds)

    def drop_pending(self) -> None:
        self.unrecorded += len(self.inserts)
        self.inserts.clear()
        self.type_changes.clear()
        self.removals.clear()

    def flush(self) -> list[tuple[int, str]]:
        """Sync the backends, then record the pending changes. Raises SyncFailed (once) when a
        sync fails, and the recording's error when it fails (the changes stay pending).
        Returns the inserts that were refused, as (file_id, reason)."""
        self.last_flush = time.monotonic()
        if not self.pending:
            return []
        if self.failed:
            self.drop_pending()
            return []
        for backend in self.backends:
            try:
                backend.sync()
            except OSError as exc:
                self.failed = SyncFailed(backend, exc)
                self.drop_pending()
                raise self.failed from None
            except BaseException:       # interrupted in the middle of a sync: nothing is known durable
                self.failed = SyncFailed(backend, OSError(errno.EINTR, 'interrupted'))
                self.drop_pending()
                raise
        return self._record()

    def _record(self) -> list[tuple[int, str]]:
        raise NotImplementedError

    def originals_elsewhere(self, file_ids: list[int], storage_id: int) -> dict[int, int]:
        """How many recorded rows say a backend other than `storage_id` holds the original of
        each file: the checked copies that let an original leave it (rule 3)."""
        if not file_ids:
            return {}
        with self.conn.cursor() as cur:
            cur.execute(sql.SQL('SELECT file_id, count(*) FROM {} WHERE file_id = ANY(%s) AND storage_id <> %s '
                                'AND type = 0 GROUP BY file_id').format(sql.Identifier(self.group.storage_table)),
                        (file_ids, storage_id))
            counts = dict(cur.fetchall())
        self.conn.commit()
        return counts


class CatalogWriter(Recorder):
    """Records a run's changes in the catalog, a commit per batch (`execute_values`)."""

    def _record(self) -> list[tuple[int, str]]:
        table = sql.Identifier(self.group.storage_table)
        try:
            with self.conn.cursor() as cur:
                if self.inserts:
                    psycopg2.extras.execute_values(cur, sql.SQL(
                        'INSERT INTO {} (file_id, storage_id, type, created_at, updated_at) VALUES %s '
                        'ON CONFLICT (file_id, storage_id) DO NOTHING').format(table).as_string(cur),
                        [(file.file_id, storage_id, version_type) for file, storage_id, version_type in self.inserts],
                        template='(%s, %s, %s, now(), now())', page_size=1000)
                if self.type_changes:
                    psycopg2.extras.execute_values(cur, sql.SQL(
                        'UPDATE {} AS s SET type = v.new_type, updated_at = now() '
                        'FROM (VALUES %s) AS v (file_id, storage_id, old_type, new_type) '
                        'WHERE s.file_id = v.file_id AND s.storage_id = v.storage_id AND s.type = v.old_type'
                    ).format(table).as_string(cur), self.type_changes, page_size=1000)
                if self.removals:
                    psycopg2.extras.execute_values(cur, sql.SQL(
                        'DELETE FROM {} AS s USING (VALUES %s) AS v (file_id, storage_id) '
                        'WHERE s.file_id = v.file_id AND s.storage_id = v.storage_id').format(table)
                        .as_string(cur), self.removals, page_size=1000)
            self.conn.commit()
        except psycopg2.Error:
            with contextlib.suppress(psycopg2.Error):
                self.conn.rollback()
            raise
        crash_point('after-commit')
        self.recorded += len(self.inserts)
        self.inserts.clear()
        self.type_changes.clear()
        self.removals.clear()
        return []


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


def selection_error(batch, exc: psycopg2.Error) -> StorageError:
    if catalog_outage(exc):
        return exc
    return ConfigError(f"batch '{batch.id}' (batches.py) cannot be selected: {pg_error_line(exc)}")


@dataclasses.dataclass(frozen=True)
class Selection:
    """The files of a batch that SOURCE holds, streamed in file_id order: a production batch
    holds 1.7 million files and is never loaded whole.

    For `copy` (archive=False): files SOURCE holds as version `version_type` or as the original,
    and TARGET holds in no version. For `archive`: files SOURCE (the active tier) holds as the
    original, with whatever version TARGET (the archive) already holds of them."""
    batch: object
    source_id: int
    target_id: int
    version_type: int = 0
    limit: int | None = None
    archive: bool = False

    @property
    def group(self) -> Group:
        return GROUPS[self.batch.group]

    @property
    def _todo(self) -> str:
        return 'TRUE' if self.archive else 't.file_id IS NULL'

    def _query(self, conn, head: str, tail: str) -> str:
        storage = self.group.storage_table
        params = {'source': self.source_id, 'target': self.target_id,
                  'types': (0,) if self.archive else (self.version_type, 0)}
        joins = (') AS b\n'
                 f'JOIN {storage} s ON s.file_id = b.file_id AND s.storage_id = %(source)s AND s.type IN %(types)s\n'
                 f'LEFT JOIN {storage} t ON t.file_id = b.file_id AND t.storage_id = %(target)s\n')
        with conn.cursor() as cur:
            tail = cur.mogrify(joins + tail, params).decode()
        return f'{head}\n{batch_sql(self.batch)}\n{tail}'

    def counts(self, conn) -> dict:
        """How many files of the batch are to do (and their bytes), how many TARGET holds as
        the version asked for already, and how many in another version."""
        head = (f'SELECT count(*) FILTER (WHERE {self._todo}),\n'
                f'       coalesce(sum(b.file_size) FILTER (WHERE {self._todo}), 0),\n'
                f'       count(*) FILTER (WHERE t.type = {int(self.version_type)}),\n'
                f'       count(*) FILTER (WHERE t.type <> {int(self.version_type)}),\n'
                '       count(*)\n'
                'FROM (')
        try:
            with conn.cursor() as cur:
                cur.execute(self._query(conn, head, ''))
                todo, todo_bytes, done, other, at_source = cur.fetchone()
            conn.commit()
        except psycopg2.Error as exc:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()
            raise selection_error(self.batch, exc) from None
        if self.limit is not None and todo > self.limit:
            todo, todo_bytes = self.limit, None
        return {'todo': todo, 'todo_bytes': todo_bytes, 'done': done, 'other_version': other,
                'at_source': at_source}

    def check(self, conn) -> None:
        """Have PostgreSQL plan the selection (EXPLAIN: nothing runs), so that a batch whose SQL
        is wrong is a configuration error before a run starts, not a run stopped early."""
        try:
            with conn.cursor() as cur:
                cur.execute(self._query(conn, 'EXPLAIN SELECT b.file_id, b.object_name, b.file_size, b.sha256 FROM (',
                                        ''))
            conn.commit()
        except psycopg2.Error as exc:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()
            raise selection_error(self.batch, exc) from None

    def files(self, conn) -> Iterator[CatalogFile]:
        head = 'SELECT b.file_id, b.object_name, b.file_size, b.sha256, s.type, t.type FROM ('
        tail = f'WHERE {self._todo} ORDER BY b.file_id' + (f' LIMIT {int(self.limit)}' if self.limit is not None else '')
        rows = streamed_rows(conn, self._query(conn, head, tail))
        last_id = None
        try:
            for file_id, object_name, file_size, sha256, source_type, target_type in rows:
                if file_id == last_id:   # a batch whose joins repeat a file
                    continue
                last_id = file_id
                yield CatalogFile(file_id, object_name, int(file_size), (sha256 or '').strip().lower(),
                                  source_type, target_type)
        except psycopg2.Error as exc:
            raise selection_error(self.batch, exc) from None


# --- one file ------------------------------------------------------------------------------------

FILE_COLUMNS = 'file_id, object_name, file_size, sha256'


def fetch_file(conn, group: str, file_id: int) -> CatalogFile:
    """One file's row in files_image / files_audio; NotFound if the catalog has no such file."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL(f'SELECT {FILE_COLUMNS} FROM {{}} WHERE file_id = %s').format(
            sql.Identifier(find_group(group).files_table)), (file_id,))
        row = cur.fetchone()
    if row is None:
        raise NotFound(f'no {group} file with id {file_id} in the catalog', 'file')
    file_id, object_name, file_size, sha256 = row
    return CatalogFile(file_id, object_name, int(file_size or 0), (sha256 or '').strip().lower())


@dataclasses.dataclass(frozen=True)
class HeldVersion:
    """A storage row of one file: which backend holds which version of it."""
    backend: BackendRow
    type: int


def held_versions(conn, group: str, file_id: int, *, lock: bool = False) -> list[HeldVersion]:
    """The file's storage rows with their backends, the online tiers first (by priority, then
    id). With `lock`, the rows are locked (SELECT … FOR UPDATE) until the transaction ends, so
    that two requests for one file, from any number of processes, never both act on it; a lock
    not had within 30 s is Busy."""
    group = find_group(group)
    select = sql.SQL(f'SELECT s.type, {", ".join("b." + c for c in BACKEND_COLUMNS.split(", "))} '
                     'FROM {} s JOIN storage_backend b ON b.storage_id = s.storage_id '
                     'WHERE s.file_id = %s ORDER BY b.priority, b.storage_id'
                     + (' FOR UPDATE OF s' if lock else '')).format(sql.Identifier(group.storage_table))
    with conn.cursor() as cur:
        try:
            if lock:
                # The file's own row too: it exists even when no backend records the file yet,
                # so a first insert is serialized as well. NO KEY: the storage tables'
                # foreign-key checks (KEY SHARE) of other writers are not held up.
                cur.execute("SET LOCAL lock_timeout = '30s'")
                cur.execute(sql.SQL('SELECT 1 FROM {} WHERE file_id = %s FOR NO KEY UPDATE').format(
                    sql.Identifier(group.files_table)), (file_id,))
            cur.execute(select, (file_id,))
        except psycopg2.errors.LockNotAvailable:
            conn.rollback()
            raise Busy(f'{group.name} file {file_id} is being changed by another request; try again') from None
        return [HeldVersion(BackendRow(*row[1:]), row[0]) for row in cur.fetchall()]


# =================================================================================================
# Backends
# =================================================================================================
#
# One small interface, `Backend`, that the local disk and the S3 bucket both implement. The rest
# of the tool uses a backend through it and by the capabilities a backend declares
# (keeps_tags, lists_files, adopts_found_files, root), never by asking which class it is.

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


def repr_digest(sha256_hex: str) -> str:
    """The Repr-Digest header (RFC 9530) of an original whose sha256 this is."""
    return f'sha-256=:{sha256_hex_to_b64(sha256_hex)}:'


# --- durable files -------------------------------------------------------------------------------

def full_fsync(fd: int) -> None:
    """fsync that reaches the disk: on macOS plain fsync stops at the drive's cache."""
    if hasattr(fcntl, 'F_FULLFSYNC'):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EINVAL, errno.ENOTTY):   # a file system without it
                raise
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files, removals) durable."""
    TEST_FAULTS.fault_point('fsync', path)
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    try:
        full_fsync(fd)
    finally:
        os.close(fd)


def _libc_syncfs():
    """libc's syncfs(fd), where there is one (Linux): makes every file of the file system durable,
    and reports write-back errors since the descriptor was opened (Linux 5.8 and later)."""
    if not sys.platform.startswith('linux'):
        return None
    release = re.match(r'(\d+)\.(\d+)', os.uname().release)
    if not release or (int(release[1]), int(release[2])) < (5, 8):
        return None          # older kernels' syncfs does not report write-back errors
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    return function


SYNCFS = _libc_syncfs()
SYNC_GROUP = 32     # files made durable and renamed together, while a copy runs


def temporary_name(final: Path) -> Path:
    """A hidden name beside `final` (the rename stays atomic), marked as this run's and
    recognisable by its suffix for the clean-up of a killed run's leftovers."""
    return final.with_name(f'.{final.name[:200]}.{RUN_MARK}-{next(_TMP_NUMBERS)}{TMP_SUFFIX}')


@contextlib.contextmanager
def atomic_file(final: Path, *, sync_folder: bool = True,
                on_fsync_error: Callable[[OSError], None] | None = None) -> Iterator[Path]:
    """Rule 2: yields a temporary path beside `final` for the caller to write and close; when the
    block ends without error the file is fsynced and renamed to `final`, so `final` is either
    its old self or the whole new file, never half written. On error the temporary file goes.
    With `sync_folder`, the folder is fsynced at once; without, the caller syncs it later (a
    backend batches the folders of many files into one fsync each before a catalog commit)."""
    tmp = temporary_name(final)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))
        try:
            full_fsync(fd)
        except OSError as exc:
            if on_fsync_error:
                on_fsync_error(exc)
            raise
        finally:
            os.close(fd)
        crash_point('before-rename')
        TEST_FAULTS.fault_point('rename', final)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_folder:
        fsync_dir(final.parent)


# --- archive disks: identity and whereabouts -------------------------------------------------------

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


def dot_file_mismatch(root: Path, backend_row: BackendRow) -> str | None:
    """Why the disk at `root` is not the backend, or None when its dot-file matches the catalog
    row (storage_id and created_at)."""
    dot_path = root / DOT_FILE
    if not dot_path.is_file():
        return f'{dot_path} not found: the disk of {backend_row.describe()} is not mounted there'
    try:
        values = read_dot_file(root)
    except (OSError, UnicodeDecodeError) as exc:
        return f'cannot read {dot_path}: {exc}'
    found_id = values.get('storage_id', '?')
    created = parse_timestamp(values.get('created_at', ''))
    if found_id != str(backend_row.storage_id) or created != backend_row.created_at:
        return (f'wrong disk at {root}: its {DOT_FILE} says storage_id={found_id}, created_at='
                f"{values.get('created_at', '?')}, but the catalog's backend {backend_row.storage_id} was created "
                f'at {backend_row.created_at}')
    return None


def normal_path(path: str | Path) -> Path:
    """A folder's path as the file system means it, for comparing one path with another: `~`
    expanded, made absolute, '.', '..' and trailing or doubled slashes gone, and symbolic links
    resolved as far as the path exists. A url_prefix stored as typed ('/media/archive07/', as
    the earlier Mitwelten script stored it) is the same folder as '/media/archive07'."""
    return Path(os.path.expanduser(str(path))).resolve(strict=False)


def same_folder(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one folder: the same normalised path, or (a bind mount, a link
    on the way) the same folder on the same file system."""
    if normal_path(a) == normal_path(b):
        return True
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


DEFAULT_MOUNT_ROOTS = ('/Volumes', '/media/*', '/run/media/*/*', '/mnt')


def mount_roots() -> list[str]:
    """Where disks get mounted (glob patterns): macOS, Linux desktops, by hand.
    MITWELTEN_MOUNT_ROOTS (separated by ':') replaces the list."""
    configured = os.environ.get('MITWELTEN_MOUNT_ROOTS')
    if configured is not None:
        return [root for root in configured.split(os.pathsep) if root]
    return list(DEFAULT_MOUNT_ROOTS)


def find_disk(backend_row: BackendRow) -> Path | None:
    """The folder, under the mount roots, whose dot-file matches the backend: each root itself
    and the folders in it (a disk, or a backend folder at the top of a disk)."""
    found = find_disks(backend_row)
    return found[0] if found else None


def find_disks(backend_row: BackendRow) -> list[Path]:
    """Every folder under the mount roots whose dot-file matches the backend, each folder once
    (one reached through two paths counts once). More than one is a disk and its copy."""
    found: list[Path] = []
    for pattern in mount_roots():
        for candidate in sorted(glob.glob(os.path.expanduser(pattern))):
            places = [Path(candidate)]
            with contextlib.suppress(OSError), os.scandir(candidate) as entries:
                places += sorted(Path(e.path) for e in entries if not e.name.startswith('.') and e.is_dir())
            for place in places:
                with contextlib.suppress(OSError):
                    if ((place / DOT_FILE).is_file() and dot_file_mismatch(place, backend_row) is None
                            and not any(same_folder(place, known) for known in found)):
                        found.append(place)
    return found


def two_claims(backend_row: BackendRow, first: Path, second: Path) -> ConfigError:
    """Two folders whose dot-files both match one backend: a disk copied whole (`rsync -a`, its
    dot-file with it). Which one the catalog's rows speak of cannot be told, so neither is used."""
    return ConfigError(f'two folders claim to be backend {backend_row.storage_id}: {first} and {second} (both have its '
                       f'{DOT_FILE}; one is a copy of the other). Refusing to use either: unmount or rename the copy, '
                       'or remove its dot-file (a copy becomes a backend of its own with `create` on an empty folder '
                       'and `copy`)')


# --- the interface ---------------------------------------------------------------------------------

class Backend:
    """What every backend offers: streamed reads, atomic checked writes, and deletes of objects
    named by their catalog object_name; and the capabilities it has."""

    row: BackendRow
    kind: str
    keeps_tags = False              # carries S3 object tags (copied from S3 to S3)
    lists_files = False             # can list what it holds: `verify` finds files the catalog does not know
    adopts_found_files = False      # a file found there unrecorded (a killed run's) is checked and recorded
    root: Path | None = None        # the folder it lives in, where `report` writes (disks only)
    writes_from_buffer = False      # writes best from this thread's io_buffer() (O_DIRECT): read into it
    group_writes = False            # may make new files durable in groups, by `sync` (set by `copy`)

    def location(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return f'backend {self.row.storage_id} ({self.kind} {self.location()})'

    def check(self, writing: bool) -> None:
        """Raise ConfigError unless the backend is reachable (and writable, if `writing`)."""
        raise NotImplementedError

    def size(self, object_name: str) -> int | None:
        """The stored object's size, or None if it is not there."""
        raise NotImplementedError

    def read(self, object_name: str, *, start: int = 0, end: int | None = None,
             piece: int | None = None, into: memoryview | None = None) -> Iterator[bytes]:
        """The object's bytes (from `start` to `end`, inclusive, if given) in chunks of about
        `piece` bytes (or as the backend reads best); SourceMissing if it is not there. With
        `into` (a writable buffer) a backend may deliver the chunks as views of it, each valid
        only until the next one is asked for."""
        raise NotImplementedError

    def read_original(self, file: CatalogFile, into: memoryview | None = None) -> Iterator[bytes]:
        """The original of a catalog file, unchecked (a CheckedStream checks it)."""
        return self.read(file.object_name, into=into)

    def write(self, object_name: str, chunks: Iterable[bytes], size: int, content_type: str,
              sha256_hex: str | None = None, tags: dict | None = None) -> None:
        """Store the object so that it is whole under its final name when this returns (on a
        disk writing in groups: once `sync` has run) and durable once `sync` has run, and never
        partly there: if `chunks` raises, nothing stands under the name."""
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
        """Make the writes and deletes so far durable: called before the catalog records them.
        Raises OSError when it cannot; what was not synced stays pending."""

    def will_sync(self, object_name: str) -> None:
        """Have the next `sync` cover the object's entry too (a file found written by a killed
        run, which may not have synced its rename)."""

    def gone_reason(self) -> str | None:
        """Why the backend can no longer be used at all (a disk unplugged), or None."""
        return None

    def files_location(self) -> str:
        """Where the files themselves are (a disk's archive/ folder), for messages."""
        return self.location()

    def folders(self) -> Iterator[tuple[tuple[str, ...], list[os.DirEntry]]]:
        """With `lists_files`: every folder with the files in it, parents first, siblings
        sorted (the order of `held_files`)."""
        raise NotImplementedError


# --- local disks -----------------------------------------------------------------------------------

class LocalBackend(Backend):
    """An archive disk: ROOT/.mitwelten-storage-id, ROOT/README.md, ROOT/archive/<object name>."""

    kind = 'local'
    lists_files = True
    adopts_found_files = True
    writes_from_buffer = True

    def __init__(self, backend_row: BackendRow, root: Path | None = None, path_option: str | None = None):
        self.row = backend_row
        self.given_path = root is not None        # --path / --source-path / --target-path
        self.path_option = path_option            # the option of the command that names where the disk is
        self.root = Path(root or backend_row.url_prefix)
        self.archive = self.root / 'archive'
        self._checked_dirs: set[Path] = set()
        self._cleaned_dirs: set[Path] = set()
        self._unsynced_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        # O_DIRECT writes (Linux): no copy into the page cache, no write-back later; turned off
        # for the run when the file system refuses it.
        self.direct_io = hasattr(os, 'O_DIRECT') and os.environ.get('MITWELTEN_DIRECT_IO', '1') != '0'
        # Writing in groups (`copy`, where syncfs exists, see group_writes): files written and
        # checked under their temporary names, made durable together, then renamed.
        self._lock_fd: int | None = None
        self._unsynced_files: list[tuple[Path, Path]] = []
        self._group_lock = threading.Lock()
        self._sync_error: OSError | None = None

    def location(self) -> str:
        return str(self.root)

    def check(self, writing: bool) -> None:
        """Find the disk and make sure it is this backend: its dot-file must match the catalog
        row (storage_id and created_at). Not at its recorded path, the disk is looked for under
        the usual mount roots; a path given by the user is used as it is."""
        problem = dot_file_mismatch(self.root, self.row)
        if problem and not self.given_path:
            found = find_disks(self.row)
            if len(found) > 1:
                raise two_claims(self.row, found[0], found[1])
            if found:
                log.info('%s is not at its recorded path; found it at %s (its %s matches)',
                         self.describe(), found[0], DOT_FILE)
                self.root, problem = found[0], None
        if problem:
            hint = self.path_option or ('--target-path' if writing else '--source-path')
            if not self.root.is_dir():
                raise ConfigError(f'{self.describe()} is not mounted: {self.root} does not exist and no disk with '
                                  f'its {DOT_FILE} is mounted under {", ".join(mount_roots()) or "(no mount roots)"}; '
                                  f'pass {hint} where the disk is mounted now')
            raise ConfigError(f'refusing to use {self.describe()}: {problem}')
        if self.given_path:
            # The folder given matches; the disk itself may be online too, at its recorded path or
            # under the mount roots: then the folder given is a copy, or the disk is the copy.
            recorded = Path(self.row.url_prefix)
            elsewhere = ([recorded] if dot_file_mismatch(recorded, self.row) is None else []) + find_disks(self.row)
            for other in elsewhere:
                if not same_folder(other, self.root):
                    raise two_claims(self.row, self.root, other)
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
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f'cannot write to {self.describe()}: {exc.strerror} ({lock_path})') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f'{self.describe()} is in use by another mitwelten-storage run '
                              f'(lock {lock_path}); wait for it to finish') from None
        self._lock_fd = fd     # open before any write: syncfs() on it reports every write-back error since
        try:
            yield
        finally:
            self._lock_fd = None
            with contextlib.suppress(OSError):     # a disk pulled out mid-run
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def _grouped(self) -> bool:
        return self.group_writes and SYNCFS is not None and self._lock_fd is not None

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
        for new_dir in created:   # the new folders' entries become durable with the next sync
            self._changed(new_dir.parent)
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
                if (entry.name.endswith(TMP_SUFFIX) and entry.name.startswith('.') and RUN_MARK not in entry.name
                        and entry.is_file(follow_symlinks=False)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        log.debug('removed leftover temporary file %s', entry.path)

    def size(self, object_name: str) -> int | None:
        try:
            st = os.lstat(self.path(object_name))
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def read(self, object_name: str, *, start: int = 0, end: int | None = None,
             piece: int | None = None, into: memoryview | None = None) -> Iterator[bytes]:
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
            if start:
                handle.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = handle.read(min(piece or CHUNK, left) if left is not None else piece or CHUNK)
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def write(self, object_name: str, chunks: Iterable[bytes], size: int, content_type: str,
              sha256_hex: str | None = None, tags: dict | None = None) -> None:
        final = self.path(object_name)
        self._ensure_dir(final.parent)
        self._remove_leftovers(final.parent)
        if not self._grouped:
            with atomic_file(final, sync_folder=False, on_fsync_error=self._fsync_failed) as tmp:
                self._write_file(tmp, object_name, chunks, size)
            self._changed(final.parent)
            return
        # In a group: no fsync of its own; _sync_group() makes the group durable, then renames.
        tmp = temporary_name(final)
        try:
            self._write_file(tmp, object_name, chunks, size)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._dirs_lock:
            self._unsynced_files.append((tmp, final))
            due = len(self._unsynced_files) >= SYNC_GROUP
        if due:
            self._sync_group()

    def _write_file(self, tmp: Path, object_name: str, chunks: Iterable[bytes], size: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0)
        direct = self.direct_io and size >= DIRECT_ALIGN
        fd = None
        if direct:
            try:
                fd = os.open(tmp, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_io = direct = False      # a file system without O_DIRECT
        if fd is None:
            fd = os.open(tmp, flags, 0o644)
        with open(fd, 'wb', buffering=0) as handle:    # chunks are large: no second buffer
            for chunk in chunks:
                view = memoryview(chunk).cast('B')
                if direct:
                    # Straight from the (aligned) buffer to the disk, past the page cache; the
                    # tail that is not a whole block, or a chunk that is not aligned, goes
                    # through the page cache, and so does the rest of the file.
                    whole = len(view) - len(view) % DIRECT_ALIGN
                    address = buffer_address(view) if whole else None
                    if address is not None and address % DIRECT_ALIGN == 0:
                        part = view[:whole]
                        try:
                            while part:
                                part = part[handle.write(part):]
                            view = view[whole:]
                        except OSError as exc:
                            if exc.errno != errno.EINVAL or handle.tell() % DIRECT_ALIGN:
                                raise
                            self.direct_io = False
                            view = view[whole - len(part):]      # the rest, from where it stopped
                    if len(view):
                        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                        direct = False
                while view:
                    view = view[handle.write(view):]
            written = os.fstat(handle.fileno()).st_size
        if written != size:
            raise FileFailure(f'{tmp}: wrote {written} bytes, expected {size}', object_name)

    def _fsync_failed(self, exc: OSError) -> None:
        """A file's fsync failed: the disk may have lost what it holds of anything written since
        the last good sync, so every later sync of the run fails and nothing more is recorded."""
        with self._group_lock:
            if self._sync_error is None:
                self._sync_error = exc

    def _sync_group(self) -> None:
        """One syncfs() for the files written so far in the group, then their renames (their
        folders are fsynced by sync(), before the catalog records them). A failed sync leaves
        none of them under its final name and fails every later sync of the run, so nothing
        written since the last good sync is recorded (rule 1); the next run writes them again."""
        with self._group_lock:
            if self._sync_error is not None:
                raise self._sync_error
            with self._dirs_lock:
                files, self._unsynced_files = self._unsynced_files, []
            if not files:
                return
            try:
                TEST_FAULTS.fault_point('fsync', self.root)
                if SYNCFS(self._lock_fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f'syncfs: {os.strerror(err)}', str(self.root))
            except OSError as exc:
                self._sync_error = exc
                for tmp, _ in files:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise
            except BaseException:       # interrupted: whether the group is durable is not known
                self._sync_error = OSError(errno.EINTR, 'interrupted while making a group of files durable',
                                           str(self.root))
                raise
            try:
                for tmp, final in files:
                    crash_point('before-rename')
                    TEST_FAULTS.fault_point('rename', final)
                    os.replace(tmp, final)
                    self._changed(final.parent)
            except BaseException as exc:
                # Some of the group are not under their final names: none of the rows waiting
                # for this sync may be recorded, so every later sync of the run fails too.
                self._sync_error = exc if isinstance(exc, OSError) else OSError(
                    errno.EINTR, 'interrupted while renaming a group of files', str(self.root))
                raise

    def delete(self, object_name: str) -> None:
        path = self.path(object_name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            self._changed(path.parent)

    def _changed(self, directory: Path) -> None:
        with self._dirs_lock:
            self._unsynced_dirs.add(directory)

    def will_sync(self, object_name: str) -> None:
        path = self.path(object_name)
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))    # its data, if not on the disk yet
        try:
            full_fsync(fd)
        except OSError as exc:
            self._fsync_failed(exc)
            raise
        finally:
            os.close(fd)
        for folder in path.relative_to(self.archive).parents:     # its folder up to the archive root
            self._changed(self.archive / folder)

    def sync(self) -> None:
        # The renames and removals since the last commit reach the disk in one go per folder,
        # before the catalog records them (rule 1): one fsync per folder, not per file. A folder
        # whose fsync fails (and every one not yet synced) stays pending.
        self._sync_group()
        with self._dirs_lock:
            directories, self._unsynced_dirs = list(self._unsynced_dirs), set()
        try:
            while directories:
                fsync_dir(directories[-1])
                directories.pop()
        finally:
            if directories:
                with self._dirs_lock:
                    self._unsynced_dirs.update(directories)

    def files_location(self) -> str:
        return str(self.archive)

    def gone_reason(self) -> str | None:
        if not self.archive.is_dir():
            return f'{self.describe()} disappeared ({self.archive} is gone); is the disk still attached?'
        return None

    def folders(self) -> Iterator[tuple[tuple[str, ...], list[os.DirEntry]]]:
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
        yield from walk(self.archive, ())


# --- S3 buckets --------------------------------------------------------------------------------------

def is_md5_etag(etag: str) -> bool:
    return bool(re.fullmatch(r'[0-9a-f]{32}', etag))


class S3Backend(Backend):
    """A bucket (and optional key prefix) on an S3 server: AWS, MinIO, or any compatible one."""

    kind = 's3'
    keeps_tags = True
    # Up to this size an object is read into memory and written with one PUT whose checksums
    # the server verifies; larger ones stream through the transfer manager's multipart upload.
    SINGLE_PUT_LIMIT = 32 * 1024 * 1024
    WHOLE_READ_LIMIT = 8 * 1024 * 1024

    def __init__(self, backend_row: BackendRow, settings: Settings, jobs: int = DEFAULT_JOBS):
        from boto3.s3.transfer import TransferConfig
        self.row = backend_row
        self.where = S3Location.parse(backend_row.url_prefix)
        self.client = s3_client(self.where, settings, pool_size=max(10, jobs + 4))
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
            if s3_error_code(exc) in S3_NOT_FOUND:
                return None
            raise
        return head['ContentLength']

    def read(self, object_name: str, *, start: int = 0, end: int | None = None,
             piece: int | None = None, into: memoryview | None = None) -> Iterator[bytes]:
        extra = {}
        if start or end is not None:
            extra['Range'] = f'bytes={start}-{"" if end is None else end}'
        try:
            response = self.client.get_object(Bucket=self.where.bucket, Key=self.key(object_name), **extra)
        except botocore.exceptions.ClientError as exc:
            if s3_error_code(exc) in S3_NOT_FOUND:
                raise SourceMissing(f'object {self.key(object_name)} is missing in {self.describe()}',
                                    object_name) from None
            raise
        body = response['Body']
        raw = getattr(body, '_raw_stream', None)
        fp = getattr(raw, '_fp', None)
        if into is not None and hasattr(fp, 'readinto') and hasattr(raw, 'release_conn'):
            yield from self._read_into(body, raw, fp, response.get('ContentLength'), into)
            return
        try:
            # A camera image in one read: far less per-byte Python than 1 MiB chunks. Larger
            # objects stream in pieces of that size, so memory stays bounded by --jobs.
            if piece is None and response.get('ContentLength', self.WHOLE_READ_LIMIT + 1) <= self.WHOLE_READ_LIMIT:
                yield body.read()
            else:
                yield from body.iter_chunks(piece or self.WHOLE_READ_LIMIT)
        finally:
            body.close()

    def _read_into(self, body, raw, fp, length: int | None, into: memoryview) -> Iterator[memoryview]:
        """The body received straight into `into` (http.client's readinto under urllib3, which
        would otherwise make a new bytes object per read), in views of up to len(into) bytes."""
        done = False
        try:
            while True:
                want = len(into) if length is None else min(len(into), length)
                got = 0
                while got < want:
                    n = fp.readinto(into[got:want])
                    if not n:
                        break
                    got += n
                if length is not None:
                    length -= got
                    if got < want:
                        raise botocore.exceptions.IncompleteReadError(actual_bytes=got, expected_bytes=want)
                if got:
                    yield into[:got]
                if got < want or length == 0:
                    break
            done = True
        except TimeoutError as exc:
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=self.where.endpoint, error=exc) from None
        except (OSError, http.client.HTTPException) as exc:
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=self.where.endpoint) from exc
        finally:
            if done:
                raw.release_conn()        # read to its end: the connection goes back to the pool
            else:
                body.close()              # cut off: the connection is closed, never reused

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
            if (not response.get('ServerSideEncryption') and is_md5_etag(etag)
                    and etag != hashlib.md5(data).hexdigest()):
                self._delete_key(key)
                raise FileFailure(f'{self.describe()} stored {key} with a different MD5 than was sent',
                                  object_name)
        else:
            # Every part is sent with its SHA-256, which the server checks; the whole was
            # checked against the catalog's as it was read (CheckedStream).
            self.client.upload_fileobj(ChunkReader(chunks), self.where.bucket, key,
                                       ExtraArgs={**extra, 'ChecksumAlgorithm': 'SHA256'}, Config=self.transfer_config)
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
            if s3_error_code(exc) in ('NotImplemented', *S3_NOT_FOUND):
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


def connection_problem(exc: BaseException) -> str:
    """What went wrong on the way to a server ('Connection refused', 'no answer in time'), for a
    message that names the server itself."""
    if isinstance(exc, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        return 'no answer in time'
    error = getattr(exc, 'kwargs', {}).get('error') or exc
    found = re.search(r'\[Errno -?\d+\] ([^\]\)]+)', str(error))
    return found.group(1).strip() if found else type(error).__name__


def check_bucket(client, where: S3Location, what: str) -> None:
    try:
        client.head_bucket(Bucket=where.bucket)
    except botocore.exceptions.NoCredentialsError:
        raise ConfigError(f'no S3 credentials for {where.netloc}: set AWS_ACCESS_KEY_ID and '
                          f"AWS_SECRET_ACCESS_KEY, or create an AWS profile named '{where.netloc}'") from None
    except S3_CONNECTION_ERRORS as exc:
        raise ConfigError(f'cannot reach the S3 server {where.endpoint} ({what}): {connection_problem(exc)}; '
                          'check the server and the network (timeouts: MITWELTEN_CONNECT_TIMEOUT, '
                          'MITWELTEN_READ_TIMEOUT, MITWELTEN_ATTEMPTS)') from None
    except botocore.exceptions.ClientError as exc:
        code = s3_error_code(exc)
        if code in ('404', 'NoSuchBucket', 'NotFound'):
            raise ConfigError(f"bucket '{where.bucket}' does not exist at {where.endpoint} ({what})") from None
        if code in ('403', 'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch'):
            raise ConfigError(f"access to bucket '{where.bucket}' at {where.endpoint} denied ({what}): "
                              f"check the credentials (AWS profile '{where.netloc}' or the default ones)") from None
        raise ConfigError(f"S3 error on bucket '{where.bucket}' at {where.endpoint} ({what}): {code}") from None


def open_backend(backend_row: BackendRow, settings: Settings, *, path: str | None = None,
                 jobs: int = DEFAULT_JOBS, path_option: str | None = None) -> Backend:
    """The backend of a catalog row; `path` is where a disk is mounted if not at its recorded
    path, and `path_option` the command's option that gives it (named in messages)."""
    if backend_row.type == 'local':
        return LocalBackend(backend_row, Path(path).expanduser().absolute() if path else None, path_option)
    if path:
        raise ConfigError(f'{backend_row.describe()} is an S3 backend: a path applies to local disks only')
    if backend_row.type == 's3':
        return S3Backend(backend_row, settings, jobs=jobs)
    raise ConfigError(f"{backend_row.describe()} has type '{backend_row.type}'; this tool knows 'local' and 's3'")


# =================================================================================================
# The storage service's client (--via URL)
# =================================================================================================
#
# A workstation without S3 keys archives through the storage service (mitwelten_service.py):
# it reads originals with GET …/original, checks them, writes them to its disk, records them
# with POST …/archive, and asks the service to replace (POST …/scaled) or delete
# (DELETE …/original) the originals online. The service holds the S3 keys and writes the
# catalog; the workstation only reads the catalog (its batches).

KINDS = {'image': 'images', 'audio': 'audio'}        # a group's name in the service's paths
PROBLEM = 'urn:mitwelten:storage:problem:'           # the prefix of the service's problem types
# The service's problem types that stand for one of the engine's errors: the service answers an
# error with its type, and the client raises the error again from the type.
SERVICE_PROBLEMS = {'too-few-copies': TooFewCopies, 'version-conflict': VersionConflict, 'busy': Busy,
                    'invalid-archive': InvalidArchive, 'original-changed': OriginalChanged,
                    'version-failed': ConversionError, 'original-missing': SourceMissing,
                    'original-corrupt': ChecksumMismatch}


class TokenRefused(StorageError):
    """The storage service refused the token (401: missing, expired or invalid; 403: no role)."""


def read_token_file(path: str) -> str:
    return Path(path).expanduser().read_text(encoding='utf-8').strip()


def token_from_env(given: str | None = None) -> str:
    """The bearer token: given, else MITWELTEN_TOKEN, else the file MITWELTEN_TOKEN_FILE names."""
    token = (given or os.environ.get('MITWELTEN_TOKEN') or '').strip()
    path = os.environ.get('MITWELTEN_TOKEN_FILE')
    if not token and path:
        try:
            token = read_token_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f'MITWELTEN_TOKEN_FILE={path}: cannot read the token: '
                              f'{getattr(exc, "strerror", None) or exc}') from None
    if not token:
        raise ConfigError('--via needs a token: set MITWELTEN_TOKEN, or MITWELTEN_TOKEN_FILE to a file holding it')
    return token


class ServiceClient:
    """The storage service as a workstation reaches it: urllib3 (boto3 brings it) with a pool of
    connections sized to --jobs, the settings' timeouts, and retries with backoff of requests
    that did not get an answer (every request of the service is idempotent)."""

    def __init__(self, url: str, token: str, settings: Settings, pool_size: int = DEFAULT_JOBS):
        import urllib3
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ('http', 'https') or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"--via {url!r} must look like http[s]://HOST[:PORT][/PATH]")
        self.base = url.strip().rstrip('/')
        self.token = token
        self.settings = settings
        self.urllib3 = urllib3
        self.http = urllib3.PoolManager(
            maxsize=pool_size + 2, block=False, retries=False,
            timeout=urllib3.Timeout(connect=settings.connect_timeout, read=settings.read_timeout))

    @classmethod
    def from_options(cls, options: RunOptions, settings: Settings) -> 'ServiceClient':
        return cls(options.via, token_from_env(options.token), settings, options.jobs)

    def describe(self) -> str:
        return f'the storage service at {self.base}'

    # Answers of the service (5xx) that say what went wrong with one file, not that it is down.
    FILE_PROBLEMS = {'original-missing', 'original-corrupt', 's3-error'}

    def request(self, method: str, path: str, *, body: dict | None = None, headers: dict | None = None,
                stream: bool = False, token: bool = True, slow: bool = False):
        """The answer to a request, after up to `attempts` tries with backoff for answers that
        did not come (connection refused or dropped, timeouts, 502/503/504 without a problem of
        one file) and while the file is busy with another request. A problem answer raises the
        refusal it stands for; a service still down raises Unreachable. A refused token is
        read again from MITWELTEN_TOKEN_FILE once (a refresher may have renewed it). `slow`:
        a request that makes a version, given three times the read timeout."""
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers['Content-Type'] = 'application/json'
        timeout = self.urllib3.Timeout(connect=self.settings.connect_timeout,
                                       read=self.settings.read_timeout * (3 if slow else 1))
        reason, token_renewed, busy = '', False, False
        attempt = 0
        while attempt < self.settings.attempts:
            if attempt:
                time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random_fraction()))
            attempt += 1
            if token:
                headers['Authorization'] = f'Bearer {self.token}'
            try:
                response = self.http.request(method, self.base + path, body=data, headers=headers, timeout=timeout,
                                             preload_content=not stream, redirect=False)
            except self.urllib3.exceptions.HTTPError as exc:
                reason = f'{type(exc).__name__}: {exc}'
                continue
            if response.status in (502, 503, 504, 409, 401):
                problem = self.problem_of(response)
                kind = str(problem.get('type', '')).removeprefix(PROBLEM)
                if response.status == 401 and not token_renewed and self.renew_token():
                    token_renewed, attempt = True, attempt - 1
                    continue
                if response.status >= 502 and kind not in self.FILE_PROBLEMS or kind == 'busy':
                    reason = problem.get('detail') or f'HTTP {response.status}'
                    busy = kind == 'busy'
                    response.release_conn()
                    continue
                self.raise_problem(response, problem)
            if response.status >= 400:
                self.raise_problem(response, self.problem_of(response))
            return response
        if busy:
            raise Busy(reason)
        raise Unreachable(f'{self.describe()} did not answer {method} {path} ({reason}) after '
                          f'{self.settings.attempts} attempts')

    def renew_token(self) -> bool:
        """Read MITWELTEN_TOKEN_FILE again; whether it holds a new token."""
        path = os.environ.get('MITWELTEN_TOKEN_FILE')
        if not path:
            return False
        with contextlib.suppress(OSError, UnicodeDecodeError):
            token = read_token_file(path)
            if token and token != self.token:
                self.token = token
                return True
        return False

    @staticmethod
    def problem_of(response) -> dict:
        try:
            data = response.data if response.data else response.read()
            problem = json.loads(data or b'{}')
            return problem if isinstance(problem, dict) else {}
        except Exception:       # not a problem document: the status says it all
            return {}

    def raise_problem(self, response, problem: dict) -> None:
        response.release_conn()
        kind = str(problem.get('type', '')).removeprefix(PROBLEM)
        detail = problem.get('detail') or problem.get('title') or f'HTTP {response.status}'
        status = response.status
        if status in (401, 403):
            raise TokenRefused(f'{self.describe()} refused the token ({status}: {detail}); get a new one and set '
                               'MITWELTEN_TOKEN or MITWELTEN_TOKEN_FILE')
        if status == 404:
            raise NotFound(detail, 'original' if kind == 'original-not-online' else kind or 'file')
        errors = {**SERVICE_PROBLEMS, 's3-error': FileFailure}
        if kind in errors:
            raise errors[kind](detail)
        raise StorageError(f'{self.describe()} answered {status}: {detail}')

    def check(self) -> None:
        """The service answers, and takes the token: before a run writes anything."""
        try:
            self.request('GET', '/backends', headers={'Accept': 'application/json'})
        except Unreachable as exc:
            raise ConfigError(f'cannot reach {self.describe()}: {exc}') from None
        except TokenRefused as exc:
            raise ConfigError(str(exc)) from None
        except StorageError as exc:
            raise ConfigError(f'{self.describe()} does not answer as the storage service does ({exc}): is --via '
                              "the service's URL?") from None

    def path(self, group: str, file_id: int, what: str) -> str:
        return f'/{KINDS[group]}/{int(file_id)}/{what}'

    def read_original(self, group: str, file: CatalogFile) -> Iterator[bytes]:
        """The original's bytes, as the service streams them; a connection dropped mid-file is
        resumed with a Range request for the rest, rather than starting the file again. The
        whole is checked by the caller (CheckedStream); Repr-Digest must be the catalog's."""
        received = 0
        drops = 0
        while True:
            # After a drop, the rest is asked for as a range, even from byte 0: the service checks
            # only whole answers, and cuts one whose original does not match; a range comes
            # unchecked, and the whole is checked here (a corrupted original is named as such).
            headers = {'Range': f'bytes={received}-'} if drops else {}
            response = self.request('GET', self.path(group, file.file_id, 'original'), headers=headers, stream=True)
            complete = False
            try:
                digest = response.headers.get('Repr-Digest', '')
                if digest and digest != repr_digest(file.sha256):
                    raise ChecksumMismatch(f'the service says the original has the digest {digest}, not the '
                                           "catalog's sha256", file.object_name)
                skip = received if response.status == 200 else 0    # a Range the service did not honour
                try:
                    # Pieces of 64 KiB: what arrived before a drop is kept, and only the rest
                    # is asked for again.
                    for chunk in response.stream(64 * 1024, decode_content=False):
                        if skip:
                            chunk, skip = chunk[skip:], max(0, skip - len(chunk))
                        if chunk:
                            received += len(chunk)
                            yield chunk
                    if received >= file.file_size or response.status not in (200, 206):
                        complete = True
                        return
                    reason = 'the answer ended early'
                except self.urllib3.exceptions.HTTPError as exc:
                    reason = f'{type(exc).__name__}: {exc}'
            finally:
                if complete:
                    response.release_conn()
                else:                   # read in part: this connection is not used again
                    response.close()
            drops += 1
            if drops >= self.settings.attempts:
                raise Unreachable(f'{self.describe()} dropped the connection {drops} times while sending '
                                  f'{file.object_name} ({reason})')
            log.debug('resuming %s at byte %d after: %s', file.object_name, received, reason)

    def record_archived(self, group: str, file: CatalogFile, storage_id: int) -> str:
        response = self.request('POST', self.path(group, file.file_id, 'archive'),
                                body={'storage_id': storage_id, 'sha256': file.sha256})
        return 'created' if response.status == 201 else 'exists'

    def make_version_in_place(self, group: str, file: CatalogFile, version_type: int) -> dict:
        return json.loads(self.request('POST', self.path(group, file.file_id, 'scaled'),
                                       body={'type': version_type}, slow=True).data)

    def delete_original(self, group: str, file: CatalogFile) -> None:
        self.request('DELETE', self.path(group, file.file_id, 'original'), headers={'If-Match': f'"{file.sha256}"'},
                     slow=True)


def random_fraction() -> float:
    return int.from_bytes(os.urandom(2), 'big') / 65536


class ServiceSource(Backend):
    """The active S3 backend, as the storage service presents it: originals only, read with
    GET …/original. Nothing is written through it; the service changes ACTIVE itself."""

    kind = 's3'

    def __init__(self, backend_row: BackendRow, client: ServiceClient, group: str):
        self.row = backend_row
        self.client = client
        self.group = group

    def location(self) -> str:
        return f'{self.row.url_prefix}, through {self.client.describe()}'

    def check(self, writing: bool) -> None:
        if self.row.type != 's3':
            raise ConfigError(f'{self.row.describe()} is not an S3 backend: through the service (--via) the source '
                              'must be the active S3 backend')
        self.client.check()

    def read_original(self, file: CatalogFile, into: memoryview | None = None) -> Iterator[bytes]:
        return self.client.read_original(self.group, file)

    def _only_originals(self, *args, **kwargs):
        raise ConfigError('through the service (--via) only originals are read; the service changes ACTIVE itself')

    size = read = write = delete = _only_originals


class ServiceRecorder(Recorder):
    """Records what a run wrote through the service (POST …/archive, one request per file, as
    many at once as --jobs), after syncing the disk (rule 1). What the service changes at ACTIVE
    it records itself, so type changes and removals handed here are nothing more to do."""

    def __init__(self, client: ServiceClient, conn, group: Group, backends: tuple, jobs: int = DEFAULT_JOBS,
                 every_rows: int = 200, every_seconds: float = 2.0):
        super().__init__(conn, group, backends, every_rows, every_seconds)
        self.client = client
        self.jobs = jobs

    def change_type(self, file_id: int, storage_id: int, old_type: int, new_type: int) -> None:
        pass

    def remove(self, file_id: int, storage_id: int) -> None:
        pass

    def _record(self) -> list[tuple[int, str]]:
        def post(insert):
            file, storage_id, _ = insert
            try:
                self.client.record_archived(self.group.name, file, storage_id)
                return None
            except Refusal as exc:
                return file.file_id, str(exc)
        refused = []
        recorded = []
        with ThreadPoolExecutor(max_workers=min(self.jobs, max(1, len(self.inserts)))) as pool:
            futures = {pool.submit(post, insert): insert for insert in self.inserts}
            error = None
            for future in futures:
                try:
                    result = future.result()
                except Exception as exc:         # the service went away: these stay pending
                    error = error or exc
                    continue
                recorded.append(futures[future])
                if result:
                    refused.append(result)
        self.inserts = [insert for insert in self.inserts if insert not in recorded]
        self.recorded += len(recorded) - len(refused)
        if error is not None:
            raise error
        return refused


# =================================================================================================
# Originals
# =================================================================================================
#
# An original counts only once its bytes hash to the catalog's sha256 (and have its size).

def check_original(file: CatalogFile, size: int, sha256_hex: str) -> None:
    if size != file.file_size:
        raise ChecksumMismatch(f'{size:,} bytes, the catalog says {file.file_size:,}: not the original',
                               file.object_name)
    if sha256_hex != file.sha256:
        raise ChecksumMismatch(f'sha256 {sha256_hex} does not match the catalog\'s {file.sha256}: not the '
                               'original', file.object_name)


def check_original_bytes(data: bytes, file: CatalogFile) -> None:
    check_original(file, len(data), hashlib.sha256(data).hexdigest())


class CheckedStream:
    """Passes a source's chunks through while hashing them; at the end, raises ChecksumMismatch
    unless the size and sha256 match the catalog's. A writer that consumes it therefore never
    finishes a file whose bytes are not the original's. With `withhold_last`, the last chunk is
    passed on only once the whole has checked out: a reader on the other end of a connection
    never sees a wrong original end cleanly (the storage service streams originals so)."""

    def __init__(self, chunks: Iterable[bytes], file: CatalogFile, progress: Callable[[int], None] | None = None,
                 withhold_last: bool = False):
        self.chunks = chunks
        self.file = file
        self.progress = progress
        self.withhold_last = withhold_last

    def __iter__(self) -> Iterator[bytes]:
        digest = hashlib.sha256()
        total = 0
        held = None
        for chunk in self.chunks:
            digest.update(chunk)
            total += len(chunk)
            if total > self.file.file_size:
                raise ChecksumMismatch(f'larger at the source than the catalog\'s {self.file.file_size:,} bytes',
                                       self.file.object_name)
            if self.progress:
                self.progress(len(chunk))
            if self.withhold_last:
                if held is not None:
                    yield held
                held = chunk
            else:
                yield chunk
        check_original(self.file, total, digest.hexdigest())
        if held is not None:
            yield held


def read_original(backend: Backend, file: CatalogFile, progress: Callable[[int], None] | None = None) -> bytes:
    """The original's bytes, read once and checked against the catalog's size and sha256."""
    return b''.join(CheckedStream(backend.read_original(file), file, progress))


# =================================================================================================
# Versions
# =================================================================================================
#
# The version table: every version of a file the catalog can record, how its object name is
# formed from the original's, its content type, how it is made from the original (in memory),
# and how stored bytes of it are checked. Type 0 is the original everywhere.

# One more than the cores: a conversion also waits (on ffmpeg's pipes, on the GIL), and a core
# should not idle meanwhile (FLAC of 20 recordings on 2 cores: 2.74 s with 2 slots, 2.61 with 3).
CPU_SLOTS = threading.BoundedSemaphore(1 + (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                                            else os.cpu_count() or 2))


@dataclasses.dataclass(frozen=True)
class Version:
    group: str
    type: int
    label: str
    content_type: str | None                                  # None: by the original's extension
    name_from: Callable[[str], str]                           # the version's object name, from the original's
    encoder: Callable[[bytes, CatalogFile], bytes] | None     # original's bytes -> the version's, checked
    checker: Callable[[bytes, CatalogFile], None]             # raises unless stored bytes are a sound copy
    exact: bool = False       # stored bytes are checked exactly against the catalog's sha256 (original, gzip)

    def object_name(self, original_name: str) -> str:
        return self.name_from(original_name)

    def describe(self) -> str:
        return f'{self.group} type {self.type} ({self.label})'

    def make(self, original: bytes, file: CatalogFile) -> bytes:
        """The version made from the original's bytes, checked (ConversionError otherwise).
        In a CPU slot: more conversions at once than there are cores would not go faster, only
        hold more decoded pictures and sample buffers in memory."""
        with CPU_SLOTS:
            return self.encoder(original, file)

    def check(self, stored: bytes, file: CatalogFile) -> None:
        """Raise unless `stored` is a sound copy of this version of the file (an original hashes
        to the catalog's sha256, gzip decompresses to it, WebP and FLAC decode). In a CPU slot,
        as checking decodes as much as making does. The encoders and checkers themselves never
        take a slot, so a slot is never waited for while one is held."""
        with CPU_SLOTS:
            self.checker(stored, file)


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


# --- gzip ------------------------------------------------------------------------------------------

def make_gzip(original: bytes, file: CatalogFile) -> bytes:
    # mtime=0: the same original always gives the same bytes.
    packed = gzip.compress(original, compresslevel=9, mtime=0)
    check_gzip(packed, file)
    return packed


def check_gzip(packed: bytes, file: CatalogFile) -> None:
    try:
        unpacked = gzip.decompress(packed)
    except (OSError, EOFError, zlib.error) as exc:
        raise ConversionError(f'gzip version does not decompress: {exc}', file.object_name) from None
    try:
        check_original_bytes(unpacked, file)
    except ChecksumMismatch as exc:
        raise ConversionError(f'gzip version does not decompress to the original: {exc}',
                              file.object_name) from None


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


def downscaled(original: bytes, file: CatalogFile, box: tuple[int, int]) -> tuple[Image.Image, dict]:
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
        raise ConversionError('not an image that can be read (cannot make a WebP of it)', file.object_name) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ConversionError(f'cannot make a WebP of it: {exc}', file.object_name) from None
    return image, keep


def make_webp(original: bytes, file: CatalogFile, box: tuple[int, int]) -> bytes:
    """WebP of the original fitting in `box`, Pillow's encoder at quality 80."""
    image, keep = downscaled(original, file, box)
    out = io.BytesIO()
    try:
        image.save(out, 'WEBP', quality=WEBP_QUALITY, **keep)
    except (OSError, ValueError) as exc:
        raise ConversionError(f'cannot encode the WebP version: {exc}', file.object_name) from None
    webp = out.getvalue()
    check_webp(webp, file, box, expected_size=image.size)
    return webp


def check_webp(data: bytes, file: CatalogFile, box: tuple[int, int],
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
        raise ConversionError(f'WebP version does not decode: {exc}', file.object_name) from None
    if form != 'WEBP':
        raise ConversionError(f'version is {form}, not WebP', file.object_name)
    if size[0] > box[0] or size[1] > box[1] or (expected_size and size != expected_size):
        raise ConversionError(f'WebP version is {size[0]}×{size[1]}, expected '
                              f'{expected_size or box}', file.object_name)


# --- FLAC ------------------------------------------------------------------------------------------
#
# Made and checked in the process, with libFLAC through libsndfile (`soundfile`): the WAV's data
# chunk is used where it lies, libsndfile writes the FLAC into a file in memory (a memfd where
# there is one: no path, no disk, gone when closed; else a BytesIO), libFLAC seeks back at the
# end and fills in STREAMINFO's sample count and MD5 itself, and the FLAC is decoded again from
# that same file, block by block, and compared with the original's samples. A WAV never goes
# through a subprocess. Recordings in other containers are read by libsndfile where it can
# (AIFF, W64, RF64, CAF, …), and by pydub through ffmpeg where it cannot (MP3, AAC, …).

FLAC_BLOCK_FRAMES = 1 << 16     # frames per block when widening 24-bit samples and decoding
FLAC_LEVEL = 5                  # libFLAC's default, as ffmpeg's -compression_level 5
PCM_DTYPES = {16: 'int16', 24: 'int32'}      # how libsndfile hands over samples of each width
PCM_SUBTYPES = {16: 'PCM_16', 24: 'PCM_24'}
WAVE_FORMAT_PCM, WAVE_FORMAT_EXTENSIBLE = 0x0001, 0xFFFE
PCM_GUID = b'\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71'   # KSDATAFORMAT_SUBTYPE_PCM
# RIFF INFO tags carried into the FLAC's Vorbis comment (those libsndfile can write).
INFO_TAGS = {b'INAM': 'title', b'IART': 'artist', b'ICMT': 'comment', b'ICRD': 'date', b'ICOP': 'copyright',
             b'ISFT': 'software', b'IPRD': 'album', b'IGNR': 'genre', b'ITRK': 'tracknumber'}


def audio_libraries():
    """numpy and soundfile, imported where a FLAC is first made or checked: a run without
    recordings does not pay their tenth of a second of import."""
    import numpy
    import soundfile
    return numpy, soundfile


@functools.cache
def ffmpeg_executable() -> str:
    """ffmpeg from PATH, else the one in the imageio-ffmpeg wheel, for pydub (recordings that are
    not WAV and that libsndfile cannot read): nothing to install by hand."""
    found = shutil.which('ffmpeg')
    if not found:
        import imageio_ffmpeg
        found = imageio_ffmpeg.get_ffmpeg_exe()
    AudioSegment.converter = found
    return found


@dataclasses.dataclass(frozen=True)
class PcmAudio:
    """The samples of a recording: interleaved, signed little-endian, as in a WAV's data chunk."""
    channels: int
    sample_rate: int
    bits: int
    samples: memoryview
    tags: dict

    @property
    def frames(self) -> int:
        return len(self.samples) // (self.channels * self.bits // 8)


def is_wav(data: bytes) -> bool:
    return data[:4] == b'RIFF' and data[8:12] == b'WAVE'


def _info_tags(chunk: memoryview) -> dict:
    tags, pos = {}, 4
    while pos + 8 <= len(chunk):
        tag, size = bytes(chunk[pos:pos + 4]), struct.unpack_from('<I', chunk, pos + 4)[0]
        value = bytes(chunk[pos + 8:pos + 8 + size]).split(b'\0', 1)[0].strip()
        if tag in INFO_TAGS and value:
            tags[INFO_TAGS[tag]] = value.decode('utf-8', errors='replace')
        pos += 8 + size + (size & 1)
    return tags


def read_wav(original: bytes, file: CatalogFile) -> PcmAudio:
    """The PCM samples of a WAV, by its own RIFF walk (libsndfile's reader opens a truncated WAV
    without complaint), refusing what FLAC cannot hold losslessly and recordings cut short."""
    view = memoryview(original)
    if len(view) < 12 or not is_wav(original):
        raise ConversionError('not a WAV recording: no RIFF/WAVE header', file.object_name)
    fmt, tags, pos = None, {}, 12
    while pos + 8 <= len(view):
        chunk_id, size = bytes(view[pos:pos + 4]), struct.unpack_from('<I', view, pos + 4)[0]
        body = pos + 8
        if chunk_id == b'fmt ':
            if size < 16 or body + size > len(view):
                raise ConversionError('not a WAV recording: fmt chunk too short', file.object_name)
            fmt = view[body:body + size]
        elif chunk_id == b'LIST' and view[body:body + 4] == b'INFO':
            tags = _info_tags(view[body:body + size])
        elif chunk_id == b'data':
            break
        pos = body + size + (size & 1)
    else:
        raise ConversionError(f"not a WAV recording: no {'fmt' if fmt is None else 'data'} chunk", file.object_name)
    if fmt is None:
        raise ConversionError('not a WAV recording: no fmt chunk before the data', file.object_name)
    tag, channels, sample_rate, _, block_align, bits = struct.unpack_from('<HHIIHH', fmt)
    if tag == WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 40 and fmt[24:40] == PCM_GUID:
        tag = WAVE_FORMAT_PCM
    if tag != WAVE_FORMAT_PCM:
        raise ConversionError(f'not a WAV recording of PCM samples (audio format 0x{tag:X})', file.object_name)
    return checked_pcm(channels, sample_rate, bits, block_align, view[body:], size, tags, file)


def checked_pcm(channels: int, sample_rate: int, bits: int, block_align: int, data: memoryview, declared: int,
                tags: dict, file: CatalogFile) -> PcmAudio:
    if bits not in PCM_DTYPES:
        raise ConversionError(f'unsupported sample format: {bits}-bit PCM (FLAC versions are made of 16- and 24-bit '
                              'recordings)', file.object_name)
    if not 1 <= channels <= 8 or not 1 <= sample_rate <= 655350 or block_align != channels * bits // 8:
        raise ConversionError(f'unsupported WAV: {channels} channels at {sample_rate} Hz', file.object_name)
    if len(data) < declared or declared % block_align:
        raise ConversionError(f'truncated recording: {min(len(data), declared):,} bytes of samples, the WAV header '
                              f'says {declared:,}', file.object_name)
    if declared == 0:
        raise ConversionError('empty recording: it holds no samples', file.object_name)
    return PcmAudio(channels, sample_rate, bits, data[:declared], tags)


LOSSY_SUBTYPES = {'MPEG_LAYER_I', 'MPEG_LAYER_II', 'MPEG_LAYER_III', 'VORBIS', 'OPUS', 'ALAW', 'ULAW', 'GSM610',
                  'IMA_ADPCM', 'MS_ADPCM', 'G721_32', 'G723_24', 'G723_40', 'VOX_ADPCM', 'NMS_ADPCM_16',
                  'NMS_ADPCM_24', 'NMS_ADPCM_32', 'DWVW_12', 'DWVW_16', 'DWVW_24', 'DPCM_8', 'DPCM_16'}


def read_other_recording(original: bytes, file: CatalogFile) -> PcmAudio:
    """A recording that is not a WAV, as 16- or 24-bit samples: through libsndfile where it
    reads the container (AIFF, W64, RF64, CAF, FLAC, …), else through pydub and ffmpeg (ALAC in
    MP4, for one), decoded to 24 bits (exact for 16- and 24-bit sources; pydub asks ffprobe
    what the recording holds). Lossy recordings are refused: a FLAC of one is no better."""
    np, soundfile = audio_libraries()
    try:
        with soundfile.SoundFile(io.BytesIO(original)) as source:
            subtype, channels, sample_rate = source.subtype, source.channels, source.samplerate
            bits = {'PCM_16': 16, 'PCM_24': 24}.get(subtype)
            if subtype in LOSSY_SUBTYPES:
                raise ConversionError(f'a lossy recording ({source.format} {subtype}): FLAC versions are made of '
                                      'lossless 16- and 24-bit recordings', file.object_name)
            if bits is None:
                raise ConversionError(f'unsupported sample format: {subtype} (FLAC versions are made of 16- and '
                                      '24-bit recordings)', file.object_name)
            samples = source.read(dtype=PCM_DTYPES[bits])
        data = samples.tobytes() if bits == 16 else _pack24(samples, np.empty(samples.size * 3, np.uint8)).tobytes()
        return checked_pcm(channels, sample_rate, bits, channels * bits // 8, memoryview(data), len(data), {}, file)
    except soundfile.LibsndfileError:
        pass
    ffmpeg_executable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', RuntimeWarning)      # pydub's own note that ffprobe is missing
            segment = AudioSegment.from_file(io.BytesIO(original), parameters=['-acodec', 'pcm_s24le'])
    except FileNotFoundError as exc:
        raise ConversionError(f'not a WAV recording, nor one libsndfile reads; reading it takes pydub and ffmpeg, '
                              f'and {Path(exc.filename or "ffprobe").name} is not installed', file.object_name) from None
    except (CouldntDecodeError, OSError, IndexError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f'not a WAV recording, nor audio that libsndfile or ffmpeg reads ({reason[:200]})',
                              file.object_name) from None
    wav = io.BytesIO()
    segment.export(wav, format='wav')
    return read_wav(wav.getvalue(), file)


@contextlib.contextmanager
def memory_file(data: bytes | None = None):
    """A file in memory for libsndfile: (what SoundFile opens, a function returning its bytes)."""
    if not hasattr(os, 'memfd_create'):
        buffer = io.BytesIO(data) if data is not None else io.BytesIO()
        yield buffer, buffer.getvalue
        return
    fd = os.memfd_create('mitwelten-flac', os.MFD_CLOEXEC)
    try:
        if data is not None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.lseek(fd, 0, os.SEEK_SET)
        yield fd, lambda: os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def _sound_file(target, *args, **kwargs):
    _, soundfile = audio_libraries()
    if isinstance(target, int):
        return soundfile.SoundFile(target, *args, closefd=False, **kwargs)
    return soundfile.SoundFile(target, *args, **kwargs)


def _widen24(samples: memoryview, first: int, count: int, out) -> object:
    """3-byte samples [first, first + count) as int32 shifted left by 8 (as libsndfile gives
    24-bit samples): one numpy pass over 4-byte windows every 3 bytes; a bijection, so equal
    int32 values mean equal bytes."""
    np, _ = audio_libraries()
    inside = max(0, min(count, len(samples) // 3 - 1 - first))
    if inside:
        window = np.ndarray((inside,), '<i4', buffer=samples, offset=3 * first, strides=(3,))
        np.left_shift(window, 8, out=out[:inside])
    for i in range(inside, count):                  # the last sample: no 4-byte window left
        at = 3 * (first + i)
        out[i] = int.from_bytes(samples[at:at + 3], 'little', signed=True) << 8
    return out[:count]


def _pack24(block, out) -> object:
    """int32 samples shifted left by 8 back to their 3 little-endian bytes."""
    np, _ = audio_libraries()
    wide = block.reshape(-1).view(np.uint8).reshape(-1, 4)
    packed = out[:3 * len(wide)].reshape(-1, 3)
    packed[:, 0], packed[:, 1], packed[:, 2] = wide[:, 1], wide[:, 2], wide[:, 3]
    return packed.reshape(-1)


def flac_stream_info(flac: bytes) -> dict:
    """The STREAMINFO block at the start of a FLAC stream."""
    if flac[:4] != b'fLaC' or len(flac) < 42 or flac[4] & 0x7F != 0:
        raise ValueError('no FLAC STREAMINFO block')
    info = flac[8:42]
    return {'sample_rate': int.from_bytes(info[10:13], 'big') >> 4,
            'channels': ((info[12] >> 1) & 0x07) + 1,
            'bits': (((info[12] & 0x01) << 4) | (info[13] >> 4)) + 1,
            'frames': ((info[13] & 0x0F) << 32) | int.from_bytes(info[14:18], 'big'),
            'md5': bytes(info[18:34])}


def _stream_info(head: bytes, file: CatalogFile) -> dict:
    try:
        info = flac_stream_info(head)
    except (ValueError, IndexError) as exc:
        raise ConversionError(f'not a FLAC stream: {exc}', file.object_name) from None
    if info['bits'] not in PCM_DTYPES:
        raise ConversionError(f"FLAC version has {info['bits']}-bit samples", file.object_name)
    if not info['frames']:
        raise ConversionError('FLAC version does not record its sample count (STREAMINFO incomplete)',
                              file.object_name)
    return info


def make_flac(original: bytes, file: CatalogFile) -> bytes:
    """Lossless FLAC of a recording, counted only once it decodes to exactly the original's
    samples and its STREAMINFO carries their count and MD5 (16- and 24-bit, 1 to 8 channels,
    the sample rates FLAC's streamable subset allows)."""
    np, soundfile = audio_libraries()
    audio = read_wav(original, file) if is_wav(original) else read_other_recording(original, file)
    with memory_file() as (sink, read_back):
        try:
            with _sound_file(sink, 'w', audio.sample_rate, audio.channels, PCM_SUBTYPES[audio.bits], format='FLAC',
                             compression_level=FLAC_LEVEL / 8) as encoder:
                for key, value in audio.tags.items():
                    setattr(encoder, key, value)
                if audio.bits == 16:
                    encoder.write(np.frombuffer(audio.samples, '<i2').reshape(-1, audio.channels))
                else:
                    step = FLAC_BLOCK_FRAMES * audio.channels
                    wide = np.empty(step, '<i4')
                    total = len(audio.samples) // 3
                    for first in range(0, total, step):
                        count = min(step, total - first)
                        encoder.write(_widen24(audio.samples, first, count, wide).reshape(-1, audio.channels))
        except (soundfile.LibsndfileError, RuntimeError, ValueError) as exc:
            raise ConversionError(f'cannot encode FLAC ({audio.channels} channels, {audio.sample_rate} Hz, '
                                  f'{audio.bits} bits): {exc}', file.object_name) from None
        head = os.pread(sink, 42, 0) if isinstance(sink, int) else sink.getbuffer()[:42].tobytes()
        info = _stream_info(head, file)
        if isinstance(sink, int):
            os.lseek(sink, 0, os.SEEK_SET)
        else:
            sink.seek(0)
        decode_flac_checked(sink, info, audio.samples, file)
        flac = read_back()
    if (info['channels'], info['sample_rate'], info['bits'], info['frames']) != (
            audio.channels, audio.sample_rate, audio.bits, audio.frames):
        raise ConversionError(f"FLAC version is {info['channels']} channels, {info['sample_rate']} Hz, {info['bits']} "
                              f"bits, {info['frames']:,} frames; the recording is {audio.channels}, "
                              f'{audio.sample_rate} Hz, {audio.bits} bits, {audio.frames:,} frames', file.object_name)
    if info['md5'] != hashlib.md5(audio.samples).digest():
        raise ConversionError('FLAC version does not record the MD5 of its samples', file.object_name)
    return flac


def check_flac(flac: bytes, file: CatalogFile) -> None:
    """A stored FLAC decodes, to as many samples as its STREAMINFO says, whose MD5 is the one
    it records (what `flac -t` checks)."""
    info = _stream_info(flac[:42], file)
    with memory_file(flac) as (source, _):
        decode_flac_checked(source, info, None, file)


def decode_flac_checked(source, info: dict, expected: memoryview | None, file: CatalogFile) -> None:
    """Decode block by block: against `expected` (the original's samples) sample for sample, or,
    without it, against the MD5 STREAMINFO records; and count the frames."""
    np, soundfile = audio_libraries()
    bits, channels = info['bits'], info['channels']
    digest = hashlib.md5() if expected is None else None
    block = np.empty((FLAC_BLOCK_FRAMES, channels), PCM_DTYPES[bits])
    scratch = (np.empty(FLAC_BLOCK_FRAMES * channels, '<i4') if expected is not None else
               np.empty(FLAC_BLOCK_FRAMES * channels * 3, np.uint8))
    done = 0
    total = len(expected) // (bits // 8) if expected is not None else None
    try:
        with _sound_file(source) as decoder:
            if (decoder.format, decoder.channels, decoder.samplerate) != ('FLAC', channels, info['sample_rate']):
                raise ConversionError(f'FLAC version opens as {decoder.format}, {decoder.channels} channels, '
                                      f"{decoder.samplerate} Hz; its STREAMINFO says {channels}, {info['sample_rate']} Hz",
                                      file.object_name)
            while count := decoder.buffer_read_into(block, PCM_DTYPES[bits]):
                got = block[:count].reshape(-1)
                if expected is not None:
                    if done + len(got) > total:
                        raise ConversionError('FLAC version decodes to more samples than the recording has',
                                              file.object_name)
                    want = (np.frombuffer(expected[2 * done:2 * (done + len(got))], '<i2') if bits == 16 else
                            _widen24(expected, done, len(got), scratch))
                    if not np.array_equal(got, want):
                        raise ConversionError('FLAC version does not decode to the original samples', file.object_name)
                else:
                    digest.update(got if bits == 16 else _pack24(got, scratch))
                done += len(got)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise ConversionError(f'FLAC version does not decode: {exc}', file.object_name) from None
    frames = done // channels
    if expected is not None and done != total:
        raise ConversionError(f'FLAC version decodes to {frames:,} frames, the recording has '
                              f'{total // channels:,}', file.object_name)
    if frames != info['frames']:
        raise ConversionError(f"FLAC version decodes to {frames:,} frames, its header says {info['frames']:,}",
                              file.object_name)
    if digest is not None and digest.digest() != info['md5']:
        raise ConversionError('FLAC version does not decode to the samples its MD5 records', file.object_name)


# --- the table -------------------------------------------------------------------------------------

ORIGINAL = 'original'
WEBP_LARGE, WEBP_SMALL = (1920, 1440), (640, 480)


def _webp(box: tuple[int, int]) -> tuple[Callable, Callable]:
    return (lambda data, file: make_webp(data, file, box)), (lambda data, file: check_webp(data, file, box))


VERSIONS: dict[tuple[str, int], Version] = {(v.group, v.type): v for v in [
    Version('image', 0, ORIGINAL, None, same_name, None, check_original_bytes, exact=True),
    Version('image', 1, 'WebP 1920×1440', 'image/webp', with_extension('.webp'), *_webp(WEBP_LARGE)),
    Version('image', 2, 'WebP 640×480', 'image/webp', with_extension('.webp'), *_webp(WEBP_SMALL)),
    Version('image', 10, 'gzip -9', 'application/gzip', with_suffix('.gz'), make_gzip, check_gzip, exact=True),
    Version('audio', 0, ORIGINAL, None, same_name, None, check_original_bytes, exact=True),
    Version('audio', 1, 'FLAC', 'audio/flac', with_extension('.flac'), make_flac, check_flac),
    Version('audio', 10, 'gzip -9', 'application/gzip', with_suffix('.gz'), make_gzip, check_gzip, exact=True),
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


def sound_copy_at(backend: Backend, file: CatalogFile, version: Version) -> bool:
    """Whether the backend holds a sound copy of the file's version, recorded or not: there,
    of the original's size (for an original), and passing the version's check."""
    object_name = version.object_name(file.object_name)
    size = backend.size(object_name)
    if size is None or (version.type == 0 and size != file.file_size):
        return False
    try:
        version.check(b''.join(backend.read(object_name)), file)
    except FileFailure:
        return False
    return True


# =================================================================================================
# Runs: options, progress, log file, interruption, faults, outcome counts
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


class Progress:
    """What a run tells whoever shows its progress (the command line's bar). This one shows
    nothing: a library caller gets no output unless it passes its own."""

    def start(self, command: str, total_bytes: int | None) -> None:
        pass

    def set_total(self, total_bytes: int | None) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def status(self, text: str) -> None:
        """'files 12/400, failed 1', or what the run is waiting for."""

    def close(self) -> None:
        pass


@dataclasses.dataclass
class RunOptions:
    """How a run goes: parallel transfers, how many files at most, where disks are mounted,
    whether through the storage service, where the log goes, who shows the progress, and
    whether Ctrl-C / SIGTERM are handled (the command line) or left to the caller."""
    jobs: int = DEFAULT_JOBS
    limit: int | None = None
    source_path: str | None = None
    target_path: str | None = None
    via: str | None = None              # the storage service's URL (copy and archive)
    token: str | None = None            # its bearer token (else MITWELTEN_TOKEN / MITWELTEN_TOKEN_FILE)
    log_dir: Path | None = None
    progress: Progress | None = None
    handle_signals: bool = False

    def check(self) -> None:
        if self.jobs < 1:
            raise ConfigError('--jobs must be at least 1')
        if self.limit is not None and self.limit < 0:
            raise ConfigError('--limit must not be negative')


@dataclasses.dataclass
class RunReport:
    """What a run did, for its summary, its exit status, and whoever called it."""
    command: str
    title: str = ''
    counts: dict = dataclasses.field(default_factory=dict)     # outcome -> files
    failures: list = dataclasses.field(default_factory=list)   # (object_name, reason)
    bytes_done: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    stopped: str | None = None       # why the run stopped early, and what to do
    log_path: Path | None = None
    notes: list = dataclasses.field(default_factory=list)
    recorded: int = 0                # catalog rows committed for files written
    unrecorded: int = 0              # files written but not recorded (the next run adopts them)

    @property
    def exit_status(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILURES if (self.failures or self.stopped) else EXIT_OK

    def count(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)


class Cancelled(Exception):
    """Work that was not started because the run is stopping: left for the next run."""


class Run:
    """The frame around a long operation: a log file with every file's outcome, progress,
    Ctrl-C and SIGTERM (with `handle_signals`), the reason it stopped, and the report. Use as a
    context manager. Messages for the user go through the module's logger."""

    def __init__(self, report: RunReport, options: RunOptions, total_files: int | None = None,
                 total_bytes: int | None = None, backends: tuple = (), stall_after: float = 10.0,
                 abandon_after: float | None = None):
        self.report = report
        self.stall_after = stall_after         # seconds without data before the progress says it waits
        # Once the run has decided to stop, the files in flight get this many seconds without data
        # before they are abandoned: half of stall_after, which BatchFrame sets to min(10, the read
        # timeout), so a run stops within one read timeout of its decision.
        self.abandon_after = stall_after / 2 if abandon_after is None else abandon_after
        self.stopped_at: float | None = None
        self.last_data = time.monotonic()     # bytes last moved
        self.options = options
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.backends = backends               # for naming the one a fault belongs to
        self.log_dir = Path(options.log_dir) if options.log_dir else default_log_dir()
        self.progress_shown = options.progress or Progress()
        self.stop_requested = False
        self.halted = False
        self.fault: BaseException | None = None
        self.started = time.monotonic()
        self.last_activity = self.started
        self.files_done = 0
        self.waiting_logged = False
        self.log_failed = False
        self._lock = threading.Lock()
        self._log_file = None
        self._old_handlers = {}
        self._connection_failures = 0
        self._reasons_said: set[str] = set()

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
        self._log_file.write(f'# mitwelten-storage {self.report.command} {self.report.title}\n# started {stamp}\n'
                             '# time\toutcome\tfile_id\tbytes\tobject_name\tdetail\n')
        self.progress_shown.start(self.report.command, self.total_bytes)
        self._show_status()
        if self.options.handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self.report.seconds = time.monotonic() - self.started
        self.progress_shown.close()
        if self._log_file:
            self._write_log(f'# ended after {self.report.seconds:.1f} s: {json.dumps(self.report.counts)}'
                            f'{", interrupted" if self.report.interrupted else ""}'
                            f'{", stopped: " + self.report.stopped if self.report.stopped else ""}\n')
            with contextlib.suppress(OSError):
                self._log_file.close()

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.interrupt()

    def interrupt(self) -> None:
        """Stop feeding new files; those in flight are finished and recorded (Ctrl-C, SIGTERM)."""
        self.stop_requested = True
        self.report.interrupted = True
        log.warning('interrupted: finishing the files in flight and recording them '
                    '(press Ctrl-C again to stop at once)')

    # -- outcomes --------------------------------------------------------------------------------
    def progress(self, nbytes: int) -> None:
        self.last_activity = self.last_data = time.monotonic()
        self.progress_shown.advance(nbytes)

    def _show_status(self, waiting: str = '') -> None:
        total = f'/{self.total_files}' if self.total_files is not None else ''
        failed = len(self.report.failures)
        self.progress_shown.status(f'files {self.files_done}{total}' + (f', failed {failed}' if failed else '')
                                   + (f', {waiting}' if waiting else ''))

    def outcome(self, file: CatalogFile, outcome: str, nbytes: int = 0, detail: str = '') -> None:
        """Count and log one file's outcome."""
        with self._lock:
            if outcome != 'failed':
                self._connection_failures = 0
            self.last_activity = time.monotonic()
            self.report.counts[outcome] = self.report.counts.get(outcome, 0) + 1
            self.report.bytes_done += nbytes
            self.files_done += 1
            self.log_entry(outcome, file.file_id, nbytes, file.object_name, detail)
            self._show_status()

    def log_entry(self, outcome: str, file_id: int | str, nbytes: int, name: str, detail: str = '') -> None:
        now = dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z'
        self._write_log(f'{now}\t{outcome}\t{file_id}\t{nbytes}\t{name}\t{detail}\n')

    def log_line(self, text: str) -> None:
        self._write_log(f'# {text}\n')

    def _write_log(self, text: str) -> None:
        """The log is the run's record, not its work: a log disk gone full is said once, and the
        run goes on (its summary still says everything)."""
        try:
            self._log_file.write(text)
        except (OSError, ValueError) as exc:
            if not self.log_failed:
                self.log_failed = True
                log.warning('cannot write the log file %s any more: %s', self.report.log_path,
                            getattr(exc, 'strerror', None) or exc)

    def set_totals(self, counts: dict) -> None:
        """The totals, once the selection has been counted."""
        if counts and self.total_files is None:
            self.total_files = counts['todo']
            self.total_bytes = counts['todo_bytes']
            self.progress_shown.set_total(self.total_bytes)
            self._show_status()

    def failure(self, file: CatalogFile, reason: str) -> None:
        """Count, log and name one file's failure. A reason said already for another file (a
        full disk fails every file in flight alike) is not said again on the way: the summary
        counts them, the log names each."""
        with self._lock:
            self.report.failures.append((file.object_name, reason))
            said = reason in self._reasons_said
            self._reasons_said.add(reason)
        if not said:
            log.warning('FAILED %s: %s', file.object_name, reason)
        self.outcome(file, 'failed', 0, reason)

    def file_failed(self, file: CatalogFile, exc: BaseException) -> None:
        """Name the file's failure; stop the run when no further file can succeed (a disk full
        or gone; a server that stopped answering)."""
        self.failure(file, describe_exception(exc))
        reason = fatal_reason(exc, self.backends)
        if reason:
            self.stop(reason)

    # -- stopping --------------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self.stop_requested or self.halted or bool(self.report.stopped) or self.fault is not None

    def stop(self, reason: str) -> None:
        """Stop feeding new files, for `reason` (the first one given is kept)."""
        with self._lock:
            if self.report.stopped:
                return
            self.report.stopped = reason
            self.stopped_at = time.monotonic()
        log.warning('stopping: %s', reason)

    def gives_up_waiting(self) -> bool:
        """Whether the files still in flight of a run that decided to stop are to be abandoned:
        nothing has moved for `abandon_after` seconds since the decision. A frozen server would
        otherwise hold the run for every attempt of every transfer in flight."""
        if self.stopped_at is None:
            return False
        return time.monotonic() - max(self.stopped_at, self.last_data) >= self.abandon_after

    def abandoned(self, in_flight: int) -> None:
        """Say in the stop line that `in_flight` files were abandoned."""
        note = (f'{in_flight} files in flight were abandoned after {self.abandon_after:.0f} s without data (nothing '
                'of them is recorded; the next run removes their temporary files)')
        self.report.stopped = f'{self.report.stopped}; {note}' if self.report.stopped else note
        self.log_line(f'abandoned: {note}')
        log.warning('stopping now: %s', note)

    def stop_for(self, fault: BaseException) -> None:
        """A fault that escaped the work on the files (the catalog gone, a disk gone, a sync
        failed): kept, to be explained with the counts once the run has ended."""
        if self.fault is None and not self.report.stopped:
            self.fault = fault
            if self._log_file and not isinstance(fault, (StorageError, psycopg2.Error, OSError)):
                self.log_line('unexpected error:\n' + ''.join(traceback.format_exception(fault)).replace('\n', '\n# '))

    def connection_failed(self, exc: BaseException) -> None:
        """Called on the worker's own thread: transfers that failed in a row because a server
        did not answer (after its retries) stop the run at once, before the next queued ones
        start and wait as long again."""
        with self._lock:
            self._connection_failures += 1
            failures = self._connection_failures
        if failures >= min(3, self.options.jobs):
            self.stop(f'{describe_exception(exc)} ({failures} transfers in a row); check the server and the '
                      'network, then run the same command again')

    def watch(self, in_flight: int) -> None:
        """Called every half second: say so when nothing has moved for a while (on the progress
        bar at once, in a message if it goes on)."""
        silent = time.monotonic() - self.last_activity
        if in_flight and silent >= self.stall_after:
            self._show_status(f'waiting: no data for {silent:.0f} s')
            if not self.waiting_logged:
                self.waiting_logged = True
                log.info('waiting: no data for %.0f s from %s; a server that does not answer is given up on '
                         'after MITWELTEN_READ_TIMEOUT × MITWELTEN_ATTEMPTS seconds',
                         silent, ' or '.join(b.describe() for b in self.backends) or 'the backends')
        elif self.waiting_logged and silent < self.stall_after:
            self.waiting_logged = False
            self._show_status()


def describe_exception(exc: BaseException) -> str:
    """A one-line reason for a file's failure, with no credentials and no traceback."""
    if isinstance(exc, StorageError):
        return str(exc)
    # botocore's errors before OSError: some of them derive from it (through requests' IOError).
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get('Error', {})
        return f"S3 {exc.operation_name}: {error.get('Code')} {error.get('Message', '')}".strip()
    if isinstance(exc, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        return f"the S3 server did not answer in time ({exc.kwargs.get('endpoint_url', '')})"
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"cannot reach the S3 server ({exc.kwargs.get('endpoint_url', '')})"
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return f'S3: {exc}'
    if isinstance(exc, OSError):
        where = f' ({exc.filename})' if exc.filename else ''
        return f'{exc.strerror or exc}{where}'
    if isinstance(exc, psycopg2.Error):
        return f'catalog: {pg_error_line(exc)}'
    return f'{type(exc).__name__}: {exc}'


def fatal_reason(exc: BaseException, backends: Iterable[Backend]) -> str | None:
    """Why no further file can succeed (so the run stops), or None for a failure of one file."""
    if isinstance(exc, TokenRefused):
        return str(exc)
    if not isinstance(exc, OSError) or isinstance(exc, botocore.exceptions.BotoCoreError):
        return None
    backends = list(backends)
    named = [b for b in backends if exc.filename and str(exc.filename).startswith(b.location())]
    backend = (named or backends or [None])[-1]
    what = backend.describe() if backend else (exc.filename or 'a disk')
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f'{what} is full'
    if exc.errno in (errno.EROFS, errno.EIO, errno.ENODEV, errno.ENXIO, errno.ESHUTDOWN):
        check = f' (`verify {backend.row.storage_id}`)' if backend else ''
        return f'{what}: {exc.strerror}; is the disk still attached? Check it{check}, then run the same command again'
    for candidate in backends:
        gone = candidate.gone_reason()
        if gone:
            return gone
    return None


# Set when a run left work running on its threads (a frozen server's transfers, abandoned): the
# command line then exits without waiting for them.
LEFT_RUNNING = threading.Event()


class Pipeline:
    """Work for a run on `jobs` threads. Items are fed from an iterator as slots free up (so a
    selection of millions is never held whole); each finished piece of work is handed to its
    handler on this thread, which may submit follow-up work. Stops feeding when the run stops;
    work queued but not started is cancelled, the work in flight finishes, or, when nothing of
    it moves for `Run.abandon_after` seconds after a stop, is abandoned as a second Ctrl-C
    abandons it (nothing of it recorded; the next run removes its temporary files)."""

    def __init__(self, jobs: int, run: Run):
        self.jobs = jobs
        self.run = run
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix='mitwelten')
        self.pending: dict = {}

    def _start(self, work: Callable, item):
        if self.run.stopping:
            raise Cancelled()
        try:
            return work(item)
        except (Unreachable, *S3_CONNECTION_ERRORS) as exc:
            self.run.connection_failed(exc)
            raise

    def submit(self, work: Callable, item, on_done: Callable) -> None:
        self.pending[self.pool.submit(self._start, work, item)] = (item, on_done)

    def _handle(self, done: Iterable[Future]) -> None:
        for future in done:
            item, handler = self.pending.pop(future)
            handler(item, future)

    def drive(self, items: Iterable, work: Callable, on_done: Callable,
              between: Callable[[bool], None] = lambda idle: None, held: Callable[[], int] = lambda: 0) -> None:
        """`between(idle)` runs after every round, with idle=True once nothing is in flight and
        nothing more will be fed; `held()` counts items waiting outside the pool (they hold
        memory, so they count against the number in flight). An error from the items, a handler
        or `between` stops the feeding; the work in flight is finished and handled first."""
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
                    self._handle(done)
                    self.run.watch(len(self.pending))
                    if self.pending and self.run.gives_up_waiting():
                        self.abandon()
                        return
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
        except BaseException:
            self.run.halted = True
            while self.pending:
                done, _ = wait(self.pending, timeout=0.5, return_when=FIRST_COMPLETED)
                with contextlib.suppress(Exception):
                    self._handle(done)
            self.pool.shutdown(wait=True)
            raise
        self.pool.shutdown(wait=True)

    def abandon(self) -> None:
        """Leave the work in flight running, unhandled: nothing of it is recorded."""
        in_flight = len(self.pending)
        self.pending.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
        LEFT_RUNNING.set()
        self.run.abandoned(in_flight)


# =================================================================================================
# Operations
# =================================================================================================
#
# Each operation returns what it did (a report or a small dataclass) and prints nothing.

# --- init-db -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SchemaReady:
    schema: str
    where: str
    tables: int


def init_db(settings: Settings) -> SchemaReady:
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
        raise ConfigError(f"cannot create the catalog schema '{settings.schema}': {pg_error_line(exc)}") from None
    finally:
        conn.close()
    return SchemaReady(settings.schema, describe_dsn(settings.dsn), tables)


# --- create --------------------------------------------------------------------------------------------

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
ARCHIVE_PRIORITY = 2


def check_priority(kind: str, priority: int) -> None:
    """Priorities are the tiers of SPEC.md: 0 online S3, public; 1 online S3, not public; 2
    offline archive disks. A disk is offline storage, so never 0 or 1 (the service and `--via`
    would take it for an online tier, and `export` would read from it first); an S3 bucket is
    online, so never 2 or above (the service and `--via` take priority 2 for an archive disk
    a workstation writes to). Disks may use 3 and above for tiers of their own."""
    tiers = ', '.join(f'{number} {tier}' for number, tier in PRIORITY_TIERS.items())
    if priority < 0:
        raise ConfigError(f'priority {priority} is negative: priorities are {tiers}')
    if kind == 'local' and priority < ARCHIVE_PRIORITY:
        raise ConfigError(f'priority {priority} is a tier of S3 buckets ({PRIORITY_TIERS[priority]}): a local disk is '
                          f'an offline archive, priority {ARCHIVE_PRIORITY} (or above, for a tier of your own)')
    if kind == 's3' and priority >= ARCHIVE_PRIORITY:
        raise ConfigError(f'priority {priority} is for offline archive disks: an S3 bucket is an online tier, '
                          f'priority 0 ({PRIORITY_TIERS[0]}) or 1 ({PRIORITY_TIERS[1]})')


def overlapping_backend(conn, root: Path) -> str | None:
    """Why a disk at `root` would overlap a local backend: the same folder, a folder inside
    another backend's root (its archive/ folder, say), or a folder holding one. Paths are
    compared normalised, links resolved; a disk's dot-file found above `root` counts too (a
    disk of another catalog, or one mounted elsewhere than its recorded path)."""
    resolved = normal_path(root)
    for row in fetch_backends(conn):
        if row.type != 'local':
            continue
        other = normal_path(row.url_prefix)
        if other == resolved or same_folder(other, root):
            return f'{root} is already registered as storage backend {row.storage_id}'
        if other in resolved.parents:
            return (f'{root} is inside the root of backend {row.storage_id} ({row.url_prefix}): a backend cannot be '
                    'part of another; use a folder of its own')
        if resolved in other.parents:
            return (f'{root} holds the root of backend {row.storage_id} ({row.url_prefix}): a backend cannot hold '
                    'another; use a folder of its own')
    for parent in resolved.parents:
        if (parent / DOT_FILE).is_file():
            return (f'{root} is inside the disk of a storage backend ({parent / DOT_FILE} exists): a backend cannot '
                    'be part of another; use a folder of its own')
    return None


def write_text_file(path: Path, text: str) -> None:
    """A small text file written atomically (rule 2)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding='utf-8')


def create_local_backend(settings: Settings, path: str, priority: int, label: str) -> BackendRow:
    """Register the folder at `path` (an archive disk's mount point) as a local backend: the
    catalog row, the dot-file, README.md and archive/. Refuses, leaving nothing behind, a
    missing folder, one that is already a backend, a path already registered, one inside
    another local backend's root or holding one, and a priority below the archive tier."""
    check_priority('local', priority)
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
        overlap = overlapping_backend(conn, root)
        if overlap:
            raise ConfigError(overlap)
        backend_row = _insert_backend(conn, str(root), 'local', priority, label)
        dot_lines = [f'storage_id={backend_row.storage_id}', f'created_at={backend_row.created_at}',
                     'storage_dir=archive', f'url_prefix={root}', f'device_label={label}']
        try:
            write_text_file(root / DOT_FILE, '\n'.join(dot_lines) + '\n')
            created.append(root / DOT_FILE)
            write_text_file(root / 'README.md', DISK_README.format(
                storage_id=backend_row.storage_id, created_at=backend_row.created_at.strftime('%Y-%m-%d %H:%M:%S %Z'),
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
        return backend_row
    finally:
        conn.close()


def create_s3_backend(settings: Settings, url: str, priority: int, notes: str) -> BackendRow:
    """Register a bucket (with optional prefix) as an S3 backend, after checking it exists."""
    check_priority('s3', priority)
    where = S3Location.parse(url)
    check_bucket(s3_client(where, settings), where, f'new backend {where.url}')
    conn = connect_catalog(settings)
    try:
        backend_row = _insert_backend(conn, where.url, 's3', priority, notes.strip())
        conn.commit()
        return backend_row
    finally:
        conn.close()


def _insert_backend(conn, url_prefix: str, kind: str, priority: int, notes: str) -> BackendRow:
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
        return BackendRow(*cur.fetchone())


# --- info ----------------------------------------------------------------------------------------------

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


def list_backends(settings: Settings, *, conn=None) -> list[dict]:
    """Every backend, with its files per version and, for a disk, whether it is online: its
    dot-file found and matching at the recorded path, or else under the mount roots. What
    `info --json` prints and the service's GET /backends answers."""
    own = conn is None
    conn = conn or connect_catalog(settings)
    try:
        backend_rows = fetch_backends(conn)
        counts = version_counts(conn)
    finally:
        if own:
            conn.close()
    listing = []
    for backend_row in backend_rows:
        entry = {'storage_id': backend_row.storage_id, 'type': backend_row.type, 'url_prefix': backend_row.url_prefix,
                 'priority': backend_row.priority, 'notes': backend_row.notes,
                 'created_at': backend_row.created_at.isoformat(), 'versions': counts.get(backend_row.storage_id, [])}
        if backend_row.type == 'local':
            at_recorded_path = dot_file_mismatch(Path(backend_row.url_prefix), backend_row) is None
            mounted_at = Path(backend_row.url_prefix) if at_recorded_path else find_disk(backend_row)
            entry['online'] = mounted_at is not None
            entry['mounted_at'] = str(mounted_at) if mounted_at else None
            # Elsewhere than recorded: compared normalised, so that '/media/archive07/' as stored
            # by the earlier script is where '/media/archive07' is.
            entry['moved'] = mounted_at is not None and not same_folder(mounted_at, backend_row.url_prefix)
        listing.append(entry)
    return listing


# --- one file at a time (what the storage service does per request) ------------------------------------

class BackendCache:
    """Backends opened once and kept by storage id, so that a service answering many requests
    builds each S3 client once (boto3's clients are thread-safe)."""

    def __init__(self, settings: Settings, jobs: int = DEFAULT_JOBS):
        self.settings = settings
        self.jobs = jobs
        self._opened: dict[tuple, Backend] = {}
        self._lock = threading.Lock()

    def get(self, backend_row: BackendRow) -> Backend:
        key = (backend_row.storage_id, backend_row.url_prefix, backend_row.type)
        with self._lock:
            if key not in self._opened:
                self._opened[key] = open_backend(backend_row, self.settings, jobs=self.jobs)
            return self._opened[key]


@dataclasses.dataclass(frozen=True)
class FileState:
    """A file and where the catalog records its versions, with what an operation did to it."""
    group: str
    file: CatalogFile
    held: list
    outcome: str = ''

    @property
    def active(self) -> HeldVersion | None:
        return active_version(self.held)

    def as_dict(self) -> dict:
        def held_dict(h: HeldVersion) -> dict:
            version = VERSIONS.get((self.group, h.type))
            return {'storage_id': h.backend.storage_id, 'type': h.type,
                    'version': version.label if version else 'unknown', 'backend_type': h.backend.type,
                    'priority': h.backend.priority,
                    'object_name': version.object_name(self.file.object_name) if version else None}
        return {'group': self.group, 'file_id': self.file.file_id, 'object_name': self.file.object_name,
                'file_size': self.file.file_size, 'sha256': self.file.sha256, 'outcome': self.outcome,
                'active': held_dict(self.active) if self.active else None,
                'held': [held_dict(h) for h in self.held]}


def active_version(held: list[HeldVersion]) -> HeldVersion | None:
    """The active copy: the one held by the S3 backend with the lowest priority number that
    records the file (held_versions lists them by priority)."""
    return next((h for h in held if h.backend.type == 's3'), None)


def file_state(conn, group: str, file_id: int, outcome: str = '') -> FileState:
    file = fetch_file(conn, group, file_id)
    held = held_versions(conn, group, file_id)
    conn.commit()
    return FileState(group, file, held, outcome)


def _fetch_backend_or_404(conn, storage_id: int) -> BackendRow:
    try:
        return fetch_backend(conn, storage_id)
    except ConfigError as exc:
        raise NotFound(str(exc), 'backend') from None


def _copies_elsewhere(held: list[HeldVersion], storage_id: int) -> int:
    return sum(1 for h in held if h.type == 0 and h.backend.storage_id != storage_id)


def active_original(conn, backends: BackendCache, group: str, file_id: int) -> tuple[CatalogFile, Backend]:
    """The file and the backend of its active copy (the S3 backend with the lowest priority
    number that records it: the one the writes act on too), which must be the original.
    NotFound('file') when the catalog does not know the file, NotFound('original') when the
    active tier holds a version instead, or no online tier records the file."""
    file = fetch_file(conn, group, file_id)
    held = held_versions(conn, group, file_id)
    conn.commit()
    active = active_version(held)
    if active is None or active.type != 0:
        raise NotFound(f'the original of {group} file {file_id} is no longer online (it is archived; the online '
                       'tier holds a version of it, if any)', 'original')
    return file, backends.get(active.backend)


def record_archived(conn, group: str, file_id: int, storage_id: int, sha256_hex: str) -> FileState:
    """Record that archive backend `storage_id` holds the checked original of the file (a
    workstation wrote and checked it there). Deletes nothing. Outcome 'created', or 'exists'
    when it was recorded already. Refuses an unknown file or backend (NotFound), a sha256 that
    is not the catalog's or a backend that is not an archive (InvalidArchive), and a backend
    that records another version of the file (VersionConflict)."""
    file = fetch_file(conn, group, file_id)
    backend_row = _fetch_backend_or_404(conn, storage_id)
    held = held_versions(conn, group, file_id, lock=True)
    try:
        if (sha256_hex or '').strip().lower() != file.sha256:
            raise InvalidArchive(f"sha256 {sha256_hex} is not the catalog's sha256 of {group} file {file_id}")
        if backend_row.priority != ARCHIVE_PRIORITY:
            raise InvalidArchive(f'{backend_row.describe()} is not an archive backend (priority {backend_row.priority}, '
                                 f'archives have priority {ARCHIVE_PRIORITY})')
        there = next((h for h in held if h.backend.storage_id == storage_id), None)
        if there is not None and there.type != 0:
            raise VersionConflict(f'{backend_row.describe()} records version {there.type} of {group} file {file_id}, '
                                  'not its original')
        if there is None:
            with conn.cursor() as cur:
                cur.execute(sql.SQL('INSERT INTO {} (file_id, storage_id, type, created_at, updated_at) '
                                    'VALUES (%s, %s, 0, now(), now())').format(
                    sql.Identifier(GROUPS[group].storage_table)), (file_id, storage_id))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return file_state(conn, group, file_id, 'exists' if there is not None else 'created')


def _locked_active(conn, group: str, file_id: int) -> tuple[CatalogFile, list[HeldVersion], HeldVersion]:
    file = fetch_file(conn, group, file_id)
    held = held_versions(conn, group, file_id, lock=True)
    active = active_version(held)
    if active is None:
        raise NotFound(f'no online tier records {group} file {file_id}', 'original')
    return file, held, active


def _set_type(conn, group: str, file_id: int, storage_id: int, version_type: int | None) -> None:
    table = sql.Identifier(GROUPS[group].storage_table)
    with conn.cursor() as cur:
        if version_type is None:
            cur.execute(sql.SQL('DELETE FROM {} WHERE file_id = %s AND storage_id = %s').format(table),
                        (file_id, storage_id))
        else:
            cur.execute(sql.SQL('UPDATE {} SET type = %s, updated_at = now() WHERE file_id = %s AND storage_id = %s')
                        .format(table), (version_type, file_id, storage_id))


def make_version_in_place(conn, backends: BackendCache, group: str, file_id: int, version_type: int,
                          min_copies: int = 1) -> FileState:
    """Make version N of the file from its original on the active tier, write it there, and
    replace the original with it (the row's type becomes N). Under the file's row locks, in the
    order SPEC.md gives: the version written and checked, the catalog committed, the original
    deleted. A request cut off anywhere and repeated ends with the version in place, the row
    saying so and the original gone from the active tier: repeated after the commit, it deletes
    the original left beside the version (outcome 'already replaced'; with nothing left, it
    changes nothing). Refuses with TooFewCopies (rule 3) and ConversionError (rule 7: the
    original stays), changing nothing."""
    version = find_version(group, version_type)
    if version.type == 0:
        raise ConversionError('type 0 is the original itself: name a version such as 1')
    file, held, active = _locked_active(conn, group, file_id)
    try:
        backend = backends.get(active.backend)
        version_name = version.object_name(file.object_name)
        copies = _copies_elsewhere(held, active.backend.storage_id)
        if active.type == version.type:
            # Done before. A request cut off between its commit and the delete left the
            # original beside its version: it goes now, if its copies elsewhere still stand.
            if (version_name != file.object_name and copies >= min_copies
                    and backend.size(file.object_name) is not None and sound_copy_at(backend, file, version)):
                backend.delete(file.object_name)
            conn.commit()
            return file_state(conn, group, file_id, 'already replaced')
        if active.type != 0:
            raise VersionConflict(f'{active.backend.describe()} holds version {active.type} of {group} file {file_id}, '
                                  'not its original: no other version can be made there')
        if copies < min_copies:
            raise TooFewCopies(f'{copies} checked originals of {group} file {file_id} are recorded on other backends; '
                               f'{min_copies} are needed before the original leaves {active.backend.describe()}')
        try:
            original = read_original(backend, file)
        except SourceMissing:
            # The original is gone from the active tier though the row says it is there (a
            # run of an earlier version of this tool cut off, or a hand): the replacement is
            # finished if the version is there and sound.
            if not sound_copy_at(backend, file, version):
                raise NotFound(f'the original of {group} file {file_id} is missing at {backend.describe()} and its '
                               f'{version.label} version is not there either; it is archived: copy it back, or run '
                               f'`verify {active.backend.storage_id} --fix`', 'original') from None
        else:
            data = version.make(original, file)
            backend.write(version_name, [data], len(data), content_type_of(version, version_name),
                          tags=backend.tags(file.object_name))
            crash_point('after-version-write')
        _set_type(conn, group, file_id, active.backend.storage_id, version.type)
        conn.commit()
        crash_point('after-commit')
    except BaseException:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        raise
    if version_name != file.object_name:
        backend.delete(file.object_name)
    crash_point('after-original-delete')
    return file_state(conn, group, file_id, 'replaced')


def delete_original(conn, backends: BackendCache, group: str, file_id: int, sha256_hex: str,
                    min_copies: int = 1) -> FileState:
    """Delete the original from the active tier and its row, under the file's row locks:
    the object deleted, then the row's removal committed (a request cut off in between and
    repeated finds the object gone and removes the row). `sha256_hex` must be the catalog's
    (If-Match: OriginalChanged otherwise). NotFound('original') when it is gone already;
    TooFewCopies (rule 3) when fewer than min_copies checked originals are recorded elsewhere."""
    file, held, active = _locked_active(conn, group, file_id)
    try:
        if active.type != 0:
            raise NotFound(f'the original of {group} file {file_id} is gone from the online tiers already '
                           f'({active.backend.describe()} holds version {active.type})', 'original')
        if (sha256_hex or '').strip().lower() != file.sha256:
            raise OriginalChanged(f"{sha256_hex!r} is not the sha256 of {group} file {file_id}'s original")
        copies = _copies_elsewhere(held, active.backend.storage_id)
        if copies < min_copies:
            raise TooFewCopies(f'{copies} checked originals of {group} file {file_id} are recorded on other backends; '
                               f'{min_copies} are needed before the original leaves {active.backend.describe()}')
        backends.get(active.backend).delete(file.object_name)
        crash_point('after-original-delete')
        _set_type(conn, group, file_id, active.backend.storage_id, None)
        conn.commit()
    except BaseException:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        raise
    return file_state(conn, group, file_id, 'deleted')


# --- the frame of a batch run (copy, archive) ----------------------------------------------------------

class BackgroundCounts:
    """The selection's counts, on a connection of their own, while the run already transfers:
    on a batch of a million files the count takes seconds the first file need not wait for.
    Only the progress totals and the summary's notes depend on them."""

    def __init__(self, settings: Settings, selection: Selection):
        self.result: dict = {}
        self.thread = threading.Thread(target=self._count, args=(settings, selection), name='counts', daemon=True)
        self.thread.start()

    def _count(self, settings: Settings, selection: Selection) -> None:
        try:
            conn = connect_catalog(settings)
            try:
                self.result.update(selection.counts(conn))
            finally:
                conn.close()
        except (StorageError, psycopg2.Error):
            pass

    def join(self, timeout: float = 30) -> dict:
        self.thread.join(timeout)
        return self.result


class BatchJob:
    """One kind of batch run: what to do with each file (on a worker thread) and with what that
    returns (on the run's thread). The frame, `BatchFrame.run`, does the rest."""

    command = ''

    def __init__(self, recorder, backends: tuple, locked: tuple):
        self.recorder = recorder        # CatalogWriter, or ServiceRecorder through the service
        self.backends = backends        # source and target, to name the one a fault belongs to
        self.locked = locked            # backends held (`writing`) for the run
        self.run: Run | None = None
        self.pipeline: Pipeline | None = None
        self.files_in_recording: dict[int, CatalogFile] = {}

    def start(self, run: Run, pipeline: Pipeline) -> None:
        self.run, self.pipeline = run, pipeline

    def work(self, file: CatalogFile):
        raise NotImplementedError

    def done(self, file: CatalogFile, future: Future) -> None:
        raise NotImplementedError

    def held(self) -> int:
        return 0

    def failed(self, file: CatalogFile, exc: Exception) -> None:
        if isinstance(exc, NotFound) and exc.subject == 'original':
            # Through the service: the original left ACTIVE since the selection was made.
            self.run.outcome(file, 'skipped', 0, f'{exc} (another run archived it meanwhile)')
        else:
            self.run.file_failed(file, exc)

    def between(self, idle: bool) -> None:
        if idle or self.recorder.due():
            self.flush()

    def flush(self) -> None:
        """Sync and record what is pending; name the files the recording refused (through the
        service, a race with another run)."""
        for file_id, reason in self.recorder.flush():
            self.run.report.failures.append((self.files_in_recording[file_id].object_name,
                                             f'written, but not recorded: {reason}'))
            log.warning('FAILED %s: written, but not recorded: %s', self.files_in_recording[file_id].object_name, reason)
        if not self.recorder.pending:
            self.files_in_recording.clear()

    def record(self, file: CatalogFile, storage_id: int, version_type: int) -> None:
        self.files_in_recording[file.file_id] = file
        self.recorder.add(file, storage_id, version_type)

    def finish(self) -> None:
        self.flush()

    def notes(self, counts: dict) -> list[str]:
        return []


class BatchFrame:
    """What every batch run shares (copy and archive): the options checked, the catalog
    connections (one per role: `reader` streams the selection, the recorder's writes, the
    counts' own), the backends opened and checked (or reached through the storage service),
    the disk locks, the Run, and at the end the last commit, the notes and the explanation of
    whatever stopped it: a run that has started always ends with its report (rule 6)."""

    def __init__(self, settings: Settings, command: str, options: RunOptions | None):
        self.settings = settings
        self.command = command
        self.options = options or RunOptions()
        self.options.check()
        self.service = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> 'BatchFrame':
        self.reader = connect_catalog(self.settings)
        self._stack.callback(self.reader.close)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def connection(self):
        conn = connect_catalog(self.settings)
        self._stack.callback(conn.close)
        return conn

    def open_pair(self, source_id: int, target_id: int, group: str, *,
                  source_writing: bool = False) -> tuple[Backend, Backend]:
        if source_id == target_id:
            raise ConfigError('source and target are the same backend')
        source_row, target_row = fetch_backend(self.reader, source_id), fetch_backend(self.reader, target_id)
        options = self.options
        if options.via:
            active = min((row for row in fetch_backends(self.reader) if row.type == 's3'),
                         key=lambda row: (row.priority, row.storage_id), default=None)
            if active is not None and active.storage_id != source_id:
                raise ConfigError(f'through the service (--via) the source must be the active tier, the S3 backend '
                                  f'with the lowest priority number: {active.describe()}, not {source_row.describe()}')
            self.service = ServiceClient.from_options(options, self.settings)
            source = ServiceSource(source_row, self.service, group)
            if target_row.priority != ARCHIVE_PRIORITY:
                raise ConfigError(f'{target_row.describe()} has priority {target_row.priority}: through the service '
                                  f'(--via) the target must be an archive backend (priority {ARCHIVE_PRIORITY})')
        else:
            source = open_backend(source_row, self.settings, path=options.source_path, jobs=options.jobs,
                                  path_option='--source-path')
        target = open_backend(target_row, self.settings, path=options.target_path, jobs=options.jobs,
                              path_option='--target-path')
        source.check(writing=source_writing)
        target.check(writing=True)
        return source, target

    def recorder(self, group: Group, backends: tuple, **timing):
        """Who records what the run did: the catalog (a CatalogWriter on a connection of its
        own), or, through the service, the service (the workstation may only read the catalog)."""
        if self.service:
            return ServiceRecorder(self.service, self.connection(), group, backends, jobs=self.options.jobs)
        return CatalogWriter(self.connection(), group, backends, **timing)

    def run(self, job: BatchJob, selection: Selection, title: str) -> RunReport:
        report = RunReport(self.command, title)
        counts = BackgroundCounts(self.settings, selection)
        with contextlib.ExitStack() as locks:
            for backend in job.locked:
                locks.enter_context(backend.writing())
            with Run(report, self.options, backends=job.backends,
                     stall_after=min(10.0, self.settings.read_timeout)) as run:
                pipeline = Pipeline(self.options.jobs, run)
                job.start(run, pipeline)

                def between(idle: bool) -> None:
                    run.set_totals(counts.result)
                    job.between(idle)
                try:
                    pipeline.drive(selection.files(self.reader), job.work, job.done, between=between, held=job.held)
                except KeyboardInterrupt:
                    report.stopped = ('stopped at once by a second interrupt (Ctrl-C or SIGTERM): the files in flight '
                                      'were abandoned (the next run removes their temporary files)')
                except Exception as exc:
                    run.stop_for(exc)
                finally:
                    self._end(job, run, counts)
        return report

    def _end(self, job: BatchJob, run: Run, counts: BackgroundCounts) -> None:
        try:
            job.finish()
        except Exception as exc:
            run.stop_for(exc)
        found = counts.join()
        if found:
            run.log_line(f"batch: {found['at_source']} files at the source, {found['done']} of them at the target "
                         f"already, {found['todo']} to do")
            run.report.notes.extend(job.notes(found))
        report = run.report
        report.recorded = job.recorder.recorded
        report.unrecorded = job.recorder.unrecorded + job.recorder.pending_inserts
        if run.fault is not None:
            report.stopped = explain_fault(run.fault, report, job.backends)
        elif report.stopped and report.unrecorded:
            report.stopped += f'; {unrecorded_sentence(report, job.backends)}'


def unrecorded_sentence(report: RunReport, backends: tuple) -> str:
    target = backends[-1] if backends else None
    if not report.unrecorded:
        return 'every file written was recorded'
    fate = ('the next run checks them and records them, or writes them again where the disk lost them'
            if target is not None and target.adopts_found_files else 'the next run writes them again')
    return f'{report.unrecorded} written files are not recorded: {fate}'


def explain_fault(exc: BaseException, report: RunReport, backends: tuple) -> str:
    """What stopped a run, the counts that matter, and what to do: one line for the summary."""
    written = unrecorded_sentence(report, backends)
    if catalog_outage(exc):
        return (f'the catalog went away ({pg_error_line(exc)}) after {report.recorded} files were recorded; '
                f'{written}. Run the same command again once the database is back')
    if isinstance(exc, SyncFailed):
        return (f'{exc}: nothing written to it since its last successful sync is recorded; {written}. Check the disk '
                f'(`verify {exc.backend.row.storage_id}`), then run the same command again')
    if isinstance(exc, OSError):
        reason = fatal_reason(exc, backends) or describe_exception(exc)
        return f'{reason} after {report.recorded} files were recorded; {written}'
    if isinstance(exc, psycopg2.Error):
        return f'the catalog refused a change ({pg_error_line(exc)}) after {report.recorded} files were recorded; {written}'
    if isinstance(exc, StorageError):
        return f'{exc}; {report.recorded} files were recorded; {written}'
    return (f'unexpected error: {type(exc).__name__}: {exc} (the log has the details); '
            f'{report.recorded} files were recorded; {written}')


@dataclasses.dataclass
class Plan:
    """A dry run: what a copy or archive would do, file by file, changing nothing. Iterating
    it streams (action, file) from the catalog; `notes` says what the counts tell."""
    command: str
    title: str
    notes: list
    steps: Iterator

    def __iter__(self) -> Iterator[tuple[str, CatalogFile]]:
        return iter(self.steps)


def _planned(frame: BatchFrame, selection: Selection, action: Callable[[CatalogFile], str]) -> Iterator:
    with frame:
        for file in selection.files(frame.reader):
            yield action(file), file


# --- copy ------------------------------------------------------------------------------------------------

def transfer(file: CatalogFile, source: Backend, target: Backend, version: Version,
             progress: Callable[[int], None] = lambda n: None, copy_tags: bool = False) -> tuple[str, int]:
    """Copy one file's version from source to target, checked and written atomically; record
    nothing (the caller does, once the target is synced). Returns ('copied' | 'made' | 'found',
    bytes): 'made' when the version was made from the source's original, 'found' when the
    target held a sound copy already, unrecorded (a killed run wrote it)."""
    object_name = version.object_name(file.object_name)
    target.tidy(object_name)
    content_type = content_type_of(version, object_name)
    if target.adopts_found_files and version.exact and sound_copy_at(target, file, version):
        target.will_sync(object_name)      # the killed run may not have synced its rename
        progress(file.file_size)
        return 'found', file.file_size
    if file.source_type == version.type:
        tags = source.tags(object_name) if copy_tags else None
        if version.type == 0:
            into = io_buffer() if target.writes_from_buffer else None
            chunks = CheckedStream(source.read_original(file, into=into), file, progress)
            target.write(object_name, chunks, file.file_size, content_type, file.sha256, tags)
            crash_point('after-write')
            return 'copied', file.file_size
        data = b''.join(source.read(object_name))
        progress(len(data))
        version.check(data, file)
        target.write(object_name, [data], len(data), content_type, tags=tags)
        return 'copied', len(data)
    original = read_original(source, file, progress)
    data = version.make(original, file)
    target.write(object_name, [data], len(data), content_type,
                 tags=source.tags(file.object_name) if copy_tags else None)
    crash_point('after-write')
    return 'made', len(data)


class CopyJob(BatchJob):
    command = 'copy'

    def __init__(self, source: Backend, target: Backend, version: Version, recorder):
        super().__init__(recorder, (source, target), (target,))
        self.source, self.target, self.version = source, target, version
        self.copy_tags = source.keeps_tags and target.keeps_tags
        target.group_writes = True           # nothing but the catalog waits on its files

    def work(self, file: CatalogFile) -> tuple[str, int]:
        return transfer(file, self.source, self.target, self.version, self.run.progress, self.copy_tags)

    def done(self, file: CatalogFile, future: Future) -> None:
        try:
            outcome, nbytes = future.result()
        except Cancelled:
            return
        except Exception as exc:
            self.failed(file, exc)
            return
        self.record(file, self.target.row.storage_id, self.version.type)
        self.run.outcome(file, outcome, nbytes)

    def notes(self, counts: dict) -> list[str]:
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


def _copy_title(batch, version: Version, source: Backend, target: Backend) -> str:
    what = 'originals' if version.type == 0 else f'{version.label} versions'
    return f"{what} of batch '{batch.id}' from {source.describe()} to {target.describe()}"


def copy_batch(settings: Settings, source_id: int, target_id: int, batch_id: str, *, version_type: int = 0,
               options: RunOptions | None = None) -> RunReport:
    """Copy version `version_type` of every file in the batch that SOURCE holds and TARGET does
    not: the bytes where SOURCE holds that version, made in memory from SOURCE's original
    otherwise. Each file is read, checked, written at the target atomically, then recorded."""
    with BatchFrame(settings, 'copy', options) as frame:
        batch = find_batch(batch_id)
        version = find_version(batch.group, version_type)
        source, target = frame.open_pair(source_id, target_id, batch.group)
        if frame.service and version.type != 0:
            raise ConfigError('through the service (--via) only originals are copied: leave out --type')
        selection = Selection(batch, source_id, target_id, version.type, frame.options.limit)
        selection.check(frame.reader)
        job = CopyJob(source, target, version, frame.recorder(selection.group, (target,)))
        return frame.run(job, selection, _copy_title(batch, version, source, target))


def plan_copy(settings: Settings, source_id: int, target_id: int, batch_id: str, *, version_type: int = 0,
              options: RunOptions | None = None) -> Plan:
    """What copy_batch would do (a dry run): backends checked, nothing written."""
    frame = BatchFrame(settings, 'copy', options).__enter__()
    try:
        batch = find_batch(batch_id)
        version = find_version(batch.group, version_type)
        source, target = frame.open_pair(source_id, target_id, batch.group)
        selection = Selection(batch, source_id, target_id, version.type, frame.options.limit)
        notes = CopyJob.notes(None, selection.counts(frame.reader))
    except BaseException:
        frame.__exit__(None, None, None)
        raise
    action = lambda f: 'copy' if f.source_type == version.type else f'make {version.label} of'
    return Plan('copy', _copy_title(batch, version, source, target), notes, _planned(frame, selection, action))


# --- archive -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ArchiveStep:
    """What archiving the original of one file did, for releasing it at ACTIVE."""
    file: CatalogFile
    version_bytes: bytes | None = None
    version_failed: str | None = None    # rule 7: the original is archived all the same, and kept at ACTIVE
    tags: dict | None = None
    archived_now: bool = False           # this run wrote (or found) the original at ARCHIVE: record it
    missing: bool = False                # the original is no longer at ACTIVE (an earlier run was cut off)
    version_present: bool = False        # ... and the replacement version is there, sound
    released_before: bool = False        # through the service: another run had released it already


class Archiver:
    """The model process for one file, in its two halves: archive the original (read it from
    ACTIVE once, check it, write it to ARCHIVE, make the version in memory), and, once the
    archive's row is committed and enough checked copies are recorded elsewhere, release the
    original at ACTIVE (put the version in its place, or delete it)."""

    def __init__(self, group: str, active: Backend, archive: Backend, version: Version | None,
                 progress: Callable[[int], None] = lambda n: None):
        self.active, self.archive, self.version = active, archive, version
        self.original = VERSIONS[(group, 0)]
        self.progress = progress

    def archive_original(self, file: CatalogFile) -> ArchiveStep:
        """Read the original from ACTIVE once and check it; write it to ARCHIVE (unless it is
        recorded there already, or found there sound); make the version. Nothing at ACTIVE
        changes here. A version that cannot be made fails only the release (rule 7)."""
        step = ArchiveStep(file)
        if file.target_type not in (None, 0):
            raise FileFailure(f'{self.archive.describe()} holds version {file.target_type} of this file, so its '
                              'original cannot be archived there', file.object_name)
        archived = file.target_type == 0
        if archived and self.version is None:
            self.progress(file.file_size)      # recorded at ARCHIVE already: nothing to read
            return step
        self.archive.tidy(file.object_name)
        try:
            original = read_original(self.active, file, self.progress)
        except SourceMissing as exc:
            return self.original_missing(step, exc)
        if not archived:
            if self.archive.adopts_found_files and sound_copy_at(self.archive, file, self.original):
                self.archive.will_sync(file.object_name)
            else:
                self.archive.write(file.object_name, [original], file.file_size,
                                   content_type_of(self.original, file.object_name), file.sha256)
                crash_point('after-archive-write')
            step.archived_now = True
        if self.version is not None:
            self.make_version(step, original)
        return step

    def original_missing(self, step: ArchiveStep, exc: SourceMissing) -> ArchiveStep:
        """The original is not at ACTIVE, though the catalog says it is: an earlier run was cut
        off after removing it. Its release only fixes the row, if the version is in place."""
        step.missing = True
        if self.version is not None:
            step.version_present = sound_copy_at(self.active, step.file, self.version)
        return step

    def make_version(self, step: ArchiveStep, original: bytes) -> None:
        try:
            step.version_bytes = self.version.make(original, step.file)
        except ConversionError as exc:
            step.version_failed = str(exc)
            return
        step.tags = self.active.tags(step.file.object_name)

    def release_original(self, step: ArchiveStep) -> str:
        """With the original's copies recorded elsewhere: put the version in its place at ACTIVE
        (written before the original is deleted), or delete it. Returns 'replaced' or
        'deleted'; the caller records the change."""
        file = step.file
        if step.missing:
            # An earlier run was cut off after removing the original: only the row is left to fix.
            if self.version is None or step.version_present:
                return 'deleted' if self.version is None else 'replaced'
            raise FileFailure(f'the original is missing at {self.active.describe()} and its {self.version.label} '
                              'version is not there either; its original is archived: copy it back, or run '
                              '`verify --fix`', file.object_name)
        if self.version is not None:
            version_name = self.version.object_name(file.object_name)
            self.active.write(version_name, [step.version_bytes], len(step.version_bytes),
                              content_type_of(self.version, version_name), tags=step.tags)
            crash_point('after-version-write')
            if version_name != file.object_name:
                self.active.delete(file.object_name)
            crash_point('after-original-delete')
            return 'replaced'
        self.active.delete(file.object_name)
        crash_point('after-original-delete')
        return 'deleted'


class ServiceArchiver(Archiver):
    """Archiving through the service: the original is read from it and archived here; the
    version is made by the service next to the data, which then replaces the original (or
    deletes it) and records that itself, in the same crash-safe order."""

    def __init__(self, client: ServiceClient, group: str, active: Backend, archive: Backend,
                 version: Version | None):
        super().__init__(group, active, archive, version)
        self.client = client
        self.group = group

    def archive_original(self, file: CatalogFile) -> ArchiveStep:
        if file.target_type == 0:                # archived already: the service has what it needs
            self.progress(file.file_size)
            return ArchiveStep(file)
        return super().archive_original(file)

    def original_missing(self, step: ArchiveStep, exc: SourceMissing) -> ArchiveStep:
        raise exc       # the service records what it changes as it changes it: no row to fix here

    def make_version(self, step: ArchiveStep, original: bytes) -> None:
        pass                                     # the service makes it, next to the data

    def release_original(self, step: ArchiveStep) -> str:
        if self.version is not None:
            state = self.client.make_version_in_place(self.group, step.file, self.version.type)
            step.released_before = state.get('outcome') == 'already replaced'
            return 'replaced'
        try:
            self.client.delete_original(self.group, step.file)
        except NotFound as exc:
            if exc.subject != 'original':
                raise
            step.released_before = True
        return 'deleted'


class ArchiveJob(BatchJob):
    """`archive` over a batch: each file's original archived on a worker; the rows committed in
    batches; then, for the files with enough checked copies recorded elsewhere (rule 3), the
    original released at ACTIVE, and the change recorded."""

    command = 'archive'

    def __init__(self, archiver: Archiver, recorder, min_copies: int):
        super().__init__(recorder, (archiver.active, archiver.archive), (archiver.archive, archiver.active))
        self.archiver = archiver
        self.min_copies = min_copies
        self.active_id = archiver.active.row.storage_id
        self.archive_id = archiver.archive.row.storage_id
        self.awaiting: list[ArchiveStep] = []   # archived; waiting for the archive rows' commit
        self.kept = 0

    def start(self, run: Run, pipeline: Pipeline) -> None:
        super().start(run, pipeline)
        self.archiver.progress = run.progress

    def work(self, file: CatalogFile) -> ArchiveStep:
        return self.archiver.archive_original(file)

    def held(self) -> int:
        return len(self.awaiting)

    def done(self, file: CatalogFile, future: Future) -> None:
        try:
            step = future.result()
        except Cancelled:
            return
        except Exception as exc:
            self.failed(file, exc)
            return
        if step.archived_now:
            self.record(file, self.archive_id, 0)
        self.awaiting.append(step)

    def between(self, idle: bool) -> None:
        if self.awaiting and (idle or len(self.awaiting) >= self.pipeline.jobs or self.recorder.due()):
            # Rule 3: the archive rows are committed before any original leaves ACTIVE, and only
            # originals with enough checked copies recorded elsewhere leave.
            self.flush()
            steps, self.awaiting = self.awaiting, []
            copies = self.recorder.originals_elsewhere([s.file.file_id for s in steps], self.active_id)
            for step in steps:
                self.decide(step, copies.get(step.file.file_id, 0))
        elif idle or self.recorder.due():
            self.flush()

    def decide(self, step: ArchiveStep, copies: int) -> None:
        file = step.file
        if step.version_failed:
            self.run.failure(file, f'archived, version failed: {step.version_failed}')      # rule 7
        elif copies >= self.min_copies:
            self.pipeline.submit(self.archiver.release_original, step, self.released)
        elif step.missing:
            self.run.file_failed(file, FileFailure(
                f'the original is missing at {self.archiver.active.describe()} and only {copies} checked originals '
                'are recorded elsewhere', file.object_name))
        else:
            self.keep(step, f'{copies} checked originals recorded elsewhere, --min-copies {self.min_copies}')

    def keep(self, step: ArchiveStep, why: str) -> None:
        self.kept += 1
        self.run.outcome(step.file, 'kept', step.file.file_size,
                         why + (f'; archived at {self.archive_id}' if step.archived_now else ''))

    def released(self, step: ArchiveStep, future: Future) -> None:
        file = step.file
        try:
            outcome = future.result()
        except Cancelled:
            return
        except TooFewCopies as exc:         # through the service, whose own minimum is higher
            self.keep(step, str(exc))
            return
        except ConversionError as exc:      # through the service, which made the version
            self.run.failure(file, f'archived, version failed: {exc}')
            return
        except Exception as exc:
            self.run.file_failed(file, exc)
            return
        if outcome == 'replaced':
            self.recorder.change_type(file.file_id, self.active_id, 0, self.archiver.version.type)
        elif outcome == 'deleted':
            self.recorder.remove(file.file_id, self.active_id)
        detail = (f'archived at {self.archive_id}' if step.archived_now else
                  'the original had left ACTIVE in an earlier run that was cut off; row corrected'
                  if step.missing else 'archived earlier')
        if step.released_before:
            detail += f'; {outcome} already (by another run)'
        self.run.outcome(file, outcome, file.file_size, detail)

    def finish(self) -> None:
        self.flush()
        if self.kept:
            self.run.report.notes.append(f'{self.kept} originals kept at ACTIVE: fewer than --min-copies '
                                         f'{self.min_copies} checked originals are recorded on other backends')

    def notes(self, counts: dict) -> list[str]:
        return ([f"{counts['other_version']} files fail: the archive holds another version of them"]
                if counts['other_version'] else [])


def _archive_request(batch_id: str, replace_with: int | None, delete_originals: bool, min_copies: int):
    if (replace_with is None) == (not delete_originals):
        raise ConfigError('say what happens at ACTIVE: --replace-with N or --delete-original')
    if min_copies < 1:
        raise ConfigError('--min-copies must be at least 1: an original never leaves ACTIVE without a copy')
    batch = find_batch(batch_id)
    version = find_version(batch.group, replace_with) if replace_with is not None else None
    if version is not None and version.type == 0:
        raise ConfigError('--replace-with 0 would replace the original with itself; name a version such as 1')
    return batch, version


def _archive_title(batch, version: Version | None, active: Backend, archive: Backend) -> str:
    then = f'replacing them with {version.label} versions' if version else 'deleting them there'
    return f"originals of batch '{batch.id}' from {active.describe()} to {archive.describe()}, {then}"


def archive_batch(settings: Settings, active_id: int, archive_id: int, batch_id: str, *,
                  replace_with: int | None = None, delete_originals: bool = False, min_copies: int = 1,
                  options: RunOptions | None = None) -> RunReport:
    """The model process, one pass and one download per file: read the original from ACTIVE and
    check it; write it to ARCHIVE and record it; make version N in memory (--replace-with N);
    then, while at least `min_copies` checked originals are recorded on other backends, put
    version N in the original's place at ACTIVE, or delete the original there.

    Order per file, chosen so that a kill at any moment followed by the same command ends well:
    the archive row is committed before anything at ACTIVE changes; the version is written
    before the original is deleted; the ACTIVE row changes only after both. A run cut off after
    the delete finds the original gone, the version there and the copies recorded, and only
    fixes the row. Through the service (options.via), the service makes the version and
    changes ACTIVE and its rows, in the same order."""
    with BatchFrame(settings, 'archive', options) as frame:
        batch, version = _archive_request(batch_id, replace_with, delete_originals, min_copies)
        active, archive = frame.open_pair(active_id, archive_id, batch.group, source_writing=True)
        selection = Selection(batch, active_id, archive_id, 0, frame.options.limit, archive=True)
        selection.check(frame.reader)
        archiver = (ServiceArchiver(frame.service, batch.group, active, archive, version) if frame.service
                    else Archiver(batch.group, active, archive, version))
        recorder = frame.recorder(selection.group, (archive, active), every_rows=200, every_seconds=2.0)
        return frame.run(ArchiveJob(archiver, recorder, min_copies), selection,
                         _archive_title(batch, version, active, archive))


def plan_archive(settings: Settings, active_id: int, archive_id: int, batch_id: str, *,
                 replace_with: int | None = None, delete_originals: bool = False, min_copies: int = 1,
                 options: RunOptions | None = None) -> Plan:
    """What archive_batch would do (a dry run): backends checked, nothing changed."""
    frame = BatchFrame(settings, 'archive', options).__enter__()
    try:
        batch, version = _archive_request(batch_id, replace_with, delete_originals, min_copies)
        active, archive = frame.open_pair(active_id, archive_id, batch.group, source_writing=True)
        selection = Selection(batch, active_id, archive_id, 0, frame.options.limit, archive=True)
        notes = ArchiveJob.notes(None, selection.counts(frame.reader))
    except BaseException:
        frame.__exit__(None, None, None)
        raise
    at_active = 'replace' if version else 'delete'
    action = lambda f: at_active if f.target_type == 0 else f'archive and {at_active}'
    return Plan('archive', _archive_title(batch, version, active, archive), notes, _planned(frame, selection, action))


# --- one file, directly (the one-file forms of copy and archive) --------------------------------------

def _one_file(conn, settings: Settings, group: str, file_id: int, source_id: int, target_id: int,
              source_path: str | None, target_path: str | None, source_writing: bool = False):
    file = fetch_file(conn, group, file_id)
    held = {h.backend.storage_id: h.type for h in held_versions(conn, group, file_id)}
    conn.commit()
    if source_id == target_id:
        raise ConfigError('source and target are the same backend')
    source = open_backend(fetch_backend(conn, source_id), settings, path=source_path)
    target = open_backend(fetch_backend(conn, target_id), settings, path=target_path)
    source.check(writing=source_writing)
    target.check(writing=True)
    if source_id not in held:
        raise NotFound(f'{source.describe()} does not record {group} file {file_id}', 'file')
    return dataclasses.replace(file, source_type=held[source_id], target_type=held.get(target_id)), source, target


def copy_file(settings: Settings, group: str, file_id: int, source_id: int, target_id: int, *,
              version_type: int = 0, source_path: str | None = None, target_path: str | None = None) -> FileState:
    """copy_batch for one file: its version copied (or made) at TARGET, checked, synced and
    recorded. Outcome 'copied', 'made', 'found', or 'exists' when TARGET records it already."""
    conn = connect_catalog(settings)
    try:
        file, source, target = _one_file(conn, settings, group, file_id, source_id, target_id, source_path, target_path)
        version = find_version(group, version_type)
        if file.source_type not in (0, version.type):
            raise VersionConflict(f'{source.describe()} holds version {file.source_type} of {group} file {file_id}: '
                                  f'neither its original nor its {version.label}')
        if file.target_type is not None:
            if file.target_type != version.type:
                raise VersionConflict(f'{target.describe()} holds version {file.target_type} of {group} file '
                                      f'{file_id} (one version per backend)')
            return file_state(conn, group, file_id, 'exists')
        with target.writing():
            outcome, _ = transfer(file, source, target, version, copy_tags=source.keeps_tags and target.keeps_tags)
            writer = CatalogWriter(conn, GROUPS[group], (target,))
            writer.add(file, target_id, version.type)
            writer.flush()
        return file_state(conn, group, file_id, outcome)
    finally:
        conn.close()


def archive_file(settings: Settings, group: str, file_id: int, active_id: int, archive_id: int, *,
                 replace_with: int | None = None, min_copies: int = 1, active_path: str | None = None,
                 archive_path: str | None = None) -> FileState:
    """archive_batch for one file (with `replace_with` None: --delete-original). Outcome
    'replaced', 'deleted', 'kept' (too few copies elsewhere), or 'archived, version failed:
    <reason>' (rule 7: the original archived and recorded, kept at ACTIVE)."""
    if min_copies < 1:
        raise ConfigError('min_copies must be at least 1: an original never leaves ACTIVE without a copy')
    conn = connect_catalog(settings)
    try:
        file, active, archive = _one_file(conn, settings, group, file_id, active_id, archive_id, active_path,
                                          archive_path, source_writing=True)
        version = find_version(group, replace_with) if replace_with is not None else None
        if file.source_type != 0:
            raise NotFound(f'{active.describe()} holds version {file.source_type} of {group} file {file_id}, not '
                           'its original', 'original')
        archiver = Archiver(group, active, archive, version)
        with archive.writing(), active.writing():
            step = archiver.archive_original(file)
            writer = CatalogWriter(conn, GROUPS[group], (archive, active))
            if step.archived_now:
                writer.add(file, archive_id, 0)
            writer.flush()
            if step.version_failed:
                return file_state(conn, group, file_id, f'archived, version failed: {step.version_failed}')
            copies = writer.originals_elsewhere([file_id], active_id).get(file_id, 0)
            if copies < min_copies:
                return file_state(conn, group, file_id, 'kept')
            outcome = archiver.release_original(step)
            if outcome == 'replaced':
                writer.change_type(file_id, active_id, 0, version.type)
            else:
                writer.remove(file_id, active_id)
            writer.flush()
        return file_state(conn, group, file_id, outcome)
    finally:
        conn.close()


# --- verify ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HeldFile:
    """A file the catalog records on a backend: which group, which version, under which name."""
    group: str
    file: CatalogFile
    version_type: int

    @property
    def version(self) -> Version | None:
        return VERSIONS.get((self.group, self.version_type))

    @property
    def stored_name(self) -> str:
        return self.version.object_name(self.file.object_name) if self.version else self.file.object_name


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
    try:
        with conn.cursor() as cur:
            cur.execute(f'SELECT count(*), coalesce(sum(file_size) FILTER (WHERE type = 0), 0), '
                        f'count(*) FILTER (WHERE type <> 0) FROM ({union}) AS held')
            files, original_bytes, versions = cur.fetchone()
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise selection_error(batch, exc) if batch else exc

    def stream() -> Iterator[HeldFile]:
        query = f'SELECT * FROM ({union}) AS held ORDER BY {folders} COLLATE "C", object_name COLLATE "C"'
        for group, file_id, object_name, file_size, sha256, version_type in streamed_rows(conn, query):
            yield HeldFile(group, CatalogFile(file_id, object_name, int(file_size), (sha256 or '').strip().lower()),
                           version_type)
    return stream(), {'files': files, 'original_bytes': original_bytes, 'versions': versions}


@dataclasses.dataclass
class VerifyReport(RunReport):
    """A verify run's report, with what it found: for each kind ('missing', 'corrupt',
    'unknown', 'unchecked') the (name, reason) of every file, and the names whose rows --fix
    removed (None without --fix)."""
    found: dict = dataclasses.field(default_factory=lambda: {'missing': [], 'corrupt': [], 'unknown': [],
                                                             'unchecked': []})
    removed: list | None = None
    # After --fix: where to copy the removed files back from, per group: [(backend, files)], the
    # other backends recording an original of them, the online tiers first (None: not known).
    copy_back: dict | None = dataclasses.field(default_factory=dict)
    batch_id: str | None = None
    storage_id: int | None = None
    with_batch: bool = False
    lists_files: bool = False
    files_root: str = ''


def verify_file(backend: Backend, held: HeldFile, progress: Callable[[int], None]) -> int:
    """Read the stored file once and check it; returns the bytes read."""
    file, version = held.file, held.version
    if version.type == 0:
        for _ in CheckedStream(backend.read(file.object_name), file, progress):
            pass
        return file.file_size
    data = b''.join(backend.read(held.stored_name))
    progress(len(data))
    version.check(data, file)
    return len(data)


class Verifier:
    """What `verify` finds, as it finds it: each missing, corrupt, unknown or unchecked file
    counted, logged and named."""

    def __init__(self, run: Run, report: VerifyReport):
        self.run, self.report = run, report
        self.rows_to_remove: list[HeldFile] = []

    def finding(self, kind: str, held: HeldFile | None, name: str, reason: str = '') -> None:
        self.report.found[kind].append((name, reason))
        self.report.failures.append((name, reason or kind))
        if held:
            self.run.outcome(held.file, kind, 0, reason)
            if kind in ('missing', 'corrupt'):
                self.rows_to_remove.append(held)
        else:
            self.run.log_entry(kind, '', 0, name, reason)
        log.warning('%s %s%s', kind.upper(), name, f': {reason}' if reason else '')

    def checked(self, held: HeldFile, future: Future) -> None:
        try:
            nbytes = future.result()
        except Cancelled:
            return
        except SourceMissing:
            self.finding('missing', held, held.stored_name)
        except FileFailure as exc:
            self.finding('corrupt', held, held.stored_name, str(exc))
        except Exception as exc:
            self.finding('unchecked', held, held.stored_name, describe_exception(exc))
            reason = fatal_reason(exc, self.run.backends)
            if reason:
                self.run.stop(reason)
        else:
            self.run.outcome(held.file, 'sound', nbytes)

    def checkable(self, held: HeldFile) -> bool:
        if held.version is None:
            self.finding('unchecked', held, held.file.object_name, f'version type {held.version_type} is unknown to '
                                                                    'this tool')
            return False
        try:
            safe_object_parts(held.stored_name)
        except UnsafeObjectName as exc:
            self.finding('corrupt', held, held.stored_name, str(exc))
            return False
        return True

    def walk_alongside(self, items: Iterator[HeldFile], backend: Backend) -> Iterator[HeldFile]:
        """Merge the catalog's files (in folder order) with a walk of the backend's folders, one
        folder at a time: what only the catalog has is missing, what only the disk has is
        unknown, what both have is checked. Memory holds one folder, whatever the disk's size."""
        def by_folder(held_items):
            for folder, group in itertools.groupby(held_items, key=lambda h: tuple(h.stored_name.split('/')[:-1])):
                yield folder, list(group)

        catalog, disk = by_folder(items), backend.folders()
        cat, here = next(catalog, None), next(disk, None)
        while cat is not None or here is not None:
            if here is None or (cat is not None and cat[0] < here[0]):
                for held in cat[1]:
                    self.finding('missing', held, held.stored_name)
                cat = next(catalog, None)
            elif cat is None or here[0] < cat[0]:
                for entry in here[1]:
                    self.unknown(here[0], entry)
                here = next(disk, None)
            else:
                entries = {entry.name: entry for entry in here[1]}
                for held in cat[1]:
                    entry = entries.pop(held.stored_name.rsplit('/', 1)[-1], None)
                    if entry is None:
                        self.finding('missing', held, held.stored_name)
                    else:
                        yield held
                for entry in entries.values():
                    self.unknown(here[0], entry)
                cat, here = next(catalog, None), next(disk, None)

    def unknown(self, folder: tuple[str, ...], entry: os.DirEntry) -> None:
        name = '/'.join(folder + (entry.name,))
        if entry.name.endswith(TMP_SUFFIX):
            self.finding('unknown', None, name, 'a temporary file left by an interrupted run: safe to delete')
        elif entry.is_symlink():
            self.finding('unknown', None, name, 'a symbolic link')
        else:
            self.finding('unknown', None, name)

    def remove_rows(self, conn, storage_id: int) -> list[str]:
        """--fix: the catalog rows of the missing and corrupt files go (never a file)."""
        for group in GROUPS.values():
            writer = CatalogWriter(conn, group)
            for held in self.rows_to_remove:
                if held.group == group.name:
                    writer.remove(held.file.file_id, storage_id)
            writer.flush()
        for held in self.rows_to_remove:
            self.run.log_line(f'--fix removed the row of file {held.file.file_id} ({held.stored_name})')
        return [held.stored_name for held in self.rows_to_remove]

    def copy_back_sources(self, conn, storage_id: int) -> dict[str, list[tuple[BackendRow, int]]]:
        """Per group, the other backends that record an original of the files whose rows --fix
        removed, with how many of them each holds, the online tiers first: one grouped query
        per group."""
        sources = {}
        for group in GROUPS.values():
            file_ids = [held.file.file_id for held in self.rows_to_remove if held.group == group.name]
            if not file_ids:
                continue
            with conn.cursor() as cur:
                cur.execute(sql.SQL(f'SELECT s.file_count, {", ".join("b." + c for c in BACKEND_COLUMNS.split(", "))} '
                                    'FROM (SELECT storage_id, count(*) AS file_count FROM {} WHERE file_id = ANY(%s) '
                                    'AND storage_id <> %s AND type = 0 GROUP BY storage_id) s '
                                    'JOIN storage_backend b ON b.storage_id = s.storage_id '
                                    'ORDER BY b.priority, b.storage_id').format(sql.Identifier(group.storage_table)),
                            (file_ids, storage_id))
                sources[group.name] = [(BackendRow(*row[1:]), row[0]) for row in cur.fetchall()]
            conn.commit()
        return sources


def verify_backend(settings: Settings, storage_id: int, batch_id: str | None = None, *, fix: bool = False,
                   path: str | None = None, options: RunOptions | None = None) -> VerifyReport:
    """Check every file the catalog records on the backend (in the batch, if given): there, and
    sound (originals hash to the catalog's sha256, gzip versions decompress to it, WebP and FLAC
    versions decode). On a disk, without a batch, also list the files the catalog does not know.
    With `fix`, remove the catalog rows of missing and corrupt files (never a file)."""
    options = options or RunOptions()
    options.check()
    batch = find_batch(batch_id) if batch_id else None
    reader = connect_catalog(settings)
    try:
        backend = open_backend(fetch_backend(reader, storage_id), settings, path=path, jobs=options.jobs,
                               path_option='--path')
        backend.check(writing=False)
        files, totals = held_files(reader, storage_id, batch)
        report = VerifyReport('verify', backend.describe() + (f", batch '{batch.id}'" if batch else ''),
                              batch_id=batch.id if batch else None, storage_id=storage_id,
                              with_batch=batch is not None, lists_files=backend.lists_files,
                              files_root=backend.files_location())
        # Versions' sizes are not in the catalog: with versions on the backend, count files only.
        total_bytes = totals['original_bytes'] if not totals['versions'] else None
        with Run(report, options, totals['files'], total_bytes, backends=(backend,)) as run:
            verifier = Verifier(run, report)
            items = (held for held in files if verifier.checkable(held))
            if backend.lists_files and batch is None:
                items = verifier.walk_alongside(items, backend)
            try:
                Pipeline(options.jobs, run).drive(items, lambda held: verify_file(backend, held, run.progress),
                                                  verifier.checked)
            except Exception as exc:
                run.stop_for(exc)
                reason = (f'the catalog went away ({pg_error_line(exc)})' if catalog_outage(exc) else
                          fatal_reason(exc, (backend,)) or describe_exception(exc))
                report.stopped = f'{reason}: not every file was checked; run verify again'
            if fix and not run.stopping:
                try:
                    writer_conn = connect_catalog(settings)
                    try:
                        report.removed = verifier.remove_rows(writer_conn, storage_id)
                        try:            # only the hint: the rows are gone either way
                            report.copy_back = verifier.copy_back_sources(writer_conn, storage_id)
                        except psycopg2.Error:
                            report.copy_back = None
                    finally:
                        writer_conn.close()
                except (StorageError, psycopg2.Error) as exc:
                    report.stopped = (f'--fix could not remove the rows: {describe_exception(exc)}; nothing was '
                                      'removed')
        return report
    finally:
        reader.close()


# --- report ------------------------------------------------------------------------------------------------

REPORT_FILES = ('manifest-sha256.txt', 'REPORT.md', 'archive_index.db')


@dataclasses.dataclass(frozen=True)
class DiskReport:
    """What `report` wrote onto a disk."""
    root: Path
    written: list
    originals: int
    original_bytes: int
    index_rows: dict


def manifest_line(sha256_hex: str, relative_path: str) -> str:
    """A line `sha256sum -c` accepts: names with a backslash or newline are escaped, and the
    line then starts with a backslash (GNU coreutils' convention)."""
    if '\\' in relative_path or '\n' in relative_path:
        escaped = relative_path.replace('\\', '\\\\').replace('\n', '\\n')
        return f'\\{sha256_hex}  {escaped}\n'
    return f'{sha256_hex}  {relative_path}\n'


def write_report(settings: Settings, storage_id: int, *, path: str | None = None) -> DiskReport:
    """Write onto a local disk what makes it readable without the database: a sha256 manifest
    of its originals, REPORT.md, and archive_index.db (SQLite) with the catalog rows of
    everything on it. Each file is written atomically."""
    conn = connect_catalog(settings)
    try:
        backend_row = fetch_backend(conn, storage_id)
        backend = open_backend(backend_row, settings, path=path, path_option='--path')
        if backend.root is None:
            raise ConfigError(f'{backend_row.describe()} is an S3 backend: `report` writes onto a local disk')
        backend.check(writing=True)
        with backend.writing():
            made = dt.datetime.now(dt.timezone.utc)
            manifest = _write_manifest(conn, backend)
            index_rows = _write_index(conn, backend, made)
            _write_report_md(conn, backend, settings, made, manifest, index_rows)
    finally:
        conn.close()
    return DiskReport(backend.root, [backend.root / name for name in REPORT_FILES], manifest['originals'],
                      manifest['bytes'], index_rows)


def _write_manifest(conn, backend: LocalBackend) -> dict:
    """manifest-sha256.txt: `<sha256>  archive/<object name>` for every original recorded on the
    disk (the BagIt manifest convention), which `sha256sum -c` accepts from the disk's root."""
    originals = size = 0
    prefix = backend.archive.name
    with atomic_file(backend.root / 'manifest-sha256.txt') as tmp, open(tmp, 'x', encoding='utf-8') as manifest:
        for group in GROUPS.values():
            query = sql.SQL('SELECT f.object_name, f.sha256, f.file_size FROM {} s JOIN {} f ON f.file_id = s.file_id '
                            'WHERE s.storage_id = %s AND s.type = 0 ORDER BY f.object_name COLLATE "C"').format(
                sql.Identifier(group.storage_table), sql.Identifier(group.files_table))
            for object_name, sha256_hex, file_size in streamed_rows(conn, query, (backend.row.storage_id,), 5000):
                manifest.write(manifest_line(sha256_hex.strip().lower(), f'{prefix}/{object_name}'))
                originals += 1
                size += file_size
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
    columns: list[str] = []
    rows = streamed_rows(conn, query, params, 5000, columns)
    first = next(rows, None)
    index.execute(f'CREATE TABLE {table} ({", ".join(columns)})')
    insert = f'INSERT INTO {table} VALUES ({", ".join("?" for _ in columns)})'
    count = 0
    for row in itertools.chain([first] if first is not None else [], rows):
        index.execute(insert, [_sqlite_value(v) for v in row])
        count += 1
    return count


def _write_index(conn, backend: LocalBackend, made: dt.datetime) -> dict:
    import sqlite3
    storage_id = backend.row.storage_id
    counts = {}
    final = backend.root / 'archive_index.db'
    with atomic_file(final) as tmp:
        index = sqlite3.connect(tmp)
        try:
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
                    ('storage_id', storage_id), ('url_prefix', backend.row.url_prefix),
                    ('device_label', backend.row.notes), ('made_at', made.isoformat()),
                    ('versions', json.dumps({f'{g}:{t}': v.label for (g, t), v in VERSIONS.items()}))])
                for group in GROUPS.values():
                    index.execute(f'CREATE INDEX {group.files_table}_object_name ON {group.files_table} (object_name)')
                    index.execute(f'CREATE INDEX {group.files_table}_time ON {group.files_table} (time)')
        except sqlite3.Error as exc:
            raise StorageError(f'cannot write {final}: {exc}') from None
        finally:
            index.close()
    return counts


def _write_report_md(conn, backend: LocalBackend, settings: Settings, made: dt.datetime, manifest: dict,
                     summary: dict) -> None:
    storage_id = backend.row.storage_id
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
        f'# Mitwelten archive disk {storage_id}: {backend.row.notes or ""}'.rstrip(),
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
    write_text_file(backend.root / 'REPORT.md', '\n'.join(lines))


# =================================================================================================
# Command line
# =================================================================================================
#
# Everything the tool prints is printed here: results on stdout, messages on stderr (through
# the logger's handler, which keeps the progress bar intact).

def format_summary(report: RunReport) -> str:
    seconds = max(report.seconds, 1e-9)
    lines = [f'{report.command} {report.title}']
    parts = [f'{n} {outcome}' for outcome, n in sorted(report.counts.items()) if n]
    if parts:
        rate = f' ({human_bytes(report.bytes_done / seconds)}/s)' if report.bytes_done else ''
        lines.append(f"  {', '.join(parts)}; {human_bytes(report.bytes_done)} in {report.seconds:.1f} s{rate}")
    else:
        lines.append('  nothing to do')
    for note in report.notes:
        lines.append(f'  note: {note}')
    if report.failures:
        lines.append(f'  {len(report.failures)} failed:')
        by_reason: dict[str, list[str]] = {}       # files failing for the same reason: one line
        for object_name, reason in report.failures:
            by_reason.setdefault(reason, []).append(object_name)
        shown = list(by_reason.items())[:20]
        for reason, names in shown:
            lines.append(f'    {names[0]}: {reason}' if len(names) == 1 else
                         f'    {len(names)} files ({names[0]} and {len(names) - 1} more, named in the log): {reason}')
        if len(by_reason) > len(shown):
            lines.append(f'    … and {sum(len(n) for _, n in list(by_reason.items())[20:])} more (see the log)')
    if report.stopped:
        lines.append(f'  stopped early: {report.stopped}')
    if report.interrupted:
        lines.append('  interrupted: ' + ('' if report.stopped else 'the files in flight were finished and recorded; ')
                     + 'run the same command again to do the rest')
    if report.log_path:
        lines.append(f'  log: {report.log_path}')
    return '\n'.join(lines)


def format_verify_report(report: VerifyReport) -> str:
    lines = [f'verify {report.title}']
    found = report.found
    sound = report.count('sound')
    problems = sum(len(entries) for entries in found.values())
    lines.append(f'  {sound:,} files sound; {human_bytes(report.bytes_done)} read in {report.seconds:.1f} s'
                 + ('' if problems else '; all is well'))
    headings = {'missing': 'missing (recorded, not there)', 'corrupt': 'corrupt (there, but not sound)',
                'unknown': f'unknown (under {report.files_root}, not in the catalog)',
                'unchecked': 'could not be checked'}
    for kind, heading in headings.items():
        if found[kind]:
            lines.append(f'  {len(found[kind])} {heading}:')
            for name, reason in found[kind][:50]:
                lines.append(f'    {name}' + (f': {reason}' if reason else ''))
            if len(found[kind]) > 50:
                lines.append(f'    … and {len(found[kind]) - 50} more (see the log)')
    if report.lists_files and report.with_batch:
        lines.append('  (unknown files are looked for when the whole backend is verified, without a batch)')
    if report.removed is not None:
        lines.append(f'  --fix: removed the catalog rows of {len(report.removed)} missing or corrupt files (no file '
                     'was touched)' if report.removed else '  --fix: no rows to remove')
        for group, sources in (report.copy_back or {}).items():
            batch = report.batch_id or ('all_images' if group == 'image' else 'all_audio')
            for backend_row, files in sources:
                lines.append(f'    {files} of them ({group}) recorded as originals on {backend_row.describe()}: '
                             f'`copy -s {backend_row.storage_id} -t {report.storage_id} {batch}` puts them back')
        if report.removed and report.copy_back is not None and not any(report.copy_back.values()):
            lines.append('    no other backend records an original of them: the catalog knows of no copy to put '
                         'them back from')
    elif found['missing'] or found['corrupt']:
        lines.append('  run again with --fix to remove the rows of the missing and corrupt files, then `copy` '
                     'to put them back')
    if report.stopped:
        lines.append(f'  stopped early: {report.stopped}')
    if report.interrupted:
        lines.append('  interrupted: not every file was checked')
    if report.log_path:
        lines.append(f'  log: {report.log_path}')
    return '\n'.join(lines)


def print_plan(plan: Plan) -> RunReport:
    report = RunReport(plan.command, plan.title)
    print(f'dry run: would {plan.command} {plan.title}')
    for action, file in plan:
        print(f'  {action}: {file.object_name} ({human_bytes(file.file_size)})')
        report.counts['would do'] = report.count('would do') + 1
        report.bytes_done += file.file_size
    print(f"dry run: would {plan.command} {report.count('would do')} files, {human_bytes(report.bytes_done)}; "
          'nothing was written')
    for note in plan.notes:
        print(f'  note: {note}')
    return report


def print_backends(listing: list[dict]) -> None:
    if not listing:
        print('no storage backends yet: add one with `create`')
        return
    rows = [('ID', 'TYPE', 'PRIO', 'PATH OR URL', 'CREATED', 'STATUS', 'NOTES')]
    for entry in listing:
        status = ''
        if entry['type'] == 'local':
            status = 'offline' if not entry['online'] else 'moved' if entry['moved'] else 'online'
        created = dt.datetime.fromisoformat(entry['created_at']).astimezone(dt.timezone.utc)   # one zone for all
        rows.append((str(entry['storage_id']), entry['type'], str(entry['priority']), entry['url_prefix'],
                     created.strftime('%Y-%m-%d %H:%M:%S UTC'), status, (entry['notes'] or '').replace('\n', ' ')))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print('  '.join(cell.ljust(width) for cell, width in zip(rows[0], widths)) + '  ' + rows[0][-1])
    for row, entry in zip(rows[1:], listing):
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)) + '  ' + row[-1])
        held = [f"{c['group']} {c['version']}: {c['files']:,} files"
                + (f", {human_bytes(c['bytes'])}" if c['bytes'] is not None else '') for c in entry['versions']]
        print('      ' + ('; '.join(held) if held else 'no files recorded'))
        if entry.get('moved'):
            print(f"      mounted at {entry['mounted_at']}, not at its recorded path")


def print_batches(batches: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{'id': b.id, 'group': b.group, 'description': b.description} for b in batches.values()],
                         indent=2))
        return
    width = max((len(b) for b in batches), default=2)
    print(f"{'ID'.ljust(width)}  GROUP  DESCRIPTION")
    for batch in batches.values():
        print(f'{batch.id.ljust(width)}  {batch.group.ljust(5)}  {batch.description}')


def print_disk_report(result: DiskReport) -> None:
    for path in result.written:
        print(f'wrote {path}')
    print(f'  {result.originals:,} originals in the manifest ({human_bytes(result.original_bytes)}); check them '
          f'without the database: cd {result.root} && sha256sum -c manifest-sha256.txt')


class TqdmProgress(Progress):
    """The progress bar (bytes, files, rate, time left) on stderr, on a terminal only."""

    def __init__(self):
        self.bar = None

    def start(self, command: str, total_bytes: int | None) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total_bytes, unit='B', unit_scale=True, unit_divisor=1000, desc=command,
                        disable=None, dynamic_ncols=True, smoothing=0.05, file=sys.stderr)

    def set_total(self, total_bytes: int | None) -> None:
        if total_bytes is not None:
            self.bar.total = total_bytes
            self.bar.refresh()

    def advance(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def status(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self.bar.close()


class MessageHandler(logging.Handler):
    """The logger's messages on stderr, above the progress bar: notices as 'note: …', warnings
    and errors as they are ('FAILED name: reason', 'stopping: …')."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        text = record.getMessage()
        tqdm.write(f'note: {text}' if record.levelno < logging.WARNING else text, file=sys.stderr)


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
  mitwelten_storage.py archive -s 1 -t 3 fs1_images --replace-with 1 --via https://storage.mitwelten.org
  mitwelten_storage.py verify 3 --fix
  mitwelten_storage.py report 3

database: --db DSN, else $MITWELTEN_DB, else libpq's defaults (PGHOST, PGUSER, ~/.pgpass, …);
schema: --schema, else $MITWELTEN_DB_SCHEMA, else 'prod'. S3 credentials come from boto3's
chain; an AWS profile named like the server's HOST:PORT (or HOST) is used for that server.
network: MITWELTEN_CONNECT_TIMEOUT (5 s), MITWELTEN_READ_TIMEOUT (20 s), MITWELTEN_ATTEMPTS (3)
apply to S3 and the storage service. Messages go to stderr, results and summaries to stdout.
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
    create.add_argument('-p', '--priority', type=int, required=True,
                        help='0 online S3 public, 1 online S3 not public (S3: 0 or 1); 2 offline archive disk '
                             '(local: 2, or above for a tier of your own)')
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
    copy.add_argument('--via', metavar='URL', help='read originals and record them through the storage service at '
                                                   'URL: no S3 keys needed (token: $MITWELTEN_TOKEN or '
                                                   '$MITWELTEN_TOKEN_FILE)')

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
    archive.add_argument('--via', metavar='URL', help='through the storage service at URL: it reads the originals, '
                                                      'makes the versions and changes ACTIVE; no S3 keys needed '
                                                      '(token: $MITWELTEN_TOKEN or $MITWELTEN_TOKEN_FILE)')

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




def run_options(args, **extra) -> RunOptions:
    return RunOptions(jobs=args.jobs, progress=TqdmProgress(), handle_signals=True, **extra)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = MessageHandler()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        if TEST_FAULTS.problem:
            raise ConfigError(TEST_FAULTS.problem)
        settings = Settings.from_env(args.db, args.schema)
        return run_command(args, settings)
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
    finally:
        log.removeHandler(handler)


def run_command(args, settings: Settings) -> int:
    if args.command == 'init-db':
        ready = init_db(settings)
        print(f"catalog schema '{ready.schema}' is ready in {ready.where} ({ready.tables} tables)")
    elif args.command == 'create':
        if args.type == 'local':
            backend_row = create_local_backend(settings, args.location, args.priority, args.notes)
        else:
            backend_row = create_s3_backend(settings, args.location, args.priority, args.notes)
        print(f'created storage backend {backend_row.storage_id}: {backend_row.type} {backend_row.url_prefix} '
              f'(priority {backend_row.priority})')
    elif args.command == 'info':
        if args.batches:
            print_batches(load_batches(), args.json)
        else:
            listing = list_backends(settings)
            print(json.dumps(listing, indent=2)) if args.json else print_backends(listing)
    elif args.command in ('copy', 'archive'):
        options = run_options(args, limit=args.limit, source_path=args.source_path, target_path=args.target_path,
                              via=args.via)
        if args.command == 'copy':
            request = dict(version_type=args.version_type, options=options)
            if args.dry_run:
                return print_plan(plan_copy(settings, args.source, args.target, args.batch, **request)).exit_status
            report = copy_batch(settings, args.source, args.target, args.batch, **request)
        else:
            request = dict(replace_with=args.replace_with, delete_originals=args.delete_original,
                           min_copies=args.min_copies, options=options)
            if args.dry_run:
                return print_plan(plan_archive(settings, args.source, args.target, args.batch, **request)).exit_status
            report = archive_batch(settings, args.source, args.target, args.batch, **request)
        print(format_summary(report))
        return report.exit_status
    elif args.command == 'verify':
        report = verify_backend(settings, args.storage, args.batch, fix=args.fix, path=args.path,
                                options=run_options(args))
        print(format_verify_report(report))
        return report.exit_status
    elif args.command == 'report':
        print_disk_report(write_report(settings, args.storage, path=args.path))
    return EXIT_OK


if __name__ == '__main__':
    status = main()
    if status == EXIT_INTERRUPTED or LEFT_RUNNING.is_set():
        # A second Ctrl-C, or a stop on a frozen server, leaves transfer threads running; do not
        # wait for them at exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
