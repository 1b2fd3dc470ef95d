"""all-MiniLM-L6-v2 from its PyPI wheel, checked against sentence-transformers itself."""

import numpy as np
from sentence_transformers import SentenceTransformer

from mmembed.config import Settings
from mmembed.encoders import LoadedModel, TooManyTokens, load


def test_matches_sentence_transformers(minilm: LoadedModel) -> None:
    texts = ["a cat sits on the mat", "the stock market fell sharply today", "short"]
    reference = SentenceTransformer(str(minilm.weights), device="cpu").encode(texts, normalize_embeddings=True)
    ours = np.stack([r.vector for r in minilm.encoder("text").encode_items(texts)])
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_paraphrases_are_closer_than_unrelated_text(minilm: LoadedModel) -> None:
    a, b, c = (
        r.vector
        for r in minilm.encoder("text").encode_items(
            ["a cat sits on the mat", "a kitten is sitting on a rug", "quarterly revenue beat expectations"]
        )
    )
    assert a @ b > 0.5 > a @ c


def test_limit_is_the_models_max_sequence_length(minilm: LoadedModel, settings: Settings) -> None:
    text = minilm.encoder("text")
    assert text.dim == 384 and text.limits.max_tokens == 256
    [long] = text.encode_items(["word " * 300])
    assert long.info == {"tokens": 256, "truncated_tokens": 302 - 256}
    strict = load("all-MiniLM-L6-v2", settings.model_copy(update={"token_policy": "error"}).models_config())
    [refused] = strict.encoder("text").encode_items(["word " * 300])
    assert isinstance(refused.error, TooManyTokens) and refused.error.tokens == 302
