"""The two request/response shapes remote embedding APIs speak, and each one's limits.

OpenAI-compatible (OpenAI, Azure OpenAI, vLLM, another mmembed server): ``POST {base}/embeddings``
with ``{"model", "input": [...]}``, answered ``{"data": [{"index", "embedding"}], "usage"}``.
Cohere: ``POST {base}/v1/embed`` with ``{"model", "texts", "input_type"}``, answered
``{"embeddings": {"float": [...]}}`` (or a bare list) and ``meta.billed_units.input_tokens``.

Only the shapes live here; sending, limits and retries are the client's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmembed.encoders.config import RemoteModelConfig


class BadResponse(Exception):
    """The provider answered 200 with something that is not the embeddings asked for."""


@dataclass(frozen=True)
class ProviderLimits:
    max_inputs: int  # inputs in one call
    max_tokens: int  # tokens in one input
    max_call_tokens: int  # tokens summed over one call's inputs


# OpenAI: 2,048 inputs and 300,000 tokens per request, 8,191 tokens per input.
# Cohere embed v3: 96 texts per call, 512 tokens per text (so 49,152 per call).
DEFAULT_LIMITS = {
    "openai": ProviderLimits(max_inputs=2048, max_tokens=8191, max_call_tokens=300_000),
    "cohere": ProviderLimits(max_inputs=96, max_tokens=512, max_call_tokens=96 * 512),
}


def limits(config: RemoteModelConfig) -> ProviderLimits:
    """The provider's limits, each narrowed (never widened) by the configuration."""
    base = DEFAULT_LIMITS[config.kind]
    return ProviderLimits(
        max_inputs=config.max_inputs or base.max_inputs,
        max_tokens=config.max_tokens or base.max_tokens,
        max_call_tokens=config.max_call_tokens or base.max_call_tokens,
    )


def endpoint(config: RemoteModelConfig) -> str:
    base = config.base_url.rstrip("/")
    return f"{base}/embeddings" if config.kind == "openai" else f"{base}/v1/embed"


def request_body(config: RemoteModelConfig, texts: list[str]) -> dict[str, Any]:
    if config.kind == "openai":
        return {"model": config.model, "input": texts, "encoding_format": "float"}
    # truncate NONE: inputs are already fitted to the limit here, and a silent cut would go unreported.
    return {
        "model": config.model,
        "texts": texts,
        "input_type": config.input_type,
        "embedding_types": ["float"],
        "truncate": "NONE",
    }


def parse_response(config: RemoteModelConfig, body: Any, count: int) -> tuple[list[list[float]], int | None]:
    """(one vector per input, in input order; the tokens the provider says it billed, or None)."""
    try:
        if config.kind == "openai":
            rows = sorted(body["data"], key=lambda d: d["index"])
            vectors = [row["embedding"] for row in rows]
            usage = body.get("usage") or {}
            billed = usage.get("prompt_tokens", usage.get("total_tokens"))
        else:
            embeddings = body["embeddings"]
            vectors = embeddings["float"] if isinstance(embeddings, dict) else embeddings
            billed = ((body.get("meta") or {}).get("billed_units") or {}).get("input_tokens")
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadResponse(f"unexpected {config.kind} response shape ({type(exc).__name__}: {exc})") from exc
    if len(vectors) != count:
        raise BadResponse(f"asked for {count} embeddings, got {len(vectors)}")
    return vectors, None if billed is None else int(billed)
