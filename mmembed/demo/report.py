"""The held-out report for a demo-clip checkpoint, measured through the encoder
interface users get (``encoders.load``), written next to the docs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmembed.demo.metrics import QUERY_TYPES, TYPE_TARGETS, TYPED_POOL, retrieval_report
from mmembed.encoders import Modality, load
from mmembed.encoders.config import ModelsConfig

REPORT_DIR = Path("docs")
TARGET_R5 = 0.90


def evaluate(weights: Path, config: ModelsConfig, n: int = 1000) -> dict[str, Any]:
    model = load(f"local-dir:{weights.resolve()}", config)
    image, text = model.encoder(Modality.IMAGE), model.encoder(Modality.TEXT)
    return retrieval_report(
        lambda ims: image.encode(list(map(image.preprocess, ims))),
        lambda ts: text.encode(list(map(text.preprocess, ts))),
        n=n,
    )


def write_report(weights: Path, config: ModelsConfig, n: int = 1000, out_dir: Path = REPORT_DIR) -> dict[str, Any]:
    report = evaluate(weights, config, n)
    config = json.loads((weights / "open_clip_config.json").read_text())
    training = {k: v for k, v in config.get("training", {}).items() if k != "eval_during_training"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo-clip-report.json").write_text(
        json.dumps({"metrics": report, "training": training}, indent=2) + "\n"
    )
    verdict = "meets" if report["text_to_image_R@5"] >= TARGET_R5 else "DOES NOT meet"
    flat = {k: v for k, v in report.items() if not isinstance(v, dict) and not k.startswith("P@5 ")}
    lines = [
        "# demo-clip: held-out retrieval report",
        "",
        f"{n} held-out scenes, each with its full caption. Multi-object scenes come from the tenth of all",
        "compositions that training never sees (`Scene.held_out`); every scene is rendered with a seed training",
        "never uses. A retrieved scene counts as a hit when it has the same objects as the caption's scene.",
        "Produced by `mmembed demo report` (or at the end of `mmembed demo train-clip`).",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flat.items()],
        "",
        f"Target: text-to-image Recall@5 >= {TARGET_R5}: this checkpoint {verdict} it.",
        "",
        f"## Short queries, by type ({TYPED_POOL} held-out scenes)",
        "",
        "Every query of each type that has at least 5 relevant scenes in the pool (up to 200, sampled), worded",
        "as people type them. A retrieved scene is right when it contains what the query names; precision@5",
        "is the share of the top 5 that are right.",
        "",
        "| query type | example | queries | P@5 | target | |",
        "|---|---|---|---|---|---|",
        *[
            f"| {t} | {report['typed_examples'][t]} | {report['typed_queries'][t]} "
            f"| {report[f'P@5 {t}']:.3f} | {TYPE_TARGETS[t]:.2f} "
            f"| {'met' if report[f'P@5 {t}'] >= TYPE_TARGETS[t] else 'NOT met'} |"
            for t in QUERY_TYPES
        ],
        "",
        "## The README's example queries (1,000 scenes)",
        "",
        "| query | P@5 |",
        "|---|---|",
        *[f"| {q} | {p:.1f} |" for q, p in report["short_query_P@5_by_query"].items()],
        "",
        "random_R@5 is what five random scenes would score. How the checkpoint was trained, and what each",
        "change to the recipe bought: [models.md](models.md#the-demo-world-and-demo-clip).",
        "",
        f"Training: {json.dumps(training)}",
        "",
    ]
    (out_dir / "demo-clip-report.md").write_text("\n".join(lines))
    return report
