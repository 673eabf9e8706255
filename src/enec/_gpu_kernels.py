"""Triton kernels of the ENEC stream format (docs/FORMAT.md). Imported only by :mod:`enec.gpu`.

This module imports triton at the top, so nothing else in :mod:`enec` imports it: use the
wrappers in :mod:`enec.gpu`, which load it lazily and turn a missing triton/CUDA into
:class:`enec.EnecError`.

Layout shared by the encode and decode kernels: a block of ``n`` elements is padded to
``pn`` lanes, ``t = pn / 8``; plane byte ``k`` carries bit ``j`` of element ``j*t + k``. A
program works on a tile of ``TILE_K`` plane bytes at a time, as an ``[8, TILE_K]`` tensor
``(j, k)`` -> element ``j*t + k``: rows are contiguous in memory, so element loads and
stores coalesce, and a plane byte is a column. Lane order (the order of the level-2 codes
and level-3 bytes) is ``k`` ascending, then ``j``: an escape's rank is the running count of
earlier tiles + the escapes of earlier columns (exclusive prefix sum over ``k``) + the
escapes above it in its own column (exclusive prefix sum over ``j``).

Kernels never raise: the decoder writes a status code per block (the codes of
:mod:`enec.cpu`), and every read it makes from the stream is clamped into the block.

All bit arithmetic is on unsigned 32-bit values; integer views travel as signed ints of the
same width (torch has full support only for those) and are bitcast on load and store.
"""

from __future__ import annotations

import triton
import triton.language as tl

# status codes, as in enec.cpu
ST_BLOCK_HEADER = tl.constexpr(2)
ST_BLOCK_SIZE = tl.constexpr(3)
ST_ESCAPES = tl.constexpr(4)
ST_ESCAPE_IN_PADDING = tl.constexpr(5)
ST_LEVEL3 = tl.constexpr(6)


@triton.jit
def _to_u32(x, ISZ: tl.constexpr):
    """Signed-int view of a float (int8/16/32) -> its bits as uint32."""
    if ISZ == 1:
        r = x.to(tl.uint8, bitcast=True).to(tl.uint32)
    elif ISZ == 2:
        r = x.to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        r = x.to(tl.uint32, bitcast=True)
    return r


@triton.jit
def _from_u32(v, ISZ: tl.constexpr):
    """uint32 bits -> the signed-int view type of the output (int8/16/32)."""
    if ISZ == 1:
        r = v.to(tl.uint8).to(tl.int8, bitcast=True)
    elif ISZ == 2:
        r = v.to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        r = v.to(tl.int32, bitcast=True)
    return r


@triton.jit
def _pick(vec, idx, q):
    """Scalar vec[q] of a small vector (idx = tl.arange over it)."""
    return tl.sum(tl.where(idx == q, vec, 0), axis=0)


# ----------------------------------------------------------------------------- histogram


@triton.jit
def histogram_kernel(x_ptr, hist_ptr, numel, BLOG2: tl.constexpr, POS: tl.constexpr,
                     K: tl.constexpr, ISZ: tl.constexpr, TILE: tl.constexpr):
    """hist[b, :] = exponent histogram of block b (int32, K = 2**ebits bins)."""
    b = tl.program_id(0)
    s = b.to(tl.int64) << BLOG2
    n = tl.minimum(numel - s, 1 << BLOG2).to(tl.int32)
    bins = tl.arange(0, K)
    hist = tl.zeros([K], tl.int32)
    for i0 in range(0, n, TILE):
        idx = i0 + tl.arange(0, TILE)
        m = idx < n
        x = _to_u32(tl.load(x_ptr + s + idx, mask=m, other=0), ISZ)
        e = ((x >> POS) & (K - 1)).to(tl.int32)  # masked lanes are 0 and taken back below
        hist += tl.histogram(e, K)
        hist -= tl.where(bins == 0, TILE - tl.sum(m.to(tl.int32), axis=0), 0)
    tl.store(hist_ptr + b.to(tl.int64) * K + bins, hist)


# ----------------------------------------------------------------------------- checksum


@triton.jit
def _absorb(acc, w):
    a = acc ^ w
    a = (a << 15) | (a >> 17)
    return a * 0x9E3779B1


@triton.jit
def checksum_kernel(w32_ptr, wstart, off_ptr, nblocks, out_ptr, G: tl.constexpr):
    """out[b] = block checksum (docs/FORMAT.md section 6) of blocks pid*G .. pid*G+G-1; the
    payload starts at 32-bit word ``wstart`` of ``w32_ptr``.

    A program hashes G blocks side by side as a [G, 64] tile of lane accumulators and
    reads four 64-word rows per step before folding them in, so loads overlap.
    """
    pid = tl.program_id(0)
    bs = pid * G + tl.arange(0, G)
    bm = bs < nblocks
    o = tl.load(off_ptr + bs, mask=bm, other=0)
    e = tl.load(off_ptr + bs + 1, mask=bm, other=0)
    words = tl.where(bm, (e - o) >> 2, 0)  # int64
    lanes = tl.arange(0, 64)
    acc = tl.zeros([G, 64], tl.uint32) + ((lanes + 1).to(tl.uint32) * 0xC2B2AE3D)[None, :]
    nrows = tl.max((words + 63) >> 6, axis=0)
    base = w32_ptr + wstart + (o >> 2)[:, None] + lanes[None, :]
    wl = words[:, None]
    for r in range(0, nrows, 4):
        i0 = r * 64 + lanes[None, :]
        m0 = i0 < wl
        m1 = (i0 + 64) < wl
        m2 = (i0 + 128) < wl
        m3 = (i0 + 192) < wl
        w0 = tl.load(base + r * 64, mask=m0, other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(base + r * 64 + 64, mask=m1, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(base + r * 64 + 128, mask=m2, other=0).to(tl.uint32, bitcast=True)
        w3 = tl.load(base + r * 64 + 192, mask=m3, other=0).to(tl.uint32, bitcast=True)
        acc = tl.where(m0, _absorb(acc, w0), acc)
        acc = tl.where(m1, _absorb(acc, w1), acc)
        acc = tl.where(m2, _absorb(acc, w2), acc)
        acc = tl.where(m3, _absorb(acc, w3), acc)
    h = (words * 4).to(tl.uint32)
    for l in tl.static_range(64):
        al = tl.sum(tl.where(lanes[None, :] == l, acc, 0), axis=1).to(tl.uint32)
        h = h + al * 0xC2B2AE3D
        h = (h << 17) | (h >> 15)
        h = h * 0x9E3779B1
    h ^= h >> 15
    h = h * 0x85EBCA77
    h ^= h >> 13
    h = h * 0xC2B2AE3D
    h ^= h >> 16
    tl.store(out_ptr + bs, h.to(tl.int32, bitcast=True), mask=bm)


# ----------------------------------------------------------------------------- decode


@triton.jit
def _decode_coded(blk, size, ybase, n, t, pn, full, w1, b1, w2, b2, n1, n2,
                  POS: tl.constexpr, EB: tl.constexpr, RB: tl.constexpr, RP: tl.constexpr,
                  ISZ: tl.constexpr, TILE_K: tl.constexpr):
    """The coded block at ``blk`` (``size`` bytes) -> ``ybase[0 : n]``; returns its status.

    Offsets inside a block are int32 (a block is < 2**31 bytes). Loads are masked by plane
    length only (padding lanes are in the block), and ``full`` (a whole block whose plane
    length is a multiple of TILE_K) stores without a mask, so both can be vectorised.
    """
    EM: tl.constexpr = (1 << EB) - 1
    PM: tl.constexpr = (1 << POS) - 1
    HPOS: tl.constexpr = POS + EB
    lim = size.to(tl.int32) - 1  # last byte of the block: data-dependent reads are clamped to it
    po = 16 + RB * pn
    co = po + RP * t
    l2 = co + w1 * t
    l3 = l2 + ((n1 * w2 + 7) // 8).to(tl.int32)
    esc1 = (1 << w1) - 1
    esc2 = (1 << w2) - 1
    jj = tl.arange(0, 8)[:, None]
    zero = tl.program_id(0) * 0
    c1 = zero  # escapes so far
    c3 = zero  # level-3 bytes so far
    bad = zero
    for k0 in range(0, t, TILE_K):
        kk = k0 + tl.arange(0, TILE_K)
        km = kk < t
        i = jj * t + kk[None, :]  # [8, TILE_K] element index
        pm = km[None, :] & (jj < 8)  # every lane of the tile, padding included
        # level-1 codes from the planes
        c = tl.zeros([8, TILE_K], tl.int32)
        for p in range(w1):
            pb = tl.load(blk + co + p * t + kk, mask=km, other=0).to(tl.int32)
            c |= ((pb[None, :] >> jj) & 1) << p
        e = (b1 + c) & EM
        esc = (c == esc1) & km[None, :]
        ei = esc.to(tl.int32)
        colcnt = tl.sum(ei, axis=0)
        rank = c1 + (tl.cumsum(colcnt, axis=0) - colcnt)[None, :] + (tl.cumsum(ei, axis=0) - ei)
        bad |= tl.max(tl.max((esc & (i >= n)).to(tl.int32), axis=1), axis=0)
        # level-2 codes: w2 bits at bit rank*w2 of the LSB-first stream
        bp = rank * w2
        a0 = tl.minimum(l2 + (bp >> 3), lim)
        lo = tl.load(blk + a0, mask=esc, other=0).to(tl.int32)
        hi = tl.load(blk + tl.minimum(a0 + 1, lim), mask=esc, other=0).to(tl.int32)
        cc = ((lo | (hi << 8)) >> (bp & 7)) & esc2
        l3f = esc & (cc == esc2)
        fi = l3f.to(tl.int32)
        col3 = tl.sum(fi, axis=0)
        rank3 = c3 + (tl.cumsum(col3, axis=0) - col3)[None, :] + (tl.cumsum(fi, axis=0) - fi)
        raw_e = tl.load(blk + tl.minimum(l3 + rank3, lim), mask=l3f, other=0).to(tl.int32)
        bad |= tl.max(tl.max((l3f & (raw_e > EM)).to(tl.int32), axis=1), axis=0)
        e = tl.where(esc, tl.where(l3f, raw_e, (b2 + cc) & EM), e)
        c1 += tl.sum(colcnt, axis=0)
        c3 += tl.sum(col3, axis=0)
        # the rest: byte planes in element order, then bit planes
        r = tl.zeros([8, TILE_K], tl.uint32)
        for q in tl.static_range(RB):
            rb = tl.load(blk + 16 + q * pn + i, mask=pm, other=0)
            r |= rb.to(tl.uint32) << (8 * q)
        for p in tl.static_range(RP):
            pb = tl.load(blk + po + p * t + kk, mask=km, other=0).to(tl.int32)
            r |= (((pb[None, :] >> jj) & 1).to(tl.uint32)) << (8 * RB + p)
        v = _from_u32((r & PM) | ((e & EM).to(tl.uint32) << POS) | ((r >> POS) << HPOS), ISZ)
        if full:
            tl.store(ybase + i, v)
        else:
            tl.store(ybase + i, v, mask=(i < n) & pm)
    status = zero
    if c1 != n1:
        status = zero + ST_ESCAPES
    elif bad != 0:
        status = zero + ST_ESCAPE_IN_PADDING
    elif c3 != n2:
        status = zero + ST_LEVEL3
    return status


@triton.jit
def decode_kernel(src_ptr, pstart, off_ptr, numel, out_ptr, outb_ptr, status_ptr,
                  BLOG2: tl.constexpr, POS: tl.constexpr, EB: tl.constexpr,
                  RB: tl.constexpr, RP: tl.constexpr, ISZ: tl.constexpr,
                  TILE_K: tl.constexpr, RAW_TILE: tl.constexpr, HINT: tl.constexpr):
    """Decode block ``program_id``; the payload starts at byte ``pstart`` of ``src_ptr``.

    ``HINT`` tells the compiler that block starts are multiples of 8 bytes (true of every
    stream parse_header accepts), which lets it widen loads.
    """
    EM: tl.constexpr = (1 << EB) - 1
    BLK: tl.constexpr = 1 << BLOG2
    b = tl.program_id(0)
    s = b.to(tl.int64) << BLOG2
    n = tl.minimum(numel - s, BLK).to(tl.int32)
    rel = tl.load(off_ptr + b)
    size = tl.load(off_ptr + b + 1) - rel
    o = pstart + rel
    if HINT:
        o = tl.multiple_of(o, 8)
    hidx = tl.arange(0, 16)
    hdr = tl.load(src_ptr + o + hidx).to(tl.int32)
    mode = _pick(hdr, hidx, 0)
    w1 = _pick(hdr, hidx, 1)
    b1 = _pick(hdr, hidx, 2)
    w2 = _pick(hdr, hidx, 3)
    b2 = _pick(hdr, hidx, 4)
    sh = tl.where((hidx >= 8) & (hidx < 12), 8 * (hidx - 8), 8 * (hidx - 12))
    n1 = tl.sum(tl.where((hidx >= 8) & (hidx < 12), hdr.to(tl.int64) << sh, 0), axis=0)
    n2 = tl.sum(tl.where(hidx >= 12, hdr.to(tl.int64) << sh, 0), axis=0)
    reserved = tl.sum(tl.where((hidx >= 5) & (hidx < 8), hdr, 0), axis=0)
    nonzero_after_mode = tl.sum(tl.where(hidx >= 1, hdr, 0), axis=0)
    pn = (n + 63) & ~63
    t = pn // 8
    if HINT:
        t = tl.multiple_of(t, 8)
    status = tl.program_id(0) * 0
    if mode == 1:
        nbytes = n.to(tl.int64) * ISZ
        if nonzero_after_mode != 0:
            status = status + ST_BLOCK_HEADER
        elif size != ((16 + nbytes + 7) & ~7):
            status = status + ST_BLOCK_SIZE
        else:
            for q0 in range(0, nbytes, RAW_TILE):
                q = q0 + tl.arange(0, RAW_TILE)
                m = q < nbytes
                v = tl.load(src_ptr + o + 16 + q, mask=m, other=0)
                tl.store(outb_ptr + s * ISZ + q, v, mask=m)
    elif ((mode != 0) | (reserved != 0) | (w1 < 1) | (w1 > EB) | (w2 > EB) | (n1 > n) | (n2 > n1)
          | (b1 > EM) | (b2 > EM)):
        status = status + ST_BLOCK_HEADER
    elif size != ((16 + RB * pn + (RP + w1) * t + (n1 * w2 + 7) // 8 + n2 + 7) & ~7):
        status = status + ST_BLOCK_SIZE
    else:
        full = (n == BLK) & ((BLK // 8) % TILE_K == 0)
        status = _decode_coded(src_ptr + o, size, out_ptr + s, n, t, pn, full, w1, b1, w2, b2,
                               n1, n2, POS, EB, RB, RP, ISZ, TILE_K)
    tl.store(status_ptr + b, status)


# ----------------------------------------------------------------------------- encode


@triton.jit
def _encode_coded(xbase, n, t, pn, full, blk, size, n1, n2, scratch, W1, b1, w2, b2,
                  POS: tl.constexpr, EB: tl.constexpr, RB: tl.constexpr, RP: tl.constexpr,
                  ISZ: tl.constexpr, TILE_K: tl.constexpr, PACK_TILE: tl.constexpr):
    """Write the coded block of ``xbase[0 : n]`` at ``blk`` (``size`` bytes, header included);
    ``scratch`` is this block's slice of the level-2 scratch. Offsets are block-relative int32;
    ``full`` (a whole block whose plane length is a multiple of TILE_K) loads unmasked."""
    EM: tl.constexpr = (1 << EB) - 1
    PM: tl.constexpr = (1 << POS) - 1
    HPOS: tl.constexpr = POS + EB
    hidx = tl.arange(0, 16)
    sh = tl.where(hidx >= 12, 8 * (hidx - 12), 8 * (hidx - 8))
    hv = tl.where(hidx == 1, W1, 0) + tl.where(hidx == 2, b1, 0)
    hv += tl.where(hidx == 3, w2, 0) + tl.where(hidx == 4, b2, 0)
    hv64 = tl.where((hidx >= 8) & (hidx < 12), (n1 >> sh) & 255, 0)
    hv64 += tl.where(hidx >= 12, (n2 >> sh) & 255, 0)
    tl.store(blk + hidx, (hv.to(tl.int64) + hv64).to(tl.uint8))
    po = 16 + RB * pn
    co = po + RP * t
    l2 = co + W1 * t
    l3 = l2 + ((n1 * w2 + 7) // 8).to(tl.int32)
    esc1 = (1 << W1) - 1
    esc2 = (1 << w2) - 1
    jj = tl.arange(0, 8)[:, None]
    c1 = tl.program_id(0) * 0
    c3 = c1
    for k0 in range(0, t, TILE_K):
        kk = k0 + tl.arange(0, TILE_K)
        km = kk < t
        i = jj * t + kk[None, :]
        im = (i < n) & km[None, :]
        if full:  # unmasked, so the loads widen
            x = _to_u32(tl.load(xbase + i), ISZ)
        else:
            x = _to_u32(tl.load(xbase + i, mask=im, other=0), ISZ)
        e = ((x >> POS) & EM).to(tl.int32)
        r = (x & PM) | ((x >> HPOS) << POS)
        pm = km[None, :] & (jj < 8)  # every lane of the tile's columns, padding included
        for q in tl.static_range(RB):
            tl.store(blk + 16 + q * pn + i, ((r >> (8 * q)) & 255).to(tl.uint8), mask=pm)
        for p in tl.static_range(RP):
            bits = ((r >> (8 * RB + p)) & 1).to(tl.int32) << jj
            tl.store(blk + po + p * t + kk, tl.sum(bits, axis=0).to(tl.uint8), mask=km)
        c = tl.where(im, tl.minimum((e - b1) & EM, esc1), 0)
        for p in range(W1):
            bits = ((c >> p) & 1) << jj
            tl.store(blk + co + p * t + kk, tl.sum(bits, axis=0).to(tl.uint8), mask=km)
        esc = im & (c == esc1)
        ei = esc.to(tl.int32)
        colcnt = tl.sum(ei, axis=0)
        rank = c1 + (tl.cumsum(colcnt, axis=0) - colcnt)[None, :] + (tl.cumsum(ei, axis=0) - ei)
        cc = (e - b2) & EM
        l3f = esc & (cc >= esc2)
        cc = tl.where(l3f, esc2, cc)
        tl.store(scratch + rank, cc.to(tl.uint8), mask=esc)
        fi = l3f.to(tl.int32)
        col3 = tl.sum(fi, axis=0)
        rank3 = c3 + (tl.cumsum(col3, axis=0) - col3)[None, :] + (tl.cumsum(fi, axis=0) - fi)
        tl.store(blk + l3 + rank3, e.to(tl.uint8), mask=l3f)
        c1 += tl.sum(colcnt, axis=0)
        c3 += tl.sum(col3, axis=0)
    # zero padding after the level-3 bytes (0..7 bytes)
    pad = l3 + n2.to(tl.int32) + tl.arange(0, 8)
    tl.store(blk + pad, tl.zeros([8], tl.uint8), mask=pad < size)
    tl.debug_barrier()  # the scratch codes of every thread are visible from here on
    if w2 > 0:
        nb2 = ((n1 * w2 + 7) >> 3).to(tl.int32)
        n1i = n1.to(tl.int32)
        for q0 in range(0, nb2, PACK_TILE):
            q = q0 + tl.arange(0, PACK_TILE)
            qm = q < nb2
            bit0 = q * 8
            r0 = bit0 // w2  # first code that overlaps byte q
            acc = tl.zeros([PACK_TILE], tl.int32)
            for u in tl.static_range(9):  # at most 9 codes of >= 1 bit overlap 8 bits
                rr = r0 + u
                m = qm & (rr < n1i) & (rr * w2 < bit0 + 8)
                code = tl.load(scratch + rr, mask=m, other=0).to(tl.int32)
                d = rr * w2 - bit0
                part = tl.where(d >= 0, code << tl.maximum(d, 0), code >> tl.maximum(-d, 0))
                acc |= tl.where(m, part, 0)
            tl.store(blk + l2 + q, (acc & 255).to(tl.uint8), mask=qm)


@triton.jit
def encode_kernel(x_ptr, xb_ptr, numel, out_ptr, pstart, off_ptr, mode_ptr, n1_ptr, n2_ptr,
                  escoff_ptr, scratch_ptr, W1, b1, w2, b2,
                  BLOG2: tl.constexpr, POS: tl.constexpr, EB: tl.constexpr,
                  RB: tl.constexpr, RP: tl.constexpr, ISZ: tl.constexpr,
                  TILE_K: tl.constexpr, RAW_TILE: tl.constexpr, PACK_TILE: tl.constexpr,
                  HINT: tl.constexpr):
    """Encode block ``program_id`` at byte ``pstart + off[b]`` of ``out_ptr`` (the plan comes
    from the host: mode, n1, n2 and the scratch offset of each block).

    Level-1 escapes write their level-2 code to ``scratch[escoff[b] + rank]`` (one byte per
    escape, lane order) and their level-3 byte straight to the block; after a barrier the
    level-2 bit stream is packed byte by byte from the scratch (no atomics, same bytes).
    """
    BLK: tl.constexpr = 1 << BLOG2
    b = tl.program_id(0)
    s = b.to(tl.int64) << BLOG2
    n = tl.minimum(numel - s, BLK).to(tl.int32)
    rel = tl.load(off_ptr + b)
    end = pstart + tl.load(off_ptr + b + 1)
    o = pstart + rel
    if HINT:
        o = tl.multiple_of(o, 8)
    mode = tl.load(mode_ptr + b).to(tl.int32)
    if mode == 1:
        hidx = tl.arange(0, 16)
        tl.store(out_ptr + o + hidx, tl.where(hidx == 0, 1, 0).to(tl.uint8))
        nbytes = n.to(tl.int64) * ISZ
        for q0 in range(0, end - o - 16, RAW_TILE):
            q = q0 + tl.arange(0, RAW_TILE)
            v = tl.load(xb_ptr + s * ISZ + q, mask=q < nbytes, other=0)
            tl.store(out_ptr + o + 16 + q, v, mask=q < end - o - 16)
    else:
        n1 = tl.load(n1_ptr + b)  # int64
        n2 = tl.load(n2_ptr + b)
        eoff = tl.load(escoff_ptr + b)
        pn = (n + 63) & ~63
        t = pn // 8
        if HINT:
            t = tl.multiple_of(t, 8)
        full = (n == BLK) & ((BLK // 8) % TILE_K == 0)
        _encode_coded(x_ptr + s, n, t, pn, full, out_ptr + o, end - o, n1, n2, scratch_ptr + eoff,
                      W1, b1, w2, b2, POS, EB, RB, RP, ISZ, TILE_K, PACK_TILE)
