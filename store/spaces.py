"""Which named vectors the served models give a catalogue item, and which model encodes a
query so that it lands in the space of the vector it searches.

A model's vectors live in its ``space`` (see ``ModelSpec.space``): demo-clip's own for
demo-clip, demo-clip's for bind's audio, MiniLM's for whisper-base's transcripts. An item
gets one vector per (model, modality) that the models produce natively: images from image
towers, audio from every audio model, captions and transcripts from text towers. Models
that only borrow another's space for a modality (bind's image tower is demo-clip's) add
nothing, so no vector is stored twice.

``described`` below is what each loaded model's ``describe()`` returns (``ModelInfo``), by
model name, in the order the models are configured.
"""

from __future__ import annotations

from collections.abc import Mapping

from mmembed.contracts import ModelInfo, QueryPlan
from mmembed.store.catalog import vector_name

__all__ = [
    "Described",
    "QueryPlan",
    "RoutingError",
    "default_vector",
    "item_encoders",
    "layout",
    "plan_query",
    "transcriber",
]

Described = dict[str, ModelInfo]


class RoutingError(ValueError):
    """A search or an item the served models cannot handle; the message says what to serve."""


def layout(described: Described) -> dict[str, int]:
    """Every named vector the served models produce, with its dimension."""
    return {
        vector_name(name, modality): enc.dim
        for name, info in described.items()
        for modality, enc in info.encoders.items()
        if info.native(modality)
    }


def item_encoders(described: Described, kind: str) -> list[tuple[str, str]]:
    """(model, modality) pairs that encode an item of this kind ("image", "audio" or "text"),
    and the text towers that embed an image's caption or a recording's transcript."""
    direct = [(name, kind) for name, info in described.items() if info.native(kind)]
    if kind == "text":  # the text is the item: its towers are its direct encoders
        return direct
    text = [(name, "text") for name, info in described.items() if info.native("text")]
    return direct + text


def transcriber(described: Described) -> str | None:
    """The first served model that answers a transcript with its audio vector."""
    return next((name for name, info in described.items() if info.transcribes), None)


def default_vector(described: Described, vectors: dict[str, int], defaults: Mapping[str, str] | None = None) -> str:
    """Searches go to images unless told otherwise: the collection's default image vector (what a model
    migration switches, ``CollectionState.defaults``), else the first image vector served."""
    chosen = (defaults or {}).get("image")
    if chosen is not None and chosen in vectors:
        return chosen
    for name in vectors:
        if name.endswith(".image"):
            return name
    if not vectors:
        raise RoutingError("no model that stores vectors is served")
    return next(iter(vectors))


def plan_query(
    described: Described,
    vectors: dict[str, int],
    modality: str,
    vector: str | None,
    via: str | None,
    route: str,
    defaults: Mapping[str, str] | None = None,
) -> QueryPlan:
    """Pick the encoder for a query. ``via`` names it explicitly; ``route`` is "direct" (the
    query's own modality) or "transcript" (speech: transcribe, then embed the words)."""
    vector = vector or default_vector(described, vectors, defaults)
    if vector not in vectors:
        raise RoutingError(f"no vector {vector!r} in this catalogue; it has {sorted(vectors)}")
    owner = vector.rsplit(".", 1)[0]
    space = described[owner].space
    if route == "transcript":
        if modality != "audio":
            raise RoutingError("route 'transcript' is for audio queries")
        whisper = via or transcriber(described)
        if whisper is None or whisper not in described or not described[whisper].transcribes:
            raise RoutingError("the transcript route needs a whisper model served (e.g. whisper-base)")
        return QueryPlan(vector, space, "text", transcribe_with=whisper)
    if via is not None:
        candidates = [via] if via in described else []
        if not candidates:
            raise RoutingError(f"model {via!r} is not served here; served: {sorted(described)}")
    else:
        # The vector's own model first, then its space's, then any model in that space.
        candidates = list(dict.fromkeys([owner, space, *described]))
    for name in candidates:
        info = described[name]
        if modality in info.encoders and info.space == space:
            return QueryPlan(vector, name, modality)
    raise RoutingError(
        f"no served model encodes a {modality} query into the space of {vector!r} ({space})"
        + (f"; {via!r} is in {described[via].space}'s space or lacks {modality}" if via else "")
    )
