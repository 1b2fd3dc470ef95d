"""The `mmembed` console script, run as a user runs it (a subprocess, its own data dir)."""

import math
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.subprocess  # each test runs the mmembed console script


def _run(
    data_dir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = (
        os.environ
        | {"MMEMBED_DATA_DIR": str(data_dir), "COLUMNS": "200", "MMEMBED_ALLOW_DOWNLOADS": "false"}
        | (env or {})
    )
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


def test_cache_warm_refills_a_wiped_cache_so_a_new_collection_costs_no_forward_pass(
    data_dir: Path, tmp_path: Path
) -> None:
    for n in range(6):
        Image.new("RGB", (32, 32), (40 * n, 90, 255 - 40 * n)).save(tmp_path / f"{n}.png")
    ingest = ("ingest", str(tmp_path), "--model", "demo-clip", "--workers", "0")
    warm = {"MMEMBED_COLLECTION": "warm", "MMEMBED_CACHE_URL": "sqlite"}  # the default, whatever the tests set
    _run(data_dir, *ingest, env=warm)
    for file in data_dir.glob("cache.sqlite*"):
        file.unlink()
    warmed = _run(data_dir, "cache", "warm", env=warm).stdout
    assert "6 points read; 6 cache entries written (demo-clip 6)" in warmed, warmed
    assert "hit rate now: 100.0% of 6 stored vectors" in warmed, warmed
    unknown = _run(data_dir, "cache", "warm", "--model", "ViT-Z-1", check=False, env=warm)
    assert unknown.returncode == 1 and "no vectors of ViT-Z-1 in the collection" in unknown.stdout, unknown.stdout
    off = _run(data_dir, "cache", "warm", check=False, env=warm | {"MMEMBED_CACHE_URL": "off"})
    assert off.returncode == 1 and "the embedding cache is off" in off.stdout, off.stdout
    again = _run(data_dir, *ingest, env=warm | {"MMEMBED_COLLECTION": "warm-copy"}).stdout
    assert re.search(r"6 written, .* 0 failed", again) and "cache: hits 6, misses 0" in again, again


def test_ingest_watch_follows_a_folder_until_ctrl_c(data_dir: Path, tmp_path: Path) -> None:
    import signal

    folder = tmp_path / "watched"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "first.png")
    exe = Path(sys.executable).parent / "mmembed"
    env = os.environ | {
        "MMEMBED_DATA_DIR": str(data_dir),
        "MMEMBED_COLLECTION": "watched",
        "MMEMBED_ALLOW_DOWNLOADS": "false",
        "COLUMNS": "200",
        "PYTHONUNBUFFERED": "1",  # each round's line as it happens
    }
    command = [str(exe), "ingest", str(folder), "--model", "demo-clip", "--workers", "0", "--watch"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()  # read in a thread, so a silent watch fails the test, not hangs it

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:

        def next_round() -> str:
            while True:
                try:
                    line = lines.get(timeout=120)
                except queue.Empty:
                    pytest.fail(f"no round in 120 s; it printed: {''.join(seen)}")
                if line is None:
                    pytest.fail(f"mmembed ingest --watch ended with {proc.wait()}: {''.join(seen)}")
                seen.append(line)
                if "] whole pass: " in line or "] changes: " in line:
                    return line

        assert re.search(r"whole pass: job \w+: 1 written", next_round())
        Image.new("RGB", (32, 32), (30, 200, 30)).save(folder / "second.png")
        assert re.search(r"changes: job \w+: 1 written", next_round())
        (folder / "first.png").unlink()
        assert re.search(r"changes: job \w+: 0 written, .* 1 deleted", next_round())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    rest = []
    while (line := lines.get(timeout=60)) is not None:
        rest.append(line)
    assert proc.returncode == 0 and "stopped watching" in "".join(rest), rest


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_env(data_dir: Path) -> dict[str, str]:
    return os.environ | {"MMEMBED_DATA_DIR": str(data_dir), "MMEMBED_ALLOW_DOWNLOADS": "false", "COLUMNS": "200"}


TWO_APPS = """
applications:
  - name: images
    route_prefix: /
    import_path: mmembed.serve.app:build_app
    args: {models: [{name: demo-clip}]}
  - name: texts
    route_prefix: /texts
    import_path: mmembed.serve.app:build_app
    args: {models: [{name: all-MiniLM-L6-v2}]}
"""


def test_serve_runs_every_application_and_stops_cleanly_on_ctrl_c(data_dir: Path, tmp_path: Path) -> None:
    """Behind HAProxy, beside the test session's own cluster (each picks its HAProxy ports).
    Also: Ray's metrics on the port given, where the images' Prometheus scrapes Serve's series."""
    import signal
    import time

    import httpx

    port, metrics_port = _free_port(), _free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(TWO_APPS)
    exe = Path(sys.executable).parent / "mmembed"
    proc = subprocess.Popen(
        [str(exe), "serve", "--config", str(config), "--port", str(port), "--metrics-export-port", str(metrics_port)],
        env=_serve_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # communicate() reads the rest from the pipe itself, after the lines read here: it may start
        # inside a character of Ray's banners
        encoding="utf-8",
        errors="replace",
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        out = "".join(lines)
        assert f"mmembed API (images): http://127.0.0.1:{port} " in out, out
        assert f"mmembed API (texts): http://127.0.0.1:{port}/texts " in out, out
        assert "Ray dashboard: http://127.0.0.1:" in out
        # The default data plane: HAProxy in front, started by the cluster this command started.
        import psutil

        assert "haproxy" in {p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
        for prefix, model, dim in (("", "demo-clip", 128), ("/texts", "all-MiniLM-L6-v2", 384)):
            body = {"model": model, "input": "a red circle", "encoding_format": "float"}
            response = httpx.post(f"http://127.0.0.1:{port}{prefix}/v1/embeddings", json=body, timeout=60)
            assert len(response.json()["data"][0]["embedding"]) == dim, response.text
        deadline = time.monotonic() + 90  # Ray's agent exports on its own interval
        wanted = ("ray_serve_num_http_requests_total{", 'application="texts"')
        while True:
            lines = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text.splitlines()
            if any(line.startswith(wanted[0]) and wanted[1] in line for line in lines):
                break
            assert time.monotonic() < deadline, [x for x in lines if "ray_serve" in x][:5]
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "shutting down" in rest, rest
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_ray_serve_run_starts_every_replica_on_this_machines_cores(data_dir: Path, tmp_path: Path) -> None:
    """`serve run` starts Ray with the machine's cores; the replicas reserve more than that as
    configured, so the app shrinks every reservation by the same factor instead of waiting."""
    import signal
    import time

    import httpx

    port, cores = _free_port(), os.cpu_count() or 1
    models = ", ".join(f"{{name: {m}, num_cpus: {cores}}}" for m in ("demo-clip", "all-MiniLM-L6-v2", "bind"))
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"http_options: {{host: 127.0.0.1, port: {port}}}\n"
        "applications:\n  - name: mmembed\n    route_prefix: /\n    import_path: mmembed.serve.app:build_app\n"
        f"    args: {{models: [{models}]}}\n"
    )
    share = math.floor(cores / (2 + 3 * cores) * 1000) / 1000  # the ingress, the catalogue, three models
    serve_cli = Path(sys.executable).parent / "serve"
    env = _serve_env(data_dir)
    env.pop("RAY_ADDRESS", None)  # a cluster of its own, as on a laptop
    proc = subprocess.Popen(
        [str(serve_cli), "run", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline, ready = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
            except httpx.TransportError:
                ready = None
            if ready is not None and ready.status_code == 200:
                break
            time.sleep(1)  # polling a server that is starting; the deadline bounds it
        assert ready is not None and ready.status_code == 200, (ready and ready.text, proc.poll())
        assert set(ready.json()["models"]) == {"demo-clip", "all-MiniLM-L6-v2", "bind"}
        body = {"model": "bind", "input": "a red circle", "encoding_format": "float"}
        assert len(httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body, timeout=60).json()["data"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert f"each reserves {share:.3f} of its num_cpus" in out, out[-3000:]


def test_a_joined_cluster_keeps_its_own_metrics_port() -> None:
    """Ray's metrics port is fixed when the cluster starts: asking for one while joining is refused
    before anything connects, instead of being silently ignored."""
    from typer.testing import CliRunner

    from mmembed.cli import app as cli

    result = CliRunner().invoke(
        cli, ["serve", "--address", "127.0.0.1:1", "--metrics-export-port", "8080"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 1
    assert "--metrics-export-port applies to a cluster started here" in result.output


@pytest.mark.parametrize("bad", ['{"encoder": "half"}', "[1]", "encoder=1"])
def test_encoder_resources_that_are_not_a_json_object_of_numbers_are_refused(bad: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmembed.cli import app as cli

    result = CliRunner().invoke(
        cli, ["ingest", str(tmp_path), "--engine", "ray", "--encoder-resources", bad], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 1
    assert "--encoder-resources must be a JSON object of numbers" in result.output


@pytest.mark.parametrize("node", ["worker-1", "[/tmp/x.cfg:95]"])  # an error's text is printed as it is, not as markup
def test_cluster_kill_names_a_node_that_does_not_run(node: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmembed.cli import app as cli

    result = CliRunner().invoke(cli, ["cluster", "kill", node, "--folder", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert f"no process of {node} runs in the cluster" in result.output
