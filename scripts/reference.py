"""The reference parts of docs/ that the code already says: every setting (``mmembed.config.Settings``),
every field of the Serve config (``mmembed.serve.config``) and every command and option of the
command line (``mmembed.cli``); and the README's comparison with infinity-emb, from the peer
benchmark's results (``bench/results/peers.json``). Each goes between ``<!-- generated: NAME -->``
and ``<!-- end: NAME -->`` in its page; tests/test_docs.py fails when a page differs from its source.

    .venv/bin/python scripts/reference.py          # rewrite the generated blocks
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / "results" / "peers.json"
SERVERS = ("infinity", "infinity_bf16", "mmembed")  # the columns of peers.json
RUNS = {"infinity": SERVERS[:2], "mmembed": SERVERS[2:]}  # a server at each of its precisions


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if value and isinstance(value, list) and all(isinstance(v, BaseModel) for v in value):
            return ", ".join(f"`{getattr(v, 'name', v)}`" for v in value)
        return f"`{value}`" if value not in ([], {}, "", ()) else "none"
    if isinstance(field.default, BaseModel):
        return "its own defaults"
    if field.default is PydanticUndefined or field.default is None:
        return "unset"
    if field.default == "":
        return "none"
    return f"`{field.default}`"


def settings_table() -> str:
    from mmembed.config import Settings

    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `MMEMBED_{name.upper()}` | {_cell(_default(field))} | {_cell(field.description or '')} |")
    return "\n".join(rows)


def model_table(model: type[BaseModel], prefix: str = "") -> str:
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        default = "(required)" if field.is_required() else _default(field)
        nested = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        meaning = field.description or (f"see `{field.annotation.__name__}` below" if nested else "")
        rows.append(f"| `{prefix}{name}` | {_cell(default)} | {_cell(meaning)} |")
    return "\n".join(rows)


def serve_config_tables() -> str:
    from mmembed.serve.config import BatchConfig, ModelConfig, ServeConfig

    return "\n\n".join(
        [
            "The application's `args` (`ServeConfig`):\n\n" + model_table(ServeConfig),
            "Each of `models` (`ModelConfig`):\n\n" + model_table(ModelConfig),
            "Each model's `batch` (`BatchConfig`):\n\n" + model_table(BatchConfig, "batch."),
        ]
    )


def cli_reference() -> str:
    import typer.main

    from mmembed.cli import app

    blocks: list[str] = []

    def walk(command: Any, path: list[str]) -> None:
        if hasattr(command, "commands"):  # a group
            for name, sub in sorted(command.commands.items()):
                walk(sub, [*path, name])
            return
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        options = [p for p in command.params if p.param_type_name == "option"]
        usage = " ".join([*path, *(p.name.upper() + ("..." if p.nargs == -1 else "") for p in arguments)])
        summary = (command.help or "").strip().split("\n\n")[0].replace("\n", " ")
        block = [f"### `{usage}`", "", summary]
        if options:
            block += ["", "| option | default | meaning |", "|---|---|---|"]
            for p in options:
                names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
                default = "" if p.default is None or (p.is_flag and p.default is False) else f"`{p.default}`"
                block.append(f"| {names} | {_cell(default)} | {_cell(p.help or '')} |")
        blocks.append("\n".join(block))

    walk(typer.main.get_command(app), ["mmembed"])
    return "\n\n".join(blocks)


def cpus(machine: dict[str, Any]) -> str:
    """The cores and, where the run recorded them, the CPU and whether it has native bf16."""
    if "cpu" not in machine:
        return f"{machine['cpus']} CPU cores"
    bf16 = "with" if machine["native_bf16"] else "without"
    return f"{machine['cpus']} cores of an {machine['cpu']}, {bf16} native bf16"


def peers_table() -> str:
    """Items/s at each concurrency, mmembed's ratio to the best of infinity's, and the ceilings, as measured."""
    results = json.loads(PEERS.read_text())
    peer, version = re.sub(r"\[.*\]", "", results["setup"]["peer"]).split("==")
    dtype = {"bfloat16": "bf16", "float32": "fp32"}[results["mmembed_dtype"]]
    kinds = {"clip_images": "CLIP ViT-B/32 images", "clip_texts": "CLIP ViT-B/32 texts", "minilm_texts": "MiniLM texts"}
    concurrency = sorted({int(point.split("@")[1]) for point in results["mmembed"]["clip_images"]})
    at = " / ".join(map(str, concurrency))
    rows = [
        f"| items/s at concurrency {at} | {peer} {version} fp32 | {peer} bf16 | mmembed {dtype} "
        "| mmembed ÷ best infinity |",
        "|---|---|---|---|---|",
    ]
    for key, label in kinds.items():
        for size in ("1", str(results["setup"]["max_batch"])):
            points = [f"{size}-per-request@{c}" for c in concurrency]
            figures = [
                " / ".join(f"{results[s][key][p]['items_per_s']:.1f}" for p in points) if key in results[s] else "—"
                for s in SERVERS
            ]
            ratios = " / ".join(f"{results['ratio_to_infinity'][key][p]:.2f}" for p in points)
            rows.append(f"| {label}, {size} per request | {' | '.join(figures)} | {ratios} |")
    ceiling = results["ceiling_items_per_s"]

    def p50(servers: tuple[str, ...], key: str) -> float:  # the best of a server's precisions
        return min(results[s][key]["1-per-request@1"]["p50_ms"] for s in servers if key in results[s])

    p50s = {s: " / ".join(f"{p50(servers, k):.0f}" for k in kinds) for s, servers in RUNS.items()}
    rows += [
        "",
        f"Raw batch-{results['setup']['max_batch']} forward in the same run, fp32 / bf16: "
        + ", ".join(f"{kinds[k]} {ceiling['fp32'][k]:.1f} / {ceiling['bf16'][k]:.1f}/s" for k in kinds)
        + f". p50 of a single item at concurrency 1 ({', '.join(kinds.values())}): infinity "
        f"{p50s['infinity']} ms (the faster of its precisions), mmembed {p50s['mmembed']} ms. "
        f"infinity {version} applies a dtype to CLIP only on CUDA, so its CLIP runs fp32 here. "
        f"{results['setup']['images']} JPEGs of about 640x480 as data URIs and {results['setup']['texts']} "
        f"captions, {cpus(results['machine'])}.",
    ]
    return "\n".join(rows)


GENERATED = {
    "docs/configuration.md": {"settings": settings_table, "serve-config": serve_config_tables},
    "docs/cli.md": {"cli": cli_reference},
    "README.md": {"peers": peers_table},
}


def render(page: str, text: str) -> str:
    """``text`` with each generated block of ``page`` rewritten from the code."""
    for name, make in GENERATED[page].items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end: {name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{page} has no <!-- generated: {name} --> block")
        text = pattern.sub(lambda m, block=make(): m.group(1) + block + "\n" + m.group(2), text)  # noqa: B008
    return text


def main() -> int:
    for page in GENERATED:
        path = ROOT / page
        path.write_text(render(page, path.read_text()))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
