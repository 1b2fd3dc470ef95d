"""The collection's default vector per modality, switched by a model migration (``jobs.migrate``), and
the two operations on it that need no model: switching back, and freeing the old vectors."""

from __future__ import annotations

from mmembed.contracts import Switched
from mmembed.store.vectors import CollectionState, StoreError, VectorStore


class MigrationError(StoreError):
    """A migration that cannot start, switch, roll back or drop; the message says what to do."""


class MigrationRunning(StoreError):
    """A write the collection cannot take while a migration copies it into a new shard (embedded engine)."""


def effective_defaults(state: CollectionState, vectors: dict[str, int]) -> dict[str, str]:
    """The vector each modality's searches use: the collection's setting, else (never migrated) the
    first vector of that modality."""
    out: dict[str, str] = {}
    for name in vectors:
        out.setdefault(name.rpartition(".")[2], name)
    return out | {m: v for m, v in state.defaults.items() if v in vectors}


def rollback(store: VectorStore) -> Switched:
    """Switch the defaults back to what the last switch replaced (again: forward). One write."""
    state = store.state()
    if not state.previous:
        raise MigrationError("no switch to roll back: the collection was never migrated, or its old vectors went")
    gone = sorted(v for v in state.previous.values() if v not in store.vectors)
    if gone:
        raise MigrationError(f"the old vectors {gone} were dropped; there is nothing to switch back to")
    before = effective_defaults(state, store.vectors)
    state.defaults = state.defaults | state.previous
    state.previous = {m: before[m] for m in state.previous}
    store.save_state(state)
    return Switched(True, state.defaults, state.previous)


def drop_old(store: VectorStore) -> list[str]:
    """Free the vectors the last switch replaced (every vector of their models the defaults do not use);
    rollback is no longer possible."""
    state = store.state()
    if not state.previous:
        raise MigrationError("nothing to drop: no switch has replaced a vector (or they were dropped already)")
    in_use = set(effective_defaults(state, store.vectors).values())
    old_models = {v.rpartition(".")[0] for v in state.previous.values()}
    names = sorted(n for n in store.vectors if n.rpartition(".")[0] in old_models and n not in in_use)
    store.drop_vectors(names)
    state.previous = {}
    store.save_state(state)
    return names
