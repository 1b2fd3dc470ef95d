"""Image and audio inputs as the API takes them: http(s) URLs (fetched under the URL policy),
data URIs and bare base64. A bad input becomes its item's error, not the request's."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from mmembed.contracts import ItemError
from mmembed.loaders.audio import sniff_format
from mmembed.loaders.fetch import FetchError, FetchLimits, fetch
from mmembed.loaders.images import is_image
from mmembed.serve.http.errors import ApiError

# RFC 2397: data:[<media type>][;param=value]*[;base64],<data>
DATA_URI = re.compile(
    r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[^;,]*)*(?P<base64>;base64)?,(?P<data>.*)$", re.DOTALL
)


def data_uri_kind(text: str, where: str) -> str | None:
    """``image`` or ``audio`` for a data URI of one, by its media type or else by its bytes;
    None for anything that is not a data URI. A data URI of neither is refused: embedding
    the URI as a string would answer a vector for text nobody wrote."""
    m = DATA_URI.match(text)
    if m is None:
        return None
    kind = (m["type"] or "").split("/")[0].lower()
    if kind in ("image", "audio"):
        return kind
    if m["base64"]:
        data = b64(m["data"], where)
        if is_image(data):
            return "image"
        if sniff_format(data):
            return "audio"
    media_type = m["type"] or "text/plain"
    message = f"{where}: a data URI of {media_type} holds neither an image nor audio; send text as plain text"
    raise ApiError(422, "unsupported_media_type", message)


async def resolve(item: str, kind: str, where: str, limits: FetchLimits) -> bytes | ItemError:
    """The bytes an item names, or its error (so one bad URL fails only its own item)."""
    try:
        if item.startswith(("http://", "https://")):
            return await fetch(item, kind, limits)
        m = DATA_URI.match(item)
        if m is not None and not m["base64"]:
            raise ApiError(422, "invalid_base64", f"{where}: a data URI of {kind} must be base64 (;base64,)")
        return b64(m["data"] if m else item, where)
    except FetchError as exc:
        return ItemError(exc.code, f"{where}: {exc}")
    except ApiError as exc:
        return ItemError(exc.code, exc.message)


async def resolve_or_raise(item: str, kind: str, where: str, limits: FetchLimits) -> bytes:
    """One input a whole request stands on (a search query, an item to add)."""
    resolved = await resolve(item, kind, where, limits)
    if isinstance(resolved, ItemError):
        raise ApiError(422, resolved.code, resolved.message)
    return resolved


def b64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "invalid_base64", f"{where}: not valid base64 ({exc})") from exc


def item_kind(kind: str | None, media_type: str, data: bytes) -> str:
    """What an uploaded item is: as told, else its media type, else its bytes."""
    if kind:
        return kind
    if media_type.startswith(("image/", "audio/")):
        return media_type.split("/")[0]
    return "audio" if sniff_format(data) else "image"


def parse_meta(meta: str | None) -> dict[str, Any]:
    if not meta:
        return {}
    try:
        parsed = json.loads(meta)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_meta", f"meta is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ApiError(422, "invalid_meta", "meta must be a JSON object")
    return parsed
