"""Ranking metrics over one query's ranked item ids and its set of relevant ids."""

from __future__ import annotations

import math
from collections.abc import Sequence


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Share of the relevant items found in the top k (1.0 when all of them are, or when k
    covers as many hits as there are relevant items: the usual definition caps at k)."""
    if not relevant:
        raise ValueError("a query needs at least one relevant item")
    hits = sum(1 for item in ranked[:k] if item in relevant)
    return hits / min(len(relevant), k)


def reciprocal_rank(ranked: Sequence[str], relevant: set[str]) -> float:
    return next((1.0 / (i + 1) for i, item in enumerate(ranked) if item in relevant), 0.0)


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Binary relevance: DCG of the top k over the DCG of a perfect ranking."""
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal
