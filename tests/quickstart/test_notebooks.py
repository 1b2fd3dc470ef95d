"""The notebooks in notebooks/, executed top to bottom against the quick start's server as a user
runs them. Their cells assert what they show, so a notebook that runs to the end works; the test
also checks a key output of each and keeps the executed notebooks in test-artifacts/notebooks/."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from quickstart.quickstart_run import Quickstart

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

# What the output of a cell (by its id) must say, per notebook.
KEY_OUTPUTS = {
    "quickstart.ipynb": {
        "encode-audio": r"transcript: 'a red circle",
        "search-text": r"^1\. scene-\d{4}\.jpg +0\.\d+ +a .*red circle",
        "search-image": r"^1\. scene-0005\.jpg +1\.0",
        "search-voice": r"heard: 'a red circle",
    },
    "bulk_ingest.ipynb": {
        "first-run": r"done: 12 written, 0 refreshed, 0 failed, 0 deleted; items \{'done': 12\}",
        "second-run": r"'unchanged': 12, 'to_embed': 0.*\n.*done: 0 written, 0 refreshed, 0 failed",
        "dead-letter": r"done: 2 written, 0 refreshed, 1 failed, 0 deleted; items \{'done': 2, 'failed': 1\}"
        r"(.|\n)*dead letter: broken\.jpg \(not_an_image\): (demo-clip: )?not an image",
        "search": r"^1\.000  file://.*/more/scene-0001\.jpg",
        "sync": r"done: 0 written, 0 refreshed, 0 failed, 14 deleted",
    },
    "compare_models.ipynb": {
        "evaluate": r"short queries +demo-clip +1\.0",
        "speed": r"demo-clip: Recall@10 (0\.[3-9]|1\.0)",
        "recommend": r"^demo-clip: the highest Recall@10",
    },
}


def _kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    """The "python3" kernel, run by this interpreter (the venv's, where mmembed is installed). The
    venv's ipykernel spec says `python`, which jupyter_client runs as sys.executable; a python3
    spec of another interpreter found first (a user-wide one, say) is replaced by a fresh one."""
    try:
        km = AsyncKernelManager(kernel_name="python3")
        if km.format_kernel_cmd()[0] == sys.executable:
            return km
    except NoSuchKernel:
        pass
    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "python3")
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    assert km.format_kernel_cmd()[0] == sys.executable
    return km


def _text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif "text/plain" in output.get("data", {}):
            parts.append(output["data"]["text/plain"])
    return "\n".join(parts)


@pytest.mark.parametrize("name", sorted(KEY_OUTPUTS))
def test_notebook_runs_against_the_quickstart_server(
    name: str, quickstart: Quickstart, artifacts: Path, tmp_path: Path
) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is committed with outputs"
    env = os.environ | {
        "MMEMBED_URL": quickstart.url,
        "MMEMBED_DEMO_CATALOGUE": str(quickstart.catalogue),
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": "/tmp/mmembed-mpl",
    }
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        km=_kernel_manager(tmp_path),
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        # A failing cell raises CellExecutionError with its traceback. The kernel manager is ours, so
        # nbclient leaves the kernel running unless told to shut it down.
        client.execute(env=env, cleanup_kc=True)
    finally:
        (artifacts / "notebooks").mkdir(exist_ok=True)
        nbformat.write(nb, artifacts / "notebooks" / name)
    cells = {c.id: c for c in nb.cells}
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), "a code cell did not run"
    for cell_id, pattern in KEY_OUTPUTS[name].items():
        output = _text(cells[cell_id])
        assert re.search(pattern, output, re.MULTILINE), f"{name}, cell {cell_id!r}: no {pattern!r} in:\n{output}"
