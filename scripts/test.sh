#!/usr/bin/env bash
# Install everything, then run the whole test suite. Needs espeak-ng, ffmpeg, redis-server and
# chromium on PATH (Debian: apt-get install -y espeak-ng ffmpeg redis-server chromium); .ci/run
# installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in espeak-ng ffmpeg redis-server chromium; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y espeak-ng ffmpeg redis-server chromium" >&2; exit 1; }
done
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
