"""`make serve`: the storage service against the throwaway services of `make demo`, for a look.

Starts a throwaway PostgreSQL and S3 server with sample data (an active bucket, an archive disk
folder in ./demo-data), a test OIDC issuer standing in for Mitwelten's Keycloak, and the service
on http://127.0.0.1:8080 (MITWELTEN_SERVE_PORT to change). Prints a token and curl commands to
try; Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
from botocore.config import Config

from devkit import sample_data
from devkit.oidc import TestIssuer
from devkit.services import throwaway_services

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = Path.cwd() / 'demo-data'


def tool(*args, env: dict) -> None:
    subprocess.run([sys.executable, str(ROOT / 'mitwelten_storage.py'), *map(str, args)], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def main() -> int:
    port = int(os.environ.get('MITWELTEN_SERVE_PORT', '8080'))
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    disk = DEMO_DIR / 'archive-disk-01'
    disk.mkdir(parents=True)
    with throwaway_services() as svc, TestIssuer() as issuer:
        env = dict(os.environ, MITWELTEN_DB=svc.pg_dsn, MITWELTEN_DB_SCHEMA='prod',
                   MITWELTEN_LOG_DIR=str(DEMO_DIR / 'logs'))
        s3 = boto3.client('s3', endpoint_url=svc.s3_endpoint, config=Config(s3={'addressing_style': 'path'}))
        s3.create_bucket(Bucket='mitwelten-active')
        tool('init-db', env=env)
        tool('create', '-t', 's3', '-p', 0, '-n', 'active tier', f'{svc.s3_endpoint}/mitwelten-active', env=env)
        tool('create', '-t', 'local', '-p', 2, '-n', 'Archive 01 (demo USB disk)', disk, env=env)
        images = sample_data.sample_images(12, width=2028, height=1520, seed=7)
        recordings = sample_data.sample_recordings(4, seconds=5.0, seed=8)
        sample_data.upload(s3, 'mitwelten-active', images + recordings)
        sample_data.catalog_in_schema(svc.pg_dsn, 'prod', images + recordings, storage_id=1)
        env.update(MITWELTEN_OIDC_ISSUER=issuer.url, MITWELTEN_OIDC_AUDIENCE=issuer.audience)
        token = issuer.token(expires_in=12 * 3600)
        token_file = DEMO_DIR / 'token'
        token_file.write_text(token + '\n')
        base = f'http://127.0.0.1:{port}'
        print(f'''
The storage service, on throwaway services (stop with Ctrl-C):

  service   {base}      (its OpenAPI, with the token: {base}/openapi.json)
  catalog   {svc.pg_dsn}   schema prod
  S3        {svc.s3_endpoint}/mitwelten-active   (only the service has its keys)
  issuer    {issuer.url}
  token     {token_file}  (roles internal and storage-admin, valid 12 h)

Try:

  TOKEN=$(cat {token_file})
  curl -s {base}/healthz
  curl -s -H "Authorization: Bearer $TOKEN" {base}/backends
  curl -sD - -o first.jpg -H "Authorization: Bearer $TOKEN" {base}/images/1/original
  curl -s -H "Range: bytes=0-99" -H "Authorization: Bearer $TOKEN" {base}/images/1/original | wc -c

Archive every image onto the demo disk through the service, with no S3 keys:

  env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY MITWELTEN_TOKEN_FILE={token_file} \\
    MITWELTEN_DB='{svc.pg_dsn}' MITWELTEN_DB_SCHEMA=prod \\
    .venv/bin/python mitwelten_storage.py archive -s 1 -t 2 all_images --replace-with 1 --via {base}
''', flush=True)
        try:
            subprocess.run([sys.executable, str(ROOT / 'mitwelten_service.py'), '--port', str(port)], env=env)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
