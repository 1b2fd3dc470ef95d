"""Text forward passes as frozen TorchScript graphs on CPU, checked against the eager forward.

Why: an eager transformers or open_clip forward runs Python for every op and takes the GIL for
each, so in a serving replica, whose event loop holds the GIL while it handles requests, the
forward waits on it between ops and the cores sit idle. A traced graph runs in C++ without it,
and freezing lets oneDNN fuse its ops. Measured on 2 cores, sorted batches of 32 captions, bf16
(``bench/cpu_forward.py``, docs/models.md "Traced text towers"): MiniLM 1.16x the eager forward
alone and 1.23x beside a Python thread holding the GIL a quarter of the time; transformers' CLIP
ViT-B/32 text tower 1.09x and 1.17x. Left eager: image towers (a few large matmuls; the graph
measured 1.05x) and open_clip's text towers, whose ``nn.MultiheadAttention`` loses its fused
inference path in a trace (0.45x).

A trace records one run's ops and bakes in any Python decision on shapes or values it passed
through. So the graph is used only after it gave the eager forward's output on inputs of other
batch sizes, lengths and padding than the trace's; otherwise, or where tracing fails, the model
keeps its eager forward, with a warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import torch

Forward = Callable[..., torch.Tensor]

MIN_COSINE = 0.9999  # bf16's own distance from fp32 is 1e-4 (bench/results/cpu_forward.json)

# Texts text towers are traced and checked on: the checks' batch sizes, lengths and padding differ
# from the trace's, so a graph that baked in a shape or a mask branch disagrees there.
TRACE_TEXTS = ["a small red circle", "blue", "two large green squares on the left of a red triangle", "a cat"]
CHECK_TEXTS = [["red", "a square " * 12, "large blue triangles"], ["one text alone, so no padding"]]


class _Call(torch.nn.Module):
    """``forward`` as a module, with the model whose weights it reads as a submodule, so the trace
    sees them as the module's parameters and freezing can fold them."""

    def __init__(self, model: torch.nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model, self.call = model, forward

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.call(*inputs)


def as_graph(
    name: str,
    model: torch.nn.Module,
    forward: Forward,
    example: Sequence[torch.Tensor],
    checks: Sequence[Sequence[torch.Tensor]],
) -> Forward | None:
    """``forward`` (which reads ``model``'s weights) traced on ``example`` and frozen, or None for
    inputs off the CPU (measured there only), or where it does not trace or any of ``checks`` gives
    other outputs than eager (cosine < MIN_COSINE)."""
    if any(t.device.type != "cpu" for t in example):
        return None
    log = logging.getLogger(__name__)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's own warnings; the checks decide
            graph = torch.jit.freeze(torch.jit.trace(_Call(model, forward).eval(), tuple(example), check_trace=False))
            agreement = min(_cosine(graph(*inputs), forward(*inputs)) for inputs in checks)
    except Exception as exc:  # any failure leaves the eager forward, which works
        log.warning("%s keeps its eager forward: tracing failed (%s)", name, exc)
        return None
    if agreement < MIN_COSINE:
        log.warning("%s keeps its eager forward: its graph's cosine to it was %.5f", name, agreement)
        return None
    return graph


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The lowest cosine between matching rows (vectors, or each token's hidden state)."""
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())
