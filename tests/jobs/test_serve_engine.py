"""The serve engine (server jobs) without Ray: a job whose models are "deployments" (here each model's
step in this process, as an encoder deployment runs it: bytes in, decoded, preprocessed and cached
next to the model) writes what the local engine writes, loads no model itself, and counts the
deployments' cache answers in its summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalogue_files import SCENES, job_settings, write_catalogue

from mmembed.config import Settings
from mmembed.contracts import EncodedItem, ModelInfo
from mmembed.embedding import ModelStep
from mmembed.encoders import load, model_version
from mmembed.jobs import encode
from mmembed.jobs.ingest import Ingest, IngestOptions
from mmembed.jobs.state import JobStore
from mmembed.store.cache import SqliteCache
from mmembed.store.catalog import Catalog
from mmembed.store.objects import LocalObjects
from mmembed.store.vectors import EdgeStore

MODELS = ("demo-clip", "all-MiniLM-L6-v2")


class StepDeployments:
    """``jobs.encode.Deployments`` over each model's step in this process, with the deployments' own cache."""

    def __init__(self, settings: Settings, cache: SqliteCache) -> None:
        config = settings.models_config()
        models = {name: load(name, config) for name in MODELS}
        self.steps = {n: ModelStep(m, model_version(m.spec, config), cache) for n, m in models.items()}
        self.calls: list[tuple[str, str, int]] = []

    def describe(self, models: Sequence[str]) -> dict[str, ModelInfo]:
        return {m: self.steps[m].info for m in models}

    async def encode(self, model: str, modality: str, inputs: list[Any]) -> list[EncodedItem]:
        assert all(isinstance(i, str if modality == "text" else bytes) for i in inputs), "bytes, not preprocessed"
        self.calls.append((model, modality, len(inputs)))
        step = self.steps[model]
        return await step.encode(modality, inputs, step.forward)


def _catalog(root: Path) -> Catalog:
    return Catalog(EdgeStore(root / "vectors"), LocalObjects(root / "objects"))


def test_a_server_job_writes_what_a_local_job_writes_with_no_model_of_its_own(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    manifest = write_catalogue(tmp_path / "catalogue")
    local_settings = job_settings(settings, tmp_path / "local", "local")
    local = _catalog(tmp_path / "local")
    options = IngestOptions(str(manifest), MODELS, batch_size=4, workers=0)
    Ingest(options, local_settings, catalog=local, cache=None, jobs=JobStore(tmp_path / "local.sqlite")).run(
        progress=False
    )

    served_settings = job_settings(settings, tmp_path / "served", "served")
    # The deployments' cache and the job's are one file opened by two processes: the job only counts.
    cache = SqliteCache(tmp_path / "cache.sqlite")
    deployments = StepDeployments(served_settings, SqliteCache(tmp_path / "cache.sqlite"))
    monkeypatch.setattr(encode, "load", lambda *a, **k: pytest.fail("the serve engine loaded a model"))

    def serve_job(catalog: Catalog, jobs: str) -> Any:
        opts = IngestOptions(str(manifest), MODELS, batch_size=4, workers=0, engine="serve")
        jobs_store = JobStore(tmp_path / jobs)
        job = Ingest(opts, served_settings, catalog=catalog, cache=cache, jobs=jobs_store, deployments=deployments)
        return job.run(progress=False)

    served = _catalog(tmp_path / "served")
    first = serve_job(served, "served.sqlite")
    assert (first.written, first.failed) == (SCENES, 1)
    # Each scene's image (demo-clip) and caption (both text towers), looked up and stored.
    entries = 3 * SCENES
    assert (first.cache["hits"], first.cache["misses"], first.cache["puts"]) == (0, entries, entries)
    assert ("demo-clip", "image", 4) in deployments.calls  # a batch's items in one call per model
    mine = {p.id: p for p in served.vectors.retrieve(served.vectors.scroll_ids(), with_vectors=True)}
    theirs = {p.id: p for p in local.vectors.retrieve(local.vectors.scroll_ids(), with_vectors=True)}
    assert sorted(mine) == sorted(theirs)
    for item_id, point in mine.items():
        assert (
            set(point.vectors)
            == set(theirs[item_id].vectors)
            == {
                "demo-clip.image",
                "demo-clip.text",
                "all-MiniLM-L6-v2.text",
            }
        )
        for name, vector in point.vectors.items():
            np.testing.assert_allclose(vector, theirs[item_id].vectors[name], atol=1e-5, err_msg=name)

    cache.stats.hits = cache.stats.misses = cache.stats.puts = 0
    again = serve_job(_catalog(tmp_path / "again"), "again.sqlite")
    assert again.written == SCENES and (again.cache["hits"], again.cache["misses"]) == (entries, 0)


def test_the_serve_engine_needs_the_deployments_and_only_it_does(settings: Settings, tmp_path: Path):
    with pytest.raises(ValueError, match="serve engine"):
        Ingest(IngestOptions("x", engine="serve"), settings, catalog=_catalog(tmp_path), cache=None)
