"""Properties of the decoders over generated inputs (hypothesis): whatever the bytes,
``decode_image`` returns an RGB image or raises ImageDecodeError, ``decode_audio`` an
AudioClip or AudioDecodeError, ``sniff_format`` a known name or None; valid images of any
size and mode keep their size. Bounded to well under a minute on two cores: audio inputs
that reach ffmpeg cost a process each, so they get fewer examples."""

from __future__ import annotations

import numpy as np
from hostile import encode_audio, encode_image, jpeg_with_exif, noisy_image, tone, wav_header, wav_i16
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from mmembed.loaders.audio import (
    SUPPORTED_FORMATS,
    AudioClip,
    AudioDecodeError,
    AudioLimits,
    decode_audio,
    sniff_format,
)
from mmembed.loaders.images import DecodeLimits, ImageDecodeError, decode_image

MANY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

IMAGE_MAGIC = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x01\x00",  # ICO
    b"8BPS",  # PSD
    b"P6\n",
    b"qoif",
    b"DDS ",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000
    b"\x00\x00\x00\x1cftypavif",
    b"%!PS-Adobe-3.0",  # EPS: refused unless Ghostscript is installed
]
AUDIO_MAGIC = [b"RIFF", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS", b"ID3", b"\xff\xfb", b"FORM", b"#!AMR\n"]
SNIFFED = {
    **{magic: "wav" for magic in AUDIO_MAGIC[:2]},
    **{b"fLaC": "flac", b"OggS": "ogg", b"ID3": "mp3", b"\xff\xfb": "mp3", b"FORM": "aiff", b"#!AMR\n": "amr"},
    **{b"\x00\x00\x00\x18ftypM4A ": "m4a", b"\x1a\x45\xdf\xa3": "webm", b"\xff\xf1": "aac"},
}
IMAGE_CODES = {"empty_image", "image_too_large", "not_an_image", "truncated_image", "too_many_pixels"}
AUDIO_CODES = {
    "empty_audio",
    "audio_too_large",
    "unsupported_format",
    "corrupt_audio",
    "audio_too_long",
    "silent_audio",
}
# Image.new modes and a format that stores each; JPEG and GIF are lossy or paletted, so only sizes are compared.
MODES = [
    ("RGB", "PNG"),
    ("RGB", "JPEG"),
    ("RGB", "WEBP"),
    ("RGBA", "PNG"),
    ("RGBA", "WEBP"),
    ("L", "PNG"),
    ("L", "JPEG"),
    ("LA", "PNG"),
    ("1", "PNG"),
    ("P", "PNG"),
    ("P", "GIF"),
    ("I;16", "PNG"),
    ("I;16", "TIFF"),
    ("I", "TIFF"),
    ("F", "TIFF"),
    ("CMYK", "JPEG"),
    ("CMYK", "TIFF"),
    ("RGB", "BMP"),
]


def image_bases() -> list[bytes]:
    small = noisy_image((16, 12))
    exif = b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00\x00"
    return [
        encode_image(small, "PNG"),
        encode_image(small, "JPEG"),
        encode_image(small, "WEBP"),
        encode_image(small.convert("P"), "GIF"),
        encode_image(small, "TIFF"),
        encode_image(small, "BMP"),
        encode_image(Image.new("I;16", (9, 7), 300), "PNG"),
        jpeg_with_exif(exif),  # orientation 6: the transpose runs on whatever the mutation left
    ]


def audio_bases() -> list[bytes]:
    stereo = tone(0.25, 22_050, channels=2)
    return [
        wav_i16(tone(0.25)[:, 0], 16_000),
        encode_audio(stereo, 22_050, "WAV", "FLOAT"),
        encode_audio(stereo, 22_050, "FLAC"),
        encode_audio(stereo, 22_050, "AIFF"),
    ]


@st.composite
def mutated(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    """A valid file with 1-4 edits: a bit flipped, a byte set, bytes inserted or deleted, or
    the rest cut off. Half the edits land in the first 64 bytes, where the headers are."""
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, min(64, len(data))) | st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        else:
            del data[pos:]
    return bytes(data)


def check_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image | None:
    try:
        image = decode_image(data, limits)
    except ImageDecodeError as exc:
        assert exc.code in IMAGE_CODES
        return None
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.width >= 1 and image.height >= 1
    return image


def check_audio(data: bytes) -> AudioClip | None:
    try:
        clip = decode_audio(data)
    except AudioDecodeError as exc:
        assert exc.code in AUDIO_CODES
        return None
    assert isinstance(clip, AudioClip)
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert np.isfinite(clip.samples).all() and np.abs(clip.samples).max() <= 1.0
    assert 0 < clip.seconds <= AudioLimits().max_seconds
    return clip


@MANY
@given(st.binary(max_size=4096))
def test_any_bytes_are_an_image_or_an_image_error(data: bytes) -> None:
    check_image(data)


@MANY
@given(st.sampled_from(IMAGE_MAGIC), st.binary(max_size=2048))
def test_a_magic_number_then_anything_is_an_image_or_an_image_error(magic: bytes, rest: bytes) -> None:
    check_image(magic + rest)


@MANY
@given(mutated(image_bases()))
def test_damaged_images_are_an_image_or_an_image_error(data: bytes) -> None:
    check_image(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 512), st.integers(1, 512), st.sampled_from(MODES), st.integers(0, 2**16))
def test_valid_images_of_any_size_and_mode_decode_to_rgb_of_that_size(
    width: int, height: int, mode_format: tuple[str, str], seed: int
) -> None:
    mode, fmt = mode_format
    if mode in ("I;16", "I", "F"):
        values = np.random.default_rng(seed).integers(0, 65536, (height, width))
        image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.float32 if mode == "F" else np.int32))
    else:
        image = noisy_image((width, height), mode, seed)
    out = check_image(encode_image(image, fmt))
    assert out is not None and out.size == (width, height)  # JPEG draft only shrinks sides of 2x448 and more


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 2400), st.integers(1, 2400), st.sampled_from([None, 224, 448]))
def test_jpeg_draft_decodes_the_smallest_scale_that_covers_the_draft_size(
    width: int, height: int, draft: int | None
) -> None:
    jpeg = encode_image(Image.new("RGB", (width, height), (40, 80, 120)), "JPEG")
    out = check_image(jpeg, DecodeLimits(draft_size=draft))
    assert out is not None
    scales = [s for s in (1, 2, 4, 8) if -(-width // s) == out.width and -(-height // s) == out.height]
    assert scales, f"{width}x{height} -> {out.size} is no 1/1, 1/2, 1/4 or 1/8 scale"
    scale = min(scales)  # tiny images look the same at every scale
    if draft is None:
        assert scale == 1
    elif scale > 1:
        assert min(out.size) >= draft  # still covers the size the model asks for
    if draft is not None and scale < 8:
        assert width // (2 * scale) < draft or height // (2 * scale) < draft  # the next scale down would not


@MANY
@given(st.binary(max_size=4096))
def test_any_bytes_are_a_clip_or_an_audio_error(data: bytes) -> None:
    check_audio(data)


@SOME
@given(st.sampled_from(AUDIO_MAGIC), st.binary(max_size=2048))
def test_a_magic_number_then_anything_is_a_clip_or_an_audio_error(magic: bytes, rest: bytes) -> None:
    check_audio(magic + rest)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(audio_bases()))
def test_damaged_audio_is_a_clip_or_an_audio_error(data: bytes) -> None:
    check_audio(data)


@SOME
@given(
    rate=st.sampled_from([1, 8000, 44_100, 44_101, 767_999, 768_001]) | st.integers(0, 2**32 - 1),
    channels=st.integers(0, 1100),
    bits=st.sampled_from([8, 16, 24, 32, 64]) | st.integers(0, 65535),
    codec=st.sampled_from([1, 3, 0xFFFE]) | st.integers(0, 65535),
    claimed=st.integers(0, 2**32 - 1),
    body=st.binary(min_size=1, max_size=4096),
)
def test_any_wav_header_is_a_clip_or_an_audio_error(
    rate: int, channels: int, bits: int, codec: int, claimed: int, body: bytes
) -> None:
    """The header's numbers are the attacker's: a sample rate coprime with 16 kHz, 1024
    channels, a data size of 4 GB. Decoding stays typed, and cheap (the file is 4 KB)."""
    check_audio(wav_header(rate, channels, bits, claimed, codec) + body)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 4000), elements=st.floats(width=32)), st.sampled_from([8000, 16_000, 22_050]))
def test_float_samples_of_any_value_are_a_finite_clip_or_an_audio_error(samples: np.ndarray, rate: int) -> None:
    """NaN, infinities and huge values in a float WAV never reach the model as NaN."""
    check_audio(encode_audio(samples, rate, "WAV", "FLOAT"))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"", *SNIFFED]), st.binary(max_size=64))
def test_sniff_format_never_raises_and_the_magic_number_decides(magic: bytes, rest: bytes) -> None:
    for data in (rest, magic[:1] + rest[:1], magic + rest):
        kind = sniff_format(data)
        assert kind is None or kind in SUPPORTED_FORMATS
    if magic and (magic + rest)[4:8] != b"ftyp":  # MP4's magic sits at offset 4 and is checked first
        assert sniff_format(magic + rest) == SNIFFED[magic]
