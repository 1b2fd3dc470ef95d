"""A corpus of hostile inputs for the decoders and the text towers, made in code (no binary
files in the repository). Other tests import it: ``from hostile import hostile_images``.

Each entry is ``Hostile(name, data, codes)``: ``codes`` are the error codes the input may
be refused with, and ``DECODES`` in it means it may (or, alone, must) decode. Wrong
extensions are not errors: a format comes from the bytes, so a valid-but-odd input must
decode.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from functools import cache
from typing import NamedTuple

import numpy as np
import soundfile as sf
from PIL import Image

DECODES = "decodes"


class Hostile(NamedTuple):
    name: str
    data: bytes | str
    codes: frozenset[str]
    bomb: bool = False  # small input, huge claim: decoding it must stay cheap in memory and time

    @property
    def must_decode(self) -> bool:
        return self.codes == {DECODES}


def _h(name: str, data: bytes | str, *codes: str) -> Hostile:
    return Hostile(name, data, frozenset(codes))


def _bomb(name: str, data: bytes, *codes: str) -> Hostile:
    return Hostile(name, data, frozenset(codes), bomb=True)


def _noise(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# --- images -------------------------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noisy_image(size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise, so that every byte of the compressed file matters and half a file is truly half."""
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose IHDR claims ``width`` x ``height``: refused from the header alone."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF with a 65535x65535 logical screen and one frame of the same size, in 40 bytes."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG with its SOF0 frame header rewritten to absurd dimensions."""
    data = bytearray(encode_image(noisy_image((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_i16_claiming(height: int) -> bytes:
    """A 9x9 16-bit TIFF whose ImageLength says ``height``: 284 bytes that decode, without an
    error, to 9 x height pixels (one strip of real rows, zeros for the rest)."""
    data = bytearray(encode_image(Image.new("I;16", (9, 9), 300), "TIFF"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", data, ifd)[0], 12):
        if struct.unpack_from("<H", data, entry)[0] == 257:  # ImageLength, as one LONG
            struct.pack_into("<HII", data, entry + 2, 4, 1, height)
    return bytes(data)


def jpeg_with_exif(exif_payload: bytes) -> bytes:
    """A valid JPEG with an APP1 Exif segment holding ``exif_payload`` (a TIFF structure, or garbage)."""
    jpeg = encode_image(noisy_image((24, 16)), "JPEG")
    body = b"Exif\x00\x00" + exif_payload
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def _exif_orientation(value: int, ifd_offset: int = 8) -> bytes:
    entry = struct.pack("<HHIHH", 0x0112, 3, 1, value, 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", 1) + entry + b"\x00\x00\x00\x00"


@cache
def _bilevel_bomb() -> bytes:
    # 81 Mpx (over the 64 Mpx default of DecodeLimits, under Pillow's own bomb check) in ~10 KB.
    return encode_image(Image.new("1", (9000, 9000)), "PNG")


def hostile_images() -> list[Hostile]:
    jpeg = encode_image(noisy_image(), "JPEG", quality=90)
    png = encode_image(noisy_image(), "PNG")
    webp = encode_image(noisy_image(), "WEBP", quality=80)
    gif = encode_image(noisy_image(mode="P"), "GIF")
    tiff = encode_image(noisy_image(), "TIFF")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    ramp16 = Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1)))
    frames = [noisy_image((20, 20), "P", seed) for seed in range(3)]
    trunc, not_img = "truncated_image", "not_an_image"
    garbage = (trunc, not_img, "too_many_pixels")  # a garbage header may claim any size
    return [
        # nothing, or not an image at all
        _h("zero_bytes", b"", "empty_image"),
        _h("text_named.jpg", b"this is a text file someone saved as photo.jpg\n", not_img),
        _h("html_page", b"<!doctype html><html><head><title>404</title></head><body>Not found</body></html>", not_img),
        _h("json_error", b'{"error": "access denied"}', not_img),
        _h("random_bytes", _noise(1, 4096), not_img),
        # real files cut in half
        _h("truncated_jpeg", jpeg[: len(jpeg) // 2], trunc),
        _h("truncated_png", png[: len(png) // 2], trunc),
        _h("truncated_webp", webp[: len(webp) // 2], trunc, not_img),
        _h("truncated_gif", gif[: len(gif) // 2], trunc),
        _h("truncated_tiff", tiff[: len(tiff) // 2], trunc),
        _h("jpeg_header_only", jpeg[:2], trunc, not_img),
        # a valid magic number, then garbage
        _h("jpeg_magic_garbage", b"\xff\xd8\xff\xe0" + _noise(2, 2048), *garbage),
        _h("png_magic_garbage", b"\x89PNG\r\n\x1a\n" + _noise(3, 2048), *garbage),
        _h("gif_magic_garbage", b"GIF89a" + _noise(4, 2048), *garbage),
        _h("webp_magic_garbage", b"RIFF\x00\x08\x00\x00WEBPVP8 " + _noise(5, 2048), *garbage),
        _h("bmp_magic_garbage", b"BM" + _noise(6, 2048), *garbage),
        _h("tiff_magic_garbage", b"II*\x00" + _noise(7, 2048), *garbage),
        _h("png_bad_crc", png[:29] + b"\x00\x00\x00\x00" + png[33:], trunc, not_img),
        # decompression bombs: refused from the header, before any pixel is allocated
        _bomb("png_ihdr_100000x100000", png_claiming(100_000, 100_000), "too_many_pixels"),
        _bomb("png_ihdr_1x4000000000", png_claiming(1, 4_000_000_000), "too_many_pixels", trunc, not_img),
        _bomb("png_bilevel_9000x9000", _bilevel_bomb(), "too_many_pixels"),
        _bomb("gif_screen_65535x65535", gif_claiming(65535, 65535), "too_many_pixels"),
        _bomb("jpeg_sof_65500x65500", jpeg_claiming(65500, 65500), "too_many_pixels"),
        _h("png_ihdr_0x0", png_claiming(0, 0), trunc, not_img),
        # under the pixel limit, so it decodes: 12.6 Mpx of 16-bit grey from 284 bytes, at a few bytes a pixel
        _bomb("tiff_16bit_9x1400000_sparse", tiff_i16_claiming(1_400_000), DECODES),
        # broken metadata on a valid image: the pixels are fine, so it decodes or is refused cleanly
        _h("jpeg_exif_garbage", jpeg_with_exif(_noise(8, 64)), DECODES, trunc),
        _h("jpeg_exif_orientation_99", jpeg_with_exif(_exif_orientation(99)), DECODES),
        _h("jpeg_exif_ifd_offset_out_of_range", jpeg_with_exif(_exif_orientation(6, 0xFFFFFF)), DECODES, trunc),
        # valid but odd: must decode
        _h("png_bytes_named.jpg", png, DECODES),
        _h("webp_served_as_image_png", webp, DECODES),
        _h("png_1x1", encode_image(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), DECODES),
        _h("jpeg_1x1", encode_image(Image.new("RGB", (1, 1), (1, 2, 3)), "JPEG"), DECODES),
        _h("gif_1x1", encode_image(Image.new("P", (1, 1)), "GIF"), DECODES),
        _h("png_1x10000_strip", encode_image(Image.new("L", (1, 10_000), 7), "PNG"), DECODES),
        _h("jpeg_cmyk", encode_image(noisy_image(mode="CMYK"), "JPEG"), DECODES),
        _h("tiff_cmyk", encode_image(noisy_image(mode="CMYK"), "TIFF"), DECODES),
        _h("png_16bit_grey", encode_image(ramp16, "PNG"), DECODES),
        _h("png_16bit_flat", encode_image(Image.new("I;16", (9, 9), 300), "PNG"), DECODES),
        _h("tiff_32bit_int", encode_image(Image.new("I", (9, 9), -(2**31)), "TIFF"), DECODES),
        _h("tiff_float", encode_image(Image.new("F", (9, 9), 0.5), "TIFF"), DECODES),
        _h("png_paletted_transparent", encode_image(palette, "PNG", transparency=1), DECODES),
        _h("png_la", encode_image(noisy_image(mode="LA"), "PNG"), DECODES),
        _h("png_bilevel", encode_image(noisy_image(mode="1"), "PNG"), DECODES),
        _h("gif_animated", encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:]), DECODES),
        _h("jpeg_exif_rotated", jpeg_with_exif(_exif_orientation(8)), DECODES),
        _h("bmp", encode_image(noisy_image(), "BMP"), DECODES),
    ]


# --- audio --------------------------------------------------------------------------------


def wav_header(rate: int, channels: int, bits: int, data_bytes: int, fmt: int = 1) -> bytes:
    """A canonical 44-byte WAV header; ``data_bytes`` may lie about the length that follows."""
    block = channels * bits // 8
    riff, byte_rate = (36 + data_bytes) & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, byte_rate, block & 0xFFFF, bits)
    return struct.pack("<4sI8sI", b"RIFF", riff, b"WAVEfmt ", 16) + fmt_chunk + struct.pack("<4sI", b"data", data_bytes)


def tone(seconds: float, rate: int = 16_000, channels: int = 1, level: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = level * np.sin(2 * np.pi * 440 * t)
    return np.repeat(mono[:, None], channels, axis=1).astype(np.float32)


def encode_audio(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def wav_i16(samples: np.ndarray, rate: int) -> bytes:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    return wav_header(rate, 1 if pcm.ndim == 1 else pcm.shape[1], 16, pcm.nbytes) + pcm.tobytes()


def flac_of_unknown_length(samples: np.ndarray, rate: int) -> bytes:
    """A valid FLAC whose STREAMINFO says "total samples: unknown" (as streaming encoders write)."""
    data = bytearray(encode_audio(samples, rate, "FLAC", "PCM_16"))
    field = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)  # the low 36 bits count the samples
    data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


def hls_playlist(*segments: str) -> bytes:
    """An HLS playlist behind an ID3 tag: sniffed as mp3, and ffmpeg, left to probe, would open
    every segment it names (local files included) and return their audio as this clip's."""
    lines = [f"#EXTINF:1,\n{s}" for s in segments]
    return id3_tagged("\n".join(["#EXTM3U", "#EXT-X-TARGETDURATION:10", *lines, "#EXT-X-ENDLIST", ""]).encode())


def id3_tagged(payload: bytes) -> bytes:
    """``payload`` behind an empty ID3v2 tag: the sniffer says mp3, ffmpeg probes what follows."""
    return b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10 + payload


@cache
def _u8_hours() -> bytes:
    # 8-bit mono at 1 kHz: 3 hours in 10.8 MB, with a header that claims 4 GB.
    body = np.tile(np.array([28, 228], np.uint8), 5_400_000).tobytes()  # a 500 Hz square wave
    return wav_header(1000, 1, 8, 0xFFFFFFF0) + body


def hostile_audio() -> list[Hostile]:
    flac = encode_audio(tone(1.0), 16_000, "FLAC")
    ogg = encode_audio(tone(1.0, 22_050), 22_050, "OGG", "VORBIS")
    wav = wav_i16(tone(0.5)[:, 0], 16_000)
    nan_samples = tone(0.5)[:, 0].copy()
    nan_samples[::100] = np.nan
    inf_samples = tone(0.5)[:, 0].copy()
    inf_samples[5] = np.inf
    broken, damaged = ("corrupt_audio",), (DECODES, "corrupt_audio", "silent_audio", "empty_audio")
    return [
        _h("zero_bytes", b"", "empty_audio"),
        _h("random_bytes", b"\x00" + _noise(11, 4096), "unsupported_format"),
        _h("text", b"hello, this is not audio", "unsupported_format"),
        _h("html_page", b"<!doctype html><html><body>403 Forbidden</body></html>", "unsupported_format"),
        _h("silence_wav", wav_i16(np.zeros(16_000, np.float32), 16_000), "silent_audio"),
        _h("wav_one_sample", wav_i16(np.array([0.5], np.float32), 16_000), DECODES),
        _h("wav_header_only", wav_header(16_000, 1, 16, 0), "empty_audio", "corrupt_audio"),
        _bomb("wav_header_claims_hours", wav_header(16_000, 1, 16, 0xFFFFFFF0) + wav[44:], DECODES),
        _bomb("wav_three_hours", _u8_hours(), "audio_too_long"),
        _h("wav_float_nan", encode_audio(nan_samples, 16_000, "WAV", "FLOAT"), "corrupt_audio"),
        _h("wav_float_inf", encode_audio(inf_samples, 16_000, "WAV", "FLOAT"), DECODES, "corrupt_audio"),
        _h("wav_rate_zero", wav_header(0, 1, 16, 2000) + _noise(12, 2000), *broken),
        _bomb("wav_rate_absurd", wav_header(99_999_989, 1, 16, 40_000) + wav[44:][:40_000], *broken),
        _bomb("wav_rate_prime_767999", wav_header(767_999, 1, 16, 40_000) + wav[44:][:40_000], DECODES),
        _bomb("wav_1024_channels", wav_header(48_000, 1024, 16, 2048 * 8) + _noise(13, 2048 * 8), *damaged),
        _h("wav_codec_unknown", wav_header(16_000, 1, 16, 4000, fmt=0x1234) + _noise(14, 4000), *broken),
        _h("riff_garbage", b"RIFF" + _noise(15, 2048), *broken),
        _h("truncated_wav", wav[: len(wav) // 2], *damaged),
        _h("truncated_flac", flac[: len(flac) // 2], *damaged),
        _h("truncated_ogg", ogg[: len(ogg) // 2], *damaged),
        _h("flac_magic_garbage", b"fLaC" + _noise(16, 2048), *broken),
        _h("ogg_magic_garbage", b"OggS" + _noise(17, 2048), *broken),
        _bomb(
            "flac_unknown_length_8ch_655khz",
            flac_of_unknown_length(np.full((65_535, 8), 0.5, np.float32), 655_350),
            DECODES,
        ),
        _h("mp3_frame_then_garbage", b"\xff\xfb\x90\x64" + _noise(18, 4096), *damaged),
        _h("id3_then_garbage", id3_tagged(_noise(19, 4096)), *damaged),
        _h("id3_then_hls_playlist", hls_playlist("/etc/hostname.mp3"), *broken),
        _h("m4a_ftyp_garbage", b"\x00\x00\x00\x20ftypM4A " + _noise(20, 2048), *broken),
        _h("webm_magic_garbage", b"\x1a\x45\xdf\xa3" + _noise(21, 2048), *broken),
        _h("amr_magic_garbage", b"#!AMR\n" + _noise(22, 512), *damaged),
        _h("aiff_magic_garbage", b"FORM" + _noise(23, 2048), *broken),
    ]


# --- text ---------------------------------------------------------------------------------


def hostile_texts() -> list[Hostile]:
    """Texts for a text tower: ``empty_input`` for the blank ones, a vector for all others."""
    return [
        _h("empty", "", "empty_input"),
        _h("whitespace", " \t\n\r\u00a0\u3000\u2028", "empty_input"),
        _h("one_megabyte", "lorem ipsum dolor sit amet " * 38_837, DECODES),
        _h("one_long_word", "a" * 100_000, DECODES),
        _h("emoji_100k", "\U0001f600" * 100_000, DECODES),
        _h("combining_100k", "e" + "\u0301" * 100_000, DECODES),
        _h("zalgo", "h\u0336\u0337\u0338e\u0489l\u0335\u034el\u0352o" * 2000, DECODES),
        _h("nul_bytes", "a\x00b\x00\x00c", DECODES),
        _h("only_nul", "\x00\x00\x00", DECODES, "empty_input"),
        _h("control_chars", "".join(map(chr, range(1, 32))) + "x", DECODES),
        _h("lone_high_surrogate", "a red \ud800 circle", DECODES, "invalid_input"),
        _h("lone_low_surrogate", "\udfff", DECODES, "invalid_input"),
        _h(
            "surrogateescape",
            b"caf\xe9 \xff\xfe r\xe9sum\xe9".decode("utf-8", "surrogateescape"),
            DECODES,
            "invalid_input",
        ),
        _h("rtl_override", "\u202egpj.exe\u202c a photo", DECODES),
        _h("bidi_and_zero_width", "\u200f\u200b\u2066abc\u2069\ufeff\u200d", DECODES),
        _h("noncharacters", "\ufffe\uffff\U0010ffff", DECODES),
        _h(
            "mixed_scripts", "\u0645\u0631\u062d\u0628\u0627 \u4f60\u597d \u0928\u092e\u0938\u094d\u0924\u0947", DECODES
        ),
        _h("html_and_sql", "<script>alert(1)</script>'; DROP TABLE items; --", DECODES),
    ]


# --- base64 (what /v1/embeddings and /encode/* accept for images and audio) ----------------


def hostile_base64() -> list[Hostile]:
    """Strings as an API client sends them. Codes are the API's: ``invalid_base64`` when the
    string does not decode (serve/http/media.py decodes with ``validate=True``); otherwise the
    decoder's code for the bytes it yields."""
    png = base64.b64encode(encode_image(Image.new("RGB", (4, 4), (9, 9, 9)), "PNG")).decode()
    text = base64.b64encode(b"not an image").decode()
    return [
        _h("not_base64", "%%%not base64%%%", "invalid_base64"),
        _h("bad_padding", png.rstrip("=")[:-1], "invalid_base64"),
        _h("padding_in_the_middle", "QQ==" + png, "invalid_base64"),
        _h("huge_padding", png + "=" * 100_000, DECODES, "invalid_base64"),
        _h("wrapped_at_76_columns", "\n".join(png[i : i + 76] for i in range(0, len(png), 76)), "invalid_base64"),
        _h("spaces_inside", png[:8] + " " + png[8:], "invalid_base64"),
        _h("url_safe_alphabet", base64.urlsafe_b64encode(_noise(30, 300)).decode(), "invalid_base64", "not_an_image"),
        _h("data_uri_png", "data:image/png;base64," + png, DECODES),
        _h("data_uri_wrong_media_type", "data:text/html;base64," + png, DECODES),  # sniffed: the bytes are a PNG
        _h("data_uri_lies_about_type", "data:image/jpeg;base64," + png, DECODES),
        _h("data_uri_missing_comma", "data:image/png;base64" + png, "invalid_base64"),
        _h("data_uri_not_base64", "data:image/png," + png, "invalid_base64"),
        _h("data_uri_of_text", "data:image/png;base64," + text, "not_an_image"),
        _h("data_uri_empty", "data:image/png;base64,", "empty_image"),
    ]
