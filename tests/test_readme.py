"""The README names only what exists: its commands, endpoints and settings are checked against
the command line, the HTTP app and the settings class, so the docs cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmembed.cli import app as cli
from mmembed.config import Settings
from mmembed.serve.http.app import bare_app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
NOT_SETTINGS = {"MMEMBED_URL", "MMEMBED_DEMO_CATALOGUE"}  # what the notebooks read, not the server


def _commands() -> list[tuple[str, ...]]:
    """The first words of every `mmembed ...` in the command table (up to an argument or option)."""
    table = README[README.index("## Command line") : README.index("## Models")]
    found = []
    for cell in re.findall(r"^\| `mmembed ([^`]+)`", table, re.M):
        words = []
        for word in cell.split():
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            words.append(word)
        found.append(tuple(words))
    return found


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_in_the_table_exists(command: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output


def test_the_table_lists_every_command() -> None:
    listed = {c[0] for c in _commands()}
    registered = {c.name or c.callback.__name__ for c in cli.registered_commands} | {
        g.name for g in cli.registered_groups
    }
    assert registered <= listed, f"not in the README's command table: {sorted(registered - listed)}"


def test_every_endpoint_named_exists() -> None:
    named = set(re.findall(r"`(GET|POST|DELETE) (/[^`?\s]*)", README))
    assert len(named) >= 12
    routes = {(m, re.sub(r"\{\w*_?id\}", "{id}", path).replace(":path", "")) for m, path in _routes(bare_app().routes)}
    missing = sorted(f"{m} {p}" for m, p in named if (m, p) not in routes)
    assert not missing, f"the README names endpoints the app does not have: {missing}"


def _routes(routes: list) -> set[tuple[str, str]]:
    """(method, path) of every route, inside the routers Serve includes too."""
    found = set()
    for route in routes:
        if hasattr(route, "original_router"):
            found |= _routes(route.original_router.routes)
        for method in getattr(route, "methods", None) or ():
            found.add((method, route.path))
    return found


def test_every_setting_named_is_a_setting() -> None:
    named = set(re.findall(r"MMEMBED_[A-Z0-9_]*[A-Z0-9]", README)) - NOT_SETTINGS
    assert len(named) >= 15
    unknown = sorted(n for n in named if n.removeprefix("MMEMBED_").lower() not in Settings.model_fields)
    assert not unknown, f"the README names settings that do not exist: {unknown}"
