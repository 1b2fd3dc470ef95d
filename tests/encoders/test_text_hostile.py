"""Hostile texts through the text towers of demo-clip (open_clip's tokenizer) and
all-MiniLM-L6-v2 (a Hugging Face fast tokenizer): every item gets a unit vector or a typed
error, over-long text is truncated and says by how much, and one bad item never fails
the batch it came in."""

from __future__ import annotations

import numpy as np
import pytest
from hostile import DECODES, Hostile, hostile_texts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmembed.encoders.base import Encoder, InputError, ItemResult

TEXTS = hostile_texts()
GOOD = [
    Hostile("good_circle", "a red circle on a white background", frozenset({DECODES})),
    Hostile("good_dog", "a photo of a dog in the snow", frozenset({DECODES})),
]
Alone = dict[str, ItemResult | Exception]


@pytest.fixture(scope="module", params=["demo_clip", "minilm"])
def text_encoder(request: pytest.FixtureRequest) -> Encoder:
    return request.getfixturevalue(request.param).encoder("text")


@pytest.fixture(scope="module")
def alone(text_encoder: Encoder) -> Alone:
    """Each text encoded on its own, once per model: the result, or what encode_items raised."""
    results: Alone = {}
    for h in GOOD + TEXTS:
        try:
            [results[h.name]] = text_encoder.encode_items([h.data])
        except Exception as exc:  # reported by the test of that item, not as a fixture error
            results[h.name] = exc
    return results


def check(encoder: Encoder, h: Hostile, result: ItemResult) -> None:
    if result.error is not None:
        assert isinstance(result.error, InputError), f"{h.name}: {result.error!r} is not an InputError"
        assert result.error.code in h.codes, f"{h.name}: {result.error.code!r} not in {sorted(h.codes)}"
        assert result.vector is None
        return
    assert DECODES in h.codes, f"{h.name}: encoded, but expected one of {sorted(h.codes)}"
    vector = result.vector
    assert vector is not None and vector.shape == (encoder.dim,) and vector.dtype == np.float32
    assert np.isfinite(vector).all() and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4
    assert 2 <= result.info["tokens"] <= (encoder.limits.max_tokens or 0)


@pytest.mark.parametrize("h", TEXTS, ids=[h.name for h in TEXTS])
def test_each_hostile_text_gets_a_vector_or_a_typed_error(text_encoder: Encoder, alone: Alone, h: Hostile) -> None:
    result = alone[h.name]
    if isinstance(result, Exception):
        pytest.fail(f"encode_items([{h.name}]) raised {type(result).__name__}: {result}")
    check(text_encoder, h, result)


def test_over_long_text_is_truncated_and_says_so(text_encoder: Encoder, alone: Alone) -> None:
    assert text_encoder.policy == "truncate"  # type: ignore[attr-defined]  # the default token policy
    result = alone["one_megabyte"]
    assert isinstance(result, ItemResult) and result.ok
    assert result.info["tokens"] == text_encoder.limits.max_tokens
    assert result.info["truncated_tokens"] > 100_000  # 1 MB of words: ~200k tokens, all past the limit dropped


def test_one_bad_item_never_fails_the_batch(text_encoder: Encoder, alone: Alone) -> None:
    """Every hostile text in one call with good ones between them: each result is the one it
    gets alone (1e-5), padding and batch-mates notwithstanding."""
    items = [GOOD[0], *TEXTS[: len(TEXTS) // 2], GOOD[1], *TEXTS[len(TEXTS) // 2 :]]
    results = text_encoder.encode_items([h.data for h in items])
    assert len(results) == len(items)
    for h, result in zip(items, results, strict=True):
        check(text_encoder, h, result)
        single = alone[h.name]
        if isinstance(single, ItemResult) and single.ok and result.ok:
            np.testing.assert_allclose(result.vector, single.vector, atol=1e-5, err_msg=h.name)
            assert result.info == single.info
    assert all(results[items.index(g)].ok for g in GOOD)


# Any code point, and chunks of the rare troublemakers (lone surrogates, controls, format
# characters, combining marks, odd spaces), which a plain alphabet almost never draws.
ANY = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=16)
RARE = st.text(alphabet=st.characters(categories=["Cs", "Cc", "Cf", "Mn", "Zs"]), min_size=1, max_size=4)
ANY_TEXT = st.lists(ANY | RARE, max_size=4).map("".join)


# A forward pass costs ~0.5 s on a busy 2-core box whatever the batch: few calls, several texts each.
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ANY_TEXT, min_size=1, max_size=6))
def test_encode_items_never_raises_on_any_str(text_encoder: Encoder, texts: list[str]) -> None:
    results = text_encoder.encode_items(texts)
    assert len(results) == len(texts)
    for text, result in zip(texts, results, strict=True):
        codes = {"empty_input"} if not text.strip() else {DECODES, "invalid_input"}
        check(text_encoder, Hostile("generated", text, frozenset(codes)), result)
