#!/usr/bin/env bash
# Check the layer contracts in pyproject.toml ([tool.importlinter]). import-linter reads packages
# from disk, and the editable install maps mmembed.encoders & co. to top-level folders it cannot
# see, so the check runs on the layout a wheel installs: built into a temporary folder here.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
layout=$(mktemp -d)
trap 'rm -rf "$layout"' EXIT
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation --no-compile --target "$layout" . 2>/dev/null
rm -rf build
project=$PWD
cd "$layout"  # not the project folder, whose mmembed/ (without its mapped packages) would come first
PYTHONPATH="$layout" "$project/$VENV/bin/lint-imports" --config "$project/pyproject.toml" --no-cache --no-logo
