#!/usr/bin/env bash
# Install everything, then check the layout and run the tests.
#   scripts/test.sh [PYTEST ARGS]          everything: the README's test command, and CI's
#   scripts/test.sh --fast [PYTEST ARGS]   the fast lane while working: no Ray, cluster, browser, subprocess
#                                          or slow tests (see the markers in pyproject.toml)
# VENV and PYTHON choose the environment (scripts/setup.sh); CI also runs the fast lane on 3.12.
# Needs espeak-ng, ffmpeg, redis-server, chromium and promtool on PATH (Debian: apt-get install -y
# espeak-ng ffmpeg redis-server chromium prometheus); .ci/run installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}
lane=()
if [ "${1:-}" = "--fast" ]; then
  shift
  lane=(-m "not (ray or cluster or browser or subprocess or slow)")
fi
for tool in espeak-ng ffmpeg redis-server chromium promtool; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y espeak-ng ffmpeg redis-server chromium prometheus" >&2; exit 1; }
done
bash scripts/setup.sh
"$VENV"/bin/ruff check .
"$VENV"/bin/ruff format --check .
bash scripts/lint-imports.sh
"$VENV"/bin/python -m pytest "${lane[@]}" "$@"
