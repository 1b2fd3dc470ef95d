"""Vectors and their payload, behind one interface with two backends.

`EdgeStore` is the default: Qdrant's own engine in-process (Qdrant Edge), one shard folder,
nothing to run. `ClientStore` talks to a Qdrant server through qdrant-client (or to the
client's in-process ``":memory:"`` stand-in, which the tests use). Both take the same
checks before anything reaches the engine, so a bad vector or filter fails the same way,
with a message that names the point and says what to do, whichever backend is configured.

Points hold several named vectors (one per model and modality, e.g. ``"demo-clip.image"``
and ``"all-MiniLM-L6-v2.text"``); both engines accept such names as they are, so no name
mapping happens here. Distance is always cosine: the engines normalise vectors on write.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote

import numpy as np
import qdrant_edge as edge
from qdrant_client import QdrantClient, models

from mmembed.store.config import IndexConfig, VectorsConfig

Vector = Sequence[float] | np.ndarray
_RANGE_OPERATORS = ("gt", "gte", "lt", "lte")
_SCROLL_PAGE = 1024
_URL_NAMESPACE = uuid.NAMESPACE_URL.bytes
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class StoreError(Exception):
    """Anything the vector store refuses; the message says what to do about it."""


class StoreBusy(StoreError):
    """The embedded store is held by another process (a running server, another job)."""


class DimensionError(StoreError):
    """A vector's length differs from the collection's size for that name."""


class VerificationError(StoreError):
    """Points read back differ from what was written (or are missing)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        super().__init__(
            f"{len(ids)} point(s) read back differ from what was written: {shown}; "
            "write them again (upserts are idempotent) and check the store's disk and logs"
        )


@dataclass
class Point:
    id: str
    vectors: dict[str, Vector]
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]
    matched: dict[str, int] = field(default_factory=dict)  # a fused hit: its rank (1 = first) in each vector's list


Fusion = Literal["rrf", "dbsf"]
FUSIONS: tuple[Fusion, ...] = ("rrf", "dbsf")
RRF_K = 60  # reciprocal-rank fusion's constant, Qdrant's and the literature's default


@dataclass
class CollectionState:
    """What a collection says about itself beyond its points, switched in one write: the vector a
    search uses by default for each modality (what a model migration switches), the defaults before
    the last switch (what a rollback restores), and on the embedded engine which shard folder is
    live and which one a migration is filling."""

    defaults: dict[str, str] = field(default_factory=dict)
    previous: dict[str, str] = field(default_factory=dict)
    live: str | None = None
    building: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "previous": self.previous, "live": self.live, "building": self.building}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> CollectionState:
        data = data or {}
        defaults, previous = dict(data.get("defaults") or {}), dict(data.get("previous") or {})
        return cls(defaults, previous, data.get("live"), data.get("building"))


def point_id(uri: str) -> str:
    """The same item always gets the same id, so re-running a job overwrites instead of duplicating.

    ``str(uuid.uuid5(uuid.NAMESPACE_URL, uri))``, spelled out: a plan computes a million of these, and
    the ``uuid.UUID`` objects cost a third of an unchanged rerun."""
    digest = bytearray(hashlib.sha1(_URL_NAMESPACE + uri.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True)
class _Condition:
    """One parsed filter condition; each backend turns these into its own filter objects."""

    key: str
    kind: Literal["value", "any", "range"]
    value: Any


def _parse_filter(spec: dict[str, Any] | None) -> list[_Condition]:
    """Check the JSON filter spec up front so both backends refuse the same things with the same words."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise StoreError(f"a filter must be an object of field -> condition; got {type(spec).__name__}")
    conditions = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key:
            raise StoreError(f"filter field names must be non-empty strings; got {key!r}")
        conditions.append(_parse_condition(key, value))
    return conditions


def _parse_condition(key: str, value: Any) -> _Condition:
    if isinstance(value, str | bool | int):
        return _Condition(key, "value", value)
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            return _Condition(key, "any", list(value))
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return _Condition(key, "any", list(value))
        raise StoreError(
            f"filter {key!r}: a list matches any of its values and must be a non-empty list of all strings "
            f"or all integers; got {value!r}"
        )
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_RANGE_OPERATORS))
        if unknown or not value:
            raise StoreError(
                f"filter {key!r}: unknown range operator(s) {unknown or '(none given)'}; "
                f"use {', '.join(_RANGE_OPERATORS)}"
            )
        for op, bound in value.items():
            if isinstance(bound, bool) or not isinstance(bound, int | float) or not np.isfinite(bound):
                raise StoreError(f"filter {key!r}: range bound {op!r} must be a finite number; got {bound!r}")
        return _Condition(key, "range", dict(value))
    hint = " (floats cannot be matched exactly: use a range)" if isinstance(value, float) else ""
    raise StoreError(
        f"filter {key!r}: expected a string, integer or boolean, a list of them, or a range object; got {value!r}{hint}"
    )


def _checked_id(pid: Any) -> str:
    """Only canonical UUID strings: the engines return ids in that form, so other spellings would not round trip."""
    if isinstance(pid, str) and _CANONICAL_UUID.fullmatch(pid):
        return pid
    try:
        canonical = str(uuid.UUID(pid))
    except (TypeError, ValueError, AttributeError):
        raise StoreError(f"point id {pid!r} is not a UUID; make ids with point_id(uri)") from None
    if canonical != pid:
        raise StoreError(f"point id {pid!r} is not in canonical form; use {canonical!r} (what point_id gives)")
    return canonical


def _json(value: Any) -> Any:
    """Payload as the engine stores it (tuples come back as lists), for comparing what was written with what is read."""
    return json.loads(json.dumps(value))


class VectorStore(ABC):
    """One collection of points with named vectors. Call open() before anything else."""

    vectors: dict[str, int]

    def __init__(self, index: IndexConfig | None = None) -> None:
        self.vectors = {}
        self.indexes: dict[str, str] = {}
        self.index = index or IndexConfig()

    def open(self, vectors: dict[str, int], indexes: dict[str, str] | None = None, missing_ok: bool = False) -> None:
        """Create the collection with these named vectors (cosine distance) if it does not exist; if it
        exists, check every requested name exists with the same dim (``missing_ok``: names it lacks are
        left out, as a server whose new model is not migrated in yet does). Creates payload indexes:
        indexes maps field -> "keyword" | "integer" | "float" | "bool"."""
        if not vectors:
            raise StoreError("open() needs at least one named vector, e.g. {'demo-clip.image': 128}")
        for name, dim in vectors.items():
            if not isinstance(name, str) or not name:
                raise StoreError(f"vector names must be non-empty strings; got {name!r}")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise StoreError(f"vector {name!r}: size must be a positive integer; got {dim!r}")
        for field_name, kind in (indexes or {}).items():
            if kind not in ("keyword", "integer", "float", "bool"):
                raise StoreError(
                    f"payload index {field_name!r}: unknown kind {kind!r}; use keyword, integer, float or bool"
                )
        existing = self._existing_vectors()
        if existing is None:
            self._create(vectors)
            existing = dict(vectors)
        for name, dim in vectors.items():
            if name not in existing:
                if missing_ok:
                    continue
                raise StoreError(
                    f"the collection has no vector {name!r} (it has {sorted(existing)}); add a model's vectors to "
                    f"a collection with `mmembed migrate --to {name.rpartition('.')[0]}`, or use a new collection name"
                )
            if existing[name] != dim:
                raise DimensionError(
                    f"vector {name!r} is {existing[name]}-d in the collection; got {dim}-d. "
                    "Use the model the collection was built with, or a new collection name"
                )
        self._load()
        self.vectors = existing
        self.indexes = dict(indexes or {})
        for field_name, kind in (indexes or {}).items():
            self._create_index(field_name, kind)

    def open_existing(self) -> dict[str, int]:
        """Attach to the collection as it is, for tools that read it whatever models made it; returns
        its named vectors and sizes."""
        existing = self._existing_vectors()
        if existing is None:
            raise StoreError("the collection does not exist yet: ingest something into it first")
        self.open(existing)
        return existing

    def upsert(self, points: Sequence[Point], batch_size: int = 256, durable: bool = True) -> None:
        """Validate every point before writing any, so a bad item never leaves half a batch behind.
        Existing points are merged into (their other vectors and payload keys stay), so the image and
        the text of one item can be written by different jobs. ``durable=False``: the backend may keep
        the write in its log until ``flush`` (a bulk job flushes before each checkpoint, not per batch)."""
        self._require_open()
        if batch_size < 1:
            raise StoreError(f"batch_size must be at least 1; got {batch_size}")
        checked = [self._checked_point(p) for p in points]
        seen: set[str] = set()
        for p in checked:
            if p.id in seen:
                raise StoreError(f"point {p.id} appears twice in one upsert; merge its vectors and payload first")
            seen.add(p.id)
        for start in range(0, len(checked), batch_size):
            batch = checked[start : start + batch_size]
            present = {p.id for p in self._retrieve([p.id for p in batch], False, [])}
            new = [p for p in batch if p.id not in present]
            old = [p for p in batch if p.id in present]
            if new:
                self._insert(new)
            if old:
                self._merge(old)

    def retrieve(
        self, ids: Sequence[str], with_vectors: bool = False, fields: Sequence[str] | None = None
    ) -> list[Point]:
        """Missing ids are simply absent from the result. ``fields``: the payload keys to read (None:
        all), so a job comparing versions over a million points reads one key, not whole payloads."""
        self._require_open()
        return self._retrieve([_checked_id(i) for i in ids], with_vectors, None if fields is None else list(fields))

    def delete(self, ids: Sequence[str]) -> None:
        """Deleting an id that is not there is not an error, so a retried delete is harmless."""
        self._require_open()
        checked = [_checked_id(i) for i in ids]
        if checked:
            self._delete(checked)

    def search(
        self,
        vector_name: str,
        vector: Vector,
        top_k: int = 10,
        threshold: float | None = None,
        filter: dict[str, Any] | None = None,
        offset: int = 0,
    ) -> list[Hit]:
        """Cosine scores, best first. Points lacking this named vector are not candidates."""
        self._require_open()
        if vector_name not in self.vectors:
            raise StoreError(f"unknown vector {vector_name!r}; the collection has {sorted(self.vectors)}")
        query = self._checked_vector(vector_name, vector, "query")
        if top_k < 1 or offset < 0:
            raise StoreError(f"top_k must be at least 1 and offset at least 0; got top_k={top_k}, offset={offset}")
        if threshold is not None and not np.isfinite(threshold):
            raise StoreError(f"threshold must be a finite number; got {threshold!r}")
        return self._search(vector_name, query, top_k, threshold, _parse_filter(filter), offset)

    def search_fused(
        self,
        queries: dict[str, Vector],
        top_k: int = 10,
        threshold: float | None = None,
        filter: dict[str, Any] | None = None,
        offset: int = 0,
        fusion: Fusion = "dbsf",
    ) -> list[Hit]:
        """One ranking over several named vectors of each point, each searched with its own query: the
        engine's query API ranks each vector's candidates (prefetch) and merges them: distribution-based
        score fusion by default, which keeps the lead of a near-exact match (30 demo-catalogue images as
        queries, fused over their image, caption and bind vectors, find themselves first 30 times; by
        reciprocal ranks, which drop the scores, 21: docs/search.md), or reciprocal-rank fusion.
        ``threshold`` is a cosine each candidate must reach on its own vector; the filter applies to every
        vector. Each hit's ``matched`` gives its rank in each vector's own list of candidates, so a caller
        can say why it was found."""
        self._require_open()
        if not queries:
            raise StoreError("a fused search needs at least one named vector and its query")
        if fusion not in FUSIONS:
            raise StoreError(f"unknown fusion {fusion!r}; use {' or '.join(FUSIONS)}")
        checked = {}
        for name, vector in queries.items():
            if name not in self.vectors:
                raise StoreError(f"unknown vector {name!r}; the collection has {sorted(self.vectors)}")
            checked[name] = self._checked_vector(name, vector, "query")
        if top_k < 1 or offset < 0:
            raise StoreError(f"top_k must be at least 1 and offset at least 0; got top_k={top_k}, offset={offset}")
        if threshold is not None and not np.isfinite(threshold):
            raise StoreError(f"threshold must be a finite number; got {threshold!r}")
        conditions = _parse_filter(filter)
        candidates = max(50, 4 * (top_k + offset))  # per vector: deep enough that fusion sees every contender
        hits = self._fuse(checked, top_k, threshold, conditions, offset, fusion, candidates)
        ranks: dict[str, dict[str, int]] = {}
        for name, vector in checked.items():
            own = self._search(name, vector, candidates, threshold, conditions, 0)
            for rank, hit in enumerate(own, 1):
                ranks.setdefault(hit.id, {})[name] = rank
        return [replace(hit, matched=ranks.get(hit.id, {})) for hit in hits]

    @abstractmethod
    def _fuse(
        self,
        queries: dict[str, list[float]],
        top_k: int,
        threshold: float | None,
        conditions: list[_Condition],
        offset: int,
        fusion: Fusion,
        candidates: int,
    ) -> list[Hit]: ...

    def count(self, filter: dict[str, Any] | None = None) -> int:
        self._require_open()
        return self._count(_parse_filter(filter))

    def build_index(self) -> bool:
        """Index what was written since the last build, once the collection is large enough for the
        graph to beat an exact scan (``IndexConfig.min_points``); True if it built. Seconds per
        segment's worth of new points, so bulk jobs call it per window of items, not per batch."""
        self._require_open()
        if self._count([]) < self.index.min_points:
            return False
        self._build_index()
        return True

    @abstractmethod
    def _build_index(self) -> None: ...

    def scroll_ids(self, filter: dict[str, Any] | None = None) -> list[str]:
        """Every matching id, in a list."""
        return list(self.iter_ids(filter))

    def iter_ids(self, filter: dict[str, Any] | None = None) -> Iterator[str]:
        """Every matching id, a page at a time: a job syncing a million-item source against the
        store holds one page."""
        self._require_open()
        return self._iter_ids(_parse_filter(filter))

    def verify(self, points: Sequence[Point], sample: int = 32, seed: int = 0) -> None:
        """Re-read a random sample (all if fewer) of the written points; compare vectors (allclose,
        after the backend's own cosine normalisation) and the given payload keys; raise
        VerificationError(ids) listing every mismatch."""
        self._require_open()
        chosen = list(points) if len(points) <= sample else random.Random(seed).sample(list(points), sample)
        stored = {p.id: p for p in self.retrieve([p.id for p in chosen], with_vectors=True)}
        bad = _mismatched(chosen, stored)
        if bad:
            raise VerificationError(bad)

    @abstractmethod
    def state(self) -> CollectionState:
        """The collection's state; an empty one for a collection that never had any saved."""

    @abstractmethod
    def save_state(self, state: CollectionState) -> None:
        """Replace the collection's state in one write, so readers see the old one or the new one."""

    @abstractmethod
    def with_vectors(self, vectors: dict[str, int]) -> VectorStore:
        """A store of this collection's points that also holds these named vectors, for a migration to
        fill while searches keep answering from this one: the same collection where the engine can add
        a named vector to existing points, else a new collection beside this one (see ``adopt``)."""

    def adopt(self, target: VectorStore, state: CollectionState) -> None:
        """Answer from ``target`` (from ``with_vectors``) with ``state``, switched in one write."""
        if target is not self:
            raise StoreError("this engine adds named vectors in place: there is no other collection to adopt")
        self.save_state(state)

    def drop_vectors(self, names: Sequence[str]) -> None:
        """Free these named vectors of every point, and anything kept only to switch back to them."""
        self._require_open()
        unknown = sorted(set(names) - set(self.vectors))
        if unknown:
            raise StoreError(f"no vectors {unknown} in the collection; it has {sorted(self.vectors)}")
        if set(names) >= set(self.vectors):
            raise StoreError("dropping every named vector would leave nothing to search; keep at least one")
        self._drop_vectors(list(names))
        self.vectors = {n: d for n, d in self.vectors.items() if n not in names}

    @abstractmethod
    def _drop_vectors(self, names: list[str]) -> None: ...

    @abstractmethod
    def flush(self) -> None:
        """Writes made with ``durable=False`` on disk."""

    @abstractmethod
    def close(self) -> None: ...

    def _require_open(self) -> None:
        if not self.vectors:
            raise StoreError("the store is not open: call open(vectors) first")

    def _checked_point(self, point: Point) -> Point:
        pid = _checked_id(point.id)
        vectors = {name: self._checked_vector(name, v, f"point {pid}") for name, v in point.vectors.items()}
        if not isinstance(point.payload, dict):
            raise StoreError(f"point {pid}: payload must be a dict; got {type(point.payload).__name__}")
        try:
            json.dumps(point.payload, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise StoreError(
                f"point {pid}: payload is not plain JSON ({e}); convert numpy values and other objects "
                "to Python str/int/float/bool/list/dict"
            ) from None
        return Point(pid, vectors, point.payload)

    def _checked_vector(self, name: str, vector: Any, what: str) -> list[float]:
        if name not in self.vectors:
            raise StoreError(f"{what}: unknown vector {name!r}; the collection has {sorted(self.vectors)}")
        try:
            array = np.asarray(vector, dtype=np.float64)
        except (TypeError, ValueError):
            raise StoreError(f"{what}: vector {name!r} is not a list of numbers") from None
        dim = self.vectors[name]
        if array.ndim != 1 or array.shape[0] != dim:
            got = f"{array.shape[0]}-d" if array.ndim == 1 else f"shape {array.shape}"
            raise DimensionError(
                f"vector {name!r} is {dim}-d in the collection; got {got} ({what}). "
                "Use the model the collection was built with, or a new collection name"
            )
        if not np.isfinite(array).all():
            raise StoreError(f"{what}: vector {name!r} has NaN or infinite values; check the encoder's output")
        if not array.any():
            raise StoreError(f"{what}: vector {name!r} is all zeros, which has no cosine direction")
        return array.tolist()

    @abstractmethod
    def _existing_vectors(self) -> dict[str, int] | None:
        """The collection's named vectors and sizes, or None when it does not exist yet."""

    @abstractmethod
    def _create(self, vectors: dict[str, int]) -> None: ...

    @abstractmethod
    def _load(self) -> None:
        """Attach to the collection once its vectors are known to fit; a no-op where nothing is held open."""

    @abstractmethod
    def _create_index(self, field_name: str, kind: str) -> None: ...

    @abstractmethod
    def _insert(self, points: list[Point]) -> None: ...

    @abstractmethod
    def _merge(self, points: list[Point]) -> None:
        """Write these existing points' vectors and payload keys, keeping the rest of each point."""

    @abstractmethod
    def _retrieve(self, ids: list[str], with_vectors: bool, fields: list[str] | None) -> list[Point]: ...

    @abstractmethod
    def _delete(self, ids: list[str]) -> None: ...

    @abstractmethod
    def _search(
        self,
        vector_name: str,
        vector: list[float],
        top_k: int,
        threshold: float | None,
        conditions: list[_Condition],
        offset: int,
    ) -> list[Hit]: ...

    @abstractmethod
    def _count(self, conditions: list[_Condition]) -> int: ...

    @abstractmethod
    def _iter_ids(self, conditions: list[_Condition]) -> Iterator[str]: ...


def _with_payload(fields: list[str] | None) -> bool | list[str]:
    """Both engines take True (all), False (none) or the keys to include."""
    return True if fields is None else fields or False


def _mismatched(written: Sequence[Point], stored: Mapping[str, Point]) -> list[str]:
    """The ids of ``written`` whose stored point is missing or differs: each payload through one JSON
    round trip, each named vector's rows compared at once (``np.allclose`` per row, after unit
    normalisation). Per point and per key, the same checks cost a bulk job's write step as much as
    the upsert itself."""
    bad = {p.id for p in written if p.id not in stored or not _same_payload(p.payload, stored[p.id].payload)}
    for name in {name for p in written for name in p.vectors}:
        pairs = [
            (p.id, p.vectors[name], stored[p.id].vectors.get(name))
            for p in written
            if p.id not in bad and name in p.vectors
        ]
        bad |= {pid for pid, _, got in pairs if got is None}
        pairs = [pair for pair in pairs if pair[2] is not None]
        if pairs:
            mine, theirs = (_unit_rows([pair[i] for pair in pairs]) for i in (1, 2))
            close = (np.abs(mine - theirs) <= 1e-5 + 1e-5 * np.abs(theirs)).all(axis=1)
            bad |= {pid for (pid, _, _), ok in zip(pairs, close, strict=True) if not ok}
    return [p.id for p in written if p.id in bad]


def _unit_rows(vectors: list[Any]) -> np.ndarray:
    rows = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


_MISSING = object()


def _same_payload(written: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Every written key is stored with the same value (the engine may hold more keys)."""
    written = _json(written)
    if all(stored.get(key, _MISSING) == value for key, value in written.items()):  # the usual case, at C speed
        return True
    return all(key in stored and _same_value(value, stored[key]) for key, value in written.items())


def _same_value(written: Any, stored: Any) -> bool:
    """Equal as JSON, except that floats may come back one ulp off: Qdrant Edge 0.9 prints
    some doubles with one digit too few (1795674344.7832859 reads back as 1795674344.783286)."""
    if isinstance(written, float) and isinstance(stored, int | float) and not isinstance(stored, bool):
        return math.isclose(written, stored, rel_tol=4 * sys.float_info.epsilon, abs_tol=0.0)
    if isinstance(written, dict) and isinstance(stored, dict):
        return written.keys() == stored.keys() and all(_same_value(v, stored[k]) for k, v in written.items())
    if isinstance(written, list) and isinstance(stored, list):
        return len(written) == len(stored) and all(_same_value(a, b) for a, b in zip(written, stored, strict=True))
    return written == stored


# --- Qdrant Edge (embedded) -------------------------------------------------------------------

# Payload indexes live on disk like the segments they index (see EdgeStore._create).
_EDGE_INDEX: dict[str, Callable[[], Any]] = {
    "keyword": lambda: edge.KeywordIndexParams(memory=edge.Memory.Cold),
    "integer": lambda: edge.IntegerIndexParams(lookup=True, range=True, memory=edge.Memory.Cold),
    "float": lambda: edge.FloatIndexParams(memory=edge.Memory.Cold),
    "bool": lambda: edge.BoolIndexParams(memory=edge.Memory.Cold),
}
_EDGE_CONFIG_FILE = "edge_config.json"


def _edge_filter(conditions: list[_Condition]) -> edge.Filter | None:
    if not conditions:
        return None
    return edge.Filter(must=[_edge_condition(c) for c in conditions])


def _edge_condition(c: _Condition) -> edge.FieldCondition:
    if c.kind == "range":
        return edge.FieldCondition(c.key, range=edge.RangeFloat(**c.value))
    if c.kind == "any":
        return edge.FieldCondition(c.key, match=edge.MatchAny(c.value))
    # qdrant-edge-py 0.9.0 reads a Python bool as the integer 0/1 (bool subclasses int), so
    # {"flag": True} would match the number 1 and never a stored true; numpy's bool converts as a bool.
    value = np.bool_(c.value) if isinstance(c.value, bool) else c.value
    return edge.FieldCondition(c.key, match=edge.MatchValue(value))


class EdgeStore(VectorStore):
    """Qdrant Edge in this process: one shard folder, reopened with its data. Every write is flushed
    before it returns (unless asked not to be), so a crash never loses a write that was acknowledged."""

    def __init__(self, path: Path, index: IndexConfig | None = None) -> None:
        """``path``: the collection's folder. After a model migration the live shard is a sibling
        folder (``<name>~2``), named by the collection's state file (``<name>.state.json``) beside it:
        the engine cannot add a named vector to the sealed segments of a shard it has reopened."""
        super().__init__(index)
        self.path = Path(path)
        self._shard: edge.EdgeShard | None = None
        self._retired: list[edge.EdgeShard] = []  # shards switched away from, closed with this store

    @property
    def shard_path(self) -> Path:
        live = self.state().live
        return self.path.parent / live if live else self.path

    @property
    def shard(self) -> edge.EdgeShard:
        """The engine itself, for what this interface leaves out (optimize() to build HNSW, snapshots)."""
        if self._shard is None:
            raise StoreError("the store is not open: call open(vectors) first")
        return self._shard

    def upsert(self, points: Sequence[Point], batch_size: int = 256, durable: bool = True) -> None:
        """A write not flushed is still in the shard's write-ahead log, which the next ``load`` replays
        (a process killed with SIGKILL loses none of it, ``tests/store/test_vectors.py``); the flush
        writes the segments, as long again as the upsert itself for a batch of 32 (0.23 against 0.22 s
        per 1,024 ViT-B/32 points), so a bulk job pays it once per checkpoint instead."""
        super().upsert(points, batch_size)
        if durable:
            self.flush()

    def flush(self) -> None:
        self.shard.flush()

    def delete(self, ids: Sequence[str]) -> None:
        super().delete(ids)
        self.shard.flush()

    def close(self) -> None:
        if self._shard is not None:
            self._shard.flush()
            self._shard.close()
            self._shard = None
        self._close_retired()
        self.vectors = {}

    def _close_retired(self) -> None:
        for shard in self._retired:
            shard.close()
        self._retired.clear()

    def state(self) -> CollectionState:
        file = self._state_file()
        return CollectionState.from_json(json.loads(file.read_text())) if file.exists() else CollectionState()

    def save_state(self, state: CollectionState) -> None:
        file = self._state_file()
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_suffix(".partial")
        partial.write_text(json.dumps(state.as_json()))
        os.replace(partial, file)  # atomic: a reader sees the old state or the new one

    def _state_file(self) -> Path:
        return self.path.parent / f"{self.path.name}.state.json"

    def with_vectors(self, vectors: dict[str, int]) -> VectorStore:
        """Qdrant Edge 0.9 adds a named vector to a shard (``create_dense_vector``), but a shard with
        sealed segments reopened after that fails its searches ("vector N is not readable"); so the new
        vectors go into a new shard beside this one, holding every point's vectors and payload."""
        self._require_open()
        if all(name in self.vectors for name in vectors):
            return self
        state = self.state()
        if state.building is None:
            n = 2
            while (self.path.parent / f"{self.path.name}~{n}").exists() or f"{self.path.name}~{n}" == state.live:
                n += 1
            state.building = f"{self.path.name}~{n}"
            self.save_state(state)
        target = EdgeStore(self.path.parent / state.building, self.index)
        target.open(self.vectors | vectors, self.indexes)
        return target

    def adopt(self, target: VectorStore, state: CollectionState) -> None:
        """The switch is the state file's one write; searches already running finish on the old shard,
        which stays open (for a rollback's searches too) until ``drop_vectors`` or ``close``."""
        if target is self:
            self.save_state(state)
            return
        if not isinstance(target, EdgeStore):
            raise StoreError("an embedded collection adopts only another embedded shard")
        target.shard.flush()
        state.live = None if target.path == self.path else target.path.name
        state.building = None
        self.save_state(state)
        if self._shard is not None:
            self._retired.append(self._shard)
        self._shard, target._shard = target._shard, None
        self.vectors = target.vectors

    def _drop_vectors(self, names: list[str]) -> None:
        """Also deletes the shards switched away from, which held the old vectors."""
        for name in names:
            self.shard.update(edge.UpdateOperation.delete_vector_name(name))
        self.shard.flush()
        self._close_retired()
        live = self.shard_path
        state = self.state()
        for folder in [self.path, *self.path.parent.glob(f"{glob.escape(self.path.name)}~*")]:
            if folder.is_dir() and folder != live and folder.name != state.building:
                shutil.rmtree(folder)

    def _existing_vectors(self) -> dict[str, int] | None:
        # The engine has no call that reports a shard's vectors; it persists them in this
        # documented file, which is read before loading so a mismatch never touches the shard.
        config_file = self.shard_path / _EDGE_CONFIG_FILE
        if not config_file.exists():
            return None
        params = json.loads(config_file.read_text())["vectors"]
        for name, p in params.items():
            if p["distance"] != "Cosine":
                raise StoreError(
                    f"vector {name!r} in {self.shard_path} uses {p['distance']} distance, not cosine; "
                    "use a new collection name"
                )
        return {name: p["size"] for name, p in params.items()}

    def _load(self) -> None:
        if self._shard is not None:
            return
        try:
            self._shard = edge.EdgeShard.load(str(self.shard_path))
        except Exception as e:
            # The engine locks the shard's write-ahead log; a second opener gets only "WouldBlock".
            if "WouldBlock" not in str(e):
                raise
            raise StoreBusy(
                f"the vector shard {self.shard_path} is already open in another store or process; only one may "
                "hold it: run a single catalogue replica, or set MMEMBED_QDRANT_URL to share a Qdrant server"
            ) from e

    def _create(self, vectors: dict[str, int]) -> None:
        """Sealed segments live on disk (memory-mapped, read through the page cache) and stop growing at
        ``segment_points``, so this process's memory holds the segment being written or built, not the
        collection: measured flat from 100k to 1M points (docs/benchmarks.md, "Scale: a million items")."""
        self.shard_path.mkdir(parents=True, exist_ok=True)
        quantization = None
        if self.index.quantization == "int8":
            quantization = edge.ScalarQuantizationConfig(edge.ScalarType.Int8, quantile=0.99, always_ram=True)
        cold = edge.Memory.Cold
        # The engine sizes a segment by its largest vector storage, not by all of them together.
        segment_kb = self.index.segment_points * max(vectors.values()) * 4 // 1024
        config = edge.EdgeConfig(
            vectors={
                name: edge.EdgeVectorParams(dim, edge.Distance.Cosine, memory=cold) for name, dim in vectors.items()
            },
            hnsw_config=edge.HnswIndexConfig(
                self.index.m, self.index.ef_construct, full_scan_threshold=10_000, memory=cold
            ),
            quantization_config=quantization,
            # build_index() decides when to index (min_points); once called, any size of new segment is.
            optimizers=edge.EdgeOptimizersConfig(max_segment_size=segment_kb, indexing_threshold=1),
            payload_memory=cold,
            id_tracker_memory=cold,
        )
        self._shard = edge.EdgeShard.create(str(self.shard_path), config)

    def _build_index(self) -> None:
        self.shard.optimize()

    def _create_index(self, field_name: str, kind: str) -> None:
        self.shard.update(edge.UpdateOperation.create_field_index(field_name, _EDGE_INDEX[kind]()))

    def _insert(self, points: list[Point]) -> None:
        self.shard.update(edge.UpdateOperation.upsert_points([edge.Point(p.id, p.vectors, p.payload) for p in points]))

    def _merge(self, points: list[Point]) -> None:
        with_vectors = [edge.PointVectors(p.id, p.vectors) for p in points if p.vectors]
        if with_vectors:
            self.shard.update(edge.UpdateOperation.update_vectors(with_vectors))
        for p in points:
            if p.payload:
                self.shard.update(edge.UpdateOperation.set_payload([p.id], p.payload))

    def _retrieve(self, ids: list[str], with_vectors: bool, fields: list[str] | None) -> list[Point]:
        records = self.shard.retrieve(ids, _with_payload(fields), with_vectors)
        return [Point(str(r.id), dict(r.vector or {}), r.payload or {}) for r in records]

    def _delete(self, ids: list[str]) -> None:
        self.shard.update(edge.UpdateOperation.delete_points(ids))

    def _search(
        self,
        vector_name: str,
        vector: list[float],
        top_k: int,
        threshold: float | None,
        conditions: list[_Condition],
        offset: int,
    ) -> list[Hit]:
        request = edge.QueryRequest(
            limit=top_k,
            offset=offset,
            query=edge.Query.Nearest(vector, using=vector_name),
            filter=_edge_filter(conditions),
            score_threshold=threshold,
            with_payload=True,
            params=self._search_params(),
        )
        return [Hit(str(p.id), p.score, p.payload or {}) for p in self.shard.query(request)]

    def _fuse(
        self,
        queries: dict[str, list[float]],
        top_k: int,
        threshold: float | None,
        conditions: list[_Condition],
        offset: int,
        fusion: Fusion,
        candidates: int,
    ) -> list[Hit]:
        params = self._search_params()
        prefetches = [
            edge.Prefetch(
                candidates,
                query=edge.Query.Nearest(vector, using=name),
                filter=_edge_filter(conditions),
                score_threshold=threshold,
                params=params,
            )
            for name, vector in queries.items()
        ]
        request = edge.QueryRequest(
            limit=top_k,
            offset=offset,
            prefetches=prefetches,
            query=edge.Fusion.Rrf(RRF_K) if fusion == "rrf" else edge.Fusion.Dbsf(),
            filter=_edge_filter(conditions),
            with_payload=True,
        )
        return [Hit(str(p.id), p.score, p.payload or {}) for p in self.shard.query(request)]

    def _search_params(self) -> edge.SearchParams:
        rescore = edge.QuantizationSearchParams(rescore=True) if self.index.quantization != "none" else None
        return edge.SearchParams(hnsw_ef=self.index.ef, quantization=rescore)

    def _count(self, conditions: list[_Condition]) -> int:
        return self.shard.count(edge.CountRequest(exact=True, filter=_edge_filter(conditions)))

    def _iter_ids(self, conditions: list[_Condition]) -> Iterator[str]:
        offset = None
        while True:
            request = edge.ScrollRequest(
                offset=offset, limit=_SCROLL_PAGE, filter=_edge_filter(conditions), with_payload=False
            )
            records, offset = self.shard.scroll(request)
            yield from (str(r.id) for r in records)
            if offset is None:
                return


# --- qdrant-client (a Qdrant server, or the client's ':memory:' mode) ---------------------------

_STATE_KEY = "mmembed"  # the collection metadata key mmembed keeps its CollectionState under

_CLIENT_INDEX = {
    "keyword": models.PayloadSchemaType.KEYWORD,
    "integer": models.PayloadSchemaType.INTEGER,
    "float": models.PayloadSchemaType.FLOAT,
    "bool": models.PayloadSchemaType.BOOL,
}


def _client_filter(conditions: list[_Condition]) -> models.Filter | None:
    if not conditions:
        return None
    return models.Filter(must=[_client_condition(c) for c in conditions])


def _client_condition(c: _Condition) -> models.FieldCondition:
    if c.kind == "range":
        return models.FieldCondition(key=c.key, range=models.Range(**c.value))
    if c.kind == "any":
        return models.FieldCondition(key=c.key, match=models.MatchAny(any=c.value))
    return models.FieldCondition(key=c.key, match=models.MatchValue(value=c.value))


def _wire(name: str) -> str:
    """A Qdrant server refuses vector names with characters a file name could not hold (``:``, ``/``), which
    model names have (``hf-clip:/models/x``, ``ViT-B-32@openai``); they travel percent-encoded."""
    return quote(name, safe="@.-_~")


def _unwire(name: str) -> str:
    return unquote(name)


def _unwired(vectors: Any) -> dict[str, Any]:
    return {_unwire(name): v for name, v in vectors.items()}


def _wired(vectors: dict[str, Any]) -> dict[str, Any]:
    return {_wire(name): v for name, v in vectors.items()}


class ClientStore(VectorStore):
    """A collection reached through qdrant-client. The store owns the client: close() closes it."""

    def __init__(self, client: QdrantClient, collection: str, index: IndexConfig | None = None) -> None:
        super().__init__(index)
        self.client = client
        self.collection = collection

    def close(self) -> None:
        self.client.close()
        self.vectors = {}

    def state(self) -> CollectionState:
        if not self.client.collection_exists(self.collection):
            return CollectionState()
        metadata = self.client.get_collection(self.collection).config.metadata or {}
        return CollectionState.from_json(metadata.get(_STATE_KEY))

    def save_state(self, state: CollectionState) -> None:
        """Collection metadata: one request, and every client of the server sees it."""
        self.client.update_collection(self.collection, metadata={_STATE_KEY: state.as_json()})

    def with_vectors(self, vectors: dict[str, int]) -> VectorStore:
        """Qdrant 1.18+ adds a named vector to an existing collection; ``update_vectors`` then fills it
        point by point while searches use the others."""
        self._require_open()
        for name, dim in vectors.items():
            if name in self.vectors:
                continue
            config = models.DenseVectorConfig(size=dim, distance=models.Distance.COSINE)
            self.client.create_vector_name(self.collection, _wire(name), models.DenseVectorNameConfig(dense=config))
            self.vectors[name] = dim
        return self

    def _drop_vectors(self, names: list[str]) -> None:
        for name in names:
            self.client.delete_vector_name(self.collection, _wire(name))

    def _existing_vectors(self) -> dict[str, int] | None:
        if not self.client.collection_exists(self.collection):
            return None
        params = self.client.get_collection(self.collection).config.params.vectors
        if not isinstance(params, dict):
            raise StoreError(
                f"collection {self.collection!r} has one unnamed vector, but mmembed stores named vectors; "
                "use a new collection name"
            )
        for name, p in params.items():
            if p.distance != models.Distance.COSINE:
                raise StoreError(
                    f"vector {name!r} in collection {self.collection!r} uses {p.distance.value} distance, not cosine; "
                    "use a new collection name"
                )
        return {_unwire(name): p.size for name, p in params.items()}

    def _load(self) -> None:
        pass

    def _build_index(self) -> None:
        """A Qdrant server's optimizers index segments by themselves as they grow."""

    def _create(self, vectors: dict[str, int]) -> None:
        self.client.create_collection(
            self.collection,
            vectors_config={
                _wire(name): models.VectorParams(size=dim, distance=models.Distance.COSINE)
                for name, dim in vectors.items()
            },
            hnsw_config=models.HnswConfigDiff(m=self.index.m, ef_construct=self.index.ef_construct),
            quantization_config=(
                models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8))
                if self.index.quantization == "int8"
                else None
            ),
        )

    def _create_index(self, field_name: str, kind: str) -> None:
        self.client.create_payload_index(self.collection, field_name, _CLIENT_INDEX[kind], wait=True)

    def flush(self) -> None:
        """Nothing to do: every write waits for the server (``wait=True``), which keeps it in its own log."""

    def _insert(self, points: list[Point]) -> None:
        structs = [models.PointStruct(id=p.id, vector=_wired(p.vectors), payload=p.payload) for p in points]
        self.client.upsert(self.collection, structs, wait=True)

    def _merge(self, points: list[Point]) -> None:
        operations: list[models.UpdateOperation] = []
        with_vectors = [models.PointVectors(id=p.id, vector=_wired(p.vectors)) for p in points if p.vectors]
        if with_vectors:
            operations.append(models.UpdateVectorsOperation(update_vectors=models.UpdateVectors(points=with_vectors)))
        operations.extend(
            models.SetPayloadOperation(set_payload=models.SetPayload(payload=p.payload, points=[p.id]))
            for p in points
            if p.payload
        )
        # One request for the whole batch, so a server sees one round trip.
        if operations:
            self.client.batch_update_points(self.collection, operations, wait=True)

    def _retrieve(self, ids: list[str], with_vectors: bool, fields: list[str] | None) -> list[Point]:
        records = self.client.retrieve(
            self.collection, ids, with_payload=_with_payload(fields), with_vectors=with_vectors
        )
        return [Point(str(r.id), _unwired(r.vector or {}), r.payload or {}) for r in records]

    def _delete(self, ids: list[str]) -> None:
        self.client.delete(self.collection, points_selector=models.PointIdsList(points=ids), wait=True)

    def _search(
        self,
        vector_name: str,
        vector: list[float],
        top_k: int,
        threshold: float | None,
        conditions: list[_Condition],
        offset: int,
    ) -> list[Hit]:
        response = self.client.query_points(
            self.collection,
            query=vector,
            using=_wire(vector_name),
            query_filter=_client_filter(conditions),
            limit=top_k,
            offset=offset,
            score_threshold=threshold,
            with_payload=True,
            search_params=models.SearchParams(hnsw_ef=self.index.ef) if self.index.ef else None,
        )
        return [Hit(str(p.id), p.score, p.payload or {}) for p in response.points]

    def _fuse(
        self,
        queries: dict[str, list[float]],
        top_k: int,
        threshold: float | None,
        conditions: list[_Condition],
        offset: int,
        fusion: Fusion,
        candidates: int,
    ) -> list[Hit]:
        params = models.SearchParams(hnsw_ef=self.index.ef) if self.index.ef else None
        prefetch = [
            models.Prefetch(
                query=vector,
                using=_wire(name),
                filter=_client_filter(conditions),
                score_threshold=threshold,
                limit=candidates,
                params=params,
            )
            for name, vector in queries.items()
        ]
        response = self.client.query_points(
            self.collection,
            prefetch=prefetch,
            query=models.FusionQuery(fusion=models.Fusion.RRF if fusion == "rrf" else models.Fusion.DBSF),
            query_filter=_client_filter(conditions),
            limit=top_k,
            offset=offset,
            with_payload=True,
        )
        return [Hit(str(p.id), p.score, p.payload or {}) for p in response.points]

    def _count(self, conditions: list[_Condition]) -> int:
        return self.client.count(self.collection, count_filter=_client_filter(conditions), exact=True).count

    def _iter_ids(self, conditions: list[_Condition]) -> Iterator[str]:
        offset = None
        while True:
            records, offset = self.client.scroll(
                self.collection,
                scroll_filter=_client_filter(conditions),
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=False,
                with_vectors=False,
            )
            yield from (str(r.id) for r in records)
            if offset is None:
                return


def open_store(config: VectorsConfig) -> VectorStore:
    """The configured backend, not yet opened: embedded Qdrant Edge unless a Qdrant URL (or ':memory:') is set."""
    if config.qdrant_url is None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", config.collection):
            raise StoreError(
                f"collection name {config.collection!r} must be letters, digits, '.', '_' or '-' "
                "(it names a folder under the vectors directory)"
            )
        return EdgeStore(config.path / config.collection, config.index)
    if config.qdrant_url == ":memory:":
        # The client's local mode always searches exactly (and warns at every search given a beam).
        return ClientStore(QdrantClient(location=":memory:"), config.collection, replace(config.index, ef=0))
    client = QdrantClient(url=config.qdrant_url, api_key=config.qdrant_api_key)
    return ClientStore(client, config.collection, config.index)
