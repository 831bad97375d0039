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
    3. No original is removed or overwritten unless --min-copies other sound originals are
       recorded, and the copy the release relies on is proven at the moment of the release:
       written in this run from the checked original, or read back and hashed right before it.
       A recorded archive copy that is missing or damaged is written again first ('repaired'),
       or the original stays. The same holds through the storage service (--via).
    4. Nothing is written outside a backend's root, whatever an object name holds (`..`,
       absolute paths).
    5. A crash or kill at any moment, then the same command again, ends with disk and catalog
       agreeing and nothing lost.
    6. Bad input gets a clear message naming the file or setting, never a traceback; a run that
       has started always ends with its summary and log path.
    7. An original whose version cannot be made is still archived (and kept on the active tier).
    8. A damaged copy is never trusted: a copy whose last check (the fixity log) found it missing
       or corrupt counts for nothing (not for --min-copies, not as a source) until it is written
       again and checked.

The module is one file, laid out in sections in the order a run needs them:

    errors · test hooks · configuration · catalog · backends · versions (the original is type 0)
    · runs · the model process · the storage service's client · operations · command line

As a library, its operations return what they did and never print; progress and notices go
through the `mitwelten_storage` logger and an optional `Progress` object. The command line (the
last section) does all the printing. The tests call the operations in-process:

    import mitwelten_storage as ms
    settings = ms.Settings.from_env()                       # MITWELTEN_DB, MITWELTEN_DB_SCHEMA, …
    report = ms.copy_batch(settings, 1, 3, 'fs1_images', options=ms.RunOptions(jobs=8))
    report.counts, report.failures, report.log_path, report.exit_status

Batch operations (each returns its report; plan_* are dry runs, context managers that stream
what the run would do): copy_batch, plan_copy, archive_batch, plan_archive, restore_batch,
plan_restore, export_batch, plan_export, verify_backend, write_report, list_backends,
due_checks, init_db, create_local_backend, create_s3_backend. Per-file operations (what the
storage service calls): fetch_file, file_state, active_original, copy_file, archive_file,
record_archived, make_version_in_place, delete_original, restore_original. What is safe, and
where (read only): coverage, copies_due, where_is. `__all__` names the public API.
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
import getpass
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
import socket
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
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import botocore.exceptions
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql
# boto3 itself is imported where an S3 backend is opened: it takes a tenth of a second to load,
# which a run from disk to disk (a researcher at a workstation) need not pay; numpy and soundfile
# where a FLAC is made or checked (_audio_libraries), Pillow where a WebP is made or checked
# (_image_library), pydub where a recording is neither WAV nor read by libsndfile (_pydub_library).
# tqdm is imported by the command line only.
if TYPE_CHECKING:
    from PIL import Image

__version__ = '1.4.0'

# The public API: what the command line, the storage service and other programs use. The rest
# is the engine's own, reachable but free to change.
__all__ = [
    # configuration and the catalog
    'Settings', 'connect_catalog', 'CatalogFile', 'BackendRow', 'GROUPS', 'VERSIONS', 'find_version', 'find_batch',
    # batch operations (each returns a report; plan_* are dry runs)
    'init_db', 'create_local_backend', 'create_s3_backend', 'list_backends', 'due_checks',
    'copy_batch', 'plan_copy', 'archive_batch', 'plan_archive', 'restore_batch', 'plan_restore',
    'export_batch', 'plan_export', 'verify_backend', 'write_report', 'coverage', 'copies_due', 'where_is',
    'RunOptions', 'RunReport', 'VerifyReport', 'Progress', 'Plan',
    # one file at a time (what the storage service calls)
    'BackendCache', 'FileState', 'fetch_file', 'file_state', 'active_original', 'checked_range', 'CheckedObjects',
    'copy_file', 'archive_file', 'record_archived', 'make_version_in_place', 'delete_original', 'restore_original',
    # errors
    'StorageError', 'ConfigError', 'CatalogUnavailable', 'FileFailure', 'ChecksumMismatch', 'UnsafeObjectName',
    'SourceMissing', 'ConversionError', 'SyncFailed', 'Unreachable', 'TokenRefused', 'Refusal', 'NotFound',
    'TooFewCopies', 'VersionConflict', 'InvalidArchive', 'Busy', 'DamagedCopy', 'OriginalChanged', 'TooLarge',
    'SERVICE_PROBLEMS',
    # the command line
    'main', 'console_main',
]

log = logging.getLogger('mitwelten_storage')

TOOL_DIR = Path(__file__).resolve().parent
# Installed with pip or pipx, the tool finds sql/schema.sql and the shipped batches.py in this
# data-only package (the wheel's build copies them there: pyproject.toml); a clone has them beside it.
DATA_PACKAGE = 'mitwelten_storage_data'


def _shipped_file(clone_path: str) -> Path:
    """A file shipped with the tool: beside this file in a clone (`sql/schema.sql`, `batches.py`),
    else, installed, in DATA_PACKAGE under its own name. A clone is known by its sql/schema.sql, so
    an installed tool never takes another package's top-level file for its own. Found nowhere: the
    clone's path, for the error to name."""
    beside = TOOL_DIR / clone_path
    if (TOOL_DIR / 'sql' / 'schema.sql').is_file():
        return beside
    try:
        import importlib.resources
        installed = Path(str(importlib.resources.files(DATA_PACKAGE) / Path(clone_path).name))
    except (ImportError, TypeError, ValueError):
        return beside
    return installed if installed.is_file() else beside


SCHEMA_FILE = _shipped_file('sql/schema.sql')
DEFAULT_SCHEMA = 'prod'
DEFAULT_JOBS = 8
CHUNK = 1024 * 1024
# Originals pass from S3 to a disk through one reused, page-aligned buffer per transfer thread:
# no new memory per file (no page faults), and aligned for O_DIRECT writes.
IO_BUFFER_SIZE = 8 * 1024 * 1024
DIRECT_ALIGN = 4096
_thread_io = threading.local()


def _io_buffer() -> memoryview:
    """This thread's transfer buffer (IO_BUFFER_SIZE bytes, page-aligned, reused)."""
    view = getattr(_thread_io, 'view', None)
    if view is None:
        view = _thread_io.view = memoryview(mmap.mmap(-1, IO_BUFFER_SIZE))
    return view


def _buffer_address(view: memoryview) -> int | None:
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
    """Base of every error this tool reports to its user as a message rather than a traceback.

    An error that the storage service answers as a problem (RFC 9457) names its problem type
    (`urn:mitwelten:storage:problem:<problem_type>`), status and title here; the service's
    answers and the --via client's reading of them are both derived from these classes."""
    problem_type: str | None = None
    status: int = 500
    title: str = 'Storage error'
    hint: str = ''                       # added to the problem's detail
    retry_after: int | None = None       # seconds, for a problem that passes


class ConfigError(StorageError):
    """Usage or configuration is wrong (unknown backend or batch, wrong disk, server down at
    start). Nothing has been done; the command exits with status 2."""


class CatalogUnavailable(ConfigError):
    """The catalog's server cannot be reached (or refuses the connection)."""
    problem_type, status, title, retry_after = 'catalog-unavailable', 503, 'Catalog unavailable', 10


class FileFailure(StorageError):
    """One file could not be handled; the run goes on with the others and exits with status 1.
    Carries what a caller needs without parsing the message: the file's object name, the
    backend it concerns, and what was expected and found (sizes, digests), where known."""

    def __init__(self, message: str, object_name: str | None = None, *, backend: str | None = None,
                 expected: object = None, found: object = None):
        super().__init__(message)
        self.object_name = object_name
        self.backend = backend
        self.expected = expected
        self.found = found


class ChecksumMismatch(FileFailure):
    """The bytes are not the original's: their size or sha256 differs from the catalog's."""
    problem_type, status, title = 'original-corrupt', 502, 'Original corrupt on the online tier'
    hint = ': run `verify` on the active backend'


class UnsafeObjectName(FileFailure):
    """An object name that could lead outside a backend's root (rule 4)."""


class SourceMissing(FileFailure):
    """The object is not where the catalog says it is."""
    problem_type, status, title = 'original-missing', 502, 'Original missing on the online tier'
    hint = ', though the catalog records it there: run `verify` on the active backend'


class ConversionError(FileFailure):
    """A version could not be made from the original (or stored bytes of it did not check out)."""
    problem_type, status, title = 'version-failed', 422, 'Version cannot be made'


class SyncFailed(StorageError):
    """A backend could not make its writes durable (fsync failed): nothing written since its
    last successful sync is recorded (rule 1), and the run stops."""

    def __init__(self, backend, error: OSError):
        super().__init__(f'{backend.describe()} could not make its writes durable '
                         f'(fsync: {error.strerror or error})')
        self.backend = backend
        self.error = error


class Unreachable(StorageError):
    """A server (S3, the storage service) did not answer, after the retries the settings allow."""


class TokenRefused(StorageError):
    """The storage service refused the token (401: missing, expired or invalid; 403: no role)."""


class Cancelled(Exception):
    """Work not started because the run is stopping: not an error, the file is left for the
    next run."""


# --- refusals of the per-file operations ---------------------------------------------------------
# What the storage service answers with a 4xx status; each changes nothing.

class Refusal(StorageError):
    """A per-file operation that was refused and changed nothing."""
    status = 409


class NotFound(Refusal):
    """`subject` is 'file' (not in the catalog), 'backend', or 'original' (no longer online)."""
    status = 404

    def __init__(self, message: str, subject: str):
        super().__init__(message)
        self.subject = subject

    @property
    def problem_type(self) -> str:
        return 'original-not-online' if self.subject == 'original' else f'{self.subject}-not-found'

    @property
    def title(self) -> str:
        return 'Original not online' if self.subject == 'original' else f'Unknown {self.subject}'


class TooFewCopies(Refusal):
    """Fewer than min-copies sound originals are recorded elsewhere (rule 3)."""
    problem_type, title = 'too-few-copies', 'Too few copies elsewhere'


class VersionConflict(Refusal):
    """The backend records another version of the file than the one the operation needs."""
    problem_type, title = 'version-conflict', 'Another version is recorded'


class InvalidArchive(Refusal):
    """An archive cannot be recorded as asked: not the catalog's sha256, or not an archive backend."""
    problem_type, status, title = 'invalid-archive', 422, 'Not an archive of this original'


class Busy(Refusal):
    """Another request holds the file's rows for longer than a request should wait."""
    problem_type, title = 'busy', 'File busy'


class DamagedCopy(Refusal):
    """The copy asked for was found missing or corrupt by its last check: it counts for nothing
    (rule 8) until it is written again."""


class OriginalChanged(Refusal):
    """The caller's idea of the original (If-Match) is not the catalog's."""
    problem_type, status, title = 'original-changed', 412, 'Precondition failed'


class TooLarge(Refusal):
    """Bytes offered as an original are more than the catalog's size of it (refused unread)."""
    problem_type, status, title = 'too-large', 413, 'Larger than the original'


def _error_classes(base: type) -> Iterator[type]:
    for cls in base.__subclasses__():
        yield cls
        yield from _error_classes(cls)


# The service's problem types that stand for one of the engine's errors, by type: the service
# answers an error with its type, and the --via client raises the error again from the type.
SERVICE_PROBLEMS = {cls.__dict__['problem_type']: cls for cls in _error_classes(StorageError)
                    if isinstance(cls.__dict__.get('problem_type'), str)}


# =================================================================================================
# Test hooks
# =================================================================================================
#
# Crash and fault points: how the tests break runs on purpose, and how to stop at a given step.

CRASH_POINTS = frozenset({
    'before-rename',            # a file written and fsynced under its temporary name
    'after-write',              # a file in place at the target, not yet recorded
    'after-commit',             # a batch of rows committed
    'after-archive-write',      # an original written to the archive, not yet recorded
    'after-version-write',      # a version written at ACTIVE, the original still there
    'after-original-delete',    # the original deleted at ACTIVE, the row not yet changed
    'after-restore-write',      # restore: the original written back at ACTIVE, the row still the version's
    'after-restore-commit',     # restore: the rows say type 0 at ACTIVE, the version object still there
    'after-version-delete',     # restore: the version object deleted, its fixity row not yet committed
})
FAULT_POINTS = frozenset({
    'fsync',                    # from the N-th sync of a disk on (folder fsync, syncfs), it fails with EIO
    'rename',                   # from the N-th rename of a synced file into place on, it fails with EIO
})


class _FaultHooks:
    """Test hooks for rules 1 and 5, from the environment, read when first used:

    MITWELTEN_CRASH_AT=POINT:N  the process kills itself with SIGKILL the N-th time it passes
                                POINT (one of CRASH_POINTS);
    MITWELTEN_FAULT_AT=POINT:N  from the N-th time on, POINT fails as a dying disk would (one of
                                FAULT_POINTS: 'fsync' and 'rename' raise OSError(EIO)).

    An unknown point is refused, by the command line and by the service, through `check()`,
    rather than silently ignored."""

    def __init__(self, environ=os.environ):
        self.environ = environ
        self.passed: dict[str, int] = {}
        self.lock = threading.Lock()

    @functools.cached_property
    def _points(self) -> tuple:
        problems = []
        crash = self._parse('MITWELTEN_CRASH_AT', CRASH_POINTS, problems)
        fault = self._parse('MITWELTEN_FAULT_AT', FAULT_POINTS, problems)
        return crash, fault, problems[0] if problems else None

    def _parse(self, variable: str, known: frozenset, problems: list) -> tuple[str, int] | None:
        value = self.environ.get(variable, '')
        if not value:
            return None
        name, _, count = value.partition(':')
        if name not in known or not (count or '1').isdigit():
            problems.append(f"{variable}={value!r}: expected POINT[:N] with POINT one of {', '.join(sorted(known))}")
            return None
        return name, int(count or 1)

    def check(self) -> None:
        """ConfigError naming the variable when a hook names a point that does not exist."""
        if self._points[2]:
            raise ConfigError(self._points[2])

    def _count(self, name: str) -> int:
        with self.lock:
            self.passed[name] = self.passed.get(name, 0) + 1
            return self.passed[name]

    def crash_point(self, name: str) -> None:
        crash = self._points[0]
        if crash and crash[0] == name and self._count(name) == crash[1]:
            os.kill(os.getpid(), signal.SIGKILL)

    def fault_point(self, name: str, path: object = None) -> None:
        fault = self._points[1]
        if fault and fault[0] == name and self._count(name) >= fault[1]:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path) if path is not None else None)


FAULTS = _FaultHooks()
crash_point = FAULTS.crash_point
fault_point = FAULTS.fault_point


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


def _describe_dsn(dsn: str) -> str:
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


def _s3_client(location: S3Location, settings: Settings, pool_size: int = 10):
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


def _s3_error_code(exc: BaseException) -> str | None:
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
class _Group:
    """A kind of file in the catalog: its table and its storage table."""
    name: str
    files_table: str
    storage_table: str


GROUPS = {
    'image': _Group('image', 'files_image', 'mm_files_image_storage'),
    'audio': _Group('audio', 'files_audio', 'mm_files_audio_storage'),
}


def _find_group(name: str) -> _Group:
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
    # For `archive`: sound originals recorded on backends other than the source and the target
    # (rule 8; within --verified-within, if given), and whether the target's recorded copy was
    # found missing or corrupt by its last check.
    copies_elsewhere: int = 0
    target_damaged: bool = False


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
        raise CatalogUnavailable(f'cannot connect to the catalog, {_describe_dsn(settings.dsn)}: {pg_error_line(exc)} '
                                 '(set --db or MITWELTEN_DB)') from None
    except psycopg2.ProgrammingError as exc:
        raise ConfigError(f'--db / MITWELTEN_DB is not a valid connection string: {exc}') from None
    with conn.cursor() as cur:
        cur.execute(sql.SQL('SET search_path TO {}').format(sql.Identifier(settings.schema)))
        if require_tables:
            cur.execute('SELECT to_regclass(%s)', ('storage_backend',))
            if cur.fetchone()[0] is None:
                conn.close()
                raise ConfigError(f"schema '{settings.schema}' in {_describe_dsn(settings.dsn)} has no "
                                  'table storage_backend: run `mitwelten_storage.py init-db`, or name '
                                  'the right schema with --schema / MITWELTEN_DB_SCHEMA')
    conn.commit()
    return conn


def _streamed_rows(conn, query, params=None, itersize: int = 2000, columns: list | None = None) -> Iterator[tuple]:
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


# --- the fixity log ---------------------------------------------------------------------------------
#
# storage_fixity has one row per check of one copy (SPEC "Catalog: Fixity log"). A copy's last
# check is its newest row since the copy was written (a row older than the storage row's
# created_at speaks of an earlier copy, removed by `verify --fix` and written again); a copy
# without one was checked when it was written (created_at). Rule 8: a copy whose last check found
# it missing or corrupt counts for nothing until it is written again and checked. The table is
# optional: production before `init-db` has none, and everything works as before without it.

FIXITY_TABLE = 'storage_fixity'
DAMAGED_OUTCOMES = ('missing', 'corrupt')
SOUND_OUTCOMES = ('ok', 'repaired')
# The versions that are the original's exact bytes: the original, and gzip of it (type 10,
# checked to decompress to the catalog's sha256). Either counts as a copy of the original.
ORIGINAL_COPY_TYPES = (0, 10)
_fixity_notice_lock = threading.Lock()
_fixity_notes_given: set = set()        # the notes about the log said in this process (each once)


def _fixity_note_once(key: str, message: str) -> None:
    with _fixity_notice_lock:
        first = key not in _fixity_notes_given
        _fixity_notes_given.add(key)
    if first:
        log.info(message)


def _has_fixity_log(conn, *, end_transaction: bool = True) -> bool:
    """Whether the catalog's schema has the fixity log, readable by this role; says once per
    process that `init-db` would keep it when it has not (a run's threads ask too: the lock
    keeps it to once). A role that may not read it (granted its rights before the table was
    made) works as without it, and is told so once."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL, CASE WHEN to_regclass(%s) IS NOT NULL "
                    "THEN has_table_privilege(%s, 'SELECT') END", (FIXITY_TABLE,) * 3)
        present, readable = cur.fetchone()
    if end_transaction:
        conn.commit()
    if not present:
        _fixity_note_once('absent', f'the catalog has no fixity log ({FIXITY_TABLE}): `init-db` would create it, so '
                                    'that every check of a copy is kept')
    elif not readable:
        _fixity_note_once('unreadable', f'this catalog role may not read the fixity log ({FIXITY_TABLE}): the last '
                                        f'checks of copies are not known to this run (GRANT SELECT ON {FIXITY_TABLE})')
    return bool(present and readable)


def _may_append_fixity(conn) -> bool:
    """Whether this catalog role may append to the fixity log (INSERT, and its sequence); says
    once when it may not: the log is optional, so a role without the right records its copies
    all the same, and only their checks go unlogged."""
    with conn.cursor() as cur:
        cur.execute("SELECT has_table_privilege(%s, 'INSERT') AND "
                    "coalesce(has_sequence_privilege(pg_get_serial_sequence(%s, 'check_id'), 'USAGE'), true)",
                    (FIXITY_TABLE, FIXITY_TABLE))
        allowed = cur.fetchone()[0]
    conn.commit()
    if not allowed:
        _fixity_note_once('unwritable', f'this catalog role may not append to the fixity log ({FIXITY_TABLE}): '
                                        'copies written are recorded all the same, but checks are not logged (GRANT '
                                        f'INSERT ON {FIXITY_TABLE} and USAGE ON SEQUENCE {FIXITY_TABLE}_check_id_seq)')
    return allowed


def _last_check_join(group: _Group, copy: str, alias: str, has_log: bool) -> str:
    """SQL: a LEFT JOIN LATERAL that gives `alias.outcome`, `alias.checked_at` and `alias.event`,
    the last check in the fixity log of the copy whose storage row is `copy` (NULLs where there
    is none since the copy was written, or no log at all)."""
    if not has_log:
        return (f'LEFT JOIN LATERAL (SELECT NULL::text AS outcome, NULL::timestamptz AS checked_at, '
                f'NULL::text AS event) {alias} ON true')
    return (f'LEFT JOIN LATERAL (SELECT x.outcome, x.checked_at, x.event FROM {FIXITY_TABLE} x '
            f"WHERE x.file_group = '{group.name}' AND x.storage_id = {copy}.storage_id AND x.file_id = {copy}.file_id "
            f"AND x.type = {copy}.type AND x.checked_at >= coalesce({copy}.created_at, '-infinity') "
            f'ORDER BY x.checked_at DESC, x.check_id DESC LIMIT 1) {alias} ON true')


def _last_checked_sql(copy: str, check: str) -> str:
    """SQL: when the copy whose storage row is `copy` (its last check joined as `check`, see
    _last_check_join) was last proven: its last check in the fixity log, else its writing (the
    row's created_at); NULL where neither is known (never checked)."""
    return f'coalesce({check}.checked_at, {copy}.created_at)'


def _damaged_sql(check: str) -> str:
    """SQL: true where the last check joined as `check` found the copy missing or corrupt."""
    return f"coalesce({check}.outcome IN ({', '.join(repr(o) for o in DAMAGED_OUTCOMES)}), false)"


def _sound_original_sql(copy: str, check: str, verified_within_days: float | None = None) -> str:
    """SQL: true where the storage row `copy` (with its last check joined as `check`, see
    _last_check_join) is a sound copy of the original: the original or gzip of it, not found
    missing or corrupt by its last check (rule 8); with `verified_within_days`, its last check
    (or its writing) passed within that many days."""
    types = ', '.join(map(str, ORIGINAL_COPY_TYPES))
    damaged = ', '.join(f"'{o}'" for o in DAMAGED_OUTCOMES)
    condition = f'{copy}.type IN ({types}) AND ({check}.outcome IS NULL OR {check}.outcome NOT IN ({damaged}))'
    if verified_within_days is not None:
        condition += (f" AND coalesce({check}.checked_at, {copy}.created_at) >= now() - "
                      f"interval '1 day' * {float(verified_within_days)!r}")
    return condition


def _copy_last_check(conn, group: _Group, file_id: int, storage_id: int) -> tuple[str | None, dt.datetime | None]:
    """The outcome and time of the last check of one file's copy at one backend, (None, None)
    where none is logged since it was written."""
    check = _last_check_join(group, 's', 'c', _has_fixity_log(conn))
    with conn.cursor() as cur:
        cur.execute(f'SELECT c.outcome, c.checked_at FROM {group.storage_table} s {check} '
                    'WHERE s.file_id = %s AND s.storage_id = %s', (file_id, storage_id))
        row = cur.fetchone()
    conn.commit()
    return row or (None, None)


def sound_originals_elsewhere(conn, group: _Group, file_ids: list[int], excluding: int | Iterable[int], *,
                              verified_within_days: float | None = None,
                              end_transaction: bool = True) -> dict[int, int]:
    """For each file, how many backends other than `excluding` (one storage id or several)
    record a sound copy of its original (rule 8: not found missing or corrupt by its last check;
    gzip counts): the copies that let an original leave a backend (rule 3). One query; with
    `end_transaction` False, inside the caller's transaction (and its row locks)."""
    if not file_ids:
        return {}
    excluded = [excluding] if isinstance(excluding, int) else list(excluding)
    check = _last_check_join(group, 's', 'c', _has_fixity_log(conn, end_transaction=end_transaction))
    with conn.cursor() as cur:
        cur.execute(f'SELECT s.file_id, count(*) FROM {group.storage_table} s {check} '
                    f'WHERE s.file_id = ANY(%s) AND s.storage_id <> ALL(%s) AND '
                    f'{_sound_original_sql("s", "c", verified_within_days)} GROUP BY s.file_id',
                    (list(file_ids), excluded))
        counts = dict(cur.fetchall())
    if end_transaction:
        conn.commit()
    return counts


@functools.cache
def fixity_agent() -> str:
    """Who checked: the tool and its version, user@host."""
    try:
        user = getpass.getuser()
    except Exception:           # no user name in the environment or the password database
        user = str(os.getuid()) if hasattr(os, 'getuid') else '?'
    return f'mitwelten-storage {__version__} {user}@{socket.gethostname()}'


@dataclasses.dataclass(frozen=True)
class _FixityCheck:
    """One check of one copy, for the fixity log."""
    file_id: int
    storage_id: int
    type: int
    outcome: str            # 'ok' | 'missing' | 'corrupt' | 'repaired'
    event: str              # 'copy' | 'archive' | 'release' | 'verify' | 'restore' | 'export'
    detail: str | None = None


def _append_fixity(cur, group: _Group, checks: list[_FixityCheck], agent: str) -> None:
    """Append checks to the fixity log in one statement (the caller commits)."""
    if checks:
        psycopg2.extras.execute_values(
            cur, f'INSERT INTO {FIXITY_TABLE} (file_group, file_id, storage_id, type, outcome, event, agent, detail) '
                 'VALUES %s',
            [(group.name, c.file_id, c.storage_id, c.type, c.outcome, c.event, agent, c.detail) for c in checks],
            page_size=1000)


class _Recorder:
    """Collects what a run has done, as row changes, and records them in batches: inserts (a
    backend now holds a version), type changes (a backend's version replaced) and removals.

    A change is handed over only once the bytes it speaks of are written and checked; before
    every recording the backends are synced, so what is recorded is durable (rule 1). When a
    sync fails, the pending changes are dropped, never recorded, and nothing more is recorded
    by this recorder: on a disk that failed an fsync, nothing written since its last good sync
    can be trusted. The next run finds such files, checks them and records them, or writes them
    again. Subclasses say where the changes go: CatalogWriter (the catalog) and _ServiceRecorder
    (the storage service)."""

    def __init__(self, conn, group: _Group, backends: tuple = (), every_rows: int = 500,
                 every_seconds: float = 5.0):
        self.conn = conn                # for the counts of copies elsewhere (and a CatalogWriter's commits)
        self.group = group
        self.backends = backends
        self.every_rows = every_rows
        self.every_seconds = every_seconds
        self.inserts: list[tuple[CatalogFile, int, int]] = []
        self.type_changes: list[tuple[int, int, int, int]] = []
        self.removals: list[tuple[int, int]] = []
        self.checks: list[_FixityCheck] = []       # for the fixity log, with the next commit
        self.type_changes_missed: set[tuple[int, int]] = set()   # (file_id, storage_id): the row had changed
        self.last_flush = time.monotonic()
        self.recorded = 0               # inserts recorded
        self.unrecorded = 0             # inserts dropped: their files are written but not recorded
        self.failed: SyncFailed | None = None

    @property
    def pending(self) -> int:
        return len(self.inserts) + len(self.type_changes) + len(self.removals) + len(self.checks)

    @property
    def pending_inserts(self) -> int:
        return len(self.inserts)

    def add(self, file: CatalogFile, storage_id: int, version_type: int) -> None:
        self.inserts.append((file, storage_id, version_type))

    def change_type(self, file_id: int, storage_id: int, old_type: int, new_type: int) -> None:
        self.type_changes.append((file_id, storage_id, old_type, new_type))

    def remove(self, file_id: int, storage_id: int) -> None:
        self.removals.append((file_id, storage_id))

    def log_check(self, check: _FixityCheck) -> None:
        """A check of a copy, for the fixity log: appended with the next commit, and only if
        the changes it came with are recorded (a check whose copy is dropped unrecorded is
        dropped too)."""
        self.checks.append(check)

    def due(self) -> bool:
        return self.pending >= self.every_rows or (
            self.pending > 0 and time.monotonic() - self.last_flush >= self.every_seconds)

    def drop_pending(self) -> None:
        self.unrecorded += len(self.inserts)
        self.checks.clear()
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

    def originals_elsewhere(self, file_ids: list[int], excluding: int | Iterable[int], *,
                            verified_within_days: float | None = None) -> dict[int, int]:
        """How many backends other than `excluding` record a sound copy of each file's original
        (rule 8): the copies that let an original leave a backend (rule 3)."""
        return sound_originals_elsewhere(self.conn, self.group, file_ids, excluding,
                                         verified_within_days=verified_within_days)


class CatalogWriter(_Recorder):
    """Records a run's changes in the catalog, a commit per batch (`execute_values`)."""

    def _record(self) -> list[tuple[int, str]]:
        table = sql.Identifier(self.group.storage_table)
        # Asked before the transaction opens (the question commits): the checks then go in with
        # the rows of the copies they speak of, in one commit.
        log_checks = bool(self.checks) and self.keeps_fixity_log()
        try:
            with self.conn.cursor() as cur:
                if self.inserts:
                    psycopg2.extras.execute_values(cur, sql.SQL(
                        'INSERT INTO {} (file_id, storage_id, type, created_at, updated_at) VALUES %s '
                        'ON CONFLICT (file_id, storage_id) DO NOTHING').format(table).as_string(cur),
                        [(file.file_id, storage_id, version_type) for file, storage_id, version_type in self.inserts],
                        template='(%s, %s, %s, now(), now())', page_size=1000)
                applied = set()
                if self.type_changes:
                    applied = {tuple(row) for row in psycopg2.extras.execute_values(cur, sql.SQL(
                        'UPDATE {} AS s SET type = v.new_type, updated_at = now() '
                        'FROM (VALUES %s) AS v (file_id, storage_id, old_type, new_type) '
                        'WHERE s.file_id = v.file_id AND s.storage_id = v.storage_id AND s.type = v.old_type '
                        'RETURNING s.file_id, s.storage_id').format(table).as_string(cur), self.type_changes,
                        page_size=1000, fetch=True)}
                if self.removals:
                    psycopg2.extras.execute_values(cur, sql.SQL(
                        'DELETE FROM {} AS s USING (VALUES %s) AS v (file_id, storage_id) '
                        'WHERE s.file_id = v.file_id AND s.storage_id = v.storage_id').format(table)
                        .as_string(cur), self.removals, page_size=1000)
                if log_checks:
                    _append_fixity(cur, self.group, self.checks, fixity_agent())
            self.conn.commit()
        except psycopg2.Error:
            with contextlib.suppress(psycopg2.Error):
                self.conn.rollback()
            raise
        crash_point('after-commit')
        self.recorded += len(self.inserts)
        # A type change that found the row changed meanwhile (another run) did not apply.
        self.type_changes_missed.update((file_id, storage_id) for file_id, storage_id, *_ in self.type_changes
                                        if (file_id, storage_id) not in applied)
        self.inserts.clear()
        self.type_changes.clear()
        self.removals.clear()
        self.checks.clear()
        return []

    _has_log: bool | None = None

    def keeps_fixity_log(self) -> bool:
        if self._has_log is None:
            self._has_log = _has_fixity_log(self.conn) and _may_append_fixity(self.conn)
        return self._has_log


# --- batches -------------------------------------------------------------------------------------

# --batches FILE, set by the command line; None: $MITWELTEN_BATCHES, ./batches.py, the shipped one.
BATCHES_FILE: str | Path | None = None


def batches_file() -> tuple[Path, str]:
    """The batches file to read, and what chose it: --batches FILE (BATCHES_FILE), else
    $MITWELTEN_BATCHES, else batches.py in the current folder, else the one shipped with the tool."""
    if BATCHES_FILE:
        return Path(BATCHES_FILE).expanduser().absolute(), '--batches'
    if os.environ.get('MITWELTEN_BATCHES'):
        return Path(os.environ['MITWELTEN_BATCHES']).expanduser().absolute(), 'MITWELTEN_BATCHES'
    here = Path('batches.py')
    if here.is_file():
        return here.absolute(), 'the current folder'
    return _shipped_file('batches.py'), 'shipped with the tool'


def load_batches(path: Path | None = None) -> dict:
    """The batches defined in the batches file (see batches_file), or in `path`, by id."""
    origin = None
    if path is None:
        path, origin = batches_file()
    if not path.exists():
        named = f' (named by {origin})' if origin in ('--batches', 'MITWELTEN_BATCHES') else ''
        raise ConfigError(f'{path}{named} not found: it defines the batches')
    if path.is_dir():
        raise ConfigError(f'{path} is a folder: name the batches file (a batches.py) itself')
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
        raise ConfigError(f"unknown batch '{batch_id}'; {path or batches_file()[0]} defines: {known}")
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
    return ConfigError(f"batch '{batch.id}' ({batches_file()[0]}) cannot be selected: {pg_error_line(exc)}")


@dataclasses.dataclass(frozen=True)
class _Selection:
    """The files of a batch that SOURCE holds, streamed in file_id order: a production batch
    holds 1.7 million files and is never loaded whole.

    For `copy` (for_archive=False): files SOURCE holds as version `version_type` or as the original,
    and TARGET holds in no version; never from a copy at SOURCE that its last check found
    missing or corrupt (rule 8: `counts` says how many are left out for that). For `archive` (for_archive=True):
    files SOURCE (the active tier) holds as the original, with whatever version TARGET (the
    archive) already holds of them."""
    batch: object
    source_id: int
    target_id: int
    version_type: int = 0
    limit: int | None = None
    for_archive: bool = False   # the archive command's selection (see above)
    verified_within_days: float | None = None   # archive: other copies count if checked within

    @property
    def group(self) -> _Group:
        return GROUPS[self.batch.group]

    def _archive_columns(self, has_log: bool) -> str:
        """For archive: the sound originals recorded on backends other than SOURCE and TARGET
        (rule 8), and whether TARGET's recorded copy was found damaged by its last check."""
        if not self.for_archive:
            return '0, false'
        storage = self.group.storage_table
        damaged = ', '.join(f"'{o}'" for o in DAMAGED_OUTCOMES)
        return (f'(SELECT count(*) FROM {storage} o {_last_check_join(self.group, "o", "oc", has_log)} '
                'WHERE o.file_id = b.file_id AND o.storage_id NOT IN (%(source)s, %(target)s) AND '
                f'{_sound_original_sql("o", "oc", self.verified_within_days)}), '
                f'coalesce(tc.outcome IN ({damaged}), false)')

    @property
    def _todo(self) -> str:
        return 'TRUE' if self.for_archive else f't.file_id IS NULL AND {self._source_sound}'

    @property
    def _source_sound(self) -> str:
        """copy's source copy (`s`, its last check `sc`) may be read (rule 8): a sound copy of the
        original when the original is copied, else at least not found damaged by its last check."""
        if self.version_type == 0:
            return f'({_sound_original_sql("s", "sc")})'
        return f'NOT {_damaged_sql("sc")}'

    def _query(self, conn, head: str, tail: str) -> str:
        storage = self.group.storage_table
        params = {'source': self.source_id, 'target': self.target_id,
                  'types': (0,) if self.for_archive else (self.version_type, 0)}
        joins = (') AS b\n'
                 f'JOIN {storage} s ON s.file_id = b.file_id AND s.storage_id = %(source)s AND s.type IN %(types)s\n'
                 f'LEFT JOIN {storage} t ON t.file_id = b.file_id AND t.storage_id = %(target)s\n')
        if self.for_archive:
            joins += _last_check_join(self.group, 't', 'tc', _has_fixity_log(conn)) + '\n'
        else:
            joins += _last_check_join(self.group, 's', 'sc', _has_fixity_log(conn)) + '\n'
        with conn.cursor() as cur:
            head = cur.mogrify(head, params).decode() if '%(' in head else head
            tail = cur.mogrify(joins + tail, params).decode()
        return f'{head}\n{batch_sql(self.batch)}\n{tail}'

    def counts(self, conn) -> dict:
        """How many files of the batch are to do (and their bytes), how many TARGET holds as
        the version asked for already, and how many in another version."""
        left_out = 'FALSE' if self.for_archive else f't.file_id IS NULL AND NOT {self._source_sound}'
        head = (f'SELECT count(*) FILTER (WHERE {self._todo}),\n'
                f'       coalesce(sum(b.file_size) FILTER (WHERE {self._todo}), 0),\n'
                f'       count(*) FILTER (WHERE t.type = {int(self.version_type)}),\n'
                f'       count(*) FILTER (WHERE t.type <> {int(self.version_type)}),\n'
                '       count(*),\n'
                f'       count(*) FILTER (WHERE {left_out})\n'
                'FROM (')
        todo, todo_bytes, done, other, at_source, damaged = self._one_row(conn, self._query(conn, head, ''))
        todo, todo_bytes = self._limited(todo, todo_bytes)
        return {'todo': todo, 'todo_bytes': todo_bytes, 'done': done, 'other_version': other,
                'at_source': at_source, 'damaged_source': damaged}

    def check(self, conn) -> None:
        """Have PostgreSQL plan the selection (EXPLAIN: nothing runs), so that a batch whose SQL
        is wrong is a configuration error before a run starts, not a run stopped early."""
        self._one_row(conn, self._query(conn, 'EXPLAIN SELECT b.file_id, b.object_name, b.file_size, b.sha256 FROM (',
                                        ''))

    def _one_row(self, conn, query: str) -> tuple:
        """The first row of one of the selection's queries (its counts, or its plan), the
        transaction ended; an error of the batch's SQL is a ConfigError naming the batch, a
        catalog gone is the outage it is (selection_error)."""
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                row = cur.fetchone()
            conn.commit()
            return row
        except psycopg2.Error as exc:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()
            raise selection_error(self.batch, exc) from None

    def _limited(self, todo: int, todo_bytes: int | None) -> tuple[int, int | None]:
        """The files (and bytes) to do under --limit: the bytes are not known then."""
        if self.limit is not None and todo > self.limit:
            return self.limit, None
        return todo, todo_bytes

    def files(self, conn) -> Iterator[CatalogFile]:
        head = (f'SELECT b.file_id, b.object_name, b.file_size, b.sha256, s.type, t.type, '
                f'{self._archive_columns(_has_fixity_log(conn))} FROM (')
        tail = f'WHERE {self._todo} ORDER BY b.file_id' + (f' LIMIT {int(self.limit)}' if self.limit is not None else '')
        rows = _streamed_rows(conn, self._query(conn, head, tail))
        last_id = None
        try:
            for file_id, object_name, file_size, sha256, source_type, target_type, elsewhere, damaged in rows:
                if file_id == last_id:   # a batch whose joins repeat a file
                    continue
                last_id = file_id
                yield CatalogFile(file_id, object_name, int(file_size), (sha256 or '').strip().lower(),
                                  source_type, target_type, elsewhere, damaged)
        except psycopg2.Error as exc:
            raise selection_error(self.batch, exc) from None


# --- one file ------------------------------------------------------------------------------------

FILE_COLUMNS = 'file_id, object_name, file_size, sha256'


def fetch_file(conn, group: str, file_id: int) -> CatalogFile:
    """One file's row in files_image / files_audio; NotFound if the catalog has no such file."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL(f'SELECT {FILE_COLUMNS} FROM {{}} WHERE file_id = %s').format(
            sql.Identifier(_find_group(group).files_table)), (file_id,))
        row = cur.fetchone()
    if row is None:
        raise NotFound(f'no {group} file with id {file_id} in the catalog', 'file')
    file_id, object_name, file_size, sha256 = row
    return CatalogFile(file_id, object_name, int(file_size or 0), (sha256 or '').strip().lower())


@dataclasses.dataclass(frozen=True)
class _StorageRow:
    """A storage row of one file: which backend holds which version of it."""
    backend: BackendRow
    type: int


def _storage_rows(conn, group: str, file_id: int, *, lock: bool = False) -> list[_StorageRow]:
    """The file's storage rows with their backends, the online tiers first (by priority, then
    id). With `lock`, the rows are locked (SELECT … FOR UPDATE) until the transaction ends, so
    that two requests for one file, from any number of processes, never both act on it; a lock
    not had within 30 s is Busy."""
    group = _find_group(group)
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
        return [_StorageRow(BackendRow(*row[1:]), row[0]) for row in cur.fetchall()]


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


def _safe_object_parts(object_name: str) -> list[str]:
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


def _sha256_hex_to_b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def repr_digest(sha256_hex: str) -> str:
    """The Repr-Digest header (RFC 9530) of an original whose sha256 this is."""
    return f'sha-256=:{_sha256_hex_to_b64(sha256_hex)}:'


# --- durable files -------------------------------------------------------------------------------

def _full_fsync(fd: int) -> None:
    """fsync that reaches the disk: on macOS plain fsync stops at the drive's cache."""
    if hasattr(fcntl, 'F_FULLFSYNC'):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EINVAL, errno.ENOTTY):   # a file system without it
                raise
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files, removals) durable."""
    fault_point('fsync', path)
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    try:
        _full_fsync(fd)
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


def _temporary_name(final: Path) -> Path:
    """A hidden name beside `final` (the rename stays atomic), marked as this run's and
    recognisable by its suffix for the clean-up of a killed run's leftovers."""
    return final.with_name(f'.{final.name[:200]}.{RUN_MARK}-{next(_TMP_NUMBERS)}{TMP_SUFFIX}')


@contextlib.contextmanager
def _atomic_file(final: Path, *, sync_folder: bool = True,
                on_fsync_error: Callable[[OSError], None] | None = None) -> Iterator[Path]:
    """Rule 2: yields a temporary path beside `final` for the caller to write and close; when the
    block ends without error the file is fsynced and renamed to `final`, so `final` is either
    its old self or the whole new file, never half written. On error the temporary file goes.
    With `sync_folder`, the folder is fsynced at once; without, the caller syncs it later (a
    backend batches the folders of many files into one fsync each before a catalog commit)."""
    tmp = _temporary_name(final)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))
        try:
            _full_fsync(fd)
        except OSError as exc:
            if on_fsync_error:
                on_fsync_error(exc)
            raise
        finally:
            os.close(fd)
        crash_point('before-rename')
        fault_point('rename', final)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_folder:
        _fsync_dir(final.parent)


def _write_chunks(handle, chunks: Iterable[bytes], direct: bool) -> bool:
    """The O_DIRECT writer: write `chunks` to `handle` (an unbuffered file opened with O_DIRECT
    when `direct`). Whole, aligned blocks of an aligned chunk (the transfer buffer, see
    _io_buffer) go straight to the disk, past the page cache; the tail that is not a whole block,
    or a chunk that is not aligned, turns O_DIRECT off for the rest of the file. Returns False
    when the file system refused O_DIRECT halfway (EINVAL), after writing the rest buffered."""
    fd = handle.fileno()
    accepted = True
    for chunk in chunks:
        view = memoryview(chunk).cast('B')
        if direct:
            whole = len(view) - len(view) % DIRECT_ALIGN
            address = _buffer_address(view) if whole else None
            if address is not None and address % DIRECT_ALIGN == 0:
                part = view[:whole]
                try:
                    while part:
                        part = part[handle.write(part):]
                    view = view[whole:]
                except OSError as exc:
                    if exc.errno != errno.EINVAL or handle.tell() % DIRECT_ALIGN:
                        raise
                    accepted = False
                    view = view[whole - len(part):]      # the rest, from where it stopped
            if len(view):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                direct = False
        while view:
            view = view[handle.write(view):]
    return accepted


class _SyncfsGroup:
    """The grouped syncfs of a disk that writes in groups (`copy`): files written and checked
    under their temporary names wait here; `sync` makes them durable together with one syncfs()
    of the file system (not an fsync per file), then renames them into place; their folders are
    fsynced by the backend's sync, before the catalog records them. A failed sync, or a failed
    fsync of any file of the disk (`fail`), leaves none of the waiting files under its final name
    and fails every later sync of the run, so that nothing written since the last good sync is
    recorded (rule 1): the next run writes them again."""

    def __init__(self):
        self.files: list[tuple[Path, Path]] = []     # (temporary name, final name)
        self.error: OSError | None = None
        self._lock = threading.Lock()                  # one sync at a time
        self._files_lock = threading.Lock()

    def add(self, tmp: Path, final: Path) -> bool:
        """A file written and checked under `tmp`; whether the group is full and due a sync."""
        with self._files_lock:
            self.files.append((tmp, final))
            return len(self.files) >= SYNC_GROUP

    def fail(self, exc: OSError) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc

    def sync(self, root: Path, lock_fd: int, renamed: Callable[[Path], None]) -> None:
        """One syncfs() through `lock_fd` (open on the disk since the run began, so it reports
        every write-back error since), then the renames; `renamed(folder)` for each."""
        with self._lock:
            if self.error is not None:
                raise self.error
            with self._files_lock:
                files, self.files = self.files, []
            if not files:
                return
            try:
                fault_point('fsync', root)
                if SYNCFS(lock_fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f'syncfs: {os.strerror(err)}', str(root))
            except OSError as exc:
                self.error = exc
                for tmp, _ in files:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise
            except BaseException:       # interrupted: whether the group is durable is not known
                self.error = OSError(errno.EINTR, 'interrupted while making a group of files durable', str(root))
                raise
            try:
                for tmp, final in files:
                    crash_point('before-rename')
                    fault_point('rename', final)
                    os.replace(tmp, final)
                    renamed(final.parent)
            except BaseException as exc:
                # Some of the group are not under their final names: none of the rows waiting
                # for this sync may be recorded, so every later sync of the run fails too.
                self.error = exc if isinstance(exc, OSError) else OSError(
                    errno.EINTR, 'interrupted while renaming a group of files', str(root))
                raise


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


def _parse_timestamp(text: str) -> dt.datetime | None:
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
    created = _parse_timestamp(values.get('created_at', ''))
    if found_id != str(backend_row.storage_id) or created != backend_row.created_at:
        return (f'wrong disk at {root}: its {DOT_FILE} says storage_id={found_id}, created_at='
                f"{values.get('created_at', '?')}, but the catalog's backend {backend_row.storage_id} was created "
                f'at {backend_row.created_at}')
    return None


def _normal_path(path: str | Path) -> Path:
    """A folder's path as the file system means it, for comparing one path with another: `~`
    expanded, made absolute, '.', '..' and trailing or doubled slashes gone, and symbolic links
    resolved as far as the path exists. A url_prefix stored as typed ('/media/archive07/', as
    the earlier Mitwelten script stored it) is the same folder as '/media/archive07'."""
    return Path(os.path.expanduser(str(path))).resolve(strict=False)


def _same_folder(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one folder: the same normalised path, or (a bind mount, a link
    on the way) the same folder on the same file system."""
    if _normal_path(a) == _normal_path(b):
        return True
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


DEFAULT_MOUNT_ROOTS = ('/Volumes', '/media/*', '/run/media/*/*', '/mnt')


def _mount_roots() -> list[str]:
    """Where disks get mounted (glob patterns): macOS, Linux desktops, by hand.
    MITWELTEN_MOUNT_ROOTS (separated by ':') replaces the list."""
    configured = os.environ.get('MITWELTEN_MOUNT_ROOTS')
    if configured is not None:
        return [root for root in configured.split(os.pathsep) if root]
    return list(DEFAULT_MOUNT_ROOTS)


def _find_disk(backend_row: BackendRow) -> Path | None:
    """The folder, under the mount roots, whose dot-file matches the backend: each root itself
    and the folders in it (a disk, or a backend folder at the top of a disk)."""
    found = _find_disks(backend_row)
    return found[0] if found else None


def _find_disks(backend_row: BackendRow) -> list[Path]:
    """Every folder under the mount roots whose dot-file matches the backend, each folder once
    (one reached through two paths counts once). More than one is a disk and its copy."""
    found: list[Path] = []
    for pattern in _mount_roots():
        for candidate in sorted(glob.glob(os.path.expanduser(pattern))):
            places = [Path(candidate)]
            with contextlib.suppress(OSError), os.scandir(candidate) as entries:
                places += sorted(Path(e.path) for e in entries if not e.name.startswith('.') and e.is_dir())
            for place in places:
                with contextlib.suppress(OSError):
                    if ((place / DOT_FILE).is_file() and dot_file_mismatch(place, backend_row) is None
                            and not any(_same_folder(place, known) for known in found)):
                        found.append(place)
    return found


def _two_claims(backend_row: BackendRow, first: Path, second: Path) -> ConfigError:
    """Two folders whose dot-files both match one backend: a disk copied whole (`rsync -a`, its
    dot-file with it). Which one the catalog's rows speak of cannot be told, so neither is used."""
    return ConfigError(f'two folders claim to be backend {backend_row.storage_id}: {first} and {second} (both have its '
                       f'{DOT_FILE}; one is a copy of the other). Refusing to use either: unmount or rename the copy, '
                       'or remove its dot-file (a copy becomes a backend of its own with `create` on an empty folder '
                       'and `copy`)')


def _disk_whereabouts(backend_row: BackendRow) -> Path | None:
    """Where the disk of a local backend is mounted now: at its recorded path when its dot-file
    matches there, else wherever _find_disk finds it under the mount roots; None when offline."""
    if dot_file_mismatch(Path(backend_row.url_prefix), backend_row) is None:
        return Path(backend_row.url_prefix)
    return _find_disk(backend_row)


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
    writes_from_buffer = False      # writes best from this thread's _io_buffer() (O_DIRECT): read into it
    group_writes = False            # makes new files durable in groups, by `sync` (a constructor option)
    read_etags = False              # `read` takes meta={} and fills in the object's 'etag' (S3's ETag)

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

    def __init__(self, backend_row: BackendRow, root: Path | None = None, path_option: str | None = None, *,
                 group_writes: bool = False):
        self.row = backend_row
        # Files written in groups: written and checked under temporary names, made durable
        # together by one syncfs(), then renamed (`copy`, where nothing but the catalog waits
        # on a file; see _sync_group). Otherwise each file is fsynced and renamed as it is written.
        self.group_writes = group_writes
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
        self._group = _SyncfsGroup()

    def location(self) -> str:
        return str(self.root)

    def check(self, writing: bool) -> None:
        """Find the disk and make sure it is this backend: its dot-file must match the catalog
        row (storage_id and created_at). Not at its recorded path, the disk is looked for under
        the usual mount roots; a path given by the user is used as it is."""
        problem = dot_file_mismatch(self.root, self.row)
        if problem and not self.given_path:
            found = _find_disks(self.row)
            if len(found) > 1:
                raise _two_claims(self.row, found[0], found[1])
            if found:
                log.info('%s is not at its recorded path; found it at %s (its %s matches)',
                         self.describe(), found[0], DOT_FILE)
                self.root, problem = found[0], None
        if problem:
            hint = self.path_option or ('--target-path' if writing else '--source-path')
            if not self.root.is_dir():
                raise ConfigError(f'{self.describe()} is not mounted: {self.root} does not exist and no disk with '
                                  f'its {DOT_FILE} is mounted under {", ".join(_mount_roots()) or "(no mount roots)"}; '
                                  f'pass {hint} where the disk is mounted now')
            raise ConfigError(f'refusing to use {self.describe()}: {problem}')
        if self.given_path:
            # The folder given matches; the disk itself may be online too, at its recorded path or
            # under the mount roots: then the folder given is a copy, or the disk is the copy.
            recorded = Path(self.row.url_prefix)
            elsewhere = ([recorded] if dot_file_mismatch(recorded, self.row) is None else []) + _find_disks(self.row)
            for other in elsewhere:
                if not _same_folder(other, self.root):
                    raise _two_claims(self.row, self.root, other)
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
        return self.archive.joinpath(*_safe_object_parts(object_name))

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
            with _atomic_file(final, sync_folder=False, on_fsync_error=self._fsync_failed) as tmp:
                self._write_file(tmp, object_name, chunks, size)
            self._changed(final.parent)
            return
        # In a group: no fsync of its own; _sync_group() makes the group durable, then renames.
        tmp = _temporary_name(final)
        try:
            self._write_file(tmp, object_name, chunks, size)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self._group.add(tmp, final):
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
            if not _write_chunks(handle, chunks, direct):
                self.direct_io = False                 # refused halfway: not again in this run
            written = os.fstat(handle.fileno()).st_size
        if written != size:
            raise FileFailure(f'{tmp}: wrote {written} bytes, expected {size}', object_name)

    def _fsync_failed(self, exc: OSError) -> None:
        """A file's fsync failed: the disk may have lost what it holds of anything written since
        the last good sync, so every later sync of the run fails and nothing more is recorded."""
        self._group.fail(exc)

    def _sync_group(self) -> None:
        self._group.sync(self.root, self._lock_fd, self._changed)

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
            _full_fsync(fd)
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
                _fsync_dir(directories[-1])
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

def _is_md5_etag(etag: str) -> bool:
    return bool(re.fullmatch(r'[0-9a-f]{32}', etag))


class S3Backend(Backend):
    """A bucket (and optional key prefix) on an S3 server: AWS, MinIO, or any compatible one."""

    kind = 's3'
    keeps_tags = True
    read_etags = True
    # Up to this size an object is read into memory and written with one PUT whose checksums
    # the server verifies; larger ones stream through the transfer manager's multipart upload.
    SINGLE_PUT_LIMIT = 32 * 1024 * 1024
    WHOLE_READ_LIMIT = 8 * 1024 * 1024

    def __init__(self, backend_row: BackendRow, settings: Settings, jobs: int = DEFAULT_JOBS):
        from boto3.s3.transfer import TransferConfig
        self.row = backend_row
        self.where = S3Location.parse(backend_row.url_prefix)
        self.client = _s3_client(self.where, settings, pool_size=max(10, jobs + 4))
        self.transfer_config = TransferConfig(multipart_threshold=self.SINGLE_PUT_LIMIT,
                                              multipart_chunksize=16 * 1024 * 1024, max_concurrency=2)

    def location(self) -> str:
        return self.where.url

    def key(self, object_name: str) -> str:
        _safe_object_parts(object_name)
        return self.where.prefix + object_name

    def check(self, writing: bool) -> None:
        _check_bucket(self.client, self.where, self.describe())

    def size(self, object_name: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.where.bucket, Key=self.key(object_name))
        except botocore.exceptions.ClientError as exc:
            if _s3_error_code(exc) in S3_NOT_FOUND:
                return None
            raise
        return head['ContentLength']

    def read(self, object_name: str, *, start: int = 0, end: int | None = None,
             piece: int | None = None, into: memoryview | None = None, meta: dict | None = None) -> Iterator[bytes]:
        extra = {}
        if start or end is not None:
            extra['Range'] = f'bytes={start}-{"" if end is None else end}'
        try:
            response = self.client.get_object(Bucket=self.where.bucket, Key=self.key(object_name), **extra)
        except botocore.exceptions.ClientError as exc:
            if _s3_error_code(exc) in S3_NOT_FOUND:
                raise SourceMissing(f'object {self.key(object_name)} is missing in {self.describe()}',
                                    object_name) from None
            raise
        if meta is not None:
            meta['etag'] = response.get('ETag')
        body = response['Body']
        stream = raw_http_stream(body) if into is not None else None
        if stream is not None:
            yield from self._read_into(body, *stream, response.get('ContentLength'), into)
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
                extra['ChecksumSHA256'] = _sha256_hex_to_b64(sha256_hex)
            response = self.client.put_object(Bucket=self.where.bucket, Key=key, Body=data, **extra)
            # Servers that verify ChecksumSHA256 have refused a corrupted body already; for
            # the others, a plain (unencrypted, single-part) object's ETag is its MD5.
            etag = response.get('ETag', '').strip('"')
            if (not response.get('ServerSideEncryption') and _is_md5_etag(etag)
                    and etag != hashlib.md5(data).hexdigest()):
                self._delete_key(key)
                raise FileFailure(f'{self.describe()} stored {key} with a different MD5 than was sent',
                                  object_name)
        else:
            # Every part is sent with its SHA-256, which the server checks; the whole was
            # checked against the catalog's as it was read (CheckedStream).
            self.client.upload_fileobj(_ChunkReader(chunks), self.where.bucket, key,
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
            if _s3_error_code(exc) in ('NotImplemented', *S3_NOT_FOUND):
                return None     # a server without tagging, or an object gone: nothing to carry over
            raise
        return {tag['Key']: tag['Value'] for tag in response.get('TagSet', [])} or None


def raw_http_stream(body) -> tuple | None:
    """urllib3's response and http.client's file under botocore's StreamingBody, to receive an
    object with readinto into a reused buffer (S3Backend._read_into). They are private
    attributes of both libraries: where a version no longer has them, None, and the object is
    read through the public API instead (tests/test_copy.py runs both ways)."""
    raw = getattr(body, '_raw_stream', None)
    fp = getattr(raw, '_fp', None)
    if hasattr(fp, 'readinto') and hasattr(raw, 'release_conn'):
        return raw, fp
    return None


class _ChunkReader(io.RawIOBase):
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


def _connection_problem(exc: BaseException) -> str:
    """What went wrong on the way to a server ('Connection refused', 'no answer in time'), for a
    message that names the server itself."""
    if isinstance(exc, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        return 'no answer in time'
    error = getattr(exc, 'kwargs', {}).get('error') or exc
    found = re.search(r'\[Errno -?\d+\] ([^\]\)]+)', str(error))
    return found.group(1).strip() if found else type(error).__name__


def _check_bucket(client, where: S3Location, what: str) -> None:
    try:
        client.head_bucket(Bucket=where.bucket)
    except botocore.exceptions.NoCredentialsError:
        raise ConfigError(f'no S3 credentials for {where.netloc}: set AWS_ACCESS_KEY_ID and '
                          f"AWS_SECRET_ACCESS_KEY, or create an AWS profile named '{where.netloc}'") from None
    except S3_CONNECTION_ERRORS as exc:
        raise ConfigError(f'cannot reach the S3 server {where.endpoint} ({what}): {_connection_problem(exc)}; '
                          'check the server and the network (timeouts: MITWELTEN_CONNECT_TIMEOUT, '
                          'MITWELTEN_READ_TIMEOUT, MITWELTEN_ATTEMPTS)') from None
    except botocore.exceptions.ClientError as exc:
        code = _s3_error_code(exc)
        if code in ('404', 'NoSuchBucket', 'NotFound'):
            raise ConfigError(f"bucket '{where.bucket}' does not exist at {where.endpoint} ({what})") from None
        if code in ('403', 'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch'):
            raise ConfigError(f"access to bucket '{where.bucket}' at {where.endpoint} denied ({what}): "
                              f"check the credentials (AWS profile '{where.netloc}' or the default ones)") from None
        raise ConfigError(f"S3 error on bucket '{where.bucket}' at {where.endpoint} ({what}): {code}") from None


def open_backend(backend_row: BackendRow, settings: Settings, *, path: str | None = None,
                 jobs: int = DEFAULT_JOBS, path_option: str | None = None, group_writes: bool = False) -> Backend:
    """The backend of a catalog row; `path` is where a disk is mounted if not at its recorded
    path, and `path_option` the command's option that gives it (named in messages);
    `group_writes`: a disk makes new files durable in groups (see LocalBackend)."""
    if backend_row.type == 'local':
        return LocalBackend(backend_row, Path(path).expanduser().absolute() if path else None, path_option,
                            group_writes=group_writes)
    if path:
        raise ConfigError(f'{backend_row.describe()} is an S3 backend: a path applies to local disks only')
    if backend_row.type == 's3':
        return S3Backend(backend_row, settings, jobs=jobs)
    raise ConfigError(f"{backend_row.describe()} has type '{backend_row.type}'; this tool knows 'local' and 's3'")


# =================================================================================================
# Versions (the original is type 0)
# =================================================================================================
#
# An original counts only once its bytes hash to the catalog's sha256 (and have its size).

def _check_original(file: CatalogFile, size: int, sha256_hex: str) -> None:
    if size != file.file_size:
        raise ChecksumMismatch(f'{size:,} bytes, the catalog says {file.file_size:,}: not the original',
                               file.object_name)
    if sha256_hex != file.sha256:
        raise ChecksumMismatch(f'sha256 {sha256_hex} does not match the catalog\'s {file.sha256}: not the '
                               'original', file.object_name)


def _check_original_bytes(data: bytes, file: CatalogFile) -> None:
    _check_original(file, len(data), hashlib.sha256(data).hexdigest())


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
        _check_original(self.file, total, digest.hexdigest())
        if held is not None:
            yield held


def read_original(backend: Backend, file: CatalogFile, progress: Callable[[int], None] | None = None) -> bytes:
    """The original's bytes, read once and checked against the catalog's size and sha256."""
    return b''.join(CheckedStream(backend.read_original(file), file, progress))


# --- gzip is the original ---------------------------------------------------------------------------
#
# A gzip version (type 10) decompresses to the original's exact bytes: where a backend holds it,
# the original is read from it, decompressed as it streams and checked like any original
# (CheckedStream against the catalog's size and sha256). `restore`, `export` and the service's
# GET …/original read originals so.

GZIP_PIECE = 1024 * 1024        # decompressed output per step: memory stays bounded, whatever the ratio


def _gunzipped(chunks: Iterable[bytes], object_name: str) -> Iterator[bytes]:
    """The decompressed bytes of a gzip stream, as it streams (zlib, gzip header and trailer:
    its CRC-32 and length are checked by zlib); ChecksumMismatch for a damaged or cut-off one."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        for chunk in chunks:
            data = inflater.decompress(chunk, GZIP_PIECE)
            while data:
                yield data
                data = inflater.decompress(inflater.unconsumed_tail, GZIP_PIECE) if inflater.unconsumed_tail else b''
        tail = inflater.flush()
        if tail:
            yield tail
    except zlib.error as exc:
        raise ChecksumMismatch(f'the gzip copy does not decompress: {exc}', object_name) from None
    if not inflater.eof:
        raise ChecksumMismatch('the gzip copy ends early: not the whole original', object_name)


def _original_from(backend: Backend, file: CatalogFile, held_type: int,
                  into: memoryview | None = None) -> Iterator[bytes]:
    """The original's bytes from a backend that holds it as `held_type`: the original itself
    (type 0), or gzip of it (type 10), decompressed as it streams. Unchecked: pass it through a
    CheckedStream. Other versions are not the original (VersionConflict)."""
    if held_type == 0:
        return backend.read_original(file, into=into)
    if held_type == 10:
        return _gunzipped(backend.read(_with_suffix('.gz')(file.object_name), into=into), file.object_name)
    raise VersionConflict(f'{backend.describe()} holds version {held_type} of {file.object_name}, not its original '
                          'nor gzip of it')


class _GzipHeldOriginal(Backend):
    """A backend that holds a file's original as gzip (type 10), presented as holding the
    original itself: its size is the catalog's, its reads decompress as they stream (a range
    is cut from the decompressed bytes), so that whoever reads originals from a backend (the
    service's GET …/original) serves it unchanged; the caller checks it (CheckedStream) as any
    original. Nothing is written through it."""

    def __init__(self, backend: Backend, file: CatalogFile):
        self.inner, self.file = backend, file
        self.row, self.kind = backend.row, backend.kind
        self.gz_name = _with_suffix('.gz')(file.object_name)

    def location(self) -> str:
        return self.inner.location()

    def describe(self) -> str:
        return f'{self.inner.describe()} (the original, from its gzip version)'

    def check(self, writing: bool) -> None:
        self.inner.check(writing)

    def size(self, object_name: str) -> int | None:
        if object_name != self.file.object_name:
            return self.inner.size(object_name)
        return self.file.file_size if self.inner.size(self.gz_name) is not None else None

    def read(self, object_name: str, *, start: int = 0, end: int | None = None,
             piece: int | None = None, into: memoryview | None = None) -> Iterator[bytes]:
        if object_name != self.file.object_name:
            yield from self.inner.read(object_name, start=start, end=end, piece=piece)
            return
        position = 0
        for chunk in _gunzipped(self.inner.read(self.gz_name, piece=piece), object_name):
            first, position = position, position + len(chunk)
            if position <= start:
                continue
            if end is not None and first > end:
                return
            yield chunk[max(0, start - first):None if end is None else end + 1 - first]

    def read_original(self, file: CatalogFile, into: memoryview | None = None) -> Iterator[bytes]:
        return self.read(file.object_name)

    def _read_only(self, *args, **kwargs):
        raise ConfigError(f'{self.describe()} is read through its gzip version: nothing is written through it')

    write = delete = _read_only


class CheckedObjects:
    """The objects that hashed to their catalog sha256 lately, each by its backend, name, sha256
    and the ETag S3 gave it, kept `ttl` seconds: the segments of one download (aria2c's, curl
    -C -) are then not each a full read. An object changed since has another ETag and is read
    whole again. Those that did not hash right are kept too, with the sha256 they have: asked
    for again (a client resuming a cut download), they are refused before a byte is sent."""

    def __init__(self, ttl: float, limit: int = 20000):
        self.ttl = ttl
        self.limit = limit
        self._checked: dict[tuple, tuple[str, float]] = {}
        self._bad: dict[tuple, tuple[str, str, float]] = {}
        self._lock = threading.Lock()

    def add_bad(self, backend: Backend, file: CatalogFile, etag: str | None, actual_sha256: str) -> None:
        if not etag or self.ttl <= 0:
            return
        with self._lock:
            if len(self._bad) >= self.limit:
                self._bad.clear()
            self._bad[self._key(backend, file)] = (etag, actual_sha256, time.monotonic() + self.ttl)

    def bad(self, backend: Backend, file: CatalogFile, etag: str | None) -> str | None:
        """The sha256 the object with this ETag had when it failed its check lately, or None."""
        with self._lock:
            known, actual, until = self._bad.get(self._key(backend, file), (None, None, 0.0))
        return actual if etag and known == etag and until > time.monotonic() else None

    @staticmethod
    def _key(backend: Backend, file: CatalogFile) -> tuple:
        return backend.location(), file.object_name, file.sha256

    def add(self, backend: Backend, file: CatalogFile, etag: str | None) -> None:
        if not etag or self.ttl <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._checked) >= self.limit:
                self._checked = {k: v for k, v in self._checked.items() if v[1] > now}
                while len(self._checked) >= self.limit:         # still full: the oldest go
                    del self._checked[next(iter(self._checked))]
            self._checked.pop(self._key(backend, file), None)
            self._checked[self._key(backend, file)] = (etag, now + self.ttl)

    def etag(self, backend: Backend, file: CatalogFile) -> str | None:
        """The ETag with which the object hashed right lately, or None."""
        with self._lock:
            etag, until = self._checked.get(self._key(backend, file), (None, 0.0))
        return etag if until > time.monotonic() else None


def checked_range(backend: Backend, file: CatalogFile, first: int, last: int, *,
                  checked: CheckedObjects | None = None, piece: int | None = None) -> Iterator[bytes]:
    """Bytes `first` to `last` (inclusive) of an original, never passed on unchecked: the whole
    object is read and hashed, the range passed on as it goes by, and the range's last piece
    held back until the whole has the catalog's size and sha256 (ChecksumMismatch otherwise, so
    that a client putting an original together from ranges never ends with a damaged one).
    Where `checked` holds the object as hashed right lately with the very ETag this read finds
    (a backend that reads ETags), a part is read alone. The first thing yielded is b'', once
    the backend has answered and before anything is checked: a caller can tell a source that
    cannot be read (raised before it) from an original that does not check out (raised later)."""
    whole = first == 0 and last >= file.file_size - 1
    if checked is not None and backend.read_etags and not whole and checked.etag(backend, file):
        meta: dict = {}
        chunks = backend.read(file.object_name, start=first, end=last, piece=piece, meta=meta)
        head = next(chunks, None)                   # S3 answers: its ETag is known
        if meta.get('etag') and meta['etag'] == checked.etag(backend, file):
            yield b''
            if head is not None:
                yield head
            yield from chunks
            return
        chunks.close()
    meta = {}
    chunks = backend.read(file.object_name, piece=piece, **({'meta': meta} if backend.read_etags else {}))
    head = next(chunks, None)
    actual = checked.bad(backend, file, meta.get('etag')) if checked is not None and backend.read_etags else None
    if actual:
        chunks.close()
        mismatch = ChecksumMismatch(f"sha256 {actual} does not match the catalog's {file.sha256}: not the "
                                    'original (found so moments ago)', file.object_name)
        mismatch.actual_sha256 = actual
        raise mismatch
    yield b''
    digest = hashlib.sha256()
    offset = 0
    held = None
    for chunk in itertools.chain([head] if head is not None else [], chunks):
        digest.update(chunk)
        start, offset = offset, offset + len(chunk)
        if offset > file.file_size:
            raise ChecksumMismatch(f'larger at the source than the catalog\'s {file.file_size:,} bytes',
                                   file.object_name)
        low, high = max(first, start), min(last + 1, offset)
        if low < high:
            if held is not None:
                yield held
            held = chunk if (low, high) == (start, offset) else bytes(chunk[low - start:high - start])
    try:
        _check_original(file, offset, digest.hexdigest())
    except ChecksumMismatch:
        if checked is not None and backend.read_etags:
            checked.add_bad(backend, file, meta.get('etag'), digest.hexdigest())
        raise
    if checked is not None and backend.read_etags:
        checked.add(backend, file, meta.get('etag'))
    if held is not None:
        yield held


# --- the versions ------------------------------------------------------------------------------------
#
# The version table: every version of a file the catalog can record, how its object name is
# formed from the original's, its content type, how it is made from the original (in memory),
# and how stored bytes of it are checked. Type 0 is the original everywhere.

# One more than the cores: a conversion also waits (for the GIL, for its bytes from S3 or the
# disk), and a core should not idle meanwhile (FLAC of 60 recordings on 2 cores, 2026-12-02:
# 4.91 s with 3 slots, 5.42 s with 2, the same CPU seconds).
CPU_SLOTS = threading.BoundedSemaphore(1 + (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                                            else os.cpu_count() or 2))


@dataclasses.dataclass(frozen=True)
class _Version:
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


def _same_name(name: str) -> str:
    return name


def _with_extension(extension: str) -> Callable[[str], str]:
    """'a/b/c.jpg' -> 'a/b/c.webp': the extension of the last part replaced (or added)."""
    def name(original: str) -> str:
        folder, _, base = original.rpartition('/')
        stem = base.rsplit('.', 1)[0] if '.' in base.lstrip('.') else base
        return f'{folder}/{stem}{extension}' if folder else f'{stem}{extension}'
    return name


def _with_suffix(suffix: str) -> Callable[[str], str]:
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
        _check_original_bytes(unpacked, file)
    except ChecksumMismatch as exc:
        raise ConversionError(f'gzip version does not decompress to the original: {exc}',
                              file.object_name) from None


# --- WebP ------------------------------------------------------------------------------------------

WEBP_QUALITY = 80


def _image_library():
    """Pillow, imported where a WebP is first made or checked: a run without pictures to
    convert does not pay for its import."""
    from PIL import Image
    return Image


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
    Image = _image_library()
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
    except Image.UnidentifiedImageError:
        raise ConversionError('not an image that can be read (cannot make a WebP of it)', file.object_name) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ConversionError(f'cannot make a WebP of it: {exc}', file.object_name) from None
    return image, keep


def _make_webp(original: bytes, file: CatalogFile, box: tuple[int, int]) -> bytes:
    """WebP of the original fitting in `box`, Pillow's encoder at quality 80."""
    image, keep = downscaled(original, file, box)
    out = io.BytesIO()
    try:
        image.save(out, 'WEBP', quality=WEBP_QUALITY, **keep)
    except (OSError, ValueError) as exc:
        raise ConversionError(f'cannot encode the WebP version: {exc}', file.object_name) from None
    webp = out.getvalue()
    _check_webp(webp, file, box, expected_size=image.size)
    return webp


def _check_webp(data: bytes, file: CatalogFile, box: tuple[int, int],
               expected_size: tuple[int, int] | None = None) -> None:
    """A WebP version decodes, at a size that fits the box. Just made (`expected_size` given),
    the encoder's own output is checked by its header alone: decoding it again would cost a
    tenth of the conversion, and `verify` decodes every stored one."""
    Image = _image_library()
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
#
# Why the check compares samples rather than leaning on libFLAC's MD5 alone: STREAMINFO's MD5 is
# what libFLAC computed of the samples it was handed, and a decoder with MD5 checking proves only
# that the stream decodes to those. The rule (SPEC "Versions": decodes to exactly the original's
# samples) needs the link to the original too, which is the MD5 of the original's samples
# (hashlib, about 7.5 ms for 60 s at 48 kHz) compared with STREAMINFO's. And it would not be
# cheaper: per 60 s of 16-bit mono (2026-12), libsndfile's decode is 29 ms, the sample-for-sample
# comparison in numpy under 2 ms, an MD5 of the decoded samples 7.5 ms; soundfile has no switch
# for libFLAC's MD5 checking, and the decode is the cost either way. So the decode is compared
# with the original's samples (a proof without a hash), and STREAMINFO's MD5 with the original's
# (so that `verify`, which has no original, can check the stored FLAC by its MD5).

FLAC_BLOCK_FRAMES = 1 << 16     # frames per block when widening 24-bit samples and decoding
FLAC_LEVEL = 5                  # libFLAC's default, as ffmpeg's -compression_level 5 (of 0 to 8)
PCM_DTYPES = {16: 'int16', 24: 'int32'}      # how libsndfile hands over samples of each width
PCM_SUBTYPES = {16: 'PCM_16', 24: 'PCM_24'}
WAVE_FORMAT_PCM, WAVE_FORMAT_EXTENSIBLE = 0x0001, 0xFFFE
PCM_GUID = b'\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71'   # KSDATAFORMAT_SUBTYPE_PCM
# RIFF INFO tags carried into the FLAC's Vorbis comment (those libsndfile can write).
INFO_TAGS = {b'INAM': 'title', b'IART': 'artist', b'ICMT': 'comment', b'ICRD': 'date', b'ICOP': 'copyright',
             b'ISFT': 'software', b'IPRD': 'album', b'IGNR': 'genre', b'ITRK': 'tracknumber'}


def _audio_libraries():
    """numpy and soundfile, imported where a FLAC is first made or checked: a run without
    recordings does not pay their tenth of a second of import."""
    import numpy
    import soundfile
    return numpy, soundfile


_PYDUB_IMPORT = threading.Lock()


def _pydub_library():
    """pydub's AudioSegment and CouldntDecodeError, imported where a recording that is neither a
    WAV nor one libsndfile reads is converted (and by ffmpeg_executable). Once, under a lock:
    the warning filters set around the import are the process's, not the thread's."""
    with _PYDUB_IMPORT:
        return _import_pydub()


@functools.cache
def _import_pydub():
    with warnings.catch_warnings():
        # pydub warns at import when ffmpeg is not on PATH (we point it at imageio-ffmpeg's binary)
        # and, on Python 3.11 and 3.12, that the audioop module it uses is deprecated.
        warnings.simplefilter('ignore', RuntimeWarning)
        warnings.simplefilter('ignore', DeprecationWarning)
        from pydub import AudioSegment
        from pydub.exceptions import CouldntDecodeError
    return AudioSegment, CouldntDecodeError


@functools.cache
def ffmpeg_executable() -> str:
    """ffmpeg from PATH, else the one in the imageio-ffmpeg wheel, for pydub (recordings that are
    not WAV and that libsndfile cannot read): nothing to install by hand."""
    found = shutil.which('ffmpeg')
    if not found:
        import imageio_ffmpeg
        found = imageio_ffmpeg.get_ffmpeg_exe()
    _pydub_library()[0].converter = found
    return found


@dataclasses.dataclass(frozen=True)
class _PcmAudio:
    """The samples of a recording: interleaved, signed little-endian, as in a WAV's data chunk."""
    channels: int
    sample_rate: int
    bits: int
    samples: memoryview
    tags: dict

    @property
    def frames(self) -> int:
        return len(self.samples) // (self.channels * self.bits // 8)


def _is_wav(data: bytes) -> bool:
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


def _read_wav(original: bytes, file: CatalogFile) -> _PcmAudio:
    """The PCM samples of a WAV, by its own RIFF walk (libsndfile's reader opens a truncated WAV
    without complaint), refusing what FLAC cannot hold losslessly and recordings cut short."""
    view = memoryview(original)
    if len(view) < 12 or not _is_wav(original):
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
    return _checked_pcm(channels, sample_rate, bits, block_align, view[body:], size, tags, file)


def _checked_pcm(channels: int, sample_rate: int, bits: int, block_align: int, data: memoryview, declared: int,
                tags: dict, file: CatalogFile) -> _PcmAudio:
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
    return _PcmAudio(channels, sample_rate, bits, data[:declared], tags)


LOSSY_SUBTYPES = {'MPEG_LAYER_I', 'MPEG_LAYER_II', 'MPEG_LAYER_III', 'VORBIS', 'OPUS', 'ALAW', 'ULAW', 'GSM610',
                  'IMA_ADPCM', 'MS_ADPCM', 'G721_32', 'G723_24', 'G723_40', 'VOX_ADPCM', 'NMS_ADPCM_16',
                  'NMS_ADPCM_24', 'NMS_ADPCM_32', 'DWVW_12', 'DWVW_16', 'DWVW_24', 'DPCM_8', 'DPCM_16'}


def _read_other_recording(original: bytes, file: CatalogFile) -> _PcmAudio:
    """A recording that is not a WAV, as 16- or 24-bit samples: through libsndfile where it
    reads the container (AIFF, W64, RF64, CAF, FLAC, …), else through pydub and ffmpeg (ALAC in
    MP4, for one), decoded to 24 bits (exact for 16- and 24-bit sources; pydub asks ffprobe
    what the recording holds). Lossy recordings are refused: a FLAC of one is no better."""
    np, soundfile = _audio_libraries()
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
        return _checked_pcm(channels, sample_rate, bits, channels * bits // 8, memoryview(data), len(data), {}, file)
    except soundfile.LibsndfileError:
        pass
    ffmpeg_executable()
    AudioSegment, CouldntDecodeError = _pydub_library()
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
    return _read_wav(wav.getvalue(), file)


@contextlib.contextmanager
def _memory_file(data: bytes | None = None):
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
    _, soundfile = _audio_libraries()
    if isinstance(target, int):
        return soundfile.SoundFile(target, *args, closefd=False, **kwargs)
    return soundfile.SoundFile(target, *args, **kwargs)


def _widen24(samples: memoryview, first: int, count: int, out) -> object:
    """3-byte samples [first, first + count) as int32 shifted left by 8 (as libsndfile gives
    24-bit samples): one numpy pass over 4-byte windows every 3 bytes; a bijection, so equal
    int32 values mean equal bytes."""
    np, _ = _audio_libraries()
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
    np, _ = _audio_libraries()
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


def _make_flac(original: bytes, file: CatalogFile) -> bytes:
    """Lossless FLAC of a recording, counted only once it decodes to exactly the original's
    samples and its STREAMINFO carries their count and MD5 (16- and 24-bit, 1 to 8 channels,
    the sample rates FLAC's streamable subset allows)."""
    np, soundfile = _audio_libraries()
    audio = _read_wav(original, file) if _is_wav(original) else _read_other_recording(original, file)
    with _memory_file() as (sink, read_back):
        try:
            with _sound_file(sink, 'w', audio.sample_rate, audio.channels, PCM_SUBTYPES[audio.bits], format='FLAC',
                             # libsndfile takes the level as a fraction of libFLAC's 0..8
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
        _decode_flac_checked(sink, info, audio.samples, file)
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
    with _memory_file(flac) as (source, _):
        _decode_flac_checked(source, info, None, file)


def _decode_flac_checked(source, info: dict, expected: memoryview | None, file: CatalogFile) -> None:
    """Decode block by block: against `expected` (the original's samples) sample for sample, or,
    without it, against the MD5 STREAMINFO records; and count the frames."""
    np, soundfile = _audio_libraries()
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
    return (lambda data, file: _make_webp(data, file, box)), (lambda data, file: _check_webp(data, file, box))


VERSIONS: dict[tuple[str, int], _Version] = {(v.group, v.type): v for v in [
    _Version('image', 0, ORIGINAL, None, _same_name, None, _check_original_bytes, exact=True),
    _Version('image', 1, 'WebP 1920×1440', 'image/webp', _with_extension('.webp'), *_webp(WEBP_LARGE)),
    _Version('image', 2, 'WebP 640×480', 'image/webp', _with_extension('.webp'), *_webp(WEBP_SMALL)),
    _Version('image', 10, 'gzip -9', 'application/gzip', _with_suffix('.gz'), make_gzip, check_gzip, exact=True),
    _Version('audio', 0, ORIGINAL, None, _same_name, None, _check_original_bytes, exact=True),
    _Version('audio', 1, 'FLAC', 'audio/flac', _with_extension('.flac'), _make_flac, check_flac),
    _Version('audio', 10, 'gzip -9', 'application/gzip', _with_suffix('.gz'), make_gzip, check_gzip, exact=True),
]}


def find_version(group: str, version_type: int) -> _Version:
    try:
        return VERSIONS[(group, version_type)]
    except KeyError:
        known = ', '.join(f'{t} ({v.label})' for (g, t), v in sorted(VERSIONS.items()) if g == group)
        raise ConfigError(f'no version type {version_type} for {group} files; known types: {known}') from None


ORIGINAL_CONTENT_TYPES = {'.jpg': 'image/jpeg', '.jpeg': 'image/jpeg', '.png': 'image/png', '.tif': 'image/tiff',
                          '.tiff': 'image/tiff', '.wav': 'audio/wav', '.flac': 'audio/flac', '.mp3': 'audio/mpeg'}


def content_type_of(version: _Version, object_name: str) -> str:
    if version.content_type:
        return version.content_type
    return ORIGINAL_CONTENT_TYPES.get(Path(object_name).suffix.lower(), 'application/octet-stream')


def _sound_copy_at(backend: Backend, file: CatalogFile, version: _Version) -> bool:
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
# Runs: options, progress, log file, interruption, faults, the frame of a batch run
# =================================================================================================

def human_bytes(n: float | None) -> str:
    if n is None:
        return '?'
    for unit in ('B', 'KB', 'MB', 'GB', 'TB'):
        if abs(n) < 1000 or unit == 'TB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000
    return f'{n:.1f} TB'


def _default_log_dir() -> Path:
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
        # before they are abandoned: half of stall_after, which _BatchFrame sets to min(10, the read
        # timeout), so a run stops within one read timeout of its decision.
        self.abandon_after = stall_after / 2 if abandon_after is None else abandon_after
        self.stopped_at: float | None = None
        self.last_data = time.monotonic()     # bytes last moved
        self.options = options
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.backends = backends               # for naming the one a fault belongs to
        self.log_dir = Path(options.log_dir) if options.log_dir else _default_log_dir()
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
        reason = _fatal_reason(exc, self.backends)
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


def _fatal_reason(exc: BaseException, backends: Iterable[Backend]) -> str | None:
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
              between: Callable[[bool], None] = lambda idle: None, waiting: Callable[[], int] = lambda: 0) -> None:
        """`between(idle)` runs after every round, with idle=True once nothing is in flight and
        nothing more will be fed; `waiting()` counts items waiting outside the pool (they hold
        memory, so they count against the number in flight). An error from the items, a handler
        or `between` stops the feeding; the work in flight is finished and handled first."""
        iterator = iter(items)
        exhausted = False
        try:
            while True:
                while not exhausted and not self.run.stopping and len(self.pending) + waiting() < self.jobs * 2:
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


# --- the frame of a batch run (copy, archive, restore, export) -----------------------------------

class _BackgroundCounts:
    """The selection's counts, on a connection of their own, while the run already transfers:
    on a batch of a million files the count takes seconds the first file need not wait for.
    Only the progress totals and the summary's notes depend on them."""

    def __init__(self, settings: Settings, selection: _Selection):
        self.result: dict = {}
        self.thread = threading.Thread(target=self._count, args=(settings, selection), name='counts', daemon=True)
        self.thread.start()

    def _count(self, settings: Settings, selection: _Selection) -> None:
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


class _BatchJob:
    """One kind of batch run: what to do with each file (on a worker thread) and with what that
    returns (on the run's thread). The frame, `_BatchFrame.carry_out`, does the rest."""

    command = ''

    def __init__(self, recorder, backends: tuple, locked: tuple):
        self.recorder = recorder        # CatalogWriter, or _ServiceRecorder through the service
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

    def waiting(self) -> int:
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


class _BatchFrame:
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

    def __enter__(self) -> '_BatchFrame':
        self.reader = connect_catalog(self.settings)
        self._stack.callback(self.reader.close)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def connection(self):
        conn = connect_catalog(self.settings)
        self._stack.callback(conn.close)
        return conn

    def open_pair(self, source_id: int, target_id: int, group: str, *, source_writing: bool = False,
                  group_writes: bool = False) -> tuple[Backend, Backend]:
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
            self.service = _ServiceClient.from_options(options, self.settings)
            source = _ServiceSource(source_row, self.service, group)
            if target_row.priority != ARCHIVE_PRIORITY:
                raise ConfigError(f'{target_row.describe()} has priority {target_row.priority}: through the service '
                                  f'(--via) the target must be an archive backend (priority {ARCHIVE_PRIORITY})')
        else:
            source = open_backend(source_row, self.settings, path=options.source_path, jobs=options.jobs,
                                  path_option='--source-path')
        target = open_backend(target_row, self.settings, path=options.target_path, jobs=options.jobs,
                              path_option='--target-path', group_writes=group_writes)
        source.check(writing=source_writing)
        target.check(writing=True)
        return source, target

    def recorder(self, group: _Group, backends: tuple, **timing):
        """Who records what the run did: the catalog (a CatalogWriter on a connection of its
        own), or, through the service, the service (the workstation may only read the catalog)."""
        if self.service:
            return _ServiceRecorder(self.service, self.connection(), group, backends, jobs=self.options.jobs)
        return CatalogWriter(self.connection(), group, backends, **timing)

    def carry_out(self, job: _BatchJob, selection: _Selection, title: str) -> RunReport:
        """Run the job over the selection, in a Run (log, progress, signals), and return its report."""
        report = RunReport(self.command, title)
        counts = _BackgroundCounts(self.settings, selection)
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
                    pipeline.drive(selection.files(self.reader), job.work, job.done, between=between,
                                   waiting=job.waiting)
                except KeyboardInterrupt:
                    report.stopped = ('stopped at once by a second interrupt (Ctrl-C or SIGTERM): the files in flight '
                                      'were abandoned (the next run removes their temporary files)')
                except Exception as exc:
                    run.stop_for(exc)
                finally:
                    self._end(job, run, counts)
        return report

    def _end(self, job: _BatchJob, run: Run, counts: _BackgroundCounts) -> None:
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
            report.stopped += f'; {_unrecorded_sentence(report, job.backends)}'


def _unrecorded_sentence(report: RunReport, backends: tuple) -> str:
    target = backends[-1] if backends else None
    if not report.unrecorded:
        return 'every file written was recorded'
    fate = ('the next run checks them and records them, or writes them again where the disk lost them'
            if target is not None and target.adopts_found_files else 'the next run writes them again')
    return f'{report.unrecorded} written files are not recorded: {fate}'


def explain_fault(exc: BaseException, report: RunReport, backends: tuple) -> str:
    """What stopped a run, the counts that matter, and what to do: one line for the summary."""
    written = _unrecorded_sentence(report, backends)
    if catalog_outage(exc):
        return (f'the catalog went away ({pg_error_line(exc)}) after {report.recorded} files were recorded; '
                f'{written}. Run the same command again once the database is back')
    if isinstance(exc, SyncFailed):
        return (f'{exc}: nothing written to it since its last successful sync is recorded; {written}. Check the disk '
                f'(`verify {exc.backend.row.storage_id}`), then run the same command again')
    if isinstance(exc, OSError):
        reason = _fatal_reason(exc, backends) or describe_exception(exc)
        return f'{reason} after {report.recorded} files were recorded; {written}'
    if isinstance(exc, psycopg2.Error):
        return (f'the catalog refused a change ({pg_error_line(exc)}) after {report.recorded} files were recorded; '
                f'{written}')
    if isinstance(exc, StorageError):
        return f'{exc}; {report.recorded} files were recorded; {written}'
    return (f'unexpected error: {type(exc).__name__}: {exc} (the log has the details); '
            f'{report.recorded} files were recorded; {written}')


@dataclasses.dataclass
class Plan:
    """A dry run: what a copy or archive would do, file by file, changing nothing. A context
    manager that holds the run's catalog connections until it is closed; iterating it streams
    (action, file) from the catalog; `notes` says what the counts tell."""
    command: str
    title: str
    notes: list
    frame: '_BatchFrame'
    selection: _Selection
    action: Callable[[CatalogFile], str]

    def __enter__(self) -> 'Plan':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.frame.__exit__(None, None, None)

    def __iter__(self) -> Iterator[tuple[str, CatalogFile]]:
        for file in self.selection.files(self.frame.reader):
            yield self.action(file), file


# =================================================================================================
# The model process
# =================================================================================================
#
# The model process for one file, in the steps every run and every service request takes: copy
# one version (transfer), archive the original (Archiver.archive_original), and release the
# original at ACTIVE against an archive copy proven at that moment (Archiver.release_original).
# Batch runs (copy_batch, archive_batch), the one-file API (copy_file, archive_file) and the
# service's per-file operations (make_version_in_place, delete_original) all call these.

def _transfer(file: CatalogFile, source: Backend, target: Backend, version: _Version,
             progress: Callable[[int], None] = lambda n: None, copy_tags: bool = False) -> tuple[str, int]:
    """Copy one file's version from source to target, checked and written atomically; record
    nothing (the caller does, once the target is synced). Returns ('copied' | 'made' | 'found',
    bytes): 'made' when the version was made from the source's original, 'found' when the
    target held a sound copy already, unrecorded (a killed run wrote it)."""
    object_name = version.object_name(file.object_name)
    target.tidy(object_name)
    content_type = content_type_of(version, object_name)
    if target.adopts_found_files and version.exact and _sound_copy_at(target, file, version):
        target.will_sync(object_name)      # the killed run may not have synced its rename
        progress(file.file_size)
        return 'found', file.file_size
    if file.source_type == version.type:
        tags = source.tags(object_name) if copy_tags else None
        if version.type == 0:
            into = _io_buffer() if target.writes_from_buffer else None
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


def _copy_check(file: CatalogFile, source: Backend, target: Backend, version: _Version, outcome: str) -> _FixityCheck:
    """The fixity log's row for a copy written (or found) at TARGET: it was checked on the way
    (the original's sha256 as it streamed, a version's own check), so the copy is proven now."""
    detail = {'copied': f'copied from backend {source.row.storage_id}',
              'made': f'made from the original at backend {source.row.storage_id}',
              'found': 'found written by an earlier run, read back and checked'}.get(outcome, outcome)
    return _FixityCheck(file.file_id, target.row.storage_id, version.type, 'ok', 'copy', detail)


@dataclasses.dataclass
class _ArchiveStep:
    """What archiving the original of one file did, for releasing it at ACTIVE."""
    file: CatalogFile
    original: bytes | None = None        # the checked original, where it was read (to repair the archive copy)
    version_bytes: bytes | None = None
    version_failed: str | None = None    # rule 7: the original is archived all the same, and kept at ACTIVE
    tags: dict | None = None
    archived_now: bool = False           # this run wrote (or found) the original at ARCHIVE: record it
    proven: bool = False                 # the archive copy was written in this run from the checked original
    repaired: str | None = None          # the recorded archive copy was damaged (why), and written again
    proof: str | None = None             # the release's check of the archive copy: 'ok', 'repaired',
                                         # or 'missing'/'corrupt' where it could not be written again
    kept: str | None = None              # why the original stays at ACTIVE whatever happens (too few copies)
    missing: bool = False                # the original is no longer at ACTIVE (an earlier run was cut off)
    version_present: bool = False        # ... and the replacement version is there, sound
    released_before: bool = False        # through the service: another run had released it already

    @property
    def archive_holds(self) -> bool:
        """Whether ARCHIVE holds (or now records) the original, to be proven before the release."""
        return self.archived_now or self.file.target_type == 0


class _Archiver:
    """The model process for one file, in its two halves: archive the original (read it from
    ACTIVE once, check it, write it to ARCHIVE, make the version in memory), and, once the
    archive's row is committed and enough sound copies are recorded elsewhere, release the
    original at ACTIVE: prove the archive copy it relies on (rule 3), then put the version in
    its place, or delete it."""

    def __init__(self, group: str, active: Backend, archive: Backend | None, version: _Version | None,
                 progress: Callable[[int], None] = lambda n: None):
        self.active, self.archive, self.version = active, archive, version
        self.original = VERSIONS[(group, 0)]
        self.progress = progress

    def archive_original(self, file: CatalogFile, can_release: bool = True) -> _ArchiveStep:
        """Read the original from ACTIVE once and check it; write it to ARCHIVE unless it is
        recorded there (and not found damaged by its last check), or found there sound; make
        the version. Nothing at ACTIVE changes here. Where the original cannot be released in
        this run (`can_release` False: too few copies would remain), nothing is read but what
        ARCHIVE lacks, and no version is made. A version that cannot be made fails only the
        release (rule 7)."""
        step = _ArchiveStep(file)
        if file.target_type not in (None, 0):
            raise FileFailure(f'{self.archive.describe()} holds version {file.target_type} of this file, so its '
                              'original cannot be archived there', file.object_name)
        recorded = file.target_type == 0 and not file.target_damaged
        if not can_release:
            step.kept = 'too few copies'
        if recorded and (not can_release or self.version is None):
            self.progress(file.file_size)      # proven at the release, if there is one: nothing to read now
            return step
        self.archive.tidy(file.object_name)
        try:
            original = read_original(self.active, file, self.progress)
        except SourceMissing as exc:
            return self.original_missing(step, exc)
        if not recorded:
            if file.target_damaged:
                step.repaired = 'its last check found it missing or corrupt'
            if self.archive.adopts_found_files and not file.target_damaged and \
                    _sound_copy_at(self.archive, file, self.original):
                self.archive.will_sync(file.object_name)    # found sound: proven again at the release
            else:
                self.archive.write(file.object_name, [original], file.file_size,
                                   content_type_of(self.original, file.object_name), file.sha256)
                crash_point('after-archive-write')
                step.proven = True
            step.archived_now = True
        if can_release and self.version is not None:
            step.original = original
            self.make_version(step, original)
        return step

    def original_missing(self, step: _ArchiveStep, exc: SourceMissing) -> _ArchiveStep:
        """The original is not at ACTIVE, though the catalog says it is: an earlier run was cut
        off after removing it. Its release only fixes the row, if the version is in place."""
        step.missing = True
        if self.version is not None:
            step.version_present = _sound_copy_at(self.active, step.file, self.version)
        return step

    def make_version(self, step: _ArchiveStep, original: bytes) -> None:
        try:
            step.version_bytes = self.version.make(original, step.file)
        except ConversionError as exc:
            step.version_failed = str(exc)
            return
        step.tags = self.active.tags(step.file.object_name)

    def prove_archive_copy(self, step: _ArchiveStep) -> None:
        """Rule 3: the archive copy the release relies on, proven now. Written in this run from
        the checked original, it is; else it is read back from ARCHIVE and hashed. A copy that is
        missing, of the wrong size or hash is written again, atomically and durably, from the
        checked original (read from ACTIVE if this run has not read it yet) and named
        `repaired`; where that cannot be done, FileFailure, and the original stays."""
        file = step.file
        if step.proven:
            return
        try:
            for _ in CheckedStream(self.archive.read(file.object_name), file):
                pass
            step.proven, step.proof = True, 'ok'
            return
        except SourceMissing:
            damage, step.proof = f'missing on {self.archive.describe()}', 'missing'
        except ChecksumMismatch as exc:
            damage, step.proof = f'damaged on {self.archive.describe()} ({exc})', 'corrupt'
        step.repaired = damage
        try:
            original = step.original if step.original is not None else read_original(self.active, file)
            self.archive.write(file.object_name, [original], file.file_size,
                               content_type_of(self.original, file.object_name), file.sha256)
            self.archive.sync()
        except (SourceMissing, ChecksumMismatch) as exc:
            raise FileFailure(f'the archive copy is {damage}, and the original cannot be read to write it again '
                              f'({exc}): nothing released', file.object_name) from None
        except OSError as exc:
            raise FileFailure(f'the archive copy is {damage}, and it cannot be written again '
                              f'({describe_exception(exc)}): the original stays online', file.object_name) from None
        step.proven, step.proof = True, 'repaired'

    def release_original(self, step: _ArchiveStep, commit: Callable[[], None] | None = None) -> str:
        """With the original's copies recorded elsewhere: prove the archive copy (rule 3), then
        put the version in its place at ACTIVE (written before the original is deleted), or
        delete it. Returns 'replaced' or 'deleted'. A batch run records the change after this
        returns; the service passes `commit`, which records a replacement between the version's
        write and the original's delete (SPEC's order for a request)."""
        file = step.file
        if self.archive is not None and step.archive_holds:
            self.prove_archive_copy(step)
        if step.missing:
            # An earlier run was cut off after removing the original: only the row is left to fix.
            if self.version is None or step.version_present:
                if commit:
                    commit()
                return 'deleted' if self.version is None else 'replaced'
            raise FileFailure(f'the original is missing at {self.active.describe()} and its {self.version.label} '
                              'version is not there either; its original is archived: copy it back, or run '
                              '`verify --fix`', file.object_name)
        if self.version is not None:
            version_name = self.version.object_name(file.object_name)
            self.active.write(version_name, [step.version_bytes], len(step.version_bytes),
                              content_type_of(self.version, version_name), tags=step.tags)
            crash_point('after-version-write')
            if commit:
                commit()
            if version_name != file.object_name:
                self.active.delete(file.object_name)
            crash_point('after-original-delete')
            return 'replaced'
        self.active.delete(file.object_name)
        crash_point('after-original-delete')
        if commit:
            commit()
        return 'deleted'


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

def _read_token_file(path: str) -> str:
    return Path(path).expanduser().read_text(encoding='utf-8').strip()


def _token_from_env(given: str | None = None) -> str:
    """The bearer token: given, else MITWELTEN_TOKEN, else the file MITWELTEN_TOKEN_FILE names."""
    token = (given or os.environ.get('MITWELTEN_TOKEN') or '').strip()
    path = os.environ.get('MITWELTEN_TOKEN_FILE')
    if not token and path:
        try:
            token = _read_token_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f'MITWELTEN_TOKEN_FILE={path}: cannot read the token: '
                              f'{getattr(exc, "strerror", None) or exc}') from None
    if not token:
        raise ConfigError('--via needs a token: set MITWELTEN_TOKEN, or MITWELTEN_TOKEN_FILE to a file holding it')
    return token


class _ServiceClient:
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
    def from_options(cls, options: RunOptions, settings: Settings) -> '_ServiceClient':
        return cls(options.via, _token_from_env(options.token), settings, options.jobs)

    def describe(self) -> str:
        return f'the storage service at {self.base}'

    # Answers of the service (5xx) that say what went wrong with one file, not that it is down.
    FILE_PROBLEMS = {'original-missing', 'original-corrupt', 's3-error'}

    def request(self, method: str, path: str, *, body: dict | None = None, headers: dict | None = None,
                stream: bool = False, token: bool = True, slow: bool = False,
                content: Callable[[], Iterable[bytes]] | None = None):
        """The answer to a request, after up to `attempts` tries with backoff for answers that
        did not come (connection refused or dropped, timeouts, 502/503/504 without a problem of
        one file) and while the file is busy with another request. A problem answer raises the
        refusal it stands for; a service still down raises Unreachable. A refused token is
        read again from MITWELTEN_TOKEN_FILE once (a refresher may have renewed it). `slow`:
        a request that makes a version, given three times the read timeout. `content`: a body
        streamed from the chunks it gives, called anew for each try."""
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
                time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + _random_fraction()))
            attempt += 1
            if token:
                headers['Authorization'] = f'Bearer {self.token}'
            try:
                response = self.http.request(method, self.base + path, body=content() if content else data,
                                             headers=headers, timeout=timeout, preload_content=not stream,
                                             redirect=False)
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
            token = _read_token_file(path)
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
        errors = {**SERVICE_PROBLEMS, 's3-error': FileFailure, 'wrong-original': ChecksumMismatch}
        if kind in errors:
            raise errors[kind](detail)
        raise StorageError(f'{self.describe()} answered {status}: {detail}')

    def check(self) -> None:
        """The service answers, takes the token, and the token carries both roles a --via run
        needs (it reads originals, and records what it wrote): GET /me, before a run does
        anything. ConfigError naming the role that is missing."""
        try:
            response = self.request('GET', '/me', headers={'Accept': 'application/json'})
            me = json.loads(response.data)
            if not isinstance(me, dict) or 'can_read' not in me:
                raise StorageError(f'GET /me answered {str(me)[:100]}')
        except Unreachable as exc:
            raise ConfigError(f'cannot reach {self.describe()}: {exc}') from None
        except TokenRefused as exc:
            raise ConfigError(str(exc)) from None
        except (StorageError, ValueError) as exc:
            raise ConfigError(f'{self.describe()} does not answer as the storage service does ({exc}): is --via '
                              "the service's URL?") from None
        missing = [f"the {what} role{f' {name!r}' if isinstance(name, str) else ''}"
                   for what, allowed, name in (('read', me.get('can_read'), me.get('read_role')),
                                               ('write', me.get('can_write'), me.get('write_role')))
                   if allowed is not True]
        if missing:
            raise ConfigError(f"the token (subject {me.get('subject')!r}) lacks {' and '.join(missing)} at "
                              f'{self.describe()}: a --via run reads originals and records what it wrote '
                              'through the service, so it needs both; get a token with them')

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
                    found = re.fullmatch(r'sha-256=:([A-Za-z0-9+/=]+):', digest)
                    actual = base64.b64decode(found.group(1)).hex() if found else digest
                    raise ChecksumMismatch(f"sha256 {actual} (the service's Repr-Digest) does not match the "
                                           f"catalog's {file.sha256}: not the original", file.object_name)
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

    def record_archived(self, group: str, file: CatalogFile, storage_id: int, *, outcome: str = 'ok',
                        event: str = 'archive') -> str:
        body = {'storage_id': storage_id, 'sha256': file.sha256}
        if (outcome, event) != ('ok', 'archive'):
            body.update(outcome=outcome, event=event)
        response = self.request('POST', self.path(group, file.file_id, 'archive'), body=body)
        return 'created' if response.status == 201 else 'exists'

    def make_version_in_place(self, group: str, file: CatalogFile, version_type: int) -> dict:
        return json.loads(self.request('POST', self.path(group, file.file_id, 'scaled'),
                                       body={'type': version_type}, slow=True).data)

    def delete_original(self, group: str, file: CatalogFile) -> None:
        self.request('DELETE', self.path(group, file.file_id, 'original'), headers={'If-Match': f'"{file.sha256}"'},
                     slow=True)

    def restore_original(self, group: str, file: CatalogFile, chunks: Callable[[], Iterable[bytes]]) -> str:
        """Send the original (`chunks()`, checked as it is read, e.g. a CheckedStream) with PUT
        …/original, streamed with a Content-Length; 'restored', or 'exists' when the service had
        it already. A try that got no answer sends it again from the start."""
        response = self.request('PUT', self.path(group, file.file_id, 'original'), content=chunks, slow=True,
                                headers={'Content-Length': str(file.file_size),
                                         'Content-Type': 'application/octet-stream'})
        response.release_conn()
        return 'restored' if response.status == 201 else 'exists'


def _random_fraction() -> float:
    return int.from_bytes(os.urandom(2), 'big') / 65536


class _ServiceSource(Backend):
    """The active S3 backend, as the storage service presents it: originals only, read with
    GET …/original. Nothing is written through it; the service changes ACTIVE itself."""

    kind = 's3'

    def __init__(self, backend_row: BackendRow, client: _ServiceClient, group: str):
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


class _ServiceRecorder(_Recorder):
    """Records what a run wrote through the service (POST …/archive, one request per file, as
    many at once as --jobs), after syncing the disk (rule 1). What the service changes at ACTIVE
    it records itself, so type changes and removals handed here are nothing more to do."""

    def __init__(self, client: _ServiceClient, conn, group: _Group, backends: tuple, jobs: int = DEFAULT_JOBS,
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
        # The workstation may only read the catalog: its checks are not logged through the
        # service (the service logs the checks it makes itself).
        self.checks.clear()
        self.recorded += len(recorded) - len(refused)
        if error is not None:
            raise error
        return refused



class _ServiceArchiver(_Archiver):
    """Archiving through the service: the original is read from it and archived here; the
    version is made by the service next to the data, which then replaces the original (or
    deletes it) and records that itself, in the same crash-safe order. The workstation proves
    its disk copy before it asks (rule 3)."""

    def __init__(self, client: _ServiceClient, group: str, active: Backend, archive: Backend,
                 version: _Version | None):
        super().__init__(group, active, archive, version)
        self.client = client
        self.group = group

    def archive_original(self, file: CatalogFile, can_release: bool = True) -> _ArchiveStep:
        if file.target_type == 0 and not file.target_damaged:    # archived already: proven at the release
            self.progress(file.file_size)
            return _ArchiveStep(file, kept=None if can_release else 'too few copies')
        return super().archive_original(file, can_release)

    def original_missing(self, step: _ArchiveStep, exc: SourceMissing) -> _ArchiveStep:
        raise exc       # the service records what it changes as it changes it: no row to fix here

    def make_version(self, step: _ArchiveStep, original: bytes) -> None:
        pass                                     # the service makes it, next to the data

    def release_original(self, step: _ArchiveStep) -> str:
        if step.archive_holds:
            self.prove_archive_copy(step)
            if step.proof in SOUND_OUTCOMES:      # the workstation may only read the catalog: the service logs it
                self.client.record_archived(self.group, step.file, self.archive.row.storage_id, outcome=step.proof,
                                            event='release')
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


# =================================================================================================
# Operations
# =================================================================================================
#
# Each operation returns what it did (a report or a small dataclass) and prints nothing.

# --- init-db -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _SchemaReady:
    schema: str
    where: str
    tables: int


def init_db(settings: Settings) -> _SchemaReady:
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
    return _SchemaReady(settings.schema, _describe_dsn(settings.dsn), tables)


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


def _check_priority(kind: str, priority: int) -> None:
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


def _overlapping_backend(conn, root: Path) -> str | None:
    """Why a disk at `root` would overlap a local backend: the same folder, a folder inside
    another backend's root (its archive/ folder, say), or a folder holding one. Paths are
    compared normalised, links resolved; a disk's dot-file found above `root` counts too (a
    disk of another catalog, or one mounted elsewhere than its recorded path)."""
    resolved = _normal_path(root)
    for row in fetch_backends(conn):
        if row.type != 'local':
            continue
        other = _normal_path(row.url_prefix)
        if other == resolved or _same_folder(other, root):
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


def _write_text_file(path: Path, text: str) -> None:
    """A small text file written atomically (rule 2)."""
    with _atomic_file(path) as tmp:
        tmp.write_text(text, encoding='utf-8')


def create_local_backend(settings: Settings, path: str, priority: int, label: str) -> BackendRow:
    """Register the folder at `path` (an archive disk's mount point) as a local backend: the
    catalog row, the dot-file, README.md and archive/. Refuses, leaving nothing behind, a
    missing folder, one that is already a backend, a path already registered, one inside
    another local backend's root or holding one, and a priority below the archive tier."""
    _check_priority('local', priority)
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
        overlap = _overlapping_backend(conn, root)
        if overlap:
            raise ConfigError(overlap)
        backend_row = _insert_backend(conn, str(root), 'local', priority, label)
        dot_lines = [f'storage_id={backend_row.storage_id}', f'created_at={backend_row.created_at}',
                     'storage_dir=archive', f'url_prefix={root}', f'device_label={label}']
        try:
            _write_text_file(root / DOT_FILE, '\n'.join(dot_lines) + '\n')
            created.append(root / DOT_FILE)
            _write_text_file(root / 'README.md', DISK_README.format(
                storage_id=backend_row.storage_id, created_at=backend_row.created_at.strftime('%Y-%m-%d %H:%M:%S %Z'),
                label=label, priority=priority, tier=PRIORITY_TIERS.get(priority, 'custom tier'), root=root))
            created.append(root / 'README.md')
            os.mkdir(root / 'archive')
            created.append(root / 'archive')
            _fsync_dir(root)
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
    _check_priority('s3', priority)
    where = S3Location.parse(url)
    _check_bucket(_s3_client(where, settings), where, f'new backend {where.url}')
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

def _version_counts(conn) -> dict[int, list[dict]]:
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
        counts = _version_counts(conn)
    finally:
        if own:
            conn.close()
    listing = []
    for backend_row in backend_rows:
        entry = {'storage_id': backend_row.storage_id, 'type': backend_row.type, 'url_prefix': backend_row.url_prefix,
                 'priority': backend_row.priority, 'notes': backend_row.notes,
                 'created_at': backend_row.created_at.isoformat(), 'versions': counts.get(backend_row.storage_id, [])}
        if backend_row.type == 'local':
            entry.update(_disk_status(backend_row))
        listing.append(entry)
    return listing


def _disk_status(backend_row: BackendRow) -> dict:
    """Whether a disk is online (its dot-file found, matching, at the recorded path or under the
    mount roots), where it is mounted, and whether that is elsewhere than recorded."""
    mounted_at = _disk_whereabouts(backend_row)
    # Elsewhere than recorded: compared normalised, so that '/media/archive07/' as stored by the
    # earlier script is where '/media/archive07' is.
    return {'online': mounted_at is not None, 'mounted_at': str(mounted_at) if mounted_at else None,
            'moved': mounted_at is not None and not _same_folder(mounted_at, backend_row.url_prefix)}


DEFAULT_CHECK_EVERY_DAYS = 365.0


def due_checks(settings: Settings, every_days: float = DEFAULT_CHECK_EVERY_DAYS, *, conn=None) -> list[dict]:
    """`info --due`: per backend, its copies (of both groups) and how many are due a check: last
    checked more than `every_days` ago, or never (no check logged and no time of writing known);
    how many are damaged (their last check found them missing or corrupt: rule 8, they count for
    nothing until written again); the oldest and newest last check; and `checked_in_full`: the
    oldest last check among its copies when every copy has one, i.e. the moment since which every
    copy on the backend has been proven at least once (None while any copy was never checked).
    A copy's last check is its newest row in the fixity log since it was written, else its
    writing. One grouped query over both storage tables."""
    own = conn is None
    conn = conn or connect_catalog(settings)
    try:
        backend_rows = fetch_backends(conn)
        has_log = _has_fixity_log(conn)
        parts = []
        for group in GROUPS.values():
            parts.append(f'SELECT s.storage_id, {_last_checked_sql("s", "c")} AS last_checked, '
                         f'{_damaged_sql("c")} AS damaged FROM {group.storage_table} s '
                         f'{_last_check_join(group, "s", "c", has_log)}')
        union = '\nUNION ALL\n'.join(parts)
        with conn.cursor() as cur:
            cur.execute(f"SELECT storage_id, count(*), count(*) FILTER (WHERE last_checked IS NULL OR last_checked < "
                        f"now() - interval '1 day' * %s), count(*) FILTER (WHERE last_checked IS NULL), "
                        f'count(*) FILTER (WHERE damaged), min(last_checked), max(last_checked) '
                        f'FROM ({union}) AS copies GROUP BY storage_id', (float(every_days),))
            rows = {row[0]: row[1:] for row in cur.fetchall()}
        conn.commit()
    finally:
        if own:
            conn.close()
    listing = []
    for backend_row in backend_rows:
        copies, due, never, damaged, oldest, newest = rows.get(backend_row.storage_id, (0, 0, 0, 0, None, None))
        entry = {'storage_id': backend_row.storage_id, 'type': backend_row.type, 'url_prefix': backend_row.url_prefix,
                 'priority': backend_row.priority, 'notes': backend_row.notes, 'every_days': every_days,
                 'copies': copies, 'due': due, 'never_checked': never, 'damaged': damaged,
                 'oldest_check': oldest.isoformat() if oldest else None,
                 'newest_check': newest.isoformat() if newest else None,
                 'checked_in_full': oldest.isoformat() if oldest and not never else None}
        if backend_row.type == 'local':
            entry.update(_disk_status(backend_row))
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
    rows: list            # its storage rows (_StorageRow), the online tiers first
    outcome: str = ''

    @property
    def active(self) -> _StorageRow | None:
        return _active_version(self.rows)

    def as_dict(self) -> dict:
        def row_dict(h: _StorageRow) -> dict:
            version = VERSIONS.get((self.group, h.type))
            return {'storage_id': h.backend.storage_id, 'type': h.type,
                    'version': version.label if version else 'unknown', 'backend_type': h.backend.type,
                    'priority': h.backend.priority,
                    'object_name': version.object_name(self.file.object_name) if version else None}
        return {'group': self.group, 'file_id': self.file.file_id, 'object_name': self.file.object_name,
                'file_size': self.file.file_size, 'sha256': self.file.sha256, 'outcome': self.outcome,
                'active': row_dict(self.active) if self.active else None,
                'rows': [row_dict(h) for h in self.rows]}


def _active_version(held: list[_StorageRow]) -> _StorageRow | None:
    """The active copy: the one held by the S3 backend with the lowest priority number that
    records the file (held_versions lists them by priority)."""
    return next((h for h in held if h.backend.type == 's3'), None)


def file_state(conn, group: str, file_id: int, outcome: str = '') -> FileState:
    file = fetch_file(conn, group, file_id)
    held = _storage_rows(conn, group, file_id)
    conn.commit()
    return FileState(group, file, held, outcome)


def _fetch_backend_or_404(conn, storage_id: int) -> BackendRow:
    try:
        return fetch_backend(conn, storage_id)
    except ConfigError as exc:
        raise NotFound(str(exc), 'backend') from None


def _copies_elsewhere(conn, group: str, file_id: int, storage_id: int) -> int:
    """The sound originals (rule 8) recorded on backends other than `storage_id`, counted inside
    the transaction that holds the file's row locks."""
    return sound_originals_elsewhere(conn, GROUPS[group], [file_id], storage_id,
                                     end_transaction=False).get(file_id, 0)


def active_original(conn, backends: BackendCache, group: str, file_id: int) -> tuple[CatalogFile, Backend]:
    """The file and the backend of its active copy (the S3 backend with the lowest priority
    number that records it: the one the writes act on too), which must be the original, or gzip
    of it (type 10: the backend is then a _GzipHeldOriginal, which reads it decompressed).
    NotFound('file') when the catalog does not know the file, NotFound('original') when the
    active tier holds a version instead, or no online tier records the file."""
    file = fetch_file(conn, group, file_id)
    held = _storage_rows(conn, group, file_id)
    conn.commit()
    active = _active_version(held)
    if active is not None and active.type == 10:        # gzip is the original: served decompressed
        return file, _GzipHeldOriginal(backends.get(active.backend), file)
    if active is None or active.type != 0:
        raise NotFound(f'the original of {group} file {file_id} is no longer online (it is archived; the online '
                       'tier holds a version of it, if any)', 'original')
    return file, backends.get(active.backend)


def record_archived(conn, group: str, file_id: int, storage_id: int, sha256_hex: str, *, outcome: str = 'ok',
                    event: str = 'archive', agent: str | None = None) -> FileState:
    """Record that archive backend `storage_id` holds the checked original of the file (a
    workstation wrote and checked it there, or proved it before a release: `event` 'release',
    `outcome` 'repaired' where it wrote it again), and log that check in the fixity log.
    Deletes nothing. Outcome 'created', or 'exists' when it was recorded already. Refuses an
    unknown file or backend (NotFound), a sha256 that is not the catalog's or a backend that is
    not an archive (InvalidArchive), and a backend that records another version of the file
    (VersionConflict)."""
    file = fetch_file(conn, group, file_id)
    backend_row = _fetch_backend_or_404(conn, storage_id)
    held = _storage_rows(conn, group, file_id, lock=True)
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
        if outcome not in SOUND_OUTCOMES or event not in ('archive', 'release'):
            raise InvalidArchive(f"a check recorded with an archive is 'ok' or 'repaired', at 'archive' or 'release', "
                                 f'not {outcome!r} at {event!r}')
        if there is None:
            with conn.cursor() as cur:
                cur.execute(sql.SQL('INSERT INTO {} (file_id, storage_id, type, created_at, updated_at) '
                                    'VALUES (%s, %s, 0, now(), now())').format(
                    sql.Identifier(GROUPS[group].storage_table)), (file_id, storage_id))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    _log_check_now(conn, group, _FixityCheck(file_id, storage_id, 0, outcome, event, 'checked by the workstation'),
                   agent)
    return file_state(conn, group, file_id, 'exists' if there is not None else 'created')


def _log_check_now(conn, group: str, check: _FixityCheck, agent: str | None = None) -> None:
    """One check appended to the fixity log at once (a per-file operation is one file), where
    the log is there and this role may append to it."""
    if _has_fixity_log(conn) and _may_append_fixity(conn):
        with conn.cursor() as cur:
            _append_fixity(cur, GROUPS[group], [check], agent or fixity_agent())
        conn.commit()


def _locked_active(conn, group: str, file_id: int) -> tuple[CatalogFile, list[_StorageRow], _StorageRow]:
    file = fetch_file(conn, group, file_id)
    held = _storage_rows(conn, group, file_id, lock=True)
    active = _active_version(held)
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
        copies = _copies_elsewhere(conn, group, file_id, active.backend.storage_id)
        if active.type == version.type:
            # Done before. A request cut off between its commit and the delete left the
            # original beside its version: it goes now, if its copies elsewhere still stand.
            if (version_name != file.object_name and copies >= min_copies
                    and backend.size(file.object_name) is not None and _sound_copy_at(backend, file, version)):
                backend.delete(file.object_name)
            conn.commit()
            return file_state(conn, group, file_id, 'already replaced')
        if active.type != 0:
            raise VersionConflict(f'{active.backend.describe()} holds version {active.type} of {group} file {file_id}, '
                                  'not its original: no other version can be made there')
        if copies < min_copies:
            raise TooFewCopies(f'{copies} sound originals of {group} file {file_id} are recorded on other backends; '
                               f'{min_copies} are needed before the original leaves {active.backend.describe()}')
        # The model process's release, as a batch run does it, with the row committed between
        # the version's write and the original's delete (a request is answered only once its
        # row is committed; a request cut off after the commit and repeated deletes the
        # original left beside the version, above).
        archiver = _Archiver(group, backend, None, version)
        step = _ArchiveStep(file)
        try:
            step.original = read_original(backend, file)
        except SourceMissing as exc:
            # The original is gone from the active tier though the row says it is there (a
            # run cut off after its delete, or a hand): the replacement is finished if the
            # version is there and sound.
            archiver.original_missing(step, exc)
            if not step.version_present:
                raise NotFound(f'the original of {group} file {file_id} is missing at {backend.describe()} and its '
                               f'{version.label} version is not there either; it is archived: copy it back, or run '
                               f'`verify {active.backend.storage_id} --fix`', 'original') from None
        else:
            archiver.make_version(step, step.original)
            if step.version_failed:
                raise ConversionError(step.version_failed, file.object_name)

        def commit() -> None:
            _set_type(conn, group, file_id, active.backend.storage_id, version.type)
            conn.commit()
            crash_point('after-commit')
        archiver.release_original(step, commit=commit)
    except BaseException:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        raise
    return file_state(conn, group, file_id, 'replaced')


def delete_original(conn, backends: BackendCache, group: str, file_id: int, sha256_hex: str,
                    min_copies: int = 1) -> FileState:
    """Delete the original from the active tier and its row, under the file's row locks:
    the object deleted, then the row's removal committed (a request cut off in between and
    repeated finds the object gone and removes the row). `sha256_hex` must be the catalog's
    (If-Match: OriginalChanged otherwise). NotFound('original') when it is gone already;
    TooFewCopies (rule 3) when fewer than min_copies sound originals are recorded elsewhere."""
    file, held, active = _locked_active(conn, group, file_id)
    try:
        if active.type != 0:
            raise NotFound(f'the original of {group} file {file_id} is gone from the online tiers already '
                           f'({active.backend.describe()} holds version {active.type})', 'original')
        if (sha256_hex or '').strip().lower() != file.sha256:
            raise OriginalChanged(f"{sha256_hex!r} is not the sha256 of {group} file {file_id}'s original")
        copies = _copies_elsewhere(conn, group, file_id, active.backend.storage_id)
        if copies < min_copies:
            raise TooFewCopies(f'{copies} sound originals of {group} file {file_id} are recorded on other backends; '
                               f'{min_copies} are needed before the original leaves {active.backend.describe()}')
        def commit() -> None:
            _set_type(conn, group, file_id, active.backend.storage_id, None)
            conn.commit()
        _Archiver(group, backends.get(active.backend), None, None).release_original(_ArchiveStep(file), commit=commit)
    except BaseException:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        raise
    return file_state(conn, group, file_id, 'deleted')


def _versions_left_removed(backend: Backend, file: CatalogFile, group: str) -> list[str]:
    """Remove the versions of the file left beside its original at the backend (a restore cut
    off after its commit), each only if it is a sound copy of that version of this very file
    (never another file that happens to have the name). Returns the names removed."""
    removed = []
    for (g, version_type), version in VERSIONS.items():
        name = version.object_name(file.object_name)
        if g != group or version_type == 0 or name == file.object_name:
            continue
        if backend.size(name) is not None and _sound_copy_at(backend, file, version):
            backend.delete(name)
            crash_point('after-version-delete')
            removed.append(name)
    return removed


def _sound_original_at(backend: Backend, file: CatalogFile) -> bool:
    """Whether the backend's original of the file reads back whole and hashes to the catalog's."""
    try:
        read_original(backend, file)
    except (ChecksumMismatch, SourceMissing):
        return False
    return True


def _log_restored(conn, group: str, file_id: int, storage_id: int, detail: str, agent: str | None = None) -> None:
    """The fixity row of an original restored at a backend (appended once its version object is
    gone: what tells a later restore that this one finished)."""
    if _has_fixity_log(conn):
        with conn.cursor() as cur:
            _append_fixity(cur, GROUPS[group], [_FixityCheck(file_id, storage_id, 0, 'ok', 'restore', detail)],
                          agent or fixity_agent())
        conn.commit()


def restore_original(conn, backends: BackendCache, group: str, file_id: int, chunks: Iterable[bytes],
                     length: int, agent: str | None = None) -> FileState:
    """Restore the file's original at the active tier from `chunks` (`length` bytes, offered by
    a workstation that read it from its disk): under the file's row locks, in the order of
    `restore`: the bytes hashed while they stream and stored only if they are the catalog's
    (S3 is given the sha256 to check as well), the row made type 0 (a new row where the
    original had been deleted) and committed, then the version object deleted. Outcome
    'restored', or 'exists' when the original is there already and reads back sound (a version
    left beside it by a request cut off after its commit is removed then; `chunks` are not
    read; an original there that is not sound is written again from `chunks`). Refuses, storing
    nothing: TooLarge (more bytes than the catalog's size, before reading), ChecksumMismatch
    (not the original's bytes), NotFound (no such file, or no S3 backend to restore to)."""
    file = fetch_file(conn, group, file_id)
    conn.commit()
    if length > file.file_size:
        raise TooLarge(f'{length:,} bytes offered, but the original of {group} file {file_id} has {file.file_size:,}')
    if length < file.file_size:
        raise ChecksumMismatch(f'{length:,} bytes offered, the catalog says {file.file_size:,}: not the original',
                               file.object_name)
    held = _storage_rows(conn, group, file_id, lock=True)
    try:
        active = _active_version(held)
        if active is not None:
            backend_row, old_type = active.backend, active.type
        else:                   # released with --delete-original: back to the active tier
            backend_row = min((row for row in _fetch_backends_in(conn) if row.type == 's3'),
                              key=lambda row: (row.priority, row.storage_id), default=None)
            if backend_row is None:
                raise NotFound('the catalog has no S3 backend to restore the original to', 'backend')
            old_type = None
        backend = backends.get(backend_row)
        name = file.object_name
        if old_type == 0 and backend.size(name) == file.file_size and _sound_original_at(backend, file):
            removed = _versions_left_removed(backend, file, group)
            conn.commit()
            if removed:
                _log_restored(conn, group, file_id, backend_row.storage_id,
                              f'restored earlier; {", ".join(removed)} left beside it removed', agent)
            return file_state(conn, group, file_id, 'exists')
        original = VERSIONS[(group, 0)]
        backend.write(name, CheckedStream(chunks, file), file.file_size, content_type_of(original, name), file.sha256)
        crash_point('after-restore-write')
        table = sql.Identifier(GROUPS[group].storage_table)
        if old_type is None:
            with conn.cursor() as cur:
                cur.execute(sql.SQL('INSERT INTO {} (file_id, storage_id, type, created_at, updated_at) '
                                    'VALUES (%s, %s, 0, now(), now())').format(table),
                            (file_id, backend_row.storage_id))
        elif old_type != 0:
            _set_type(conn, group, file_id, backend_row.storage_id, 0)
        conn.commit()
        crash_point('after-restore-commit')
    except BaseException:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        raise
    if old_type not in (None, 0) and find_version(group, old_type).object_name(name) != name:
        backend.delete(find_version(group, old_type).object_name(name))
        crash_point('after-version-delete')
    _log_restored(conn, group, file_id, backend_row.storage_id, 'restored from the bytes sent, checked', agent)
    return file_state(conn, group, file_id, 'restored')


def _fetch_backends_in(conn) -> list[BackendRow]:
    """The backends, inside the caller's transaction (no commit: its row locks stay)."""
    with conn.cursor() as cur:
        cur.execute(f'SELECT {BACKEND_COLUMNS} FROM storage_backend ORDER BY storage_id')
        return [BackendRow(*row) for row in cur.fetchall()]


# --- copy ------------------------------------------------------------------------------------------------

class _CopyJob(_BatchJob):
    command = 'copy'

    def __init__(self, source: Backend, target: Backend, version: _Version, recorder):
        super().__init__(recorder, (source, target), (target,))
        self.source, self.target, self.version = source, target, version
        self.copy_tags = source.keeps_tags and target.keeps_tags

    def work(self, file: CatalogFile) -> tuple[str, int]:
        return _transfer(file, self.source, self.target, self.version, self.run.progress, self.copy_tags)

    def done(self, file: CatalogFile, future: Future) -> None:
        try:
            outcome, nbytes = future.result()
        except Cancelled:
            return
        except Exception as exc:
            self.failed(file, exc)
            return
        self.record(file, self.target.row.storage_id, self.version.type)
        self.recorder.log_check(_copy_check(file, self.source, self.target, self.version, outcome))
        self.run.outcome(file, outcome, nbytes)

    def notes(self, counts: dict) -> list[str]:
        return _copy_notes(counts)


def _copy_notes(counts: dict) -> list[str]:
    """What the selection's counts tell about a copy."""
    notes = []
    if not counts['at_source']:
        notes.append('the source holds none of the files of this batch, as that version or as the original')
    if counts['done']:
        notes.append(f"{counts['done']} of the batch's {counts['at_source']} files at the source were at the "
                     'target already')
    if counts['other_version']:
        notes.append(f"{counts['other_version']} files skipped: the target holds another version of them "
                     f'(one version per backend)')
    if counts.get('damaged_source'):
        notes.append(f"{counts['damaged_source']} files skipped: the source's copy was found damaged (missing or "
                     'corrupt) by its last check: copy them from another backend (rule 8; `verify --fix` on the '
                     'source, then a copy to it, makes its copy count again)')
    return notes


def _copy_title(batch, version: _Version, source: Backend, target: Backend) -> str:
    what = 'originals' if version.type == 0 else f'{version.label} versions'
    return f"{what} of batch '{batch.id}' from {source.describe()} to {target.describe()}"


def copy_batch(settings: Settings, source_id: int, target_id: int, batch_id: str, *, version_type: int = 0,
               options: RunOptions | None = None) -> RunReport:
    """Copy version `version_type` of every file in the batch that SOURCE holds and TARGET does
    not: the bytes where SOURCE holds that version, made in memory from SOURCE's original
    otherwise. Each file is read, checked, written at the target atomically, then recorded."""
    with _BatchFrame(settings, 'copy', options) as frame:
        batch = find_batch(batch_id)
        version = find_version(batch.group, version_type)
        # Nothing but the catalog waits on a copied file: the target may make them durable in groups.
        source, target = frame.open_pair(source_id, target_id, batch.group, group_writes=True)
        if frame.service and version.type != 0:
            raise ConfigError('through the service (--via) only originals are copied: leave out --type')
        selection = _Selection(batch, source_id, target_id, version.type, frame.options.limit)
        selection.check(frame.reader)
        job = _CopyJob(source, target, version, frame.recorder(selection.group, (target,)))
        return frame.carry_out(job, selection, _copy_title(batch, version, source, target))


def plan_copy(settings: Settings, source_id: int, target_id: int, batch_id: str, *, version_type: int = 0,
              options: RunOptions | None = None) -> Plan:
    """What copy_batch would do (a dry run): backends checked, nothing written. Close the plan
    (or use it in a `with`) once read."""
    with contextlib.ExitStack() as on_error:
        frame = on_error.enter_context(_BatchFrame(settings, 'copy', options))
        batch = find_batch(batch_id)
        version = find_version(batch.group, version_type)
        source, target = frame.open_pair(source_id, target_id, batch.group)
        selection = _Selection(batch, source_id, target_id, version.type, frame.options.limit)
        notes = _copy_notes(selection.counts(frame.reader))
        on_error.pop_all()
    action = lambda f: 'copy' if f.source_type == version.type else f'make {version.label} of'
    return Plan('copy', _copy_title(batch, version, source, target), notes, frame, selection, action)


# --- archive -------------------------------------------------------------------------------------------

class _ArchiveJob(_BatchJob):
    """`archive` over a batch: each file's original archived on a worker; the rows committed in
    batches; then, for the files with enough sound copies recorded elsewhere (rule 3), the
    archive copy proven and the original released at ACTIVE, and the change recorded. A file
    that cannot reach --min-copies in this run is only archived (if it is not yet): no download
    otherwise, no version made."""

    command = 'archive'

    def __init__(self, archiver: _Archiver, recorder, min_copies: int, verified_within_days: float | None = None):
        super().__init__(recorder, (archiver.active, archiver.archive), (archiver.archive, archiver.active))
        self.archiver = archiver
        self.min_copies = min_copies
        self.verified_within_days = verified_within_days
        self.active_id = archiver.active.row.storage_id
        self.archive_id = archiver.archive.row.storage_id
        self.awaiting: list[_ArchiveStep] = []   # archived; waiting for the archive rows' commit
        self.kept = 0
        self.repaired: list[str] = []

    def start(self, run: Run, pipeline: Pipeline) -> None:
        super().start(run, pipeline)
        self.archiver.progress = run.progress

    def can_release(self, file: CatalogFile) -> bool:
        """Whether the file can reach --min-copies in this run: the sound copies on other
        backends the selection counted, and the archive copy (written or proven in this run)."""
        return file.copies_elsewhere + 1 >= self.min_copies

    def work(self, file: CatalogFile) -> _ArchiveStep:
        return self.archiver.archive_original(file, self.can_release(file))

    def waiting(self) -> int:
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
            if step.proven:
                self.check(step, 'archive')
        if step.kept:
            self.keep(step, f'{file.copies_elsewhere} sound originals recorded on other backends and the archive copy, '
                            f'--min-copies {self.min_copies}')
        else:
            self.awaiting.append(step)

    def check(self, step: _ArchiveStep, event: str, outcome: str | None = None) -> None:
        """The archive copy's check, for the fixity log (with the next commit)."""
        outcome = outcome or ('repaired' if step.repaired else 'ok')
        self.recorder.log_check(_FixityCheck(step.file.file_id, self.archive_id, 0, outcome, event, step.repaired))
        if outcome == 'repaired':
            self.repaired.append(step.file.object_name)
            self.run.log_entry('repaired', step.file.file_id, step.file.file_size, step.file.object_name,
                               f'archive copy {step.repaired}; written again from the checked original')

    def between(self, idle: bool) -> None:
        if self.awaiting and (idle or len(self.awaiting) >= self.pipeline.jobs or self.recorder.due()):
            # Rule 3: the archive rows are committed before any original leaves ACTIVE, and only
            # originals with enough sound copies elsewhere leave: those on the other backends,
            # as the catalog records them now, and the archive copy, proven at the release.
            self.flush()
            steps, self.awaiting = self.awaiting, []
            others = self.recorder.originals_elsewhere([s.file.file_id for s in steps],
                                                       (self.active_id, self.archive_id),
                                                       verified_within_days=self.verified_within_days)
            for step in steps:
                self.decide(step, others.get(step.file.file_id, 0) + (1 if step.archive_holds else 0))
        elif idle or self.recorder.due():
            self.flush()

    def decide(self, step: _ArchiveStep, copies: int) -> None:
        file = step.file
        if step.version_failed:
            self.run.failure(file, f'archived, version failed: {step.version_failed}')      # rule 7
        elif copies >= self.min_copies:
            self.pipeline.submit(self.archiver.release_original, step, self.released)
        elif step.missing:
            self.run.file_failed(file, FileFailure(
                f'the original is missing at {self.archiver.active.describe()} and only {copies} sound originals '
                'are recorded elsewhere', file.object_name))
        else:
            self.keep(step, f'{copies} sound originals recorded elsewhere, --min-copies {self.min_copies}')

    def keep(self, step: _ArchiveStep, why: str) -> None:
        self.kept += 1
        self.run.outcome(step.file, 'kept', step.file.file_size if step.archived_now else 0,
                         why + (f'; archived at {self.archive_id}' if step.archived_now else ''))

    def released(self, step: _ArchiveStep, future: Future) -> None:
        file = step.file
        try:
            outcome = future.result()
        except Cancelled:
            return
        except TooFewCopies as exc:         # through the service, whose own minimum is higher
            self.release_checked(step)
            self.keep(step, str(exc))
            return
        except ConversionError as exc:      # through the service, which made the version
            self.release_checked(step)
            self.run.failure(file, f'archived, version failed: {exc}')
            return
        except Exception as exc:
            if step.proof in DAMAGED_OUTCOMES:      # found damaged, and could not be written again
                self.check(step, 'release', step.proof)
            self.run.file_failed(file, exc)
            return
        self.release_checked(step)
        if outcome == 'replaced':
            self.recorder.change_type(file.file_id, self.active_id, 0, self.archiver.version.type)
        elif outcome == 'deleted':
            self.recorder.remove(file.file_id, self.active_id)
        detail = (f'archived at {self.archive_id}' if step.archived_now and not step.repaired else
                  'the original had left ACTIVE in an earlier run that was cut off; row corrected'
                  if step.missing else 'archived earlier, archive copy proven')
        if step.repaired:
            detail += f'; archive copy repaired ({step.repaired})'
        if step.released_before:
            detail += f'; {outcome} already (by another run)'
        self.run.outcome(file, outcome, file.file_size, detail)

    def release_checked(self, step: _ArchiveStep) -> None:
        """The archive copy proven at the release (read back, or written again), for the fixity log."""
        if step.proof in SOUND_OUTCOMES:
            self.check(step, 'release', step.proof)

    def finish(self) -> None:
        self.flush()
        if self.kept:
            self.run.report.notes.append(f'{self.kept} originals kept at ACTIVE: fewer than --min-copies '
                                         f'{self.min_copies} sound originals are recorded on other backends')
        if self.repaired:
            self.run.report.counts['repaired'] = len(self.repaired)
            self.run.report.notes.append(
                f'{len(self.repaired)} archive copies were missing or damaged and were written again from the checked '
                'original before the release: ' + ', '.join(self.repaired[:10])
                + (f' and {len(self.repaired) - 10} more (see the log)' if len(self.repaired) > 10 else ''))

    def notes(self, counts: dict) -> list[str]:
        return _archive_notes(counts)


def _archive_notes(counts: dict) -> list[str]:
    """What the selection's counts tell about an archive run."""
    return ([f"{counts['other_version']} files fail: the archive holds another version of them"]
            if counts['other_version'] else [])


def _archive_request(batch_id: str, replace_with: int | None, delete_originals: bool, min_copies: int,
                     verified_within_days: float | None = None):
    if (replace_with is None) == (not delete_originals):
        raise ConfigError('say what happens at ACTIVE: --replace-with N or --delete-original')
    if min_copies < 1:
        raise ConfigError('--min-copies must be at least 1: an original never leaves ACTIVE without a copy')
    if verified_within_days is not None and verified_within_days <= 0:
        raise ConfigError('--verified-within must be a number of days above 0')
    batch = find_batch(batch_id)
    version = find_version(batch.group, replace_with) if replace_with is not None else None
    if version is not None and version.type == 0:
        raise ConfigError('--replace-with 0 would replace the original with itself; name a version such as 1')
    return batch, version


def _archive_title(batch, version: _Version | None, active: Backend, archive: Backend) -> str:
    then = f'replacing them with {version.label} versions' if version else 'deleting them there'
    return f"originals of batch '{batch.id}' from {active.describe()} to {archive.describe()}, {then}"


def archive_batch(settings: Settings, active_id: int, archive_id: int, batch_id: str, *,
                  replace_with: int | None = None, delete_originals: bool = False, min_copies: int = 1,
                  verified_within_days: float | None = None, options: RunOptions | None = None) -> RunReport:
    """The model process, one pass and one download per file: read the original from ACTIVE and
    check it; write it to ARCHIVE and record it; make version N in memory (--replace-with N);
    then, while at least `min_copies` sound originals are recorded on other backends (with
    `verified_within_days`, those elsewhere than ARCHIVE count only if their last check passed
    within that many days), prove the archive copy (written in this run, or read back and
    hashed now; written again if it is missing or damaged) and put version N in the original's
    place at ACTIVE, or delete the original there.

    Order per file, chosen so that a kill at any moment followed by the same command ends well:
    the archive row is committed before anything at ACTIVE changes; the version is written
    before the original is deleted; the ACTIVE row changes only after both. A run cut off after
    the delete finds the original gone, the version there and the copies recorded, and only
    fixes the row. Through the service (options.via), the service makes the version and
    changes ACTIVE and its rows, in the same order."""
    with _BatchFrame(settings, 'archive', options) as frame:
        batch, version = _archive_request(batch_id, replace_with, delete_originals, min_copies, verified_within_days)
        active, archive = frame.open_pair(active_id, archive_id, batch.group, source_writing=True)
        selection = _Selection(batch, active_id, archive_id, 0, frame.options.limit, for_archive=True,
                              verified_within_days=verified_within_days)
        selection.check(frame.reader)
        archiver = (_ServiceArchiver(frame.service, batch.group, active, archive, version) if frame.service
                    else _Archiver(batch.group, active, archive, version))
        recorder = frame.recorder(selection.group, (archive, active), every_rows=200, every_seconds=2.0)
        return frame.carry_out(_ArchiveJob(archiver, recorder, min_copies, verified_within_days), selection,
                         _archive_title(batch, version, active, archive))


def _planned_archive_action(file: CatalogFile, version: _Version | None, min_copies: int) -> str:
    """What the real run will do with the file, as a dry run says it: the same decisions."""
    at_active = 'replace' if version else 'delete'
    if file.target_type not in (None, 0):
        return f'fail (the archive holds version {file.target_type})'
    reach = file.copies_elsewhere + 1
    if reach < min_copies:
        why = f'{reach} of --min-copies {min_copies} sound copies'
        return f'keep ({why})' if file.target_type == 0 and not file.target_damaged else f'archive, keep ({why})'
    if file.target_type == 0:
        if file.target_damaged:
            return f'repair the archive copy (its last check failed) and {at_active}'
        return f'prove the archive copy and {at_active}'
    return f'archive and {at_active}'


def plan_archive(settings: Settings, active_id: int, archive_id: int, batch_id: str, *,
                 replace_with: int | None = None, delete_originals: bool = False, min_copies: int = 1,
                 verified_within_days: float | None = None, options: RunOptions | None = None) -> Plan:
    """What archive_batch would do (a dry run): backends checked, nothing changed."""
    with contextlib.ExitStack() as on_error:
        frame = on_error.enter_context(_BatchFrame(settings, 'archive', options))
        batch, version = _archive_request(batch_id, replace_with, delete_originals, min_copies, verified_within_days)
        active, archive = frame.open_pair(active_id, archive_id, batch.group, source_writing=True)
        selection = _Selection(batch, active_id, archive_id, 0, frame.options.limit, for_archive=True,
                              verified_within_days=verified_within_days)
        notes = _archive_notes(selection.counts(frame.reader))
        on_error.pop_all()
    action = lambda f: _planned_archive_action(f, version, min_copies)
    return Plan('archive', _archive_title(batch, version, active, archive), notes, frame, selection, action)


# --- restore ---------------------------------------------------------------------------------------------
#
# `archive` backwards: the original read from ARCHIVE (as it is, or from gzip of it) and checked;
# written to ACTIVE under its own object name, durably; the row at ACTIVE made type 0 (the
# version's row becomes the original's, or a new row where the original had been deleted);
# only then the version object deleted. Each file's fixity rows: the ARCHIVE copy read (checked)
# with the row change; the ACTIVE copy once its version object is gone. That last row is also
# how a later run knows the restore of a file finished: a row of ACTIVE changed to type 0 (only
# a restore changes a row to 0, so its updated_at is past its created_at) with no 'restore'
# check of ACTIVE since is a restore cut off between its commit and the version's removal. Such
# files are selected again, their original at ACTIVE checked, and the version object left beside
# it removed. Without the fixity log, every row changed to 0 is looked at (a HEAD per version
# name), and only a version object found there costs a read.

@dataclasses.dataclass(frozen=True)
class _RestoreFile(CatalogFile):
    """A file of a restore's selection: source_type is what ARCHIVE holds (0, 10 or None),
    target_type what ACTIVE holds; with the last check of ARCHIVE's copy, and whether it is
    only left to finish (ACTIVE holds the restored original; a version object may be left)."""
    archive_outcome: str | None = None
    archive_checked_at: dt.datetime | None = None
    unfinished: bool = False


@dataclasses.dataclass(frozen=True)
class _RestoreSelection(_Selection):
    """The files of a batch to restore from SOURCE (ARCHIVE) to TARGET (ACTIVE): ARCHIVE records
    the original or gzip of it, and ACTIVE holds it only as a version, not at all, or as an
    original found damaged by its last check; and the files whose restore was cut off before it
    finished (see above). A damaged copy at ARCHIVE is selected too, to be named (rule 8)."""

    def _query(self, conn, head: str, tail: str) -> str:
        group = self.group
        has_log = _has_fixity_log(conn)
        storage = group.storage_table
        types = ', '.join(map(str, ORIGINAL_COPY_TYPES))
        damaged = ', '.join(f"'{o}'" for o in DAMAGED_OUTCOMES)
        if has_log:
            mark = (f'LEFT JOIN LATERAL (SELECT 1 AS found FROM {FIXITY_TABLE} m WHERE m.file_group = '
                    f"'{group.name}' AND m.storage_id = t.storage_id AND m.file_id = t.file_id AND m.type = 0 AND "
                    "m.event = 'restore' AND m.checked_at >= t.updated_at LIMIT 1) tm ON true")
        else:
            mark = 'LEFT JOIN LATERAL (SELECT NULL::int AS found) tm ON true'
        joins = (') AS b\n'
                 f'LEFT JOIN {storage} s ON s.file_id = b.file_id AND s.storage_id = %(source)s\n'
                 f"{_last_check_join(group, 's', 'sc', has_log)}\n"
                 f'LEFT JOIN {storage} t ON t.file_id = b.file_id AND t.storage_id = %(target)s\n'
                 f"{_last_check_join(group, 't', 'tc', has_log)}\n{mark}\n")
        restorable = (f's.type IN ({types}) AND (t.file_id IS NULL OR t.type <> 0 OR '
                      f'coalesce(tc.outcome IN ({damaged}), false))')
        unfinished = ("(t.type = 0 AND coalesce(t.updated_at > coalesce(t.created_at, '-infinity'), false) "
                      'AND tm.found IS NULL)')
        params = {'source': self.source_id, 'target': self.target_id}
        with conn.cursor() as cur:
            tail = cur.mogrify(joins + tail.replace('{restorable}', restorable).replace('{unfinished}', unfinished)
                               .replace('{todo}', f'(({restorable}) OR {unfinished})'), params).decode()
        head = head.replace('{restorable}', restorable).replace('{unfinished}', unfinished)
        head = head.replace('{todo}', f'(({restorable}) OR {unfinished})')
        return f'{head}\n{batch_sql(self.batch)}\n{tail}'

    def counts(self, conn) -> dict:
        head = ('SELECT count(*) FILTER (WHERE {todo}),\n'
                '       coalesce(sum(b.file_size) FILTER (WHERE {todo}), 0),\n'
                '       count(*) FILTER (WHERE t.type = 0 AND NOT {todo}),\n'
                '       count(*) FILTER (WHERE s.type IS NOT NULL AND s.type NOT IN (0, 10)),\n'
                '       count(*) FILTER (WHERE s.type IS NOT NULL)\n'
                'FROM (')
        todo, todo_bytes, done, other, at_source = self._one_row(conn, self._query(conn, head, ''))
        todo, todo_bytes = self._limited(todo, todo_bytes)
        return {'todo': todo, 'todo_bytes': todo_bytes, 'done': done, 'other_version': other,
                'at_source': at_source}

    def files(self, conn) -> Iterator[_RestoreFile]:
        head = ('SELECT b.file_id, b.object_name, b.file_size, b.sha256, s.type, t.type, sc.outcome, sc.checked_at, '
                'NOT coalesce(({restorable}), false) FROM (')
        tail = ('WHERE {todo} ORDER BY b.file_id'
                + (f' LIMIT {int(self.limit)}' if self.limit is not None else ''))
        rows = _streamed_rows(conn, self._query(conn, head, tail))
        last_id = None
        try:
            for file_id, object_name, size, sha256, source_type, target_type, outcome, checked_at, unfinished in rows:
                if file_id == last_id:
                    continue
                last_id = file_id
                yield _RestoreFile(file_id, object_name, int(size), (sha256 or '').strip().lower(), source_type,
                                  target_type, archive_outcome=outcome, archive_checked_at=checked_at,
                                  unfinished=bool(unfinished))
        except psycopg2.Error as exc:
            raise selection_error(self.batch, exc) from None


@dataclasses.dataclass
class _RestoreStep:
    """What restoring one file did at ACTIVE, for recording it and removing the version."""
    file: _RestoreFile
    outcome: str = 'restored'
    found: bool = False                  # ACTIVE held the original already, unrecorded (a killed run wrote it)
    version_name: str | None = None      # the version object to remove once the row says type 0


class _RestoreJob(_BatchJob):
    """`restore` over a batch: each original read from ARCHIVE, checked and written to ACTIVE on
    a worker; the rows committed in batches (type 0 at ACTIVE); then each file's version object
    at ACTIVE deleted, and its fixity row appended. Through the service (`client`), each
    original goes up with PUT …/original, and the service does the rest in the same order."""

    command = 'restore'

    def __init__(self, archive: Backend, active: Backend, recorder, group: str, client: _ServiceClient | None = None,
                 marks: bool = True):
        super().__init__(recorder, (archive, active), () if client else (active,))
        self.archive, self.active, self.group, self.client = archive, active, group, client
        self.archive_id, self.active_id = archive.row.storage_id, active.row.storage_id
        self.original = VERSIONS[(group, 0)]
        self.marks = marks                   # the fixity log marks restores that finished
        self.awaiting: list[_RestoreStep] = []

    def waiting(self) -> int:
        return len(self.awaiting)

    def versions_at_active(self, file: CatalogFile) -> list[_Version]:
        return [v for (g, t), v in VERSIONS.items() if g == self.group and t != 0
                and v.object_name(file.object_name) != file.object_name]

    def work(self, file: _RestoreFile) -> _RestoreStep:
        if file.unfinished and (self.client is None or file.source_type not in ORIGINAL_COPY_TYPES):
            return self.finish_earlier(file)
        if file.archive_outcome in DAMAGED_OUTCOMES:
            when = file.archive_checked_at.strftime('%Y-%m-%d %H:%M') if file.archive_checked_at else '?'
            raise FileFailure(f'its copy at {self.archive.describe()} was found {file.archive_outcome} by its last '
                              f'check ({when} UTC): a damaged copy is never restored from (rule 8); the version at '
                              'ACTIVE stays', file.object_name)
        from_gzip = file.source_type == 10
        if self.client is not None:
            outcome = self.client.restore_original(self.group, file, lambda: CheckedStream(
                _original_from(self.archive, file, file.source_type), file, self.run.progress, withhold_last=True))
            return _RestoreStep(file, 'restored' if outcome == 'restored' else 'restored already')
        name = file.object_name
        self.active.tidy(name)
        step = _RestoreStep(file)
        if file.target_type not in (None, 0):
            version_name = find_version(self.group, file.target_type).object_name(name)
            # A version under the original's own name (an original named *.webp) is overwritten
            # by the original, never deleted after it.
            step.version_name = version_name if version_name != name else None
        if self.active.adopts_found_files and _sound_copy_at(self.active, file, self.original):
            self.active.will_sync(name)       # a killed run wrote it; its rename may not be synced
            self.run.progress(file.file_size)
            step.found = True
            return step
        into = _io_buffer() if self.active.writes_from_buffer and not from_gzip else None
        chunks = CheckedStream(_original_from(self.archive, file, file.source_type, into=into), file, self.run.progress)
        self.active.write(name, chunks, file.file_size, content_type_of(self.original, name), file.sha256,
                          tags=None)
        crash_point('after-restore-write')
        return step

    def finish_earlier(self, file: _RestoreFile) -> _RestoreStep:
        """A restore cut off after its commit: ACTIVE's row says original. The original there is
        checked; then any version object left beside it (a sound copy of one of the file's
        versions, so never someone else's file) is removed."""
        step = _RestoreStep(file, 'finished')
        versions = self.versions_at_active(file)
        if not self.marks and all(self.active.size(v.object_name(file.object_name)) is None for v in versions):
            step.outcome = 'nothing left'
            return step
        try:
            read_original(self.active, file, self.run.progress)
        except (ChecksumMismatch, SourceMissing) as exc:
            raise FileFailure(f'restored earlier, but the original at {self.active.describe()} is not sound now '
                              f'({exc}); any version left there is kept: run `verify {self.active_id}`',
                              file.object_name) from None
        for version in versions:
            if self.active.size(version.object_name(file.object_name)) is not None \
                    and _sound_copy_at(self.active, file, version):
                self.active.delete(version.object_name(file.object_name))
                crash_point('after-version-delete')
        return step

    def done(self, file: _RestoreFile, future: Future) -> None:
        try:
            step = future.result()
        except Cancelled:
            return
        except Exception as exc:
            if isinstance(exc, (ChecksumMismatch, SourceMissing)) and not file.unfinished and self.client is None:
                # Read from ARCHIVE and found damaged: the fixity log says so (rule 8).
                self.recorder.log_check(_FixityCheck(file.file_id, self.archive_id, file.source_type,
                                                    'corrupt' if isinstance(exc, ChecksumMismatch) else 'missing',
                                                    'restore', str(exc)))
            self.failed(file, exc)
            return
        if step.outcome == 'nothing left':      # (no fixity log) restored earlier and finished: logged, not counted
            self.run.log_entry('checked', file.file_id, 0, file.object_name,
                               'restored earlier; no version object left at ACTIVE')
            return
        if step.outcome == 'finished':
            if self.marks:
                self.recorder.log_check(_FixityCheck(file.file_id, self.active_id, 0, 'ok', 'restore',
                                                    'restored earlier; the version object left beside it removed'))
            self.run.outcome(file, 'finished', file.file_size,
                             'restored earlier; the version object left beside it removed')
            return
        if self.client is not None:
            self.run.outcome(file, step.outcome, file.file_size, f'from {self.archive_id} through the service')
            return
        self.recorder.log_check(_FixityCheck(file.file_id, self.archive_id, file.source_type, 'ok', 'restore',
                                            'read and checked to restore the original at '
                                            f'{self.active_id}'))
        if file.target_type is None:
            self.record(file, self.active_id, 0)
        else:
            if file.target_type != 0:
                self.recorder.change_type(file.file_id, self.active_id, file.target_type, 0)
            self.files_in_recording[file.file_id] = file
        self.awaiting.append(step)

    def between(self, idle: bool) -> None:
        if self.awaiting and (idle or len(self.awaiting) >= self.pipeline.jobs or self.recorder.due()):
            # The rows say type 0 at ACTIVE (committed) before any version object goes.
            self.flush()
            crash_point('after-restore-commit')
            steps, self.awaiting = self.awaiting, []
            for step in steps:
                if (step.file.file_id, self.active_id) in self.recorder.type_changes_missed:
                    # Another run changed the row meanwhile: the version it records stays.
                    self.run.failure(step.file, 'restored, but its row at ACTIVE was changed by another run meanwhile: '
                                                'its version is left in place; run restore again')
                elif step.version_name:
                    self.pipeline.submit(self.remove_version, step, self.version_removed)
                else:
                    self.restored(step)
        elif idle or self.recorder.due():
            self.flush()

    def remove_version(self, step: _RestoreStep) -> _RestoreStep:
        self.active.delete(step.version_name)
        crash_point('after-version-delete')
        return step

    def version_removed(self, step: _RestoreStep, future: Future) -> None:
        try:
            future.result()
        except Cancelled:
            return                  # the next run finds it unfinished and removes the version
        except Exception as exc:
            self.run.failure(step.file, f'restored, but its version {step.version_name} at ACTIVE could not be '
                                        f'removed ({describe_exception(exc)}); the next run removes it')
            return
        self.restored(step)

    def restored(self, step: _RestoreStep) -> None:
        file = step.file
        self.recorder.log_check(_FixityCheck(file.file_id, self.active_id, 0, 'ok', 'restore',
                                            f'restored from {self.archive_id}'))
        detail = f'from {self.archive_id}' + (' (gzip)' if file.source_type == 10 else '')
        if step.found:
            detail += '; found written by an earlier run'
        if step.version_name:
            detail += f'; {step.version_name} removed'
        self.run.outcome(file, 'restored', file.file_size, detail)

    def notes(self, counts: dict) -> list[str]:
        notes = []
        if not counts['at_source']:
            notes.append('the archive records none of the files of this batch')
        if counts['done']:
            notes.append(f"{counts['done']} files of the batch are at ACTIVE as originals already")
        if counts['other_version']:
            notes.append(f"{counts['other_version']} files skipped: the archive holds a version of them that is not "
                         'the original (only originals and gzip of them are restored)')
        return notes


def _restore_pair(frame: _BatchFrame, archive_id: int, active_id: int, group: str) -> tuple[Backend, Backend]:
    """ARCHIVE (read) and ACTIVE (written), opened and checked; through the service, ACTIVE must
    be the active tier and is written by the service."""
    if archive_id == active_id:
        raise ConfigError('ARCHIVE and ACTIVE are the same backend')
    archive_row, active_row = fetch_backend(frame.reader, archive_id), fetch_backend(frame.reader, active_id)
    options = frame.options
    archive = open_backend(archive_row, frame.settings, path=options.source_path, jobs=options.jobs)
    if options.via:
        tier = min((row for row in fetch_backends(frame.reader) if row.type == 's3'),
                   key=lambda row: (row.priority, row.storage_id), default=None)
        if tier is None or tier.storage_id != active_id:
            raise ConfigError(f'through the service (--via) ACTIVE must be the active tier, the S3 backend with the '
                              f'lowest priority number' + (f': {tier.describe()}' if tier else '')
                              + f', not {active_row.describe()}')
        frame.service = _ServiceClient.from_options(options, frame.settings)
        active = _ServiceSource(active_row, frame.service, group)
    else:
        active = open_backend(active_row, frame.settings, path=options.target_path, jobs=options.jobs)
    archive.check(writing=False)
    active.check(writing=True)
    return archive, active


def _restore_title(batch, archive: Backend, active: Backend) -> str:
    return f"originals of batch '{batch.id}' from {archive.describe()} back to {active.describe()}"


def restore_batch(settings: Settings, archive_id: int, active_id: int, batch_id: str, *,
                  options: RunOptions | None = None) -> RunReport:
    """`archive` backwards, for every file of the batch whose original ARCHIVE holds soundly
    (the original, or gzip of it; rule 8) and ACTIVE holds only as a version (or not at all):
    read the original from ARCHIVE and check it; write it to ACTIVE under its own name,
    durably; record it there as type 0; only then delete the version object at ACTIVE. A kill
    at any moment and the same command again end consistent: a version object left beside a
    restored original is removed by the next run."""
    with _BatchFrame(settings, 'restore', options) as frame:
        batch = find_batch(batch_id)
        archive, active = _restore_pair(frame, archive_id, active_id, batch.group)
        selection = _RestoreSelection(batch, archive_id, active_id, 0, frame.options.limit)
        selection.check(frame.reader)
        recorder = frame.recorder(selection.group, (active,), every_rows=200, every_seconds=2.0)
        job = _RestoreJob(archive, active, recorder, batch.group, frame.service,
                         marks=_has_fixity_log(frame.reader))
        return frame.carry_out(job, selection, _restore_title(batch, archive, active))


def plan_restore(settings: Settings, archive_id: int, active_id: int, batch_id: str, *,
                 options: RunOptions | None = None) -> Plan:
    """What restore_batch would do (a dry run): backends checked, nothing changed."""
    with contextlib.ExitStack() as on_error:
        frame = on_error.enter_context(_BatchFrame(settings, 'restore', options))
        batch = find_batch(batch_id)
        archive, active = _restore_pair(frame, archive_id, active_id, batch.group)
        selection = _RestoreSelection(batch, archive_id, active_id, 0, frame.options.limit)
        notes = _RestoreJob.notes(None, selection.counts(frame.reader))
        on_error.pop_all()

    def action(f: _RestoreFile) -> str:
        if f.unfinished:
            return 'finish the earlier restore of'
        if f.archive_outcome in DAMAGED_OUTCOMES:
            return f'refuse (its archive copy was found {f.archive_outcome})'
        return 'restore' + (' from gzip' if f.source_type == 10 else '')
    return Plan('restore', _restore_title(batch, archive, active), notes, frame, selection, action)


# --- export ----------------------------------------------------------------------------------------------
#
# A researcher's working copy: the originals (or version N) of a batch in a plain folder, each
# read from the most accessible backend that holds it soundly (S3 tiers by priority, then disks
# that are online), checked, written atomically under DIR/<object name>, and listed in
# DIR/manifest-sha256.txt. Files held only on disks that are not mounted get a recall plan: the
# fewest disks to mount (greedy set cover, the disk that brings the most files first). Nothing
# is written to the catalog but the fixity log (the source copies checked).

EXPORT_MANIFEST = 'manifest-sha256.txt'


@dataclasses.dataclass(frozen=True)
class _ExportFile(CatalogFile):
    """A file of an export: read from backend `source_id` (which holds it as `source_type`), or,
    with no source online, held soundly on the offline disks `offline`. `others`: the further
    backends online that hold it soundly, (storage_id, type) in order, should the first fail."""
    source_id: int | None = None
    offline: tuple = ()
    others: tuple = ()


@dataclasses.dataclass(frozen=True)
class _ExportSelection(_Selection):
    """Every file of the batch, with the backend to read it from: the first of `order` (the
    backends reachable now, most accessible first) that holds a sound copy (rule 8) of the
    version (for originals: the original or gzip of it); else the `offline` disks that do."""
    order: tuple = ()
    offline: frozenset = frozenset()

    def _held_query(self, conn, head: str, tail: str) -> str:
        group = self.group
        check = _last_check_join(group, 's', 'c', _has_fixity_log(conn))
        if self.version_type == 0:
            sound = _sound_original_sql('s', 'c')
        else:
            damaged = ', '.join(f"'{o}'" for o in DAMAGED_OUTCOMES)
            sound = f's.type = {int(self.version_type)} AND (c.outcome IS NULL OR c.outcome NOT IN ({damaged}))'
        joins = (') AS b\n'
                 'LEFT JOIN LATERAL (SELECT array_agg(s.storage_id) AS ids, array_agg(s.type) AS types '
                 f'FROM {group.storage_table} s {check} WHERE s.file_id = b.file_id AND {sound}) h ON true\n')
        return f'{head}\n{batch_sql(self.batch)}\n{joins}{tail}'

    def counts(self, conn) -> dict:
        todo, todo_bytes, held = self._one_row(conn, self._held_query(
            conn, 'SELECT count(*), coalesce(sum(b.file_size), 0), count(*) FILTER (WHERE h.ids IS NOT NULL) FROM (', ''))
        return {'todo': todo, 'todo_bytes': todo_bytes, 'done': 0, 'other_version': 0, 'at_source': held}

    def files(self, conn) -> Iterator[_ExportFile]:
        query = self._held_query(conn, 'SELECT b.file_id, b.object_name, b.file_size, b.sha256, h.ids, h.types FROM (',
                                 'ORDER BY b.file_id')
        last_id = None
        try:
            for file_id, object_name, size, sha256, ids, types in _streamed_rows(conn, query):
                if file_id == last_id:
                    continue
                last_id = file_id
                held = dict(zip(ids or (), types or ()))
                sources = [i for i in self.order if i in held]
                source = sources[0] if sources else None
                yield _ExportFile(file_id, object_name, int(size or 0), (sha256 or '').strip().lower(),
                                 held.get(source, 0), None, source_id=source,
                                 offline=tuple(sorted(i for i in held if i in self.offline)),
                                 others=tuple((i, held[i]) for i in sources[1:]))
        except psycopg2.Error as exc:
            raise selection_error(self.batch, exc) from None


@dataclasses.dataclass(frozen=True)
class _RecallStep:
    """One disk to mount: its id and label, and how many of the files still missing it brings."""
    storage_id: int
    label: str
    files: int

    def describe(self) -> str:
        return f'mount backend {self.storage_id} "{self.label}" for {self.files:,} files'


def recall_plan(offline: dict[int, tuple], labels: dict[int, str]) -> list[_RecallStep]:
    """The fewest disks to mount to get every file (greedy set cover: each time the disk that
    holds the most of the files left; ties by storage id)."""
    left = {file_id: set(ids) for file_id, ids in offline.items() if ids}
    steps = []
    while left:
        counts: dict[int, int] = {}
        for ids in left.values():
            for storage_id in ids:
                counts[storage_id] = counts.get(storage_id, 0) + 1
        best = min(counts, key=lambda storage_id: (-counts[storage_id], storage_id))
        steps.append(_RecallStep(best, labels.get(best) or f'backend {best}', counts[best]))
        left = {file_id: ids for file_id, ids in left.items() if best not in ids}
    return steps


@dataclasses.dataclass
class ExportReport(RunReport):
    """An export's report: with the folder, its manifest, and the recall plan for the files
    held only on disks that are not mounted (exit 1 while there are any)."""
    directory: Path | None = None
    manifest: Path | None = None
    recall: list = dataclasses.field(default_factory=list)
    offline: int = 0

    @property
    def exit_status(self) -> int:
        status = RunReport.exit_status.fget(self)
        return EXIT_FAILURES if status == EXIT_OK and self.offline else status


def _read_export_manifest(path: Path) -> dict[str, str]:
    """The entries of an earlier export's manifest: relative path -> sha256."""
    entries = {}
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in path.read_text(encoding='utf-8').splitlines():
            escaped = line.startswith('\\')
            digest, sep, name = line.lstrip('\\').partition('  ')
            if sep and re.fullmatch(r'[0-9a-f]{64}', digest):
                if escaped:
                    name = re.sub(r'\\(.)', lambda m: '\n' if m[1] == 'n' else m[1], name)
                entries[name] = digest
    return entries


class _ExportJob(_BatchJob):
    """`export` over a batch: each file checked in DIR (kept if sound), else read from its source,
    checked, written atomically; the source's check appended to the fixity log; the manifest
    written at the end."""

    command = 'export'

    def __init__(self, directory: Path, sources: dict[int, Backend], recorder, version: _Version):
        super().__init__(recorder, tuple(sources.values()), ())
        self.directory = directory
        self.root = directory.resolve()
        self.sources = sources
        self.version = version
        self.entries: dict[str, str] = {}          # relative path -> sha256, for the manifest
        self.visited: set[str] = set()
        self.offline: dict[int, tuple] = {}

    def target(self, file: CatalogFile) -> tuple[str, Path]:
        name = self.version.object_name(file.object_name)
        return name, self.directory.joinpath(*_safe_object_parts(name))

    def sound_in_folder(self, file: CatalogFile, path: Path) -> str | None:
        """The sha256 of the file in DIR if it is there and sound (a regular file, not a link)."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or (self.version.type == 0 and st.st_size != file.file_size):
            return None
        data = path.read_bytes()
        try:
            self.version.check(data, file)
        except FileFailure:
            return None
        return file.sha256 if self.version.type == 0 else hashlib.sha256(data).hexdigest()

    def work(self, file: _ExportFile) -> tuple:
        """('present' | 'exported' | 'offline', sha256, bytes, the source used, the checks of
        sources that failed theirs); a source whose copy is damaged or missing is passed over
        for the next one that holds the file soundly."""
        name, path = self.target(file)
        present = self.sound_in_folder(file, path)
        if present:
            self.run.progress(file.file_size)
            return 'present', present, file.file_size, None, []
        if file.source_id is None:
            if file.offline:
                return 'offline', None, 0, None, []
            raise FileFailure('no backend to read it from records a sound copy of it'
                              + ('' if self.version.type == 0 else f' ({self.version.label})'), file.object_name)
        damaged = []
        sources = [(file.source_id, file.source_type), *file.others]
        for number, (storage_id, held_type) in enumerate(sources):
            try:
                digest, size = self.fetch(file, name, path, self.sources[storage_id], held_type)
            except (ChecksumMismatch, SourceMissing, ConversionError) as exc:
                outcome = 'missing' if isinstance(exc, SourceMissing) else 'corrupt'
                damaged.append(_FixityCheck(file.file_id, storage_id, held_type, outcome, 'export', str(exc)))
                if number == len(sources) - 1:
                    exc.damaged = damaged
                    raise
                log.warning('%s: %s at %s; reading it from the next backend that holds it', file.object_name, exc,
                            self.sources[storage_id].describe())
                continue
            return 'exported', digest, size, (storage_id, held_type), damaged
        raise AssertionError('unreachable')

    def fetch(self, file: _ExportFile, name: str, path: Path, source: Backend, held_type: int) -> tuple[str, int]:
        """Read the file's version from `source`, check it, write it atomically at `path`."""
        if self.version.type == 0:
            chunks = CheckedStream(_original_from(source, file, held_type), file, self.run.progress)
        else:
            data = b''.join(source.read(name))
            self.version.check(data, file)
            self.run.progress(len(data))
            chunks = [data]
        if not Path(os.path.realpath(path.parent)).is_relative_to(self.root):     # a link inside DIR: rule 4
            raise UnsafeObjectName(f'{path.parent} leads outside {self.directory}', file.object_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with _atomic_file(path) as tmp, open(tmp, 'xb') as out:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return digest.hexdigest(), size

    def done(self, file: _ExportFile, future: Future) -> None:
        name = self.version.object_name(file.object_name)
        try:
            outcome, digest, size, source, damaged = future.result()
        except Cancelled:
            return
        except Exception as exc:
            for check in getattr(exc, 'damaged', []):     # rule 8: the fixity log says which copies failed
                self.recorder.log_check(check)
            self.visited.add(name)
            self.failed(file, exc)
            return
        self.visited.add(name)
        for check in damaged:
            self.recorder.log_check(check)
        if outcome == 'offline':
            self.offline[file.file_id] = file.offline
            self.run.outcome(file, 'offline', 0, 'held only on disks not mounted: ' + ', '.join(map(str, file.offline)))
            return
        self.entries[name] = digest
        if outcome == 'exported':
            storage_id, held_type = source
            self.recorder.log_check(_FixityCheck(file.file_id, storage_id, held_type, 'ok', 'export',
                                                f'exported to {self.directory}'))
            self.run.outcome(file, 'exported', size, f'from {storage_id}'
                             + (' (gzip)' if held_type == 10 and self.version.type == 0 else ''))
        else:
            self.run.outcome(file, 'present', 0, 'in the folder already, sound')

    def finish(self) -> None:
        self.flush()
        self.write_manifest()

    def write_manifest(self) -> None:
        """DIR/manifest-sha256.txt: every file of the batch in DIR so far (this run's, and an
        earlier run's where this one did not get to it and the file is still there)."""
        manifest = self.directory / EXPORT_MANIFEST
        entries = {name: digest for name, digest in _read_export_manifest(manifest).items()
                   if name not in self.visited and (self.directory / name).is_file()}
        entries.update(self.entries)
        with _atomic_file(manifest) as tmp, open(tmp, 'x', encoding='utf-8') as out:
            for name in sorted(entries):
                out.write(manifest_line(entries[name], name))


def _export_sources(frame: _BatchFrame, from_ids: list[int] | None) -> tuple[dict[int, Backend], dict[int, Backend],
                                                                           dict[int, str]]:
    """The backends to read from, most accessible first (S3 tiers by priority, then disks
    online), the disks not mounted, and every backend's label; with `from_ids`, those only,
    in that order."""
    rows = {row.storage_id: row for row in fetch_backends(frame.reader)}
    labels = {i: (row.notes or row.url_prefix) for i, row in rows.items()}
    if from_ids:
        unknown = [i for i in from_ids if i not in rows]
        if unknown:
            raise ConfigError(f'--from: no storage backend with id {", ".join(map(str, unknown))} (see `info`)')
        chosen = list(dict.fromkeys(from_ids))
    else:
        chosen = sorted(rows, key=lambda i: (rows[i].type != 's3', rows[i].priority, i))
    online, offline = {}, {}
    for storage_id in chosen:
        backend = open_backend(rows[storage_id], frame.settings, jobs=frame.options.jobs)
        try:
            backend.check(writing=False)
        except ConfigError as exc:
            if backend.root is not None:
                offline[storage_id] = backend
            else:
                log.warning('not reading from %s: %s', backend.describe(), exc)
            continue
        online[storage_id] = backend
    return online, offline, labels


def _export_request(frame: _BatchFrame, batch_id: str, directory: str, version_type: int,
                    from_ids: list[int] | None):
    batch = find_batch(batch_id)
    version = find_version(batch.group, version_type)
    folder = Path(directory).expanduser().absolute()
    if (folder / DOT_FILE).exists():
        raise ConfigError(f'{folder} is a storage backend (it has {DOT_FILE}): export into a plain folder')
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f'--to {folder} is not a folder')
    online, offline, labels = _export_sources(frame, from_ids)
    selection = _ExportSelection(batch, 0, 0, version.type, None, order=tuple(online),
                                offline=frozenset(offline))
    selection.check(frame.reader)
    what = 'originals' if version.type == 0 else f'{version.label} versions'
    title = f"{what} of batch '{batch.id}' into {folder}"
    return batch, version, folder, online, labels, selection, title


def export_batch(settings: Settings, batch_id: str, directory: str, *, version_type: int = 0,
                 from_ids: list[int] | None = None, options: RunOptions | None = None) -> ExportReport:
    """Copy the originals (or version `version_type`) of the batch into `directory`, a plain
    folder, each from the most accessible backend that holds it soundly, checked, with
    manifest-sha256.txt; a recall plan for the files held only on disks that are not mounted.
    Writes nothing to the catalog but the fixity log. Run again, it continues."""
    with _BatchFrame(settings, 'export', options) as frame:
        batch, version, folder, online, labels, selection, title = _export_request(
            frame, batch_id, directory, version_type, from_ids)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f'cannot make the folder {folder}: {exc.strerror}') from None
        job = _ExportJob(folder, online, frame.recorder(selection.group, ()), version)
        report = frame.carry_out(job, selection, title)
    plan = recall_plan(job.offline, labels)
    result = ExportReport(**{f.name: getattr(report, f.name) for f in dataclasses.fields(RunReport)},
                          directory=folder, manifest=folder / EXPORT_MANIFEST, recall=plan, offline=len(job.offline))
    if plan:
        result.notes.append(f'{len(job.offline):,} files are held only on disks that are not mounted: mount the '
                            'disks of the recall plan, then run the same command again')
    return result


def plan_export(settings: Settings, batch_id: str, directory: str, *, version_type: int = 0,
                from_ids: list[int] | None = None, options: RunOptions | None = None) -> Plan:
    """What export_batch would do (a dry run): where each file would be read from."""
    with contextlib.ExitStack() as on_error:
        frame = on_error.enter_context(_BatchFrame(settings, 'export', options))
        batch, version, folder, online, labels, selection, title = _export_request(
            frame, batch_id, directory, version_type, from_ids)
        on_error.pop_all()

    def action(f: _ExportFile) -> str:
        if f.source_id is not None:
            return f'read from backend {f.source_id}' + (' (gzip)' if f.source_type == 10 and version.type == 0 else '')
        if f.offline:
            return 'needs a disk mounted: ' + ', '.join(f'backend {i} "{labels[i]}"' for i in f.offline)
        return 'no sound copy recorded on the backends to read from:'
    return Plan('export', title, [], frame, selection, action)


# --- one file, directly (the one-file forms of copy and archive) --------------------------------------

def _one_file(conn, settings: Settings, group: str, file_id: int, source_id: int, target_id: int,
              source_path: str | None, target_path: str | None, source_writing: bool = False):
    file = fetch_file(conn, group, file_id)
    held = {h.backend.storage_id: h.type for h in _storage_rows(conn, group, file_id)}
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


def _damaged_at(conn, group: str, file_id: int, storage_id: int) -> bool:
    """Whether the last check of the file's copy at the backend found it missing or corrupt."""
    group = GROUPS[group]
    check = _last_check_join(group, 's', 'c', _has_fixity_log(conn))
    damaged = ', '.join(f"'{o}'" for o in DAMAGED_OUTCOMES)
    with conn.cursor() as cur:
        cur.execute(f'SELECT coalesce(c.outcome IN ({damaged}), false) FROM {group.storage_table} s {check} '
                    'WHERE s.file_id = %s AND s.storage_id = %s', (file_id, storage_id))
        row = cur.fetchone()
    conn.commit()
    return bool(row and row[0])


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
        outcome, checked_at = _copy_last_check(conn, GROUPS[group], file_id, source_id)
        if outcome in DAMAGED_OUTCOMES:
            raise DamagedCopy(f'{source.describe()} holds a copy of {group} file {file_id} that its last check '
                              f'({checked_at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M} UTC) found {outcome}: '
                              'copy it from another backend')
        with target.writing():
            outcome, _ = _transfer(file, source, target, version, copy_tags=source.keeps_tags and target.keeps_tags)
            writer = CatalogWriter(conn, GROUPS[group], (target,))
            writer.add(file, target_id, version.type)
            writer.log_check(_copy_check(file, source, target, version, outcome))
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
    version = find_version(group, replace_with) if replace_with is not None else None
    if version is not None and version.type == 0:
        raise ConfigError('replace_with 0 would replace the original with itself; name a version such as 1')
    conn = connect_catalog(settings)
    try:
        file, active, archive = _one_file(conn, settings, group, file_id, active_id, archive_id, active_path,
                                          archive_path, source_writing=True)
        if file.source_type != 0:
            raise NotFound(f'{active.describe()} holds version {file.source_type} of {group} file {file_id}, not '
                           'its original', 'original')
        archiver = _Archiver(group, active, archive, version)
        writer = CatalogWriter(conn, GROUPS[group], (archive, active))
        others = writer.originals_elsewhere([file_id], (active_id, archive_id)).get(file_id, 0)
        file = dataclasses.replace(file, copies_elsewhere=others,
                                   target_damaged=_damaged_at(conn, group, file_id, archive_id))
        with archive.writing(), active.writing():
            step = archiver.archive_original(file, can_release=others + 1 >= min_copies)
            if step.archived_now:
                writer.add(file, archive_id, 0)
                if step.proven:
                    writer.log_check(_FixityCheck(file_id, archive_id, 0, 'repaired' if step.repaired else 'ok',
                                                 'archive', step.repaired))
            writer.flush()
            if step.version_failed:
                return file_state(conn, group, file_id, f'archived, version failed: {step.version_failed}')
            if step.kept:
                return file_state(conn, group, file_id, 'kept')
            try:
                outcome = archiver.release_original(step)
            finally:
                if step.proof:
                    writer.log_check(_FixityCheck(file_id, archive_id, 0, step.proof, 'release', step.repaired))
                    with contextlib.suppress(Exception):
                        writer.flush()
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
class _RecordedCopy:
    """A file the catalog records on a backend: which group, which version, under which name."""
    group: str
    file: CatalogFile
    version_type: int

    @property
    def version(self) -> _Version | None:
        return VERSIONS.get((self.group, self.version_type))

    @property
    def stored_name(self) -> str:
        return self.version.object_name(self.file.object_name) if self.version else self.file.object_name


def _recorded_copies(conn, storage_id: int, batch=None, *, by_last_check: bool = False,
               not_checked_within: float | None = None) -> tuple[Iterator[_RecordedCopy], dict]:
    """Every file the catalog records on the backend (of the batch, if given), and the totals.

    Streamed in folder order (by the folders of the name, part by part, then by name; COLLATE
    "C" orders like Python's str), so a disk's folders can be walked alongside; or, with
    `by_last_check`, least recently checked first: the copies never checked, then by the time of
    their last check (in the fixity log, else of their writing), ties by group and file, so that
    repeated slices of a scrub cover the whole backend. With `not_checked_within` (days), only
    the copies whose last check is older, or missing."""
    groups = [GROUPS[batch.group]] if batch else list(GROUPS.values())
    scrub = by_last_check or not_checked_within is not None
    has_log = scrub and _has_fixity_log(conn)
    parts = []
    for group in groups:
        source = f'({batch_sql(batch)})' if batch else group.files_table
        check = _last_check_join(group, 's', 'c', has_log) if scrub else ''
        last = _last_checked_sql('s', 'c') if scrub else 'NULL::timestamptz'
        due = (f" AND ({last} IS NULL OR {last} < now() - interval '1 day' * {float(not_checked_within)!r})"
               if not_checked_within is not None else '')
        parts.append(f"SELECT '{group.name}' AS grp, f.file_id, f.object_name, f.file_size, f.sha256, s.type, "
                     f'{last} AS last_checked FROM {group.storage_table} s JOIN {source} AS f ON f.file_id = s.file_id '
                     f'{check} WHERE s.storage_id = {int(storage_id)}{due}')
    union = '\nUNION ALL\n'.join(parts)
    folders = "(string_to_array(object_name, '/'))[1:cardinality(string_to_array(object_name, '/')) - 1]"
    order = ('last_checked NULLS FIRST, grp, file_id' if by_last_check else
             f'{folders} COLLATE "C", object_name COLLATE "C"')
    try:
        with conn.cursor() as cur:
            cur.execute(f'SELECT count(*), coalesce(sum(file_size) FILTER (WHERE type = 0), 0), '
                        f'count(*) FILTER (WHERE type <> 0) FROM ({union}) AS held')
            files, original_bytes, versions = cur.fetchone()
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise selection_error(batch, exc) if batch else exc

    def stream() -> Iterator[_RecordedCopy]:
        query = f'SELECT * FROM ({union}) AS held ORDER BY {order}'
        for group, file_id, object_name, file_size, sha256, version_type, _ in _streamed_rows(conn, query):
            yield _RecordedCopy(group, CatalogFile(file_id, object_name, int(file_size), (sha256 or '').strip().lower()),
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
    walked: bool = False                 # the disk was walked alongside: unknown files looked for
    scrub: bool = False                  # --not-checked-within, --max-files or --max-time
    not_checked_within: float | None = None
    budget_spent: str | None = None      # the budget that ended the scrub before every copy due was checked
    remaining: int | None = None         # scrub: copies selected but not checked by this run
    checks_logged: int = 0               # rows appended to the fixity log


def verify_file(backend: Backend, held: _RecordedCopy, progress: Callable[[int], None]) -> int:
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


class _CheckLog:
    """verify's checks, for the fixity log: a row per copy checked (sound 'ok', 'missing',
    'corrupt'; a copy that could not be checked gets none: it was not checked), appended by a
    CatalogWriter per group on a connection of the log's own, a batch every `every_rows` rows or
    `every_seconds` seconds (as copy's rows are), never a round trip per file.

    Without the table nothing is kept (_has_fixity_log says once that `init-db` would keep it).
    When the catalog refuses the rows (a read-only role) or goes away, the checks still stand:
    the run goes on, and its report says how many were not logged and why."""

    def __init__(self, settings: Settings, storage_id: int, report: VerifyReport, every_rows: int = 500,
                 every_seconds: float = 5.0):
        self.storage_id = storage_id
        self.report = report
        self.refused: str | None = None
        self.not_logged = 0
        self.conn = connect_catalog(settings)
        self.writers = ({name: CatalogWriter(self.conn, group, (), every_rows, every_seconds)
                         for name, group in GROUPS.items()} if _has_fixity_log(self.conn) else {})
        if self.writers and not _may_append_fixity(self.conn):
            self.refused = (f'this catalog role may not append to it: a role granted INSERT on {FIXITY_TABLE} '
                            'keeps them')

    def add(self, held: _RecordedCopy, outcome: str, detail: str | None = None) -> None:
        if self.refused:
            self.not_logged += 1
        elif self.writers:
            self.writers[held.group].log_check(_FixityCheck(held.file.file_id, self.storage_id, held.version_type,
                                                           outcome, 'verify', detail or None))

    def between(self, idle: bool) -> None:
        if any(writer.due() for writer in self.writers.values()):
            self.flush()

    def flush(self) -> None:
        for writer in self.writers.values():
            if self.refused:
                return
            pending = len(writer.checks)
            try:
                writer.flush()
            except psycopg2.Error as exc:
                self.refuse(exc)
            else:
                self.report.checks_logged += pending

    def refuse(self, exc: psycopg2.Error) -> None:
        self.refused = (f'the catalog went away ({pg_error_line(exc)})' if catalog_outage(exc) else
                        f'the catalog refused them ({pg_error_line(exc)})')
        for writer in self.writers.values():
            self.not_logged += len(writer.checks)
            writer.checks.clear()
        log.warning('the checks are done, but not logged in the fixity log: %s', self.refused)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with contextlib.suppress(psycopg2.Error):
                self.conn.close()
        if self.refused:
            self.report.notes.append(f'{self.not_logged:,} checks were done but not logged in the fixity log '
                                     f'({FIXITY_TABLE}): {self.refused}')


@dataclasses.dataclass
class _ScrubBudget:
    """How much one slice of a scrub may check: at most `max_files` copies, or as many as it can
    start within `max_minutes`. Once spent, no new file is started; the files in flight finish
    and are logged."""
    max_files: int | None = None
    max_minutes: float | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    spent: str | None = None

    def out_of_time(self) -> bool:
        if self.max_minutes is not None and time.monotonic() - self.started >= self.max_minutes * 60:
            self.spent = self.spent or f'--max-time {self.max_minutes:g}'
            return True
        return False

    def take(self, items: Iterator[_RecordedCopy]) -> Iterator[_RecordedCopy]:
        """The items, until the budget is spent (asking for the next one only while it is not)."""
        taken = 0
        while not self.out_of_time():
            if self.max_files is not None and taken >= self.max_files:
                self.spent = f'--max-files {self.max_files}'
                return
            item = next(items, None)
            if item is None:
                return
            taken += 1
            yield item

    def start(self) -> None:
        """Called as a file's check starts: one queued when the time ran out is left for the next slice."""
        if self.out_of_time():
            raise Cancelled()


class _Verifier:
    """What `verify` finds, as it finds it: each missing, corrupt, unknown or unchecked file
    counted, logged and named, and each check of a copy handed to the fixity log."""

    def __init__(self, run: Run, report: VerifyReport, checks: _CheckLog | None = None):
        self.run, self.report = run, report
        self.checks = checks
        self.checked_copies = 0         # copies checked (sound, missing or corrupt): rows for the fixity log
        self.rows_to_remove: list[_RecordedCopy] = []

    def check_done(self, held: _RecordedCopy, outcome: str, detail: str = '') -> None:
        self.checked_copies += 1
        if self.checks:
            self.checks.add(held, outcome, detail)

    def finding(self, kind: str, held: _RecordedCopy | None, name: str, reason: str = '') -> None:
        self.report.found[kind].append((name, reason))
        self.report.failures.append((name, reason or kind))
        if held:
            self.run.outcome(held.file, kind, 0, reason)
            if kind in ('missing', 'corrupt'):
                self.rows_to_remove.append(held)
                self.check_done(held, kind, reason)
        else:
            self.run.log_entry(kind, '', 0, name, reason)
        log.warning('%s %s%s', kind.upper(), name, f': {reason}' if reason else '')

    def checked(self, held: _RecordedCopy, future: Future) -> None:
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
            reason = _fatal_reason(exc, self.run.backends)
            if reason:
                self.run.stop(reason)
        else:
            self.run.outcome(held.file, 'sound', nbytes)
            self.check_done(held, 'ok')

    def checkable(self, held: _RecordedCopy) -> bool:
        if held.version is None:
            self.finding('unchecked', held, held.file.object_name, f'version type {held.version_type} is unknown to '
                                                                    'this tool')
            return False
        try:
            _safe_object_parts(held.stored_name)
        except UnsafeObjectName as exc:
            self.finding('corrupt', held, held.stored_name, str(exc))
            return False
        return True

    def walk_alongside(self, items: Iterator[_RecordedCopy], backend: Backend) -> Iterator[_RecordedCopy]:
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
                   path: str | None = None, options: RunOptions | None = None,
                   not_checked_within: float | None = None, max_files: int | None = None,
                   max_minutes: float | None = None) -> VerifyReport:
    """Check every file the catalog records on the backend (in the batch, if given): there, and
    sound (originals hash to the catalog's sha256, gzip versions decompress to it, WebP and FLAC
    versions decode). Every check of a copy is appended to the fixity log. With `fix`, remove
    the catalog rows of missing and corrupt files (never a file).

    A scrub (`not_checked_within` days, `max_files`, `max_minutes`) checks the least recently
    checked copies first (never checked first; ties by file), only those not checked within
    the days given, and stops cleanly at its budget, so that repeated slices cover the whole
    backend; the report says how many copies remain. A disk verified whole without these (a
    full pass, in folder order) is walked alongside the catalog, which finds the files the
    catalog does not know; a scrub, in the order of the last checks, cannot walk the folders
    alongside, and leaves that to the full pass."""
    options = options or RunOptions()
    options.check()
    if max_files is not None and max_files < 1:
        raise ConfigError('--max-files must be at least 1')
    if max_minutes is not None and max_minutes <= 0:
        raise ConfigError('--max-time must be more than 0 minutes')
    if not_checked_within is not None and not_checked_within < 0:
        raise ConfigError('--not-checked-within must not be negative')
    batch = find_batch(batch_id) if batch_id else None
    scrub = not_checked_within is not None or max_files is not None or max_minutes is not None
    reader = connect_catalog(settings)
    try:
        backend = open_backend(fetch_backend(reader, storage_id), settings, path=path, jobs=options.jobs,
                               path_option='--path')
        backend.check(writing=False)
        walk = backend.lists_files and batch is None and not scrub
        files, totals = _recorded_copies(reader, storage_id, batch, by_last_check=not walk,
                                   not_checked_within=not_checked_within)
        report = VerifyReport('verify', backend.describe() + (f", batch '{batch.id}'" if batch else ''),
                              batch_id=batch.id if batch else None, storage_id=storage_id,
                              with_batch=batch is not None, lists_files=backend.lists_files,
                              files_root=backend.files_location(), walked=walk, scrub=scrub,
                              not_checked_within=not_checked_within)
        budget = _ScrubBudget(max_files, max_minutes)
        # Versions' sizes are not in the catalog: with versions on the backend, count files only.
        total_bytes = totals['original_bytes'] if not totals['versions'] and max_files is None else None
        total_files = min(totals['files'], max_files) if max_files is not None else totals['files']
        with Run(report, options, total_files, total_bytes, backends=(backend,)) as run:
            checks = _CheckLog(settings, storage_id, report)
            verifier = _Verifier(run, report, checks)
            items = (held for held in files if verifier.checkable(held))
            if walk:
                items = verifier.walk_alongside(items, backend)

            def check(held: _RecordedCopy) -> int:
                budget.start()
                return verify_file(backend, held, run.progress)
            try:
                Pipeline(options.jobs, run).drive(budget.take(items), check, verifier.checked, between=checks.between)
            except Exception as exc:
                run.stop_for(exc)
                reason = (f'the catalog went away ({pg_error_line(exc)})' if catalog_outage(exc) else
                          _fatal_reason(exc, (backend,)) or describe_exception(exc))
                report.stopped = f'{reason}: not every file was checked; run verify again'
            finally:
                checks.close()
            if scrub:
                report.remaining = max(totals['files'] - verifier.checked_copies, 0)
                report.budget_spent = budget.spent if report.remaining else None
                run.log_line(f'scrub: {verifier.checked_copies} copies checked, {report.remaining} remain'
                             + (f' (stopped at {report.budget_spent})' if report.budget_spent else ''))
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


# --- coverage ----------------------------------------------------------------------------------------------
#
# "Is every original safe?": the files of a batch (or of both groups) counted by how many backends
# hold a sound copy of their original (rule 8: type 0 or gzip, its last check not missing or
# corrupt), grouped by one dimension. Everything is counted in the database, one query per group
# and grouping: a catalog of millions of files is never brought into Python file by file.

COVERAGE_DIMENSIONS = ('batch', 'deployment', 'node', 'tag', 'month', 'backend')
COPY_BUCKETS = ('0', '1', '2', '3+')
DEFAULT_AT_RISK = 2
DUE_EVERY_DAYS = 365


@dataclasses.dataclass
class _CoverageRow:
    """One group of files: how many, how many bytes, and how many of them have 0, 1, 2, 3 or more
    sound copies of the original. `online`: files with a sound original on an S3 tier;
    `offline_only`: files whose sound originals are all on disks; `never_checked`: files with a
    sound copy that was never checked (no fixity row and no time of writing); `oldest_check`:
    the oldest last check of a sound copy; `damaged`: files with a copy found missing or corrupt.
    For `--by backend`, the last three speak of the copies on that backend, and `originals` /
    `versions` count what it holds."""
    group: str
    key: object
    label: str | None
    files: int
    bytes: int
    copies: dict
    online: int
    offline_only: int
    never_checked: int
    oldest_check: dt.datetime | None
    damaged: int
    originals: int | None = None
    versions: int | None = None
    key2: object = None

    def as_dict(self) -> dict:
        entry = {'group': self.group, 'key': self.key, 'label': self.label, 'files': self.files, 'bytes': self.bytes,
                 'copies': dict(self.copies), 'online': self.online, 'offline_only': self.offline_only,
                 'never_checked': self.never_checked,
                 'oldest_check': self.oldest_check.isoformat() if self.oldest_check else None,
                 'damaged': self.damaged}
        if self.originals is not None:
            entry.update(originals=self.originals, versions=self.versions)
        return entry


@dataclasses.dataclass
class _AtRiskFile:
    """A file with fewer sound copies of its original than asked for, and where its copies are
    (every version, sound or not)."""
    group: str
    file_id: int
    object_name: str
    copies: int
    where: list

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _CoverageReport:
    """What `coverage` found: rows by the dimension, each group's total, and the files at risk."""
    by: str
    batch: str | None
    rows: list
    totals: list
    at_risk: list | None
    at_risk_below: int | None
    has_log: bool
    made: dt.datetime

    def as_dict(self) -> dict:
        """What `coverage --json` prints and the service's GET /coverage answers."""
        return {'rows': [row.as_dict() for row in self.rows],
                'at_risk': [entry.as_dict() for entry in self.at_risk or []]}


def _last_checks_cte(group: _Group, has_log: bool, file_id: int | None = None) -> str:
    """SQL for a CTE body: the newest fixity row of every copy (file, backend, version) of the
    group, read in one pass over the log (DISTINCT ON), not one index probe per copy. Joined
    with the condition that it is no older than the copy's storage row (see _last_check_join)."""
    if not has_log:
        return ('SELECT NULL::integer AS file_id, NULL::integer AS storage_id, NULL::smallint AS type, '
                'NULL::text AS outcome, NULL::timestamptz AS checked_at, NULL::text AS event WHERE false')
    return (f'SELECT DISTINCT ON (x.file_id, x.storage_id, x.type) x.file_id, x.storage_id, x.type, x.outcome, '
            f"x.checked_at, x.event FROM {FIXITY_TABLE} x WHERE x.file_group = '{group.name}' "
            + (f'AND x.file_id = {int(file_id)} ' if file_id is not None else '') +
            'ORDER BY x.file_id, x.storage_id, x.type, x.checked_at DESC, x.check_id DESC')


def _copies_ctes(group: _Group, has_log: bool, file_id: int | None = None, files: str | None = None) -> str:
    """SQL: the CTEs `lc` (last checks) and `copies`: every storage row of the group, whether it
    is on an S3 tier, whether it is a sound copy of the original (rule 8), whether its
    last check found it damaged, and when it was last checked (its writing where no check since);
    with `file_id`, of that file only; with `files` (a SELECT of file_id), of those files only."""
    damaged = ', '.join(f"'{o}'" for o in DAMAGED_OUTCOMES)
    where = (f' WHERE s.file_id = {int(file_id)}' if file_id is not None else
             f' WHERE s.file_id IN ({files})' if files else '')
    return (f'lc AS ({_last_checks_cte(group, has_log, file_id)}),\n'
            # which backends are S3 tiers: one array, made once (InitPlan), not a join per copy
            "copies AS (SELECT s.file_id, s.storage_id, s.type, s.storage_id = ANY(ARRAY(SELECT storage_id "
            "FROM storage_backend WHERE type = 's3')) AS s3, "
            f'{_sound_original_sql("s", "lc")} AS sound, coalesce(lc.outcome IN ({damaged}), false) AS damaged, '
            'lc.outcome, lc.event, coalesce(lc.checked_at, s.created_at) AS last_check '
            f'FROM {group.storage_table} s '
            'LEFT JOIN lc ON lc.file_id = s.file_id AND lc.storage_id = s.storage_id AND lc.type = s.type '
            f"AND lc.checked_at >= coalesce(s.created_at, '-infinity'){where})")


def _coverage_query(group: _Group, by: str, selection: str | None, batches: list, has_log: bool) -> str:
    """SQL: one pass over the group's files and copies, giving a row per key of the dimension
    and a total row (is_total). `selection` is a batch's SELECT (None: every file of the group);
    for `by == 'batch'`, `batches` are the batches whose files make the rows."""
    types = ', '.join(map(str, ORIGINAL_COPY_TYPES))
    if by == 'batch':
        keyed_files = ' UNION ALL '.join(f'SELECT {_quote(b.id)} AS key, bf.file_id FROM ({batch_sql(b)}) bf'
                                         for b in batches)
        where = f'f.file_id IN (SELECT file_id FROM batch_files)'
    else:
        keyed_files = None
        where = f'f.file_id IN (SELECT file_id FROM ({selection}) sel)' if selection else 'TRUE'
    per_file = (
        'per_file AS MATERIALIZED (SELECT f.file_id, f.file_size, f.deployment_id, f.time, coalesce(a.n, 0) AS n, '
        'coalesce(a.online, false) AS online, coalesce(a.never, false) AS never, a.oldest, '
        'coalesce(a.damaged, false) AS damaged '
        f'FROM {group.files_table} f LEFT JOIN (SELECT c.file_id, count(*) FILTER (WHERE c.sound) AS n, '
        'bool_or(c.sound AND c.s3) AS online, bool_or(c.sound AND c.last_check IS NULL) AS never, '
        'min(c.last_check) FILTER (WHERE c.sound) AS oldest, bool_or(c.damaged) AS damaged '
        f'FROM copies c WHERE c.type IN ({types}) GROUP BY c.file_id) a ON a.file_id = f.file_id WHERE {where})')
    def counts_of(rows: str) -> str:
        return (f'count(*) FILTER (WHERE {rows}), coalesce(sum(p.file_size) FILTER (WHERE {rows}), 0)::bigint, '
                + ', '.join(f'count(*) FILTER (WHERE {rows} AND {c})' for c in (
                    'p.n = 0', 'p.n = 1', 'p.n = 2', 'p.n >= 3', 'p.online', 'p.n > 0 AND NOT p.online')))
    counts = counts_of('TRUE')
    per_file_checks = ('count(*) FILTER (WHERE p.never), min(p.oldest), count(*) FILTER (WHERE p.damaged), '
                       'NULL::bigint, NULL::bigint')
    month = "to_char(p.time AT TIME ZONE 'UTC', 'YYYY-MM')"
    nodes = ('FROM per_file p LEFT JOIN deployments d ON d.deployment_id = p.deployment_id '
             'LEFT JOIN nodes n ON n.node_id = d.node_id')
    # Where each file is in one row, the total is a grouping set of the same pass; where a file
    # may be in several (tag, batch, backend), the files are counted once more for it.
    if by == 'deployment':
        single = ('p.deployment_id', 'p.deployment_id', 'p.deployment_id::text', 'NULL::text', 'min(n.node_label)',
                  nodes)
    elif by == 'deployment_month':
        single = (f'p.deployment_id, {month}', 'p.deployment_id', 'p.deployment_id::text', month,
                  'min(n.node_label)', nodes)
    elif by == 'node':
        single = ('n.node_label', 'n.node_label', 'n.node_label::text', 'NULL::text', 'min(n.type)', nodes)
    elif by == 'month':
        single = (month, month, month, 'NULL::text', 'NULL::text', 'FROM per_file p')
    elif by == 'tag':
        keyed = (f'SELECT t.name::text AS key, NULL::text AS key2, NULL::text AS label, {counts}, {per_file_checks} '
                 'FROM per_file p LEFT JOIN mm_tags_deployments md ON md.deployments_deployment_id = p.deployment_id '
                 'LEFT JOIN tags t ON t.tag_id = md.tags_tag_id GROUP BY t.name')
    elif by == 'batch':
        keyed = (f'SELECT k.key, NULL::text AS key2, NULL::text AS label, {counts}, {per_file_checks} '
                 'FROM (SELECT DISTINCT key, file_id FROM batch_files) k JOIN per_file p ON p.file_id = k.file_id '
                 'GROUP BY k.key')
    elif by != 'backend':
        raise ConfigError(f"unknown --by '{by}'; use one of: {', '.join(COVERAGE_DIMENSIONS)}")
    total = f'SELECT NULL::text, NULL::text, NULL::text, {counts}, {per_file_checks} FROM per_file p'
    # A batch's copies only: the copies of a few files of a large catalog are not all aggregated.
    if keyed_files:
        ctes = (f'batch_files AS ({keyed_files}),\n'
                + _copies_ctes(group, has_log, files='SELECT file_id FROM batch_files'))
    else:
        ctes = _copies_ctes(group, has_log, files=f'SELECT file_id FROM ({selection}) sel' if selection else None)
    if by == 'backend':
        # Each copy with its file's numbers (window functions over the file's copies), in one pass:
        # the rows count copies per backend; the total counts each file once (its first row).
        window = ('count(*) FILTER (WHERE c.sound) OVER w AS n, coalesce(bool_or(c.sound AND c.s3) OVER w, false) '
                  'AS online, coalesce(bool_or(c.sound AND c.last_check IS NULL) OVER w, false) AS never, '
                  'min(c.last_check) FILTER (WHERE c.sound) OVER w AS oldest, '
                  f'coalesce(bool_or(c.damaged AND c.type IN ({types})) OVER w, false) AS file_damaged, '
                  'row_number() OVER w = 1 AS first')
        per_copy = (f'per_copy AS (SELECT f.file_id, f.file_size, c.storage_id, c.type, c.sound, c.damaged, '
                    f'c.last_check, {window} FROM {group.files_table} f LEFT JOIN copies c ON c.file_id = f.file_id '
                    f'WHERE {where} WINDOW w AS (PARTITION BY f.file_id))')
        return (f'WITH {ctes},\n{per_copy}\n'
                'SELECT GROUPING(p.storage_id) = 1 AS is_total, p.storage_id::text AS key, NULL::text AS key2, '
                f"NULL::text AS label, {counts_of('p.storage_id IS NOT NULL')}, "
                'count(*) FILTER (WHERE p.sound AND p.last_check IS NULL), min(p.last_check) FILTER (WHERE p.sound), '
                'count(*) FILTER (WHERE p.damaged), count(*) FILTER (WHERE p.sound), '
                f"count(*) FILTER (WHERE p.type NOT IN ({types})), {counts_of('p.first')}, "
                'count(*) FILTER (WHERE p.first AND p.never), min(p.oldest), '
                'count(*) FILTER (WHERE p.first AND p.file_damaged) '
                'FROM per_copy p GROUP BY GROUPING SETS ((p.storage_id), ())')
    if by in ('deployment', 'deployment_month', 'node', 'month'):
        grouping, first, key, key2, label, source = single
        return (f"WITH {ctes},\n{per_file.replace('AS MATERIALIZED', 'AS', 1)}\n"
                f'SELECT GROUPING({first}) = 1 AS is_total, {key} AS key, {key2} AS key2, {label} AS label, '
                f'{counts}, {per_file_checks} {source} GROUP BY GROUPING SETS (({grouping}), ())')
    return (f'WITH {ctes},\n{per_file}\n'
            f'SELECT false AS is_total, * FROM ({keyed}) keyed\nUNION ALL\nSELECT true, * FROM ({total}) total')


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _at_risk_query(group: _Group, selection: str | None, below: int, has_log: bool) -> str:
    """SQL: the files with fewer than `below` sound copies of the original, fewest first, then by
    name, each with its copies (every version) as JSON, looked up for these files only."""
    where = f'f.file_id IN (SELECT file_id FROM ({selection}) sel)' if selection else 'TRUE'
    files = f'SELECT file_id FROM ({selection}) sel' if selection else None
    return (f'WITH {_copies_ctes(group, has_log, files=files)},\n'
            'risky AS (SELECT f.file_id, f.object_name, coalesce(a.n, 0) AS n '
            f'FROM {group.files_table} f LEFT JOIN (SELECT c.file_id, count(*) FILTER (WHERE c.sound) AS n '
            'FROM copies c GROUP BY c.file_id) a ON a.file_id = f.file_id '
            f'WHERE {where} AND coalesce(a.n, 0) < {int(below)})\n'
            'SELECT r.file_id, r.object_name, r.n, w.places FROM risky r CROSS JOIN LATERAL ('
            "SELECT coalesce(json_agg(json_build_object('storage_id', s.storage_id, 'type', s.type, 'sound', "
            f"{_sound_original_sql('s', 'lcx')}, 'outcome', lcx.outcome, 'last_check', "
            'coalesce(lcx.checked_at, s.created_at)) ORDER BY b.priority, s.storage_id), \'[]\') AS places '
            f'FROM {group.storage_table} s JOIN storage_backend b ON b.storage_id = s.storage_id '
            f"{_last_check_join(group, 's', 'lcx', has_log)} WHERE s.file_id = r.file_id) w "
            'ORDER BY r.n, r.object_name COLLATE "C"')


def _coverage_groups(batch_id: str | None, by: str) -> list[tuple[_Group, str | None, list]]:
    """The groups to count, each with its selection (a batch's SELECT, or None for every file)
    and, for `--by batch`, the batches that make its rows."""
    if batch_id is not None:
        batch = find_batch(batch_id)
        return [(GROUPS[batch.group], batch_sql(batch), [batch])]
    batches = list(load_batches().values()) if by == 'batch' else []
    return [(group, None, [b for b in batches if b.group == group.name]) for group in GROUPS.values()]


def _sort_key(by: str, key):
    if key is None:
        return (1, 0, '')
    if by in ('deployment', 'backend', 'deployment_month'):
        with contextlib.suppress(ValueError):
            return (0, int(key), '')
    return (0, 0, str(key))


def coverage(settings: Settings, batch_id: str | None = None, *, by: str = 'deployment',
             at_risk_below: int | None = None, conn=None) -> _CoverageReport:
    """Count the files of BATCH (every file of both groups without one) by the number of
    backends holding a sound copy of their original, grouped `by` a dimension (see
    COVERAGE_DIMENSIONS; 'deployment_month' too, for the page's chart). With `at_risk_below`,
    also list the files with fewer sound copies than that, with where their copies are."""
    if by not in COVERAGE_DIMENSIONS + ('deployment_month',):
        raise ConfigError(f"unknown --by '{by}'; use one of: {', '.join(COVERAGE_DIMENSIONS)}")
    if at_risk_below is not None and at_risk_below < 1:
        raise ConfigError('--at-risk N must be at least 1')
    groups = _coverage_groups(batch_id, by)
    own = conn is None
    conn = conn or connect_catalog(settings)
    rows, totals, at_risk = [], [], [] if at_risk_below is not None else None
    try:
        has_log = _has_fixity_log(conn)
        backends = {b.storage_id: b for b in fetch_backends(conn)}
        made = dt.datetime.now(dt.timezone.utc)
        for group, selection, batches in groups:
            if by == 'batch' and not batches:
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute(_coverage_query(group, by, selection, batches, has_log))
                    result = cur.fetchall()
                    if at_risk_below is not None:
                        cur.execute(_at_risk_query(group, selection, at_risk_below, has_log))
                        risky = cur.fetchall()
                conn.commit()
            except psycopg2.Error as exc:
                with contextlib.suppress(psycopg2.Error):
                    conn.rollback()
                if catalog_outage(exc) or batch_id is None and by != 'batch':
                    raise
                named = ', '.join(f"'{b.id}'" for b in batches)
                raise ConfigError(f'batch {named} (batches.py) cannot be selected: {pg_error_line(exc)}') from None
            group_rows = []
            for record in result:
                is_total, key, key2, label = record[:4]
                values = record[4:17]
                if by == 'backend':
                    if is_total:
                        values = record[17:28] + (None, None)     # each file once
                    elif key is None:
                        continue                                  # files on no backend
                files, size, c0, c1, c2, c3, online, offline, never, oldest, damaged, originals, versions = values
                if by == 'backend' and key is not None and not is_total:
                    backend = backends.get(int(key))
                    label = backend.notes if backend else None
                    key = int(key)
                elif by in ('deployment', 'deployment_month') and key is not None:
                    key = int(key)
                row = _CoverageRow(group.name, key, label, files, int(size), dict(zip(COPY_BUCKETS, (c0, c1, c2, c3))),
                                  online, offline, never, oldest, damaged, originals, versions, key2)
                if is_total:
                    row.key, row.label = None, 'all'
                    totals.append(row)
                else:
                    group_rows.append(row)
            group_rows.sort(key=lambda r: (_sort_key(by, r.key), r.key2 or ''))
            rows += group_rows
            if at_risk is not None:
                for file_id, object_name, n, copies in risky:
                    at_risk.append(_AtRiskFile(group.name, file_id, object_name, n,
                                              [_copy_place(group.name, object_name, c, backends) for c in copies]))
    finally:
        if own:
            conn.close()
    return _CoverageReport(by, batch_id, rows, totals, at_risk, at_risk_below, has_log, made)


def _copy_place(group: str, object_name: str, copy: dict, backends: dict) -> dict:
    """Where one copy of an at-risk file is: backend, its label and tier, the version, and
    whether it counts (rule 8)."""
    backend = backends.get(copy['storage_id'])
    version = VERSIONS.get((group, copy['type']))
    return {'storage_id': copy['storage_id'], 'label': backend.notes if backend else None,
            'backend_type': backend.type if backend else None, 'priority': backend.priority if backend else None,
            'type': copy['type'], 'version': version.label if version else 'unknown', 'sound': copy['sound'],
            'outcome': copy['outcome'], 'last_check': copy['last_check']}   # ISO text, as json_agg gives it


@dataclasses.dataclass
class _DueBackend:
    """A backend with copies due a check: not checked (nor written) within `every_days`."""
    storage_id: int
    type: str
    label: str | None
    priority: int
    copies: int
    due: int
    never_checked: int
    oldest_check: dt.datetime | None

    def as_dict(self) -> dict:
        entry = dataclasses.asdict(self)
        entry['oldest_check'] = self.oldest_check.isoformat() if self.oldest_check else None
        return entry


def copies_due(settings: Settings, every_days: float = DUE_EVERY_DAYS, *, conn=None) -> list[_DueBackend]:
    """Per backend, its copies and how many are due a check (last checked, or written, longer
    ago than `every_days`, or never): one aggregate query per group."""
    own = conn is None
    conn = conn or connect_catalog(settings)
    found: dict[int, list] = {}
    try:
        has_log = _has_fixity_log(conn)
        backends = {b.storage_id: b for b in fetch_backends(conn)}
        for group in GROUPS.values():
            with conn.cursor() as cur:
                cur.execute(f'WITH {_copies_ctes(group, has_log)} SELECT c.storage_id, count(*), '
                            'count(*) FILTER (WHERE c.last_check IS NULL OR c.last_check < now() - '
                            "interval '1 day' * %s), count(*) FILTER (WHERE c.last_check IS NULL), min(c.last_check) "
                            'FROM copies c GROUP BY c.storage_id', (float(every_days),))
                for storage_id, copies, due, never, oldest in cur.fetchall():
                    entry = found.setdefault(storage_id, [0, 0, 0, None])
                    entry[0] += copies
                    entry[1] += due
                    entry[2] += never
                    entry[3] = oldest if entry[3] is None else min(entry[3], oldest) if oldest else entry[3]
            conn.commit()
    finally:
        if own:
            conn.close()
    due = []
    for storage_id, (copies, n_due, never, oldest) in sorted(found.items()):
        backend = backends.get(storage_id)
        if backend is None or not n_due:
            continue
        due.append(_DueBackend(storage_id, backend.type, backend.notes, backend.priority, copies, n_due, never, oldest))
    return due


# --- whereis -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Whereabouts:
    """Every copy of one file: which backend, which version, where, whether it is online now,
    when it was last checked and how that went; and, for an original offline only, the disks
    to mount."""
    group: str
    file: dict
    copies: list

    def as_dict(self) -> dict:
        """What `whereis --json` prints and the service's GET /KIND/ID answers."""
        return {'file': self.file, 'copies': self.copies}


def _iso(value) -> str | None:
    return value.isoformat() if isinstance(value, (dt.datetime, dt.date)) else value


def where_is(settings: Settings, group: str, file: str | int, *, conn=None) -> _Whereabouts:
    """Every copy of one file, found by its file_id or its object_name. NotFound('file') when
    the catalog does not know it. Disks are online when their dot-file is found at their path or
    under the mount roots (as `info` finds them); S3 tiers are online when configured."""
    group_ = _find_group(group)
    own = conn is None
    conn = conn or connect_catalog(settings)
    try:
        has_log = _has_fixity_log(conn)
        columns = 'f.file_id, f.object_name, f.file_size, f.sha256, f.time, f.deployment_id, n.node_label'
        head = (f'SELECT {columns} FROM {group_.files_table} f LEFT JOIN deployments d ON d.deployment_id = '
                'f.deployment_id LEFT JOIN nodes n ON n.node_id = d.node_id WHERE ')
        with conn.cursor() as cur:
            row = None
            text = str(file).strip()
            if text.isdigit() and int(text) < 2 ** 31:
                cur.execute(head + 'f.file_id = %s', (int(text),))
                row = cur.fetchone()
            if row is None:
                cur.execute(head + 'f.object_name = %s', (text,))
                row = cur.fetchone()
            if row is None:
                conn.commit()
                raise NotFound(f"no {group_.name} file with id or object name '{text}' in the catalog", 'file')
            file_id, object_name, file_size, sha256, taken, deployment_id, node_label = row
            cur.execute(f'WITH {_copies_ctes(group_, has_log, file_id)} SELECT c.storage_id, c.type, c.last_check, '
                        'c.outcome, c.event, c.sound FROM copies c')
            held = cur.fetchall()
        conn.commit()
        backends = {b.storage_id: b for b in fetch_backends(conn)}
    finally:
        if own:
            conn.close()
    copies = []
    for storage_id, version_type, last_checked, outcome, check_event, sound in held:
        backend = backends[storage_id]
        version = VERSIONS.get((group_.name, version_type))
        stored_name = version.object_name(object_name) if version else object_name
        if backend.type == 'local':
            mounted_at = _disk_whereabouts(backend)
            online = mounted_at is not None
            root = mounted_at or Path(backend.url_prefix)
            location = str(root / 'archive' / stored_name)
        else:
            mounted_at, online = None, True
            location = f'{backend.url_prefix.rstrip("/")}/{stored_name}'
        # A copy without a check since it was written was checked when it was written.
        last_check = None if last_checked is None else {
            'checked_at': last_checked.isoformat(), 'outcome': outcome or 'ok', 'event': check_event or 'written'}
        copies.append({'storage_id': storage_id, 'type': version_type,
                       'version': version.label if version else 'unknown', 'backend_type': backend.type,
                       'priority': backend.priority, 'tier': PRIORITY_TIERS.get(backend.priority, 'other'),
                       'url_prefix': backend.url_prefix, 'location': location, 'label': backend.notes,
                       'online': online, 'mounted_at': str(mounted_at) if mounted_at else None,
                       'original': version_type in ORIGINAL_COPY_TYPES, 'sound': bool(sound),
                       'last_check': last_check})
    copies.sort(key=lambda c: (c['priority'], c['storage_id']))
    sound_copies = [c for c in copies if c['sound']]
    online_original = any(c['online'] for c in sound_copies)
    offline_only = bool(sound_copies) and not any(c['backend_type'] == 's3' for c in sound_copies)
    to_mount = ([{'storage_id': c['storage_id'], 'label': c['label'], 'url_prefix': c['url_prefix']}
                 for c in sound_copies] if offline_only and not online_original else [])
    summary = {'group': group_.name, 'file_id': file_id, 'object_name': object_name, 'file_size': int(file_size or 0),
               'sha256': (sha256 or '').strip().lower(), 'time': _iso(taken), 'deployment_id': deployment_id,
               'node_label': node_label, 'sound_copies': len(sound_copies), 'online_original': online_original,
               'offline_only': offline_only, 'disks_to_mount': to_mount}
    return _Whereabouts(group_.name, summary, copies)


# --- report ------------------------------------------------------------------------------------------------

REPORT_FILES = ('manifest-sha256.txt', 'REPORT.md', 'archive_index.db')


@dataclasses.dataclass(frozen=True)
class _DiskReport:
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


def write_report(settings: Settings, storage_id: int, *, path: str | None = None) -> _DiskReport:
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
    return _DiskReport(backend.root, [backend.root / name for name in REPORT_FILES], manifest['originals'],
                      manifest['bytes'], index_rows)


def _write_manifest(conn, backend: LocalBackend) -> dict:
    """manifest-sha256.txt: `<sha256>  archive/<object name>` for every original recorded on the
    disk (the BagIt manifest convention), which `sha256sum -c` accepts from the disk's root."""
    originals = size = 0
    prefix = backend.archive.name
    with _atomic_file(backend.root / 'manifest-sha256.txt') as tmp, open(tmp, 'x', encoding='utf-8') as manifest:
        for group in GROUPS.values():
            query = sql.SQL('SELECT f.object_name, f.sha256, f.file_size FROM {} s JOIN {} f ON f.file_id = s.file_id '
                            'WHERE s.storage_id = %s AND s.type = 0 ORDER BY f.object_name COLLATE "C"').format(
                sql.Identifier(group.storage_table), sql.Identifier(group.files_table))
            for object_name, sha256_hex, file_size in _streamed_rows(conn, query, (backend.row.storage_id,), 5000):
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
    rows = _streamed_rows(conn, query, params, 5000, columns)
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
    has_log = _has_fixity_log(conn)
    with _atomic_file(final) as tmp:
        index = sqlite3.connect(tmp)
        try:
            with index:
                for group in GROUPS.values():
                    # Each file's last check, so that the disk says when it was last proven: the
                    # fixity log's newest row for the copy, else its writing (outcome 'ok', event
                    # 'written': it was checked as it was written).
                    counts[group.files_table] = _copy_query(conn, index, group.files_table, sql.SQL(
                        'SELECT f.*, s.type AS version_type, {last} AS checked_at, '
                        "CASE WHEN c.outcome IS NOT NULL THEN c.outcome WHEN s.created_at IS NOT NULL THEN 'ok' END "
                        'AS outcome, '
                        "CASE WHEN c.outcome IS NOT NULL THEN c.event WHEN s.created_at IS NOT NULL THEN 'written' END "
                        'AS check_event FROM {} s JOIN {} f ON f.file_id = s.file_id {check} '
                        'WHERE s.storage_id = %s ORDER BY f.file_id').format(
                        sql.Identifier(group.storage_table), sql.Identifier(group.files_table),
                        last=sql.SQL(_last_checked_sql('s', 'c')),
                        check=sql.SQL(_last_check_join(group, 's', 'c', has_log))),
                        (storage_id,))
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
              'and deployment_tags; `version_type` says which version of a file is here (0 is the original), and '
              '`checked_at`, `outcome` and `check_event` its last check (from the fixity log; `written` where none was '
              'logged after it was written and checked):', '',
              '    sqlite3 archive_index.db "SELECT min(checked_at) FROM files_image"          # the oldest last check',
              '    sqlite3 archive_index.db "SELECT object_name FROM files_image WHERE outcome IN '
              "('missing', 'corrupt')\"", '']
    _write_text_file(backend.root / 'REPORT.md', '\n'.join(lines))


# =================================================================================================
# Command line
# =================================================================================================
#
# Everything the tool prints is printed here: results on stdout, messages on stderr (through
# the logger's handler, which keeps the progress bar intact).

def _format_summary(report: RunReport) -> str:
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


def _n_copies(n: int) -> str:
    return f'{n:,} {"copy" if n == 1 else "copies"}'


def _format_verify_report(report: VerifyReport) -> str:
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
    if report.lists_files and not report.walked:
        lines.append('  (unknown files are looked for on a full pass: the whole backend verified without a batch, '
                     '--not-checked-within, --max-files or --max-time)')
    if report.scrub and report.remaining is not None:
        if report.budget_spent:
            lines.append(f'  stopped at its budget ({report.budget_spent}): no new file was started after it; the files '
                         'in flight were finished and logged')
        if report.not_checked_within is not None:
            within = f'{report.not_checked_within:g} days'
            lines.append(f'  {_n_copies(report.remaining)} {"remains" if report.remaining == 1 else "remain"} due (not '
                         f'checked within {within}): run the same command again to go on' if report.remaining else
                         f'  no copies remain due: all were checked within {within}')
        elif report.remaining:
            were = 'was' if report.remaining == 1 else 'were'
            lines.append(f'  {_n_copies(report.remaining)} {were} not reached by this slice: the next one starts '
                         'with them (least recently checked first)')
        else:
            lines.append('  every copy selected was checked')
    for note in report.notes:
        lines.append(f'  note: {note}')
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


def _print_plan(plan: Plan) -> RunReport:
    report = RunReport(plan.command, plan.title)
    print(f'dry run: would {plan.command} {plan.title}')
    with plan:
        for action, file in plan:
            print(f'  {action}: {file.object_name} ({human_bytes(file.file_size)})')
            report.counts['would do'] = report.count('would do') + 1
            report.bytes_done += file.file_size
    print(f"dry run: would {plan.command} {report.count('would do')} files, {human_bytes(report.bytes_done)}; "
          'nothing was written')
    for note in plan.notes:
        print(f'  note: {note}')
    return report


def _print_recall_plan(report: ExportReport) -> None:
    if report.manifest and report.manifest.exists():
        print(f'  check the folder without the database: cd {report.directory} && sha256sum -c {EXPORT_MANIFEST}')
    if report.recall:
        print(f'recall plan: {report.offline:,} files are held only on disks that are not mounted; mount')
        for step in report.recall:
            print(f'  {step.describe()}')
        print('then run the same command again')


def _print_backends(listing: list[dict]) -> None:
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


def _print_due(listing: list[dict], every_days: float) -> None:
    if not listing:
        print('no storage backends yet: add one with `create`')
        return
    day = lambda text: text[:10] if text else 'never'
    rows = [('ID', 'TYPE', 'PRIO', 'COPIES', 'DUE', 'NEVER CHECKED', 'DAMAGED', 'OLDEST CHECK', 'CHECKED IN FULL',
             'PATH OR URL / NOTES')]
    for e in listing:
        where = e['url_prefix'] + (f" ({e['notes']})" if e['notes'] else '')
        rows.append((str(e['storage_id']), e['type'], str(e['priority']), f"{e['copies']:,}", f"{e['due']:,}",
                     f"{e['never_checked']:,}", f"{e['damaged']:,}",
                     day(e['oldest_check']) if e['copies'] else '–',
                     (day(e['checked_in_full']) if e['checked_in_full'] else 'not yet') if e['copies'] else '–',
                     where.replace('\n', ' ')))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print(f'copies due a check: last checked more than {every_days:g} days ago, or never')
    for row in rows:
        print('  '.join(cell.rjust(width) if 3 <= i <= 6 else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))) + '  ' + row[-1])
    due = [e for e in listing if e['due']]
    for e in due:
        offline = e['type'] == 'local' and not e.get('online')
        print(f"  backend {e['storage_id']}{' (' + e['notes'] + ')' if e['notes'] else ''}: {_n_copies(e['due'])} due"
              + (': mount it, then' if offline else ':') + f" verify {e['storage_id']} --not-checked-within "
              f'{every_days:g} [--max-time MIN]')
    for e in listing:
        if e['damaged']:
            print(f"  backend {e['storage_id']}: {_n_copies(e['damaged'])} found missing or corrupt by their last "
                  f"check, counting for nothing: verify {e['storage_id']} --fix, then copy them back")
    if not due:
        print(f'  no copies are due: every copy was checked within {every_days:g} days')


def _print_batches(batches: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{'id': b.id, 'group': b.group, 'description': b.description} for b in batches.values()],
                         indent=2))
        return
    width = max((len(b) for b in batches), default=2)
    print(f"{'ID'.ljust(width)}  GROUP  DESCRIPTION")
    for batch in batches.values():
        print(f'{batch.id.ljust(width)}  {batch.group.ljust(5)}  {batch.description}')


def _print_disk_report(result: _DiskReport) -> None:
    for path in result.written:
        print(f'wrote {path}')
    print(f'  {result.originals:,} originals in the manifest ({human_bytes(result.original_bytes)}); check them '
          f'without the database: cd {result.root} && sha256sum -c manifest-sha256.txt')


COVERAGE_KEY_HEADINGS = {'batch': 'BATCH', 'deployment': 'DEPLOYMENT', 'node': 'NODE', 'tag': 'TAG', 'month': 'MONTH',
                         'backend': 'BACKEND'}


def _day(value: dt.datetime | None) -> str:
    return value.astimezone(dt.timezone.utc).strftime('%Y-%m-%d') if value else '–'


def _coverage_key_text(row: _CoverageRow) -> str:
    if row.key is None:
        return 'all' if row.label == 'all' else '(none)'
    return f'{row.key} {row.label}' if row.label else str(row.key)


def _copies_text(copies: int) -> str:
    return f"{copies} sound cop{'y' if copies == 1 else 'ies'}"


def _where_text(place: dict) -> str:
    """One copy of an at-risk file: `backend 3 "Archive 07" (original, corrupt)`."""
    label = f' "{place["label"]}"' if place['label'] else ''
    state = ''
    if place['type'] in ORIGINAL_COPY_TYPES:
        state = ', sound' if place['sound'] else f", {place['outcome']}"
    return f"backend {place['storage_id']}{label} ({place['version']}{state})"


def _print_coverage(report: _CoverageReport) -> None:
    what = f"batch '{report.batch}'" if report.batch else 'every file of both groups'
    print(f'coverage of {what}, by {report.by}: files counted by the backends that hold a sound copy of their '
          'original (the original or its gzip, not found missing or corrupt by its last check)')
    header = ('GROUP', COVERAGE_KEY_HEADINGS[report.by], 'FILES', 'BYTES', '0', '1', '2', '3+', 'ONLINE',
              'OFFLINE ONLY', 'NEVER CHECKED', 'DAMAGED', 'OLDEST CHECK')
    lines = [header]
    overlapping = report.by in ('batch', 'tag', 'backend')
    for group in GROUPS:
        group_rows = [r for r in report.rows if r.group == group]
        totals = [r for r in report.totals if r.group == group]
        for row in group_rows + ([] if (overlapping and group_rows) else totals):
            lines.append((row.group, _coverage_key_text(row), f'{row.files:,}', human_bytes(row.bytes),
                          *(f'{row.copies[k]:,}' for k in COPY_BUCKETS), f'{row.online:,}', f'{row.offline_only:,}',
                          f'{row.never_checked:,}', f'{row.damaged:,}', _day(row.oldest_check)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = set(range(2, len(header) - 1))
    for line in lines:
        print('  '.join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
              .rstrip())
    if overlapping:
        print(f'  (a file counts in the row of each {report.by} it belongs to' +
              ('; NEVER CHECKED, DAMAGED and OLDEST CHECK speak of the copies on that backend)'
               if report.by == 'backend' else ')'))
    if not report.has_log:
        print('  (no fixity log in this catalog: a copy counts as checked when it was written; `init-db` creates '
              'the log)')
    for total in report.totals:
        zero, one = total.copies['0'], total.copies['1']
        if zero:
            print(f'{total.group}: {zero:,} of {total.files:,} files have NO sound copy of their original')
        elif total.files:
            print(f'{total.group}: all {total.files:,} files have a sound copy of their original'
                  + (f'; {one:,} of them only one' if one else ''))
    if report.at_risk is not None:
        below = report.at_risk_below
        if not report.at_risk:
            print(f'at risk: none; every file has at least {_copies_text(below)}')
        else:
            print(f'at risk: {len(report.at_risk):,} files with fewer than {_copies_text(below)} of the original:')
            for entry in report.at_risk:
                where = '; '.join(_where_text(place) for place in entry.where) or 'no copy recorded anywhere'
                print(f'  {entry.group} {entry.file_id} {entry.object_name}: {_copies_text(entry.copies)}; {where}')


def _print_whereis(found: _Whereabouts) -> None:
    f = found.file
    print(f"{f['group']} {f['file_id']} {f['object_name']}: {human_bytes(f['file_size'])}, sha256 {f['sha256']}")
    print(f"  taken {f['time'] or '?'} by node {f['node_label'] or '?'} (deployment {f['deployment_id']})")
    if not found.copies:
        print('  no backend records a copy of it')
    rows = [('ID', 'VERSION', 'TIER', 'ONLINE', 'LAST CHECK', 'LABEL', 'WHERE')]
    for c in found.copies:
        check = c['last_check']
        check_text = (f"{check['checked_at'][:19].replace('T', ' ')} {check['outcome']} ({check['event']})"
                      if check else 'never')
        online = ('yes' if c['online'] else 'no') + ('' if c['sound'] or not c['original'] else ', DAMAGED')
        rows.append((str(c['storage_id']), f"{c['type']} {c['version']}", f"{c['priority']} {c['tier']}", online,
                     check_text, c['label'] or '', c['location']))
    if found.copies:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            print('  ' + '  '.join(cell.ljust(w) for cell, w in zip(row, widths)) + '  ' + row[-1])
    print(f"  {_copies_text(f['sound_copies'])} of the original"
          + ('; online now' if f['online_original'] else '; none online now' if f['sound_copies'] else ''))
    if f['disks_to_mount']:
        print('  the original is offline only: mount ' + ' or '.join(
            f"disk {d['storage_id']} \"{d['label'] or ''}\" (recorded at {d['url_prefix']})"
            for d in f['disks_to_mount']))


# --- the coverage page (coverage --html) -------------------------------------------------------------------
#
# One self-contained HTML file: inline CSS and SVG drawn from the small templates below, no script,
# no outside asset, so that it opens from a USB stick on any machine. No chart library: the three
# charts are rectangles and text, which a template draws in a few lines and a library would add a
# dependency (and, for the JavaScript ones, a script) for.

COPY_COLOURS = {'0': '#c62828', '1': '#ef8a17', '2': '#8bc34a', '3+': '#2e7d32'}
COPY_WORDS = {'0': 'no sound copy', '1': 'one copy only', '2': 'two copies', '3+': 'three or more'}

PAGE_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2733;background:#f4f6f8}
header{background:#1f3a4d;color:#fff;padding:20px 32px}header h1{margin:0;font-size:24px}
header p{margin:4px 0 0;color:#c9d6df}main{padding:8px 32px 40px;max-width:1400px}
section{overflow-x:auto;background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:16px 20px;
margin:16px 0}
h2{font-size:18px;margin:0 0 4px}p.note{color:#5b6b79;margin:2px 0 12px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{flex:1 1 120px;box-sizing:border-box;border-radius:6px;padding:8px 12px;
background:#f4f6f8;border-left:6px solid #90a4ae}.card b{display:block;font-size:22px;white-space:nowrap}
.card span{color:#5b6b79}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #e3e8ec;text-align:right;
white-space:nowrap}th{background:#eef2f5;position:sticky;top:0}td.k,th.k{text-align:left}
tr.total td{font-weight:bold;border-top:2px solid #90a4ae}.bad{color:#c62828;font-weight:bold}
.warn{color:#b25e00;font-weight:bold}.legend span{display:inline-block;margin-right:16px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px;border-radius:2px}
.ok{color:#2e7d32;font-weight:bold}svg text{font:11px system-ui,sans-serif;fill:#1d2733}
"""


def _e(value) -> str:
    import html
    return html.escape('' if value is None else str(value), quote=True)


def _legend() -> str:
    return '<p class="legend">' + ''.join(f'<span><i style="background:{COPY_COLOURS[k]}"></i>{COPY_WORDS[k]}</span>'
                                          for k in COPY_BUCKETS) + '</p>'


def _group_cards(total: _CoverageRow) -> str:
    cards = [(f'{total.files:,}', f'{total.group} files, {human_bytes(total.bytes)}', '#1f3a4d')]
    cards += [(f'{total.copies[k]:,}', COPY_WORDS[k], COPY_COLOURS[k]) for k in COPY_BUCKETS]
    cards += [(f'{total.online:,}', 'original online (S3)', '#90a4ae'),
              (f'{total.offline_only:,}', 'original on disks only', '#90a4ae'),
              (f'{total.never_checked:,}', 'never checked', '#90a4ae'),
              (_day(total.oldest_check), 'oldest last check', '#90a4ae')]
    return '<div class="cards">' + ''.join(
        f'<div class="card" style="border-left-color:{colour}"><b data-group="{_e(total.group)}" data-key="all" '
        f'data-card="{_e(text)}">{_e(value)}</b><span>{_e(text)}</span></div>' for value, text, colour in cards) + '</div>'


def _share_bar(row: _CoverageRow, width: int = 1000, height: int = 26) -> str:
    """One stacked bar: the row's files by copies, left to right from 0 to 3+."""
    parts, x = [], 0.0
    for k in COPY_BUCKETS:
        n = row.copies[k]
        if not n:
            continue
        w = width * n / max(row.files, 1)
        parts.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="{height}" fill="{COPY_COLOURS[k]}">'
                     f'<title>{n:,} files: {COPY_WORDS[k]}</title></rect>')
        if w > 60:
            parts.append(f'<text x="{x + 6:.1f}" y="{height / 2 + 4}" style="fill:#fff">{n:,} · {COPY_WORDS[k]}</text>')
        x += w
    return (f'<svg width="100%" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img">'
            + ''.join(parts) + '</svg>')


def _months_between(first: str, last: str) -> list[str]:
    year, month = map(int, first.split('-'))
    months = []
    while f'{year:04d}-{month:02d}' <= last:
        months.append(f'{year:04d}-{month:02d}')
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


def _heatmap(grid: _CoverageReport, limit: int = 200) -> str:
    """Deployments (rows) by months (columns), each cell its files by copies, stacked: the holes
    of single copies show as orange and red; the deployments with the most holes come first."""
    cells = {}
    labels = {}
    for row in grid.rows:
        if row.key2 is None:
            continue
        key = (row.group, row.key)
        labels[key] = row.label
        cells.setdefault(key, {})[row.key2] = row
    if not cells:
        return '<p class="note">No files.</p>'
    all_months = sorted({m for months in cells.values() for m in months})
    months = _months_between(all_months[0], all_months[-1]) if len(all_months) < 600 else all_months

    groups = list(GROUPS)

    def worst(key) -> tuple:
        counts = _collections_sum(cells[key].values())
        return (groups.index(key[0]), -counts['0'], -counts['1'], key[1] if key[1] is not None else -1)
    ordered = sorted(cells, key=worst)
    shown, hidden = ordered[:limit], ordered[limit:]
    cell_w = max(9, min(44, 900 // max(len(months), 1)))
    cell_h, left, top = 20, 190, 46
    width = left + cell_w * len(months) + 330
    height = top + cell_h * len(shown) + 6
    parts = []
    for i, month in enumerate(months):
        x = left + i * cell_w
        if month.endswith('-01') or (i == 0 and month < f'{month[:4]}-11'):
            parts.append(f'<text x="{x}" y="{top - 24}" style="font-weight:bold">{month[:4]}</text>')
        if cell_w >= 18 or month[5:] in ('01', '04', '07', '10'):
            parts.append(f'<text x="{x + 2}" y="{top - 8}">{month[5:]}</text>')
    for j, key in enumerate(shown):
        y = top + j * cell_h
        group, deployment = key
        name = f'{group} {deployment if deployment is not None else "?"} {labels[key] or ""}'.strip()
        parts.append(f'<text x="0" y="{y + 14}">{_e(name[:30])}</text>')
        counts = _collections_sum(cells[key].values())
        files = sum(counts.values())
        risky = ', '.join(f'{counts[k]:,} {COPY_WORDS[k]}' for k in ('0', '1') if counts[k])
        parts.append(f'<text x="{left + cell_w * len(months) + 8}" y="{y + 14}">{files:,} files'
                     + (f' · <tspan style="fill:#c62828">{risky}</tspan>' if risky else '') + '</text>')
        for i, month in enumerate(months):
            row = cells[key].get(month)
            if row is None:
                continue
            tip = (f'{name}, {month}: {row.files:,} files; ' +
                   ', '.join(f'{row.copies[k]:,} {COPY_WORDS[k]}' for k in COPY_BUCKETS if row.copies[k]))
            # the cell's files by copies, stacked from none (top) to three or more: a hole of a
            # single file keeps at least two pixels, so that it shows
            tall = cell_h - 1
            sizes = {k: tall * row.copies[k] / max(row.files, 1) for k in COPY_BUCKETS}
            for k in ('0', '1'):
                if row.copies[k]:
                    sizes[k] = max(sizes[k], 2.0)
            rest = tall - sizes['0'] - sizes['1']
            safe = sizes['2'] + sizes['3+']
            for k in ('2', '3+'):
                sizes[k] = sizes[k] * rest / safe if safe else 0.0
            stack, top_y = [], float(y)
            for k in COPY_BUCKETS:
                if row.copies[k] and sizes[k] > 0:
                    stack.append(f'<rect x="{left + i * cell_w}" y="{top_y:.1f}" width="{cell_w - 1}" '
                                 f'height="{sizes[k]:.1f}" fill="{COPY_COLOURS[k]}"/>')
                    top_y += sizes[k]
            parts.append(f'<g><title>{_e(tip)}</title>{"".join(stack)}</g>')
    note = (f'<p class="note">{len(hidden):,} more deployments not drawn (those with the most copies).</p>'
            if hidden else '')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            + ''.join(parts) + '</svg>' + note)


def _collections_sum(rows) -> dict:
    total = dict.fromkeys(COPY_BUCKETS, 0)
    for row in rows:
        for k in COPY_BUCKETS:
            total[k] += row.copies[k]
    return total


def _tier_chart(tiers: _CoverageReport, backends: dict) -> str:
    """Per tier, per backend: the sound originals it holds, its other versions, its damaged copies."""
    per_backend: dict[int, dict] = {}
    for row in tiers.rows:
        entry = per_backend.setdefault(row.key, {'originals': 0, 'versions': 0, 'damaged': 0})
        for field in entry:
            entry[field] += getattr(row, field) or 0
    if not per_backend:
        return '<p class="note">No copies recorded.</p>'
    scale = max(sum(e.values()) for e in per_backend.values()) or 1
    colours = {'originals': '#2e7d32', 'versions': '#64b5f6', 'damaged': '#c62828'}
    words = {'originals': 'sound originals', 'versions': 'other versions', 'damaged': 'damaged'}
    parts, y, left, bar_w = [], 0, 300, 640
    for priority in sorted({backends[k].priority for k in per_backend if k in backends}):
        parts.append(f'<text x="0" y="{y + 14}" style="font-weight:bold">tier {priority}: '
                     f'{_e(PRIORITY_TIERS.get(priority, "other"))}</text>')
        y += 22
        for storage_id in sorted(k for k in per_backend if k in backends and backends[k].priority == priority):
            entry, backend = per_backend[storage_id], backends[storage_id]
            parts.append(f'<text x="12" y="{y + 13}">{storage_id} {_e((backend.notes or backend.url_prefix)[:40])}'
                         '</text>')
            x = float(left)
            for field in ('originals', 'versions', 'damaged'):
                if entry[field]:
                    w = bar_w * entry[field] / scale
                    parts.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 1.5):.1f}" height="18" '
                                 f'fill="{colours[field]}"><title>{entry[field]:,} {words[field]}</title></rect>')
                    x += w
            text = ', '.join(f'{entry[f]:,} {words[f]}' for f in ('originals', 'versions', 'damaged') if entry[f])
            parts.append(f'<text x="{x + 6:.1f}" y="{y + 13}">{_e(text)}</text>')
            y += 24
        y += 6
    width = left + bar_w + 260
    legend = '<p class="legend">' + ''.join(f'<span><i style="background:{colours[f]}"></i>{words[f]}</span>'
                                            for f in colours) + '</p>'
    return legend + f'<svg width="{width}" height="{y}" viewBox="0 0 {width} {y}" role="img">' + ''.join(parts) + '</svg>'


def _coverage_table(report: _CoverageReport) -> str:
    fields = ('files', 'bytes', *COPY_BUCKETS, 'online', 'offline_only', 'never_checked', 'damaged', 'oldest_check')
    heads = ('files', 'bytes', '0 copies', '1', '2', '3+', 'online', 'offline only', 'never checked', 'damaged',
             'oldest check')
    lines = ['<table><thead><tr><th class="k">group</th><th class="k">' + _e(report.by) + '</th>'
             + ''.join(f'<th>{_e(h)}</th>' for h in heads) + '</tr></thead><tbody>']
    overlapping = report.by in ('batch', 'tag', 'backend')
    for group in GROUPS:
        rows = [r for r in report.rows if r.group == group]
        totals = [] if overlapping and rows else [r for r in report.totals if r.group == group]
        for row in rows + totals:
            is_total = any(row is t for t in totals)
            key = 'all' if is_total else ('' if row.key is None else row.key)
            cells = []
            for field in fields:
                if field in COPY_BUCKETS:
                    value, shown = row.copies[field], f'{row.copies[field]:,}'
                    css = ' class="bad"' if field == '0' and value else ' class="warn"' if field == '1' and value else ''
                elif field == 'bytes':
                    value, shown, css = row.bytes, human_bytes(row.bytes), ''
                elif field == 'oldest_check':
                    value = row.oldest_check.isoformat() if row.oldest_check else ''
                    shown, css = _day(row.oldest_check), ''
                else:
                    value = getattr(row, field)
                    shown, css = f'{value:,}', ''
                cells.append(f'<td data-field="{field}" data-value="{_e(value)}"{css}>{_e(shown)}</td>')
            label = _coverage_key_text(row)
            lines.append(f'<tr class="{"total" if is_total else "row"}" data-group="{_e(row.group)}" '
                         f'data-key="{_e(key)}"><td class="k">{_e(row.group)}</td><td class="k">{_e(label)}</td>'
                         + ''.join(cells) + '</tr>')
    lines.append('</tbody></table>')
    return '\n'.join(lines)


def _due_table(due: list, every_days: int) -> str:
    if not due:
        return f'<p class="ok">Every copy was checked (or written) within the last {every_days} days.</p>'
    lines = ['<table><thead><tr><th class="k">backend</th><th class="k">label</th><th class="k">type</th>'
             '<th>copies</th><th>due</th><th>never checked</th><th>oldest last check</th><th class="k">share due</th>'
             '</tr></thead><tbody>']
    for d in due:
        share = d.due / max(d.copies, 1)
        bar = (f'<svg width="160" height="12" role="img"><rect width="160" height="12" fill="#e3e8ec"/>'
               f'<rect width="{160 * share:.1f}" height="12" fill="#ef8a17"/></svg> {share:.0%}')
        lines.append(f'<tr class="due" data-storage-id="{d.storage_id}"><td class="k">{d.storage_id}</td>'
                     f'<td class="k">{_e(d.label)}</td><td class="k">{_e(d.type)} (tier {d.priority})</td>'
                     f'<td data-field="copies">{d.copies:,}</td><td data-field="due">{d.due:,}</td>'
                     f'<td data-field="never_checked">{d.never_checked:,}</td>'
                     f'<td data-field="oldest_check">{_day(d.oldest_check)}</td><td class="k">{bar}</td></tr>')
    lines.append('</tbody></table>')
    return '\n'.join(lines)


def _at_risk_list(report: _CoverageReport, limit: int = 500) -> str:
    if report.at_risk is None:
        return ''
    if not report.at_risk:
        return (f'<section><h2>At risk</h2><p class="ok">No file has fewer than {_copies_text(report.at_risk_below)} '
                'of its original.</p></section>')
    items = ''.join(f'<li><code>{_e(a.group)} {a.file_id} {_e(a.object_name)}</code>: {_copies_text(a.copies)}; '
                    f'{_e("; ".join(_where_text(p) for p in a.where) or "no copy recorded anywhere")}</li>'
                    for a in report.at_risk[:limit])
    more = f'<p class="note">… and {len(report.at_risk) - limit:,} more (see `coverage --at-risk`).</p>' \
        if len(report.at_risk) > limit else ''
    return (f'<section><h2>At risk: {len(report.at_risk):,} files with fewer than '
            f'{_copies_text(report.at_risk_below)}</h2><ul>{items}</ul>{more}</section>')


def _coverage_page(settings: Settings, report: _CoverageReport, grid: _CoverageReport, tiers: _CoverageReport,
                  due: list, backends: dict, every_days: int = DUE_EVERY_DAYS) -> str:
    """The page `coverage --html` writes, from what the engine counted."""
    what = f"batch {report.batch}" if report.batch else 'every file of both groups'
    made = report.made.astimezone(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    summary = []
    for total in report.totals:
        verdict = (f'<p class="bad">{total.copies["0"]:,} {total.group} files have no sound copy of their original.</p>'
                   if total.copies['0'] else
                   f'<p class="warn">{total.copies["1"]:,} {total.group} files have one sound copy only.</p>'
                   if total.copies['1'] else
                   f'<p class="ok">Every {total.group} file has at least two sound copies.</p>' if total.files else '')
        summary.append(f'<h2>{_e(total.group)}</h2>{verdict}{_group_cards(total)}'
                       f'<div style="margin:10px 0 18px">{_share_bar(total)}</div>')
    log_note = '' if report.has_log else (
        '<p class="warn">This catalog has no fixity log: a copy counts as checked when it was written, and damage '
        'found by earlier checks is not known. `init-db` creates the log.</p>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Mitwelten storage: is every original safe? ({_e(made)})</title><style>{PAGE_STYLE}</style></head>
<body><header><h1>Is every original safe?</h1>
<p>Mitwelten storage coverage of {_e(what)}, catalog schema <code>{_e(settings.schema)}</code>, made {_e(made)}
by mitwelten-storage {_e(__version__)}.</p></header><main>
<section>{log_note}<p class="note">A file's copies are the backends holding a sound copy of its original: the
original or its gzip, not found missing or corrupt by its last check.</p>{_legend()}{''.join(summary)}</section>
<section><h2>Copies per deployment and month</h2><p class="note">Each cell is one deployment in one month: its files
by their sound copies, none (red) at the top to three or more at the bottom; orange and red are the holes, and the
deployments with the most of them come first. Point at a cell for its numbers.</p>
{_legend()}{_heatmap(grid)}</section>
<section><h2>Copies per tier</h2><p class="note">What each backend holds, by tier.</p>
{_tier_chart(tiers, backends)}</section>
<section><h2>Due a check</h2><p class="note">Backends with copies last checked (or written) more than {every_days}
days ago, or never: scrub them with <code>verify STORAGE</code>.</p>{_due_table(due, every_days)}</section>
<section><h2>By {_e(report.by)}</h2>{_coverage_table(report)}</section>
{_at_risk_list(report)}
</main></body></html>
"""


def _write_coverage_page(settings: Settings, report: _CoverageReport, page: Path) -> None:
    """coverage --html: the page, from the report and three more counts (deployment by month,
    per backend, due a check), written atomically."""
    conn = connect_catalog(settings)
    try:
        grid = coverage(settings, report.batch, by='deployment_month', conn=conn)
        tiers = report if report.by == 'backend' else coverage(settings, report.batch, by='backend', conn=conn)
        due = copies_due(settings, conn=conn)
        backends = {b.storage_id: b for b in fetch_backends(conn)}
    finally:
        conn.close()
    try:
        _write_text_file(page, _coverage_page(settings, report, grid, tiers, due, backends))
    except OSError as exc:
        raise ConfigError(f'--html {page}: cannot write it: {exc.strerror or exc}') from None


class _TqdmProgress(Progress):
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


class _MessageHandler(logging.Handler):
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
  mitwelten_storage.py verify 3 --not-checked-within 30 --max-time 240
  mitwelten_storage.py report 3
  mitwelten_storage.py info --due
  mitwelten_storage.py restore -s 3 -t 1 fs1_images
  mitwelten_storage.py export fs1_images --to ~/work/fs1
  mitwelten_storage.py coverage --at-risk                          # exit 1 when a file has < 2 sound copies
  mitwelten_storage.py whereis image 1234

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


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must not be negative")
    return value


def _non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value >= 0 or value == float('inf'):
        raise argparse.ArgumentTypeError(f"'{text}' must be a number of at least 0")
    return value


def _positive_number(text: str) -> float:
    value = _non_negative_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be more than 0")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def _storage_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(',') if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of storage ids such as 3,7") from None
    if not ids:
        raise argparse.ArgumentTypeError('name at least one storage id')
    return ids


def _build_parser() -> ArgumentParser:
    """The command line: one subparser per command, each naming the function that runs it
    (`set_defaults(func=…)`); the options copy, archive and restore share come from one parent."""
    # prog: as it was called, `mitwelten_storage.py` from a clone, `mitwelten-storage` installed
    parser = ArgumentParser(description=__doc__.split('\n\n')[0],
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--db', metavar='DSN', help='libpq connection string or URI of the catalog')
    parser.add_argument('--schema', metavar='NAME', help="catalog schema (default: $MITWELTEN_DB_SCHEMA or 'prod')")
    parser.add_argument('--batches', metavar='FILE', dest='batches_file',
                        help='the batches file (default: $MITWELTEN_BATCHES, else ./batches.py, else the one '
                             'shipped with the tool)')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    def command(name: str, func: Callable, help: str, *, description: str | None = None,
                examples: str = '', parents: tuple = ()) -> ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + '.',
                                  epilog=examples or None, parents=list(parents),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(func=func)
        return sub

    # What copy, archive and restore share: the batch, how many at once, a dry run, where the
    # disks are, and the storage service.
    batch_run = ArgumentParser(add_help=False)
    batch_run.add_argument('batch', help='batch id from the batches file (see `info --batches`)')
    batch_run.add_argument('--jobs', type=_positive_int, default=DEFAULT_JOBS, metavar='N',
                           help=f'parallel transfers (default {DEFAULT_JOBS})')
    batch_run.add_argument('--dry-run', action='store_true',
                           help='say what would be done, file by file; change nothing')
    batch_run.add_argument('--limit', type=_non_negative_int, metavar='N', help='do at most N files')
    batch_run.add_argument('--source-path', metavar='P', help='where the source disk is mounted, if not at its '
                                                              'recorded path')
    batch_run.add_argument('--target-path', metavar='P', help='where the target disk is mounted, if not at its '
                                                              'recorded path')
    batch_run.add_argument('--via', metavar='URL', help='through the storage service at URL: no S3 keys needed '
                                                        '(token: $MITWELTEN_TOKEN or $MITWELTEN_TOKEN_FILE)')

    _add_setup_commands(command, batch_run)
    _add_batch_commands(command, batch_run)
    _add_checking_commands(command, batch_run)
    return parser


def _add_setup_commands(command: Callable, batch_run: ArgumentParser) -> None:
    """The commands that set up and list: init-db, create, info."""
    command('init-db', _cmd_init_db, 'create the catalog schema and tables (idempotent)')

    create = command('create', _cmd_create, 'register a new backend: a local disk or an S3 bucket',
                     examples='examples:\n  create -t local -p 2 -n "Archive 07" /media/archive07\n'
                              '  create -t s3 -p 0 -n "active" http://minio:9000/mitwelten\n\n' + _priority_table())
    create.add_argument('-t', '--type', choices=('local', 's3'), required=True)
    create.add_argument('-p', '--priority', type=int, required=True,
                        help='the tier (see below): S3 0 or 1; a local disk 2, or above for a tier of your own')
    create.add_argument('-n', '--notes', required=True, metavar='LABEL',
                        help='for a disk, its label (as written on it); for S3, notes')
    create.add_argument('location', metavar='PATH|URL',
                        help='local: the folder where the disk is mounted; s3: http[s]://HOST[:PORT]/BUCKET[/PREFIX]')

    info = command('info', _cmd_info, 'list the backends (or, with --batches, the batches)')
    info.add_argument('--batches', action='store_true',
                      help='list the batches defined in the batches file (and say on stderr which file)')
    info.add_argument('--json', action='store_true', help='print JSON instead of a table')
    info.add_argument('--due', action='store_true',
                      help='per backend: copies due a check (last checked more than --every days ago, or never), '
                           'the oldest last check, and since when the backend has been checked in full')
    info.add_argument('--every', type=_positive_number, metavar='DAYS',
                      help=f'with --due: how often every copy should be checked (default {DEFAULT_CHECK_EVERY_DAYS:g})')


def _add_batch_commands(command: Callable, batch_run: ArgumentParser) -> None:
    """The commands that move files in batches: copy, archive, restore, export."""
    copy = command('copy', _cmd_copy, 'copy a batch of files from one backend to another', parents=(batch_run,),
                   examples='examples:\n  copy -s 1 -t 3 all_images --dry-run\n  copy -s 1 -t 3 fs1_images --jobs 16\n'
                            '  copy -s 3 -t 4 all_images --source-path /Volumes/archive07\n'
                            '  copy -s 1 -t 2 all_images --type 2\n\n' + _version_table())
    copy.add_argument('-s', '--source', type=int, required=True, metavar='ID', help='source storage id')
    copy.add_argument('-t', '--target', type=int, required=True, metavar='ID', help='target storage id')
    copy.add_argument('--type', type=_non_negative_int, default=0, dest='version_type', metavar='N',
                      help='version to copy (default 0, the original; see below)')

    archive = command(
        'archive', _cmd_archive, 'archive originals from the active tier and replace them there with a version '
                                '(or delete them)', parents=(batch_run,),
        description='For every file of the batch whose original ACTIVE holds: read it once and check it, write '
                    'it to ARCHIVE and record it, then put version N in its place at ACTIVE (--replace-with N) '
                    'or delete it there (--delete-original). An original leaves ACTIVE only while at least '
                    '--min-copies sound originals are recorded on other backends, and only against an archive '
                    'copy proven at that moment (written in this run, or read back and hashed; written again '
                    'from the checked original if it is missing or damaged).',
        examples='examples:\n  archive -s 1 -t 3 fs1_images --replace-with 1\n'
                 '  archive -s 1 -t 3 fs1_audio --replace-with 1 --min-copies 2\n'
                 '  archive -s 2 -t 3 all_images --delete-original --dry-run\n\n' + _version_table())
    archive.add_argument('-s', '--source', type=int, required=True, metavar='ACTIVE', help='active storage id')
    archive.add_argument('-t', '--target', type=int, required=True, metavar='ARCHIVE', help='archive storage id')
    then = archive.add_mutually_exclusive_group(required=True)
    then.add_argument('--replace-with', type=_non_negative_int, metavar='N',
                      help='put version N in place of the original at ACTIVE')
    then.add_argument('--delete-original', action='store_true', help='delete the original at ACTIVE')
    archive.add_argument('--min-copies', type=_positive_int, default=1, metavar='N',
                         help='sound originals that must be recorded on other backends (default 1), the archive '
                              'copy (proven at the release) included')
    archive.add_argument('--verified-within', type=_positive_number, metavar='DAYS', dest='verified_within',
                         help='count the copies on other backends than ARCHIVE only where their last check passed '
                              'within DAYS days')

    restore = command(
        'restore', _cmd_restore, 'bring originals back from an archive to the active tier (archive backwards)',
        parents=(batch_run,),
        description='For every file of the batch whose original ARCHIVE holds soundly (the original, or gzip of it) '
                    'and ACTIVE holds only as a version (or not at all): read it from ARCHIVE and check it, write it '
                    'to ACTIVE under its own name, record it there as the original, then delete the version at '
                    'ACTIVE. A damaged archive copy is never restored from. Run the same command again after an '
                    'interruption: it finishes what was cut off.',
        examples='examples:\n  restore -s 3 -t 1 fs1_images --dry-run\n  restore -s 3 -t 1 fs1_images --jobs 8\n'
                 '  restore -s 3 -t 1 fs1_images --via https://storage.mitwelten.org')
    restore.add_argument('-s', '--source', type=int, required=True, metavar='ARCHIVE', help='archive storage id')
    restore.add_argument('-t', '--target', type=int, required=True, metavar='ACTIVE', help='active storage id')

    export = command(
        'export', _cmd_export, "copy a batch's originals into a plain folder (a working copy), with a recall plan",
        description='Copies the originals (or version --type N) of the batch into DIR, a plain folder, each checked, '
                    'with manifest-sha256.txt (`sha256sum -c` from DIR). Each file is read from the most accessible '
                    'backend that holds it soundly: S3 tiers by priority, then disks that are mounted. Files held '
                    'only on disks that are not mounted get a recall plan: the fewest disks to mount. Run the same '
                    'command again after mounting a disk: files in DIR already and sound are not read again.',
        examples='examples:\n  export fs1_images --to ~/work/fs1\n  export fs1_audio --to ~/work/audio --type 1\n'
                 '  export fs1_images --to ~/work/fs1 --from 3,7')
    export.add_argument('batch', help='batch id from the batches file (see `info --batches`)')
    export.add_argument('--to', required=True, metavar='DIR', help='the folder to write into (made if missing)')
    export.add_argument('--type', type=_non_negative_int, default=0, dest='version_type', metavar='N',
                        help='version to export (default 0, the original)')
    export.add_argument('--from', dest='from_ids', type=_storage_ids, metavar='S,…',
                        help='read only from these backends, in this order')
    export.add_argument('--jobs', type=_positive_int, default=DEFAULT_JOBS, metavar='N',
                        help=f'parallel transfers (default {DEFAULT_JOBS})')
    export.add_argument('--dry-run', action='store_true', help='say where each file would be read from; write nothing')


def _add_checking_commands(command: Callable, batch_run: ArgumentParser) -> None:
    """The commands that check and tell what is safe: verify, report, coverage, whereis."""
    verify = command(
        'verify', _cmd_verify, 'check the files the catalog records on a backend',
        description='Checks every file the catalog records on STORAGE (in BATCH, if given): there, and sound '
                    '(originals hash to the catalog sha256, gzip versions decompress to it, WebP and FLAC versions '
                    'decode). Lists what is missing or corrupt and, on a disk, files the catalog does not know.',
        examples='examples:\n  verify 3\n  verify 3 fs1_images --path /Volumes/archive07\n  verify 3 --fix\n'
                 '  verify 3 --not-checked-within 30 --max-time 240     # a nightly slice of a monthly scrub\n\n'
                 'Every check is logged in the fixity log (storage_fixity). Copies are checked least recently checked '
                 'first;\nwith --not-checked-within, --max-files or --max-time (a scrub) the disk is not walked for '
                 'unknown files:\na full pass (no batch, none of these options) does that.')
    verify.add_argument('storage', type=int, metavar='STORAGE', help='storage id')
    verify.add_argument('batch', nargs='?', help='only the files of this batch')
    verify.add_argument('--fix', action='store_true',
                        help='remove the catalog rows of missing and corrupt files (never a file), so `copy` puts '
                             'them back')
    verify.add_argument('--path', metavar='P', help='where the disk is mounted, if not at its recorded path')
    verify.add_argument('--jobs', type=_positive_int, default=DEFAULT_JOBS, metavar='N',
                        help=f'files checked in parallel (default {DEFAULT_JOBS})')
    verify.add_argument('--not-checked-within', type=_non_negative_number, metavar='DAYS',
                        help='check only the copies whose last check is older than DAYS (or missing)')
    verify.add_argument('--max-files', type=_positive_int, metavar='N',
                        help='a slice of a scrub: check at most N copies, the least recently checked first')
    verify.add_argument('--max-time', type=_positive_number, metavar='MIN',
                        help='a slice of a scrub: start no new check after MIN minutes (those in flight finish)')

    report = command(
        'report', _cmd_report, 'write REPORT.md, a sha256 manifest and a SQLite index onto a disk',
        description='Writes onto a local disk what makes it readable without the database: REPORT.md, '
                    'manifest-sha256.txt (for `sha256sum -c` from the disk\'s root) and archive_index.db (SQLite).',
        examples='example:\n  report 3\n  cd /media/archive07 && sha256sum -c manifest-sha256.txt')
    report.add_argument('storage', type=int, metavar='STORAGE', help='storage id of a local disk')
    report.add_argument('--path', metavar='P', help='where the disk is mounted, if not at its recorded path')

    coverage_ = command(
        'coverage', _cmd_coverage, 'is every original safe? files counted by their sound copies',
        description='Counts the files of BATCH (every file of both groups without one), grouped --by a dimension, '
                    'by the number of backends that hold a sound copy of their original: the original or its gzip, '
                    'not found missing or corrupt by its last check. Exit 0; with --at-risk, exit 1 when some file '
                    'has fewer than N sound copies (for cron).',
        examples='examples:\n  coverage\n  coverage --by month --at-risk\n  coverage fs1_images --by node --at-risk 3\n'
                 '  coverage --by backend --json\n  coverage --html /media/archive07/coverage.html')
    coverage_.add_argument('batch', nargs='?', help='only the files of this batch')
    coverage_.add_argument('--by', choices=COVERAGE_DIMENSIONS, default='deployment',
                           help='the rows: one per batch, deployment (default), node, tag, month or backend')
    coverage_.add_argument('--at-risk', type=_positive_int, nargs='?', const=DEFAULT_AT_RISK, metavar='N',
                           help=f'list the files with fewer than N sound copies (default {DEFAULT_AT_RISK}), and where '
                                'their copies are; exit 1 when there are any')
    coverage_.add_argument('--json', action='store_true', help='print JSON instead of a table')
    coverage_.add_argument('--html', metavar='FILE', help='also write one self-contained HTML page: the table and '
                                                          'charts (copies per deployment and month, per tier, disks '
                                                          'due a check)')

    whereis = command(
        'whereis', _cmd_whereis, 'every copy of one file: where, which version, online now, last checked',
        examples='examples:\n  whereis image 1234\n'
                 '  whereis audio 4258-6870/2021-07-27/05/4258-6870_2021-07-27T05-00-00Z.wav')
    whereis.add_argument('group', choices=tuple(GROUPS), help='image or audio (their file ids overlap)')
    whereis.add_argument('file', metavar='FILE_ID|OBJECT_NAME', help="the file's id or its object name")
    whereis.add_argument('--json', action='store_true', help='print JSON instead of text')


def _version_table() -> str:
    """The versions, for --help: from VERSIONS, the one table of them."""
    lines = ['versions (--type, --replace-with):']
    for group in GROUPS:
        lines.append(f'  {group}: ' + ', '.join(f'{t} {v.label}' for (g, t), v in sorted(VERSIONS.items())
                                                 if g == group))
    return '\n'.join(lines)


def _priority_table() -> str:
    """The tiers, for --help: from PRIORITY_TIERS."""
    return 'priorities:\n' + '\n'.join(f'  {number}  {tier}' for number, tier in PRIORITY_TIERS.items())


# --- the commands: each runs an operation and prints what it returned ------------------------------

def _run_options(args, **extra) -> RunOptions:
    return RunOptions(jobs=args.jobs, progress=_TqdmProgress(), handle_signals=True, **extra)


def _batch_run_options(args) -> RunOptions:
    return _run_options(args, limit=args.limit, source_path=args.source_path, target_path=args.target_path,
                       via=args.via)


def _summed_up(report: RunReport) -> int:
    print(_format_summary(report))
    return report.exit_status


def _cmd_init_db(args, settings: Settings) -> int:
    ready = init_db(settings)
    print(f"catalog schema '{ready.schema}' is ready in {ready.where} ({ready.tables} tables)")
    return EXIT_OK


def _cmd_create(args, settings: Settings) -> int:
    create = create_local_backend if args.type == 'local' else create_s3_backend
    backend_row = create(settings, args.location, args.priority, args.notes)
    print(f'created storage backend {backend_row.storage_id}: {backend_row.type} {backend_row.url_prefix} '
          f'(priority {backend_row.priority})')
    return EXIT_OK


def _cmd_info(args, settings: Settings) -> int:
    if args.batches and (args.due or args.every):
        raise ConfigError('--batches and --due are separate listings: ask for one at a time')
    if args.batches:
        batches = load_batches()
        print('note: batches from {} ({})'.format(*batches_file()), file=sys.stderr)
        _print_batches(batches, args.json)
    elif args.due or args.every:
        every = args.every or DEFAULT_CHECK_EVERY_DAYS
        listing = due_checks(settings, every)
        print(json.dumps(listing, indent=2)) if args.json else _print_due(listing, every)
    else:
        listing = list_backends(settings)
        print(json.dumps(listing, indent=2)) if args.json else _print_backends(listing)
    return EXIT_OK


def _cmd_copy(args, settings: Settings) -> int:
    request = dict(version_type=args.version_type, options=_batch_run_options(args))
    if args.dry_run:
        return _print_plan(plan_copy(settings, args.source, args.target, args.batch, **request)).exit_status
    return _summed_up(copy_batch(settings, args.source, args.target, args.batch, **request))


def _cmd_archive(args, settings: Settings) -> int:
    request = dict(replace_with=args.replace_with, delete_originals=args.delete_original, min_copies=args.min_copies,
                   verified_within_days=args.verified_within, options=_batch_run_options(args))
    if args.dry_run:
        return _print_plan(plan_archive(settings, args.source, args.target, args.batch, **request)).exit_status
    return _summed_up(archive_batch(settings, args.source, args.target, args.batch, **request))


def _cmd_restore(args, settings: Settings) -> int:
    options = _batch_run_options(args)
    if args.dry_run:
        return _print_plan(plan_restore(settings, args.source, args.target, args.batch, options=options)).exit_status
    return _summed_up(restore_batch(settings, args.source, args.target, args.batch, options=options))


def _cmd_export(args, settings: Settings) -> int:
    request = dict(version_type=args.version_type, from_ids=args.from_ids, options=_run_options(args))
    if args.dry_run:
        return _print_plan(plan_export(settings, args.batch, args.to, **request)).exit_status
    report = export_batch(settings, args.batch, args.to, **request)
    print(_format_summary(report))
    _print_recall_plan(report)
    return report.exit_status


def _cmd_verify(args, settings: Settings) -> int:
    report = verify_backend(settings, args.storage, args.batch, fix=args.fix, path=args.path,
                            options=_run_options(args), not_checked_within=args.not_checked_within,
                            max_files=args.max_files, max_minutes=args.max_time)
    print(_format_verify_report(report))
    return report.exit_status


def _cmd_report(args, settings: Settings) -> int:
    _print_disk_report(write_report(settings, args.storage, path=args.path))
    return EXIT_OK


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """The command line, in-process: the exit status. Leaves the logger and the batches file as
    it found them, so a caller (the tests) can call it again."""
    args = _build_parser().parse_args(argv)
    with _messages_on_stderr(), _batches_from(args.batches_file):
        return _exit_status_of(lambda: args.func(args, Settings.from_env(args.db, args.schema)))


@contextlib.contextmanager
def _messages_on_stderr():
    """The logger's messages on stderr (above the progress bar) while a command runs."""
    handler, before = _MessageHandler(), (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(before[0])
        log.propagate = before[1]


@contextlib.contextmanager
def _batches_from(path: str | None):
    """--batches FILE for the command's duration."""
    global BATCHES_FILE
    given, BATCHES_FILE = BATCHES_FILE, path or BATCHES_FILE
    try:
        yield
    finally:
        BATCHES_FILE = given


def _exit_status_of(command: Callable[[], int]) -> int:
    """Run the command; an error it raises is a message on stderr and an exit status (rule 6)."""
    try:
        FAULTS.check()
        return command()
    except ConfigError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of the output went away (`… | head`): stop quietly, as other tools do; the
        # rest of the output goes nowhere rather than raise again at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURES
    except (StorageError, psycopg2.Error, botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError, OSError) as exc:
        print(f'error: {describe_exception(exc)}', file=sys.stderr)
        return EXIT_FAILURES


def _cmd_whereis(args, settings: Settings) -> int:
    try:
        found = where_is(settings, args.group, args.file)
    except NotFound as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps(found.as_dict(), indent=2)) if args.json else _print_whereis(found)
    return EXIT_OK


def _cmd_coverage(args, settings: Settings) -> int:
    page = Path(args.html).expanduser() if args.html else None
    if page is not None and not page.parent.is_dir():
        raise ConfigError(f'--html {args.html}: the folder {page.parent} does not exist')
    report = coverage(settings, args.batch, by=args.by, at_risk_below=args.at_risk)
    if page is not None:
        _write_coverage_page(settings, report, page)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_coverage(report)
        if page is not None:
            print(f'wrote {page}')
    return EXIT_FAILURES if report.at_risk else EXIT_OK


def console_main() -> None:
    """The command: `python mitwelten_storage.py`, and `mitwelten-storage` installed (pyproject.toml)."""
    status = main()
    if status == EXIT_INTERRUPTED or LEFT_RUNNING.is_set():
        # A second Ctrl-C, or a stop on a frozen server, leaves transfer threads running; do not
        # wait for them at exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == '__main__':
    console_main()
