"""Where a bulk catalogue job's items come from, and how each one's bytes are read.

A source is a local folder, a manifest (CSV, JSONL or Parquet) naming files, S3 objects or URLs, an
``s3://bucket/prefix``, or a ``.txt`` list of http(s) URLs. Listing happens once, in the driving
process, and yields plain ``SourceItem`` records sorted by URI, so a job is deterministic and can
be resumed or diffed by URI and ``version``. Reading happens later, item by item, in the job's
DataLoader workers (``jobs.dataset``); every failure is a ``SourceError`` with a stable code.

URLs are fetched through ``loaders.fetch`` under the same address (SSRF) policy as the API's URL
inputs, strict by default: a job can be submitted over HTTP, and a public listing can name, or
redirect to, the metadata endpoint or a private service. ``read_item(url_policy=...)`` allow-lists
what a deployment means to read from its own network.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import boto3.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from mmembed.loaders.fetch import FetchError, FetchLimits, fetch_sync
from mmembed.loaders.url_policy import STRICT_POLICY, PolicyClient, UrlPolicy

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".webm", ".aiff", ".aif", ".amr"}
)
KINDS = ("image", "audio", "text")  # a text item is a manifest row's own text (its ``text`` column)
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
URI_COLUMNS = ("uri", "path", "url")  # the first one a row fills in is the item
RESERVED_COLUMNS = frozenset({*URI_COLUMNS, "kind", "caption", "text"})
MAX_REDIRECTS = 3
ACCEPTED_FORMS = (
    "a folder, a manifest (.csv, .jsonl or .parquet with a uri, path or url column), "
    "s3://bucket/prefix, or a .txt file of http(s) URLs one per line"
)

_S3_PAGE_SIZE = 1000  # list_objects_v2's own maximum; the tests lower it to see several pages
_CHUNK = 1 << 20


class SourceError(Exception):
    """A source cannot be listed or an item cannot be read. ``code`` is stable for job records."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One item as listed. ``uri`` is its identity across runs; ``version`` is whatever the listing
    knows for free that changes when the content does, so a re-run can skip unchanged items
    without reading them (the content hash, computed on read, is the authority). A text item
    (``kind="text"``) carries its text as ``caption``: its content is listed, not read.

    Slots: a job streams its listing, but a plan's chunk and a window of pending items hold
    thousands of these at once."""

    uri: str
    kind: str
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    size: int | None = None
    version: str | None = None
    location: str | None = None  # where its bytes are read when not at ``uri`` (a catalogue item's stored object)


# ---------------------------------------------------------------------------------------------
# Listing


def list_source(source: str, s3_client: Any | None = None) -> list[SourceItem]:
    """Every item of ``source``, sorted by URI (``iter_source`` in a list, for callers that want it whole)."""
    items = sorted(iter_source(source, s3_client), key=lambda item: item.uri)
    for before, after in itertools.pairwise(items):
        if before.uri == after.uri:
            raise repeated(source, after.uri)
    return items


def repeated(source: str, uri: str) -> SourceError:
    """A manifest naming one item twice is ambiguous (which caption, which metadata?): refused."""
    return SourceError(f"{source} lists the item {uri} more than once", "bad_manifest")


def iter_source(source: str, s3_client: Any | None = None) -> Iterator[SourceItem]:
    """Every item of ``source``, streamed: a job plans a catalogue of millions without holding its
    listing. The order is deterministic (folders walked in name order, manifests and URL lists
    in file order, S3 in key order). A folder and a manifest naming the same files give equal
    items (local files named by a manifest are stat'ed for ``size`` and ``version``).

    Folders are walked recursively, skipping hidden files and folders (``.git``, ``.thumbnails``,
    macOS ``._name.jpg`` resource forks carry image extensions but are not images) and not
    following symlinked folders (no cycles). ``s3://bucket/prefix`` lists the folder ``prefix/``
    (like the object store's prefix setting), not every key that merely starts with the text.
    """
    if source.startswith("s3://"):
        return _list_s3(source, s3_client or boto3.session.Session().client("s3"))
    if "://" in source:
        raise SourceError(f"unsupported source {source!r}: expected {ACCEPTED_FORMS}", "unsupported_source")
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"source {source!r} does not exist (expected {ACCEPTED_FORMS})", "source_not_found")
    if path.is_dir():
        return _list_folder(path.resolve())
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return _list_manifest(path.resolve(), suffix)
    if suffix == ".txt":
        return _list_urls(path)
    raise SourceError(f"unsupported source {source!r}: expected {ACCEPTED_FORMS}", "unsupported_source")


def kind_of(name: str) -> str | None:
    """'image' or 'audio' from a file name, key or URL path's extension; None if neither."""
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    return None


def _file_item(path: Path, kind: str, caption: str | None = None, meta: dict[str, Any] | None = None) -> SourceItem:
    try:
        st = path.stat()
        size, version = (st.st_size, f"{st.st_mtime_ns}-{st.st_size}") if path.is_file() else (None, None)
    except OSError:  # missing or a broken link: listed anyway, reading it records the failure
        size = version = None
    return SourceItem(path.as_uri(), kind, caption, meta or {}, size, version)


def folder_items(root: Path, paths: Iterable[Path]) -> Iterator[SourceItem]:
    """The items a folder listing would give for these paths under ``root`` (a watch's changed
    files): the same URIs and versions, the same hidden files and folders skipped. A path that is a
    folder gives every item under it (a folder moved in)."""
    root = root.resolve()
    for path in paths:
        try:
            relative = path.relative_to(root)
        except ValueError:
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_dir() and not path.is_symlink():
            yield from _list_folder(path)
        elif (kind := kind_of(path.name)) and path.exists():
            yield _file_item(root / relative, kind)


def _list_folder(root: Path) -> Iterator[SourceItem]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            kind = kind_of(name)
            if kind and not name.startswith("."):
                yield _file_item(Path(folder, name), kind)


def _list_manifest(manifest: Path, suffix: str) -> Iterator[SourceItem]:
    """A repeated item is refused when the job records its plan (``JobStore``, by URI), so the
    listing keeps no set of a million URIs."""
    rows = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".parquet": _parquet_rows}[suffix](manifest)
    for where, row in rows:
        yield _row_item(row, where, manifest)


def _require_uri_column(manifest: Path, columns: Sequence[str]) -> None:
    if not any(c in columns for c in URI_COLUMNS):
        raise SourceError(
            f"{manifest} has no {', '.join(URI_COLUMNS)} column (its columns: {', '.join(map(str, columns))})",
            "bad_manifest",
        )


def _csv_rows(manifest: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
            reader = csv.DictReader(f)
            _require_uri_column(manifest, reader.fieldnames or [])
            for row in reader:
                where = f"line {reader.line_num}"
                if None in row:
                    raise SourceError(f"{manifest}: {where} has more fields than the header", "bad_manifest")
                yield where, {k: (v or None) for k, v in row.items()}  # empty cells count as absent
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{manifest} is not a readable UTF-8 CSV: {exc}", "bad_manifest") from exc


def _jsonl_rows(manifest: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with manifest.open(encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{manifest}: line {number} is not JSON: {exc}", "bad_manifest") from exc
                if not isinstance(row, dict):
                    raise SourceError(f"{manifest}: line {number} is not a JSON object", "bad_manifest")
                yield f"line {number}", row
    except UnicodeDecodeError as exc:
        raise SourceError(f"{manifest} is not UTF-8: {exc}", "bad_manifest") from exc


def _parquet_rows(manifest: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa  # only manifests need it, and it is a slow import for every worker
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(manifest)
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{manifest} is not a readable Parquet file: {exc}", "bad_manifest") from exc
    _require_uri_column(manifest, table.column_names)
    for number, row in enumerate(table.to_pylist(), 1):
        yield f"row {number}", row


def _row_item(row: Mapping[str, Any], where: str, manifest: Path) -> SourceItem:
    def bad(message: str) -> SourceError:
        return SourceError(f"{manifest}: {where} {message}", "bad_manifest")

    column = next((c for c in URI_COLUMNS if row.get(c) not in (None, "")), None)
    if column is None:
        raise bad(f"has no {', '.join(URI_COLUMNS)} value")
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise bad(f"has a {column} that is not a string: {value!r}")
    value = value.strip()
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise bad(f"has a caption that is not a string: {caption!r}")
    meta = {k: v for k, v in row.items() if k not in RESERVED_COLUMNS and v is not None and v != ""}
    declared = row.get("kind")
    if declared == "text":
        return _text_item(value, row.get("text"), meta, bad)
    if declared not in (None, ""):
        kind = str(declared).strip().lower()
        if kind not in KINDS:
            raise bad(f"has kind {declared!r}; kinds are {', '.join(KINDS)}")
    else:
        kind = kind_of(unquote(urlsplit(value).path) if "://" in value else value) or ""
        if not kind:
            raise bad(f"names {value!r}, whose extension is neither an image nor an audio one: add a kind column")

    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme in ("http", "https", "s3"):
        parts = urlsplit(value)
        if not parts.netloc or (scheme == "s3" and not parts.path.strip("/")):
            raise bad(f"has an incomplete URI {value!r}")
        return SourceItem(value, kind, caption or None, meta)
    if scheme == "file":
        path = Path(url2pathname(urlsplit(value).path))
    elif scheme:
        raise bad(f"has {value!r}: only local paths, file://, s3:// and http(s):// URIs are read")
    else:
        path = Path(value).expanduser()
    # Lexically normalised, not resolved: the item is the path the manifest names, like a folder listing.
    absolute = Path(os.path.normpath(manifest.parent / path))
    return _file_item(absolute, kind, caption or None, meta)


def _text_item(uri: str, text: Any, meta: dict[str, Any], bad: Any) -> SourceItem:
    """The text is the content, listed with its identity; its hash is the version, so a rerun
    skips unchanged texts without embedding them and re-embeds edited ones."""
    if not isinstance(text, str) or not text.strip():
        raise bad("is a text item without a text")
    version = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    return SourceItem(uri, "text", text, meta, len(text.encode("utf-8")), version)


def _list_urls(listing: Path) -> list[SourceItem]:
    items: list[SourceItem] = []
    seen: dict[str, int] = {}
    try:
        lines = listing.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the URL list {listing}: {exc}", "bad_manifest") from exc
    for number, line in enumerate(lines, 1):
        url = line.strip()
        if not url or url.startswith("#"):
            continue
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise SourceError(f"{listing}: line {number} is not an http(s) URL: {url[:80]!r}", "bad_manifest")
        kind = kind_of(unquote(parts.path))
        if kind is None:
            raise SourceError(
                f"{listing}: line {number}: cannot tell whether {url[:80]!r} is an image or audio from its "
                "extension; list it in a manifest with a kind column",
                "bad_manifest",
            )
        if url in seen:
            raise SourceError(f"{listing}: line {number} repeats line {seen[url]} ({url})", "bad_manifest")
        seen[url] = number
        items.append(SourceItem(url, kind))
    return sorted(items, key=lambda item: item.uri)


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _list_s3(source: str, client: Any) -> Iterator[SourceItem]:
    bucket, prefix = _split_s3(source)
    if not bucket:
        raise SourceError(f"unsupported source {source!r}: expected {ACCEPTED_FORMS}", "unsupported_source")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": _S3_PAGE_SIZE}
    try:
        while True:
            page = client.list_objects_v2(**request)
            for obj in page.get("Contents", []):
                key = obj["Key"]
                kind = kind_of(key)
                if kind and not key.endswith("/"):
                    etag = str(obj.get("ETag", "")).strip('"') or None
                    yield SourceItem(f"s3://{bucket}/{key}", kind, size=obj.get("Size"), version=etag)
            if not page.get("IsTruncated"):
                break
            request["ContinuationToken"] = page["NextContinuationToken"]
    except ClientError as exc:
        code = _s3_code(exc)
        if code == "NoSuchBucket":
            raise SourceError(f"no bucket {bucket!r} at this S3 endpoint ({source})", "source_not_found") from exc
        raise SourceError(f"cannot list {source}: {code or exc}", "s3_error") from exc
    except BotoCoreError as exc:
        raise SourceError(f"cannot list {source}: {exc}", "s3_error") from exc


def _s3_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# ---------------------------------------------------------------------------------------------
# Reading


def s3_client_config(endpoint: str | None = None, region: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``boto3.client("s3", ...)`` (also the job dataset's ``s3_config``): endpoint
    and region as configured, credentials from boto3's usual chain so none is ever written down."""
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=60,
        signature_version="s3v4",
        # Self-hosted servers (MinIO, SeaweedFS) answer at endpoint/bucket/key; see store.objects.
        s3={"addressing_style": "path" if endpoint else "virtual"},
    )
    return {"endpoint_url": endpoint, "region_name": region, "config": config}


def s3_client(endpoint: str | None = None, region: str | None = None) -> Any:
    # A session of its own: the default session caches the first credentials it finds process-wide.
    return boto3.session.Session().client("s3", **s3_client_config(endpoint, region))


def read_item(
    item: SourceItem,
    s3_client: Any | None = None,
    max_bytes: int = 100_000_000,
    timeout_s: float = 30,
    http_client: PolicyClient | None = None,
    url_policy: UrlPolicy | None = None,
    file_roots: Sequence[Path] | None = None,
) -> bytes:
    """The item's bytes, never more than ``max_bytes``, or a SourceError with a code: not_found,
    too_large, read_error, s3_error, url_status, url_unreachable, url_timeout, url_redirects,
    url_dns, url_forbidden_address, url_credentials, bad_uri, path_forbidden.

    Local files are read only inside ``file_roots`` when given (a server's jobs, whose paths come
    from its clients), after resolving symlinks and ``..``: a listing cannot point outside them.

    http(s) items are read under ``url_policy`` (None: the strict default, or ``http_client``'s).
    ``http_client`` (a ``PolicyClient`` made with that policy) lets a worker reuse connections
    across URLs; without one, or without ``s3_client`` for an S3 item, a client is made for this
    call, which is fine once but slow per item."""
    uri = item.location or item.uri
    if item.kind == "text":
        return (item.caption or "").encode("utf-8")
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "file":
        return _read_file(uri, max_bytes, file_roots)
    if scheme == "s3":
        return _read_s3(uri, s3_client or boto3.session.Session().client("s3"), max_bytes)
    if scheme in ("http", "https"):
        if http_client is not None:
            if url_policy is not None and url_policy != getattr(http_client, "policy", None):
                raise ValueError("read_item: http_client was made with another policy than url_policy")
            return _read_http(uri, http_client, max_bytes, timeout_s)
        with PolicyClient(url_policy or STRICT_POLICY) as client:
            return _read_http(uri, client, max_bytes, timeout_s)
    raise SourceError(f"cannot read {uri[:80]!r}: only file://, s3:// and http(s):// URIs are read", "bad_uri")


def check_inside_roots(path: Path, roots: Sequence[Path]) -> None:
    """SourceError("path_forbidden") unless ``path``, symlinks and ``..`` resolved, lies in a root."""
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(os.path.realpath(root)) for root in roots):
        raise SourceError(f"{path} is outside the folders this server reads (MMEMBED_INGEST_ROOTS)", "path_forbidden")


def _too_large(uri: str, size: int | str, max_bytes: int) -> SourceError:
    return SourceError(f"{uri} is {size} bytes, over the {max_bytes}-byte limit", "too_large")


def _read_file(uri: str, max_bytes: int, roots: Sequence[Path] | None = None) -> bytes:
    path = Path(url2pathname(urlsplit(uri).path))
    if roots is not None:
        check_inside_roots(path, roots)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise _too_large(uri, size, max_bytes)
            data = f.read(max_bytes + 1)  # bounded even if the file grows or is not a regular file
    except FileNotFoundError as exc:
        raise SourceError(f"no file at {path}", "not_found") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}", "read_error") from exc
    if len(data) > max_bytes:
        raise _too_large(uri, f"more than {max_bytes}", max_bytes)
    return data


def _read_s3(uri: str, client: Any, max_bytes: int) -> bytes:
    bucket, key = _split_s3(uri)
    if not bucket or not key:
        raise SourceError(f"{uri!r} is not s3://bucket/key", "bad_uri")
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            declared = response.get("ContentLength")
            if declared is not None and declared > max_bytes:
                raise _too_large(uri, declared, max_bytes)
            data = bytearray()
            for chunk in body.iter_chunks(_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise _too_large(uri, f"more than {max_bytes}", max_bytes)
        finally:
            body.close()
    except ClientError as exc:
        code = _s3_code(exc)
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
            raise SourceError(f"no object at {uri} ({code})", "not_found") from exc
        raise SourceError(f"cannot read {uri}: {code or exc}", "s3_error") from exc
    except BotoCoreError as exc:
        raise SourceError(f"cannot read {uri}: {exc}", "s3_error") from exc
    return bytes(data)


# FetchError codes as job records have always named them; the rest keep their own names.
_FETCH_CODES = {"url_too_large": "too_large", "url_scheme": "bad_uri", "url_invalid": "bad_uri"}


def _read_http(uri: str, client: PolicyClient, max_bytes: int, timeout_s: float) -> bytes:
    """One URL through ``loaders.fetch``, under ``client``'s address policy. ``timeout_s`` bounds
    each connect and read and, as a deadline, the whole read (a server that drips bytes). No
    content-type check: the decoders sniff the bytes, and bulk hosts often label media wrongly."""
    limits = FetchLimits(
        max_bytes=max_bytes,
        connect_timeout_s=timeout_s,
        read_timeout_s=timeout_s,
        max_redirects=MAX_REDIRECTS,
        total_timeout_s=timeout_s,
        policy=getattr(client, "policy", STRICT_POLICY),
    )
    try:
        return fetch_sync(uri, limits, client=client)
    except FetchError as exc:
        raise SourceError(str(exc), _FETCH_CODES.get(exc.code, exc.code)) from exc
