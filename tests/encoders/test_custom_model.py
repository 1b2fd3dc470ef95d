"""Plugging in a joint model the project has no family for (how a real ImageBind
checkpoint would come in): one Encoder per modality, checked to share one space."""

from __future__ import annotations

import numpy as np
import pytest

from mmembed.config import Settings
from mmembed.encoders import EncoderError, LoadedModel, Modality, ModelSpec, load, register_model
from mmembed.encoders.provision import CUSTOM_LOADERS
from mmembed.encoders.registry import CATALOGUE


@pytest.fixture
def cleanup():
    names: list[str] = []
    yield names
    for name in names:
        CATALOGUE.pop(name, None)
        CUSTOM_LOADERS.pop(name, None)


def test_a_registered_joint_model_loads_through_the_normal_path(settings: Settings, demo_clip: LoadedModel, cleanup):
    cleanup.append("my-joint")
    spec = ModelSpec("my-joint", "custom", "random", "", dim=128, modalities=(Modality.IMAGE, Modality.TEXT))
    register_model(spec, lambda spec, weights, device, dtype, settings: dict(demo_clip.encoders))
    model = load("my-joint", settings.models_config())
    [vec] = model.encoder("text").encode_items(["a red circle"])
    assert vec.vector.shape == (128,) and np.isfinite(vec.vector).all()


def test_encoders_of_different_sizes_are_refused(settings: Settings, demo_clip: LoadedModel, minilm, cleanup):
    cleanup.append("bad-joint")
    mixed = {Modality.IMAGE: demo_clip.encoder("image"), Modality.TEXT: minilm.encoder("text")}
    register_model(ModelSpec("bad-joint", "custom", "random", ""), lambda *args: mixed)
    with pytest.raises(EncoderError, match="must share one vector size"):
        load("bad-joint", settings.models_config())


def test_registering_needs_a_new_name_and_the_custom_family():
    with pytest.raises(EncoderError, match="already registered"):
        register_model(ModelSpec("demo-clip", "custom", "random", ""), lambda *args: {})
    with pytest.raises(EncoderError, match="family='custom'"):
        register_model(ModelSpec("x", "open_clip", "random", ""), lambda *args: {})


def test_a_new_family_registered_in_one_file_loads_by_name_and_through_the_catalogue(settings: Settings, cleanup):
    import toy_family

    from mmembed.contracts import ModelInfo
    from mmembed.encoders import FAMILIES, resolve

    assert FAMILIES["trigram"] is toy_family.FAMILY
    config = settings.models_config()
    model = load("trigram:64", config)  # the family's own name form
    first, again = (model.encoder("text").encode_items(["a red circle"])[0].vector for _ in range(2))
    assert first.shape == (64,) and np.allclose(first, again) and np.isclose(np.linalg.norm(first), 1.0)
    info = model.describe()
    assert isinstance(info, ModelInfo) and (info.family, info.space, info.cacheable, info.transcribes) == (
        "trigram",
        "trigram:64",
        True,
        False,
    )
    assert info.encoders["text"].dim == 64 and not resolve("trigram:64", config).is_remote

    cleanup.append("trigram-catalogued")
    register_model(ModelSpec("trigram-catalogued", "trigram", "random", "", dim=32, modalities=(Modality.TEXT,)))
    assert load("trigram-catalogued", config).encoder("text").dim == 32
    with pytest.raises(EncoderError, match="not registered"):
        register_model(ModelSpec("no-family", "siglip", "random", ""))


def test_every_family_answers_the_capabilities_the_serving_path_asks_for(settings: Settings):
    from mmembed.encoders import resolve

    config = settings.models_config()
    caps = {
        n: (s.space, s.cacheable, s.transcribes, s.is_remote)
        for n in ("whisper-base", "bind", "demo-clip")
        for s in [resolve(n, config)]
    }
    assert caps == {
        "whisper-base": ("all-MiniLM-L6-v2", False, True, False),
        "bind": ("demo-clip", True, False, False),
        "demo-clip": ("demo-clip", True, False, False),
    }
    assert resolve("openai:text-embedding-3-small", config).is_remote
