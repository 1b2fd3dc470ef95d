"""Models only: pure torch, no Ray, no HTTP, no vector store.

from mmembed.encoders import load
clip = load("demo-clip")
vectors = clip.encoder("text").encode_items(["red circle"])
"""

from mmembed.encoders.base import (
    EmptyInput,
    Encoder,
    EncoderError,
    InputError,
    ItemResult,
    Limits,
    Modality,
    ModelNotAvailable,
    Prepared,
    TooManyTokens,
    UnknownModel,
)
from mmembed.encoders.provision import LoadedModel, is_provisioned, load, model_version, pull, register_model, verify
from mmembed.encoders.registry import CATALOGUE, ModelSpec, resolve

__all__ = [
    "CATALOGUE",
    "EmptyInput",
    "Encoder",
    "EncoderError",
    "InputError",
    "ItemResult",
    "Limits",
    "LoadedModel",
    "Modality",
    "ModelNotAvailable",
    "ModelSpec",
    "Prepared",
    "TooManyTokens",
    "UnknownModel",
    "is_provisioned",
    "load",
    "model_version",
    "pull",
    "register_model",
    "resolve",
    "verify",
]
