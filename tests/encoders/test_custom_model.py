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
    model = load("my-joint", settings)
    [vec] = model.encoder("text").encode_items(["a red circle"])
    assert vec.vector.shape == (128,) and np.isfinite(vec.vector).all()


def test_encoders_of_different_sizes_are_refused(settings: Settings, demo_clip: LoadedModel, minilm, cleanup):
    cleanup.append("bad-joint")
    mixed = {Modality.IMAGE: demo_clip.encoder("image"), Modality.TEXT: minilm.encoder("text")}
    register_model(ModelSpec("bad-joint", "custom", "random", ""), lambda *args: mixed)
    with pytest.raises(EncoderError, match="must share one vector size"):
        load("bad-joint", settings)


def test_registering_needs_a_new_name_and_the_custom_family():
    with pytest.raises(EncoderError, match="already registered"):
        register_model(ModelSpec("demo-clip", "custom", "random", ""), lambda *args: {})
    with pytest.raises(EncoderError, match="family='custom'"):
        register_model(ModelSpec("x", "open_clip", "random", ""), lambda *args: {})
