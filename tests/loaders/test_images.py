"""Image decoding: every mode to RGB, orientation, large JPEGs, and the bad cases."""

import io

import numpy as np
import pytest
from PIL import Image

from mmembed.loaders.images import DecodeLimits, ImageDecodeError, decode_image, is_image


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # red on the stored left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(_encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    top = np.asarray(out)[:20].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # the red half is now on top


@pytest.mark.parametrize(
    ("mode", "fmt", "colour", "expected"),
    [
        ("RGBA", "PNG", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white background
        ("RGBA", "PNG", (255, 0, 0, 255), (255, 0, 0)),
        ("LA", "PNG", (0, 255), (0, 0, 0)),
        ("L", "PNG", 128, (128, 128, 128)),
        ("1", "PNG", 1, (255, 255, 255)),
        ("CMYK", "JPEG", (0, 255, 255, 0), (255, 0, 0)),
        ("RGB", "WEBP", (0, 0, 255), (0, 0, 255)),
        ("RGB", "GIF", (0, 255, 0), (0, 255, 0)),
        ("RGB", "BMP", (10, 20, 30), (10, 20, 30)),
        ("RGB", "TIFF", (10, 20, 30), (10, 20, 30)),
    ],
)
def test_modes_become_rgb(mode: str, fmt: str, colour: object, expected: tuple[int, int, int]) -> None:
    out = decode_image(_encode(Image.new(mode, (16, 16), colour), fmt))  # type: ignore[arg-type]
    assert out.mode == "RGB"
    np.testing.assert_allclose(np.asarray(out).reshape(-1, 3).mean(0), expected, atol=12)


def test_paletted_with_transparency() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))
    out = decode_image(_encode(image, "PNG", transparency=1))
    arr = np.asarray(out)
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 7]) == (255, 0, 0)


def test_16_bit_greyscale_keeps_its_range() -> None:
    ramp = np.tile(np.linspace(1000, 3000, 32, dtype=np.uint16), (8, 1))
    out = np.asarray(decode_image(_encode(Image.fromarray(ramp), "PNG")))
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255  # not clipped to white


def test_large_jpeg_is_decoded_at_reduced_scale() -> None:
    big = _encode(Image.new("RGB", (4000, 3000), (30, 60, 90)), "JPEG")
    out = decode_image(big, DecodeLimits(draft_size=448))
    assert out.size == (1000, 750)  # 1/4 scale: the smallest that still covers 448 px
    assert decode_image(big, DecodeLimits(draft_size=None)).size == (4000, 3000)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_image"),
        (b"this is not an image at all", "not_an_image"),
        (_encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200], "truncated_image"),
        (_encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:-30], "truncated_image"),
    ],
)
def test_bad_bytes_get_typed_errors(data: bytes, code: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.code == code


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")  # 400 Mpx in a few tens of KB
    assert len(bomb) < 200_000
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb)
    assert info.value.code == "too_many_pixels"
    with pytest.raises(ImageDecodeError, match="over the limit of 10000"):
        decode_image(_encode(Image.new("RGB", (101, 100)), "PNG"), DecodeLimits(max_pixels=10_000))


def test_byte_cap() -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"x" * 101, DecodeLimits(max_bytes=100))
    assert info.value.code == "image_too_large"


def test_format_comes_from_the_bytes_not_the_name() -> None:
    png = _encode(Image.new("RGB", (5, 5), (9, 9, 9)), "PNG")
    assert decode_image(png).size == (5, 5)  # a PNG saved as photo.jpg decodes all the same


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_an_image_is_known_by_its_header(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, fmt)
    assert is_image(buf.getvalue())
    assert not is_image(b"RIFF\x00\x00\x00\x00WAVEfmt ") and not is_image(b"")
    assert not is_image(buf.getvalue()[:8])  # a header cut short
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels: a "bomb", for decode_image to refuse
    assert is_image(buf.getvalue())
