"""What the quickstart fixture (conftest.py) gives the tests, importable by them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCENES = 40  # the demo catalogue: 40 scenes, 10 photos (scikit-image), 5 spoken clips


@dataclass(frozen=True)
class Quickstart:
    url: str  # the search page and the API
    catalogue: Path  # the demo catalogue's folder (catalogue.jsonl and the files it lists)
    output: str  # what the command printed up to "search page:"
