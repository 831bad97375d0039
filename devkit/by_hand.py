"""`python -m devkit.by_hand`: throwaway services to try the tool by hand, as `make serve` starts them.

Starts a throwaway PostgreSQL and S3 server (devkit.services), creates the catalog schema
`prod`, registers the bucket `mitwelten-active` as backend 1 (priority 0) and fills it with
sample images and recordings, catalogued; then prints the environment to set in another shell
(the catalog's DSN and the S3 server's test credentials) and commands to try. Ctrl-C stops
everything; ./demo-data/by-hand holds the disks you create there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import boto3
from botocore.config import Config

from devkit import sample_data
from devkit.services import S3_TEST_CREDENTIALS, throwaway_services

ROOT = Path(__file__).resolve().parent.parent
HERE = Path.cwd() / 'demo-data' / 'by-hand'


def main() -> int:
    shutil.rmtree(HERE, ignore_errors=True)
    (HERE / 'disk-01').mkdir(parents=True)
    with throwaway_services() as svc:
        env = dict(os.environ, MITWELTEN_DB=svc.pg_dsn, MITWELTEN_DB_SCHEMA='prod', MITWELTEN_LOG_DIR=str(HERE / 'logs'))
        s3 = boto3.client('s3', endpoint_url=svc.s3_endpoint, config=Config(s3={'addressing_style': 'path'}))
        s3.create_bucket(Bucket='mitwelten-active')
        for args in (('init-db',), ('create', '-t', 's3', '-p', '0', '-n', 'active tier',
                                    f'{svc.s3_endpoint}/mitwelten-active')):
            subprocess.run([sys.executable, str(ROOT / 'mitwelten_storage.py'), *args], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        files = sample_data.sample_images(12, width=2028, height=1520, seed=7) + \
            sample_data.sample_recordings(4, seconds=5.0, seed=8)
        sample_data.upload(s3, 'mitwelten-active', files)
        sample_data.catalog_in_schema(svc.pg_dsn, 'prod', files, storage_id=1)
        credentials = ' '.join(f'{k}={v}' for k, v in S3_TEST_CREDENTIALS.items())
        print(f'''
Throwaway services are running (Ctrl-C here stops them). In another shell, in this folder:

  export MITWELTEN_DB='{svc.pg_dsn}' MITWELTEN_DB_SCHEMA=prod
  export {credentials}
  export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null   # none of your own AWS profiles
  . .venv/bin/activate

The catalog has schema prod; backend 1 is the bucket {svc.s3_endpoint}/mitwelten-active with
12 images and 4 recordings. Try:

  python mitwelten_storage.py info
  python mitwelten_storage.py create -t local -p 2 -n "Disk 01" {HERE / 'disk-01'}
  python mitwelten_storage.py copy -s 1 -t 2 all_images --dry-run
  python mitwelten_storage.py copy -s 1 -t 2 all_images
  python mitwelten_storage.py archive -s 1 -t 2 all_audio --replace-with 1
  python mitwelten_storage.py verify 2
  python mitwelten_storage.py report 2
  psql "$MITWELTEN_DB" -c 'SELECT * FROM prod.storage_backend'     # if you have psql
''', flush=True)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))    # `kill` stops the services too
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
