"""The evaluation report: JSON for tools, Markdown and two plots for people, and a
recommendation that says what choosing it gives up against each other candidate."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mmembed.evaluation.run import ModelResult, as_dict

# Recall@10 differences below this are noise on a few hundred queries; speed decides then.
RECALL_TIE = 0.02


def recommend(results: list[ModelResult]) -> dict[str, Any]:
    """Highest Recall@10 among the models that could encode every query type (ties go to the
    faster one); then, for each other model, what choosing the winner gives up or gains."""
    coverage = max(r.coverage for r in results)
    eligible = [r for r in results if r.coverage == coverage]
    best_recall = max(r.quality["recall@10"] for r in eligible)
    contenders = [r for r in eligible if r.quality["recall@10"] >= best_recall - RECALL_TIE]
    best = max(contenders, key=lambda r: r.items_per_s)
    against = []
    for other in results:
        if other is best:
            continue
        d_recall = best.quality["recall@10"] - other.quality["recall@10"]
        speed = best.items_per_s / other.items_per_s if other.items_per_s else float("inf")
        size = best.dim / other.dim
        note = (
            f"{other.model}: Recall@10 {other.quality['recall@10']:.3f} ({d_recall:+.3f} for {best.model}), "
            f"{best.model} embeds {speed:.2f}x as fast and its index is {size:.2f}x the size"
        )
        if other.coverage < coverage:
            note += f"; {other.model} cannot encode {1 - other.coverage:.0%} of the queries"
        against.append(note)
    reason = f"{best.model}: the highest Recall@10 ({best.quality['recall@10']:.3f})" + (
        " within the tie margin, and the fastest of those" if len(contenders) > 1 else ""
    )
    return {"model": best.model, "reason": reason, "against": against}


def _plots(results: list[ModelResult], out: Path) -> list[str]:
    os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / "mmembed-matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.model for r in results]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / 3
    for n, k in enumerate(("recall@1", "recall@5", "recall@10")):
        ax.bar([i + (n - 1) * width for i in range(len(names))], [r.quality[k] for r in results], width, label=k)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.set_title("Recall per model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ms_per_item = 1000 / r.items_per_s if r.items_per_s else float("nan")
        ax.scatter(ms_per_item, r.quality["recall@10"], s=60)
        ax.annotate(r.model, (ms_per_item, r.quality["recall@10"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.margins(x=0.4)
    ax.set_xlabel("encode time per item, ms (log)")
    ax.set_ylabel("Recall@10")
    ax.set_ylim(0, 1.05)
    ax.set_title("Latency vs recall (up and left is better)")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_recall.png", dpi=120)
    plt.close(fig)
    return ["recall.png", "latency_vs_recall.png"]


def _markdown(title: str, setup: dict[str, Any], results: list[ModelResult], choice: dict[str, Any]) -> str:
    lines = [f"# {title}", "", f"**Recommendation: {choice['model']}.** {choice['reason']}.", ""]
    lines += [f"- {a}" for a in choice["against"]] + [""]
    lines += ["## Setup", ""] + [f"- {k}: {v}" for k, v in setup.items()] + [""]
    lines += [
        "## Quality",
        "",
        "| model | R@1 | R@5 | R@10 | MRR | nDCG@10 | query coverage | failed items |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        q = r.quality
        lines.append(
            f"| {r.model} | {q['recall@1']:.3f} | {q['recall@5']:.3f} | {q['recall@10']:.3f} | "
            f"{q['mrr']:.3f} | {q['ndcg@10']:.3f} | {r.coverage:.0%} | {r.failed_items} |"
        )
    lines += [
        "",
        "![Recall per model](recall.png)",
        "",
        "## Speed and cost",
        "",
        "| model | dim | items/s | batch p50 / p99 ms | query p50 / p99 ms | embed corpus | embed cost | "
        "cost per 1M queries | machines for traffic | index |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r.projection
        lines.append(
            f"| {r.model} | {r.dim} | {r.items_per_s:.1f} | {r.batch_ms_p50:.0f} / {r.batch_ms_p99:.0f} | "
            f"{r.query_ms_p50:.1f} / {r.query_ms_p99:.1f} | {p['embed_hours']:.3g} h | "
            f"${p['embed_cost_usd']:.2f} | ${p['query_cost_usd_per_million']:.2f} | "
            f"{p['machines_for_traffic']:.2f} | {p['index_bytes'] / 1e6:.1f} MB |"
        )
    lines += [
        "",
        "![Latency vs recall](latency_vs_recall.png)",
        "",
        "Projections: the measured batch rate on one machine for the whole corpus; one query per "
        "request at the measured single-query latency for the traffic; float32 vectors for the index "
        "(payload and HNSW graph extra).",
        "",
    ]
    return "\n".join(lines)


def write_report(results: list[ModelResult], out: Path, setup: dict[str, Any], title: str = "Model evaluation") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    choice = recommend(results)
    plots = _plots(results, out)
    report = {"setup": setup, "recommendation": choice, "models": [as_dict(r) for r in results], "plots": plots}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(title, setup, results, choice))
    return report
