"""Lossless codecs on quantizer symbols (``bits`` <= 8, uint8) or raw bf16 words (``bits`` = 16).

``encode(arr, bits, threads=1) -> bytes`` and ``decode(buf, count, bits, threads=1) -> arr``
with ``arr`` a flat uint8 array (``bits`` <= 8, values ``< 2**bits``) or uint16 array
(``bits == 16``); ``threads`` bounds the codec's parallelism (numba kernels, chunk pools).
``decode`` raises :class:`kvserve.KVServeError` on any malformed input.

Methods: ``none`` (raw bytes), ``bitpack`` (b-bit symbols, 8 per b bytes; numba, parallel),
``zstd``, ``lz4``, ``ans`` (static-model rANS entropy coder from ``constriction``; pairs of
small symbols are coded as one to halve the symbol count) and ``enec`` (the project's
lossless bf16 codec; bf16 passthrough only).
"""
from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numba
import numpy as np

from ..errors import KVServeError
from .base import Stage, register


def default_threads() -> int:
    """Codec threads when the caller does not say: every core numba may use."""
    return max(1, min(os.cpu_count() or 1, numba.config.NUMBA_NUM_THREADS))


def resolve_threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise KVServeError(f"threads must be a positive int, got {threads!r}")
    return threads


@contextmanager
def numba_threads(n: int):
    """Run numba's parallel kernels on ``n`` threads (in the calling thread only)."""
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _as_bytes_view(arr: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def _expect(bits: int) -> np.dtype:
    if bits == 16:
        return np.dtype(np.uint16)
    if 1 <= bits <= 8:
        return np.dtype(np.uint8)
    raise KVServeError(f"unsupported symbol width {bits}")


class Codec(Stage):
    kind = "codec"

    def accepts(self, bits: int) -> bool:
        return bits == 16 or 1 <= bits <= 8

    def encode(self, arr: np.ndarray, bits: int, threads: int = 1) -> bytes:
        raise NotImplementedError

    def decode(self, buf: bytes, count: int, bits: int, threads: int = 1) -> np.ndarray:
        raise NotImplementedError


@register
class Raw(Codec):
    """No compression: the symbols' bytes (one byte per symbol, two per bf16 word)."""

    stage_id = "none"

    def encode(self, arr, bits, threads=1):
        return bytes(_as_bytes_view(arr))

    def decode(self, buf, count, bits, threads=1):
        dt = _expect(bits)
        if len(buf) != count * dt.itemsize:
            raise KVServeError("raw: length mismatch")
        return np.frombuffer(buf, dtype=dt).copy()


# ------------------------------------------------------------------------- bit packing


@numba.njit(parallel=True, cache=True, nogil=True)
def _pack(sym, bits, out):
    m = out.size // bits
    mask = np.uint64((1 << bits) - 1)
    for i in numba.prange(m):
        acc = np.uint64(0)
        for j in range(8):
            acc |= (np.uint64(sym[8 * i + j]) & mask) << np.uint64(bits * j)
        for k in range(bits):
            out[bits * i + k] = np.uint8((acc >> np.uint64(8 * k)) & np.uint64(0xFF))


@numba.njit(parallel=True, cache=True, nogil=True)
def _unpack(buf, bits, out):
    m = out.size // 8
    mask = np.uint64((1 << bits) - 1)
    for i in numba.prange(m):
        acc = np.uint64(0)
        for k in range(bits):
            acc |= np.uint64(buf[bits * i + k]) << np.uint64(8 * k)
        for j in range(8):
            out[8 * i + j] = np.uint8((acc >> np.uint64(bits * j)) & mask)


def bitpack(sym: np.ndarray, bits: int, threads: int = 1) -> np.ndarray:
    """Pack uint8 symbols (< 2**bits) densely: 8 symbols -> ``bits`` bytes, LSB first."""
    n = sym.size
    m = -(-n // 8)
    if n % 8:
        s = np.zeros(m * 8, dtype=np.uint8)
        s[:n] = sym
    else:
        s = np.ascontiguousarray(sym, dtype=np.uint8)
    out = np.empty(m * bits, dtype=np.uint8)
    with numba_threads(threads):
        _pack(s, bits, out)
    return out


def bitunpack(buf: np.ndarray, count: int, bits: int, threads: int = 1) -> np.ndarray:
    m = -(-count // 8)
    if buf.size != m * bits:
        raise KVServeError("bitpack: length mismatch")
    out = np.empty(m * 8, dtype=np.uint8)
    with numba_threads(threads):
        _unpack(buf, bits, out)
    return out[:count]


@register
class BitPack(Codec):
    """Dense packing of ``b``-bit symbols (no entropy coding; fastest). bf16 words pass raw."""

    stage_id = "bitpack"

    def encode(self, arr, bits, threads=1):
        if bits == 16:
            return bytes(_as_bytes_view(arr))
        return bitpack(arr, bits, threads).tobytes()

    def decode(self, buf, count, bits, threads=1):
        if bits == 16:
            return Raw().decode(buf, count, bits)
        _expect(bits)
        return bitunpack(np.frombuffer(buf, dtype=np.uint8), count, bits, threads)


# ------------------------------------------------------------------------- chunked byte codecs

_CHUNK = 1 << 20


def _chunked_encode(data: memoryview, fn, threads: int) -> bytes:
    chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [data]
    if threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(threads) as ex:
            outs = list(ex.map(fn, chunks))
    else:
        outs = [fn(c) for c in chunks]
    head = struct.pack("<I", len(outs)) + b"".join(struct.pack("<II", len(c), len(o)) for c, o in zip(chunks, outs))
    return head + b"".join(outs)


def _chunked_decode(buf: bytes, total: int, fn, name: str, threads: int) -> bytearray:
    mv = memoryview(buf)
    if len(mv) < 4:
        raise KVServeError(f"{name}: truncated")
    (n,) = struct.unpack_from("<I", mv, 0)
    if n > total // _CHUNK + 1 or 4 + 8 * n > len(mv):
        raise KVServeError(f"{name}: bad chunk count")
    sizes = [struct.unpack_from("<II", mv, 4 + 8 * i) for i in range(n)]
    if sum(r for r, _ in sizes) != total or 4 + 8 * n + sum(c for _, c in sizes) != len(mv):
        raise KVServeError(f"{name}: chunk table does not match")
    jobs, off = [], 4 + 8 * n
    for raw, comp in sizes:
        if raw > _CHUNK:
            raise KVServeError(f"{name}: chunk too large")
        jobs.append((mv[off:off + comp], raw))
        off += comp

    def run(job):
        out = fn(job[0], job[1])
        if len(out) != job[1]:
            raise KVServeError(f"{name}: chunk size mismatch")
        return out

    try:
        if threads > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(threads) as ex:
                outs = list(ex.map(run, jobs))
        else:
            outs = [run(j) for j in jobs]
    except KVServeError:
        raise
    except Exception as exc:
        raise KVServeError(f"{name}: corrupt stream ({exc})") from exc
    return bytearray(b"".join(outs))


class _ByteCodec(Codec):
    """A byte compressor on the symbol bytes, optionally after bit packing."""

    def _pre(self, arr, bits, threads):
        if getattr(self, "pack", False) and bits <= 8:
            return memoryview(bitpack(arr, bits, threads))
        return _as_bytes_view(arr)

    def _post(self, raw: bytearray, count, bits, threads):
        if getattr(self, "pack", False) and bits <= 8:
            return bitunpack(np.frombuffer(raw, dtype=np.uint8), count, bits, threads)
        return np.frombuffer(raw, dtype=_expect(bits)).copy()

    def _raw_size(self, count, bits):
        if getattr(self, "pack", False) and bits <= 8:
            return -(-count // 8) * bits
        return count * _expect(bits).itemsize


@register
class Zstd(_ByteCodec):
    """Zstandard (``level``) on 1 MiB chunks in parallel; ``pack`` bit-packs first."""

    stage_id = "zstd"
    params = {"level": 1, "pack": False}

    def validate(self):
        if not isinstance(self.level, int) or isinstance(self.level, bool) or not -5 <= self.level <= 19:
            raise KVServeError("zstd: level must be an int in [-5, 19]")
        if not isinstance(self.pack, bool):
            raise KVServeError("zstd: pack must be a bool")

    def encode(self, arr, bits, threads=1):
        import zstandard

        lvl = self.level

        def fn(c):
            return zstandard.ZstdCompressor(level=lvl).compress(c)

        return _chunked_encode(self._pre(arr, bits, threads), fn, threads)

    def decode(self, buf, count, bits, threads=1):
        import zstandard

        def fn(c, raw):
            return zstandard.ZstdDecompressor().decompress(c, max_output_size=raw)

        return self._post(_chunked_decode(buf, self._raw_size(count, bits), fn, "zstd", threads), count, bits, threads)


@register
class LZ4(_ByteCodec):
    """LZ4 block compression on 1 MiB chunks; ``pack`` bit-packs first."""

    stage_id = "lz4"
    params = {"pack": False}

    def validate(self):
        if not isinstance(self.pack, bool):
            raise KVServeError("lz4: pack must be a bool")

    def encode(self, arr, bits, threads=1):
        import lz4.block

        return _chunked_encode(self._pre(arr, bits, threads), lambda c: lz4.block.compress(c, store_size=False), threads)

    def decode(self, buf, count, bits, threads=1):
        import lz4.block

        def fn(c, raw):
            return lz4.block.decompress(c, uncompressed_size=raw)

        return self._post(_chunked_decode(buf, self._raw_size(count, bits), fn, "lz4", threads), count, bits, threads)


# ------------------------------------------------------------------------- entropy coding


class _PairingCodec(Codec):
    """Entropy coders on quantized symbols that may merge pairs (``a * 2**bits + b``) when
    ``2*bits <= 8``, so the coder sees half as many symbols from a squared alphabet."""

    params = {"pair": True}

    def validate(self):
        if not isinstance(self.pair, bool):
            raise KVServeError(f"{self.stage_id}: pair must be a bool")

    def accepts(self, bits):
        return 1 <= bits <= 8

    def _table(self, arr, bits):
        """``(paired, alphabet, symbols, 12-bit frequencies)`` of ``arr`` as ``rans``/``irans`` code it."""
        from . import rans

        if not 1 <= bits <= 8:
            raise KVServeError(f"{self.stage_id}: needs quantized symbols (bits <= 8)")
        paired = self.pair and 2 * bits <= 8
        alpha = 1 << (2 * bits if paired else bits)
        sym, counts = rans.symbols_and_counts(arr, bits if paired else 0, alpha)
        if counts[-1]:
            raise KVServeError(f"{self.stage_id}: symbol out of range")
        return paired, alpha, sym, rans.quantize_freqs(counts[:-1])


def _pair_symbols(arr: np.ndarray, bits: int) -> np.ndarray:
    """uint8 symbols ``(x[2i] << bits) | x[2i+1]``, the odd tail padded with a zero."""
    a = np.ascontiguousarray(arr, dtype=np.uint8)
    if a.size % 2:
        a = np.concatenate([a, np.zeros(1, np.uint8)])
    return ((a[0::2] << np.uint8(bits)) | a[1::2]).astype(np.uint8)


def _unpair_symbols(sym: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pair_symbols`: ``count`` uint8 symbols."""
    sym = np.asarray(sym)
    out = np.empty(2 * sym.size, dtype=np.uint8)
    out[0::2] = sym >> bits
    out[1::2] = sym & ((1 << bits) - 1)
    return out[:count]


@register
class ANS(_PairingCodec):
    """Static-model rANS (``constriction``) with the part's own symbol histogram.

    When ``2*bits <= 8`` two symbols are merged into one (``a * 2**bits + b``) so the coder
    sees half as many symbols; the histogram (uint32 counts) is stored with the stream.
    Layout: ``u8 paired | u16 alphabet | alphabet x u32 counts | u32 words...``.
    """

    stage_id = "ans"

    @staticmethod
    def _model(counts: np.ndarray):
        import constriction

        p = counts.astype(np.float64)
        return constriction.stream.model.Categorical(p / p.sum(), perfect=False)

    def encode(self, arr, bits, threads=1):
        import constriction

        if not 1 <= bits <= 8:
            raise KVServeError("ans: needs quantized symbols (bits <= 8)")
        paired = self.pair and 2 * bits <= 8 and arr.size > 0
        if paired:
            sym = _pair_symbols(arr, bits).astype(np.int32)
            alpha = 1 << (2 * bits)
        else:
            sym = arr.astype(np.int32)
            alpha = 1 << bits
        counts = np.bincount(sym, minlength=alpha).astype(np.uint32)
        if counts.size != alpha:
            raise KVServeError("ans: symbol out of range")
        head = struct.pack("<BH", int(paired), alpha) + counts.tobytes()
        if sym.size == 0:
            return head
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(sym, self._model(counts))
        return head + coder.get_compressed().tobytes()

    def decode(self, buf, count, bits, threads=1):
        import constriction

        if not 1 <= bits <= 8:
            raise KVServeError("ans: bad symbol width")
        if len(buf) < 3:
            raise KVServeError("ans: truncated")
        paired, alpha = struct.unpack_from("<BH", buf, 0)
        if paired not in (0, 1) or alpha != 1 << (bits * (1 + paired)) or len(buf) < 3 + 4 * alpha:
            raise KVServeError("ans: bad header")
        counts = np.frombuffer(buf, dtype=np.uint32, count=alpha, offset=3)
        nsym = (count + 1) // 2 if paired else count
        if int(counts.sum(dtype=np.uint64)) != nsym:
            raise KVServeError("ans: histogram does not match the symbol count")
        words = buf[3 + 4 * alpha:]
        if nsym == 0:
            return np.zeros(0, dtype=np.uint8)
        if len(words) % 4 or not words:
            raise KVServeError("ans: bad stream length")
        try:
            coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, dtype=np.uint32).copy())
            sym = coder.decode(self._model(counts), nsym)
        except Exception as exc:
            raise KVServeError(f"ans: corrupt stream ({exc})") from exc
        sym = np.asarray(sym)
        if sym.size != nsym or (sym.size and (sym.min() < 0 or sym.max() >= alpha)):
            raise KVServeError("ans: corrupt stream")
        if paired:
            return _unpair_symbols(sym, bits, count)
        return sym.astype(np.uint8)


@register
class ENEC(Codec):
    """The project's lossless bf16 weight codec (``enec.compress``/``enec.decompress``),
    for bf16 passthrough (quantizer ``none``) only."""

    stage_id = "enec"

    def accepts(self, bits):
        return bits == 16

    def encode(self, arr, bits, threads=1):
        if bits != 16:
            raise KVServeError("enec: only bf16 passthrough (quantizer 'none')")
        import enec

        return bytes(enec.compress(np.ascontiguousarray(arr, dtype=np.uint16), dtype="bfloat16", threads=threads))

    def decode(self, buf, count, bits, threads=1):
        if bits != 16:
            raise KVServeError("enec: only bf16 passthrough")
        import enec

        try:
            out = np.asarray(enec.decompress(bytes(buf), threads=threads))
        except Exception as exc:
            raise KVServeError(f"enec: corrupt stream ({exc})") from exc
        out = out.reshape(-1).view(np.uint16) if out.dtype.itemsize == 2 else out
        if out.size != count or out.dtype != np.uint16:
            raise KVServeError("enec: decoded size mismatch")
        return out


@register
class RANS(_PairingCodec):
    """Parallel static rANS (numba, :mod:`kvserve.stages.rans`), 12-bit frequencies.

    As ``ans`` it merges pairs of symbols when ``2*bits <= 8``. Layout:
    ``u8 paired | u16 alphabet | alphabet x u16 freq | u32 nchunks | nchunks x u32 len | bytes``.
    """

    stage_id = "rans"

    def encode(self, arr, bits, threads=1):
        from . import rans

        with numba_threads(threads):
            paired, alpha, sym, freq = self._table(arr, bits)
            lens, stream = rans.encode(sym, freq)
        head = struct.pack("<BH", int(paired), alpha) + freq.astype(np.uint16).tobytes()
        return head + struct.pack("<I", lens.size) + lens.astype(np.uint32).tobytes() + stream.tobytes()

    def decode(self, buf, count, bits, threads=1):
        from . import rans

        if not 1 <= bits <= 8:
            raise KVServeError("rans: bad symbol width")
        mv = memoryview(buf)
        if len(mv) < 3:
            raise KVServeError("rans: truncated")
        paired, alpha = struct.unpack_from("<BH", mv, 0)
        if paired not in (0, 1) or alpha != 1 << (bits * (1 + paired)) or len(mv) < 3 + 2 * alpha + 4:
            raise KVServeError("rans: bad header")
        freq = np.frombuffer(mv, dtype=np.uint16, count=alpha, offset=3).astype(np.int64)
        if int(freq.sum()) != rans.M:
            raise KVServeError("rans: bad frequency table")
        off = 3 + 2 * alpha
        (nch,) = struct.unpack_from("<I", mv, off)
        nsym = (count + 1) // 2 if paired else count
        if nch != max(1, -(-nsym // rans.CHUNK)) or len(mv) < off + 4 + 4 * nch:
            raise KVServeError("rans: bad chunk table")
        lens = np.frombuffer(mv, dtype=np.uint32, count=nch, offset=off + 4).astype(np.int64)
        stream = np.frombuffer(mv, dtype=np.uint8, offset=off + 4 + 4 * nch)
        if nsym == 0:
            return np.zeros(0, dtype=np.uint8)
        with numba_threads(threads):
            sym = rans.decode(stream, lens, freq, nsym, bits if paired else 0)
        if sym is None:
            raise KVServeError("rans: corrupt stream")
        return sym[:count]
