"""Every CLIP family tokenises with its library's own tokenizer: the ids our text towers feed the
model equal the reference library's, over-long texts included, for open_clip's CLIP BPE (demo-clip,
ViT-B-32), an open_clip model whose config names a SigLIP-style Hugging Face tokenizer (no start
token, an end token, its own pad id, canonicalised text), and transformers' CLIP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

from mmembed.config import Settings
from mmembed.encoders import LoadedModel, load

TEXTS = ["A red circle, in the TOP left!", "two small blue squares", "word " * 90]


def _padded(model: LoadedModel, texts: list[str]) -> torch.Tensor:
    encoder = model.encoder("text")
    rows = [encoder.preprocess(t).data for t in texts]
    out = torch.full((len(rows), encoder.limits.max_tokens), encoder._tokens.pad, dtype=torch.long)
    for n, row in enumerate(rows):
        out[n, : len(row)] = torch.tensor(row)
    return out


def write_siglip_style(demo_clip: Path, minilm: Path, model_dir: Path) -> Path:
    """demo-clip's weights with a config naming a SigLIP-style Hugging Face tokenizer, whose files
    the folder carries as a hub repo does: WordPiece over MiniLM's vocabulary, no start token,
    "[SEP]" appended as the end token, "[PAD]" (id 0) padding, canonicalised text."""
    wordpiece = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    wordpiece.post_processor = TemplateProcessing(single="$A [SEP]", special_tokens=[("[SEP]", 102)])
    wordpiece.no_truncation()
    wordpiece.no_padding()
    hf = PreTrainedTokenizerFast(tokenizer_object=wordpiece, eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    shutil.copytree(demo_clip, model_dir)
    hf.save_pretrained(model_dir)
    config = json.loads((model_dir / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"] |= {
        "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",  # as SigLIP's config says; a folder reads its own files
        "tokenizer_kwargs": {"clean": "canonicalize"},
    }
    (model_dir / "open_clip_config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def siglip_style(
    demo_clip: LoadedModel, minilm: LoadedModel, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> LoadedModel:
    folder = write_siglip_style(Path(demo_clip.weights), Path(minilm.weights), tmp_path_factory.mktemp("s") / "m")
    return load(f"local-dir:{folder}", settings.models_config())


@pytest.mark.parametrize("fixture", ["demo_clip", "vit_b32", "siglip_style"])
def test_open_clip_families_send_the_ids_open_clips_tokenizer_makes(request: pytest.FixtureRequest, fixture: str):
    model: LoadedModel = request.getfixturevalue(fixture)
    name = "ViT-B-32" if fixture == "vit_b32" else f"local-dir:{model.weights}"
    reference = open_clip.get_tokenizer(name)
    assert torch.equal(_padded(model, TEXTS), reference(TEXTS))
    long = model.encoder("text").encode_items([TEXTS[2]])[0]
    assert long.info["truncated_tokens"] > 0 and long.info["tokens"] == reference.context_length


def test_a_siglip_style_tokenizer_has_no_start_token_and_matches_open_clips_text_tower(siglip_style: LoadedModel):
    ids = siglip_style.encoder("text").preprocess("red circle").data
    assert ids[-1] == 102 and ids[0] != 101  # the end token only
    model = open_clip.create_model(f"local-dir:{siglip_style.weights}").eval()
    reference = open_clip.get_tokenizer(f"local-dir:{siglip_style.weights}")(TEXTS)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model.encode_text(reference), dim=-1).numpy()
    ours = np.stack([r.vector for r in siglip_style.encoder("text").encode_items(TEXTS)])
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_transformers_clip_sends_the_ids_its_tokenizer_makes(settings: Settings, tmp_path: Path) -> None:
    from hf_clip_folder import write_hf_clip

    folder = write_hf_clip(tmp_path / "hf-clip")
    model = load(f"hf-clip:{folder}", settings.models_config())
    reference = CLIPTokenizer.from_pretrained(folder)(
        TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )["input_ids"]
    assert torch.equal(_padded(model, TEXTS), reference)
