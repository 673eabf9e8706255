"""kvserve on the GPU: every stage of the recommended profiles on the KV's own device, one
bundle format.

>>> kv = [(k.cuda(), v.cuda()) for k, v in kv]        # bf16 (B, H, T, D) per layer
>>> blob = kvserve.encode(kv, "kvserve")               # the same bytes as for the CPU tensors
>>> kv2, meta = kvserve.decode(blob, device="cuda")    # CUDA tensors, the CPU's bits

:meth:`kvserve.Pipeline.encode` takes this path when the KV is on a CUDA device and
:func:`kvserve.decode` when it is given ``device="cuda"``. What runs where:

* transforms: ``identity``; ``hadamard`` in torch on the device (the ``portable`` butterflies
  give the CPU's bits; the legacy matrix product does not, see below);
* quantizers (``none``, ``kivi``, ``cachegen``, ``kvserve`` with tiers, two-way splits, token
  groups and windows): statistics with torch reductions (exact in any order), per-group
  parameters with the CPU's float operations on the device, the elementwise quantisation and
  dequantisation in Triton kernels (:mod:`._triton_kernels`);
* codecs: ``none``, ``bitpack`` (Triton pack/unpack) and ``irans`` (Triton interleaved rANS)
  on the device; ``nvcomp`` (nvCOMP, device only); the others (``rans``, ``ans``, ``zstd``,
  ``lz4``, ``enec``) run on the host: their symbols travel to the host and back.

Bit-exactness. A bundle encoded here has the bytes the CPU path writes for the same KV, and
decodes to the CPU path's bits, wherever the arithmetic is defined bit for bit: float32
``+ - * /`` between tensors, conversions, min/max and ``round`` are IEEE operations on both
devices, and the kernels avoid FMA contraction (``enable_fp_fusion=False``). Three places are
not, and are handled so:

* ``tensor / python_scalar`` multiplies by the reciprocal on CUDA but divides on the CPU:
  every such division here divides by a tensor (:func:`_div`);
* ``compact_value_stats``: ``log2``/``exp2`` are libm functions (on the CPU even the vector
  and scalar loops differ), so the range codes and the (min, range) they decode to are
  computed on the host by the CPU's own code (per-token statistics, 1/(H*D) of the KV);
* ``hadamard`` without ``portable``: a float32 matrix product whose rounding depends on the
  BLAS and device; such bundles decode here to within one bf16 unit of the CPU result, not
  bit for bit. The packaged profiles use ``portable``.

Nothing here imports triton until a kernel is launched; without CUDA (and without the
interpreter, ``TRITON_INTERPRET=1``, with which tests run the kernels on CPU tensors after
setting :data:`FORCE_INTERPRETER`) the device path raises :class:`KVServeError`.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings

import numpy as np
import torch

from ..errors import KVServeError
from . import irans, rans
from . import transforms as _tf
from .quantizers import (CacheGenQuant, KIVIQuant, KVServeQuant, NoQuant, Part, _compact_codes, _ft, _stats,
                         bits_for, compact_key_minmax, key_stats)
from .transforms import Hadamard

#: Tests: treat CPU tensors as device tensors and run the kernels in Triton's interpreter.
FORCE_INTERPRETER = False
BLOCK = 1024  # elements per program of the elementwise kernels
PACK_GROUPS = 128  # 8-symbol groups per program of pack/unpack
NUM_WARPS = 4
_BIG = 1 << 62


# ------------------------------------------------------------------------------ plumbing


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernels():
    if not interpreting() and not torch.cuda.is_available():
        raise KVServeError(f"the kvserve GPU path needs a CUDA device (torch {torch.__version__} sees none)")
    try:
        from . import _triton_kernels
    except ImportError as exc:
        raise KVServeError(f"the kvserve GPU path needs triton: {exc}") from exc
    return _triton_kernels


def require() -> None:
    """Raise :class:`KVServeError` unless the device path can run here."""
    _kernels()


def available() -> bool:
    """True when the device path can run here (CUDA and triton, or the interpreter)."""
    try:
        _kernels()
    except KVServeError:
        return False
    return True


def is_device(device) -> bool:
    """Whether ``device`` (torch.device or name) takes the device path."""
    if device is None:
        return False
    d = torch.device(device)
    return d.type == "cuda" or (d.type == "cpu" and FORCE_INTERPRETER and interpreting())


def for_kv(layers) -> bool:
    """Whether a KV list takes the device path; all its tensors must share one device."""
    devs = {t.device for pair in layers for t in pair}
    if len(devs) > 1:
        raise KVServeError(f"KV tensors are on several devices: {sorted(map(str, devs))}")
    return is_device(next(iter(devs)))


def _launch(kernel, n_programs: int, *args, **consts):
    """Launch on the device of the first tensor argument, without FMA contraction."""
    _kernels()  # raises the clear error when there is no device
    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        kernel[(max(1, n_programs),)](*args, **consts, num_warps=NUM_WARPS, enable_fp_fusion=False)


def _host(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _dev(a, device, dtype=None) -> torch.Tensor:
    """A host array (read-only bundle memory included) or tensor on ``device``."""
    if not isinstance(a, torch.Tensor):
        a = np.ascontiguousarray(a)
        if not a.flags.writeable and torch.device(device).type == "cpu":
            a = a.copy()
        with warnings.catch_warnings():  # a read-only buffer is only read: copied to the device at once
            warnings.simplefilter("ignore", UserWarning)
            a = torch.from_numpy(a)
    return a.to(device=device, dtype=dtype or a.dtype)


def _stat_map(xshape, sshape) -> tuple[int, int, int, int]:
    """``(P, Q, R, S)`` with stat index ``(i // P) * Q + (i // R) % S`` for the flat index ``i``
    of a contiguous ``xshape`` tensor and a contiguous statistic broadcast from ``sshape``
    (each dim 1 or equal). Size-1 dims of ``x`` are dropped first; at most two runs of kept
    dims, the first at dim 0 (every layout of the quantizers)."""
    if len(sshape) != len(xshape):
        sshape = (1,) * (len(xshape) - len(sshape)) + tuple(sshape)
    dims = [(x, s) for x, s in zip(xshape, sshape) if x != 1]
    xs = [x for x, _ in dims]
    keep = [s != 1 for _, s in dims]
    if any(s not in (1, x) for x, s in dims):
        raise KVServeError(f"statistic shape {tuple(sshape)} does not broadcast to {tuple(xshape)}")
    runs, d = [], 0
    while d < len(keep):
        if keep[d]:
            e = d
            while e < len(keep) and keep[e]:
                e += 1
            runs.append((d, e))
            d = e
        else:
            d += 1
    tail = [math.prod(xs[i:]) for i in range(len(xs) + 1)]
    if not runs:
        return _BIG, 0, 1, 1
    if len(runs) == 1:
        a, b = runs[0]
        return (tail[b], 1, 1, 1) if a == 0 else (_BIG, 0, tail[b], math.prod(xs[a:b]))
    if len(runs) > 2 or runs[0][0] != 0:
        raise KVServeError(f"unsupported statistic layout {tuple(sshape)} for {tuple(xshape)}")
    (_, b1), (a2, b2) = runs
    size2 = math.prod(xs[a2:b2])
    return tail[b1], size2, tail[b2], size2


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """``a / b`` as the CPU computes it (a division, never a multiply by the reciprocal)."""
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, float(b))
    return a / b


def _rdiv(k: int, t: torch.Tensor) -> torch.Tensor:
    """``k / t`` for a Python int ``k`` as torch computes it on the CPU: ``t.reciprocal() * k``."""
    return (torch.ones_like(t) / t) * k


def _levels_tensor(lv, like: torch.Tensor) -> torch.Tensor:
    return lv if isinstance(lv, torch.Tensor) else torch.full((1,), float(lv), device=like.device)


def quantize(x, mn, inv, lv, sym: bool = False) -> torch.Tensor:
    """uint8 ``clamp(round((x - mn) * inv), 0, lv)`` (``sym``: ``clamp(round(x * inv), -lv, lv) + lv``),
    ``mn``/``inv`` broadcast to one shape, ``lv`` a float tensor or an int."""
    K = _kernels()
    x = x.to(torch.float32).contiguous()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if not x.numel():
        return q
    lvt = _levels_tensor(lv, x).to(torch.float32).contiguous()
    inv = inv.to(torch.float32).contiguous()
    mnt = mn.to(torch.float32).expand(inv.shape).contiguous() if mn is not None else inv
    smap = _stat_map(x.shape, inv.shape)
    lmap = _stat_map(x.shape, lvt.shape if isinstance(lv, torch.Tensor) else (1,) * x.dim())
    _launch(K.quantize_kernel, -(-x.numel() // BLOCK), x, mnt, inv, lvt, q, x.numel(), *smap, *lmap,
            HAS_MN=mn is not None, SYM=sym, BLOCK=BLOCK)
    return q


def dequantize(q, scale, mn, lv=None, sym: bool = False) -> torch.Tensor:
    """float32 ``q * scale + mn`` (``sym``: ``(q - lv) * scale``), each operation rounded."""
    K = _kernels()
    q = q.contiguous()
    y = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if not q.numel():
        return y
    scale = scale.to(torch.float32).contiguous()
    mnt = mn.to(torch.float32).expand(scale.shape).contiguous() if mn is not None else scale
    lvt = _levels_tensor(lv if lv is not None else 0, q).to(torch.float32).contiguous()
    smap = _stat_map(q.shape, scale.shape)
    lmap = _stat_map(q.shape, lvt.shape if isinstance(lv, torch.Tensor) else (1,) * q.dim())
    _launch(K.dequantize_kernel, -(-q.numel() // BLOCK), q, scale, mnt, lvt, y, q.numel(), *smap, *lmap,
            HAS_MN=mn is not None, SYM=sym, BLOCK=BLOCK)
    return y


# ------------------------------------------------------------------------------ transforms

HADAMARD_TILE = 4096  # elements per program of the Hadamard kernel (rows = HADAMARD_TILE // D)


def _hadamard(tr: Hadamard, x, layer_ids, which, forward: bool) -> torch.Tensor:
    K = _kernels()
    n, b, h, t, d = x.shape
    ids = tuple(int(li) for li in layer_ids)
    signs = _tf._on(_tf._sign_stack, x.device, tr.seed, ids, h, d)
    th = tr._thetas(layer_ids, d) if which == "k" else None
    x = x.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    if th is not None:
        c, s, idx = _tf.rope_tables_on(tuple(float(v) for v in th), t, d, x.device)
    else:
        c = s = idx = signs
    rows = n * b * h * t
    r = max(1, HADAMARD_TILE // d)
    _launch(K.hadamard_kernel, -(-rows // r), x, y, signs, c, s, idx, rows, b, h, t, _tf.butterfly_scale(d),
            D=d, LOG2D=d.bit_length() - 1, ROPE=th is not None, FORWARD=forward, R=r)
    return y


def _triton_hadamard(tr, d: int) -> bool:
    return isinstance(tr, Hadamard) and tr.portable and d >= 2 and d & (d - 1) == 0


def transform_forward(tr, x, layer_ids, which):
    """``tr.forward`` on the device: the portable Hadamard of a power-of-two head_dim in one
    Triton pass, anything else with torch operations."""
    if _triton_hadamard(tr, x.shape[-1]) and x.numel():
        return _hadamard(tr, x, layer_ids, which, True)
    return tr.forward(x, layer_ids, which)


def transform_inverse(tr, y, layer_ids, which):
    if _triton_hadamard(tr, y.shape[-1]) and y.numel():
        return _hadamard(tr, y, layer_ids, which, False)
    return tr.inverse(y, layer_ids, which)


# ------------------------------------------------------------------------------ quantizers


def _side(t: torch.Tensor, name: str) -> tuple[Part, torch.Tensor]:
    """As the CPU's ``_side``: float16 when every value fits, else float32; and the float32
    values the decoder will see."""
    h = t.to(torch.float16)
    if bool(torch.isfinite(h).all()):
        return Part(name, h.reshape(-1), dtype="float16"), h.to(torch.float32)
    f = t.to(torch.float32)
    return Part(name, f.reshape(-1), dtype="float32"), f


def _bf16_part(name: str, t: torch.Tensor, bits=None) -> Part:
    return Part(name, t.to(torch.bfloat16).contiguous().reshape(-1).view(torch.int16), bits=bits, dtype="bfloat16")


def _minmax(x, dims, levels, parts: list, prefix: str = "") -> torch.Tensor:
    """The CPU's ``quantizers._minmax`` on the device."""
    mn = x.amin(dim=dims, keepdim=True)
    rg = x.amax(dim=dims, keepdim=True) - mn
    pm, mn = _side(mn, prefix + "min")
    pr, rg = _side(rg, prefix + "range")
    parts += [pm, pr]
    return _quantize_stats(x, mn, rg.clamp_min(1e-8), levels)


def _quantize_stats(x, mn, rg, levels) -> torch.Tensor:
    if isinstance(levels, int):
        inv = _rdiv(levels - 1, rg)
        return quantize(x, mn, inv, levels - 1)
    lv = (levels - 1).to(torch.float32)
    inv = lv / rg
    return quantize(x, mn, inv, lv)


def _minmax_compact(x, dims, levels, parts: list) -> torch.Tensor:
    """The CPU's ``_minmax_compact``: statistics on the device, the log-coded range on the host."""
    mn = x.amin(dim=dims, keepdim=True)
    rg = x.amax(dim=dims, keepdim=True) - mn
    got = None if 0 in dims else _compact_codes(mn.cpu(), rg.cpu(), "")
    if got is None:
        return _minmax(x, dims, levels, parts)
    codes, mn_h, rg_h = got
    parts += codes
    return _quantize_stats(x, mn_h.to(x.device), rg_h.to(x.device), levels)


def _deminmax(q, mn, rg, levels) -> torch.Tensor:
    """The CPU's ``_deminmax``: ``q * (rg / lv) + mn``."""
    scale = _div(rg, levels - 1) if isinstance(levels, int) else rg / (levels - 1).to(torch.float32)
    return dequantize(q, scale, mn)


def _get(parts: dict, name: str, count: int):
    a = parts.get(name)
    if a is None:
        raise KVServeError(f"bundle lacks part {name!r}")
    n = a.numel() if isinstance(a, torch.Tensor) else a.size
    if n != count:
        raise KVServeError(f"part {name!r} has {n} elements, expected {count}")
    return a


def _stats_on(parts, stat_shape, device, prefix: str = "", stats=_stats):
    """(min, range) of a part set on ``device``, decoded on the host by the CPU's own
    ``stats`` function (``_stats``, or ``key_stats`` for compact key statistics)."""
    names = {prefix + k for k in ("min", "range", "rmax", "rcode", "mcode", "centre")}
    host = {k: _host(v) for k, v in parts.items() if k in names}
    mn, rg = stats(host, prefix, stat_shape)
    return mn.to(device), rg.to(device)


def _windows_encode(qz, x, s, e, parts):
    if s > 0:
        parts.append(_bf16_part("sink", x[..., :s, :]))
    if e < x.shape[3]:
        parts.append(_bf16_part("recent", x[..., e:, :]))


def _windows_decode(out, parts, shape, s, e):
    n, b, h, t, d = shape
    for name, lo, hi in (("sink", 0, s), ("recent", e, t)):
        if hi > lo:
            a = _get(parts, name, n * b * h * (hi - lo) * d)
            out[..., lo:hi, :] = _dev(_host(a).view(np.int16), out.device).view(torch.bfloat16).reshape(
                n, b, h, hi - lo, d).to(torch.float32)


def _select_rows(q, idx: np.ndarray, value: int):
    rows = np.flatnonzero(idx.reshape(-1) == value)
    return rows, q.index_select(0, torch.from_numpy(rows).to(q.device)) if rows.size else None


def _kvserve_encode(qz: KVServeQuant, x, layer_ids, which, geometry) -> list[Part]:
    """:meth:`KVServeQuant.encode` on the KV's device (the same parts, the same bytes)."""
    n, b, h, t, d = x.shape
    s, e = qz._span(t)
    parts: list[Part] = []
    idx = qz.tier_index(*geometry, which)[list(layer_ids)]
    parts.append(Part("tier", idx.reshape(-1).copy()))
    levels = qz._tier_levels(which)
    if qz._grouped(which):  # the remainder of the token grouping joins the recent window
        e = s + (e - s) // qz.key_group * qz.key_group
    parts.append(Part("split", np.asarray([s, e], dtype=np.int64)))
    _windows_encode(qz, x, s, e if not qz.recent_key_levels else t, parts)
    if qz.recent_key_levels and e < t:
        lv = qz._recent_levels(which)
        q = _minmax(x[..., e:, :], qz._stat_dims(which), lv, parts, "r")
        parts.append(Part("rq", q.reshape(-1), bits=bits_for(lv), dtype="uint8"))
    if e > s:
        lv = torch.tensor(levels, dtype=torch.float32)[torch.from_numpy(idx.astype(np.int64))]
        lv = lv.to(x.device)[:, None, :, None, None]
        xm, lv, dims = qz._middle(x, lv, which, s, e)
        if which == "k" and qz.compact_key_stats:  # statistics on the device, codes on the host
            q = _quantize_stats(xm, *compact_key_minmax(xm, dims, parts), lv)
        elif which == "v" and qz.compact_value_stats:
            q = _minmax_compact(xm, dims, lv, parts)
        else:
            q = _minmax(xm, dims, lv, parts)
        q = q.reshape(n, b, h, e - s, d).transpose(1, 2).reshape(n * h, b, e - s, d)
        for ti, lev in enumerate(levels):
            rows, sel = _select_rows(q, idx, ti)
            if rows.size:
                parts.append(Part(f"q{ti}", sel.reshape(-1), bits=bits_for(lev), dtype="uint8"))
    return parts


def _kvserve_decode(qz: KVServeQuant, parts, shape, layer_ids, which, device) -> torch.Tensor:
    """:meth:`KVServeQuant.decode` onto ``device`` (bundles with a tier table or, from before
    tiers, a low mask)."""
    n, b, h, t, d = shape
    table = {k: _host(parts[k]) for k in ("tier", "lowmask") if k in parts}
    idx, names = qz._stored_tiers(table, n, h)
    levels = qz._tier_levels(which)
    se = _host(_get(parts, "split", 2))
    s, e = int(se[0]), int(se[1])
    if not 0 <= s <= e <= t:
        raise KVServeError("kvserve: bad token split")
    out = torch.empty(shape, dtype=torch.float32, device=device)
    _windows_decode(out, parts, shape, s, e if not qz.recent_key_levels else t)
    if qz.recent_key_levels and e < t:
        lv, stat = qz._recent_levels(which), qz._stat_shape(which, n, b, h, t - e, d)
        q = _dev(_get(parts, "rq", n * b * h * (t - e) * d), device).reshape(n, b, h, t - e, d)
        out[..., e:, :] = _deminmax(q, *_stats_on(parts, stat, device, "r"), lv)
    if e > s:
        tm = e - s
        q = torch.empty((n * h, b, tm, d), dtype=torch.uint8, device=device)
        for ti, name in enumerate(names):
            rows = np.flatnonzero(idx.reshape(-1) == ti)
            if rows.size:
                a = _dev(_get(parts, name, rows.size * b * tm * d), device)
                q.index_copy_(0, torch.from_numpy(rows).to(device), a.reshape(rows.size, b, tm, d))
        q = q.reshape(n, h, b, tm, d).transpose(1, 2)
        lv = torch.tensor(levels, dtype=torch.float32)[torch.from_numpy(idx.astype(np.int64))]
        lv = lv.to(device)[:, None, :, None, None]
        q, stat, lv = qz._stat_layout(q, lv, which, n, b, h, tm, d)
        mn, rg = _stats_on(parts, stat, device, stats=key_stats if which == "k" and qz.compact_key_stats else _stats)
        out[..., s:e, :] = _deminmax(q, mn, rg, lv).reshape(n, b, h, tm, d)
    return out


def _kivi_encode(qz: KIVIQuant, x, layer_ids, which, geometry) -> list[Part]:
    n, b, h, t, d = x.shape
    s, e, gd = qz._layout(t, d)
    parts: list[Part] = []
    _windows_encode(qz, x, s, e, parts)
    if e > s:
        qs, _ = qz._group_shapes(which, n, b, h, e - s, d, gd)
        q = _minmax(x[..., s:e, :].reshape(qs), (4,) if which == "k" else (5,), 1 << qz.bits, parts)
        parts.append(Part("q", q.reshape(-1), bits=qz.bits, dtype="uint8"))
    return parts


def _kivi_decode(qz: KIVIQuant, parts, shape, layer_ids, which, device) -> torch.Tensor:
    n, b, h, t, d = shape
    s, e, gd = qz._layout(t, d)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    _windows_decode(out, parts, shape, s, e)
    if e > s:
        tm, lv = e - s, 1 << qz.bits
        qs, stat = qz._group_shapes(which, n, b, h, tm, d, gd)
        q = _dev(_get(parts, "q", n * b * h * tm * d), device).reshape(qs)
        mn, rg = _stats_on(parts, stat, device)
        out[..., s:e, :] = _deminmax(q, mn, rg, lv).reshape(n, b, h, tm, d)
    return out


def _cachegen_c(bins: np.ndarray, n: int, device) -> torch.Tensor:
    return torch.from_numpy(bins // 2 - 1).to(torch.float32).reshape(n, 1, 1, 1, 1).to(device)


def _cachegen_encode(qz: CacheGenQuant, x, layer_ids, which, geometry) -> list[Part]:
    n, b, h, t, d = x.shape
    bins = np.asarray([qz.bins(int(li), geometry[0], which) for li in layer_ids], dtype=np.int64)
    parts = [Part("bins", bins)]
    pa, amax = _side(x.abs().amax(dim=(2, 4), keepdim=True), "amax")
    parts.append(pa)
    c = _cachegen_c(bins, n, x.device)
    q = quantize(x, None, c / amax.clamp_min(1e-8), c, sym=True)
    for bv in sorted(set(bins.tolist())):
        rows, sel = _select_rows(q, bins, bv)
        parts.append(Part(f"q{bv}", sel.reshape(-1), bits=bits_for(2 * (bv // 2 - 1) + 1), dtype="uint8"))
    return parts


def _cachegen_decode(qz: CacheGenQuant, parts, shape, layer_ids, which, device) -> torch.Tensor:
    n, b, h, t, d = shape
    bins = _host(_get(parts, "bins", n))
    if bins.dtype != np.int64 or not ((bins >= 3) & (bins <= 256)).all():
        raise KVServeError("cachegen: bad bins")
    amax = _ft({k: _host(v) for k, v in parts.items() if k == "amax"}, "amax", (n, b, 1, t, 1)).to(device)
    q = torch.empty(shape, dtype=torch.uint8, device=device)
    for bv in sorted(set(bins.tolist())):
        rows = np.flatnonzero(bins == bv)
        a = _dev(_get(parts, f"q{bv}", rows.size * b * h * t * d), device)
        q.index_copy_(0, torch.from_numpy(rows).to(device), a.reshape(rows.size, b, h, t, d))
    c = _cachegen_c(bins, n, device)
    return dequantize(q, amax / c, None, c, sym=True)


def _none_encode(qz, x, layer_ids, which, geometry) -> list[Part]:
    return [_bf16_part("x", x, bits=16)]


def _none_decode(qz, parts, shape, layer_ids, which, device) -> torch.Tensor:
    a = _dev(_get(parts, "x", math.prod(shape)), device)
    return a.view(torch.bfloat16).reshape(shape).to(torch.float32)


_QUANTIZERS = {NoQuant: (_none_encode, _none_decode), KVServeQuant: (_kvserve_encode, _kvserve_decode),
               KIVIQuant: (_kivi_encode, _kivi_decode), CacheGenQuant: (_cachegen_encode, _cachegen_decode)}


def quantizer_encode(qz, x, layer_ids, which, geometry) -> list[Part]:
    """``qz.encode`` on the device: parts whose arrays are device tensors (symbols, statistics)
    or small host arrays (tables, splits, compact codes)."""
    impl = _QUANTIZERS.get(type(qz))
    if impl is None:
        raise KVServeError(f"quantizer {qz.stage_id!r} has no GPU path")
    return impl[0](qz, x, layer_ids, which, geometry)


def quantizer_decode(qz, parts, shape, layer_ids, which, device) -> torch.Tensor:
    impl = _QUANTIZERS.get(type(qz))
    if impl is None:
        raise KVServeError(f"quantizer {qz.stage_id!r} has no GPU path")
    return impl[1](qz, parts, shape, layer_ids, which, device)


# ------------------------------------------------------------------------------ codecs


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def side_bytes(a):
    """A side part's bytes: host bytes for a numpy array, a uint8 device tensor for a tensor."""
    if isinstance(a, torch.Tensor):
        return _bytes_view(a)
    return bytes(memoryview(np.ascontiguousarray(a)).cast("B"))


def bitpack(sym: torch.Tensor, bits: int) -> torch.Tensor:
    K = _kernels()
    n = sym.numel()
    groups = -(-n // 8)
    out = torch.empty(groups * bits, dtype=torch.uint8, device=sym.device)
    _launch(K.pack_kernel, -(-groups // PACK_GROUPS), sym.contiguous().reshape(-1), out, n, groups,
            BITS=bits, G=PACK_GROUPS)
    return out


def bitunpack(buf: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    K = _kernels()
    groups = -(-count // 8)
    if buf.numel() != groups * bits:
        raise KVServeError("bitpack: length mismatch")
    out = torch.empty(count, dtype=torch.uint8, device=buf.device)
    _launch(K.unpack_kernel, -(-groups // PACK_GROUPS), buf, out, count, groups, BITS=bits, G=PACK_GROUPS)
    return out


def _pair(sym: torch.Tensor, bits: int) -> torch.Tensor:
    a = sym.reshape(-1)
    if a.numel() % 2:
        a = torch.cat([a, a.new_zeros(1)])
    return (a[0::2] << bits) | a[1::2]


def irans_encode(sym: torch.Tensor, bits: int, pair: bool) -> torch.Tensor:
    """The ``irans`` codec's stream of uint8 symbols ``< 2**bits``, as a uint8 device tensor."""
    K = _kernels()
    paired = pair and 2 * bits <= 8
    alpha = 1 << (2 * bits if paired else bits)
    s = _pair(sym, bits) if paired else sym.reshape(-1)
    counts = torch.bincount(s.to(torch.int64), minlength=alpha).cpu().numpy()
    if counts.size != alpha:
        raise KVServeError("irans: symbol out of range")
    freq = rans.quantize_freqs(counts)
    blog2 = irans.DEFAULT_BLOCK_LOG2
    nsym = s.numel()
    nblocks = -(-nsym // (1 << blog2))
    cap = min(1 << blog2, max(nsym, 1)) + 2 * irans.LANES
    dev = s.device
    if nblocks == 0:
        stream = torch.zeros(0, dtype=torch.uint8, device=dev)
        sizes = np.zeros(0, dtype=np.int64)
    else:
        scratch = torch.empty((nblocks, cap), dtype=torch.int16, device=dev)
        starts = torch.empty(nblocks, dtype=torch.int32, device=dev)
        f = torch.from_numpy(freq.astype(np.int32)).to(dev)
        c = torch.from_numpy(irans.cumulative(freq).astype(np.int32)).to(dev)
        _launch(K.irans_encode_kernel, nblocks, s.contiguous(), nsym, f, c, scratch, cap, starts,
                BLOCK_LOG2=blog2, LANES=irans.LANES)
        words = cap - starts.to(torch.int64)
        offs = torch.zeros(nblocks + 1, dtype=torch.int64, device=dev)
        torch.cumsum(words, 0, out=offs[1:])
        sizes = (2 * words).cpu().numpy()
        out = torch.empty(int(sizes.sum()) // 2, dtype=torch.int16, device=dev)
        _launch(K.gather_rows_kernel, nblocks, scratch, cap, starts, offs, out, TILE=1024)
        stream = out.view(torch.uint8)
    head = irans.pack_header(paired, alpha, freq, blog2, sizes)
    return torch.cat([torch.frombuffer(bytearray(head), dtype=torch.uint8).to(dev), stream])


class IransPrepared:
    """An ``irans`` stream parsed on the host (header checks) with its block streams, offsets
    and slot table on the device; :meth:`run` decodes it (benchmarks time that alone)."""

    def __init__(self, buf, count: int, bits: int, device):
        paired, alpha, freq, self.block_log2, self.nsym, offsets, hlen = irans.parse_header(buf, count, bits)
        self.count, self.pair_bits, self.device = count, bits if paired else 0, device
        self.nblocks = offsets.size - 1
        if self.nsym:
            self.stream = _dev(np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8, offset=hlen), device)
            self.offsets = _dev(offsets, device)
            self.table = _dev(irans.decode_table(freq).view(np.int32), device)

    def run(self) -> torch.Tensor:
        if self.nsym == 0:
            return torch.zeros(0, dtype=torch.uint8, device=self.device)
        K = _kernels()
        out = torch.empty(self.nsym * (2 if self.pair_bits else 1), dtype=torch.uint8, device=self.device)
        status = torch.empty(self.nblocks, dtype=torch.int32, device=self.device)
        _launch(K.irans_decode_kernel, self.nblocks, self.stream, self.offsets, self.table, self.nsym, out, status,
                BLOCK_LOG2=self.block_log2, LANES=irans.LANES, PAIR_BITS=self.pair_bits)
        if int(status.max()):
            raise KVServeError("irans: corrupt stream")
        return out[:self.count]


def irans_decode(buf, count: int, bits: int, device) -> torch.Tensor:
    """Decode an ``irans`` stream (host bytes) into ``count`` uint8 symbols on ``device``."""
    return IransPrepared(buf, count, bits, device).run()


def _host_bits(t: torch.Tensor, bits: int) -> np.ndarray:
    a = t.detach().contiguous().reshape(-1).cpu().numpy()
    return a.view(np.uint16) if bits == 16 else a


def codec_encode(codec, sym: torch.Tensor, bits: int, threads: int = 1):
    """``codec.encode`` of a device symbol tensor: a uint8 device tensor, or host bytes for a
    codec without a device implementation (the symbols go to the host)."""
    sid = codec.stage_id
    if sid == "none" or (sid == "bitpack" and bits == 16):
        return _bytes_view(sym)
    if sid == "bitpack":
        return bitpack(sym, bits)
    if sid == "irans":
        if not 1 <= bits <= 8:
            raise KVServeError("irans: needs quantized symbols (bits <= 8)")
        return irans_encode(sym, bits, codec.pair)
    if getattr(codec, "device_only", False):
        return codec.encode_device(sym, bits)
    return codec.encode(_host_bits(sym, bits), bits, threads)


def codec_decode(codec, buf, count: int, bits: int, device, threads: int = 1) -> torch.Tensor:
    """``codec.decode`` onto ``device``: uint8 symbols (``bits <= 8``) or int16 bf16 words."""
    sid = codec.stage_id
    if sid == "irans":
        return irans_decode(buf, count, bits, device)
    if sid == "bitpack" and bits != 16:
        if not 1 <= bits <= 8:
            raise KVServeError(f"unsupported symbol width {bits}")
        return bitunpack(_dev(np.frombuffer(buf, dtype=np.uint8), device), count, bits)
    if sid in ("none", "bitpack"):
        item = 2 if bits == 16 else 1
        if len(buf) != count * item:
            raise KVServeError(f"{sid}: length mismatch")
        t = _dev(np.frombuffer(buf, dtype=np.uint8), device)
        if bits == 16:
            return t.view(torch.int16) if t.numel() else torch.empty(0, dtype=torch.int16, device=device)
        return t
    if getattr(codec, "device_only", False):
        return codec.decode_device(buf, count, bits, device)
    a = codec.decode(buf, count, bits, threads)
    return _dev(a.view(np.int16) if a.dtype == np.uint16 else a, device)


def gather(chunks: list) -> bytes:
    """Concatenate a bundle's chunks (host bytes and device uint8 tensors) with one copy from
    the device."""
    dev = [c for c in chunks if isinstance(c, torch.Tensor)]
    if not dev:
        return b"".join(chunks)
    host = memoryview(torch.cat(dev).cpu().numpy())
    out, at = [], 0
    for c in chunks:
        if isinstance(c, torch.Tensor):
            out.append(host[at:at + c.numel()])
            at += c.numel()
        else:
            out.append(c)
    return b"".join(out)
