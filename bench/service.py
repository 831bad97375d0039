"""The storage service's cost: GET …/original through it against get_object straight from the same
S3 server, with one worker process and more; and `archive --via` against `archive` direct.

    python -m bench.service                         # 100 files, workers 1 and 2, 3 rounds
    python -m bench.service --files 60 --workers 1,2,4 --rounds 5
    python -m bench.service --hey                   # hey at concurrency 1, 8, 64 (see hey_compare)

`archive` is run with --delete-original: rclone serve s3 answers GetObjectTagging with 500,
and a replacement carries the original's tags to its version. The S3 server is `rclone serve s3` (a multi-core server, as MinIO is) on the machine's cores,
serving camera-trap JPEGs of about 4.3 MB; the catalog a throwaway PostgreSQL; tokens from the
test issuer in devkit. Every contender is its own process (its CPU from wait4), run alternately,
medians reported. `make bench` runs it (`--only service`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.copy_rclone import ACCESS_KEY, BUCKET, SECRET_KEY, Stage, catalog_files, free_port, machine

ROOT = Path(__file__).resolve().parent.parent
TOOL = [sys.executable, str(ROOT / 'mitwelten_storage.py')]

# The two readers, each run as a process of its own: every object read whole, in 1 MiB pieces.
DIRECT = '''
import sys, boto3
from botocore.config import Config
from concurrent.futures import ThreadPoolExecutor
endpoint, bucket, jobs, keys = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
s3 = boto3.client('s3', endpoint_url=endpoint, config=Config(s3={'addressing_style': 'path'},
                  max_pool_connections=jobs + 2, region_name='us-east-1'))
def get(key):
    body = s3.get_object(Bucket=bucket, Key=key)['Body']
    return sum(len(chunk) for chunk in body.iter_chunks(1 << 20))
with ThreadPoolExecutor(jobs) as pool:
    print(sum(pool.map(get, keys)))
'''
THROUGH_SERVICE = '''
import sys, urllib3
from concurrent.futures import ThreadPoolExecutor
base, token, jobs, ids = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
http = urllib3.PoolManager(maxsize=jobs + 2)
def get(file_id):
    response = http.request('GET', f'{base}/images/{file_id}/original', preload_content=False,
                            headers={'Authorization': f'Bearer {token}'})
    assert response.status == 200, response.status
    size = sum(len(chunk) for chunk in response.stream(1 << 20))
    response.release_conn()
    return size
with ThreadPoolExecutor(jobs) as pool:
    print(sum(pool.map(get, ids)))
'''


def timed(argv: list, env: dict) -> tuple[float, float, str]:
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout = process.stdout.read()
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f'{argv[:3]} failed: {stderr.decode(errors="replace")[-2000:]}')
    return seconds, usage.ru_utime + usage.ru_stime, stdout.decode()


def service(env: dict, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / 'mitwelten_service.py'), '--port', str(port),
                                '--workers', str(workers)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + '/healthz', timeout=2).close()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError('the service did not start')


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and all its descendants so far (from /proc)."""
    total = 0.0
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
        for task in Path(f'/proc/{pid}/task').iterdir():
            for child in (task / 'children').read_text().split():
                total += cpu_seconds(int(child))
    except (OSError, IndexError, ValueError):
        pass
    return total


def hey(url: str, concurrency: int, requests: int, headers: dict) -> dict:
    """One run of `hey` (an independent HTTP load tool, Debian's package): requests per second,
    the 99th percentile latency, and the status codes."""
    argv = ['hey', '-n', str(requests), '-c', str(concurrency), '-disable-compression']
    for name, value in headers.items():
        argv += ['-H', f'{name}: {value}']
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True, timeout=900).stdout
    rps = float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1))
    p99 = re.search(r'99%+ in ([\d.]+) secs', out)
    statuses = dict(re.findall(r'\[(\d+)\]\s+(\d+) responses', out))
    return {'rps': rps, 'p99': float(p99.group(1)) if p99 else float('nan'), 'statuses': statuses}


def hey_compare(args) -> int:
    """GET of one camera image (about 4.5 MB) with `hey` at concurrency 1, 8 and 64: through the
    service (1 worker, and --workers 2) and straight from the same S3 server (moto, a presigned
    URL), side by side in one run, alternating, medians of --rounds. The service's CPU per GB
    from /proc. On a shared machine the ratios in one run are what counts, not the MB/s."""
    sys.path.insert(0, str(ROOT))
    import boto3
    from botocore.config import Config
    import mitwelten_storage as ms
    from devkit import sample_data
    from devkit.oidc import TestIssuer
    from devkit.services import throwaway_services
    if not shutil.which('hey'):
        print('hey is not installed (Debian: apt install hey)', file=sys.stderr)
        return 2
    with throwaway_services() as svc, TestIssuer() as issuer:
        settings = ms.Settings(dsn=svc.pg_dsn, schema='bench')
        ms.init_db(settings)
        s3 = boto3.client('s3', endpoint_url=svc.s3_endpoint,
                          config=Config(s3={'addressing_style': 'path'}, region_name='us-east-1'))
        s3.create_bucket(Bucket='bench')
        storage_id = ms.create_s3_backend(settings, f'{svc.s3_endpoint}/bench', 0, 'bench').storage_id
        image, = sample_data.sample_images(1, width=5200, height=3900, seed=5)
        sample_data.upload(s3, 'bench', [image])
        sample_data.catalog_in_schema(svc.pg_dsn, 'bench', [image], storage_id=storage_id)
        presigned = s3.generate_presigned_url('get_object', Params={'Bucket': 'bench', 'Key': image.object_name},
                                              ExpiresIn=6 * 3600)
        env = {**os.environ, 'MITWELTEN_DB': svc.pg_dsn, 'MITWELTEN_DB_SCHEMA': 'bench',
               'MITWELTEN_OIDC_ISSUER': issuer.url, 'MITWELTEN_OIDC_AUDIENCE': issuer.audience}
        token = issuer.token(expires_in=6 * 3600)
        workers = [int(w) for w in args.workers.split(',')]
        services = {w: service(env, w) for w in workers}
        contenders = {'direct from S3 (presigned)': (presigned, {}, None)}
        for w, (process, url) in services.items():
            contenders[f'through the service, {w} worker{"s" if w > 1 else ""}'] = (
                f'{url}/images/{image.file_id}/original', {'Authorization': f'Bearer {token}'}, process.pid)
        mb = len(image.data) / 1e6
        print(f'Machine: {machine()}. One image of {mb:.2f} MB; moto as the S3 server; hey; '
              f'median of {args.rounds} rounds, contenders alternating.', flush=True)
        lines = ['', '| concurrency | reader | MB/s | p99 ms | × direct | service CPU s/GB |',
                 '|---:|---|---:|---:|---:|---:|']
        names = list(contenders)
        for concurrency in (1, 8, 64):
            requests = -(-max(args.hey_requests, 8 * concurrency) // concurrency) * concurrency  # hey: n/c each
            samples: dict[str, list] = {name: [] for name in names}
            for round_ in range(args.rounds):
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                    url, headers, pid = contenders[name]
                    cpu = cpu_seconds(pid) if pid else 0.0
                    result = hey(url, concurrency, requests, headers)
                    cpu = cpu_seconds(pid) - cpu if pid else float('nan')
                    if result['statuses'] != {'200': str(requests)}:
                        raise RuntimeError(f'{name}: {result["statuses"]}')
                    samples[name].append((result['rps'] * mb, result['p99'] * 1000, cpu / (requests * mb / 1000)))
            direct = statistics.median(s[0] for s in samples[names[0]])
            for name in names:
                rate = statistics.median(s[0] for s in samples[name])
                p99 = statistics.median(s[1] for s in samples[name])
                cpu = statistics.median(s[2] for s in samples[name])
                lines.append(f'| {concurrency} | {name} | {rate:,.0f} | {p99:,.1f} | {rate / direct:.2f} | '
                             + ('' if cpu != cpu else f'{cpu:.2f}') + ' |')
        print('\n'.join(lines), flush=True)
        if args.profile:
            profile(contenders[names[1]], mb)
        for process, _ in services.values():
            process.terminate()
            process.wait(30)
    return 0


def profile(contender: tuple, mb: float, seconds: int = 15) -> None:
    """Where a worker's time goes: py-spy samples the service (1 worker) while hey keeps it busy
    at concurrency 8; the frames that hold most samples, inclusive and as the innermost one."""
    import collections
    import threading
    url, headers, pid = contender
    spy = shutil.which('py-spy', path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not spy:
        print('\n(py-spy is not installed: pip install py-spy)')
        return
    raw = Path(tempfile.mkdtemp()) / 'profile.txt'
    load = threading.Thread(target=hey, args=(url, 8, 8 * max(25, int(seconds * 50 / mb)), headers))
    load.start()
    time.sleep(1)
    subprocess.run([spy, 'record', '--pid', str(pid), '--subprocesses', '--duration', str(seconds),
                    '--rate', '200', '--format', 'raw', '--output', str(raw), '--nonblocking'],
                   check=True, capture_output=True)
    load.join()
    inclusive, innermost, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(' ')
        frames = [re.sub(r' \((?:.*/)?([^/]+):\d+\)', r' (\1)', f) for f in stack.split(';')]
        if frames[-1].startswith(('Condition.wait (threading.py)', 'EpollSelector.select (selectors.py)')):
            continue                    # idle: a thread waiting for work, the event loop for events
        n = int(count)
        total += n
        innermost[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f'\nWhere a worker\'s busy time goes (py-spy, {total} busy samples at 200 Hz, hey -c 8):\n')
    print('| innermost frame | share |', '|---|---:|', sep='\n')
    for frame, n in innermost.most_common(12):
        print(f'| `{frame}` | {n / total:.0%} |')
    print('\n| frame, with what it calls | share |', '|---|---:|', sep='\n')
    for frame, n in inclusive.most_common(40):
        if n < total * 0.97:
            print(f'| `{frame}` | {n / total:.0%} |')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--hey', action='store_true', help='only the hey comparison at concurrency 1, 8, 64')
    parser.add_argument('--hey-requests', type=int, default=200, help='requests per hey run (at least 8 × concurrency)')
    parser.add_argument('--profile', action='store_true', help='with --hey: py-spy on the service under load')
    parser.add_argument('--files', type=int, default=100)
    parser.add_argument('--archive-files', type=int, default=40)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--workers', default='1,2')
    parser.add_argument('--jobs', type=int, default=8)
    parser.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'mitwelten-service-bench'))
    args = parser.parse_args()
    if args.hey:
        return hey_compare(args)
    stage_args = argparse.Namespace(workdir=args.workdir, db=None, schema=None, files=args.files, distinct=8,
                                    data_dir=str(Path(args.workdir) / 's3data'), server_cores=','.join(
                                        str(c) for c in sorted(os.sched_getaffinity(0))), serve_args='')
    sys.path.insert(0, str(ROOT))
    from devkit.oidc import TestIssuer
    shutil.rmtree(Path(args.workdir) / 'out', ignore_errors=True)
    stage = Stage(stage_args)
    try:
        dsn = stage.start_catalog()
        files = stage.make_data()
        data_root = Path(stage_args.data_dir).resolve()
        pristine = Path(args.workdir) / 'pristine'          # the originals, to put back before each archive run
        shutil.rmtree(pristine, ignore_errors=True)
        shutil.copytree(data_root, pristine)
        endpoint = stage.start_server(data_root)
        aws = Path(args.workdir) / 'aws'
        aws.mkdir(exist_ok=True)
        for name in ('config', 'credentials'):
            (aws / name).write_text('')
        issuer = TestIssuer()
        env = {k: v for k, v in os.environ.items() if not k.startswith(('AWS_', 'MITWELTEN_'))}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION='us-east-1',
                   AWS_CONFIG_FILE=str(aws / 'config'), AWS_SHARED_CREDENTIALS_FILE=str(aws / 'credentials'),
                   MITWELTEN_DB=dsn, MITWELTEN_DB_SCHEMA=stage.schema, MITWELTEN_LOG_DIR=str(Path(args.workdir) / 'logs'),
                   MITWELTEN_MOUNT_ROOTS='', MITWELTEN_OIDC_ISSUER=issuer.url, MITWELTEN_OIDC_AUDIENCE=issuer.audience)
        subprocess.run([*TOOL, 'init-db'], env=env, check=True, stdout=subprocess.DEVNULL)
        created = subprocess.run([*TOOL, 'create', '-t', 's3', '-p', '0', '-n', 'bench', f'{endpoint}/{BUCKET}'],
                                 env=env, check=True, capture_output=True, text=True).stdout
        source = int(re.search(r'backend (\d+)', created).group(1))
        catalog_files(dsn, stage.schema, files, source)
        token = issuer.token(expires_in=6 * 3600)
        megabytes = sum(f['size'] for f in files) / 1e6
        ids = [str(i) for i in range(1, len(files) + 1)]
        workers = [int(w) for w in args.workers.split(',')]
        services = {w: service(env, w) for w in workers}
        contenders = {'get_object straight from S3 (boto3)':
                      [sys.executable, '-c', DIRECT, endpoint, BUCKET, str(args.jobs), *[f['name'] for f in files]]}
        for w, (_, url) in services.items():
            contenders[f'GET …/original through the service, {w} worker{"s" if w > 1 else ""}'] = [
                sys.executable, '-c', THROUGH_SERVICE, url, token, str(args.jobs), *ids]
        print(f'Machine: {machine()}. {len(files)} files, {megabytes:,.0f} MB; {args.jobs} client threads; '
              f'rclone serve s3 on every core; median of {args.rounds} rounds.', flush=True)
        samples: dict[str, list] = {name: [] for name in contenders}
        names = list(contenders)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                seconds, cpu, out = timed(contenders[name], env)
                if abs(int(out.strip()) - megabytes * 1e6) > 1:
                    raise RuntimeError(f'{name} read {out.strip()} bytes')
                samples[name].append((seconds, cpu))
        direct = statistics.median(s for s, _ in samples[names[0]])
        lines = ['', '| reader | seconds | MB/s | client CPU s | × direct throughput |', '|---|---:|---:|---:|---:|']
        for name in names:
            seconds = statistics.median(s for s, _ in samples[name])
            cpu = statistics.median(c for _, c in samples[name])
            lines.append(f'| {name} | {seconds:.2f} | {megabytes / seconds:,.0f} | {cpu:.2f} | {direct / seconds:.2f} |')
        print('\n'.join(lines), flush=True)

        # archive --via against archive direct, with the originals put back before every run
        some = files[:args.archive_files]
        archive_mb = sum(f['size'] for f in some) / 1e6
        timings: dict[str, list] = {'archive direct': [], 'archive --via': []}

        def reset() -> None:
            for f in some:
                shutil.copyfile(pristine / BUCKET / f['name'], data_root / BUCKET / f['name'])
            subprocess.run([sys.executable, '-c', (
                'import psycopg2, sys; c = psycopg2.connect(sys.argv[1]); cur = c.cursor(); '
                'cur.execute(f"SET search_path TO {sys.argv[2]}"); '
                'cur.execute("DELETE FROM mm_files_image_storage WHERE storage_id <> %s", (int(sys.argv[3]),)); '
                'cur.execute("UPDATE mm_files_image_storage SET type = 0"); c.commit()'), dsn, stage.schema,
                str(source)], check=True)
        limit = ['--limit', str(len(some))]
        for round_ in range(args.rounds):
            for name in (list(timings) if round_ % 2 == 0 else list(timings)[::-1]):
                reset()
                disk = stage.fresh_dir('archive')
                created = subprocess.run([*TOOL, 'create', '-t', 'local', '-p', '2', '-n', disk.name, disk], env=env,
                                         check=True, capture_output=True, text=True).stdout
                target = re.search(r'backend (\d+)', created).group(1)
                # --delete-original: rclone serve s3 answers GetObjectTagging with 500, and a
                # replacement carries the original's tags over to its version.
                argv = [*TOOL, 'archive', '-s', str(source), '-t', target, 'all_images', '--delete-original', *limit]
                run_env = env
                if '--via' in name:
                    argv += ['--via', services[1][1] if 1 in services else services[workers[0]][1]]
                    run_env = {k: v for k, v in env.items() if not k.startswith('AWS_')}
                    run_env['MITWELTEN_TOKEN'] = token
                seconds, cpu, _ = timed(argv, run_env)
                timings[name].append((seconds, cpu))
                shutil.rmtree(disk)
        direct = statistics.median(s for s, _ in timings['archive direct'])
        more = ['', f'`archive --delete-original` of {len(some)} files ({archive_mb:,.0f} MB), S3 → disk, the '
                    'originals deleted by the tool (direct) or by the service (--via)', '',
                '| run | seconds | MB/s | workstation CPU s | × direct |', '|---|---:|---:|---:|---:|']
        for name, values in timings.items():
            seconds = statistics.median(s for s, _ in values)
            cpu = statistics.median(c for _, c in values)
            more.append(f'| {name} | {seconds:.2f} | {archive_mb / seconds:,.1f} | {cpu:.2f} | {seconds / direct:.2f} |')
        print('\n'.join(more), flush=True)
        for process, _ in services.values():
            process.terminate()
            process.wait(30)
        issuer.stop()
    finally:
        stage.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
