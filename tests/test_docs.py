"""The README and docs/ name only what exists, and their reference parts are the code's own:
commands, endpoints and settings they name are checked against the command line, the HTTP app
and the settings class; the generated tables are regenerated and compared; links resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmembed.cli import app as cli
from mmembed.config import Settings
from mmembed.serve.http.app import bare_app

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text() for p in FILES}
ALL = "\n".join(PAGES.values())
NOT_SETTINGS = {"MMEMBED_URL", "MMEMBED_DEMO_CATALOGUE"}  # what the notebooks read, not the server


def _reference():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("reference", ROOT / "scripts" / "reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["docs/configuration.md", "docs/cli.md", "README.md"])
def test_the_generated_reference_is_the_codes(page: str) -> None:
    text = (ROOT / page).read_text()
    assert _reference().render(page, text) == text, f"{page} is stale: run python scripts/reference.py"


def test_the_cli_reference_lists_every_command() -> None:
    listed = set(re.findall(r"^### `mmembed ([a-z][a-z -]*?)(?: [A-Z.]+)*`", PAGES["docs/cli.md"], re.M))
    registered = {c.name or c.callback.__name__ for c in cli.registered_commands}
    groups = {g.name for g in cli.registered_groups}
    assert registered <= listed, sorted(registered - listed)
    assert all(any(entry.startswith(f"{g} ") for entry in listed) for g in groups)


def _commands() -> list[tuple[str, ...]]:
    """The first words of every `mmembed ...` the pages show (up to an argument or option)."""
    found = set()
    for cell in re.findall(r"`mmembed ([^`]+)`", ALL):
        words = []
        for word in cell.split():
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            words.append(word)
        if words:
            found.add(tuple(words))
    return sorted(found)


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_named_exists(command: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output


def test_every_endpoint_named_exists() -> None:
    named = set(re.findall(r"`(GET|POST|DELETE) (/[^`?\s]*)", ALL))
    assert len(named) >= 12
    routes = {(m, re.sub(r"\{\w*_?id\}", "{id}", path).replace(":path", "")) for m, path in _routes(bare_app().routes)}
    missing = sorted(f"{m} {p}" for m, p in named if (m, p) not in routes)
    assert not missing, f"the docs name endpoints the app does not have: {missing}"


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
    named = set(re.findall(r"MMEMBED_[A-Z0-9_]*[A-Z0-9]", ALL)) - NOT_SETTINGS
    assert len(named) >= 15
    unknown = sorted(n for n in named if n.removeprefix("MMEMBED_").lower() not in Settings.model_fields)
    assert not unknown, f"the docs name settings that do not exist: {unknown}"


def test_links_between_pages_resolve() -> None:
    broken = []
    for name, text in PAGES.items():
        base = (ROOT / name).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            page = (base / path).resolve() if path else ROOT / name
            if not page.exists():
                broken.append(f"{name}: {target}")
            elif anchor and page.suffix == ".md":
                anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}
                if anchor not in anchors:
                    broken.append(f"{name}: {target} (no such heading)")
    assert not broken, broken


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_short() -> None:
    assert len(PAGES["README.md"].splitlines()) <= 250
