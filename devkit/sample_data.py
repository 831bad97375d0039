"""Realistic sample data for the tests, the demo and the benchmarks.

Camera-trap JPEGs with EXIF and Mitwelten's object names
(`0344-6782/2021-07-27/14/0344-6782_2021-07-27T14-42-33Z.jpg`), WAV recordings, and the catalog
rows that describe them: nodes, deployments, tags, files_image / files_audio, and the storage rows
saying which backend holds them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import random
import wave

import numpy as np

import psycopg2
import psycopg2.extras
import psycopg2.sql
from PIL import Image, ImageDraw, ImageFilter

UTC = dt.timezone.utc

# (node_label, node type, tag, deployment period start): one deployment per node.
NODES = [
    ('0344-6782', 'Pollinator Cam', 'FS1', dt.datetime(2021, 6, 1, tzinfo=UTC)),
    ('1874-8542', 'Pollinator Cam', 'FS2', dt.datetime(2022, 6, 1, tzinfo=UTC)),
    ('6444-8804', 'Wild Cam', 'FS1', dt.datetime(2021, 5, 1, tzinfo=UTC)),
    ('4258-6870', 'Audiomoth', 'FS1', dt.datetime(2021, 5, 1, tzinfo=UTC)),
    ('2061-6644', 'Audiomoth', 'FS2', dt.datetime(2022, 5, 1, tzinfo=UTC)),
]


@dataclasses.dataclass
class SampleFile:
    group: str              # 'image' | 'audio'
    object_name: str
    data: bytes
    time: dt.datetime
    node_label: str
    resolution: tuple = (0, 0)
    sample_rate: int = 0
    channels: int = 0
    bit_depth: int = 0
    duration: float = 0.0
    file_id: int | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def make_jpeg(width: int, height: int, when: dt.datetime, rng: random.Random, orientation: int = 1,
              quality: int = 92) -> bytes:
    """A camera-trap-like JPEG: textured background, a few shapes, noise, EXIF as a camera writes it."""
    small = Image.new('RGB', (max(width // 16, 2), max(height // 16, 2)))
    small.putdata([(rng.randrange(40, 120), rng.randrange(90, 180), rng.randrange(30, 90))
                   for _ in range(small.width * small.height)])
    image = small.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(max(width // 40, 2), max(width // 8, 3))
        draw.ellipse((x - r, y - r, x + r, y + r),
                     fill=(rng.randrange(150, 255), rng.randrange(100, 230), rng.randrange(0, 120)))
    noise = Image.effect_noise((width, height), 24).convert('RGB')
    image = Image.blend(image.filter(ImageFilter.GaussianBlur(1)), noise, 0.12)
    exif = Image.Exif()
    exif[0x010F] = 'Raspberry Pi'                # Make
    exif[0x0110] = 'HQ Camera IMX477'            # Model
    exif[0x0112] = orientation                   # Orientation
    exif[0x0132] = when.strftime('%Y:%m:%d %H:%M:%S')
    exif.get_ifd(0x8769)[0x9003] = when.strftime('%Y:%m:%d %H:%M:%S')   # DateTimeOriginal
    out = io.BytesIO()
    image.save(out, 'JPEG', quality=quality, exif=exif)
    return out.getvalue()


class CameraFrames:
    """16 MP camera-trap JPEGs of about 4.5 MB, like the Mitwelten cameras', made quickly: one
    scene with the statistics of a photograph (detail at every scale, its strength falling with
    frequency roughly as in natural images, 1/f^0.8) plus sensor noise in brightness and colour;
    a different crop, a few objects and the camera's EXIF per frame. For the benchmarks."""

    def __init__(self, width: int = 4656, height: int = 3496, seed: int = 1):
        self.width, self.height = width, height
        self.rng = np.random.default_rng(seed)
        margin = 64
        shape = (height + margin, width + margin)
        scene = np.zeros(shape + (3,), np.float32)
        for scale in (256, 128, 64, 32, 16, 8, 4, 2):
            rows, cols = shape[0] // scale + 2, shape[1] // scale + 2
            noise = np.uint8(np.clip(self.rng.normal(0, 1, (rows, cols, 3)) * 40 + 128, 0, 255))
            layer = Image.fromarray(noise).resize((cols * scale, rows * scale), Image.Resampling.BICUBIC)
            amplitude = 90 * (scale / 256) ** 0.8
            scene += (np.asarray(layer, np.float32)[:shape[0], :shape[1]] - 128) / 40 * amplitude
        scene += self.rng.normal(0, 3.0, shape)[..., None].astype(np.float32)     # sensor noise, brightness
        scene += self.rng.normal(0, 2.0, scene.shape).astype(np.float32)          # ... and colour
        self.scene = np.uint8(np.clip(scene + np.array([90, 130, 60], np.float32), 0, 255))

    def frame(self, when: dt.datetime, quality: int = 93) -> bytes:
        dx, dy = (int(v) for v in self.rng.integers(0, 64, 2))
        image = Image.fromarray(self.scene[dy:dy + self.height, dx:dx + self.width])
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y, r = (int(v) for v in self.rng.integers((0, 0, 40), (self.width, self.height, 300)))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in self.rng.integers(60, 255, 3)))
        exif = Image.Exif()
        exif[0x010F], exif[0x0110], exif[0x0112] = 'Raspberry Pi', 'HQ Camera IMX477', 1
        exif.get_ifd(0x8769)[0x9003] = when.strftime('%Y:%m:%d %H:%M:%S')
        out = io.BytesIO()
        image.save(out, 'JPEG', quality=quality, exif=exif)
        return out.getvalue()


def camera_images(count: int, seed: int = 1, start: int = 0) -> list[SampleFile]:
    """`count` 16 MP camera-trap images of about 4.5 MB each, named and timed like sample_images()."""
    frames = CameraFrames(seed=seed)
    files = sample_images(count, width=8, height=8, seed=seed, start=start)
    for f in files:
        f.data = frames.frame(f.time)
        f.resolution = (frames.width, frames.height)
    return files


def make_wav(seconds: float, rate: int = 48000, channels: int = 1, bit_depth: int = 16,
             rng: random.Random | None = None) -> bytes:
    """A PCM WAV recording (8-, 16-, 24- or 32-bit): bird-like chirps over noise."""
    rng = rng or random.Random()
    noise = np.random.default_rng(rng.getrandbits(64))
    t = np.arange(int(seconds * rate)) / rate
    chirp = rng.uniform(2000, min(6000, rate / 3))
    base = 0.3 * np.sin(2 * np.pi * (chirp + 800 * np.sin(7 * t)) * t) * (0.5 + 0.5 * np.sin(3 * t))
    signal = np.stack([base + noise.normal(0, 0.05, t.size) + 0.05 * c for c in range(channels)], axis=1)
    peak = (1 << (bit_depth - 1)) - 1
    values = np.clip(np.round(signal * peak), -peak, peak).astype('<i4')
    if bit_depth == 8:
        data = (values + 128).astype(np.uint8).tobytes()
    elif bit_depth == 16:
        data = values.astype('<i2').tobytes()
    elif bit_depth == 24:
        data = values.astype('<i4').view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        data = values.tobytes()
    out = io.BytesIO()
    with wave.open(out, 'wb') as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(bit_depth // 8)
        wav.setframerate(rate)
        wav.writeframes(data)
    return out.getvalue()


def sample_images(count: int, width: int = 320, height: int = 240, seed: int = 1, start: int = 0) -> list[SampleFile]:
    """`count` camera-trap images; `start` shifts their times (and names) past an earlier call's."""
    rng = random.Random(seed)
    cams = [n for n in NODES if n[1].endswith('Cam')]
    files = []
    for i in range(start, start + count):
        label, _, _, period_start = cams[i % len(cams)]
        when = dt.datetime(period_start.year, 7, 27, 14, 42, 33, tzinfo=UTC) + dt.timedelta(seconds=37 * i)
        name = f"{label}/{when:%Y-%m-%d}/{when:%H}/{label}_{when:%Y-%m-%dT%H-%M-%S}Z.jpg"
        data = make_jpeg(width, height, when, rng)
        files.append(SampleFile('image', name, data, when, label, resolution=(width, height)))
    return files


def sample_recordings(count: int, seconds: float = 0.5, rate: int = 48000, channels: int = 1,
                      bit_depth: int = 16, seed: int = 2, start: int = 0) -> list[SampleFile]:
    rng = random.Random(seed)
    moths = [n for n in NODES if n[1] == 'Audiomoth']
    files = []
    for i in range(start, start + count):
        label, _, _, period_start = moths[i % len(moths)]
        when = dt.datetime(period_start.year, 7, 27, 5, 0, 0, tzinfo=UTC) + dt.timedelta(minutes=10 * i)
        name = f"{label}/{when:%Y-%m-%d}/{when:%H}/{label}_{when:%Y-%m-%dT%H-%M-%S}Z.wav"
        data = make_wav(seconds, rate, channels, bit_depth, rng)
        files.append(SampleFile('audio', name, data, when, label, sample_rate=rate, channels=channels,
                                bit_depth=bit_depth, duration=seconds))
    return files


def seed_catalog(conn) -> dict[str, int]:
    """Nodes, deployments and tags of the sample data; returns deployment_id by node label."""
    deployment_ids = {}
    with conn.cursor() as cur:
        for label, kind, tag, start in NODES:
            cur.execute('INSERT INTO nodes (node_label, type, description) VALUES (%s, %s, %s) '
                        'ON CONFLICT (node_label) DO UPDATE SET type = EXCLUDED.type RETURNING node_id',
                        (label, kind, f'sample {kind.lower()}'))
            node_id = cur.fetchone()[0]
            cur.execute('SELECT deployment_id FROM deployments WHERE node_id = %s', (node_id,))
            row = cur.fetchone()
            if row is None:
                cur.execute("INSERT INTO deployments (node_id, location, description, period) "
                            "VALUES (%s, point(47.53, 7.61), %s, tstzrange(%s, %s)) RETURNING deployment_id",
                            (node_id, f'{kind} at Merian Gardens', start, start + dt.timedelta(days=120)))
                row = cur.fetchone()
            deployment_ids[label] = row[0]
            cur.execute('INSERT INTO tags (name) VALUES (%s) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name '
                        'RETURNING tag_id', (tag,))
            tag_id = cur.fetchone()[0]
            cur.execute('INSERT INTO mm_tags_deployments VALUES (%s, %s) ON CONFLICT DO NOTHING', (tag_id, row[0]))
    conn.commit()
    return deployment_ids


def catalog_in_schema(dsn: str, schema: str, files: list[SampleFile], storage_id: int | None) -> None:
    """add_to_catalog on a connection of its own to the catalog schema `schema` of `dsn`."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(psycopg2.sql.SQL('SET search_path TO {}').format(psycopg2.sql.Identifier(schema)))
        add_to_catalog(conn, files, storage_id)
    finally:
        conn.close()


def add_to_catalog(conn, files: list[SampleFile], storage_id: int | None, version_type: int = 0) -> None:
    """files_image / files_audio rows for `files` (setting their file_id), and, with a
    storage_id, the rows saying that backend holds them."""
    deployment_ids = seed_catalog(conn)
    with conn.cursor() as cur:
        for f in files:
            if f.group == 'image':
                cur.execute('INSERT INTO files_image (object_name, sha256, time, deployment_id, file_size, resolution) '
                            'VALUES (%s, %s, %s, %s, %s, %s) RETURNING file_id',
                            (f.object_name, f.sha256, f.time, deployment_ids[f.node_label], len(f.data),
                             list(f.resolution)))
            else:
                cur.execute('INSERT INTO files_audio (object_name, sha256, time, deployment_id, duration, '
                            'serial_number, format, file_size, sample_rate, bit_depth, channels, source) '
                            'VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING file_id',
                            (f.object_name, f.sha256, f.time, deployment_ids[f.node_label], f.duration,
                             f.node_label, '1', len(f.data), f.sample_rate, f.bit_depth, f.channels, 'AudioMoth'))
            f.file_id = cur.fetchone()[0]
        if storage_id is not None:
            for group in ('image', 'audio'):
                rows = [(f.file_id, storage_id, version_type) for f in files if f.group == group]
                if rows:
                    psycopg2.extras.execute_values(
                        cur, f'INSERT INTO mm_files_{group}_storage (file_id, storage_id, type, created_at) '
                             'VALUES %s', rows, template='(%s, %s, %s, now())')
    conn.commit()


def upload(s3_client, bucket: str, files: list[SampleFile], prefix: str = '') -> None:
    for f in files:
        content_type = 'image/jpeg' if f.group == 'image' else 'audio/wav'
        s3_client.put_object(Bucket=bucket, Key=prefix + f.object_name, Body=f.data, ContentType=content_type)


def write_local(root, files: list[SampleFile]) -> None:
    """Put `files` under a local backend's archive/ folder."""
    from pathlib import Path
    for f in files:
        path = Path(root) / 'archive' / f.object_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.data)
