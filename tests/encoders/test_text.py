"""all-MiniLM-L6-v2 from its PyPI wheel, checked against sentence-transformers itself."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from mmembed.config import Settings
from mmembed.contracts import Query
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


PROMPTS = {  # (prompts, default_prompt_name) -> the prompt names a query and a document get
    "default document": (
        {"query": "Represent this sentence for searching relevant passages: ", "document": "passage: "},
        "document",
        "query",
        "document",
    ),
    "e5, no default": ({"query": "query: ", "passage": "passage: "}, None, "query", "passage"),
    "nomic": (
        {"search_query": "search_query: ", "search_document": "search_document: "},
        None,
        "search_query",
        "search_document",
    ),
    "one default for all": ({"clustering": "Cluster: "}, "clustering", "clustering", "clustering"),
}


def prompted(minilm: LoadedModel, folder: Path, prompts: dict[str, str], default: str | None, include: bool) -> Path:
    """MiniLM's weights configured with prompts, as e5, bge and nomic configure theirs."""
    shutil.copytree(minilm.weights, folder)
    config = folder / "config_sentence_transformers.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prompts": prompts, "default_prompt_name": default}))
    pooling = folder / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps(json.loads(pooling.read_text()) | {"include_prompt": include}))
    return folder


@pytest.mark.parametrize("include_prompt", [True, False])
@pytest.mark.parametrize("config", PROMPTS)
def test_queries_and_documents_get_the_prompts_sentence_transformers_sends_by_name(
    minilm: LoadedModel, tmp_path: Path, config: str, include_prompt: bool
) -> None:
    """A search ``Query`` gets the model's query prompt, any other text its document prompt, and
    the vectors are ``SentenceTransformer.encode(text, prompt_name=...)``'s, over-long texts
    (truncated) and batches mixing the two (pooling that leaves the prompt out) included."""
    prompts, default, query_name, document_name = PROMPTS[config]
    folder = prompted(minilm, tmp_path / "prompted", prompts, default, include_prompt)
    texts = ["a cat sits on the mat", "the stock market fell sharply today", "word " * 300]
    st = SentenceTransformer(str(folder), device="cpu")
    queries = st.encode(texts, prompt_name=query_name, normalize_embeddings=True)
    documents = st.encode(texts, prompt_name=document_name, normalize_embeddings=True)
    if default is not None:  # what encode sends unasked is what a stored text gets
        np.testing.assert_allclose(st.encode(texts, normalize_embeddings=True), documents, atol=1e-6)
    encoder = text_family.load("prompted", folder, torch.device("cpu"), torch.float32, "truncate")[Modality.TEXT]
    assert (encoder.query_prompt, encoder.document_prompt) == (query_name, document_name)

    mixed = encoder.encode_items([Query(texts[0]), texts[0], Query(texts[2]), texts[1], Query(texts[1]), texts[2]])
    ours = np.stack([r.vector for r in mixed])
    np.testing.assert_allclose(ours[[0, 4, 2]], queries, atol=1e-5)
    np.testing.assert_allclose(ours[[1, 3, 5]], documents, atol=1e-5)
    assert [r.info["prompt"] for r in mixed[:2]] == [query_name, document_name]
    assert mixed[2].info["truncated_tokens"] > 0 and mixed[2].info["tokens"] == 256
    unprompted = minilm.encoder("text").encode_items(texts[:1])[0].vector
    assert not np.allclose(ours[1], unprompted, atol=1e-3)  # the prompt was sent


def test_a_model_without_prompts_embeds_queries_as_it_embeds_documents(minilm: LoadedModel) -> None:
    text = minilm.encoder("text")
    query, document = text.encode_items([Query("a cat sits on the mat"), "a cat sits on the mat"])
    np.testing.assert_array_equal(query.vector, document.vector)
    assert "prompt" not in query.info and "prompt" not in document.info


def test_the_traced_forward_agrees_with_the_eager_one_at_every_batch_shape(
    minilm: LoadedModel, settings: Settings
) -> None:
    """On CPU the transformer runs as a frozen TorchScript graph (``trace_text``, on by default); a
    trace bakes in whatever shape checks it passed through, so batches of other sizes, lengths and
    padding, queries with their prompt and a text at the token limit must embed as eagerly."""
    traced = minilm.encoder("text")
    eager = load("all-MiniLM-L6-v2", replace(settings.models_config(), trace_text=False)).encoder("text")
    assert traced._graph is not None and eager._graph is None
    texts = ["a", "a red circle left of a blue square", Query("small green triangles"), "word " * 400, "two cats"]
    for batch in (texts, texts[:1], texts[1:3], texts[3:]):
        ours = np.stack([r.vector for r in traced.encode_items(batch)])
        reference = np.stack([r.vector for r in eager.encode_items(batch)])
        assert (ours * reference).sum(axis=1).min() > 0.99999


@pytest.mark.parametrize("failure", ["disagrees", "fails to trace"])
def test_a_model_whose_graph_would_differ_keeps_the_eager_forward(
    minilm: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """The check against the eager forward is what decides: a graph answering other vectors (here a
    constant) or a model the tracer cannot take leaves the eager forward, with a warning."""
    if failure == "disagrees":
        monkeypatch.setattr(torch.jit, "freeze", lambda graph: lambda *inputs: torch.ones_like(graph(*inputs)))
    else:
        monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("untraceable")))
    with caplog.at_level("WARNING"):
        assert text_family.traced_transformer(minilm.encoder("text")) is None
    assert "keeps its eager forward" in caplog.text


def test_a_model_whose_later_modules_read_more_than_the_token_embeddings_stays_eager(
    minilm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph gives only the token embeddings; a first module that also hands later modules its
    hidden states (``output_hidden_states``, which WeightedLayerPooling reads) is left eager."""
    encoder = minilm.encoder("text")
    monkeypatch.setattr(encoder._st[0].model.config, "output_hidden_states", True)
    assert text_family.traced_transformer(encoder) is None
