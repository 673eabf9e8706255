"""Offline profiling: search space, exhaustive grid, Bayesian engine, 3D Pareto library.

A *configuration* is a full profile config (transform -> quantizer -> codec). Its
*quality key* is the (transform, quantizer) part: the codec is lossless, so every codec
variant of a key has the same quality and one quality evaluation serves them all.

Per configuration the cheap quantities are **measured**, never predicted: compression
ratio and encode / decode speed (bf16 MB/s) on one window of real KV. Quality (relative
perplexity x 100 on a small ``tune``-split evaluation set, :class:`RealBench`) is the
expensive quantity. Lossless keys (bf16 passthrough) have quality exactly 100 by
construction and are never evaluated.

Objectives of the 3D Pareto set: ratio (max), quality (max), codec time per MB at both
ends ``1000/S_enc + 1000/S_dec`` (min). Hypervolume uses the reference point
``(ratio 1, quality floor, 1.05 x the slowest codec time in the space)``.

Bayesian engine (:func:`bayes_search`):

* surrogate: scikit-learn ``GaussianProcessRegressor`` (Matern 1.5 + white noise,
  normalised targets) of quality over min-max-scaled key features (log2 level counts of
  keys and values, high/low mix, transform, quantizer kind, axes, windows);
* acquisition ``"ehvi"`` (default, the improvement over the reference): expected
  hypervolume improvement of the key's codec variants under the GP posterior (exact 3D
  hypervolume, Gauss-Hermite quadrature over quality), divided by the measured evaluation
  cost relative to the mean, plus a decaying exploration bonus ``w * sigma/sigma_max``;
  ``"paper"``: the reference's ``cr * P(q >= target) + w * sigma/sigma_max * mean(cr)``;
* spread cold start: ``k`` (8, as in the reference's run) keys evenly spaced over the keys
  sorted by ratio, aggressive first;
* monotonicity within a family (same transform / quantizer kind / axes / mix structure):
  more levels never lower quality, so evaluated keys bound the unevaluated ones
  (posterior clipped to the bounds) and keys whose optimistic quality cannot add
  hypervolume (or fall below the floor) are pruned;
* early stopping: ``patience`` iterations in a row whose best expected improvement is below
  ``stop_frac`` of the current hypervolume.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import KVServeError
from .library import Entry, Library
from .models import continuation
from .pipeline import Pipeline, decode
from .quality import EvalConfig, Evaluator, nll
from .stages.quantizers import KVServeQuant

QUALITY_FLOOR = 90.0
#: a task library withholds keys that keep fewer of bf16's answers than this (docs/KVSERVE.md):
#: their relative F1 did not carry over to other items (docs/RESULTS.md, issue 20 (d3))
MIN_ANSWER_AGREE = 0.7
#: SmolLM2's per-token KV in bytes, used only to label plots
_CODECS_Q = [{"id": "bitpack"}, {"id": "rans", "pair": True}, {"id": "zstd", "level": 1, "pack": True}]
_CODECS_TASKS = [{"id": "bitpack"}, {"id": "irans", "pair": True}]
_CODECS_LOSSLESS = [{"id": "enec"}, {"id": "zstd", "level": 1, "pack": False}, {"id": "lz4", "pack": False}]


# ================================================================= search space


def _kvq(hk, hv, frac, value_axis, lk=None, lv=None, sinks=1):
    return {"id": "kvserve", "high_key_levels": hk, "high_value_levels": hv,
            "low_key_levels": lk if lk is not None else max(2, hk // 2),
            "low_value_levels": lv if lv is not None else max(2, hv // 2),
            "low_fraction": frac, "split": "layer", "scores": None, "key_axis": "channel",
            "value_axis": value_axis, "key_group": 0, "keep_sinks": sinks, "keep_recent": 0}


def _tag(stage: dict) -> str:
    sid = stage["id"]
    if sid == "bitpack":
        return "bp"
    if sid == "irans":
        return "irans"
    if sid == "zstd":
        return "zstdp" if stage.get("pack") else "zstd"
    return sid


def quality_keys(size: str = "default") -> list[dict]:
    """The (transform, quantizer) pairs of the space: ``[{"transform":..., "quantizer":...}]``.

    ``default``: 2 transforms x 7 key x 6 value level counts x 3 mixes (all high, last
    33% / 67% of layers at half the levels) x 2 value axes = 504 KVServe keys, plus 8 KIVI
    (2/4 bits, group 32/64, recent 0/64), 4 CacheGen band sets and the lossless key.
    ``tiny``: a few keys for tests; ``tasks``: :func:`task_keys` (SmolLM2)."""
    keys = []
    if size == "tiny":
        for hk, hv in [(8, 6), (6, 4), (4, 3)]:
            keys.append({"transform": {"id": "hadamard", "seed": 0}, "quantizer": _kvq(hk, hv, 0.0, "token")})
        keys.append({"transform": {"id": "identity"}, "quantizer": {"id": "kivi", "bits": 2, "group_size": 32,
                                                                     "keep_recent": 0, "keep_sinks": 0}})
        keys.append({"transform": {"id": "identity"}, "quantizer": {"id": "none"}})
        return keys
    if size == "tasks":
        return task_keys()
    if size != "default":
        raise KVServeError(f"unknown search-space size {size!r}")
    for tr in ({"id": "hadamard", "seed": 0}, {"id": "identity"}):
        for hk in (16, 12, 10, 8, 6, 5, 4):
            for hv in (12, 8, 6, 5, 4, 3):
                for frac in (0.0, 0.33, 0.67):
                    for vax in ("token", "token_head"):
                        keys.append({"transform": tr, "quantizer": _kvq(hk, hv, frac, vax)})
    for bits in (2, 4):
        for g in (32, 64):
            for recent in (0, 64):
                keys.append({"transform": {"id": "identity"},
                             "quantizer": {"id": "kivi", "bits": bits, "group_size": g, "keep_recent": recent, "keep_sinks": 0}})
    for kb, vb in [((64, 32, 16), (64, 32)), ((32, 16, 12), (32, 16)), ((16, 12, 8), (16, 12)), ((12, 8, 6), (12, 8))]:
        keys.append({"transform": {"id": "identity"},
                     "quantizer": {"id": "cachegen", "key_bands": [[0.32, kb[0]], [0.63, kb[1]], [1.0, kb[2]]],
                                   "value_bands": [[0.15, vb[0]], [1.0, vb[1]]]}})
    keys.append({"transform": {"id": "identity"}, "quantizer": {"id": "none"}})
    return keys


#: RoPE bases for pre-RoPE keys in the ``tasks`` space (SmolLM2: one base; Gemma-3: local
#: layers 1e4, every sixth layer global at 1e6), as in the packaged profiles
ROPE_THETA = {"smollm2": 100000.0, "gemma3": [1e6 if i % 6 == 5 else 1e4 for i in range(18)]}


def task_keys(model: str = "smollm2") -> list[dict]:
    """The ``tasks`` space (profiled on task accuracy): portable Hadamard on pre-RoPE keys, the
    KVServe quantizer with whole-window or 32/64-token key groups (compact key statistics),
    4 key x 5 value level counts, no recent window or 64 recent tokens at 64 levels (a partial
    last key group is quantized at the middle's levels), 1 sink, compact value statistics:
    120 keys; plus 8 KIVI, 4 CacheGen and the lossless key."""
    if model not in ROPE_THETA:
        raise KVServeError(f"no RoPE bases for model {model!r}")
    tr = {"id": "hadamard", "seed": 0, "key_rope_theta": ROPE_THETA[model], "portable": True}
    keys = []
    for g in (0, 32, 64):
        for kl in (8, 12, 16, 24):
            for vl in (4, 6, 8, 12, 16):
                for recent in (0, 64):
                    q = {"id": "kvserve", "high_key_levels": kl, "high_value_levels": vl, "split": "head",
                         "key_axis": "channel", "value_axis": "token", "key_group": g, "keep_sinks": 1,
                         "keep_recent": recent, "compact_value_stats": True}
                    if g:
                        q["compact_key_stats"] = True
                    if g or recent:
                        q["recent_key_levels"], q["recent_value_levels"] = (64, 64) if recent else (kl, vl)
                    keys.append({"transform": tr, "quantizer": q})
    return keys + [k for k in quality_keys("default") if k["quantizer"]["id"] in ("kivi", "cachegen", "none")]


def key_name(key: dict) -> str:
    q, tr = key["quantizer"], key["transform"]
    t = "H" if tr["id"] == "hadamard" else "I"
    if q["id"] == "kvserve":
        s = f"{t}-k{q['high_key_levels']}v{q['high_value_levels']}"
        if q.get("key_group"):
            s += f"-g{q['key_group']}"
        if q.get("recent_key_levels") and q.get("keep_recent"):
            s += f"-r{q['keep_recent']}q{q['recent_key_levels']}"
        if q.get("low_fraction"):
            s += f"-lo{q['low_fraction']:g}k{q['low_key_levels']}v{q['low_value_levels']}"
        s += "-th" if q["value_axis"] == "token_head" else ""
        s += f"-s{q['keep_sinks']}" if q["keep_sinks"] != 1 else ""
        return s
    if q["id"] == "kivi":
        return f"{t}-kivi{q['bits']}-g{q['group_size']}-r{q['keep_recent']}"
    if q["id"] == "cachegen":
        return f"{t}-cg{'.'.join(str(b) for _, b in q['key_bands'])}"
    if q["id"] == "none":
        return "bf16"
    return f"{t}-{q['id']}-{hashlib.sha1(json.dumps(q, sort_keys=True).encode()).hexdigest()[:6]}"


def quality_key(config: dict) -> str:
    return json.dumps({"transform": config["transform"], "quantizer": config["quantizer"]}, sort_keys=True)


def search_space(size: str = "default", model: str = "smollm2") -> list[dict]:
    """Every valid profile config of the space (each key x its codecs), named uniquely (the
    ``tasks`` space: ``model``'s RoPE bases; codecs bitpack and irans, the GPU-capable ones)."""
    out = []
    for key in (task_keys(model) if size == "tasks" else quality_keys(size)):
        codecs = _CODECS_LOSSLESS if key["quantizer"]["id"] == "none" else _CODECS_TASKS if size == "tasks" else _CODECS_Q
        for c in codecs:
            cfg = {"name": f"{key_name(key)}-{_tag(c)}", "transform": key["transform"],
                   "quantizer": key["quantizer"], "codec": c}
            try:
                cfg = Pipeline.from_config(cfg).get_config()
            except KVServeError:
                continue
            out.append(cfg)
    names = [c["name"] for c in out]
    if len(set(names)) != len(names):
        raise KVServeError("search space has duplicate names")
    return out


def is_lossless(key: dict) -> bool:
    return key["quantizer"]["id"] == "none"


def _with_defaults(q: dict) -> dict:
    """A ``kvserve`` quantizer config with the stage's defaults filled in (configs leave out
    parameters at their defaults); other quantizers as they are."""
    return {**KVServeQuant.params, **q} if q["id"] == "kvserve" else q


def family_levels(key: dict) -> tuple[str, tuple]:
    """``(family, levels)``: within one family more levels (componentwise) never hurt quality."""
    q, tr = _with_defaults(key["quantizer"]), key["transform"]["id"]
    if q["id"] == "kvserve":
        fam = json.dumps([tr, q["id"], q["low_fraction"], q["split"], q["key_axis"], q["value_axis"], q["key_group"],
                          q["keep_sinks"], q["keep_recent"], q["compact_key_stats"],
                          q["recent_key_levels"] if q["keep_recent"] else bool(q["recent_key_levels"])])
        return fam, (q["high_key_levels"], q["high_value_levels"], q["low_key_levels"], q["low_value_levels"])
    if q["id"] == "kivi":
        return json.dumps([tr, "kivi", q["keep_sinks"]]), (q["bits"], -q["group_size"], q["keep_recent"])
    if q["id"] == "cachegen":
        return json.dumps([tr, "cachegen", [e for e, _ in q["key_bands"]], [e for e, _ in q["value_bands"]]]), \
            tuple(b for _, b in q["key_bands"]) + tuple(b for _, b in q["value_bands"])
    return json.dumps([tr, q["id"]]), ()


def key_features(key: dict) -> list[float]:
    """Numeric description of a quality key for the GP (scaled later)."""
    q, tr = _with_defaults(key["quantizer"]), key["transform"]["id"]
    had = 1.0 if tr == "hadamard" else 0.0
    kind = [float(q["id"] == k) for k in ("kvserve", "kivi", "cachegen", "none")]
    if q["id"] == "kvserve":
        f = q["low_fraction"]
        lk, lv = q["low_key_levels"], q["low_value_levels"]
        kb = (1 - f) * math.log2(q["high_key_levels"]) + f * math.log2(lk)
        vb = (1 - f) * math.log2(q["high_value_levels"]) + f * math.log2(lv)
        kmin, vmin = math.log2(lk if f else q["high_key_levels"]), math.log2(lv if f else q["high_value_levels"])
        g = q["key_group"]
        extra = [f, float(q["value_axis"] == "token_head"), float(q["keep_sinks"]),
                 math.log2(g) if g else 0.0, q["keep_recent"] / 128]
    elif q["id"] == "kivi":
        kb = vb = kmin = vmin = float(q["bits"])
        extra = [0.0, 0.0, float(q["keep_sinks"]), math.log2(q["group_size"]), q["keep_recent"] / 128]
    elif q["id"] == "cachegen":
        def band(bands):
            prev, acc = 0.0, 0.0
            for end, bins in bands:
                acc += (end - prev) * math.log2(bins)
                prev = end
            return acc, min(math.log2(b) for _, b in bands)
        kb, kmin = band(q["key_bands"])
        vb, vmin = band(q["value_bands"])
        extra = [0.0, 0.0, 0.0, 0.0, 0.0]
    else:
        kb = vb = kmin = vmin = 16.0
        extra = [0.0, 0.0, 0.0, 0.0, 0.0]
    return [had, *kind, kb, vb, kmin, vmin, *extra]


# ================================================================= Pareto and hypervolume


QUALITY_CAP = 100.0


def objectives(ratio, quality, codec_ms):
    """Objective rows ``(ratio, min(quality, 100), codec_ms)``: a compressed cache cannot truly
    beat the uncompressed one, so relative perplexity above 100 is evaluation noise and must
    not create Pareto points (or hypervolume) of its own."""
    q = np.minimum(np.asarray(quality, float), QUALITY_CAP)
    return np.stack([np.asarray(ratio, float), q, np.asarray(codec_ms, float)], axis=-1)


def pareto_mask(pts: np.ndarray) -> np.ndarray:
    """Non-dominated rows of ``(ratio max, quality max, codec_ms min)`` (exact duplicates:
    the first is kept)."""
    pts = np.asarray(pts, float).reshape(-1, 3)
    n = len(pts)
    if n == 0:
        return np.ones(0, bool)
    g = pts * np.array([1.0, 1.0, -1.0])  # all maximise
    mask = np.ones(n, bool)
    for s in range(0, n, 512):
        blk = g[s:s + 512]
        ge = (g[None, :, :] >= blk[:, None, :]).all(-1)
        gt = (g[None, :, :] > blk[:, None, :]).any(-1)
        mask[s:s + 512] = ~(ge & gt).any(1)
    _, first = np.unique(pts, axis=0, return_index=True)
    dup = np.ones(n, bool)
    dup[first] = False
    return mask & ~dup


def _hv2(y: np.ndarray) -> float:
    """2D hypervolume (maximise both, reference 0) of positive points."""
    if len(y) == 0:
        return 0.0
    o = np.argsort(-y[:, 0], kind="stable")
    y1, y2 = y[o, 0], np.maximum.accumulate(y[o, 1])
    prev = np.concatenate([[0.0], y2[:-1]])
    return float(np.sum(y1 * (y2 - prev)))


def hypervolume(pts: np.ndarray, ref: tuple[float, float, float]) -> float:
    """Exact 3D hypervolume of ``(ratio, quality, codec_ms)`` points against ``ref``
    (ratio and quality above, codec time below the reference count)."""
    pts = np.asarray(pts, float).reshape(-1, 3)
    y = np.stack([pts[:, 0] - ref[0], pts[:, 1] - ref[1], ref[2] - pts[:, 2]], axis=1)
    y = y[(y > 0).all(axis=1)]
    if len(y) == 0:
        return 0.0
    y = y[np.argsort(-y[:, 2], kind="stable")]
    total = 0.0
    for k in range(len(y)):
        nxt = y[k + 1, 2] if k + 1 < len(y) else 0.0
        dz = y[k, 2] - nxt
        if dz > 0:
            total += dz * _hv2(y[:k + 1, :2])
    return total


# ================================================================= measurements


@dataclass
class Record:
    """One configuration: measured cheap quantities, quality once evaluated."""

    name: str
    config: dict
    key: str
    ratio: float
    encode_MBps: float
    decode_MBps: float
    quality: float | None = None

    @property
    def codec_ms_per_MB(self) -> float:
        return 1e3 / self.encode_MBps + 1e3 / self.decode_MBps

    def to_json(self) -> dict:
        return {"name": self.name, "config": self.config, "ratio": self.ratio, "encode_MBps": self.encode_MBps,
                "decode_MBps": self.decode_MBps, "codec_ms_per_MB": self.codec_ms_per_MB, "quality": self.quality}


class RealBench:
    """Real SmolLM2 measurements on a small ``tune``-split set (never the test split).

    The reference KV of each window is prefilled once (:class:`kvserve.quality.Evaluator`).
    ``cheap(config)`` encodes and decodes window 0 (ratio, speeds; warm, ``threads``);
    ``quality(key)`` round-trips every window's KV through the key's quantizer (codec
    ``none``: the codec is lossless) and scores a teacher-forced continuation:
    100 x PPL_bf16 / PPL_compressed over all windows' tokens."""

    def __init__(self, model: str = "smollm2", windows: int = 4, ctx: int = 256, cont: int = 64,
                 seed: int = 1, threads: int = 1):
        self.cfg = EvalConfig(model=model, windows=windows, ctx=ctx, cont=cont, gen=0, longrange=0,
                              seed=seed, threads=threads, split="tune")
        self.ev = Evaluator(self.cfg)
        self._warm: set = set()
        self.eval_seconds: list[float] = []

    def method(self) -> dict:
        m = self.ev.method()
        m["metric"] = "rel_ppl (100 x PPL_bf16 / PPL_compressed, teacher-forced continuation)"
        m["speeds"] = f"bf16 MB/s of encode/decode of window 0, {self.cfg.threads} thread(s), warm"
        return m

    def cheap(self, config: dict) -> tuple[float, float, float]:
        pipe = Pipeline.from_config(config)
        r, t = self.ev.ref[0], self.cfg.threads
        wkey = json.dumps(config["codec"], sort_keys=True) + config["quantizer"]["id"]
        if wkey not in self._warm:  # numba compilation / allocator warm-up once per codec
            decode(pipe.encode(r["kv"], meta={"seq_len": r["n"]}, threads=t), threads=t)
            self._warm.add(wkey)
        raw = sum(k.numel() * 2 + v.numel() * 2 for k, v in r["kv"])
        t0 = time.perf_counter()
        blob = pipe.encode(r["kv"], meta={"seq_len": r["n"]}, threads=t)
        t1 = time.perf_counter()
        decode(blob, threads=t)
        t2 = time.perf_counter()
        return raw / len(blob), raw / max(t1 - t0, 1e-9) / 1e6, raw / max(t2 - t1, 1e-9) / 1e6

    def quality(self, key: dict) -> float:
        t0 = time.perf_counter()
        pipe = Pipeline.from_config({"name": "q", **key, "codec": {"id": "none"}})
        t = self.cfg.threads
        nll_b = nll_c = 0.0
        ntok = 0
        for r in self.ev.ref:
            kv2, _ = decode(pipe.encode(r["kv"], meta={"seq_len": r["n"]}, threads=t), threads=t)
            logits = continuation(self.ev.model, kv2, r["n"], [r["ctx_last"]] + r["cont"][:-1])
            nll_b += r["nll"]
            nll_c += nll(logits, r["cont"])
            ntok += len(r["cont"])
        self.eval_seconds.append(time.perf_counter() - t0)
        return 100.0 * math.exp(nll_b / ntok) / math.exp(nll_c / ntok)


class TaskBench:
    """Real task measurements on ``tune``-split items (never the test split): the profiler's
    quality is **relative task accuracy** (``kvserve.tasks``: RULER-style HotpotQA, token F1).

    Items: ``qa`` QA items of the tune split at target ``lengths`` (cycled; seed 0), with
    their bf16 references (prefill, greedy answer, teacher-forced logits) computed once and,
    with ``refs`` (a folder), saved there and reused by later runs (``NNNNN.pt``, the format of
    ``benchmarks/kvserve_tasks.py prepare``). ``cheap(config)``: ratio over the first three
    items' KV (one per length) with the real codec, encode/decode speed on the first item's
    KV (warm, ``threads``). ``quality(key)``: every item's KV round-trips through the key's
    quantizer (codec ``none``), the answer is decoded greedily from it
    (:func:`kvserve.tasks.answer_from`), and the result is 100 x sum F1 / sum F1(bf16) over
    the items, uncapped; its paired bootstrap 95% CI, the answer agreement with bf16 and the
    mean answer KL go to ``details[quality_key]``."""

    def __init__(self, model: str = "smollm2", qa: int = 100, lengths=(1024, 2048, 4096), refs: str | None = None,
                 threads: int = 1, max_new: int = 12, seed: int = 0):
        import os

        from . import tasks
        from .models import load_model

        self.model_name, self.qa, self.lengths, self.threads, self.max_new = model, qa, tuple(lengths), threads, max_new
        self.seed, self.refs = seed, refs
        self.model, self.tok = load_model(model)
        self.stop = tasks.stop_token_ids(self.tok)
        self.items = tasks.qa_items(self.tok, "tune", qa, self.lengths, seed=seed)
        self._mem: dict[int, object] = {}
        if refs:
            os.makedirs(refs, exist_ok=True)
        self.details: dict[str, dict] = {}
        self.eval_seconds: list[float] = []
        self._warm: set = set()

    def reference(self, i: int):
        """Item ``i``'s :class:`kvserve.tasks.Reference` (saved under ``refs`` when set)."""
        import os

        import torch

        from . import tasks

        if i in self._mem:
            return self._mem[i]
        path = tasks.reference_path(self.refs, i) if self.refs else None
        if path and os.path.exists(path):
            ref = tasks.complete_reference(self.model, self.tok, tasks.load_reference(path, self.items[i]), self.stop,
                                           self.max_new)
        else:
            with torch.inference_mode():
                ref = tasks.reference(self.model, self.tok, self.items[i], self.stop, self.max_new)
            if path:
                tasks.save_reference(ref, path)
        if not path or i < 3:
            self._mem[i] = ref  # without a folder all stay in memory; with one, the cheap items only
        return ref

    def method(self) -> dict:
        import torch

        return {"model": self.model_name, "split": "tune", "qa_items": self.qa, "lengths": list(self.lengths),
                "seed": self.seed, "max_new": self.max_new, "threads": self.threads, "torch": torch.__version__,
                "metric": "task_rel_acc (100 x sum token F1 / sum token F1 of bf16 over RULER-style HotpotQA "
                          "items of the tune split, greedy answers; uncapped) with its paired bootstrap 95% CI",
                "speeds": f"bf16 MB/s of encode/decode of the first item's KV, {self.threads} thread(s), warm",
                "ratio": "sum bf16 KV bytes / sum bundle bytes over the first item of each length"}

    def cheap(self, config: dict) -> tuple[float, float, float]:
        pipe, t = Pipeline.from_config(config), self.threads
        refs = [self.reference(i) for i in range(min(len(self.lengths), len(self.items)))]
        wkey = json.dumps(config["codec"], sort_keys=True) + config["quantizer"]["id"]
        r0 = refs[0]
        if wkey not in self._warm:
            decode(pipe.encode(r0.kv, meta={"seq_len": r0.seq_len}, threads=t), threads=t)
            self._warm.add(wkey)
        raw = comp = 0
        for r in refs[1:]:
            raw += r.raw_bytes
            comp += len(pipe.encode(r.kv, meta={"seq_len": r.seq_len}, threads=t))
        t0 = time.perf_counter()
        blob = pipe.encode(r0.kv, meta={"seq_len": r0.seq_len}, threads=t)
        t1 = time.perf_counter()
        decode(blob, threads=t)
        t2 = time.perf_counter()
        raw0 = r0.raw_bytes
        return (raw + raw0) / (comp + len(blob)), raw0 / max(t1 - t0, 1e-9) / 1e6, raw0 / max(t2 - t1, 1e-9) / 1e6

    def quality(self, key: dict) -> float:
        from . import tasks

        t0 = time.perf_counter()
        pipe = Pipeline.from_config({"name": "q", **key, "codec": {"id": "none"}})
        ref_s, new_s, ref_a, new_a, kls = [], [], [], [], []
        for i in range(len(self.items)):
            r = self.reference(i)
            kv, _ = decode(pipe.encode(r.kv, meta={"seq_len": r.seq_len}, threads=self.threads), threads=self.threads)
            res = tasks.answer_from(self.model, self.tok, r, kv, self.stop, self.max_new)
            ref_s.append(r.score)
            new_s.append(res["score"])
            ref_a.append(r.text)
            new_a.append(res["answer"])
            kls.append(res["answer_kl"])
        p, lo, hi = tasks.paired_bootstrap(ref_s, new_s)
        self.details[quality_key(key)] = {"quality_ci": [round(lo, 3), round(hi, 3)], "items": len(ref_s),
                                          "answer_agree": round(tasks.agreement(ref_a, new_a), 4),
                                          "answer_kl": round(float(np.mean(kls)), 6),
                                          "f1": round(float(np.mean(new_s)), 5), "f1_bf16": round(float(np.mean(ref_s)), 5)}
        self.eval_seconds.append(time.perf_counter() - t0)
        return float(p)


def measure_space(configs: list[dict], cheap: Callable[[dict], tuple[float, float, float]],
                  progress: bool = True, cache: dict | None = None) -> list[Record]:
    """Cheap measurements (ratio, speeds) for every configuration; ``cache`` maps names to
    earlier measurements (reused verbatim when the config matches)."""
    from tqdm.auto import tqdm

    out = []
    for cfg in tqdm(configs, desc="ratio+speed", disable=not progress, leave=False):
        c = (cache or {}).get(cfg["name"])
        if c is not None and c.get("config") == cfg:
            ratio, enc, dec = c["ratio"], c["encode_MBps"], c["decode_MBps"]
        else:
            ratio, enc, dec = cheap(cfg)
        out.append(Record(cfg["name"], cfg, quality_key(cfg), float(ratio), float(enc), float(dec)))
    return out


# ================================================================= search


@dataclass
class SearchResult:
    mode: str
    records: list[Record]
    evaluated: list[str]                 # quality keys in evaluation order
    hv_trace: list[float] = field(default_factory=list)  # HV after each evaluation
    seconds: float = 0.0
    stopped: str = ""
    log: list[dict] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return len(self.evaluated)

    def known(self) -> list[Record]:
        return [r for r in self.records if r.quality is not None]


class Space:
    """Records grouped by quality key, with features, families and the HV reference point."""

    def __init__(self, records: list[Record], floor: float = QUALITY_FLOOR):
        self.records = records
        self.floor = floor
        self.keys: list[str] = []
        self.members: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            if r.key not in self.members:
                self.keys.append(r.key)
                self.members[r.key] = []
            self.members[r.key].append(i)
        self.key_obj = {k: json.loads(k) for k in self.keys}
        self.ratio = np.array([r.ratio for r in records])
        self.ms = np.array([r.codec_ms_per_MB for r in records])
        self.ref = (1.0, floor, float(self.ms.max()) * 1.05)
        feats = np.array([key_features(self.key_obj[k]) for k in self.keys], float)
        lo, hi = feats.min(0), feats.max(0)
        self.X = ((feats - lo) / np.where(hi > lo, hi - lo, 1.0))[:, hi > lo]  # constant features dropped
        if self.X.shape[1] == 0:
            self.X = np.zeros((len(self.keys), 1))
        self.fam = [family_levels(self.key_obj[k]) for k in self.keys]
        self.key_ratio = np.array([self.ratio[self.members[k]].max() for k in self.keys])
        self.lossless = np.array([is_lossless(self.key_obj[k]) for k in self.keys])

    def key_points(self, key: str, quality: float) -> np.ndarray:
        mem = self.members[key]
        return objectives(self.ratio[mem], np.full(len(mem), quality), self.ms[mem])

    def points(self, quality_by_key: dict[str, float]) -> np.ndarray:
        idx = [i for k, q in quality_by_key.items() for i in self.members[k]]
        q = [quality_by_key[self.records[i].key] for i in idx]
        return objectives(self.ratio[idx], q, self.ms[idx])

    def hv(self, quality_by_key: dict[str, float]) -> float:
        pts = self.points(quality_by_key)
        if len(pts) == 0:
            return 0.0
        return hypervolume(pts[pareto_mask(pts)], self.ref)


class _Front:
    """Incrementally maintained Pareto front and its hypervolume."""

    def __init__(self, sp: Space):
        self.sp = sp
        self.pts = np.zeros((0, 3))
        self.hv = 0.0

    def add(self, key: str, quality: float) -> None:
        allp = np.concatenate([self.pts, self.sp.key_points(key, quality)])
        self.pts = allp[pareto_mask(allp)]
        self.hv = hypervolume(self.pts, self.sp.ref)


def grid_search(records: list[Record], quality: Callable[[dict], float], floor: float = QUALITY_FLOOR,
                progress: bool = True) -> SearchResult:
    """Evaluate the quality of every key (lossless keys are 100 by construction)."""
    from tqdm.auto import tqdm

    sp = Space(records, floor)
    t0 = time.perf_counter()
    known: dict[str, float] = {}
    evaluated, trace = [], []
    front = _Front(sp)
    for j in np.flatnonzero(sp.lossless):
        known[sp.keys[j]] = 100.0
        front.add(sp.keys[j], 100.0)
    for j, k in enumerate(tqdm(sp.keys, desc="grid quality", disable=not progress)):
        if sp.lossless[j]:
            continue
        known[k] = float(quality(sp.key_obj[k]))
        evaluated.append(k)
        front.add(k, known[k])
        trace.append(front.hv)
    for r in records:
        r.quality = known[r.key]
    return SearchResult("grid", records, evaluated, trace, time.perf_counter() - t0, "exhausted")


def _bounds(sp: Space, known: dict[str, float], tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Monotonicity bounds per key from evaluated keys of the same family."""
    n = len(sp.keys)
    lo = np.full(n, -np.inf)
    hi = np.full(n, np.inf)
    by_fam: dict[str, list[int]] = {}
    for j, (fam, _) in enumerate(sp.fam):
        by_fam.setdefault(fam, []).append(j)
    for fam, js in by_fam.items():
        ev = [(np.array(sp.fam[j][1]), known[sp.keys[j]]) for j in js if sp.keys[j] in known]
        if not ev:
            continue
        for j in js:
            lv = np.array(sp.fam[j][1])
            for lv2, q in ev:
                if len(lv2) and (lv >= lv2).all():
                    lo[j] = max(lo[j], q - tol)
                if len(lv2) and (lv <= lv2).all():
                    hi[j] = min(hi[j], q + tol)
    return lo, hi


_GH_Z, _GH_W = np.polynomial.hermite_e.hermegauss(9)
_GH_W = _GH_W / _GH_W.sum()


def bayes_search(records: list[Record], quality: Callable[[dict], float], budget: int | None = None,
                 floor: float = QUALITY_FLOOR, target: float = 97.0, acquisition: str = "ehvi",
                 cold_start: int = 8, seed: int = 0, prune: bool = True, early_stop: bool = True,
                 patience: int = 3, stop_frac: float = 2e-3, mono_tol: float = 0.5,
                 cost: Callable[[dict], float] | None = None, progress: bool = True,
                 ard: bool = True, restarts: int = 1, explore: float = 1.0) -> SearchResult:
    """Bayesian search over quality keys; see the module docstring. ``budget`` defaults to
    1/20 of the lossy keys. ``cost(key)`` (optional) estimates an evaluation's cost (the
    acquisition divides by it); ``ard``: one GP length scale per feature; ``restarts``: GP
    optimiser restarts; ``explore``: weight of the exploration bonus."""
    import warnings

    from scipy.stats import norm
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    if acquisition not in ("ehvi", "paper"):
        raise KVServeError("acquisition must be 'ehvi' or 'paper'")
    sp = Space(records, floor)
    rng = np.random.default_rng(seed)
    n = len(sp.keys)
    lossy = [j for j in range(n) if not sp.lossless[j]]
    budget = budget if budget is not None else max(cold_start + 1, math.ceil(len(lossy) / 20))
    known: dict[str, float] = {sp.keys[j]: 100.0 for j in range(n) if sp.lossless[j]}
    evaluated: list[str] = []
    trace: list[float] = []
    log: list[dict] = []
    pruned = np.zeros(n, bool)
    t0 = time.perf_counter()
    costs = np.array([cost(sp.key_obj[k]) if cost else 1.0 for k in sp.keys])
    costs = costs / costs[lossy].mean() if lossy else costs

    fr = _Front(sp)
    for k in known:
        fr.add(k, 100.0)

    def evaluate(j, why):
        k = sp.keys[j]
        known[k] = float(quality(sp.key_obj[k]))
        evaluated.append(k)
        fr.add(k, known[k])
        trace.append(fr.hv)
        log.append({"key": key_name(sp.key_obj[k]), "quality": known[k], "why": why, "hv": trace[-1]})
        bar.update(1)

    bar = tqdm(total=budget, desc=f"bayes ({acquisition})", disable=not progress)
    # spread cold start over the keys sorted by ratio, most aggressive first
    order = sorted(lossy, key=lambda j: -sp.key_ratio[j])
    if order:
        for i in np.unique(np.linspace(0, len(order) - 1, min(cold_start, len(order), budget)).round().astype(int)):
            evaluate(order[i], "cold start")
    stopped, quiet = "budget", 0
    kernel = ConstantKernel(1.0, (1e-2, 1e3)) * Matern(length_scale=np.ones(sp.X.shape[1]) if ard else 1.0,
                                                       length_scale_bounds=(5e-2, 2e1), nu=1.5) \
        + WhiteKernel(1e-2, (1e-5, 1.0))
    while len(evaluated) < budget:
        remaining = [j for j in lossy if sp.keys[j] not in known and not pruned[j]]
        if not remaining:
            stopped = "space exhausted (all keys evaluated or pruned)"
            break
        tr = [j for j in range(n) if sp.keys[j] in known and not sp.lossless[j]]
        # the GP models quality clipped to [floor - 10, cap]: below that every key is equally
        # useless, and a 0..100 range would let broken keys dominate the fit
        y = np.array([known[sp.keys[j]] for j in tr])
        gp = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=restarts, random_state=seed)
        # BLAS threads fight over tiny matrices (7x slower on a busy 2-core machine)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            gp.fit(sp.X[tr], y)
            mu, sd = gp.predict(sp.X[remaining], return_std=True)
        sd = np.maximum(sd, 1e-3)
        lo, hi = _bounds(sp, known, mono_tol) if prune else (np.full(n, -np.inf), np.full(n, np.inf))
        mu = np.clip(mu, lo[remaining], hi[remaining])
        frac = len(evaluated) / budget
        w = explore * max(0.1, 0.99 ** len(evaluated)) * (1.0 if frac < 0.2 else 0.5)
        front, hv0 = fr.pts, fr.hv
        rem = np.array(remaining)
        if acquisition == "paper":
            kr = sp.key_ratio[rem]
            pf = norm.cdf((mu - target) / sd)
            acq = kr * pf + w * (sd / sd.max()) * kr.mean()
            score_imp = kr * pf
            # reference pruning: a key whose optimistic quality is below the target is out
            if prune:
                out = hi[rem] < target
                pruned[rem[out]] = True
                acq[out] = -np.inf
        else:
            imp = np.zeros(len(rem))
            skip = np.zeros(len(rem), bool)
            for t, j in enumerate(rem):
                mem = sp.members[sp.keys[j]]
                if prune and np.isfinite(hi[j]) and (hi[j] <= floor or _dominated(sp.key_points(sp.keys[j], hi[j]), front)):
                    pruned[j] = True  # sound: monotonicity bounds its quality, it cannot add volume
                    continue
                q_opt = min(mu[t] + 3 * sd[t], hi[j])
                if q_opt <= floor or _dominated(sp.key_points(sp.keys[j], q_opt), front):
                    skip[t] = True  # implausible under the GP now; may come back later
                    continue
                qs = np.clip(mu[t] + sd[t] * _GH_Z, lo[j], hi[j])
                vals = []
                for qv in qs:
                    if qv <= floor:
                        vals.append(0.0)
                        continue
                    pts = objectives(sp.ratio[mem], np.full(len(mem), qv), sp.ms[mem])
                    # dominated points add no volume, so no Pareto filtering is needed here
                    vals.append(hypervolume(np.concatenate([front, pts]), sp.ref) - hv0)
                imp[t] = float(np.dot(_GH_W, vals))
            score_imp = imp
            bonus = w * (sd / sd.max()) * (imp[imp > 0].mean() if (imp > 0).any() else 0.0)
            acq = imp / costs[rem] + bonus
            acq[pruned[rem] | skip] = -np.inf
        if not np.isfinite(acq).any():
            stopped = "space exhausted (all remaining keys pruned)"
            break
        best = int(np.argmax(acq + 1e-12 * rng.random(len(acq))))
        if early_stop and acquisition == "ehvi" and hv0 > 0:
            quiet = quiet + 1 if float(score_imp.max()) < stop_frac * hv0 else 0
            if quiet >= patience:
                stopped = f"early stop: expected improvement < {stop_frac:g} x HV for {patience} iterations"
                break
        evaluate(int(rem[best]), f"acq={acq[best]:.4g}")
        if early_stop and acquisition == "paper" and len(log) > budget // 10:
            pass
    bar.close()
    for r in records:
        r.quality = known.get(r.key)
    return SearchResult(f"bayes-{acquisition}", records, evaluated, trace, time.perf_counter() - t0, stopped, log)


def _dominated(pts: np.ndarray, front: np.ndarray) -> bool:
    """True if every row of ``pts`` is weakly dominated by some front point."""
    if len(front) == 0:
        return False
    for p in pts:
        if not ((front[:, 0] >= p[0]) & (front[:, 1] >= p[1]) & (front[:, 2] <= p[2])).any():
            return False
    return True


# ================================================================= library


def pareto_records(records: list[Record], floor: float = QUALITY_FLOOR) -> list[Record]:
    known = [r for r in records if r.quality is not None and r.quality >= floor and r.ratio >= 1.01]
    if not known:
        return []
    pts = objectives([r.ratio for r in known], [r.quality for r in known], [r.codec_ms_per_MB for r in known])
    m = pareto_mask(pts)
    return sorted([r for r, keep in zip(known, m) if keep], key=lambda r: -r.ratio)


def load_records(path: str) -> tuple[list[Record], dict, dict]:
    """``(records, method, details)`` of a file written by ``kvserve profile --records``."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        recs = [Record(r["name"], r["config"], quality_key(r["config"]), float(r["ratio"]), float(r["encode_MBps"]),
                       float(r["decode_MBps"]), None if r["quality"] is None else float(r["quality"]))
                for r in d["records"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KVServeError(f"{path}: not a records file of kvserve profile --records ({e})") from None
    return recs, d.get("method", {}), d.get("details", {})


def confirm_candidates(records: list[Record], details: dict, floor: float = QUALITY_FLOOR) -> list[dict]:
    """The configurations a task profile's confirmation should measure: one per evaluated lossy
    key (its highest-ratio codec variant) whose search CI reaches ``floor`` (a key whose whole
    CI lies below the floor is out even on few items)."""
    best: dict[str, Record] = {}
    for r in records:
        if r.quality is None or is_lossless(json.loads(r.key)):
            continue
        ci = (details.get(r.key) or {}).get("quality_ci")
        if ci is not None and ci[1] < floor:
            continue
        if r.key not in best or r.ratio > best[r.key].ratio:
            best[r.key] = r
    return [r.config for r in sorted(best.values(), key=lambda r: -r.ratio)]


def confirm(records: list[Record], details: dict, rows: list[dict], n_boot: int = 2000):
    """Second fidelity of a task profile: the search's few-item qualities are replaced by
    measurements on many more items (``rows`` of :func:`kvserve.tasks.run_item`, named by
    configuration, e.g. from ``benchmarks/kvserve_tasks.py run --split tune``).

    The confirmed keys are those with a configuration among the rows' profiles; they are
    compared on exactly the QA items every one of them has. Each confirmed key's quality
    becomes its relative task accuracy over those items (details: CI, agreement, KL, items,
    and the search's figures under ``search``); lossless keys stay 100; every other key loses
    its quality (its few-item estimate is not trusted into the library). Rows from the test
    split are refused. Returns ``(records, details, n_items)`` (new objects)."""
    from . import tasks

    by_name = {r.name: r for r in records}
    for r in rows:
        if r["task"] == "qa" and tasks.split_of(r["uid"].split("-")[1]) != "tune":
            raise KVServeError(f"row {r['uid']} is a test-split item: a library is confirmed on tune items only")
    names = sorted({p for r in rows for p in r["profiles"] if p in by_name})
    if not names:
        raise KVServeError("no row profile is a configuration of these records: nothing to confirm")
    keys = {}
    for n in names:
        keys.setdefault(by_name[n].key, n)
    qa = [r for r in rows if r["task"] == "qa" and all(n in r["profiles"] for n in keys.values())]
    if not qa:
        raise KVServeError("no QA item has every confirmed configuration")
    new_details, quality = {}, {}
    for key, n in keys.items():
        res = tasks.summarize(qa, [n], n_boot=n_boot)[0]
        if "task_rel_acc" not in res:
            raise KVServeError("bf16 scored nothing on the confirmation items: relative accuracy undefined")
        quality[key] = res["task_rel_acc"]
        new_details[key] = {"quality_ci": [round(x, 3) for x in res["task_rel_acc_ci"]], "items": res["qa_items"],
                            "answer_agree": round(res["answer_agree"], 4), "answer_kl": round(res["answer_kl"], 6),
                            "f1": round(res["f1"], 5), "f1_bf16": round(res["f1_bf16"], 5),
                            "search": details.get(key)}
    out = []
    for r in records:
        q = 100.0 if is_lossless(json.loads(r.key)) else quality.get(r.key)
        out.append(Record(r.name, r.config, r.key, r.ratio, r.encode_MBps, r.decode_MBps, q))
    return out, new_details, len(qa)


def build_library(records: list[Record], meta: dict, floor: float = QUALITY_FLOOR, details: dict | None = None,
                  min_agree: float = MIN_ANSWER_AGREE):
    """A :class:`kvserve.controller.Library` of the 3D Pareto set of evaluated records.

    Without ``details`` the quality is relative perplexity, capped at 100 (``quality_metric``
    ``rel_ppl``; the measured value in ``rel_ppl``). With ``details`` (a quality key's
    measurement record from :class:`TaskBench` or :func:`confirm`) it is relative task
    accuracy, stored as measured, above 100 included (``quality_metric`` ``task_rel_acc``),
    with each entry's ``quality_ci`` (paired bootstrap 95% CI), ``answer_agree``,
    ``answer_kl`` and ``items``; lossless entries are 100 by construction (CI [100, 100]).
    A lossy key whose answer agreement with bf16 is below ``min_agree`` is withheld before the
    Pareto selection (meta ``min_answer_agree``, and ``withheld``: its figures): when half of
    bf16's answers change, the changed answers' F1 decides the ratio of two small means, and
    it did not carry over to other items. The Pareto selection caps quality at 100 either way,
    so noise above 100 cannot make a point of its own."""
    if details is None:
        front = _front_or_error(records, floor)
        entries = [Entry(r.name, r.config, r.ratio, min(r.quality, QUALITY_CAP), r.encode_MBps, r.decode_MBps,
                         {"rel_ppl": r.quality}) for r in front]
        return Library(entries, {"quality_metric": "rel_ppl", "quality_floor": floor, **meta})
    lossless = {"quality_ci": [100.0, 100.0], "items": 0, "answer_agree": 1.0, "answer_kl": 0.0}
    withheld, kept = {}, []
    for r in records:
        d = details.get(r.key) or lossless
        if r.quality is not None and r.quality >= floor and d.get("answer_agree", 1.0) < min_agree:
            w = withheld.setdefault(key_name(json.loads(r.key)), {"ratio": 0.0, "quality": round(r.quality, 3),
                                                                  "quality_ci": d.get("quality_ci"),
                                                                  "answer_agree": d["answer_agree"],
                                                                  "items": d.get("items")})
            w["ratio"] = round(max(w["ratio"], r.ratio), 3)
        else:
            kept.append(r)
    front = _front_or_error(kept, floor)
    entries = [Entry(r.name, r.config, r.ratio, r.quality, r.encode_MBps, r.decode_MBps,
                     {"task_rel_acc": r.quality, **(details.get(r.key) or lossless)}) for r in front]
    return Library(entries, {"quality_metric": "task_rel_acc", "quality_floor": floor, "min_answer_agree": min_agree,
                             "withheld": dict(sorted(withheld.items(), key=lambda kv: -kv[1]["ratio"])), **meta})


def split_withheld(records: list[Record], lib) -> tuple[list[Record], list[Record]]:
    """``(kept, withheld)``: the records of the keys ``lib`` withheld (its meta ``withheld``,
    evaluated records only) apart from the others, e.g. to plot the front the library holds."""
    names = set(lib.meta.get("withheld", {}))
    held = {id(r) for r in records if r.quality is not None and key_name(json.loads(r.key)) in names}
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]


def _front_or_error(records: list[Record], floor: float) -> list[Record]:
    front = pareto_records(records, floor)
    if not front:
        raise KVServeError("no evaluated configuration meets the quality floor: empty library")
    return front


def plot_front(path: str, records: list[Record], title: str = "", floor: float = QUALITY_FLOOR,
               overlay: list[Record] | None = None, overlay_label: str = "",
               ylabel: str = "quality (rel. perplexity x 100)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    known = [r for r in records if r.quality is not None]
    front = pareto_records(records, floor)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (xa, xl) in zip(axes, [("ratio", "compression ratio"), ("codec_ms_per_MB", "codec ms per MB (enc + dec)")]):
        ax.scatter([getattr(r, xa) for r in known], [r.quality for r in known], s=6, c="0.75", label="evaluated")
        sc = ax.scatter([getattr(r, xa) for r in front], [r.quality for r in front], s=22,
                        c=[r.codec_ms_per_MB if xa == "ratio" else r.ratio for r in front], cmap="viridis",
                        label="3D Pareto set", edgecolors="k", linewidths=0.3)
        if overlay:
            ax.scatter([getattr(r, xa) for r in overlay], [r.quality for r in overlay], s=40, facecolors="none",
                       edgecolors="r", label=overlay_label)
        fig.colorbar(sc, ax=ax, label="codec ms/MB" if xa == "ratio" else "ratio")
        ax.axhline(floor, color="r", lw=0.5, ls="--")
        ax.set_xlabel(xl)
        ax.set_ylabel(ylabel)
        ax.set_ylim(max(floor - 10, min([r.quality for r in known] + [floor])), None)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def refresh_speeds(lib, cheap: Callable[[dict], tuple[float, float, float]], repeats: int = 5, log=None):
    """A copy of ``lib`` whose entries' codec speeds are measured again with ``cheap``
    (best of ``repeats``), e.g. after a codec got faster. Ratios are measured again too:
    they may move by float rounding (e.g. a transform computed in another order), but a
    change of more than 1% means the encoding itself changed, and that needs a new profile.
    Qualities are kept."""
    import dataclasses

    if repeats < 1:
        raise KVServeError("repeats must be at least 1")
    entries, changes = [], []
    for e in lib.entries:
        runs = [cheap(e.config) for _ in range(repeats)]
        ratio = runs[0][0]
        if not math.isclose(ratio, e.ratio, rel_tol=0.01):
            raise KVServeError(f"{e.name}: ratio {ratio:.4f} now, {e.ratio:.4f} in the library; the encoding "
                               "changed, so profile again instead of refreshing speeds")
        enc, dec = max(r[1] for r in runs), max(r[2] for r in runs)
        entries.append(dataclasses.replace(e, ratio=ratio, encode_MBps=enc, decode_MBps=dec))
        changes.append({"name": e.name, "ratio": [e.ratio, ratio], "encode_MBps": [round(e.encode_MBps, 1), round(enc, 1)],
                        "decode_MBps": [round(e.decode_MBps, 1), round(dec, 1)]})
        if log:
            log(f"  {e.name:34s} enc {e.encode_MBps:6.0f} -> {enc:6.0f}  dec {e.decode_MBps:6.0f} -> {dec:6.0f} MB/s")
    meta = {**lib.meta, "speeds_refreshed": {"date": time.strftime("%Y-%m-%d"), "repeats": repeats,
                                             "statistic": "best of repeats", "changes": changes}}
    return Library(entries, meta)
