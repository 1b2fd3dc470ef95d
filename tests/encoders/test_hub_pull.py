"""`mmembed models pull` through the real ``huggingface_hub`` download code, against a local
Hugging Face-compatible endpoint (``HF_ENDPOINT``, tests/hub_server.py) serving repos the test
builds: the repo open_clip's ``ViT-B-32@laion2b_s34b_b79k`` tag names (ViT-B-32 weights, random
here), an open_clip repo (config, weights), one whose config names a SigLIP-style tokenizer
(its files in the repo), a transformers CLIP, and sentence-transformers models with prompts by both
of their names (``sentence-transformers/NAME``, ``st:ORG/NAME``). The pulled models, loaded offline
by name, give the reference libraries' own vectors for the files served, an over-long text
(truncated) included, and a search ``Query`` gets the query prompt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from hf_clip_folder import write_hf_clip
from hub_server import hub
from sentence_transformers import SentenceTransformer
from test_tokenizers import write_siglip_style
from transformers import CLIPModel, CLIPTokenizer

from mmembed.config import Settings
from mmembed.contracts import Query
from mmembed.encoders import LoadedModel, load

pytestmark = pytest.mark.subprocess  # `mmembed models pull` runs as a user runs it

TEXTS = ["a red circle", "two small blue squares in the top left", "word " * 300]


def _prompted(minilm: LoadedModel, folder: Path, prompts: dict[str, str], default: str | None) -> Path:
    shutil.copytree(minilm.weights, folder)
    config = folder / "config_sentence_transformers.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prompts": prompts, "default_prompt_name": default}))
    return folder


def _vit_b32_repo(folder: Path) -> tuple[Path, torch.nn.Module]:
    """What the tag's repo holds for open_clip (its safetensors weights), with random values."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder, model


def _reference(model: torch.nn.Module, tokenizer: object) -> np.ndarray:
    with torch.inference_mode():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(TEXTS)), dim=-1).numpy()  # type: ignore[operator]


def _vectors(model: LoadedModel, texts: list[str] = TEXTS) -> np.ndarray:
    return np.stack([r.vector for r in model.encoder("text").encode_items(texts)])


def test_models_pull_downloads_through_the_hub_code_and_loads_what_the_references_load(
    demo_clip: LoadedModel, minilm: LoadedModel, settings: Settings, tmp_path: Path
) -> None:
    vit_folder, vit = _vit_b32_repo(tmp_path / "vit-b-32")
    vit_repo = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].strip("/")
    repos = {
        vit_repo: vit_folder,
        "test-org/tiny-openclip": Path(demo_clip.weights),
        "test-org/tiny-siglip": write_siglip_style(Path(demo_clip.weights), Path(minilm.weights), tmp_path / "sig"),
        "test-org/tiny-clip": write_hf_clip(tmp_path / "served-clip"),
        "sentence-transformers/tiny-prompted": _prompted(
            minilm, tmp_path / "served-st", {"query": "query: ", "document": "passage: "}, "document"
        ),
        "test-org/tiny-e5": _prompted(
            minilm, tmp_path / "served-e5", {"query": "query: ", "passage": "passage: "}, None
        ),
    }
    names = [
        "ViT-B-32@laion2b_s34b_b79k",
        "hf-hub:test-org/tiny-openclip",
        "hf-hub:test-org/tiny-siglip",
        "test-org/tiny-clip",
        "sentence-transformers/tiny-prompted",
        "st:test-org/tiny-e5",
    ]
    models_dir = tmp_path / "models"
    with hub(repos) as (endpoint, requests):
        environment = os.environ | {
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf-home"),
            "MMEMBED_DATA_DIR": str(tmp_path / "data"),
            "MMEMBED_MODELS_DIR": str(models_dir),
            "MMEMBED_ALLOW_DOWNLOADS": "1",
        }
        done = subprocess.run(
            [sys.executable, "-m", "mmembed.cli", "models", "pull", *names],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.count("pulled") == len(names)
    for repo, folder in repos.items():  # every file came through resolve URLs of the endpoint
        for file in (p for p in folder.rglob("*") if p.is_file()):
            assert any(r.startswith(f"GET /{repo}/resolve/") and r.endswith(file.name) for r in requests), file

    offline = settings.model_copy(update={"models_dir": models_dir}).models_config()
    pulled = {name: load(name, offline) for name in names}

    np.testing.assert_allclose(
        _vectors(pulled[names[0]]), _reference(vit, open_clip.get_tokenizer("ViT-B-32")), atol=1e-5
    )
    for name, repo in zip(names[1:3], ["test-org/tiny-openclip", "test-org/tiny-siglip"], strict=True):
        local = f"local-dir:{repos[repo]}"
        expected = _reference(open_clip.create_model(local).eval(), open_clip.get_tokenizer(local))
        np.testing.assert_allclose(_vectors(pulled[name]), expected, atol=1e-5)

    clip = CLIPModel.from_pretrained(repos["test-org/tiny-clip"]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(repos["test-org/tiny-clip"])
    ids = tokenizer(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.inference_mode():
        features = clip.get_text_features(**ids)
        features = features.pooler_output if hasattr(features, "pooler_output") else features
    np.testing.assert_allclose(_vectors(pulled[names[3]]), torch.nn.functional.normalize(features, dim=-1), atol=1e-5)

    for name, repo, query, document in [
        (names[4], "sentence-transformers/tiny-prompted", "query", "document"),
        (names[5], "test-org/tiny-e5", "query", "passage"),
    ]:
        st = SentenceTransformer(str(repos[repo]), device="cpu")
        documents = st.encode(TEXTS, prompt_name=document, normalize_embeddings=True)
        queries = st.encode(TEXTS, prompt_name=query, normalize_embeddings=True)
        np.testing.assert_allclose(_vectors(pulled[name]), documents, atol=1e-5)
        np.testing.assert_allclose(_vectors(pulled[name], [Query(t) for t in TEXTS]), queries, atol=1e-5)

    long = [model.encoder("text").encode_items(TEXTS[2:])[0].info for model in pulled.values()]
    assert all(info["truncated_tokens"] > 0 for info in long), long
