"""The shipped demo-clip: its training code runs, and the checkpoint in the repository
retrieves held-out scenes as well as its report says."""

import json
from pathlib import Path

import pytest

from mmembed.config import Settings
from mmembed.demo.metrics import QUERY_TYPES, TYPE_TARGETS
from mmembed.demo.report import TARGET_R5, evaluate
from mmembed.demo.train_clip import MODEL_CONFIG, TwinBatches, soft_clip_loss, train
from mmembed.encoders import load

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_is_small_and_in_open_clip_format() -> None:
    folder = ROOT / "encoders" / "weights" / "demo-clip"
    weights = folder / "open_clip_model.safetensors"
    assert weights.stat().st_size < 25 * 1024 * 1024
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"] == json.loads(json.dumps(MODEL_CONFIG))


def test_held_out_recall_meets_the_target_and_matches_the_committed_report(settings: Settings) -> None:
    measured = evaluate(ROOT / "encoders" / "weights" / "demo-clip", settings.models_config(), n=1000)
    committed = json.loads((ROOT / "docs" / "demo-clip-report.json").read_text())["metrics"]
    assert measured["text_to_image_R@5"] >= TARGET_R5
    for key in ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1"):
        assert measured[key] == pytest.approx(committed[key], abs=0.01), key
    for kind in QUERY_TYPES:  # short queries by what they name: colour+shape, size, position, two objects
        key = f"P@5 {kind}"
        assert measured[key] >= TYPE_TARGETS[kind], (key, measured[key])
        assert measured[key] == pytest.approx(committed[key], abs=0.01), key
    # Short colour-and-shape queries: at least 4 of the top 5 scenes contain what was asked for.
    by_query = measured["short_query_P@5_by_query"]
    for query in ("red circle", "blue square", "green triangle", "yellow star", "purple cross", "black square"):
        assert by_query[query] >= 0.8, (query, by_query[query])


def test_batches_put_each_query_beside_a_scene_it_rejects_and_one_it_keeps() -> None:
    images, tokens, positives = next(iter(TwinBatches(96, seed=1, context_length=32, full_fraction=0.3)))
    assert images.shape == (96, 3, 64, 64) and str(images.dtype) == "torch.uint8"
    assert tokens.shape == (96, 32)
    assert positives.diagonal().all()  # every caption describes its own scene
    groups = range(0, 96, 3)  # base, breaking twin, keeping twin
    assert sum(not positives[g, g + 1] for g in groups) >= 30  # the base's query rejects its hard negative
    assert sum(bool(positives[g, g + 2]) for g in groups) >= 12  # and, when short, describes the third scene too


def test_soft_loss_prefers_the_right_pairing() -> None:
    import torch

    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    pos = torch.eye(4, dtype=torch.bool)
    right = soft_clip_loss(emb, emb, torch.tensor(10.0), pos)
    wrong = soft_clip_loss(emb, emb.roll(1, 0), torch.tensor(10.0), pos)
    assert right < wrong


def test_training_writes_a_loadable_checkpoint(tmp_path: Path, settings: Settings) -> None:
    report = train(tmp_path / "ckpt", steps=2, batch_size=8, eval_every=2, eval_n=20, threads=1)
    assert 0.0 <= float(report["text_to_image_R@5"]) <= 1.0
    model = load(f"local-dir:{tmp_path / 'ckpt'}", settings.models_config())
    [vec] = model.encoder("text").encode_items(["a red circle"])
    assert vec.vector is not None and vec.vector.shape == (128,)
    # A fine-tune starts from those weights and records how they were trained.
    weights = tmp_path / "ckpt" / "open_clip_model.safetensors"
    train(tmp_path / "tuned", steps=2, batch_size=6, eval_every=2, eval_n=20, threads=1, resume=weights, lr=1e-4)
    recipe = json.loads((tmp_path / "tuned" / "open_clip_config.json").read_text())["training"]
    assert recipe["lr"] == 1e-4 and recipe["fine_tune_of"]["steps"] == 2
