"""How one replica calls another: small calls over Serve's gRPC channel between replicas, large ones
as Ray actor calls, whose arguments and answers travel through Ray's object store.

Serve pickles a handle's options with it, so a handle that a replica receives carries the defaults
of the process that built the app. ``mmembed serve`` builds it in its own process, which imported
Serve before it set the data plane's environment: every call went as an actor call, even in the
throughput-optimized mode whose point is gRPC between replicas. ``serve deploy`` builds it in the
cluster, where those defaults may say gRPC for every call, and gRPC refuses a message over 4 MiB
(``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``): a large image would fail there. So the caller
chooses per call. Single MiniLM texts over gRPC, against actor calls (``bench/serve_probe.py``):
1.4x at concurrency 1 (p50 12.7 to 9.0 ms) and 1.3x at 8 and 32 (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

# Calls with more items go by reference, so answers stay far below gRPC's cap too: 64 vectors of
# 4,096 floats are 1 MiB.
GRPC_MAX_ITEMS = 64
# A quarter of gRPC's default cap, leaving room for pickling's overhead.
GRPC_MAX_BYTES = 1 << 20


def fits_grpc(items: Sequence[Any]) -> bool:
    """Whether a call with these items (texts and media bytes, as the ingress sends them) fits a gRPC
    message: a text is counted at its largest, 4 bytes a character; anything else goes by reference."""
    if len(items) > GRPC_MAX_ITEMS:
        return False
    size = 0
    for item in items:
        if isinstance(item, bytes):
            size += len(item)
        elif isinstance(item, str):
            size += 4 * len(item)
        else:
            return False
    return size <= GRPC_MAX_BYTES


@dataclass(frozen=True)
class Route:
    """One deployment, called either way; both handles share one router."""

    grpc: DeploymentHandle
    by_reference: DeploymentHandle

    @classmethod
    def to(cls, handle: DeploymentHandle) -> Route:
        return cls(handle.options(_by_reference=False), by_reference(handle))

    def for_items(self, items: Sequence[Any]) -> DeploymentHandle:
        return self.grpc if fits_grpc(items) else self.by_reference


def by_reference(handle: DeploymentHandle) -> DeploymentHandle:
    """For calls of any size (a job's batches of pixels, an item's image): through the object store."""
    return handle.options(_by_reference=True)
