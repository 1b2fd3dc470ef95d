"""transformers' CLIP, from a local folder. No CLIP weights exist offline, so the folder
holds a small randomly initialised CLIPModel with OpenAI's real tokenizer (rebuilt from
the BPE vocabulary that ships with open_clip) and a real CLIPImageProcessor."""

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from hf_clip_folder import write_hf_clip
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from mmembed.config import Settings
from mmembed.encoders import LoadedModel, load


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_clip(tmp_path_factory.mktemp("hf-clip"))


@pytest.fixture(scope="module")
def hf_clip(hf_folder: Path, settings: Settings) -> LoadedModel:
    return load(f"hf-clip:{hf_folder}", settings.models_config())


def test_shape_and_limits(hf_clip: LoadedModel) -> None:
    image, text = hf_clip.encoder("image"), hf_clip.encoder("text")
    assert (image.dim, text.dim, image.limits.image_size, text.limits.max_tokens) == (48, 48, 32, 77)


def test_tokens_match_open_clip(hf_clip: LoadedModel) -> None:
    prepared = hf_clip.encoder("text").preprocess("A red circle, in the TOP left!")
    expected = open_clip.SimpleTokenizer()(["A red circle, in the TOP left!"])[0]
    assert prepared.data == expected[: len(prepared.data)].tolist()


def test_vectors_match_the_transformers_reference(hf_clip: LoadedModel, hf_folder: Path) -> None:
    model = CLIPModel.from_pretrained(hf_folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(hf_folder)
    processor = CLIPImageProcessor.from_pretrained(hf_folder)
    texts = ["a red circle", "a large blue square in the top left"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    with torch.inference_mode():
        ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        ref_text = model.get_text_features(input_ids=ids).pooler_output
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        ref_image = model.get_image_features(pixel_values=pixels).pooler_output
    ref_text = torch.nn.functional.normalize(ref_text, dim=-1).numpy()
    ref_image = torch.nn.functional.normalize(ref_image, dim=-1).numpy()
    ours_text = np.stack([r.vector for r in hf_clip.encoder("text").encode_items(texts)])
    [ours_image] = hf_clip.encoder("image").encode_items([image])
    np.testing.assert_allclose(ours_text, ref_text, atol=1e-5)
    assert float(ours_image.vector @ ref_image[0]) > 0.99  # same view; resampling differs by rounding only


def test_the_traced_text_tower_matches_the_reference_at_every_batch_shape(
    hf_clip: LoadedModel, hf_folder: Path
) -> None:
    """On CPU the text tower runs as a traced graph (``trace_text``); a trace bakes in the shapes it
    ran on, so batches of one text, of very different lengths and at the context must still match
    transformers' own forward."""
    encoder = hf_clip.encoder("text")
    assert isinstance(encoder._forward, torch.jit.ScriptModule)
    model = CLIPModel.from_pretrained(hf_folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(hf_folder)
    texts = ["red", "a large blue square in the top left of a small green triangle", "circle " * 90, "two"]
    for batch in (texts, texts[:1], texts[1:3], texts[3:]):
        with torch.inference_mode():
            ids = tokenizer(batch, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
            reference = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
        reference = torch.nn.functional.normalize(reference, dim=-1).numpy()
        ours = np.stack([r.vector for r in encoder.encode_items(batch)])
        np.testing.assert_allclose(ours, reference, atol=1e-5)
