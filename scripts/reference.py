"""The reference parts of docs/ that the code already says: every setting (``mmembed.config.Settings``),
every field of the Serve config (``mmembed.serve.config``) and every command and option of the
command line (``mmembed.cli``). Each goes between ``<!-- generated: NAME -->`` and
``<!-- end: NAME -->`` in its page; tests/test_docs.py fails when a page differs from the code.

    .venv/bin/python scripts/reference.py          # rewrite the generated blocks
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

DOCS = Path(__file__).resolve().parents[1] / "docs"


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


GENERATED = {
    "configuration.md": {"settings": settings_table, "serve-config": serve_config_tables},
    "cli.md": {"cli": cli_reference},
}


def render(page: str, text: str) -> str:
    """``text`` with each generated block of ``page`` rewritten from the code."""
    for name, make in GENERATED[page].items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end: {name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"docs/{page} has no <!-- generated: {name} --> block")
        text = pattern.sub(lambda m, block=make(): m.group(1) + block + "\n" + m.group(2), text)  # noqa: B008
    return text


def main() -> int:
    for page in GENERATED:
        path = DOCS / page
        path.write_text(render(page, path.read_text()))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
