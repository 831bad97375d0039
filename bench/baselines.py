"""What the tool is measured against that is not a command of its own: the earlier Mitwelten
scripts' ways of doing the same jobs, reproduced from their description in the benchmark issue.

    python -m bench.baselines copy ENDPOINT BUCKET TARGET_DIR
        one get_object at a time, the whole object read into memory, then written
    python -m bench.baselines webp BOX_W BOX_H OUT_DIR FILE…
        full decode, thumbnail(LANCZOS), Pillow's WebP defaults, 10 threads
    python -m bench.baselines webp-thumbnail BOX_W BOX_H OUT_DIR FILE…
        the same, but thumbnail() left to decode at reduced size itself (its reducing_gap 2.0)
"""

from __future__ import annotations

import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore.config import Config
from PIL import Image


def earlier_copy(endpoint: str, bucket: str, target: Path) -> None:
    s3 = boto3.client('s3', endpoint_url=endpoint, config=Config(s3={'addressing_style': 'path'}))
    keys = [obj['Key'] for page in s3.get_paginator('list_objects_v2').paginate(Bucket=bucket)
            for obj in page.get('Contents', [])]
    for key in keys:
        data = s3.get_object(Bucket=bucket, Key=key)['Body'].read()
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def earlier_pixels(name: str, box: tuple[int, int], full_decode: bool = True) -> Image.Image:
    """The earlier algorithm's picture before it is encoded."""
    image = Image.open(name)
    if full_decode:
        image.load()      # decoded whole first: thumbnail() can no longer decode at reduced size
    image.thumbnail(box, Image.Resampling.LANCZOS)
    return image


def earlier_webp(box: tuple[int, int], out_dir: Path, files: list[str], full_decode: bool = True) -> None:
    def convert(name: str) -> None:
        image = earlier_pixels(name, box, full_decode)
        out = io.BytesIO()
        image.save(out, 'WEBP', exif=image.info.get('exif', b''))
        (out_dir / (Path(name).stem + '.webp')).write_bytes(out.getvalue())
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(convert, files))


if __name__ == '__main__':
    command, *args = sys.argv[1:]
    if command == 'copy':
        earlier_copy(args[0], args[1], Path(args[2]))
    elif command == 'webp':
        earlier_webp((int(args[0]), int(args[1])), Path(args[2]), args[3:])
    elif command == 'webp-thumbnail':
        earlier_webp((int(args[0]), int(args[1])), Path(args[2]), args[3:], full_decode=False)
    else:
        sys.exit(f'unknown baseline {command}')
