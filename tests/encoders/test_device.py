import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms.functional import normalize

from mmembed.encoders.clip import OPENAI_MEAN, OPENAI_STD
from mmembed.encoders.device import ImageToDevice, cpu_has_native_bf16, pick_device, pick_dtype


def test_device_is_chosen_at_run_time() -> None:
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device("auto").type == expected
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype(torch.device("cpu"), "fp32") == torch.float32
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert pick_dtype(torch.device("cuda"), "fp16") == torch.float16
    assert pick_dtype(torch.device("mps")) == torch.float32


def test_auto_precision_on_cpu_is_bf16_exactly_where_the_cpu_has_bf16_instructions() -> None:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert cpu_has_native_bf16() == native
    assert pick_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)


def test_asking_for_cuda_gives_cuda_or_a_clear_error() -> None:
    if torch.cuda.is_available():
        assert pick_device("cuda").type == "cuda"
        return
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_uint8_batches_are_normalised_on_the_device() -> None:
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = ImageToDevice(torch.device("cpu"), torch.float32, OPENAI_MEAN, OPENAI_STD)(list(images))
    reference = normalize(images.float() / 255.0, list(OPENAI_MEAN), list(OPENAI_STD))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        ImageToDevice(torch.device("cpu"), torch.float32, OPENAI_MEAN, OPENAI_STD)(images.float())


def test_a_process_started_with_one_omp_thread_runs_its_forward_on_every_core() -> None:
    # What Ray does to a 1-CPU replica: OMP_NUM_THREADS=1 before torch starts.
    code = (
        "import os, torch; from mmembed.encoders.device import use_cpu_threads; "
        "before = torch.get_num_threads(); n = use_cpu_threads(None); "
        "print(before, n, torch.get_num_threads(), len(os.sched_getaffinity(0)), use_cpu_threads(1), "
        "use_cpu_threads(None, share=2), use_cpu_threads(None, share=1000))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    before, chosen, now, cores, pinned, halves, many = map(int, out.stdout.split())
    assert before == 1 and chosen == now == cores and pinned == 1
    # Two forward passes at once (concurrent_batches): half the cores each, never none.
    assert halves == max(1, cores // 2) and many == 1
