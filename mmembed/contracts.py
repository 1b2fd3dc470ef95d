"""The typed objects that cross a module or a Ray boundary, in one place.

Every layer may import this module and it imports none of them: an encoder deployment, the
HTTP layer, the catalogue replica and the bulk engines agree on these shapes instead of on
the keys of loose dicts. They are plain dataclasses, so Ray pickles them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Query(str):
    """A search query's text, as opposed to a text being stored (a document). Text models that
    name a query prompt in their configuration (e5's "query: ", bge's instruction, nomic's
    "search_query: ") put it before a ``Query`` and their document prompt before any other text;
    every other encoder reads it as the plain text it is. A ``str`` so it crosses the HTTP layer,
    Ray and the batch queue unchanged; the embedding cache keys it apart from the same text
    stored (``store.cache.cache_key``)."""

    __slots__ = ()


@dataclass(frozen=True)
class ItemError:
    """Why one item was refused; ``code`` is stable for APIs and the dead-letter store."""

    code: str
    message: str


@dataclass
class EncodedItem:
    """One item through one model's encoder for one modality: what an encoder deployment
    answers per item. ``info`` is what the encoder reported (tokens, truncated, seconds,
    transcript); the timing fields are the serving path's."""

    vector: np.ndarray | None
    error: ItemError | None = None
    info: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    batch_size: int | None = None
    queue_ms: float = 0.0
    encode_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def transcript(self) -> str | None:
        return self.info.get("transcript")


@dataclass
class ItemVectors:
    """An item after every model has seen it: its named vectors (``model.modality``) and,
    for speech, the transcript that was embedded."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    transcript: str | None = None
    # The weights version of each model that gave a vector, stored with the item: what lets the cache be
    # warmed from the collection without serving a retrained model's vectors under the old weights' keys.
    versions: dict[str, str] = field(default_factory=dict)


# One item after the embedding step: its vectors, or why it failed.
ItemOutcome = ItemVectors | ItemError


@dataclass(frozen=True)
class EncoderInfo:
    name: str  # the vector space's name, e.g. demo-clip.image
    dim: int
    limits: dict[str, Any]


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, as the encoder deployments report it to the HTTP layer and the
    catalogue: no tensors, only what routing and the API need."""

    name: str
    space: str  # the model whose vector space its vectors live in (see ModelSpec.space)
    family: str
    device: str
    dtype: str
    encoders: dict[str, EncoderInfo]  # by modality
    transcribes: bool = False  # answers a transcript with each audio vector
    cacheable: bool = True  # same content, same vector: the embedding cache may answer for it
    version: str = ""  # the weights' version, part of every cache key (store.cache.cache_key)

    def native(self, modality: str) -> bool:
        """Its vectors of this modality are its own (not borrowed from another model's tower)."""
        return modality in self.encoders and (modality == "audio" or self.space == self.name)


@dataclass(frozen=True)
class ReplicaInfo:
    """Where one replica of a model runs, as Serve's controller knows it: what an operator of a
    cluster asks first after a node is lost."""

    model: str
    replica_id: str
    state: str  # Serve's ReplicaState: STARTING, RUNNING, STOPPING, ...
    node_id: str
    node_ip: str


@dataclass(frozen=True)
class QueryPlan:
    """How a search query reaches the vector it searches."""

    vector: str  # the named vector searched
    model: str  # the model that encodes the query
    modality: str  # what that model is given: the query's modality, or "text" for a transcript
    transcribe_with: str | None = None  # speech through its transcript: this model first


@dataclass(frozen=True)
class JobStarted:
    id: str


@dataclass(frozen=True)
class PathForbidden:
    """The source names local files outside the folders server jobs may read."""

    message: str


@dataclass(frozen=True)
class TooManyJobs:
    running: int


@dataclass(frozen=True)
class MigrationRefused:
    """A job that cannot start now: a migration's model is not served, other jobs write the collection,
    or a migration copies it."""

    message: str


JobStart = JobStarted | PathForbidden | TooManyJobs | MigrationRefused
MigrationStart = JobStarted | MigrationRefused


@dataclass(frozen=True)
class CatalogView:
    """What searches route by: the named vectors the served models have in the collection, and the
    collection's default vector per modality (what a model migration switches)."""

    vectors: dict[str, int]
    defaults: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredItem:
    """A catalogue item as the API shows it: its payload, where its object is, and its vectors
    when they were asked for (more-like-this searches with them)."""

    id: str
    payload: dict[str, Any]
    url: str | None  # None for a text item: its text is in the payload, there is no object
    vectors: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    payload: dict[str, Any]
    url: str | None  # None for a text item
    matched: dict[str, int] = field(default_factory=dict)  # a fused search's: the hit's rank in each vector's list


@dataclass(frozen=True)
class JobView:
    """A bulk job's record as the API and /metrics show it."""

    id: str
    source: str
    status: str  # planned | running | done | failed | interrupted; a server's watch: watching | stopped
    error: str | None
    progress: float  # share of its planned items finished (written or failed)
    items: dict[str, int]  # planned items by state
    counts: dict[str, Any]  # the plan's and the run's figures
    created: float
    updated: float


@dataclass(frozen=True)
class DeadLetter:
    """An item a job gave up on, with the reason; a rerun of the job tries it again."""

    job_id: str
    uri: str
    code: str
    reason: str
    attempts: int
    at: float


@dataclass
class Switched:
    """What the switch did: the defaults before and after, or why it waits."""

    switched: bool
    defaults: dict[str, str]
    previous: dict[str, str]
    waiting: str | None = None

    def lines(self) -> list[str]:
        if not self.switched:
            return [f"not switched: {self.waiting}"]
        moved = ", ".join(f"{m}: {self.previous.get(m, '-')} -> {v}" for m, v in sorted(self.defaults.items()))
        return [f"switched the default vectors ({moved}); `mmembed migrate --rollback` switches back"]
