"""Getting bytes in, knowing nothing of models: bulk sources and reading their items
(``sources``), URL fetches under the address policy (``fetch``, ``url_policy``), and decoding
untrusted images and audio with typed errors (``images``, ``audio``)."""

from mmembed.loaders.images import DecodeLimits, ImageDecodeError, decode_image

__all__ = ["DecodeLimits", "ImageDecodeError", "decode_image"]
