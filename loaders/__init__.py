"""Getting bytes in and turning them into decoded media; knows nothing of models."""

from mmembed.loaders.images import DecodeLimits, ImageDecodeError, decode_image

__all__ = ["DecodeLimits", "ImageDecodeError", "decode_image"]
