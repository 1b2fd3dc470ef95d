"""The `mmembed` console script, run as a user runs it (a subprocess, its own data dir)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.subprocess  # each test runs the mmembed console script


def _run(data_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"MMEMBED_DATA_DIR": str(data_dir), "COLUMNS": "200", "MMEMBED_ALLOW_DOWNLOADS": "false"}
    exe = Path(sys.executable).parent / "mmembed"
    result = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-data")


def test_render_then_ingest_a_folder_with_one_model(data_dir: Path) -> None:
    images = data_dir / "demo-images"
    assert "rendered 60 scenes" in _run(data_dir, "demo", "render", str(images)).stdout
    out = _run(data_dir, "ingest", str(images), "--model", "demo-clip", "--workers", "0").stdout
    assert re.search(r"60 items in the source", out), out
    assert re.search(r"job \w+: 60 written, 0 unchanged content .* 0 failed", out), out
    again = _run(data_dir, "ingest", str(images), "--model", "demo-clip", "--workers", "0").stdout
    assert re.search(r"unchanged \(already embedded\): 60", again), again


def test_models_list_and_verify_offline(data_dir: Path) -> None:
    _run(data_dir, "models", "pull")
    listing = _run(data_dir, "models", "list").stdout
    assert re.search(r"demo-clip .*shipped \(offline\).* yes", listing), listing
    assert re.search(r"ViT-H-14 .* hub .* no", listing), listing
    verified = _run(data_dir, "models", "verify").stdout
    assert verified.count("ok ") == 4, verified


def test_ingest_sends_bad_files_to_the_dead_letters_with_their_reason(data_dir: Path, tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    result = _run(data_dir, "ingest", str(tmp_path), "--model", "demo-clip", "--workers", "0")
    assert re.search(r"1 written, .* 2 failed", result.stdout), result.stdout
    letters = _run(data_dir, "dlq", "list").stdout
    assert re.search(r"not_an_image|truncated_image", letters) and "empty_image" in letters, letters


def test_unknown_and_unavailable_models_exit_with_the_reason(data_dir: Path, tmp_path: Path) -> None:
    unknown = _run(data_dir, "ingest", str(tmp_path), "--model", "ViT-Z-1", check=False)
    assert unknown.returncode == 1 and "unknown model 'ViT-Z-1'" in unknown.stdout
    offline = _run(data_dir, "models", "pull", "ViT-L-14", check=False)
    assert offline.returncode == 1 and "mmembed models pull ViT-L-14" in offline.stdout


def test_transcribe_prints_timed_segments_and_names_bad_files(data_dir: Path, tmp_path: Path) -> None:
    from mmembed.demo.speech import espeak_wav

    (tmp_path / "hello.wav").write_bytes(espeak_wav("the coffee in this restaurant is very good"))
    (tmp_path / "notes.txt").write_text("not audio")
    out = _run(data_dir, "transcribe", str(tmp_path / "hello.wav"), str(tmp_path / "notes.txt")).stdout
    assert re.search(r"hello\.wav \(en, \d\.\d s\)", out), out
    assert re.search(r"\[\s*0\.00 ->\s+\d\.\d\d\] .*restaurant", out, flags=re.IGNORECASE), out
    assert re.search(r"notes\.txt.*: unsupported_format", out), out


def test_serve_starts_ray_serves_http_and_stops_cleanly_on_ctrl_c(data_dir: Path, tmp_path: Path) -> None:
    import signal
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n  - name: mmembed\n    import_path: mmembed.serve.app:build_app\n"
        "    args:\n      models:\n        - name: demo-clip\n"
    )
    env = os.environ | {"MMEMBED_DATA_DIR": str(data_dir), "MMEMBED_ALLOW_DOWNLOADS": "false", "COLUMNS": "200"}
    exe = Path(sys.executable).parent / "mmembed"
    proc = subprocess.Popen(
        [str(exe), "serve", "--config", str(config), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        out = "".join(lines)
        assert f"mmembed API: http://127.0.0.1:{port}" in out and "Ray dashboard: http://127.0.0.1:" in out, out
        body = {"model": "demo-clip", "input": "a red circle", "encoding_format": "float"}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body, timeout=60)
        assert len(response.json()["data"][0]["embedding"]) == 128
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "shutting down" in rest, rest
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
