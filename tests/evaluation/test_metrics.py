"""Ranking metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from mmembed.evaluation.metrics import ndcg_at_k, recall_at_k, reciprocal_rank

RANKED = ["a", "b", "c", "d", "e"]


def test_recall_counts_relevant_items_in_the_top_k_capped_at_k():
    relevant = {"b", "d"}
    assert [recall_at_k(RANKED, relevant, k) for k in (1, 2, 3, 4, 5)] == [0.0, 0.5, 0.5, 1.0, 1.0]
    # Three relevant items, k=1: one hit in the top 1 is full recall at 1.
    assert recall_at_k(["x", "y"], {"x", "y", "z"}, 1) == 1.0


def test_reciprocal_rank_is_one_over_the_first_hit():
    assert reciprocal_rank(RANKED, {"c", "e"}) == pytest.approx(1 / 3)
    assert reciprocal_rank(RANKED, {"z"}) == 0.0


def test_ndcg_against_a_hand_computed_value():
    # Hits at ranks 2 and 4: DCG = 1/log2(3) + 1/log2(5); ideal = 1 + 1/log2(3).
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(RANKED, {"b", "d"}, 5) == pytest.approx(expected)
    assert expected == pytest.approx(0.6509, abs=1e-4)
    assert ndcg_at_k(RANKED, {"a"}, 10) == 1.0


def test_a_query_without_relevant_items_is_an_error():
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k(RANKED, set(), 5)
