"""all-MiniLM-L6-v2 from its PyPI wheel, checked against sentence-transformers itself."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from mmembed.config import Settings
from mmembed.encoders import LoadedModel, Modality, TooManyTokens, load
from mmembed.encoders import text as text_family


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


@pytest.mark.parametrize("include_prompt", [True, False])
def test_the_models_default_prompt_is_sent_as_sentence_transformers_sends_it(
    minilm: LoadedModel, tmp_path: Path, include_prompt: bool
) -> None:
    """e5, bge and nomic name prompts in their configuration; ``encode`` prepends the default one
    (and pooling may leave its tokens out). The same MiniLM weights, configured so, must agree."""
    folder = tmp_path / "prompted"
    shutil.copytree(minilm.weights, folder)
    config = folder / "config_sentence_transformers.json"
    settings = json.loads(config.read_text())
    config.write_text(
        json.dumps(
            settings | {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": "document"}
        )
    )
    pooling = folder / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps(json.loads(pooling.read_text()) | {"include_prompt": include_prompt}))
    texts = ["a cat sits on the mat", "the stock market fell sharply today", "word " * 300]
    reference = SentenceTransformer(str(folder), device="cpu").encode(texts, normalize_embeddings=True)
    encoder = text_family.load("prompted", folder, torch.device("cpu"), torch.float32, "truncate")[Modality.TEXT]
    results = encoder.encode_items(texts)
    np.testing.assert_allclose(np.stack([r.vector for r in results]), reference, atol=1e-5)
    unprompted = minilm.encoder("text").encode_items(texts[:1])[0].vector
    assert not np.allclose(results[0].vector, unprompted, atol=1e-3)  # the prompt was sent
    assert results[2].info["truncated_tokens"] > 0 and results[2].info["tokens"] == 256
