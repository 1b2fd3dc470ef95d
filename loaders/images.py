"""Decoding untrusted image bytes into RGB Pillow images, one typed error per bad item.

Why each step: EXIF orientation (phone photos are stored sideways), every mode to RGB
(RGBA/LA composited on white, paletted, greyscale, 16-bit and CMYK all occur in real
catalogues), ``Image.draft`` so a 24-megapixel JPEG decodes at a fraction of the cost
when the model only needs 224 px, and a pixel cap checked from the header before any
pixel is decoded, against decompression bombs.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """A bad image. ``code`` is stable for APIs and dead-letter records."""

    code = "invalid_image"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.code


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 50_000_000
    max_pixels: int = 64_000_000
    # Decode large JPEGs at reduced scale when the result still covers this side.
    draft_size: int | None = 448


# Raster formats people send; not EPS/PS (Pillow hands those to Ghostscript) nor exotic plugins.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "TGA", "AVIF", "JPEG2000", "DIB")


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Bytes -> upright RGB image, or ImageDecodeError with a code:
    empty_image, image_too_large, not_an_image, truncated_image, too_many_pixels."""
    if not data:
        raise ImageDecodeError("image is empty (0 bytes)", "empty_image")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"image is {len(data)} bytes, over the {limits.max_bytes}-byte limit", "image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}",
                    "too_many_pixels",
                )
            if image.format == "JPEG" and limits.draft_size:
                image.draft("RGB", (limits.draft_size, limits.draft_size))
            image.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):  # Pillow's message names an in-memory object: say what it means
            raise ImageDecodeError("not an image in a format Pillow reads", "not_an_image") from exc
        raise ImageDecodeError(f"cannot decode image: {exc}", "too_many_pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's ways of saying "truncated/corrupt"
        raise ImageDecodeError(f"corrupt or truncated image: {exc}", "truncated_image") from exc
    ImageOps.exif_transpose(image, in_place=True)  # not a copy of every upright image
    return to_rgb(image)


def is_image(data: bytes) -> bool:
    """Whether ``data`` holds an image Pillow reads, from its header alone (no pixel is decoded).
    A decompression bomb is an image, for ``decode_image`` to refuse with its own code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bombs, corrupt EXIF: decode_image says what is wrong
            with Image.open(io.BytesIO(data), formats=FORMATS):
                return True
    except Image.DecompressionBombError:
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return False


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the actual range to 8 bits instead of clipping to white.
        arr = np.asarray(image)
        lo, hi = float(arr.min()), float(arr.max())
        out = np.zeros(arr.shape, np.uint8)
        # In blocks of rows: the same float64 arithmetic as one pass, without two float64 copies
        # of the image (1.6 GB for the 63 Mpx a 300-byte TIFF may claim under the pixel limit).
        step = max(1, (1 << 20) // max(1, arr.shape[1]))
        for top in range(0, arr.shape[0] if hi > lo else 0, step):
            rows = arr[top : top + step].astype(np.float64)
            out[top : top + step] = ((rows - lo) / (hi - lo) * 255.0).astype(np.uint8)
        return Image.fromarray(out, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F
