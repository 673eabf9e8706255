"""Interleaved static rANS (``irans``): the entropy coder that runs on a GPU and a CPU alike.

The ``rans`` codec codes each 256 Ki-symbol chunk with one state: a GPU can give each chunk
one thread only, so a small KV keeps a few hundred threads busy. ``irans`` cuts the symbols
into blocks of ``2**block_log2`` (default 2**15) and codes each block with ``LANES`` = 32
interleaved states (symbol ``i`` of a block goes to lane ``i % 32``, step ``i // 32``), the
layout of GPU rANS coders (dietgpu, nvCOMP ANS): one warp per block, neighbouring lanes
read and write neighbouring symbols, and the renormalisation words of one step are stored
side by side in lane order, so a warp reads them with one prefix sum.

States are 32-bit in ``[2**16, 2**32)``, renormalised by 16-bit words (so a lane emits or
reads at most one word per symbol), frequencies are the 12-bit tables of
:func:`kvserve.stages.rans.quantize_freqs` (the same table for the same symbols as ``rans``).

Encoding one step, lane by lane: if ``x >> 20 >= f`` emit ``x & 0xFFFF`` and ``x >>= 16``; then
``x = (x // f) * 4096 + x % f + cum``. Decoding: ``slot = x & 4095``, ``s`` the symbol of the
slot, ``x = f * (x >> 12) + slot - cum``; if ``x < 2**16``, ``x = x << 16 | next word``. The
encoder runs the steps backwards and the decoder forwards; a block's stream is its 32 final
encoder states (u32) followed by the words in the order the decoder reads them (step by
step, lanes ascending). The decoder checks that every lane ends in state ``2**16`` and that
the block's words are used up exactly.

This module holds the stream layout (header, block table) and the numba coder; the Triton
kernels of :mod:`kvserve.stages._triton_kernels` write and read the same bytes.
"""
from __future__ import annotations

import struct

import numba
import numpy as np

from ..errors import KVServeError
from . import rans
from .base import register
from .codecs import _PairingCodec, numba_threads

LANES = 32
PROB_BITS = rans.PROB_BITS  # 12
M = rans.M
LOW = 1 << 16  # state lower bound; states live in [LOW, 2**32)
DEFAULT_BLOCK_LOG2 = 15
MIN_BLOCK_LOG2, MAX_BLOCK_LOG2 = 8, 20
STATE_BYTES = 4 * LANES


# ----------------------------------------------------------------- stream layout


def pack_header(paired: bool, alpha: int, freq: np.ndarray, block_log2: int, block_bytes: np.ndarray) -> bytes:
    """``u8 paired | u16 alphabet | alphabet x u16 freq | u8 block_log2 | u32 nblocks |
    nblocks x u32 block bytes`` (the block streams follow)."""
    return (struct.pack("<BH", int(paired), alpha) + np.asarray(freq, dtype="<u2").tobytes()
            + struct.pack("<BI", block_log2, block_bytes.size) + np.asarray(block_bytes, dtype="<u4").tobytes())


def parse_header(buf, count: int, bits: int):
    """Check a stream's header against ``count`` symbols of ``bits``; returns
    ``(paired, alpha, freq int64, block_log2, nsym, offsets int64 (nblocks + 1), header_len)``
    with block offsets relative to the end of the header. Raises :class:`KVServeError`."""
    mv = memoryview(buf).cast("B")
    if not 1 <= bits <= 8:
        raise KVServeError("irans: bad symbol width")
    if len(mv) < 3:
        raise KVServeError("irans: truncated")
    paired, alpha = struct.unpack_from("<BH", mv, 0)
    if paired not in (0, 1) or alpha != 1 << (bits * (1 + paired)) or len(mv) < 3 + 2 * alpha + 5:
        raise KVServeError("irans: bad header")
    freq = np.frombuffer(mv, dtype="<u2", count=alpha, offset=3).astype(np.int64)
    if int(freq.sum()) != M:
        raise KVServeError("irans: bad frequency table")
    off = 3 + 2 * alpha
    block_log2, nblocks = struct.unpack_from("<BI", mv, off)
    nsym = (count + 1) // 2 if paired else count
    if not MIN_BLOCK_LOG2 <= block_log2 <= MAX_BLOCK_LOG2 or nblocks != -(-nsym // (1 << block_log2)):
        raise KVServeError("irans: bad block table")
    off += 5
    if len(mv) < off + 4 * nblocks:
        raise KVServeError("irans: truncated block table")
    sizes = np.frombuffer(mv, dtype="<u4", count=nblocks, offset=off).astype(np.int64)
    off += 4 * nblocks
    if nblocks and (sizes.min() < STATE_BYTES or (sizes & 1).any()):
        raise KVServeError("irans: bad block size")
    offsets = np.zeros(nblocks + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if off + int(offsets[-1]) != len(mv):
        raise KVServeError("irans: block table does not match the stream length")
    return bool(paired), alpha, freq, block_log2, nsym, offsets, off


def decode_table(freq: np.ndarray) -> np.ndarray:
    """``M`` uint32 slot entries ``(f - 1) | (slot - cum) << 12 | symbol << 24`` (one load per
    decoded symbol; ``f - 1`` and ``slot - cum`` fit 12 bits each)."""
    freq = np.asarray(freq, dtype=np.int64)
    cum = np.zeros(freq.size, dtype=np.int64)
    cum[1:] = np.cumsum(freq)[:-1]
    sym = np.repeat(np.arange(freq.size, dtype=np.int64), freq)
    bias = np.arange(M, dtype=np.int64) - np.repeat(cum, freq)
    return ((np.repeat(freq, freq) - 1) | (bias << 12) | (sym << 24)).astype(np.uint32)


def cumulative(freq: np.ndarray) -> np.ndarray:
    cum = np.zeros(freq.size, dtype=np.int64)
    cum[1:] = np.cumsum(freq)[:-1]
    return cum


# ----------------------------------------------------------------- numba coder


@numba.njit(parallel=True, cache=True, nogil=True)
def _encode(sym, freq, cum, block, nblocks, scratch, starts):
    cap = scratch.shape[1]
    for b in numba.prange(nblocks):
        lo = b * block
        n = min(block, sym.size - lo)
        nsteps = (n + LANES - 1) // LANES
        x = np.full(LANES, LOW, dtype=np.uint64)
        p = cap
        for step in range(nsteps - 1, -1, -1):
            base = lo + step * LANES
            for lane in range(LANES - 1, -1, -1):  # words of a step land in lane order
                if step * LANES + lane < n:
                    f = np.uint64(freq[sym[base + lane]])
                    if (x[lane] >> np.uint64(20)) >= f:
                        p -= 1
                        scratch[b, p] = np.uint16(x[lane] & np.uint64(0xFFFF))
                        x[lane] >>= np.uint64(16)
            for lane in range(LANES):
                if step * LANES + lane < n:
                    s = sym[base + lane]
                    f = np.uint64(freq[s])
                    q = x[lane] // f
                    x[lane] = (q << np.uint64(PROB_BITS)) + (x[lane] - q * f) + np.uint64(cum[s])
        p -= 2 * LANES
        for lane in range(LANES):
            scratch[b, p + 2 * lane] = np.uint16(x[lane] & np.uint64(0xFFFF))
            scratch[b, p + 2 * lane + 1] = np.uint16(x[lane] >> np.uint64(16))
        starts[b] = p


@numba.njit(parallel=True, cache=True, nogil=True)
def _decode(buf, offsets, table, nsym, block, pair_bits, out, status):
    nblocks = offsets.size - 1
    lowmask = np.uint32((1 << pair_bits) - 1)
    for b in numba.prange(nblocks):
        p = offsets[b]
        end = offsets[b + 1]
        lo = b * block
        n = min(block, nsym - lo)
        x = np.empty(LANES, dtype=np.uint64)
        for lane in range(LANES):
            v = np.uint64(0)
            for k in range(4):
                v |= np.uint64(buf[p + 4 * lane + k]) << np.uint64(8 * k)
            x[lane] = v
        p += 4 * LANES
        bad = 0
        nsteps = (n + LANES - 1) // LANES
        for step in range(nsteps):
            for lane in range(LANES):
                i = step * LANES + lane
                if i >= n:
                    break
                e = np.uint64(table[x[lane] & np.uint64(M - 1)])
                s = np.uint32(e >> np.uint64(24))
                f = (e & np.uint64(0xFFF)) + np.uint64(1)
                xn = f * (x[lane] >> np.uint64(PROB_BITS)) + ((e >> np.uint64(12)) & np.uint64(0xFFF))
                if xn < np.uint64(LOW):
                    if p + 2 > end:
                        bad = 1
                        break
                    xn = (xn << np.uint64(16)) | np.uint64(buf[p]) | (np.uint64(buf[p + 1]) << np.uint64(8))
                    p += 2
                x[lane] = xn
                if pair_bits:
                    out[2 * (lo + i)] = np.uint8(s >> np.uint32(pair_bits))
                    out[2 * (lo + i) + 1] = np.uint8(s & lowmask)
                else:
                    out[lo + i] = np.uint8(s)
            if bad:
                break
        if bad or p != end:
            status[b] = 1
        for lane in range(LANES):
            if x[lane] != np.uint64(LOW):
                status[b] = 1


def encode(sym: np.ndarray, freq: np.ndarray, block_log2: int) -> tuple[np.ndarray, np.ndarray]:
    """Code uint8 symbols with ``freq`` (sums to ``M``, > 0 for every present symbol) in blocks
    of ``2**block_log2``; returns ``(block byte lengths, concatenated block streams as uint8)``."""
    block = 1 << block_log2
    nblocks = -(-sym.size // block)
    cap = min(block, max(sym.size, 1)) + 2 * LANES
    scratch = np.empty((nblocks, cap), dtype=np.uint16)
    starts = np.zeros(nblocks, dtype=np.int64)
    f = np.asarray(freq, dtype=np.int64)
    _encode(np.ascontiguousarray(sym, dtype=np.uint8), f, cumulative(f), block, nblocks, scratch, starts)
    sizes = 2 * (cap - starts)
    if nblocks == 0:
        return sizes, np.zeros(0, dtype=np.uint8)
    stream = np.concatenate([scratch[b, starts[b]:] for b in range(nblocks)]).astype("<u2").view(np.uint8)
    return sizes, stream


def decode(stream: np.ndarray, offsets: np.ndarray, freq: np.ndarray, nsym: int, block_log2: int,
           pair_bits: int = 0) -> np.ndarray | None:
    """Inverse of :func:`encode` (``offsets``: block starts in ``stream``, ``nblocks + 1``);
    ``2 * nsym`` symbols when ``pair_bits`` splits each; None if any block is inconsistent."""
    out = np.empty(nsym * (2 if pair_bits else 1), dtype=np.uint8)
    status = np.zeros(max(offsets.size - 1, 0), dtype=np.int64)
    if nsym:
        _decode(stream, offsets, decode_table(freq), nsym, 1 << block_log2, int(pair_bits), out, status)
    return None if status.any() else out


# ----------------------------------------------------------------- the codec stage


@register
class IRANS(_PairingCodec):
    """Interleaved static rANS (32 lanes per block, 16-bit words; :mod:`kvserve.stages.irans`),
    the same bytes from the numba coder and the Triton kernels. As ``rans`` it merges pairs
    of symbols when ``2*bits <= 8``. Layout: ``u8 paired | u16 alphabet | alphabet x u16 freq
    | u8 block_log2 | u32 nblocks | nblocks x u32 block bytes | block streams``."""

    stage_id = "irans"

    def encode(self, arr, bits, threads=1):
        with numba_threads(threads):
            paired, alpha, sym, freq = self._table(arr, bits)
            blog2 = DEFAULT_BLOCK_LOG2
            sizes, stream = encode(sym, freq, blog2)
        return pack_header(paired, alpha, freq, blog2, sizes) + stream.tobytes()

    def decode(self, buf, count, bits, threads=1):
        paired, alpha, freq, block_log2, nsym, offsets, hlen = parse_header(buf, count, bits)
        if nsym == 0:
            return np.zeros(0, dtype=np.uint8)
        stream = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8, offset=hlen)
        with numba_threads(threads):
            sym = decode(stream, offsets, freq, nsym, block_log2, bits if paired else 0)
        if sym is None:
            raise KVServeError("irans: corrupt stream")
        return sym[:count]
