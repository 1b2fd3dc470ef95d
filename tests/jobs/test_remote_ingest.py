"""Bulk ingest with a remote text model (the local stub provider of tests/remote_stub.py): captions
embedded exactly once through 429s, 500s, timeouts and dropped connections without the provider's
limits ever being exceeded; calls that fail past their retries become dead letters that a retry
finishes; the plan and the summary show tokens and dollars; and the same from `mmembed ingest`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from catalogue_files import SCENES, job_settings, write_catalogue
from remote_stub import StubProvider, stub_tokens, stub_vector

from mmembed.config import RemoteModelConfig, Settings
from mmembed.encoders.remote import RemoteEncoder
from mmembed.jobs.ingest import Ingest, IngestOptions
from mmembed.jobs.state import JobStore
from mmembed.store.cache import SqliteCache
from mmembed.store.catalog import Catalog
from mmembed.store.objects import LocalObjects
from mmembed.store.vectors import EdgeStore, point_id

REMOTE = "stub:captions"  # a ':' in the name, as in openai:text-embedding-3-small
FAST = {"backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 0.5}


@pytest.fixture
def env(tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("STUB_API_KEY", "stub-secret-key")
    manifest = write_catalogue(tmp_path / "catalogue")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    return {
        "settings": job_settings(settings, tmp_path / "data", "remote"),
        "manifest": manifest,
        "captions": {(manifest.parent / r["uri"]).as_uri(): r["caption"] for r in rows if "caption" in r},
        "catalog": Catalog(EdgeStore(tmp_path / "vectors"), LocalObjects(tmp_path / "objects")),
        "cache": SqliteCache(tmp_path / "cache.sqlite"),
        "jobs": JobStore(tmp_path / "jobs.sqlite"),
    }


def _ingest(env: dict, stub: StubProvider, **remote: object) -> Ingest:
    config = RemoteModelConfig.model_validate(stub.config(REMOTE, **(FAST | remote)))
    settings = env["settings"].model_copy(update={"remote_models": [config]})
    opts = IngestOptions(str(env["manifest"]), ("demo-clip", REMOTE), batch_size=4, workers=0)
    return Ingest(opts, settings, catalog=env["catalog"], cache=env["cache"], jobs=env["jobs"])


def test_every_caption_is_embedded_once_through_faults_and_within_the_limits(env):
    faults = {0: "429", 1: "500", 2: "drop", 3: "slow", 6: "500"}
    with StubProvider(rpm=3, window_s=0.3, faults=faults, retry_after_s=0.2) as stub:
        job = _ingest(env, stub, max_inputs=2, concurrency=2)
        plan = job.plan()  # calibrates on the local models only: planning never calls (or pays) the provider
        assert stub.calls == []
        encoder = job.models.loaded[REMOTE].encoder("text")
        assert isinstance(encoder, RemoteEncoder)
        captions = list(env["captions"].values())
        estimate = plan.remote_costs[REMOTE]
        assert (estimate["texts"], estimate["tokens"]) == (SCENES, sum(encoder.counter.count(c) for c in captions))
        assert any(line.startswith(f"  remote {REMOTE}: {SCENES} texts") for line in plan.lines())
        summary = job.run(plan, progress=False)
    assert (summary.written, summary.failed) == (SCENES, 1)  # only the corrupt file failed
    assert stub.over_limit == 0 and stub.max_in_any_window()[0] <= 3
    assert stub.delivered == Counter(captions)  # scenes may share a caption: once per item, no more
    assert sorted(c.outcome for c in stub.calls if c.outcome != "ok") == ["429", "500", "500", "drop", "slow"]
    for uri, caption in env["captions"].items():
        point = env["catalog"].get(point_id(uri), with_vectors=True)
        vector = stub_vector(caption, stub.dim)
        assert np.allclose(point.vectors[f"{REMOTE}.text"], vector / np.linalg.norm(vector), atol=1e-6)
        assert "demo-clip.image" in point.vectors
    cost = summary.remote_costs[REMOTE]
    assert cost["tokens_billed"] == sum(stub_tokens(c) for c in captions) and cost["retries"] == 5
    assert cost["usd"] == 0.0 and cost["usd_per_million"] is None  # the stub's model has no price
    assert any(line.startswith(f"  remote {REMOTE}: ") and "5 retries" in line for line in summary.lines())


def test_captions_failing_past_the_retry_budget_are_dead_letters_that_a_retry_finishes(env):
    with StubProvider(faults={0: "500", 1: "500"}) as stub:
        first = _ingest(env, stub, max_inputs=2, concurrency=1, max_attempts=2, usd_per_million_tokens=1000.0)
        summary = first.run(progress=False)
        assert (summary.written, summary.failed) == (SCENES - 2, 1 + 2)
        letters = {d.uri: d for d in env["jobs"].dead_letters(first.job)}
        failed = [uri for uri, d in letters.items() if d.code == "provider_failed"]
        assert len(failed) == 2 and all("gave up after 2 tries" in letters[u].reason for u in failed)
        assert summary.remote_costs[REMOTE]["failed_inputs"] == 2
        assert env["catalog"].get(point_id(failed[0])) is None  # no point without its caption vector
        # what `mmembed dlq retry` does: the dead letters back in the plan, the job run again
        env["jobs"].requeue_dead_letters(first.job)
        env["jobs"].update(first.job, status="interrupted")
        again = _ingest(env, stub, max_inputs=2, concurrency=1, max_attempts=2, usd_per_million_tokens=1000.0)
        retried = again.run(progress=False)
    assert (retried.written, retried.failed) == (2, 1)
    assert env["catalog"].vectors.count() == SCENES
    assert stub.delivered == Counter(env["captions"].values())
    billed = sum(stub_tokens(env["captions"][u]) for u in failed)
    assert retried.remote_costs[REMOTE]["tokens_billed"] == billed
    assert retried.remote_costs[REMOTE]["usd"] == pytest.approx(billed * 1000.0 / 1e6)


@pytest.mark.subprocess
def test_mmembed_ingest_plans_and_runs_with_a_remote_model_from_the_environment(env, tmp_path: Path):
    with StubProvider() as stub:
        config = stub.config(REMOTE, usd_per_million_tokens=1000.0)
        environment = os.environ | {
            "MMEMBED_DATA_DIR": str(tmp_path / "cli-data"),
            "MMEMBED_COLLECTION": "remote-cli",
            "COLUMNS": "250",
            "MMEMBED_ALLOW_DOWNLOADS": "false",
            "MMEMBED_MODELS_DIR": str(env["settings"].models_path),
            "MMEMBED_REMOTE_MODELS": json.dumps([config]),
            "STUB_API_KEY": "stub-secret-key",
        }
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "mmembed.cli",
                "ingest",
                str(env["manifest"]),
                "--workers",
                "0",
                "--model",
                "demo-clip",
                "--model",
                REMOTE,
            ],
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    captions = list(env["captions"].values())
    counted = sum(len(c.encode()) + 2 for c in captions)
    billed = sum(stub_tokens(c) for c in captions)
    out = " ".join(done.stdout.split())  # rich may wrap long lines
    assert f"remote {REMOTE}: {SCENES} texts, {counted} tokens (estimate:utf8-bytes+2), ${counted / 1000:.6f}" in out
    assert f"remote {REMOTE}: {len(stub.ok_calls())} calls, {SCENES} texts, {billed} tokens billed" in out
    assert f"${billed / 1000:.6f} at $1000.0/1M tokens" in out
    assert "stub-secret-key" not in done.stdout + done.stderr
