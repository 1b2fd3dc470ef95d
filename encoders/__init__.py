"""Models only: pure torch, no Ray, no HTTP, no vector store.

from mmembed.encoders import load
clip = load("demo-clip", settings.models_config())
vectors = clip.encoder("text").encode_items(["red circle"])

The names below are imported on first use (PEP 562), so ``mmembed.encoders.config`` (which
``mmembed.config`` imports) never pulls torch in with the package.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "base": (
        "EmptyInput",
        "Encoder",
        "EncoderError",
        "InputError",
        "ItemResult",
        "Limits",
        "Modality",
        "ModelNotAvailable",
        "Prepared",
        "TooManyTokens",
        "UnknownModel",
    ),
    "config": ("ModelsConfig", "RemoteModelConfig"),
    "families": ("FAMILIES", "Family", "register_family"),
    "provision": ("LoadedModel", "is_provisioned", "load", "model_version", "pull", "register_model", "verify"),
    "registry": ("CATALOGUE", "ModelSpec", "resolve"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "CATALOGUE",
    "FAMILIES",
    "EmptyInput",
    "Encoder",
    "EncoderError",
    "Family",
    "InputError",
    "ItemResult",
    "Limits",
    "LoadedModel",
    "Modality",
    "ModelNotAvailable",
    "ModelSpec",
    "ModelsConfig",
    "Prepared",
    "RemoteModelConfig",
    "TooManyTokens",
    "UnknownModel",
    "is_provisioned",
    "load",
    "model_version",
    "pull",
    "register_family",
    "register_model",
    "resolve",
    "verify",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
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
    from mmembed.encoders.config import ModelsConfig, RemoteModelConfig
    from mmembed.encoders.families import FAMILIES, Family, register_family
    from mmembed.encoders.provision import (
        LoadedModel,
        is_provisioned,
        load,
        model_version,
        pull,
        register_model,
        verify,
    )
    from mmembed.encoders.registry import CATALOGUE, ModelSpec, resolve
