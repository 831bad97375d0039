"""`coverage` at scale: a catalog of 2 million files and 5 million copies, with a fixity log.

Filled with SQL (generate_series) in a throwaway PostgreSQL; no file is written anywhere, since
`coverage` reads only the catalog. 1.6 million images and 400,000 recordings over 36 months and
400 deployments of 200 nodes; every file on an archive disk (8 disks), the active bucket holding
a WebP or FLAC in the original's place, 60 % of the images on a second disk, 10 % of the
recordings as gzip on a second bucket; 400,000 checks in the fixity log, 4,000 of them corrupt.

    python -m bench.coverage [--rounds 3] [--files 2000000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mitwelten_storage as ms  # noqa: E402
from devkit.services import throwaway_services  # noqa: E402

TOOL = [sys.executable, str(ROOT / 'mitwelten_storage.py')]

FILL = """
INSERT INTO storage_backend (url_prefix, type, priority, notes) VALUES
  ('http://minio.example:9000/active', 's3', 0, 'active'), ('http://minio.example:9000/cold', 's3', 1, 'cold');
INSERT INTO storage_backend (url_prefix, type, priority, notes)
  SELECT '/media/archive' || d, 'local', 2, 'Archive ' || d FROM generate_series(1, 8) d;
INSERT INTO nodes (node_label, type) SELECT format('%s-%s', 1000 + n, 2000 + n),
  CASE WHEN n % 3 = 0 THEN 'Audiomoth' ELSE 'Pollinator Cam' END FROM generate_series(1, 200) n;
INSERT INTO deployments (node_id, location) SELECT 1 + (d % 200), point(47.5, 7.6) FROM generate_series(1, 400) d;
INSERT INTO tags (name) VALUES ('FS1'), ('FS2'), ('FS3');
INSERT INTO mm_tags_deployments SELECT 1 + d % 3, d FROM generate_series(1, 400) d;
INSERT INTO files_image (object_name, sha256, time, deployment_id, file_size, resolution)
  SELECT format('img/%s/%s.jpg', i / 1000, i), md5(i::text) || md5((-i)::text),
         timestamptz '2021-01-01' + (i % 1096) * interval '1 day', 1 + i % 400, 4500000, '{4656,3496}'
  FROM generate_series(1, %(images)s) i;
INSERT INTO files_audio (object_name, sha256, time, deployment_id, duration, file_size, sample_rate)
  SELECT format('wav/%s/%s.wav', i / 1000, i), md5(i::text || 'a') || md5((-i)::text || 'a'),
         timestamptz '2021-01-01' + (i % 1096) * interval '1 day', 1 + i % 400, 60, 5760000, 48000
  FROM generate_series(1, %(recordings)s) i;
-- every file on one of the 8 disks (backends 3..10), its version on the active bucket (1)
INSERT INTO mm_files_image_storage (file_id, storage_id, type, created_at)
  SELECT file_id, 3 + file_id % 8, 0, now() - (file_id % 700) * interval '1 day' FROM files_image;
INSERT INTO mm_files_image_storage (file_id, storage_id, type, created_at)
  SELECT file_id, 1, 1, now() FROM files_image;
INSERT INTO mm_files_image_storage (file_id, storage_id, type, created_at)
  SELECT file_id, 3 + (file_id + 1) % 8, 0, now() FROM files_image WHERE file_id % 10 < 6;
INSERT INTO mm_files_audio_storage (file_id, storage_id, type, created_at)
  SELECT file_id, 3 + file_id % 8, 0, now() - (file_id % 700) * interval '1 day' FROM files_audio;
INSERT INTO mm_files_audio_storage (file_id, storage_id, type, created_at)
  SELECT file_id, 1, 1, now() FROM files_audio;
INSERT INTO mm_files_audio_storage (file_id, storage_id, type, created_at)
  SELECT file_id, 2, 10, now() FROM files_audio WHERE file_id % 10 = 0;
-- the fixity log: scrubs of the oldest disk copies, some corrupt
INSERT INTO storage_fixity (file_group, file_id, storage_id, type, checked_at, outcome, event, agent)
  SELECT 'image', file_id, 3 + file_id % 8, 0, now() - (file_id % 300) * interval '1 day',
         CASE WHEN file_id % 400 = 0 THEN 'corrupt' ELSE 'ok' END, 'verify', 'bench'
  FROM files_image WHERE file_id % 4 = 0;
ANALYZE;
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--files', type=int, default=2_000_000)
    parser.add_argument('--explain', action='store_true', help="also print EXPLAIN ANALYZE of the images' query "
                                                                'by deployment')
    args = parser.parse_args()
    images, recordings = args.files * 4 // 5, args.files // 5
    with throwaway_services() as services:
        settings = ms.Settings(services.pg_dsn, 'bench_coverage')
        ms.init_db(settings)
        conn = ms.connect_catalog(settings)
        started = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute(FILL.replace('%(images)s', str(images)).replace('%(recordings)s', str(recordings)))
            cur.execute('SELECT (SELECT count(*) FROM mm_files_image_storage) + (SELECT count(*) FROM '
                        'mm_files_audio_storage), (SELECT count(*) FROM storage_fixity)')
            copies, checks = cur.fetchone()
        conn.commit()
        conn.close()
        filled = time.perf_counter() - started
        print(f'{images + recordings:,} files, {copies:,} copies, {checks:,} fixity rows (filled in {filled:.0f} s)',
              flush=True)
        if args.explain:
            conn = ms.connect_catalog(settings)
            with conn.cursor() as cur:
                cur.execute('EXPLAIN (ANALYZE, BUFFERS) ' + ms._coverage_query(ms.GROUPS['image'], 'deployment', None,
                                                                               [], True))
                print('\n'.join(row[0] for row in cur.fetchall()), flush=True)
            conn.close()
        env = dict(os.environ, MITWELTEN_DB=services.pg_dsn, MITWELTEN_DB_SCHEMA='bench_coverage',
                   MITWELTEN_MOUNT_ROOTS='')
        lines = ['| command | median of %d | rounds |' % args.rounds, '|---|---:|---|']
        for command in (['coverage', '--by', 'deployment'], ['coverage', '--by', 'month'],
                        ['coverage', '--by', 'backend'], ['coverage', '--by', 'tag', '--json'],
                        ['whereis', 'image', str(images // 2)]):
            seconds = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                result = subprocess.run(TOOL + command, env=env, capture_output=True, text=True)
                seconds.append(time.perf_counter() - t0)
                if result.returncode not in (0, 1):
                    print(result.stderr, file=sys.stderr)
                    return 1
            lines.append(f'| `{" ".join(command)}` | {statistics.median(seconds):.2f} s | '
                         + ', '.join(f'{s:.2f}' for s in seconds) + ' |')
            print(lines[-1], flush=True)
        # The same, in this process, with the catalog server's CPU time for it (its backend's
        # utime + stime from /proc): on a busy machine the wall-clock time says more about the others.
        conn = ms.connect_catalog(settings)
        with conn.cursor() as cur:
            cur.execute('SELECT pg_backend_pid()')
            pid = cur.fetchone()[0]
        conn.commit()
        lines += ['', '| query (both groups, in-process) | wall, median | catalog server CPU, median |', '|---|---:|---:|']
        for by in ('deployment', 'month', 'tag', 'backend'):
            walls, cpus = [], []
            for _ in range(args.rounds):
                cpu0, t0 = server_cpu(pid), time.perf_counter()
                ms.coverage(settings, by=by, conn=conn)
                walls.append(time.perf_counter() - t0)
                cpus.append(server_cpu(pid) - cpu0)
            lines.append(f'| `--by {by}` | {statistics.median(walls):.2f} s | {statistics.median(cpus):.2f} s |')
            print(lines[-1], flush=True)
        conn.close()
        print(f'load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
        print('\n'.join(lines))
    return 0


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) a local process has used, from /proc (Linux)."""
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


if __name__ == '__main__':
    sys.exit(main())
