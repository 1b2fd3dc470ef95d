"""Run-time device and precision choice, and the host-to-device path for image batches.

Images cross PCIe as uint8 (4x less traffic than float32) from pinned memory with a
non-blocking copy, and are scaled and normalised on the device in the model's dtype.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def pick_device(preference: str = "auto") -> torch.device:
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {preference!r} requested but CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: oneDNN runs bf16 matmuls in hardware there, 2-4.6x fp32 at a cosine
    to fp32 of 0.9999 (bench/results/cpu_forward.json). Without them bf16 is emulated and slower
    than fp32. Torch exposes the check only privately, hence the guarded lookups."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """auto: bf16 on CUDA where supported, else fp16; bf16 on a CPU with native bf16; else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def use_cpu_threads(threads: int | None = None, share: int = 1) -> int:
    """Torch's CPU threads for each thread of this process that runs forward passes: ``threads``, or
    the cores it may run on split ``share`` ways (one share per forward pass run at once). Ray starts
    a replica with OMP_NUM_THREADS set to its whole reserved CPUs (one for a 1-CPU replica), which
    halves a batched CPU forward on two cores however idle the other core is. Set per thread (a thread
    pool's initializer), since the value also becomes torch's default for threads that start later."""
    count = threads or max(1, len(os.sched_getaffinity(0)) // share)
    torch.set_num_threads(count)
    return count


class ImageToDevice:
    """uint8 NCHW host batch -> normalised tensor on the device, in the model's dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype, mean: Sequence[float], std: Sequence[float]) -> None:
        self.device, self.dtype = device, dtype
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        batch = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        if batch.dtype != torch.uint8:
            raise TypeError(f"image batches must be uint8, got {batch.dtype}")
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = (batch.float() - self.mean) / self.std
        return x.to(self.dtype)


def tokens_to_device(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return ids.pin_memory().to(device, non_blocking=True)
    return ids
