"""A plain numpy reference of the ENEC stream format (slow, for tests and porting).

It follows docs/FORMAT.md step by step and shares nothing with the compiled kernels but
the header helpers, so a test that compares the two checks the kernels against the
written format. Accelerated encoders must produce exactly :func:`encode`'s bytes.
"""

from __future__ import annotations

import numpy as np

from .errors import EnecError
from .format import (
    BLOCK_HEADER_BYTES,
    FloatFormat,
    block_checksum_reference,
    build_header,
    coded_block_bytes,
    padded,
    parse_header,
    raw_block_bytes,
)


def choose_params(hist: np.ndarray, ebits: int, penalty: int = 2) -> tuple[int, int, int, int]:
    """Same search as the kernel: minimise w1*n + n1*(w2 + penalty) + 8*n2 over level-1 windows that
    start at an occupied bin and every level-2 window; the first minimum in loop order wins
    (w1, then b1, then w2 ascending; for level 2 the first best start)."""
    k = 1 << ebits
    n = int(hist.sum())
    best = None
    for w1 in range(1, ebits + 1):
        if best is not None and w1 * n >= best[0]:
            break
        win1 = (1 << w1) - 1
        for b1 in range(k):
            if hist[b1] == 0 and n > 0:
                continue
            in1 = np.zeros(k, bool)
            in1[(b1 + np.arange(min(win1, k))) % k] = True
            rem = np.where(in1, 0, hist)
            n1 = int(rem.sum())
            if n1 == 0:
                if best is None or w1 * n < best[0]:
                    best = (w1 * n, w1, b1, 0, 0)
                continue
            for w2 in range(ebits + 1):
                win2 = (1 << w2) - 1
                cov2, b2 = 0, 0
                if win2 >= k:
                    cov2 = n1
                elif win2 > 0:  # circular window sums by prefix sums; argmax keeps the first best
                    cs = np.concatenate([[0], np.cumsum(np.concatenate([rem, rem]))])
                    covs = cs[np.arange(k) + win2] - cs[np.arange(k)]
                    b2 = int(np.argmax(covs))
                    cov2 = int(covs[b2])
                cost = w1 * n + n1 * (w2 + penalty) + 8 * (n1 - cov2)
                if best is None or cost < best[0]:
                    best = (cost, w1, b1, w2, b2)
    return best[1:]


def _planes_pack(vals: np.ndarray, nplanes: int) -> bytes:
    """Lane-strided planes: plane p, byte k, bit j = bit p of vals[j*t + k]."""
    t = vals.size // 8
    rows = vals.reshape(8, t)
    out = bytearray()
    for p in range(nplanes):
        bits = (rows >> p) & 1
        out += sum((bits[j].astype(np.uint16) << j) for j in range(8)).astype(np.uint8).tobytes()
    return bytes(out)


def _planes_unpack(data: np.ndarray, nplanes: int, t: int) -> np.ndarray:
    vals = np.zeros(8 * t, np.uint32)
    for p in range(nplanes):
        plane = data[p * t : (p + 1) * t].astype(np.uint32)
        for j in range(8):
            vals[j * t : (j + 1) * t] |= ((plane >> j) & 1) << p
    return vals


def _lane_order(t: int) -> np.ndarray:
    """Element indices in lane order: byte k ascending, then bit j."""
    k, j = np.meshgrid(np.arange(t), np.arange(8), indexing="ij")
    return (j * t + k).reshape(-1)


def encode_block(fmt: FloatFormat, x: np.ndarray, params) -> bytes:
    """One block (x: unsigned ints of the float's width), coded or raw, whichever is smaller."""
    w1, b1, w2, b2 = params
    n = x.size
    em = (1 << fmt.ebits) - 1
    x = x.astype(np.uint64)
    e = (x >> fmt.pos) & em
    rest = (x & ((1 << fmt.pos) - 1)) | ((x >> (fmt.pos + fmt.ebits)) << fmt.pos)
    c = (e - b1) & em
    esc1 = (1 << w1) - 1
    c = np.minimum(c, esc1)
    pn = padded(n)
    t = pn // 8
    cpad = np.zeros(pn, np.uint64)
    cpad[:n] = c
    order = [i for i in _lane_order(t) if i < n and cpad[i] == esc1]
    esc_e = e[order]
    c2 = (esc_e - b2) & em
    esc2 = (1 << w2) - 1
    lvl3 = c2 >= esc2
    c2 = np.where(lvl3, esc2, c2)
    n1, n2 = len(order), int(lvl3.sum())
    size = coded_block_bytes(fmt, n, w1, w2, n1, n2)
    if size >= raw_block_bytes(fmt, n):
        body = bytes([1]) + bytes(15) + x.astype(fmt.uint_dtype).tobytes()
        return body + bytes(raw_block_bytes(fmt, n) - len(body))
    out = bytearray([0, w1, b1, w2, b2, 0, 0, 0])
    out += np.array([n1, n2], "<u4").tobytes()
    rpad = np.zeros(pn, np.uint64)
    rpad[:n] = rest
    for q in range(fmt.rest_bytes):
        out += ((rpad >> (8 * q)) & 0xFF).astype(np.uint8).tobytes()
    out += _planes_pack(rpad >> (8 * fmt.rest_bytes), fmt.rest_planes)
    out += _planes_pack(cpad, w1)
    bits = 0
    nb = 0
    lvl2 = bytearray()
    for v in c2.tolist():  # LSB-first bit stream
        bits |= v << nb
        nb += w2
        while nb >= 8:
            lvl2.append(bits & 0xFF)
            bits >>= 8
            nb -= 8
    if nb:
        lvl2.append(bits & 0xFF)
    out += lvl2
    out += esc_e[lvl3].astype(np.uint8).tobytes()
    out += bytes(size - len(out))
    assert len(out) == size
    return bytes(out)


def encode(x: np.ndarray, fmt: FloatFormat, shape=None, block_log2: int = 14, flags: int = 0,
           penalty: int = 2) -> bytes:
    """A whole stream from a flat unsigned-int array of ``fmt``'s width."""
    x = np.ascontiguousarray(x).reshape(-1)
    shape = tuple(shape) if shape is not None else (x.size,)
    em = (1 << fmt.ebits) - 1
    hist = np.bincount((x.astype(np.uint64) >> fmt.pos) & em, minlength=em + 1)
    params = choose_params(hist, fmt.ebits, penalty) if x.size else (1, 0, 0, 0)
    bs = 1 << block_log2
    blocks = [encode_block(fmt, x[s : s + bs], params) for s in range(0, x.size, bs)]
    offsets = np.cumsum([0] + [len(b) for b in blocks]).astype(np.int64)
    checks = np.array([block_checksum_reference(b) for b in blocks], np.uint32)
    return build_header(fmt, shape, block_log2, flags, offsets, checks) + b"".join(blocks)


def decode(data) -> np.ndarray:
    """Decode a stream into a flat unsigned-int array (the float's bits), checking everything."""
    buf = np.frombuffer(data, np.uint8)
    info = parse_header(buf)
    fmt = info.fmt
    em = (1 << fmt.ebits) - 1
    out = np.zeros(info.numel, np.uint64)
    payload = buf[info.payload_start :]
    for b in range(info.nblocks):
        blk = payload[int(info.offsets[b]) : int(info.offsets[b + 1])]
        if block_checksum_reference(blk.tobytes()) != int(info.checksums[b]):
            raise EnecError(f"corrupted ENEC stream: block {b}: block checksum mismatch")
        n = info.block_count(b)
        s = b * info.block_elems
        if blk[0] == 1:
            if len(blk) != raw_block_bytes(fmt, n) or blk[1:16].any():
                raise EnecError(f"corrupted ENEC stream: block {b}: invalid raw block")
            out[s : s + n] = np.frombuffer(blk[16 : 16 + n * fmt.itemsize].tobytes(), fmt.uint_dtype)
            continue
        w1, b1, w2, b2 = (int(v) for v in blk[1:5])
        n1, n2 = (int(v) for v in np.frombuffer(blk[8:16].tobytes(), "<u4"))
        if blk[0] != 0 or blk[5:8].any() or not 1 <= w1 <= fmt.ebits or w2 > fmt.ebits or max(b1, b2) > em:
            raise EnecError(f"corrupted ENEC stream: block {b}: invalid block header")
        if n2 > n1 or n1 > n or len(blk) != coded_block_bytes(fmt, n, w1, w2, n1, n2):
            raise EnecError(f"corrupted ENEC stream: block {b}: block size does not match its header")
        pn = padded(n)
        t = pn // 8
        pos = BLOCK_HEADER_BYTES
        rest = np.zeros(pn, np.uint64)
        for q in range(fmt.rest_bytes):
            rest |= blk[pos : pos + pn].astype(np.uint64) << (8 * q)
            pos += pn
        rest |= _planes_unpack(blk[pos:], fmt.rest_planes, t).astype(np.uint64) << (8 * fmt.rest_bytes)
        pos += fmt.rest_planes * t
        codes = _planes_unpack(blk[pos:], w1, t).astype(np.uint64)
        pos += w1 * t
        e = (b1 + codes) & em
        esc1 = (1 << w1) - 1
        order = [i for i in _lane_order(t) if codes[i] == esc1]
        if any(i >= n for i in order) or len(order) != n1:
            raise EnecError(f"corrupted ENEC stream: block {b}: escapes do not match the block header")
        lvl2 = blk[pos : pos + (n1 * w2 + 7) // 8].tobytes()
        bits = int.from_bytes(lvl2, "little")
        l3 = pos + len(lvl2)
        esc2 = (1 << w2) - 1
        used = 0
        for idx, i in enumerate(order):
            c2 = (bits >> (idx * w2)) & esc2
            if c2 == esc2:
                v = int(blk[l3 + used])
                used += 1
                if v > em:
                    raise EnecError(f"corrupted ENEC stream: block {b}: invalid level-3 exponent")
                e[i] = v
            else:
                e[i] = (b2 + c2) & em
        if used != n2:
            raise EnecError(f"corrupted ENEC stream: block {b}: level-3 escapes do not match the block header")
        low = rest & ((1 << fmt.pos) - 1)
        high = rest >> fmt.pos
        out[s : s + n] = (low | (e << fmt.pos) | (high << (fmt.pos + fmt.ebits)))[:n]
    return out.astype(fmt.uint_dtype)
