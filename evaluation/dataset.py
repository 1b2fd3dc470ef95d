"""An evaluation set the user already has: a manifest of items and a file of queries.

Items (CSV or JSONL): ``id``, ``uri`` (a path, relative to the manifest, or an http(s) URL),
optional ``kind`` (image, audio or text; guessed from the extension) and ``caption``.
Queries (JSONL): ``id``, exactly one of ``text``, ``image`` or ``audio`` (a path or URL), and
``relevant``: the ids of the items that answer it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from mmembed.contracts import Query as SearchText
from mmembed.loaders.fetch import FetchLimits, fetch_sync

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".webm", ".aiff", ".amr"}


class DatasetError(ValueError):
    """The manifest or queries file is malformed; the message names the file and line."""


@dataclass
class Item:
    id: str
    kind: str  # image | audio | text
    uri: str
    caption: str | None = None

    def content(self, limits: FetchLimits = FetchLimits()) -> bytes | str:
        """Bytes for media, the text itself for text items."""
        if self.kind == "text":
            return self.caption or self.uri
        return _read(self.uri, limits)


@dataclass
class Query:
    id: str
    kind: str  # text | image | audio
    value: str  # the text, or a path/URL
    relevant: set[str] = field(default_factory=set)

    def content(self, limits: FetchLimits = FetchLimits()) -> bytes | str:
        """A text query as a search ``Query``: a model with a query prompt embeds it as it would in search."""
        return SearchText(self.value) if self.kind == "text" else _read(self.value, limits)


@dataclass
class EvalSet:
    items: list[Item]
    queries: list[Query]
    # URLs go through the same address policy, timeouts and size cap as every other fetch; the
    # default refuses private addresses (the command line passes the configured policy).
    fetch_limits: FetchLimits = field(default_factory=FetchLimits)

    def __post_init__(self) -> None:
        ids = {i.id for i in self.items}
        if len(ids) != len(self.items):
            raise DatasetError("item ids must be unique")
        for q in self.queries:
            unknown = q.relevant - ids
            if unknown:
                raise DatasetError(f"query {q.id!r}: relevant ids not in the manifest: {sorted(unknown)[:5]}")
            if not q.relevant:
                raise DatasetError(f"query {q.id!r} has no relevant items")


def _read(uri: str, limits: FetchLimits) -> bytes:
    if uri.startswith(("http://", "https://")):
        return fetch_sync(uri, limits)
    return Path(uri).read_bytes()


def _kind(uri: str) -> str:
    suffix = Path(uri.split("?")[0]).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    raise DatasetError(f"cannot tell whether {uri!r} is an image or audio: add a 'kind' column")


def _resolve(uri: str, base: Path) -> str:
    return uri if uri.startswith(("http://", "https://")) or Path(uri).is_absolute() else str(base / uri)


def _rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{n}: not JSON ({exc})") from exc
    return rows


def load_eval_set(items_path: Path, queries_path: Path, fetch_limits: FetchLimits = FetchLimits()) -> EvalSet:
    items = []
    for n, row in enumerate(_rows(items_path), 1):
        if not row.get("id") or not (row.get("uri") or row.get("kind") == "text"):
            raise DatasetError(f"{items_path}:{n}: every item needs an id and a uri")
        kind = row.get("kind") or _kind(row["uri"])
        uri = row.get("uri") or ""
        items.append(
            Item(
                str(row["id"]),
                kind,
                _resolve(uri, items_path.parent) if kind != "text" else uri,
                row.get("caption") or None,
            )
        )
    queries = []
    for n, row in enumerate(_rows(queries_path), 1):
        given = [k for k in ("text", "image", "audio") if row.get(k)]
        if len(given) != 1 or "id" not in row:
            raise DatasetError(f"{queries_path}:{n}: a query needs an id and exactly one of text, image, audio")
        kind = given[0]
        value = row[kind] if kind == "text" else _resolve(row[kind], queries_path.parent)
        queries.append(Query(str(row["id"]), kind, value, {str(r) for r in row.get("relevant", [])}))
    return EvalSet(items, queries, fetch_limits)


def write_eval_set(evalset: EvalSet, items_path: Path, queries_path: Path) -> None:
    """JSONL files that ``load_eval_set`` reads back (paths relative to the files)."""
    with items_path.open("w") as f:
        for i in evalset.items:
            uri = i.uri if i.kind == "text" else str(Path(i.uri).relative_to(items_path.parent))
            f.write(json.dumps({"id": i.id, "uri": uri, "kind": i.kind, "caption": i.caption}) + "\n")
    with queries_path.open("w") as f:
        for q in evalset.queries:
            value = q.value if q.kind == "text" else str(Path(q.value).relative_to(queries_path.parent))
            f.write(json.dumps({"id": q.id, q.kind: value, "relevant": sorted(q.relevant)}) + "\n")
