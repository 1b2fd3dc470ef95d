"""What a user's site-packages gets from mmembed: one import name, with every layer inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess


def test_the_wheel_installs_one_top_level_name_with_every_layer_and_its_data(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("mmembed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"mmembed"}
    for layer in ("encoders", "loaders", "store", "embedding", "jobs", "serve", "evaluation", "demo"):
        assert f"mmembed/{layer}/__init__.py" in names
    # Package data travels with its package: shipped weights, the search page, the demo clips.
    assert "mmembed/encoders/weights/demo-clip/open_clip_model.safetensors" in names
    assert "mmembed/serve/ui/index.html" in names
    assert any(n.startswith("mmembed/demo/clips/") for n in names)
