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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmembed.contracts import EncoderInfo, ModelInfo
from mmembed.encoders.base import Encoder, EncoderError, Modality, ModelNotAvailable
from mmembed.encoders.config import ModelsConfig
from mmembed.encoders.device import pick_device, pick_dtype
from mmembed.encoders.families import CUSTOM_LOADERS, FAMILIES, Load
from mmembed.encoders.registry import CATALOGUE, ModelSpec, resolve
from mmembed.loaders.audio import AudioLimits, Pcm

MARKER = "mmembed-model.json"


def model_dir(spec: ModelSpec, config: ModelsConfig) -> Path:
    return config.models_path / re.sub(r"[^\w.\-]+", "--", spec.store_as or spec.name)


def _marker(spec: ModelSpec, config: ModelsConfig) -> dict[str, Any] | None:
    path = model_dir(spec, config) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def is_provisioned(spec: ModelSpec, config: ModelsConfig) -> bool:
    own = spec.source in ("random", "local", "remote") or _current(spec, config)
    return own and all(is_provisioned(resolve(part, config), config) for part in spec.parts)


def _current(spec: ModelSpec, config: ModelsConfig) -> bool:
    """Pulled, and for weights shipped in this repository, pulled from the files it ships now:
    an upgrade that retrains demo-clip must not leave an older copy (and its vectors) in use."""
    marker = _marker(spec, config)
    if marker is None or spec.source != "shipped":
        return marker is not None
    shipped = {f"{marker['weights']}/{name}": digest for name, digest in _file_hashes(Path(spec.ref)).items()}
    return marker["files"] == shipped


def weights_path(spec: ModelSpec, config: ModelsConfig) -> Path | None:
    """The file or folder the family loader reads; None for random weights and remote models."""
    if spec.source in ("random", "remote"):
        return None
    if spec.source == "local":
        path = Path(spec.ref).expanduser()
        if not path.exists():
            raise ModelNotAvailable(f"model {spec.name!r}: local path {path} does not exist")
        return path
    marker = _marker(spec, config)
    if marker is None:
        raise ModelNotAvailable(_missing_message(spec, config))
    return model_dir(spec, config) / marker["weights"]


def _missing_message(spec: ModelSpec, config: ModelsConfig) -> str:
    where = model_dir(spec, config)
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


def pull(name: str, config: ModelsConfig, force: bool = False, from_path: Path | None = None) -> Path:
    """Provision one model into the models directory; returns its weights path.

    ``from_path`` adopts weights already on this machine (a checkpoint file or a hub
    snapshot folder copied from a machine with internet) instead of downloading them."""
    spec = resolve(name, config)
    for part in spec.parts:
        pull(part, config, force=force)
    if spec.source in ("random", "local", "remote"):  # nothing to fetch (remote: the provider has the weights)
        return weights_path(spec, config) or model_dir(spec, config)
    if is_provisioned(spec, config) and not force and from_path is None:
        return weights_path(spec, config)  # type: ignore[return-value]
    if spec.source == "hub" and from_path is None and not config.allow_downloads:
        raise ModelNotAvailable(_missing_message(spec, config))
    target = model_dir(spec, config)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    try:
        relative = _adopt(Path(from_path), target) if from_path else _fetch(spec, target)
    except Exception as exc:  # network, hub and file errors all end the same way for the user
        shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, EncoderError):
            raise
        raise ModelNotAvailable(f"{_missing_message(spec, config)}. Cause: {type(exc).__name__}: {exc}") from exc
    marker = {
        "name": spec.name,
        "family": spec.family,
        "source": spec.source,
        "ref": spec.ref,
        "tag": spec.tag,
        "weights": relative,
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "adopted_from": str(from_path) if from_path else None,
        "files": _file_hashes(target),
    }
    (target / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return target / relative


def model_version(spec: ModelSpec, config: ModelsConfig) -> str:
    """Changes whenever the weights do: the hash of the recorded file hashes (parts included,
    since a bind head is only valid with its backbone). Caches key on it, so a re-pulled or
    retrained model never serves another's vectors."""
    files = {}
    for name in (spec.name, *spec.parts):
        part = spec if name == spec.name else resolve(name, config)
        marker = model_dir(part, config) / MARKER
        files[name] = json.loads(marker.read_text())["files"] if marker.is_file() else [part.family, part.ref, part.tag]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _adopt(source: Path, target: Path) -> str:
    if source.is_dir():
        shutil.copytree(source, target / source.name)
    else:
        shutil.copy2(source, target / source.name)
    return source.name


def _fetch(spec: ModelSpec, target: Path) -> str:
    """Put the weights under ``target``; returns the weights path relative to it. Shipped
    weights are a folder of this repository whatever the family; the rest is the family's."""
    if spec.source == "shipped":
        shutil.copytree(spec.ref, target / spec.family)
        return spec.family
    fetch = spec.family_info.fetch
    if fetch is None:
        raise ModelNotAvailable(f"no way to fetch {spec.name!r} ({spec.family}, {spec.source})")
    return fetch(spec, target)


@dataclass
class LoadedModel:
    spec: ModelSpec
    encoders: dict[Modality, Encoder]
    device: torch.device
    dtype: torch.dtype
    weights: Path | None

    def describe(self) -> ModelInfo:
        """What a model is, as servers and jobs exchange it (plain data, no tensors)."""
        return ModelInfo(
            name=self.spec.name,
            space=self.spec.space,
            family=self.spec.family,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            encoders={str(m): EncoderInfo(e.name, e.dim, dict(vars(e.limits))) for m, e in self.encoders.items()},
            transcribes=self.spec.transcribes,
            cacheable=self.spec.cacheable,
        )

    def encoder(self, modality: Modality | str) -> Encoder:
        modality = Modality(modality)
        if modality not in self.encoders:
            raise EncoderError(f"model {self.spec.name!r} has no {modality} encoder (it has {list(self.encoders)})")
        return self.encoders[modality]


def load(name: str, config: ModelsConfig) -> LoadedModel:
    """Load a model's encoders, provisioning it first where that needs no network
    (or where downloads are allowed)."""
    spec = resolve(name, config)
    if not is_provisioned(spec, config):
        if not (spec.offline or config.allow_downloads):
            raise ModelNotAvailable(_missing_message(spec, config))
        pull(name, config)
    weights = weights_path(spec, config)
    device = pick_device(config.device)
    dtype = pick_dtype(device, config.precision)
    encoders = spec.family_info.load(spec, weights, device, dtype, config)
    dims = {str(m): e.dim for m, e in encoders.items()}
    if len(set(dims.values())) > 1:
        raise EncoderError(f"model {spec.name!r}: a joint model's encoders must share one vector size, got {dims}")
    if spec.dim is not None and set(dims.values()) - {spec.dim}:
        raise EncoderError(f"model {spec.name!r} produced vectors of sizes {dims}, the catalogue says {spec.dim}")
    return LoadedModel(spec, encoders, device, dtype, weights)


Loader = Load  # what ``register_model`` takes: (spec, weights, device, dtype, config) -> encoders by modality


def register_model(spec: ModelSpec, loader: Loader | None = None) -> None:
    """Add a model under a new name. With a ``loader``, a model this project has no family for,
    such as a real ImageBind checkpoint (one Encoder per modality, all the same ``dim``):
    ``spec.family`` must then be "custom" and ``spec.source`` is usually "local" (``ref`` is the
    weights path handed to the loader) or "random" (the loader needs no files). Without one, a
    model of a registered family (``encoders.families.register_family``), loaded by its family."""
    known = FAMILIES.get(spec.family)
    if loader is not None and not (known and known.per_model):
        raise EncoderError(f"register_model with a loader takes family='custom' specs, got {spec.family!r}")
    if loader is None and not (known and not known.per_model):
        raise EncoderError(f"model {spec.name!r}: family {spec.family!r} is not registered, or needs a loader")
    if spec.name in CATALOGUE:
        raise EncoderError(f"model {spec.name!r} is already registered")
    CATALOGUE[spec.name] = spec
    if loader is not None:
        CUSTOM_LOADERS[spec.name] = loader


def audio_limits(config: ModelsConfig) -> AudioLimits:
    return AudioLimits(max_seconds=config.max_audio_seconds, max_bytes=config.max_audio_bytes)


def verify(name: str, config: ModelsConfig) -> dict[str, Any]:
    """Files match their recorded hashes, the model loads, dimensions agree with the
    catalogue, and a real forward pass gives finite unit vectors. Raises on failure."""
    spec = resolve(name, config)
    report: dict[str, Any] = {"model": spec.name, "source": spec.source}
    marker = _marker(spec, config)
    if spec.source not in ("random", "local", "remote"):
        if marker is None:
            raise ModelNotAvailable(_missing_message(spec, config))
        actual = _file_hashes(model_dir(spec, config))
        bad = sorted(k for k, v in marker["files"].items() if actual.get(k) != v)
        if bad:
            raise EncoderError(f"model {spec.name!r}: files missing or changed since pull: {', '.join(bad[:5])}")
        report["files"] = len(actual)
    started = time.perf_counter()
    check = spec.family_info.verify
    if check is not None:
        report |= check(spec, weights_path(spec, config), config)  # type: ignore[arg-type]
    else:
        loaded = load(name, config)
        report["load_s"] = round(time.perf_counter() - started, 2)
        report["dims"] = {str(m): e.dim for m, e in loaded.encoders.items()}
        samples: dict[Modality, Any] = {
            Modality.TEXT: "a red circle",
            Modality.IMAGE: _probe_image(),
            Modality.AUDIO: _probe_audio(),
        }
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
