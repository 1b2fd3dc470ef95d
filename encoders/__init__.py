"""Models only: pure torch, no Ray, no HTTP, no vector store.

from encoders import load
clip = load("demo-clip")
vectors = clip.encoder("text").encode_items(["red circle"])
"""

from encoders.base import (
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
from encoders.provision import LoadedModel, is_provisioned, load, model_version, pull, register_model, verify
from encoders.registry import CATALOGUE, ModelSpec, resolve

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
