"""Triton kernels of the kvserve GPU path. Imported only by :mod:`kvserve.stages.gpu`.

This module imports triton at the top, so nothing else in :mod:`kvserve` imports it: use
the wrappers in :mod:`kvserve.stages.gpu`, which load it lazily.

Bit-exactness with the CPU stages: every float operation here is one IEEE operation in
float32 with round-to-nearest-even, in the order the CPU code applies them, and the wrappers
launch the kernels with ``enable_fp_fusion=False`` so that no multiply and add are
contracted into an FMA (which rounds once instead of twice). Rounding to an integer is the
``(t + 1.5 * 2**23) - 1.5 * 2**23`` idiom: round half to even like ``torch.round`` for
``|t| < 2**22``; larger values are clamped into the level range afterwards either way.

Broadcast statistics: an element's flat index ``i`` in a contiguous group maps to its
statistic (min, scale, level count) at ``(i // P) * Q + (i // R) % S``; four integers
describe every layout the quantizers use (per channel, per token, per token and head, per
channel group, per layer; see :func:`kvserve.stages.gpu._stat_map`).
"""

from __future__ import annotations

import triton
import triton.language as tl

ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def _stat_index(i, P, Q, R, S):
    return (i // P) * Q + (i // R) % S


@triton.jit
def quantize_kernel(x_ptr, mn_ptr, inv_ptr, lv_ptr, q_ptr, numel,
                    sP, sQ, sR, sS, lP, lQ, lR, lS,
                    HAS_MN: tl.constexpr, SYM: tl.constexpr, BLOCK: tl.constexpr):
    """``q = clamp(round((x - mn) * inv), 0, lv)`` (``SYM``: ``clamp(round(x * inv), -lv, lv) + lv``)
    as uint8: the CPU's ``(x - mn).mul_(inv).round_().clamp_(min=0).clamp_(max=lv)``."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < numel
    x = tl.load(x_ptr + i, mask=m, other=0.0)
    si = _stat_index(i, sP, sQ, sR, sS)
    li = _stat_index(i, lP, lQ, lR, lS)
    inv = tl.load(inv_ptr + si, mask=m, other=0.0)
    lv = tl.load(lv_ptr + li, mask=m, other=0.0)
    if HAS_MN:
        x = x - tl.load(mn_ptr + si, mask=m, other=0.0)
    t = x * inv
    r = (t + ROUND_MAGIC) - ROUND_MAGIC
    if SYM:
        r = tl.maximum(tl.minimum(r, lv), -lv) + lv
    else:
        r = tl.minimum(tl.maximum(r, 0.0), lv)
    tl.store(q_ptr + i, r.to(tl.uint8), mask=m)


@triton.jit
def dequantize_kernel(q_ptr, scale_ptr, mn_ptr, lv_ptr, y_ptr, numel,
                      sP, sQ, sR, sS, lP, lQ, lR, lS,
                      HAS_MN: tl.constexpr, SYM: tl.constexpr, BLOCK: tl.constexpr):
    """``y = q * scale + mn`` (``SYM``: ``(q - lv) * scale``) in float32, each operation
    rounded: the CPU's ``q.float().mul_(scale).add_(mn)`` / ``q.sub_(c).mul_(scale)``."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < numel
    q = tl.load(q_ptr + i, mask=m, other=0).to(tl.float32)
    si = _stat_index(i, sP, sQ, sR, sS)
    if SYM:
        q = q - tl.load(lv_ptr + _stat_index(i, lP, lQ, lR, lS), mask=m, other=0.0)
    y = q * tl.load(scale_ptr + si, mask=m, other=0.0)
    if HAS_MN:
        y = y + tl.load(mn_ptr + si, mask=m, other=0.0)
    tl.store(y_ptr + i, y, mask=m)


# ----------------------------------------------------------------------------- bit packing


@triton.jit
def pack_kernel(sym_ptr, out_ptr, nsym, ngroups, BITS: tl.constexpr, G: tl.constexpr):
    """Groups of 8 symbols -> ``BITS`` bytes, LSB first (``kvserve.stages.codecs.bitpack``);
    the last group is padded with zeros."""
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    j = tl.arange(0, 8)
    idx = g[:, None] * 8 + j[None, :]
    s = tl.load(sym_ptr + idx, mask=idx < nsym, other=0).to(tl.uint64) & ((1 << BITS) - 1)
    acc = tl.sum(s << (j[None, :] * BITS).to(tl.uint64), axis=1)  # disjoint bit fields: sum == or
    byte = (acc[:, None] >> (j[None, :] * 8).to(tl.uint64)) & 0xFF
    tl.store(out_ptr + g[:, None] * BITS + j[None, :], byte.to(tl.uint8),
             mask=(j[None, :] < BITS) & (g[:, None] < ngroups))


@triton.jit
def unpack_kernel(buf_ptr, out_ptr, nsym, ngroups, BITS: tl.constexpr, G: tl.constexpr):
    """Inverse of :func:`pack_kernel`: ``nsym`` symbols."""
    g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    j = tl.arange(0, 8)
    b = tl.load(buf_ptr + g[:, None] * BITS + j[None, :], mask=(j[None, :] < BITS) & (g[:, None] < ngroups),
                other=0).to(tl.uint64)
    acc = tl.sum(b << (j[None, :] * 8).to(tl.uint64), axis=1)
    s = (acc[:, None] >> (j[None, :] * BITS).to(tl.uint64)) & ((1 << BITS) - 1)
    idx = g[:, None] * 8 + j[None, :]
    tl.store(out_ptr + idx, s.to(tl.uint8), mask=idx < nsym)


# ----------------------------------------------------------------------------- interleaved rANS


@triton.jit
def irans_encode_kernel(sym_ptr, nsym, freq_ptr, cum_ptr, scratch_ptr, cap, start_ptr,
                        BLOCK_LOG2: tl.constexpr, LANES: tl.constexpr):
    """One program per block (``kvserve.stages.irans``): the block's words are written
    backwards into its row of ``scratch`` (int16, ``cap`` words), the 32 final states in
    front of them; ``start[b]`` = the row index of the first word."""
    b = tl.program_id(0)
    lo = b.to(tl.int64) << BLOCK_LOG2
    n = tl.minimum(nsym - lo, 1 << BLOCK_LOG2).to(tl.int32)
    nsteps = (n + LANES - 1) // LANES
    lane = tl.arange(0, LANES)
    row = scratch_ptr + b.to(tl.int64) * cap
    x = tl.full([LANES], 65536, tl.uint32)
    p = cap
    for k in range(0, nsteps):
        step = nsteps - 1 - k
        idx = step * LANES + lane
        act = idx < n
        s = tl.load(sym_ptr + lo + idx, mask=act, other=0).to(tl.int32)
        f = tl.load(freq_ptr + s, mask=act, other=1).to(tl.uint32)
        c = tl.load(cum_ptr + s, mask=act, other=0).to(tl.uint32)
        emit = act & ((x >> 20) >= f)
        e = emit.to(tl.int32)
        pos = tl.cumsum(e, axis=0) - e
        p = p - tl.sum(e, axis=0)
        tl.store(row + p + pos, (x & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True), mask=emit)
        x = tl.where(emit, x >> 16, x)
        q = x // f
        x = tl.where(act, (q << 12) + (x - q * f) + c, x)
    p = p - 2 * LANES
    tl.store(row + p + 2 * lane, (x & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True))
    tl.store(row + p + 2 * lane + 1, (x >> 16).to(tl.uint16).to(tl.int16, bitcast=True))
    tl.store(start_ptr + b, p)


@triton.jit
def gather_rows_kernel(src_ptr, cap, start_ptr, off_ptr, out_ptr, TILE: tl.constexpr):
    """Block ``b``'s words ``src[b, start[b]:cap]`` -> ``out[off[b]:off[b+1]]`` (int16)."""
    b = tl.program_id(0)
    s = tl.load(start_ptr + b).to(tl.int64)
    o = tl.load(off_ptr + b)
    n = tl.load(off_ptr + b + 1) - o
    row = src_ptr + b.to(tl.int64) * cap + s
    for i0 in range(0, n, TILE):
        i = i0 + tl.arange(0, TILE)
        tl.store(out_ptr + o + i, tl.load(row + i, mask=i < n), mask=i < n)


@triton.jit
def irans_decode_kernel(buf_ptr, off_ptr, table_ptr, nsym, out_ptr, status_ptr,
                        BLOCK_LOG2: tl.constexpr, LANES: tl.constexpr, PAIR_BITS: tl.constexpr):
    """One program per block: ``off`` holds the blocks' byte offsets in ``buf`` (uint8, any
    alignment). ``status[b]`` = 1 when the block's stream is inconsistent (a read past its
    end, words left over, or a lane not ending in state 2**16); reads never leave the block."""
    b = tl.program_id(0)
    lo = b.to(tl.int64) << BLOCK_LOG2
    n = tl.minimum(nsym - lo, 1 << BLOCK_LOG2).to(tl.int32)
    nsteps = (n + LANES - 1) // LANES
    o = tl.load(off_ptr + b)
    nbytes = (tl.load(off_ptr + b + 1) - o).to(tl.int32)
    base = buf_ptr + o
    lane = tl.arange(0, LANES)
    x = tl.zeros([LANES], tl.uint32)
    for k in tl.static_range(4):
        x = x | (tl.load(base + 4 * lane + k).to(tl.uint32) << (8 * k))
    rp = 4 * LANES
    bad = tl.zeros([LANES], tl.int32)
    for step in range(0, nsteps):
        idx = step * LANES + lane
        act = idx < n
        e = tl.load(table_ptr + (x & 4095)).to(tl.uint32, bitcast=True)
        s = e >> 24
        f = (e & 4095) + 1
        x = tl.where(act, f * (x >> 12) + ((e >> 12) & 4095), x)
        need = act & (x < 65536)
        ni = need.to(tl.int32)
        woff = rp + 2 * (tl.cumsum(ni, axis=0) - ni)
        ok = need & (woff + 2 <= nbytes)
        w = tl.load(base + woff, mask=ok, other=0).to(tl.uint32) | \
            (tl.load(base + woff + 1, mask=ok, other=0).to(tl.uint32) << 8)
        bad = bad | (need & (woff + 2 > nbytes)).to(tl.int32)
        x = tl.where(need, (x << 16) | w, x)
        rp = rp + 2 * tl.sum(ni, axis=0)
        if PAIR_BITS > 0:
            tl.store(out_ptr + 2 * (lo + idx), (s >> PAIR_BITS).to(tl.uint8), mask=act)
            tl.store(out_ptr + 2 * (lo + idx) + 1, (s & ((1 << PAIR_BITS) - 1)).to(tl.uint8), mask=act)
        else:
            tl.store(out_ptr + lo + idx, s.to(tl.uint8), mask=act)
    bad = bad | (x != 65536).to(tl.int32)
    st = (tl.max(bad, axis=0) > 0) | (rp != nbytes)
    tl.store(status_ptr + b, st.to(tl.int32))


# ----------------------------------------------------------------------------- portable Hadamard


@triton.jit
def _fwht(x, R: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """Butterflies over the last dim of ``x`` [R, D]: pairs at distance 1, 2, 4, ... become
    ``(a + b, a - b)`` (``kvserve.stages.transforms._butterfly_hadamard``)."""
    for s in tl.static_range(LOG2D):
        x = _butterfly_stage(x, R, D, 1 << s)
    return x


@triton.jit
def _butterfly_stage(x, R: tl.constexpr, D: tl.constexpr, HD: tl.constexpr):
    v = tl.permute(tl.reshape(x, [R, D // (2 * HD), 2, HD]), (0, 1, 3, 2))
    a, b = tl.split(v)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [R, D])


@triton.jit
def _rope(x, cos_ptr, sin_ptr, idx_ptr, tok, layer, T, rm, R: tl.constexpr, D: tl.constexpr, UNDO: tl.constexpr):
    """Rotate the channel pairs (i, i + D/2) as ``transforms._rotate(..., portable=True)``."""
    HALF: tl.constexpr = D // 2
    x1, x2 = tl.split(tl.permute(tl.reshape(x, [R, 2, HALF]), (0, 2, 1)))
    lc = tl.load(idx_ptr + layer, mask=rm, other=0).to(tl.int64)
    off = (lc * T + tok)[:, None] * HALF + tl.arange(0, HALF)[None, :]
    c = tl.load(cos_ptr + off, mask=rm[:, None], other=0.0)
    s = tl.load(sin_ptr + off, mask=rm[:, None], other=0.0)
    if UNDO:
        o1 = x1 * c + x2 * s
        o2 = x2 * c - x1 * s
    else:
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
    return tl.reshape(tl.permute(tl.join(o1, o2), (0, 2, 1)), [R, D])


@triton.jit
def hadamard_kernel(x_ptr, y_ptr, sign_ptr, cos_ptr, sin_ptr, idx_ptr, rows, B, H, T, scale,
                    D: tl.constexpr, LOG2D: tl.constexpr, ROPE: tl.constexpr, FORWARD: tl.constexpr,
                    R: tl.constexpr):
    """The ``portable`` randomized Hadamard of ``R`` rows (tokens) of a contiguous float32
    stack ``(n, B, H, T, D)``, ``D`` a power of two: forward = undo RoPE, times the signs
    ``(n, H, D)``, butterflies, times ``scale``; inverse = butterflies, times ``scale``, times
    the signs, redo RoPE (tables ``(U, T, D/2)``, ``idx[layer]`` picks one)."""
    r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    rm = r < rows
    m2 = rm[:, None] & (tl.arange(0, D)[None, :] < D)
    tok = r % T
    layer = r // (T * H * B)
    head = (r // T) % H
    d = tl.arange(0, D)
    x = tl.load(x_ptr + r[:, None] * D + d[None, :], mask=m2, other=0.0)
    sg = tl.load(sign_ptr + (layer * H + head)[:, None] * D + d[None, :], mask=m2, other=0.0)
    if FORWARD:
        if ROPE:
            x = _rope(x, cos_ptr, sin_ptr, idx_ptr, tok, layer, T, rm, R, D, True)
        x = x * sg
        x = _fwht(x, R, D, LOG2D) * scale
    else:
        x = _fwht(x, R, D, LOG2D) * scale
        x = x * sg
        if ROPE:
            x = _rope(x, cos_ptr, sin_ptr, idx_ptr, tok, layer, T, rm, R, D, False)
    tl.store(y_ptr + r[:, None] * D + d[None, :], x, mask=m2)
