"""Quantizers: float32 KV groups -> small-integer symbols plus side information.

``encode(x, layer_ids, which, geometry) -> list[Part]`` with ``x`` of shape
``(n, B, H, T, D)`` (float32, n stacked layers), ``which`` in ``{"k", "v"}`` and
``geometry = (num_layers, num_kv_heads)`` of the whole model. Symbol parts (``bits`` set,
uint8 values ``< 2**bits``, or the bf16 passthrough with ``bits=16``) go to the pipeline's
lossless codec; side parts (``bits=None``: scales, minima, full-precision windows, masks)
are stored raw. ``decode(parts, shape, layer_ids, which) -> x_hat`` reverses it, reading
everything it needs from ``parts`` (no shared state with the encoder).

Methods: ``none`` (bf16 passthrough), ``kvserve`` (KVServe mixed precision, arXiv
2605.13734), ``kivi`` (KIVI, ICML'24, arXiv 2402.02750) and ``cachegen`` (CacheGen,
SIGCOMM'24, arXiv 2310.07240).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from ..errors import KVServeError
from .base import Stage, register


@dataclass
class Part:
    """One named array of a bundle. ``bits`` set -> symbols for the codec; None -> raw side info.

    ``dtype`` is the numpy dtype name, or ``"bfloat16"`` for uint16 arrays holding bf16 bits.
    """

    name: str
    array: np.ndarray
    bits: int | None = None
    dtype: str = ""

    def __post_init__(self):
        if not self.dtype:
            self.dtype = self.array.dtype.name


def _bf16_to_np(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)


def _np_to_bf16(a: np.ndarray, shape) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).reshape(shape)


def _side(t: torch.Tensor, name: str) -> Part:
    """Side info as float16 when it fits (finite), else float32."""
    h = t.to(torch.float16)
    if bool(torch.isfinite(h).all()):
        return Part(name, h.contiguous().numpy().reshape(-1))
    return Part(name, t.to(torch.float32).contiguous().numpy().reshape(-1))


def _get(parts: dict, name: str, count: int) -> np.ndarray:
    a = parts.get(name)
    if a is None:
        raise KVServeError(f"bundle lacks part {name!r}")
    if a.size != count:
        raise KVServeError(f"part {name!r} has {a.size} elements, expected {count}")
    return a


def _ft(parts, name, shape) -> torch.Tensor:
    a = _get(parts, name, math.prod(shape))
    if a.dtype not in (np.float16, np.float32):
        raise KVServeError(f"part {name!r} must be float16/float32")
    return torch.from_numpy(a.astype(np.float32, copy=False)).reshape(shape)


def bits_for(levels: int) -> int:
    """Bits needed to store symbols ``0 .. levels-1``."""
    return max(1, int(levels - 1).bit_length())


def _minmax(x: torch.Tensor, dims, levels, parts: list, prefix: str) -> torch.Tensor:
    """Asymmetric min-max quantization with ``levels`` levels (tensor or int) over ``dims``.

    Stores min and range (float16), returns uint8 symbols in ``[0, levels-1]``.
    """
    mn = x.amin(dim=dims, keepdim=True)
    rg = x.amax(dim=dims, keepdim=True) - mn
    pm, pr = _side(mn, prefix + "min"), _side(rg, prefix + "range")
    parts += [pm, pr]
    mn = torch.from_numpy(pm.array.astype(np.float32)).reshape(mn.shape)
    rg = torch.from_numpy(pr.array.astype(np.float32)).reshape(rg.shape)
    return _quantize_with(x, levels, mn, rg.clamp_min(1e-8))


def _quantize_with(x: torch.Tensor, levels, mn: torch.Tensor, rg: torch.Tensor) -> torch.Tensor:
    """uint8 ``clamp(round((x - mn) * (levels - 1) / rg), 0, levels - 1)``."""
    lv = levels - 1 if isinstance(levels, int) else (levels - 1).to(torch.float32)
    inv = lv / rg
    q = (x - mn).mul_(inv).round_().clamp_(min=0)
    q = q.clamp_(max=lv)
    return q.to(torch.uint8)


def compact_key_minmax(x: torch.Tensor, dims, parts: list):
    """Grouped key statistics as :func:`compact_key_codes` (parts appended): ``(min, range)``
    as the decoder computes them, on ``x``'s device. The min/max reductions run where ``x``
    lives; the codes are made on the host (the CPU and the device encoders both call this)."""
    mn = x.amin(dim=dims, keepdim=True)
    rg = x.amax(dim=dims, keepdim=True) - mn
    codes, mn, rg = compact_key_codes(mn.cpu(), rg.cpu())
    parts += codes
    return mn.to(x.device), rg.to(x.device)


def _deminmax(q: torch.Tensor, parts: dict, prefix: str, stat_shape, levels) -> torch.Tensor:
    return _dequantize_with(q, *_stats(parts, prefix, stat_shape), levels)


def _dequantize_with(q: torch.Tensor, mn: torch.Tensor, rg: torch.Tensor, levels) -> torch.Tensor:
    lv = levels - 1 if isinstance(levels, int) else (levels - 1).to(torch.float32)
    return q.to(torch.float32).mul_(rg / lv).add_(mn)


_RC = 32.0  # range codes: steps of 2**(1/32) below the layer's largest range
_MC = 128.0  # min codes: units of range/128


def _minmax_compact(x: torch.Tensor, dims, levels, parts: list, prefix: str) -> torch.Tensor:
    """As :func:`_minmax`, but each (min, range) pair costs 2 bytes instead of 4: the range
    as a uint8 code ``c`` (``range_hat = rmax * 2**((c - 255)/32) >= range``, ``rmax`` one
    float32 per stacked layer: the layer's largest range) and the min as an int8 code in
    units of ``range_hat/128``. If a min does not fit (it lies more than one range from
    zero) the part falls back to fp16 stats. ``x`` is ``(n, ...)`` with dim 0 not reduced."""
    mn = x.amin(dim=dims, keepdim=True)
    rg = x.amax(dim=dims, keepdim=True) - mn
    got = None if 0 in dims else _compact_codes(mn, rg, prefix)
    if got is None:
        return _minmax(x, dims, levels, parts, prefix)
    codes, mn, rg = got
    parts += codes
    lv = levels - 1 if isinstance(levels, int) else (levels - 1).to(torch.float32)
    inv = lv / rg
    q = (x - mn).mul_(inv).round_().clamp_(min=0)
    q = q.clamp_(max=lv)
    return q.to(torch.uint8)


def _compact_codes(mn: torch.Tensor, rg: torch.Tensor, prefix: str):
    """The compact code parts (``rmax``, ``rcode``, ``mcode``) of CPU stats ``mn``, ``rg`` (dim 0
    = layers) and the (min, range) they decode to, or None when they do not fit (the caller
    falls back to fp16 stats). The GPU path calls this on the host: ``log2``/``exp2`` are
    libm functions whose float32 results differ between devices (and, on the CPU, between
    vectorised and scalar loops), so both paths must compute them here."""
    if rg.numel() == 0:
        return None
    rmax = rg.reshape(rg.shape[0], -1).amax(1).to(torch.float32)
    if not bool(torch.isfinite(rmax).all() and (rmax > 0).all()):
        return None
    rmax = rmax.reshape((-1,) + (1,) * (rg.dim() - 1))
    rc = torch.ceil(torch.log2(torch.maximum(rg, rmax * 2.0 ** -7.9) / rmax) * _RC - 1e-6).clamp_(-255, 0) + 255
    rhat = rmax * torch.exp2((rc - 255) / _RC)
    mc = torch.round(mn / (rhat / _MC))
    if bool((mc < -128).any() or (mc > 127).any()):
        return None
    codes = [Part(prefix + "rmax", rmax.numpy().reshape(-1).copy()),
             Part(prefix + "rcode", rc.to(torch.uint8).numpy().reshape(-1)),
             Part(prefix + "mcode", mc.to(torch.int8).numpy().reshape(-1).view(np.uint8))]
    return (codes, *_compact_stats(rc, mc, rmax))


def _compact_stats(rc: torch.Tensor, mc: torch.Tensor, rmax):
    rg = rmax * torch.exp2((rc.to(torch.float32) - 255) / _RC)
    mn = mc.to(torch.float32) * (rg / _MC)
    # the rounded min may leave the maximum up to range/256 above the top level: clamped
    return mn, rg


def compact_key_codes(mn: torch.Tensor, rg: torch.Tensor, prefix: str = ""):
    """Compact 2-byte statistics of token-grouped key channels (CPU tensors ``mn``, ``rg`` of
    shape ``(n, B, H, G, 1, D)``): a float16 *centre* per (layer, batch, head, channel), the
    midpoint of the channel's smallest min and largest max over its groups, and each group's
    (min - centre, range) as :func:`_compact_codes` would store it, except that a group lying
    further from the centre than its own range widens its range code until its min code
    fits (it never falls back). Returns ``(parts, min, range)``, the float32 (min, range) the
    decoder computes. Host-only (``log2``/``exp2``), as the value codes; the GPU path calls it."""
    lo, hi = mn.amin(dim=3, keepdim=True), (mn + rg).amax(dim=3, keepdim=True)
    pc = _side((lo + hi) * 0.5, prefix + "centre")
    c = torch.from_numpy(pc.array.astype(np.float32)).reshape(lo.shape)
    rel = mn - c
    need = torch.maximum(rg, rel.abs() * (_MC / 127.0))  # a range whose min code is within [-128, 127]
    rmax = need.reshape(need.shape[0], -1).amax(1).to(torch.float32).clamp_min(1e-30)
    rmax = rmax.reshape((-1,) + (1,) * (need.dim() - 1))
    rc = torch.ceil(torch.log2(torch.maximum(need, rmax * 2.0 ** -7.9) / rmax) * _RC - 1e-6).clamp_(-255, 0) + 255
    rhat = rmax * torch.exp2((rc - 255) / _RC)
    mc = torch.round(rel / (rhat / _MC)).clamp_(-128, 127)
    parts = [pc, Part(prefix + "rmax", rmax.numpy().reshape(-1).copy()),
             Part(prefix + "rcode", rc.to(torch.uint8).numpy().reshape(-1)),
             Part(prefix + "mcode", mc.to(torch.int8).numpy().reshape(-1).view(np.uint8))]
    mn_hat, rg_hat = _compact_stats(rc, mc, rmax)
    return parts, mn_hat + c, rg_hat


def key_stats(parts: dict, prefix: str, stat_shape):
    """(min, range) float32 of compact key statistics (:func:`compact_key_codes`): the
    group codes as :func:`_stats` decodes them, plus the channel centre."""
    mn, rg = _stats(parts, prefix, stat_shape)
    cshape = stat_shape[:3] + (1,) + stat_shape[4:]
    return mn + _ft(parts, prefix + "centre", cshape), rg


def _stats(parts: dict, prefix: str, stat_shape):
    """(min, range) float32 from fp16/fp32 stats or compact codes, whichever the part holds."""
    if prefix + "rcode" in parts:
        cnt = math.prod(stat_shape)
        rmax_a = _get(parts, prefix + "rmax", stat_shape[0])
        if rmax_a.dtype != np.float32 or not (np.isfinite(rmax_a).all() and (rmax_a > 0).all()):
            raise KVServeError("bad compact stats")
        rc = torch.from_numpy(_get(parts, prefix + "rcode", cnt).astype(np.float32)).reshape(stat_shape)
        mc = torch.from_numpy(_get(parts, prefix + "mcode", cnt).view(np.int8).astype(np.float32)).reshape(stat_shape)
        rmax = torch.from_numpy(rmax_a.copy()).reshape((-1,) + (1,) * (len(stat_shape) - 1))
        return _compact_stats(rc, mc, rmax)
    return _ft(parts, prefix + "min", stat_shape), _ft(parts, prefix + "range", stat_shape)


class Quantizer(Stage):
    kind = "quantizer"
    lossy = True

    def encode(self, x, layer_ids, which, geometry) -> list[Part]:
        raise NotImplementedError

    def decode(self, parts, shape, layer_ids, which) -> torch.Tensor:
        raise NotImplementedError


@register
class NoQuant(Quantizer):
    """bf16 passthrough: one symbol part of 16-bit words (exact for bf16 input)."""

    stage_id = "none"
    lossy = False

    def encode(self, x, layer_ids, which, geometry):
        return [Part("x", _bf16_to_np(x), bits=16, dtype="bfloat16")]

    def decode(self, parts, shape, layer_ids, which):
        a = _get(parts, "x", math.prod(shape))
        return _np_to_bf16(a, shape).to(torch.float32)


# ---------------------------------------------------------------- full-precision windows


class _Windowed(Quantizer):
    """Shared handling of the first ``keep_sinks`` and last ``keep_recent`` tokens, kept in bf16
    (attention sinks and the KIVI residual window). ``_span(T)`` gives (start, stop) of the
    quantized middle."""

    def _span(self, t: int) -> tuple[int, int]:
        s = min(self.keep_sinks, t)
        e = max(s, t - self.keep_recent)
        return s, e

    def _check_windows(self):
        for p in ("keep_sinks", "keep_recent"):
            v = getattr(self, p)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 1 << 20:
                raise KVServeError(f"{self.stage_id}: {p} must be an int in [0, 2**20]")

    def _encode_windows(self, x, s, e, parts):
        if s > 0:
            parts.append(Part("sink", _bf16_to_np(x[..., :s, :]), dtype="bfloat16"))
        if e < x.shape[3]:
            parts.append(Part("recent", _bf16_to_np(x[..., e:, :]), dtype="bfloat16"))

    def _decode_windows(self, out, parts, shape, s, e):
        n, b, h, t, d = shape
        if s > 0:
            out[..., :s, :] = _np_to_bf16(_get(parts, "sink", n * b * h * s * d), (n, b, h, s, d)).float()
        if e < t:
            out[..., e:, :] = _np_to_bf16(_get(parts, "recent", n * b * h * (t - e) * d), (n, b, h, t - e, d)).float()


# ---------------------------------------------------------------- KVServe mixed precision


@functools.lru_cache(maxsize=32)
def load_scores(name: str, key: str = "scores") -> np.ndarray:
    """Per-(layer, kv head) importance scores shipped with the package (``scores/NAME.json``);
    ``key`` picks ``"scores"`` (keys and values together), ``"key_scores"`` or ``"value_scores"``."""
    try:
        text = resources.files("kvserve").joinpath("scores", f"{name}.json").read_text()
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise KVServeError(f"unknown importance scores {name!r}") from exc
    doc = json.loads(text)
    if key not in doc:
        raise KVServeError(f"score file {name!r} has no {key!r}")
    return np.asarray(doc[key], dtype=np.float64)


@functools.lru_cache(maxsize=32)
def _has_key(name: str, key: str) -> bool:
    try:
        load_scores(name, key)
    except KVServeError:
        return False
    return True


def _check_levels(sid, name, v, lo=2, hi=256):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise KVServeError(f"{sid}: {name} must be an int in [{lo}, {hi}]")


@register
class KVServeQuant(_Windowed):
    """KVServe mixed-precision asymmetric min-max quantization.

    Precision is a *level count* (symbols ``0..levels-1``, ``scale = range/(levels-1)``).
    Keys use ``key_axis`` (``"channel"``: stats per (layer, head, channel) over tokens,
    optionally in token groups of ``key_group``; KIVI-style), values ``value_axis``
    (``"token"``: per token over heads and head_dim, as KVServe; ``"token_head"``: per
    token and head). A ``low_fraction`` of the (layer, kv-head) pairs gets the ``low_*``
    level counts: with ``split="head"`` the pairs with the lowest importance ``scores``
    (a packaged score file name, e.g. ``"smollm2"`` from ``kvserve calibrate``; a list of
    names, the first whose geometry fits the model is used, and if none fits the pairs are
    ranked by depth as with ``split="layer"``; or an explicit ``[layers][heads]`` list), with
    ``split="layer"`` the last layers. The resolved low mask travels in the bundle.

    ``tiers`` (default None) generalises the two-way split to any number of precision
    tiers: ``[[end_fraction, key_levels, value_levels], ...]`` with end fractions increasing
    to 1.0 over the (layer, kv-head) pairs ranked from least to most important (by
    ``scores`` for ``split="head"``, from the last layer backwards for ``split="layer"``).
    E.g. ``[[0.3, 5, 3], [0.8, 8, 5], [1.0, 12, 6]]``: the 30% least important pairs get
    5/3 levels, the next 50% 8/5, the top 20% 12/6. When set, ``high_*``/``low_*`` and
    ``low_fraction`` are unused (``low_fraction`` must stay 0); the per-pair tier index
    travels in the bundle (part ``tier``).

    ``compact_value_stats`` (default False) stores the values' (min, range) in 2 bytes
    instead of 4 (8-bit log-coded range, 8-bit min in range/64 units; see
    :func:`_minmax_compact`): with per-token value stats that side information is a few
    percent of the bundle.

    ``kind_scores`` (default False; tiers with packaged score files only) ranks keys by the
    file's ``key_scores`` and values by its ``value_scores`` (each measured with only that
    half of the head coarsened), so a head can keep precise keys and coarse values (a file
    without them falls back to its joint ``scores``).

    ``recent_key_levels`` / ``recent_value_levels`` (default 0: bf16) quantize the recent
    window (the last ``keep_recent`` tokens, plus the remainder of the key grouping for keys)
    instead of storing it in bf16: min-max along the same axes as the middle (keys per
    channel over the whole window, values per ``value_axis``) at these level counts for
    every pair, with float16 statistics (parts ``rq``, ``rmin``, ``rrange``). So the tokens
    nearest the question keep high precision at a fraction of bf16's cost, and a partial last
    key group is quantized rather than kept in bf16.

    ``compact_key_stats`` (default False; token-grouped channel keys only) stores each key
    group's (min, range) in 2 bytes instead of 4, relative to a float16 centre per channel
    (:func:`compact_key_codes`): with 32-token groups that halves the keys' side
    information (1 to 0.5 bit per key element).
    """

    stage_id = "kvserve"
    params = {
        "high_key_levels": 8, "high_value_levels": 8, "low_key_levels": 6, "low_value_levels": 4,
        "low_fraction": 0.0, "split": "head", "scores": None,
        "key_axis": "channel", "value_axis": "token", "key_group": 0,
        "keep_sinks": 0, "keep_recent": 0, "tiers": None, "compact_value_stats": False,
        "kind_scores": False, "recent_key_levels": 0, "recent_value_levels": 0, "compact_key_stats": False,
    }
    #: parameters added after bundles and profiles were written: left out of the config while
    #: at their default, so older configs keep their identity (and bundles their bytes)
    optional = {"recent_key_levels": 0, "recent_value_levels": 0, "compact_key_stats": False}

    def get_config(self):
        cfg = super().get_config()
        for k, default in self.optional.items():
            if cfg[k] == default and type(cfg[k]) is type(default):
                del cfg[k]
        return cfg

    def validate(self):
        for p in ("high_key_levels", "high_value_levels", "low_key_levels", "low_value_levels"):
            _check_levels(self.stage_id, p, getattr(self, p))
        if not isinstance(self.low_fraction, (int, float)) or isinstance(self.low_fraction, bool) \
                or not 0.0 <= self.low_fraction <= 1.0:
            raise KVServeError("kvserve: low_fraction must be in [0, 1]")
        if self.split not in ("head", "layer"):
            raise KVServeError("kvserve: split must be 'head' or 'layer'")
        if self.key_axis not in ("channel", "token", "token_head"):
            raise KVServeError("kvserve: key_axis must be 'channel', 'token' or 'token_head'")
        if self.value_axis not in ("channel", "token", "token_head"):
            raise KVServeError("kvserve: value_axis must be 'channel', 'token' or 'token_head'")
        if not isinstance(self.key_group, int) or isinstance(self.key_group, bool) or not 0 <= self.key_group <= 1 << 20:
            raise KVServeError("kvserve: key_group must be an int >= 0 (0 = all tokens)")
        if self.scores is not None and not isinstance(self.scores, (str, list)):
            raise KVServeError("kvserve: scores must be null, a score-file name, a list of names or a [layers][heads] list")
        if self.split == "head" and self.low_fraction > 0 and self.scores is None:
            raise KVServeError("kvserve: split='head' with low_fraction > 0 needs scores")
        if self.tiers is not None:
            self._check_tiers()
        if not isinstance(self.kind_scores, bool):
            raise KVServeError("kvserve: kind_scores must be a bool")
        if self.kind_scores and (self.tiers is None or not isinstance(self.scores, (str, list))
                                 or (isinstance(self.scores, list) and not all(isinstance(x, str) for x in self.scores))):
            raise KVServeError("kvserve: kind_scores needs tiers and packaged score file name(s)")
        if not isinstance(self.compact_value_stats, bool):
            raise KVServeError("kvserve: compact_value_stats must be a bool")
        for p in ("recent_key_levels", "recent_value_levels"):
            v = getattr(self, p)
            if v != 0 or isinstance(v, bool):
                _check_levels(self.stage_id, f"{p} (0 = bf16)", v)
        if (self.recent_key_levels == 0) != (self.recent_value_levels == 0):
            raise KVServeError("kvserve: recent_key_levels and recent_value_levels are both 0 (bf16) or both set")
        if not isinstance(self.compact_key_stats, bool):
            raise KVServeError("kvserve: compact_key_stats must be a bool")
        if self.compact_key_stats and not self._grouped("k"):
            raise KVServeError("kvserve: compact_key_stats needs key_axis='channel' and key_group > 0")
        self._check_windows()
        self._resolve_tiers()

    def _check_tiers(self):
        t = self.tiers
        msg = "kvserve: tiers must be [[end_fraction, key_levels, value_levels], ...] increasing to 1.0 (at most 16)"
        if not isinstance(t, list) or not 1 <= len(t) <= 16:
            raise KVServeError(msg)
        prev = 0.0
        for row in t:
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], (int, float))
                    and not isinstance(row[0], bool) and prev < row[0] <= 1.0):
                raise KVServeError(msg)
            _check_levels(self.stage_id, "tier key_levels", row[1])
            _check_levels(self.stage_id, "tier value_levels", row[2])
            prev = row[0]
        if t[-1][0] != 1.0:
            raise KVServeError(msg)
        if self.low_fraction:
            raise KVServeError("kvserve: use either tiers or low_fraction, not both")
        if self.split == "head" and len(t) > 1 and self.scores is None:
            raise KVServeError("kvserve: split='head' with tiers needs scores")

    def _resolve_tiers(self) -> None:
        """The precision tiers every encode and decode works from: ``tiers`` as given, or the
        two-way split as tiers (``low_fraction`` of the pairs at the ``low_*`` levels first,
        then the rest at the ``high_*`` levels). ``_old_tier`` maps a pre-tiers bundle's
        ``lowmask`` values (0 high, 1 low) to these tiers (None: impossible there)."""
        if self.tiers is not None:
            self._tiers = [list(r) for r in self.tiers]
            self._old_tier = (None, None)
            return
        lf = float(self.low_fraction)
        low = [lf, self.low_key_levels, self.low_value_levels]
        high = [1.0, self.high_key_levels, self.high_value_levels]
        if lf <= 0.0:
            self._tiers, self._old_tier = [high], (0, None)
        elif lf >= 1.0:
            self._tiers, self._old_tier = [[1.0] + low[1:]], (None, 0)
        else:
            self._tiers, self._old_tier = [low, high], (1, 0)

    def _ranking(self, num_layers: int, num_heads: int, which: str = "") -> np.ndarray:
        """Flat (layer * heads + head) indices from least to most important."""
        if self.split == "layer":
            return np.arange(num_layers * num_heads)[::-1].reshape(num_layers, num_heads)[:, ::-1].reshape(-1)
        sc = self.score_array(num_layers, num_heads, which)
        return np.argsort(sc.reshape(-1), kind="stable")

    def tier_index(self, num_layers: int, num_heads: int, which: str = "") -> np.ndarray:
        """uint8 ``(num_layers, num_heads)``: the tier of each (layer, kv-head) pair. Tier
        boundaries count pairs (``split="head"``) or whole layers (``split="layer"``)."""
        n = num_layers * num_heads
        idx = np.zeros(n, dtype=np.uint8)
        if len(self._tiers) > 1:
            order = self._ranking(num_layers, num_heads, which)
            start = 0
            for ti, (end, _, _) in enumerate(self._tiers):
                if end >= 1.0:
                    stop = n
                elif self.split == "layer":
                    stop = int(round(end * num_layers)) * num_heads
                else:
                    stop = int(round(end * n))
                idx[order[start:stop]] = ti
                start = max(start, stop)
        return idx.reshape(num_layers, num_heads)

    def score_array(self, num_layers: int, num_heads: int, which: str = "") -> np.ndarray:
        """The ``(num_layers, num_heads)`` importance scores: from a packaged score file name,
        the first of a list of names whose geometry matches, or an explicit list
        (``which`` = ``"k"``/``"v"`` with ``kind_scores``: the keys'/values' own scores)."""
        sc = self.scores
        key = {"k": "key_scores", "v": "value_scores"}.get(which, "scores") if self.kind_scores else "scores"

        def load(name):  # a score file without per-kind scores falls back to its joint ones
            return load_scores(name, key if _has_key(name, key) else "scores")

        if isinstance(sc, list) and sc and all(isinstance(x, str) for x in sc):
            for name in sc:
                arr = load(name)
                if arr.shape == (num_layers, num_heads):
                    return arr
            # no calibrated model fits: rank by depth (the last layers are the least important)
            return np.repeat(-np.arange(num_layers, dtype=np.float64), num_heads).reshape(num_layers, num_heads)
        arr = load(sc) if isinstance(sc, str) else np.asarray(sc, dtype=np.float64)
        if arr.shape != (num_layers, num_heads):
            raise KVServeError(f"kvserve: scores have shape {arr.shape}, model has {(num_layers, num_heads)}")
        return arr

    def low_mask(self, num_layers: int, num_heads: int) -> np.ndarray:
        """Boolean ``(num_layers, num_heads)``: True where the two-way split gives the pair
        the ``low_*`` level counts (the first tier of the resolved split)."""
        if self.tiers is not None:
            raise KVServeError("kvserve: low_mask is for the two-way split; use tier_index with tiers")
        low = self._old_tier[1]
        return self.tier_index(num_layers, num_heads) == low if low is not None else \
            np.zeros((num_layers, num_heads), dtype=bool)

    def _axis(self, which):
        return self.key_axis if which == "k" else self.value_axis

    def _stat_dims(self, which):
        axis = self._axis(which)
        if axis == "channel":
            return (3,)
        return (2, 4) if axis == "token" else (4,)

    def _grouped(self, which) -> bool:
        """Keys with token-grouped channel stats (``key_group``)?"""
        return which == "k" and self._axis("k") == "channel" and bool(self.key_group)

    def _stat_layout(self, q, lv, which, n, b, h, tm, d):
        """``(q, stat_shape, lv)`` for dequantising the middle ``tm`` tokens: ``q`` and the level
        tensor reshaped for token-grouped channel statistics when ``key_group`` is set."""
        if self._grouped(which):
            g = self.key_group
            if tm % g:
                raise KVServeError("kvserve: token split not a multiple of key_group")
            return q.reshape(n, b, h, tm // g, g, d), (n, b, h, tm // g, 1, d), lv[..., None]
        return q, self._stat_shape(which, n, b, h, tm, d), lv

    def _middle(self, x, lv, which, s: int, e: int):
        """``(xm, lv, dims)`` for quantising the middle tokens ``x[..., s:e, :]``: reshaped into
        ``key_group``-token groups (and the level tensor with them) when keys are grouped, and
        the dims their statistics reduce over. Shared by the CPU and the device encoders."""
        n, b, h, _, d = x.shape
        xm = x[..., s:e, :]
        if self._grouped(which):
            g = self.key_group
            return xm.reshape(n, b, h, (e - s) // g, g, d), lv[..., None], (4,)
        return xm, lv, self._stat_dims(which)

    def _recent_levels(self, which) -> int:
        return self.recent_key_levels if which == "k" else self.recent_value_levels

    def _stat_shape(self, which, n, b, h, tw, d) -> tuple:
        """Shape of the (ungrouped) statistics of ``tw`` tokens: 1 along the reduced dims."""
        dims = self._stat_dims(which)
        return tuple(1 if i in dims else sz for i, sz in enumerate((n, b, h, tw, d)))

    def _tier_levels(self, which):
        return [r[1] if which == "k" else r[2] for r in self._tiers]

    def encode(self, x, layer_ids, which, geometry):
        n, b, h, t, d = x.shape
        s, e = self._span(t)
        parts: list[Part] = []
        tier = self.tier_index(*geometry, which)[list(layer_ids)]  # (n, H)
        parts.append(Part("tier", tier.reshape(-1).copy()))
        if self._grouped(which):  # the remainder of the token grouping joins the recent window
            e = s + (e - s) // self.key_group * self.key_group
        parts.append(Part("split", np.asarray([s, e], dtype=np.int64)))
        self._encode_windows(x, s, e if not self.recent_key_levels else t, parts)
        if self.recent_key_levels and e < t:
            lv = self._recent_levels(which)
            q = _minmax(x[..., e:, :], self._stat_dims(which), lv, parts, "r")
            parts.append(Part("rq", q.contiguous().numpy().reshape(-1), bits=bits_for(lv)))
        if e > s:
            tl = self._tier_levels(which)
            tier_t = torch.from_numpy(tier.astype(np.int64))
            lv = torch.tensor(tl, dtype=torch.float32)[tier_t][:, None, :, None, None]  # (n, 1, H, 1, 1)
            xm, lv, dims = self._middle(x, lv, which, s, e)
            if which == "k" and self.compact_key_stats:
                q = _quantize_with(xm, lv, *compact_key_minmax(xm, dims, parts))
            else:
                quant = _minmax_compact if (which == "v" and self.compact_value_stats) else _minmax
                q = quant(xm, dims, lv, parts, "")
            q = q.reshape(n, b, h, e - s, d).transpose(1, 2)  # (n, H, B, Tm, D)
            for ti, levels in enumerate(tl):
                sel = tier_t == ti
                if bool(sel.any()):
                    parts.append(Part(f"q{ti}", q[sel].contiguous().numpy().reshape(-1), bits=bits_for(levels)))
        return parts

    def _stored_tiers(self, parts, n: int, h: int) -> tuple[np.ndarray, list[str]]:
        """The bundle's per-pair tier table ``(n, H)`` and the part name of each tier's
        symbols; bundles written before tiers carry a ``lowmask`` (1 = low) and parts
        ``qhi``/``qlo`` instead."""
        ntiers = len(self._tiers)
        if "lowmask" in parts and "tier" not in parts:
            mask = _get(parts, "lowmask", n * h).reshape(n, h)
            hi, lo = self._old_tier
            if mask.dtype != np.uint8 or (mask.size and int(mask.max()) > 1) \
                    or (hi is None and bool((mask == 0).any())) or (lo is None and bool((mask == 1).any())):
                raise KVServeError("kvserve: bad low mask")
            tier = np.where(mask == 1, lo if lo is not None else 0, hi if hi is not None else 0).astype(np.uint8)
            names = [""] * ntiers
            if hi is not None:
                names[hi] = "qhi"
            if lo is not None:
                names[lo] = "qlo"
            return tier, names
        tier = _get(parts, "tier", n * h).reshape(n, h)
        if tier.dtype != np.uint8 or (tier.size and int(tier.max()) >= ntiers):
            raise KVServeError("kvserve: bad tier table")
        return tier, [f"q{ti}" for ti in range(ntiers)]

    def decode(self, parts, shape, layer_ids, which):
        n, b, h, t, d = shape
        tier, names = self._stored_tiers(parts, n, h)
        se = _get(parts, "split", 2)
        s, e = int(se[0]), int(se[1])
        if not 0 <= s <= e <= t:
            raise KVServeError("kvserve: bad token split")
        out = torch.empty(shape, dtype=torch.float32)
        self._decode_windows(out, parts, shape, s, e if not self.recent_key_levels else t)
        if self.recent_key_levels and e < t:
            lv, stat = self._recent_levels(which), self._stat_shape(which, n, b, h, t - e, d)
            q = torch.from_numpy(_get(parts, "rq", n * b * h * (t - e) * d)).reshape(n, b, h, t - e, d)
            out[..., e:, :] = _deminmax(q, parts, "r", stat, lv)
        if e > s:
            tm = e - s
            tl = self._tier_levels(which)
            tier_t = torch.from_numpy(tier.astype(np.int64))
            q = torch.empty((n, h, b, tm, d), dtype=torch.uint8)
            for ti in range(len(tl)):
                sel = tier_t == ti
                cnt = int(sel.sum())
                if cnt:
                    a = _get(parts, names[ti], cnt * b * tm * d)
                    q[sel] = torch.from_numpy(a).reshape(cnt, b, tm, d)
            q = q.transpose(1, 2)
            lv = torch.tensor(tl, dtype=torch.float32)[tier_t][:, None, :, None, None]
            q, stat, lv = self._stat_layout(q, lv, which, n, b, h, tm, d)
            if which == "k" and self.compact_key_stats:
                mn, rg = key_stats(parts, "", stat)
                out[..., s:e, :] = _dequantize_with(q, mn, rg, lv).reshape(n, b, h, tm, d)
            else:
                out[..., s:e, :] = _deminmax(q, parts, "", stat, lv).reshape(n, b, h, tm, d)
        return out


# ---------------------------------------------------------------- KIVI


@register
class KIVIQuant(_Windowed):
    """KIVI: keys per channel in groups of ``group_size`` tokens, values per token in groups of
    ``group_size`` channels, ``bits`` in {2, 4}, asymmetric min-max with fp16 min/range, and
    the most recent ``keep_recent`` tokens (plus any remainder of the token grouping) in bf16.
    """

    stage_id = "kivi"
    params = {"bits": 2, "group_size": 32, "keep_recent": 128, "keep_sinks": 0}

    def validate(self):
        if self.bits not in (1, 2, 3, 4, 8) or isinstance(self.bits, bool):
            raise KVServeError("kivi: bits must be one of 1, 2, 3, 4, 8")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or not 1 <= self.group_size <= 4096:
            raise KVServeError("kivi: group_size must be an int in [1, 4096]")
        self._check_windows()

    def _layout(self, t, d):
        s, e = self._span(t)
        g = self.group_size
        e = s + (e - s) // g * g
        gd = g if d % g == 0 else d  # value channel groups; whole head_dim if it does not divide
        return s, e, gd

    def _group_shapes(self, which, n, b, h, tm, d, gd):
        """``(symbol shape, statistic shape)`` of the quantized middle: keys in token groups,
        values in channel groups."""
        g = self.group_size
        if which == "k":
            return (n, b, h, tm // g, g, d), (n, b, h, tm // g, 1, d)
        return (n, b, h, tm, d // gd, gd), (n, b, h, tm, d // gd, 1)

    def encode(self, x, layer_ids, which, geometry):
        n, b, h, t, d = x.shape
        s, e, gd = self._layout(t, d)
        parts: list[Part] = []
        self._encode_windows(x, s, e, parts)
        if e > s:
            tm, g, lv = e - s, self.group_size, 1 << self.bits
            xm = x[..., s:e, :]
            if which == "k":
                q = _minmax(xm.reshape(n, b, h, tm // g, g, d), (4,), lv, parts, "")
            else:
                q = _minmax(xm.reshape(n, b, h, tm, d // gd, gd), (5,), lv, parts, "")
            parts.append(Part("q", q.contiguous().numpy().reshape(-1), bits=self.bits))
        return parts

    def decode(self, parts, shape, layer_ids, which):
        n, b, h, t, d = shape
        s, e, gd = self._layout(t, d)
        out = torch.empty(shape, dtype=torch.float32)
        self._decode_windows(out, parts, shape, s, e)
        if e > s:
            tm, g, lv = e - s, self.group_size, 1 << self.bits
            if which == "k":
                qs, stat = (n, b, h, tm // g, g, d), (n, b, h, tm // g, 1, d)
            else:
                qs, stat = (n, b, h, tm, d // gd, gd), (n, b, h, tm, d // gd, 1)
            q = torch.from_numpy(_get(parts, "q", n * b * h * tm * d)).reshape(qs)
            out[..., s:e, :] = _deminmax(q, parts, "", stat, lv).reshape(n, b, h, tm, d)
        return out


# ---------------------------------------------------------------- CacheGen


def _check_bands(sid, name, bands):
    ok = isinstance(bands, list) and 1 <= len(bands) <= 64
    prev = 0.0
    for item in bands if ok else []:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (int, float))
                and isinstance(item[1], int) and not isinstance(item[1], bool)):
            ok = False
            break
        if not prev < item[0] <= 1.0 or not 3 <= item[1] <= 256:
            ok = False
            break
        prev = item[0]
    if not ok or bands[-1][0] != 1.0:
        raise KVServeError(f"{sid}: {name} must be [[end_fraction, bins], ...] increasing to 1.0, bins in [3, 256]")


@register
class CacheGenQuant(Quantizer):
    """CacheGen-style symmetric per-token quantization with layer-banded bin counts.

    For a layer in a band with ``bins`` bins: ``C = bins // 2 - 1``,
    ``q = round(x * C / max|x|) + C`` in ``[0, 2C]``, the max taken per token over all
    heads and channels of the layer (fp16). Bands are ``[[end_fraction, bins], ...]`` over
    layer depth; the defaults follow KVServe's recomposition (keys 32/16/12 bins with
    boundaries at 32% and 63% of the layers, values 32/16 with a boundary at 15%).
    CacheGen pairs it with arithmetic coding: use the ``ans`` codec.
    """

    stage_id = "cachegen"
    params = {"key_bands": [[0.32, 32], [0.63, 16], [1.0, 12]], "value_bands": [[0.15, 32], [1.0, 16]]}

    def validate(self):
        _check_bands(self.stage_id, "key_bands", self.key_bands)
        _check_bands(self.stage_id, "value_bands", self.value_bands)

    def bins(self, layer: int, num_layers: int, which: str) -> int:
        for end, bins in (self.key_bands if which == "k" else self.value_bands):
            if layer < math.ceil(end * num_layers - 1e-9):
                return bins
        return (self.key_bands if which == "k" else self.value_bands)[-1][1]

    def encode(self, x, layer_ids, which, geometry):
        n, b, h, t, d = x.shape
        bins = np.asarray([self.bins(int(li), geometry[0], which) for li in layer_ids], dtype=np.int64)
        parts = [Part("bins", bins)]
        amax = x.abs().amax(dim=(2, 4), keepdim=True)
        pa = _side(amax, "amax")
        parts.append(pa)
        amax = torch.from_numpy(pa.array.astype(np.float32)).reshape(amax.shape)
        c = torch.from_numpy(bins // 2 - 1).to(torch.float32).reshape(n, 1, 1, 1, 1)
        q = (x * (c / amax.clamp_min(1e-8))).round_()
        q = torch.maximum(torch.minimum(q, c), -c).add_(c).to(torch.uint8)
        for bv in sorted(set(bins.tolist())):
            sel = torch.from_numpy(bins == bv)
            parts.append(Part(f"q{bv}", q[sel].contiguous().numpy().reshape(-1), bits=bits_for(2 * (bv // 2 - 1) + 1)))
        return parts

    def decode(self, parts, shape, layer_ids, which):
        n, b, h, t, d = shape
        bins = _get(parts, "bins", n)
        if bins.dtype != np.int64 or not ((bins >= 3) & (bins <= 256)).all():
            raise KVServeError("cachegen: bad bins")
        amax = _ft(parts, "amax", (n, b, 1, t, 1))
        q = torch.empty(shape, dtype=torch.float32)
        for bv in sorted(set(bins.tolist())):
            sel = torch.from_numpy(bins == bv)
            cnt = int(sel.sum())
            a = _get(parts, f"q{bv}", cnt * b * h * t * d)
            q[sel] = torch.from_numpy(a).reshape(cnt, b, h, t, d).to(torch.float32)
        c = torch.from_numpy(bins // 2 - 1).to(torch.float32).reshape(n, 1, 1, 1, 1)
        return q.sub_(c).mul_(amax / c)
