"""bf16, what ``precision: auto`` picks on a CPU with native bf16 (and on CUDA): its vectors against
fp32's. The rest of the suite pins fp32 (tests/conftest.py) so that paths can be compared exactly;
this file holds the default precision to its documented cosine."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from mmembed.config import Settings
from mmembed.encoders import Modality, load

TEXTS = ["red circle", "a small blue square in the top left", "yellow star beside a green triangle", "cat"]
COLOURS = [(200, 10, 10), (10, 10, 200), (240, 220, 20), (30, 160, 60)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("name", ["demo-clip", "all-MiniLM-L6-v2"])
def test_bf16_vectors_are_within_the_documented_cosine_of_fp32(settings: Settings, name: str) -> None:
    config = settings.models_config()
    fp32 = load(name, dataclasses.replace(config, precision="fp32"))
    bf16 = load(name, dataclasses.replace(config, precision="bf16"))
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    assert bf16.describe().dtype == "bfloat16"
    inputs = {Modality.TEXT: TEXTS, Modality.IMAGE: [Image.new("RGB", (90, 70), c) for c in COLOURS]}
    for modality, encoder in bf16.encoders.items():
        exact = np.stack([r.vector for r in fp32.encoder(modality).encode_items(inputs[modality])])
        results = encoder.encode_items(inputs[modality])
        assert all(r.vector.dtype == np.float32 for r in results)  # bf16 inside, float32 out
        batched = np.stack([r.vector for r in results])
        assert _cosines(batched, exact).min() >= 0.999, modality
        single = np.stack([encoder.encode_items([x])[0].vector for x in inputs[modality]])
        assert _cosines(single, batched).min() >= 0.999, modality  # a batch's company moves a vector this little
