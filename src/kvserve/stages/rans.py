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


def _enc_tables(freq: np.ndarray) -> np.ndarray:
    """Per symbol ``[freq, M - freq, bias, reciprocal, shift]`` (uint64): division-free
    encoding. ``x // f`` is ``((x * rcp) >> 32) >> shift`` with ``rcp = ceil(2**(31+k) / f)``,
    ``k = ceil(log2 f)`` (exact for ``x < 2**31``, which the renormalisation guarantees);
    ``f == 1`` uses ``rcp = 2**32 - 1`` (``q = x - 1``) with the bias raised by ``M - 1``.
    The new state ``x + bias + q * (M - f)`` equals ``(x // f) * M + x % f + cum``."""
    freq = freq.astype(np.int64)
    cum = np.zeros(freq.size, dtype=np.int64)
    cum[1:] = np.cumsum(freq)[:-1]
    t = np.zeros((freq.size, 5), dtype=np.uint64)
    for s_, f in enumerate(freq.tolist()):
        if f == 0:
            continue
        if f == 1:
            rcp, shift, bias = (1 << 32) - 1, 0, int(cum[s_]) + M - 1
        else:
            k = (f - 1).bit_length()
            rcp, shift, bias = ((1 << (k + 31)) + f - 1) // f, k - 1, int(cum[s_])
        t[s_] = (f, M - f, bias, rcp, shift)
    return t


@numba.njit(parallel=True, cache=True, nogil=True)
def _encode(sym, tab, nchunks, chunk, scratch, lens):
    cap = scratch.shape[1]
    for ci in numba.prange(nchunks):
        lo = ci * chunk
        hi = min(lo + chunk, sym.size)
        p = cap
        x = np.uint64(L)
        for i in range(hi - 1, lo - 1, -1):
            s = sym[i]
            xmax = np.uint64((L >> PROB_BITS) << 8) * tab[s, 0]
            while x >= xmax:
                p -= 1
                scratch[ci, p] = np.uint8(x & np.uint64(0xFF))
                x >>= np.uint64(8)
            q = ((x * tab[s, 3]) >> np.uint64(32)) >> tab[s, 4]
            x = x + tab[s, 2] + q * tab[s, 1]
        for k in range(4):  # little-endian state at the stream's start
            p -= 1
            scratch[ci, p] = np.uint8((x >> np.uint64(8 * (3 - k))) & np.uint64(0xFF))
        lens[ci] = cap - p


@numba.njit(parallel=True, cache=True, nogil=True)
def _decode(buf, offsets, slots, nsym, chunk, pair_bits, out, status):
    """``slots[x & (M-1)]`` packs ``freq | (slot - cum) << 16 | symbol << 32``: one load per
    symbol. ``pair_bits > 0`` splits each symbol into two (``s >> b``, ``s & (2**b - 1)``)."""
    nchunks = offsets.size - 1
    lowmask = np.uint64((1 << pair_bits) - 1)
    pb = np.uint64(pair_bits)
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
            e = slots[x & np.uint64(M - 1)]
            s = e >> np.uint64(32)
            if pair_bits:
                out[2 * i] = np.uint8(s >> pb)
                out[2 * i + 1] = np.uint8(s & lowmask)
            else:
                out[i] = np.uint8(s)
            x = (e & np.uint64(0xFFFF)) * (x >> np.uint64(PROB_BITS)) + ((e >> np.uint64(16)) & np.uint64(0xFFFF))
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


@numba.njit(parallel=True, cache=True, nogil=True)
def _symbols_counts(arr, pair_bits, sym, counts):
    """Symbols to code (pairs ``a << b | c`` when ``pair_bits``, the odd tail padded with
    0) and their histogram, in one parallel pass; per-block counts are summed after."""
    nblk = counts.shape[0]
    n = sym.size
    step = (n + nblk - 1) // nblk
    for bi in numba.prange(nblk):
        lo = bi * step
        hi = min(lo + step, n)
        for i in range(lo, hi):
            if pair_bits:
                a = arr[2 * i]
                c = arr[2 * i + 1] if 2 * i + 1 < arr.size else np.uint8(0)
                v = (np.uint32(a) << pair_bits) | np.uint32(c)
            else:
                v = np.uint32(arr[i])
            sym[i] = np.uint8(v & np.uint32(0xFF))
            counts[bi, min(v, np.uint32(counts.shape[1] - 1))] += 1


def symbols_and_counts(arr: np.ndarray, pair_bits: int, alpha: int) -> tuple[np.ndarray, np.ndarray]:
    """``(symbols, counts)`` of a uint8 array, paired when ``pair_bits``; counts has
    ``alpha + 1`` entries, the last one counting symbols out of range (must be 0)."""
    a = np.ascontiguousarray(arr, dtype=np.uint8).reshape(-1)
    n = (a.size + 1) // 2 if pair_bits else a.size
    sym = np.empty(n, dtype=np.uint8)
    counts = np.zeros((max(1, min(64, n >> 16)), alpha + 1), dtype=np.int64)
    _symbols_counts(a, int(pair_bits), sym, counts)
    return sym, counts.sum(0)


def encode(sym: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (chunk byte lengths, concatenated chunk streams)."""
    n = sym.size
    nchunks = max(1, -(-n // CHUNK))
    cap = min(n, CHUNK) * 2 + 16
    scratch = np.empty((nchunks, cap), dtype=np.uint8)
    lens = np.zeros(nchunks, dtype=np.int64)
    _encode(sym, _enc_tables(freq), nchunks, CHUNK, scratch, lens)
    out = np.concatenate([scratch[i, cap - lens[i]:] for i in range(nchunks)])
    return lens, out


def decode(stream: np.ndarray, lens: np.ndarray, freq: np.ndarray, nsym: int,
           pair_bits: int = 0) -> np.ndarray | None:
    """Inverse of :func:`encode`; None if the stream is inconsistent. With ``pair_bits`` each
    decoded symbol is split into two (the inverse of pairing): ``2 * nsym`` symbols."""
    freq = np.asarray(freq, dtype=np.int64)
    if freq.size > 256 or int(freq.sum()) != M or (freq < 0).any():
        return None
    cum = np.zeros(freq.size, dtype=np.int64)
    cum[1:] = np.cumsum(freq)[:-1]
    sym_of = np.repeat(np.arange(freq.size, dtype=np.uint64), freq)
    slot_bias = np.arange(M, dtype=np.uint64) - np.repeat(cum, freq).astype(np.uint64)
    slots = np.repeat(freq.astype(np.uint64), freq) | (slot_bias << np.uint64(16)) | (sym_of << np.uint64(32))
    offsets = np.zeros(lens.size + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lens)
    if offsets[-1] != stream.size:
        return None
    out = np.empty(nsym * (2 if pair_bits else 1), dtype=np.uint8)
    status = np.zeros(lens.size, dtype=np.int64)
    _decode(stream, offsets, slots, nsym, CHUNK, int(pair_bits), out, status)
    if status.any():
        return None
    return out
