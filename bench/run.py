"""`make bench`: mitwelten-storage against the tools a user would otherwise pick.

Everything runs against a throwaway moto S3 server and embedded PostgreSQL started here, with
generated data (16 MP camera-trap JPEGs of about 4.7 MB with EXIF, 60 s 48 kHz WAV recordings).
Every contender runs as its own process; times are wall-clock, peak memory is the process's
VmHWM (Linux). Contenders alternate within each round, and the median of the rounds is
reported, with ratios measured in the same run. Prints one table per benchmark and the machine.

    python -m bench.run                       # everything, 3 rounds
    python -m bench.run --only copy,webp --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mitwelten_storage as ms  # noqa: E402
from bench import baselines  # noqa: E402
from devkit import sample_data  # noqa: E402
from devkit.quality import psnr, ssim  # noqa: E402
from devkit.services import throwaway_services  # noqa: E402

BIN = Path(sys.executable).parent
TOOL = [sys.executable, str(ROOT / 'mitwelten_storage.py')]


# --- measuring ------------------------------------------------------------------------------------

@dataclass
class Sample:
    seconds: float
    peak_mb: float
    cpu_seconds: float = 0.0      # user + system of the whole process tree


def tree(pid: int) -> list[int]:
    """The process and all its descendants, as /proc lists them now."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in Path(f'/proc/{current}/task').iterdir():
                todo += [int(child) for child in (task / 'children').read_text().split()]
        except (OSError, ValueError):
            pass
    return pids


def measure(argv: list[str], env: dict, cwd: Path | None = None) -> Sample:
    """Run a command, timing it and sampling the peak resident memory (VmHWM) of the largest
    process in its tree as it runs (for a shell loop: the largest ffmpeg, not the shell). Its CPU
    time is what this process's waited-for children used meanwhile: the command and everything
    it waited for (the services started here run on and are not counted)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def watch() -> None:
        while process.poll() is None:
            for pid in tree(process.pid):
                try:
                    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
                        if line.startswith('VmHWM:'):
                            peak[0] = max(peak[0], int(line.split()[1]))
                except (OSError, ValueError):
                    pass
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stderr = process.stderr.read()
    process.wait()
    seconds = time.perf_counter() - started
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    if process.returncode != 0:
        raise RuntimeError(f'{argv[0]} … exited {process.returncode}: {stderr.decode(errors="replace")[-2000:]}')
    return Sample(seconds, peak[0] / 1024, cpu)


@dataclass
class Contender:
    name: str
    samples: list = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def peak_mb(self) -> float:
        return max(s.peak_mb for s in self.samples)

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(s.cpu_seconds for s in self.samples)


def print_table(title: str, contenders: list[Contender], megabytes: float, files: int, reference: str,
                note: str = '', extra: dict | None = None) -> list[str]:
    base = next(c for c in contenders if c.name == reference).seconds
    rounds = len(contenders[0].samples)
    lines = [f'\n### {title}', '', f'{files} files, {megabytes:,.0f} MB; median of {rounds} rounds; '
                                    f'ratio = time / time of {reference}' + (f'. {note}' if note else ''), '',
             '| contender | seconds | MB/s | files/s | peak RSS MB (largest process) | ratio | ratio per round (median, range) '
             '| CPU s | CPU ratio |' +
             (' ' + ' | '.join(extra) + ' |' if extra else ''),
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|' * len(extra) if extra else '')]
    reference_samples = next(c for c in contenders if c.name == reference).samples
    base_cpu = statistics.median(s.cpu_seconds for s in reference_samples) or 1e-9
    for c in contenders:
        row = (f'| {c.name} | {c.seconds:.2f} | {megabytes / c.seconds:,.0f} | {files / c.seconds:,.1f} | '
               f'{c.peak_mb:,.0f} | {c.seconds / base:.2f} | {per_round(c.samples, reference_samples)} | '
               f'{c.cpu_seconds:.2f} | {c.cpu_seconds / base_cpu:.2f} |')
        if extra:
            row += ' ' + ' | '.join(values.get(c.name, '') for values in extra.values()) + ' |'
        lines.append(row)
    print('\n'.join(lines), flush=True)
    return lines


def per_round(samples: list, reference: list) -> str:
    """The ratio of the times within each round (the contenders ran back to back), its median and
    range: on a shared machine the load changes from round to round."""
    ratios = [a.seconds / b.seconds for a, b in zip(samples, reference)]
    return f'{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})'


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with_name = Path('/proc/cpuinfo')
    if with_name.exists():
        for line in with_name.read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    memory = ''
    if Path('/proc/meminfo').exists():
        total_kb = int(Path('/proc/meminfo').read_text().split()[1])
        memory = f', {total_kb / 1024 / 1024:.0f} GiB RAM'
    return (f'{dt.date.today().isoformat()}, {cpu}, {os.cpu_count()} cores{memory}, {platform.system()} '
            f'{platform.release()}, Python {platform.python_version()}')


def version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return 'not found'


# --- the stage -------------------------------------------------------------------------------------

class Stage:
    """The services, the catalog schema and the S3 client the benchmarks share."""

    def __init__(self, services, workdir: Path):
        self.services = services
        self.workdir = workdir
        self.settings = ms.Settings(services.pg_dsn, 'bench')
        ms.init_db(self.settings)
        self.conn = ms.connect_catalog(self.settings)
        self.s3 = boto3.client('s3', endpoint_url=services.s3_endpoint,
                               config=Config(s3={'addressing_style': 'path'}, max_pool_connections=32))
        self.env = dict(os.environ, MITWELTEN_DB=services.pg_dsn, MITWELTEN_DB_SCHEMA='bench',
                        MITWELTEN_LOG_DIR=str(workdir / 'logs'), MITWELTEN_MOUNT_ROOTS='',
                        PATH=f'{BIN}{os.pathsep}{os.environ.get("PATH", "")}')
        self.count = 0

    def in_schema(self, schema: str) -> 'Stage':
        """The same services and folders, with a catalog schema of its own: each benchmark's
        `all_images` is then just its own files."""
        other = Stage.__new__(Stage)
        other.__dict__.update(self.__dict__)
        other.settings = ms.Settings(self.services.pg_dsn, schema)
        ms.init_db(other.settings)
        other.conn = ms.connect_catalog(other.settings)
        other.env = dict(self.env, MITWELTEN_DB_SCHEMA=schema)
        return other

    def fresh_dir(self, name: str) -> Path:
        self.count += 1
        path = self.workdir / f'{name}-{self.count}'
        path.mkdir()
        return path

    def fresh_disk(self, name: str) -> tuple[int, Path]:
        path = self.fresh_dir(name)
        return ms.create_local_backend(self.settings, str(path), 2, f'bench {name} {self.count}').storage_id, path

    def bucket_backend(self, bucket: str, files: list) -> int:
        self.s3.create_bucket(Bucket=bucket)
        uploads = ThreadedUpload(self.s3, bucket)
        uploads.run(files)
        storage_id = ms.create_s3_backend(self.settings, f'{self.services.s3_endpoint}/{bucket}', 0, bucket).storage_id
        sample_data.add_to_catalog(self.conn, files, storage_id)
        return storage_id


class ThreadedUpload:
    def __init__(self, s3, bucket: str):
        self.s3, self.bucket = s3, bucket

    def run(self, files: list) -> None:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda f: self.s3.put_object(Bucket=self.bucket, Key=f.object_name, Body=f.data), files))


def unique_copies(files: list, times: int) -> list:
    """`times` distinct copies of each file (a JPEG comment makes each one's bytes unique, as
    the catalog's sha256 must be), for batches larger than the frames generated."""
    copies = []
    for round_ in range(times):
        for i, f in enumerate(files):
            comment = f'{round_:04d}-{i:09d}'.encode()          # 14 bytes: the segment's length is 16
            data = f.data[:2] + b'\xff\xfe\x00\x10' + comment + f.data[2:]
            when = f.time + dt.timedelta(days=round_)
            name = f.object_name.replace(f.time.strftime('%Y-%m-%d'), when.strftime('%Y-%m-%d')).replace(
                f.time.strftime('%Y-%m-%dT'), when.strftime('%Y-%m-%dT'))
            copies.append(sample_data.SampleFile(f.group, name, data, when, f.node_label, resolution=f.resolution))
    return copies


def tree_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob('*') if p.is_file() and not p.name.startswith('.')]
    return len(files), sum(p.stat().st_size for p in files)


def tool_copy(stage: Stage, name: str, source_id: int, batch: str, *options: str):
    """A contender: the tool copying into a fresh disk; output lands in its archive/ folder."""
    def start() -> tuple[list[str], Path, Path]:
        disk_id, disk = stage.fresh_disk(name)
        return TOOL + ['copy', '-s', str(source_id), '-t', str(disk_id), batch, *options], disk / 'archive', disk
    return start


def into_fresh_dir(stage: Stage, name: str, make_argv):
    """A contender writing into a fresh folder of its own."""
    def start() -> tuple[list[str], Path, Path]:
        folder = stage.fresh_dir(name)
        return make_argv(folder), folder, folder
    return start


def alternate(commands: dict, rounds: int, env: dict, after) -> list[Contender]:
    """Each contender once per round, the order rotating between rounds so no one always goes
    first; `after(name, output_folder, root)` checks what each run left."""
    contenders = {name: Contender(name) for name in commands}
    names = list(commands)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            argv, folder, root = commands[name]()
            contenders[name].samples.append(measure(argv, env, cwd=ROOT))
            after(name, folder, root)
    return list(contenders.values())


# --- 1. copy ----------------------------------------------------------------------------------------

def bench_copy(stage: Stage, images: list, rounds: int, title: str, bucket: str) -> list[str]:
    source = stage.bucket_backend(bucket, images)
    endpoint = stage.services.s3_endpoint
    megabytes = sum(len(f.data) for f in images) / 1e6
    rclone_remote = (f':s3,provider=Other,endpoint="{endpoint}",access_key_id={os.environ["AWS_ACCESS_KEY_ID"]},'
                     f'secret_access_key={os.environ["AWS_SECRET_ACCESS_KEY"]}:{bucket}')
    commands = {
        'mitwelten-storage copy (sha256-checked, fsynced, recorded)': tool_copy(stage, 'tool', source, 'all_images'),
        's5cmd cp': into_fresh_dir(stage, 's5cmd', lambda d: [str(BIN / 's5cmd'), '--endpoint-url', endpoint, 'cp',
                                                               f's3://{bucket}/*', f'{d}/']),
        'rclone copy': into_fresh_dir(stage, 'rclone', lambda d: [str(BIN / 'rclone'), 'copy', rclone_remote, str(d)]),
        'aws s3 cp --recursive': into_fresh_dir(stage, 'aws', lambda d: [str(BIN / 'aws'), 's3', 'cp', '--recursive',
                                                                         '--quiet', '--endpoint-url', endpoint,
                                                                         f's3://{bucket}', str(d)]),
        'earlier Mitwelten loop': into_fresh_dir(stage, 'earlier', lambda d: [sys.executable, '-m', 'bench.baselines',
                                                                              'copy', endpoint, bucket, str(d)]),
    }
    expected = (len(images), sum(len(f.data) for f in images))

    def check(name: str, folder: Path, root: Path) -> None:
        if tree_bytes(folder) != expected:
            raise RuntimeError(f'{name} copied {tree_bytes(folder)} (files, bytes), expected {expected}')
        shutil.rmtree(root)
    order = alternate(commands, rounds, stage.env, check)
    return print_table(title, order, megabytes, len(images), 's5cmd cp')


# --- 2. WebP ----------------------------------------------------------------------------------------

def bench_webp(stage: Stage, images: list, rounds: int) -> list[str]:
    disk_id, disk = stage.fresh_disk('webp-source')
    sample_data.write_local(disk, images)
    sample_data.add_to_catalog(stage.conn, images, disk_id)
    megabytes = sum(len(f.data) for f in images) / 1e6
    originals = [str(disk / 'archive' / f.object_name) for f in images]
    lines = []
    for version_type, box in ((1, ms.WEBP_LARGE), (2, ms.WEBP_SMALL)):
        outputs = {}
        commands = {
            'mitwelten-storage copy --type': tool_copy(stage, 'tool-webp', disk_id, 'all_images',
                                                       '--type', str(version_type)),
            'earlier algorithm (full decode, thumbnail LANCZOS, 10 threads)':
                into_fresh_dir(stage, 'earlier-webp', lambda d, box=box: [
                    sys.executable, '-m', 'bench.baselines', 'webp', str(box[0]), str(box[1]), str(d), *originals]),
            "Pillow's thumbnail() as it is (its own draft, reducing_gap 2)":
                into_fresh_dir(stage, 'thumbnail-webp', lambda d, box=box: [
                    sys.executable, '-m', 'bench.baselines', 'webp-thumbnail', str(box[0]), str(box[1]), str(d),
                    *originals]),
        }
        names = list(commands)

        def keep(name: str, folder: Path, root: Path) -> None:
            outputs[name] = {p.stem: p.read_bytes() for p in folder.rglob('*.webp')}
            if len(outputs[name]) != len(images):
                raise RuntimeError(f'{name} made {len(outputs[name])} WebP files')
        contenders = {c.name: c for c in alternate(commands, rounds, stage.env, keep)}
        # The earlier output is itself lossy: WebP at quality 80 differs from the pixels it was
        # made of. So each output is compared with the earlier output and with the earlier
        # algorithm's pixels before encoding; the earlier output's own score there is the floor.
        earlier = outputs[names[1]]
        before = {Path(name).stem: baselines.earlier_pixels(name, box) for name in originals}
        quality: dict = {'SSIM vs earlier output (min)': {}, 'PSNR vs earlier output': {},
                         'SSIM vs earlier pixels before encoding (min)': {}, 'same size': {}}
        for name in names:
            similarity, noise, fidelity, sizes = [], [], [], True
            for stem, data in outputs[name].items():
                with Image.open(io.BytesIO(data)) as a, Image.open(io.BytesIO(earlier[stem])) as b:
                    sizes &= a.size == b.size == before[stem].size
                    if name != names[1]:
                        similarity.append(ssim(a, b))
                        noise.append(psnr(a, b))
                    fidelity.append(ssim(a, before[stem]))
            if similarity:
                quality['SSIM vs earlier output (min)'][name] = f'{min(similarity):.3f}'
                quality['PSNR vs earlier output'][name] = f'{statistics.mean(noise):.1f} dB'
            quality['SSIM vs earlier pixels before encoding (min)'][name] = f'{min(fidelity):.3f}'
            quality['same size'][name] = 'yes' if sizes else 'NO'
        note = (f'throughput ratio vs the earlier algorithm: '
                f'{contenders[names[1]].seconds / contenders[names[0]].seconds:.2f}×')
        lines += print_table(f'2.{version_type} WebP type {version_type} ({box[0]}×{box[1]}), local disk → local disk',
                             list(contenders.values()), megabytes, len(images), names[1], note, quality)
    return lines


# --- 3. FLAC ----------------------------------------------------------------------------------------

def bench_flac(stage: Stage, recordings: list, rounds: int) -> list[str]:
    disk_id, disk = stage.fresh_disk('flac-source')
    sample_data.write_local(disk, recordings)
    sample_data.add_to_catalog(stage.conn, recordings, disk_id)
    megabytes = sum(len(f.data) for f in recordings) / 1e6
    wavs = [disk / 'archive' / f.object_name for f in recordings]
    ffmpeg = ms.ffmpeg_executable()
    # One ffmpeg process per file, as many at once as there are cores (xargs -P), as a user
    # would run it from a shell.
    one = '"$FFMPEG" -loglevel error -nostdin -i "$1" "$OUT/$(basename "${1%.wav}").flac"'
    script = f'printf "%s\\0" "$@" | xargs -0 -n 1 -P {len(os.sched_getaffinity(0))} sh -c \'{one}\' sh'
    commands = {
        'mitwelten-storage copy --type 1 (decoded and compared)':
            tool_copy(stage, 'tool-flac', disk_id, 'all_audio', '--type', '1'),
        f'ffmpeg command line, one process per file, {len(os.sched_getaffinity(0))} at once':
            into_fresh_dir(stage, 'ffmpeg-flac', lambda d: ['sh', '-c', f'export FFMPEG="{ffmpeg}" OUT="{d}"; {script}',
                                                            'sh', *map(str, wavs)]),
    }
    names = list(commands)

    def check(name: str, folder: Path, root: Path) -> None:
        if len(list(folder.rglob('*.flac'))) != len(recordings):
            raise RuntimeError(f'{name} made too few FLAC files')
        shutil.rmtree(root)                  # 60 files make 300 MB a round
    contenders = {c.name: c for c in alternate(commands, rounds, stage.env, check)}
    return print_table('3. FLAC of 60 s 48 kHz WAV recordings, local disk → local disk', list(contenders.values()),
                       megabytes, len(recordings), names[1])


# --- 4. memory --------------------------------------------------------------------------------------

def bench_memory(stage: Stage, images: list, rounds: int) -> list[str]:
    lines = ['\n### 4. Memory: peak RSS copying 40 and 400 files (S3 → local disk)', '',
             '| files | MB | seconds | peak RSS MB |', '|---:|---:|---:|---:|']
    peaks = {}
    for count in (40, 400):
        batch = unique_copies(images, (count + len(images) - 1) // len(images))[:count]
        stage = stage.in_schema(f'bench_memory_{count}')
        source = stage.bucket_backend(f'memory-{count}', batch)
        contender = Contender(str(count))
        for _ in range(rounds):
            disk_id, disk = stage.fresh_disk(f'memory-{count}')
            contender.samples.append(measure(TOOL + ['copy', '-s', str(source), '-t', str(disk_id), 'all_images'],
                                             stage.env, cwd=ROOT))
            if tree_bytes(disk / 'archive')[0] != count:
                raise RuntimeError(f'memory run copied {tree_bytes(disk / "archive")[0]} of {count} files')
            shutil.rmtree(disk)
        peaks[count] = contender.peak_mb
        lines.append(f'| {count} | {sum(len(f.data) for f in batch) / 1e6:,.0f} | {contender.seconds:.2f} | '
                     f'{contender.peak_mb:,.0f} |')
    lines += ['', f'400 files vs 40 files: {peaks[400] / peaks[40]:.2f}× the peak memory']
    print('\n'.join(lines), flush=True)
    return lines


# --- 5. selection at scale -----------------------------------------------------------------------------

def bench_selection(stage: Stage, rounds: int) -> list[str]:
    """A million rows in files_image, held by one bucket; the first 200 exist there."""
    rows = 1_000_000
    schema = 'bench_scale'
    settings = ms.Settings(stage.services.pg_dsn, schema)
    ms.init_db(settings)
    conn = ms.connect_catalog(settings)
    bucket = 'scale-source'
    stage.s3.create_bucket(Bucket=bucket)
    source = ms.create_s3_backend(settings, f'{stage.services.s3_endpoint}/{bucket}', 0, bucket).storage_id
    sample_data.seed_catalog(conn)
    present = [sample_data.SampleFile('image', f'scale/0/{i}.jpg', os.urandom(100_000), None, '')
               for i in range(1, 201)]
    with conn.cursor() as cur:
        cur.execute('SELECT deployment_id FROM deployments ORDER BY deployment_id LIMIT 1')
        deployment = cur.fetchone()[0]
        started = time.perf_counter()
        cur.execute('''INSERT INTO files_image (object_name, sha256, time, deployment_id, file_size, resolution)
                       SELECT format('scale/%%s/%%s.jpg', i / 1000, i), md5(i::text) || md5((-i)::text), now(), %s,
                              100000, '{4656,3496}'
                       FROM generate_series(1, %s) AS i''', (deployment, rows))
        ms.psycopg2.extras.execute_values(
            cur, 'UPDATE files_image f SET sha256 = v.sha256 FROM (VALUES %s) AS v (name, sha256) '
                 'WHERE f.object_name = v.name', [(f.object_name, f.sha256) for f in present])
        cur.execute('INSERT INTO mm_files_image_storage (file_id, storage_id, type) SELECT file_id, %s, 0 '
                    'FROM files_image', (source,))
        cur.execute('ANALYZE')
    conn.commit()
    filling = time.perf_counter() - started
    ThreadedUpload(stage.s3, bucket).run(present)
    env = dict(stage.env, MITWELTEN_DB_SCHEMA=schema)
    first_bytes = []
    for _ in range(rounds):
        disk = stage.fresh_dir('scale-target')
        target = ms.create_local_backend(settings, str(disk), 2, f'scale {stage.count}').storage_id
        started = time.perf_counter()
        process = subprocess.Popen(TOOL + ['copy', '-s', str(source), '-t', str(target), 'all_images'], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        folder = disk / 'archive' / 'scale' / '0'

        def first_file() -> bool:
            try:
                return any(not name.startswith('.') for name in os.listdir(folder))
            except FileNotFoundError:
                return False
        while not first_file() and process.poll() is None:
            time.sleep(0.002)
        first_bytes.append(time.perf_counter() - started)
        process.send_signal(2)
        process.wait(120)
    # Catalog writes: the tool's own CatalogWriter, recording 200,000 rows in its batches.
    writer_conn = ms.connect_catalog(settings)
    writer = ms.CatalogWriter(writer_conn, ms.GROUPS['image'])
    target = ms.create_local_backend(settings, str(stage.fresh_dir('scale-rows')), 2, 'rows').storage_id
    recorded = 200_000
    started = time.perf_counter()
    for file_id in range(1, recorded + 1):
        writer.add(ms.CatalogFile(file_id, '', 0, ''), target, 0)
        if writer.pending_inserts >= writer.every_rows:
            writer.flush()
    writer.flush()
    per_file_ms = (time.perf_counter() - started) / recorded * 1000
    writer_conn.close()
    conn.close()
    lines = ['\n### 5. Selection at scale', '',
             f'{rows:,} rows in files_image (filled in {filling:.1f} s), all held by the source bucket.', '',
             '| measure | value |', '|---|---:|',
             f'| start of `copy` to the first byte on the disk (median of {rounds}) | '
             f'{statistics.median(first_bytes):.2f} s |',
             f'| catalog writes, amortised ({recorded:,} rows in batches of {writer.every_rows}) | '
             f'{per_file_ms:.3f} ms per file |']
    print('\n'.join(lines), flush=True)
    return lines


# --- main -------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--only', default='copy,copy-large,copy-rclone,webp,flac,memory,selection,service,coverage')
    parser.add_argument('--copy-files', type=int, default=100)
    parser.add_argument('--webp-files', type=int, default=24)
    parser.add_argument('--flac-files', type=int, default=60)
    args = parser.parse_args()
    only = set(args.only.split(','))
    header = ['## Benchmarks', '', f'Machine: {machine()}.', '',
              'Versions: ' + '; '.join([version_of([str(BIN / 's5cmd'), 'version']),
                                        version_of([str(BIN / 'rclone'), 'version']),
                                        version_of([str(BIN / 'aws'), '--version']),
                                        version_of([ms.ffmpeg_executable(), '-version'])[:40],
                                        f'Pillow {Image.__version__}'])]
    print('\n'.join(header), flush=True)
    lines = list(header)
    workdir = Path(tempfile.mkdtemp(prefix='mitwelten-bench-'))
    try:
        with throwaway_services() as services:
            stage = Stage(services, workdir)
            needs_images = only & {'copy', 'copy-large', 'webp', 'memory'}
            images = sample_data.camera_images(max(args.copy_files, args.webp_files, 40)) if needs_images else []
            if 'copy' in only:
                lines += bench_copy(stage, images[:args.copy_files], args.rounds,
                                    '1. Copy of originals, S3 → local disk', 'copy-source')
            if 'copy-large' in only:
                large = unique_copies(images[:100], 4)
                lines += bench_copy(stage.in_schema('bench_copy_large'), large, args.rounds,
                                    '1b. The same with 400 files: where start-up no longer dominates', 'copy-large')
            if 'webp' in only:
                lines += bench_webp(stage.in_schema('bench_webp'), images[:args.webp_files], args.rounds)
            if 'flac' in only:
                recordings = sample_data.sample_recordings(args.flac_files, seconds=60.0, rate=48000)
                lines += bench_flac(stage.in_schema('bench_flac'), recordings, args.rounds)
            if 'memory' in only:
                lines += bench_memory(stage, images[:100], args.rounds)
            if 'selection' in only:
                lines += bench_selection(stage, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # Benchmarks with servers of their own (rclone serve s3 pinned to its cores, the service):
    for name, module, title in (('copy-rclone', 'bench.copy_rclone', '6. Copy at scale, S3 → disk, against a '
                                 'multi-core S3 server (rclone serve s3) on cores of its own'),
                                ('service', 'bench.service', '7. The storage service: GET …/original through it, '
                                 'and archive --via'),
                                ('coverage', 'bench.coverage', '8. coverage at scale: 2 million files, 5 million '
                                 'copies')):
        if name in only:
            print(f'\n### {title}\n', flush=True)
            out = subprocess.run([sys.executable, '-m', module, '--rounds', str(args.rounds)], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
            print(out.stdout, end='', flush=True)
            lines += ['', f'### {title}', ''] + [line for line in out.stdout.splitlines()
                                                 if not line.startswith(('  round', '(written'))]
    results = ROOT / 'bench' / 'results'
    results.mkdir(exist_ok=True)
    out = results / f'{dt.datetime.now():%Y%m%dT%H%M%S}.md'
    out.write_text('\n'.join(lines) + '\n')
    print(f'\n(written to {out})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
