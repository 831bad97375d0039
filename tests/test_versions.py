"""Versions made in memory (WebP, FLAC, gzip) and `copy --type N`, on both kinds of backend."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import random
import struct
import subprocess
import tempfile
import wave

import numpy as np
import pytest
from PIL import Image

import mitwelten_storage as ms
from conftest import files_under
from devkit import sample_data
from devkit.quality import psnr, ssim

UTC = dt.timezone.utc


def record_of(data: bytes, name: str = 'node/2021-07-27/14/x.jpg') -> ms.CatalogFile:
    return ms.CatalogFile(1, name, len(data), hashlib.sha256(data).hexdigest())


def ffmpeg_pcm(flac: bytes, bits: int) -> bytes:
    """Decode a FLAC with the ffmpeg command line, independently of the tool's code."""
    fmt = {16: 's16le', 24: 's24le'}[bits]
    return subprocess.run([ms.ffmpeg_executable(), '-loglevel', 'error', '-i', 'pipe:0', '-f', fmt, 'pipe:1'],
                          input=flac, capture_output=True, check=True).stdout


def wav_frames(data: bytes) -> tuple[bytes, int, int, int]:
    with wave.open(io.BytesIO(data)) as wav:
        return wav.readframes(wav.getnframes()), wav.getnchannels(), wav.getframerate(), wav.getsampwidth() * 8


# --- the version table ---------------------------------------------------------------------------

def test_the_version_table_names_every_version():
    table = {(g, t): (v.label, v.content_type, v.object_name('a/b.c/2021-07-27T14-42-33Z.jpg'))
             for (g, t), v in ms.VERSIONS.items()}
    assert table == {
        ('image', 0): ('original', None, 'a/b.c/2021-07-27T14-42-33Z.jpg'),
        ('image', 1): ('WebP 1920×1440', 'image/webp', 'a/b.c/2021-07-27T14-42-33Z.webp'),
        ('image', 2): ('WebP 640×480', 'image/webp', 'a/b.c/2021-07-27T14-42-33Z.webp'),
        ('image', 10): ('gzip -9', 'application/gzip', 'a/b.c/2021-07-27T14-42-33Z.jpg.gz'),
        ('audio', 0): ('original', None, 'a/b.c/2021-07-27T14-42-33Z.jpg'),
        ('audio', 1): ('FLAC', 'audio/flac', 'a/b.c/2021-07-27T14-42-33Z.flac'),
        ('audio', 10): ('gzip -9', 'application/gzip', 'a/b.c/2021-07-27T14-42-33Z.jpg.gz'),
    }
    assert ms.VERSIONS[('audio', 1)].object_name('n/rec') == 'n/rec.flac'


# --- WebP ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('size, version_type, expected', [
    ((4656, 3496), 1, (1918, 1440)), ((4656, 3496), 2, (639, 480)),
    ((3496, 4656), 1, (1081, 1440)), ((800, 600), 1, (800, 600)), ((320, 240), 2, (320, 240))])
def test_webp_fits_the_box_downscales_only_and_keeps_exif(size, version_type, expected):
    when = dt.datetime(2021, 7, 27, 14, 42, 33, tzinfo=UTC)
    original = sample_data.make_jpeg(*size, when, random.Random(1), orientation=6)
    webp = ms.VERSIONS[('image', version_type)].make(original, record_of(original))
    with Image.open(io.BytesIO(webp)) as image:
        assert image.format == 'WEBP' and image.size == expected
        exif = image.getexif()
    assert exif[0x0112] == 6                                          # orientation kept, pixels not turned
    assert exif[0x0110] == 'HQ Camera IMX477'
    assert exif.get_ifd(0x8769)[0x9003] == '2021:07:27 14:42:33'      # DateTimeOriginal


@pytest.mark.parametrize('box', [ms.WEBP_LARGE, ms.WEBP_SMALL])
def test_reduced_size_decoding_stays_close_to_a_full_lanczos_downscale(box):
    original = sample_data.make_jpeg(4656, 3496, dt.datetime(2021, 7, 27, tzinfo=UTC), random.Random(2))
    with Image.open(io.BytesIO(original)) as full:
        full.load()
        reference = full.resize(ms.fitted_size(full.size, box), Image.Resampling.LANCZOS)
    fast, _ = ms.downscaled(original, record_of(original), box)
    assert fast.size == reference.size
    assert ssim(fast, reference) >= 0.98
    assert psnr(fast, reference) >= 40.0


@pytest.mark.parametrize('bad, message', [
    ('truncated', 'image file is truncated'), ('not_an_image', 'not an image that can be read'),
    ('wav', 'not an image that can be read')])
def test_webp_of_a_bad_image_is_a_named_failure(bad, message):
    good = sample_data.make_jpeg(1200, 900, dt.datetime(2021, 7, 27, tzinfo=UTC), random.Random(3))
    data = {'truncated': good[:len(good) // 2], 'not_an_image': b'%PDF-1.4 not an image',
            'wav': sample_data.make_wav(0.1)}[bad]
    with pytest.raises(ms.ConversionError, match=message):
        ms.VERSIONS[('image', 1)].make(data, record_of(data))


# --- FLAC ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('bits', [16, 24])
@pytest.mark.parametrize('channels', [1, 2, 8])
@pytest.mark.parametrize('rate', [8000, 44100, 96000, 250000, 384000])
def test_flac_decodes_to_exactly_the_original_samples(bits, channels, rate):
    original = sample_data.make_wav(0.25, rate, channels, bits, random.Random(rate + bits + channels))
    flac = ms.VERSIONS[('audio', 1)].make(original, record_of(original, 'n/r.wav'))
    samples, wav_channels, wav_rate, wav_bits = wav_frames(original)
    assert ffmpeg_pcm(flac, bits) == samples
    info = ms.flac_stream_info(flac)
    assert (info['channels'], info['sample_rate'], info['bits']) == (wav_channels, wav_rate, wav_bits)
    assert info['frames'] == len(samples) // (channels * bits // 8)
    assert info['md5'] == hashlib.md5(samples).digest()        # STREAMINFO complete: the FLAC checks itself
    ms.check_flac(flac, record_of(original))


@pytest.mark.parametrize('bad, message', [
    ('not_audio', 'not a WAV recording'), ('truncated', 'truncated recording'),
    ('32_bit', 'unsupported sample format: 32-bit'), ('8_bit', 'unsupported sample format: 8-bit'),
    ('jpeg', 'not a WAV recording')])
def test_flac_of_bad_audio_is_a_named_failure(bad, message):
    good = sample_data.make_wav(0.3, 48000, 2, 16)
    data = {'not_audio': b'RIFF\x10\x00\x00\x00WAVEjunkjunkjunk', 'truncated': good[:len(good) // 2],
            '32_bit': sample_data.make_wav(0.1, 48000, 1, 32), '8_bit': sample_data.make_wav(0.1, 8000, 1, 8),
            'jpeg': sample_data.make_jpeg(64, 48, dt.datetime(2021, 1, 1, tzinfo=UTC), random.Random(1))}[bad]
    with pytest.raises(ms.ConversionError, match=message):
        ms.VERSIONS[('audio', 1)].make(data, record_of(data, 'n/r.wav'))


def wav_extensible(pcm: bytes, channels: int, rate: int, bits: int) -> bytes:
    """A WAVE_FORMAT_EXTENSIBLE WAV with a LIST/INFO chunk and an odd-sized chunk before the data."""
    align = channels * bits // 8
    fmt = struct.pack('<HHIIHHHHI', 0xFFFE, channels, rate, rate * align, align, bits, 22, bits, 0) + (
        b'\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71')
    info = b'INFO' + b'ICMT' + struct.pack('<I', 8) + b'AudioMo\0'
    chunks = (b'fmt ' + struct.pack('<I', len(fmt)) + fmt + b'LIST' + struct.pack('<I', len(info)) + info
              + b'junk' + struct.pack('<I', 3) + b'abc\0' + b'data' + struct.pack('<I', len(pcm)) + pcm)
    return b'RIFF' + struct.pack('<I', 4 + len(chunks)) + b'WAVE' + chunks


def test_flac_of_other_wav_layouts_and_containers():
    """WAVE_FORMAT_EXTENSIBLE with extra chunks (its INFO comment carried over), and an AIFF
    (read by libsndfile) give bit-exact FLACs; a lossy recording and a sample rate outside FLAC's
    streamable subset are refused by name."""
    import soundfile
    plain = sample_data.make_wav(0.3, 48000, 2, 24, random.Random(7))
    samples, channels, rate, bits = wav_frames(plain)
    extensible = wav_extensible(samples, channels, rate, bits)
    flac = ms.VERSIONS[('audio', 1)].make(extensible, record_of(extensible, 'n/r.wav'))
    assert ffmpeg_pcm(flac, 24) == samples
    with soundfile.SoundFile(io.BytesIO(flac)) as opened:
        assert opened.comment == 'AudioMo'
    aiff = io.BytesIO()
    soundfile.write(aiff, np.frombuffer(wav_frames(sample_data.make_wav(0.2, 44100, 1, 16))[0], '<i2'), 44100,
                    subtype='PCM_16', format='AIFF')
    flac = ms.VERSIONS[('audio', 1)].make(aiff.getvalue(), record_of(aiff.getvalue(), 'n/r.aiff'))
    assert ms.flac_stream_info(flac)['sample_rate'] == 44100
    ms.check_flac(flac, record_of(aiff.getvalue()))
    mp3 = subprocess.run([ms.ffmpeg_executable(), '-loglevel', 'error', '-i', 'pipe:0', '-f', 'mp3', 'pipe:1'],
                         input=plain, capture_output=True, check=True).stdout
    with pytest.raises(ms.ConversionError, match='a lossy recording'):
        ms.VERSIONS[('audio', 1)].make(mp3, record_of(mp3, 'n/r.mp3'))
    odd = sample_data.make_wav(0.05, 96001, 1, 16)
    with pytest.raises(ms.ConversionError, match='cannot encode FLAC .*96001 Hz'):
        ms.VERSIONS[('audio', 1)].make(odd, record_of(odd, 'n/r.wav'))


def test_a_wav_never_goes_through_a_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('a WAV went through a subprocess')
    monkeypatch.setattr(subprocess, 'Popen', refuse)
    for bits in (16, 24):
        original = sample_data.make_wav(0.5, 48000, 2, bits)
        flac = ms.VERSIONS[('audio', 1)].make(original, record_of(original, 'n/r.wav'))
        ms.VERSIONS[('audio', 1)].check(flac, record_of(original))


def test_a_damaged_flac_fails_its_check():
    original = sample_data.make_wav(0.5, 48000, 1, 16)
    flac = bytearray(ms.VERSIONS[('audio', 1)].make(original, record_of(original)))
    flac[len(flac) // 2] ^= 0xFF
    with pytest.raises(ms.ConversionError):
        ms.check_flac(bytes(flac), record_of(original))


def test_conversions_use_no_temporary_files(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('a conversion asked for a temporary file')
    for name in ('NamedTemporaryFile', 'TemporaryFile', 'mkstemp', 'mkdtemp', 'SpooledTemporaryFile'):
        monkeypatch.setattr(tempfile, name, refuse)
    wav = sample_data.make_wav(0.2, 44100, 2, 24)
    jpeg = sample_data.make_jpeg(2400, 1800, dt.datetime(2021, 1, 1, tzinfo=UTC), random.Random(4))
    for (group, version_type), version in ms.VERSIONS.items():
        if version.encoder:
            data = wav if group == 'audio' else jpeg
            version.check(version.make(data, record_of(data)), record_of(data))


# --- gzip ----------------------------------------------------------------------------------------

def test_gzip_decompresses_to_the_original_and_a_wrong_one_fails():
    original = sample_data.make_wav(0.2)
    packed = ms.VERSIONS[('audio', 10)].make(original, record_of(original))
    assert gzip.decompress(packed) == original
    other = gzip.compress(b'something else')
    with pytest.raises(ms.ConversionError, match='does not decompress to the original'):
        ms.check_gzip(other, record_of(original))


# --- copy --type N -------------------------------------------------------------------------------

def test_copy_type_1_and_2_makes_webp_at_a_disk_and_a_bucket(world):
    source = world.create_s3_backend()
    disk_id, disk = world.create_local_backend()
    bucket = world.new_bucket()
    s3_target = world.create_s3_backend(bucket, priority=1)
    files = world.images_on_s3(4, source, width=2400, height=1800)
    report = world.copy(source, disk_id, version_type=1)
    assert report.exit_status == 0 and report.counts == {'made': 4}, report.failures
    for f in files:
        with Image.open(disk / 'archive' / f.object_name.replace('.jpg', '.webp')) as image:
            assert image.format == 'WEBP' and image.size == (1920, 1440)
    assert world.rows(disk_id) == {f.file_id: 1 for f in files}
    report = world.copy(source, s3_target, version_type=2)
    assert report.exit_status == 0 and report.counts == {'made': 4}, report.failures
    for f in files:
        obj = world.s3.get_object(Bucket=bucket, Key=f.object_name.replace('.jpg', '.webp'))
        assert obj['ContentType'] == 'image/webp'
        with Image.open(io.BytesIO(obj['Body'].read())) as image:
            assert image.size == (640, 480)
    assert world.rows(s3_target) == {f.file_id: 2 for f in files}
    assert world.s3_bytes(bucket, files[0].object_name) is None       # no original there


def test_copy_of_a_version_the_source_holds_copies_its_bytes(world):
    source = world.create_s3_backend()
    middle_bucket = world.new_bucket()
    middle = world.create_s3_backend(middle_bucket)
    disk_id, disk = world.create_local_backend()
    files = world.images_on_s3(3, source)
    assert world.copy(source, middle, version_type=1).counts == {'made': 3}
    report = world.copy(middle, disk_id, version_type=1)
    assert report.exit_status == 0 and report.counts == {'copied': 3}, report.failures
    for f in files:
        name = f.object_name.replace('.jpg', '.webp')
        assert (disk / 'archive' / name).read_bytes() == world.s3_bytes(middle_bucket, name)
    assert world.rows(disk_id) == {f.file_id: 1 for f in files}
    # The middle bucket holds no originals: asking it for another version finds nothing to do.
    report = world.copy(middle, disk_id, version_type=2)
    assert report.exit_status == 0 and report.counts == {}


def test_copy_flac_and_gzip_of_recordings_to_a_disk(world):
    source = world.create_s3_backend()
    flac_id, flac_disk = world.create_local_backend(label='flac')
    gzip_id, gzip_disk = world.create_local_backend(label='gzip')
    files = world.recordings_on_s3(3, source, channels=2, bit_depth=24, seconds=0.4)
    assert world.copy(source, flac_id, 'all_audio', version_type=1).counts == {'made': 3}
    assert world.copy(source, gzip_id, 'all_audio', version_type=10).counts == {'made': 3}
    for f in files:
        flac = (flac_disk / 'archive' / f.object_name.replace('.wav', '.flac')).read_bytes()
        assert ffmpeg_pcm(flac, 24) == wav_frames(f.data)[0]
        assert gzip.decompress((gzip_disk / 'archive' / (f.object_name + '.gz')).read_bytes()) == f.data
    assert world.rows(flac_id, 'audio') == {f.file_id: 1 for f in files}
    assert world.rows(gzip_id, 'audio') == {f.file_id: 10 for f in files}


def test_s3_tags_are_carried_over_on_s3_to_s3_copies(world):
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    target_bucket = world.new_bucket()
    target = world.create_s3_backend(target_bucket)
    webp_bucket = world.new_bucket()
    webp_target = world.create_s3_backend(webp_bucket)
    files = world.images_on_s3(2, source)
    tags = {'TagSet': [{'Key': 'public', 'Value': 'yes'}, {'Key': 'project', 'Value': 'mitwelten fs1'}]}
    world.s3.put_object_tagging(Bucket=bucket, Key=files[0].object_name, Tagging=tags)
    assert world.copy(source, target).counts == {'copied': 2}
    assert world.copy(source, webp_target, version_type=1).counts == {'made': 2}
    copied = world.s3.get_object_tagging(Bucket=target_bucket, Key=files[0].object_name)['TagSet']
    made = world.s3.get_object_tagging(Bucket=webp_bucket, Key=files[0].object_name.replace('.jpg', '.webp'))['TagSet']
    assert sorted(copied, key=str) == sorted(made, key=str) == sorted(tags['TagSet'], key=str)
    assert world.s3.get_object_tagging(Bucket=target_bucket, Key=files[1].object_name)['TagSet'] == []


def test_bad_originals_are_named_failures_and_the_rest_is_done(world):
    bucket = world.new_bucket()
    source = world.create_s3_backend(bucket)
    disk_id, disk = world.create_local_backend()
    good = sample_data.sample_images(3, seed=21)
    truncated, not_image = sample_data.sample_images(2, seed=22, start=3)
    truncated.data = truncated.data[:len(truncated.data) // 2]     # the catalog knows it like this
    not_image.data = b'this was never a picture'
    audio_good = sample_data.sample_recordings(2, seed=23)
    not_audio, cut, wide = sample_data.sample_recordings(3, seed=24, start=2)
    not_audio.data = b'RIFF....WAVEnothing useful'
    cut.data = cut.data[:len(cut.data) // 3]
    wide.data = sample_data.make_wav(0.1, 48000, 1, 32)
    everything = good + [truncated, not_image] + audio_good + [not_audio, cut, wide]
    sample_data.upload(world.s3, bucket, everything)
    sample_data.add_to_catalog(world.conn, everything, source)
    images = world.cli('copy', '-s', source, '-t', disk_id, 'all_images', '--type', 1)
    assert images.returncode == 1 and 'Traceback' not in images.stderr
    assert f'FAILED {truncated.object_name}: cannot make a WebP of it: image file is truncated' in images.stderr
    assert f'FAILED {not_image.object_name}: not an image that can be read' in images.stderr
    assert '3 made' in images.stdout and '2 failed' in images.stdout
    audio = world.cli('copy', '-s', source, '-t', disk_id, 'all_audio', '--type', 1)
    assert audio.returncode == 1 and 'Traceback' not in audio.stderr
    assert f'FAILED {not_audio.object_name}: not a WAV recording' in audio.stderr
    assert f'FAILED {cut.object_name}: truncated recording' in audio.stderr
    assert f'FAILED {wide.object_name}: unsupported sample format: 32-bit' in audio.stderr
    assert set(world.rows(disk_id)) == {f.file_id for f in good}
    assert set(world.rows(disk_id, 'audio')) == {f.file_id for f in audio_good}
    names = set(files_under(disk / 'archive'))
    assert names == {f.object_name.replace('.jpg', '.webp') for f in good} | {
        f.object_name.replace('.wav', '.flac') for f in audio_good}
