"""A small static rANS entropy coder in numba (byte-wise renormalisation, 32-bit state).

Symbols (uint8, alphabet <= 256) are coded with one frequency table quantised to
``2**PROB_BITS``; the input is cut into independent chunks of ``CHUNK`` symbols coded in
parallel. Reference: J. Duda, "Asymmetric numeral systems" (arXiv 1311.2540); F. Giesen's
ryg_rans (public domain) for the byte-wise variant. Written from the description.
"""
from __future__ import annotations

import numba
import numpy as np

PROB_BITS = 12
M = 1 << PROB_BITS
L = 1 << 23
CHUNK = 1 << 18


def quantize_freqs(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to ``M``, every present symbol >= 1 (largest absorbs rounding)."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        f = np.zeros(counts.size, dtype=np.int64)
        f[0] = M
        return f
    f = np.floor(counts * (M / total)).astype(np.int64)
    f[(counts > 0) & (f == 0)] = 1
    f[int(np.argmax(counts))] += M - int(f.sum())
    if f.min() < 0 or int(f.sum()) != M:  # pathological: many rare symbols; fall back to flat-ish
        f = np.where(counts > 0, 1, 0).astype(np.int64)
        f[int(np.argmax(counts))] += M - int(f.sum())
    return f


@numba.njit(parallel=True, cache=True, nogil=True)
def _encode(sym, freq, cum, nchunks, chunk, scratch, lens):
    cap = scratch.shape[1]
    for ci in numba.prange(nchunks):
        lo = ci * chunk
        hi = min(lo + chunk, sym.size)
        p = cap
        x = np.uint64(L)
        for i in range(hi - 1, lo - 1, -1):
            s = sym[i]
            f = np.uint64(freq[s])
            xmax = np.uint64((L >> PROB_BITS) << 8) * f
            while x >= xmax:
                p -= 1
                scratch[ci, p] = np.uint8(x & np.uint64(0xFF))
                x >>= np.uint64(8)
            x = ((x // f) << np.uint64(PROB_BITS)) + (x % f) + np.uint64(cum[s])
        for k in range(4):  # little-endian state at the stream's start
            p -= 1
            scratch[ci, p] = np.uint8((x >> np.uint64(8 * (3 - k))) & np.uint64(0xFF))
        lens[ci] = cap - p


@numba.njit(parallel=True, cache=True, nogil=True)
def _decode(buf, offsets, freq, cum, table, nsym, chunk, out, status):
    nchunks = offsets.size - 1
    for ci in numba.prange(nchunks):
        p = offsets[ci]
        end = offsets[ci + 1]
        lo = ci * chunk
        hi = min(lo + chunk, nsym)
        if end - p < 4:
            status[ci] = 1
            continue
        x = np.uint64(0)
        for k in range(4):
            x |= np.uint64(buf[p]) << np.uint64(8 * k)
            p += 1
        bad = 0
        for i in range(lo, hi):
            slot = x & np.uint64(M - 1)
            s = table[slot]
            out[i] = s
            x = np.uint64(freq[s]) * (x >> np.uint64(PROB_BITS)) + slot - np.uint64(cum[s])
            while x < np.uint64(L):
                if p >= end:
                    bad = 1
                    break
                x = (x << np.uint64(8)) | np.uint64(buf[p])
                p += 1
            if bad:
                break
        if bad or p != end or x != np.uint64(L):
            status[ci] = 1


def encode(sym: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (chunk byte lengths, concatenated chunk streams)."""
    n = sym.size
    nchunks = max(1, -(-n // CHUNK))
    cum = np.zeros(freq.size, dtype=np.int64)
    cum[1:] = np.cumsum(freq)[:-1]
    cap = min(n, CHUNK) * 2 + 16
    scratch = np.empty((nchunks, cap), dtype=np.uint8)
    lens = np.zeros(nchunks, dtype=np.int64)
    _encode(sym, freq, cum, nchunks, CHUNK, scratch, lens)
    out = np.concatenate([scratch[i, cap - lens[i]:] for i in range(nchunks)])
    return lens, out


def decode(stream: np.ndarray, lens: np.ndarray, freq: np.ndarray, nsym: int) -> np.ndarray | None:
    """Inverse of :func:`encode`; None if the stream is inconsistent."""
    cum = np.zeros(freq.size, dtype=np.int64)
    cum[1:] = np.cumsum(freq)[:-1]
    table = np.repeat(np.arange(freq.size, dtype=np.uint8 if freq.size <= 256 else np.uint16), freq)
    if table.size != M:
        return None
    offsets = np.zeros(lens.size + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lens)
    if offsets[-1] != stream.size:
        return None
    out = np.empty(nsym, dtype=table.dtype)
    status = np.zeros(lens.size, dtype=np.int64)
    _decode(stream, offsets, freq.astype(np.int64), cum, table, nsym, CHUNK, out, status)
    if status.any():
        return None
    return out
