#!/usr/bin/env bash
# Install everything, then run the main job on embedded defaults (no network, no services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/mmembed quickstart
