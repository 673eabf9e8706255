"""The ENEC stream format: dtype table, header, block table, checksums, validation.

A stream is ``header | shape | offsets | block checksums | header crc | pad | payload``;
docs/FORMAT.md gives every byte. This module holds the parts that do not need the
compiled kernels: building and parsing the header, the per-block size arithmetic and a
pure-numpy version of the block checksum (the kernels in :mod:`enec.cpu` compute the
same function).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import EnecError

MAGIC = b"ENEC"
VERSION = 1
HEADER = struct.Struct("<4sBBBBBBHIQQ")  # 32 bytes, see docs/FORMAT.md
assert HEADER.size == 32
BLOCK_HEADER_BYTES = 16
MAX_NDIM = 32
DEFAULT_BLOCK_LOG2 = 14  # 16384 elements per block
MIN_BLOCK_LOG2 = 6
MAX_BLOCK_LOG2 = 20

FLAG_NUMPY = 1  # the stream was made from a numpy array: decompress returns numpy

MODE_CODED = 0
MODE_RAW = 1


@dataclass(frozen=True)
class FloatFormat:
    """Bit layout of one float dtype: ``bits`` wide, exponent ``ebits`` wide at bit ``pos``.

    The ``rbits = bits - ebits`` other bits (mantissa below the exponent, sign above it)
    are the "rest": ``rest_bytes`` whole byte planes plus ``rest_planes`` single-bit planes.
    """

    code: int
    name: str
    bits: int
    ebits: int
    pos: int
    torch_name: str
    numpy_name: str  # numpy dtype a caller may pass; bf16 travels as uint16

    @property
    def itemsize(self) -> int:
        return self.bits // 8

    @property
    def rbits(self) -> int:
        return self.bits - self.ebits

    @property
    def rest_bytes(self) -> int:
        return self.rbits // 8

    @property
    def rest_planes(self) -> int:
        return self.rbits % 8

    @property
    def uint_dtype(self) -> np.dtype:
        return np.dtype(f"<u{self.itemsize}")


FORMATS = {
    f.code: f
    for f in (
        FloatFormat(1, "bfloat16", 16, 8, 7, "bfloat16", "uint16"),
        FloatFormat(2, "float16", 16, 5, 10, "float16", "float16"),
        FloatFormat(3, "float32", 32, 8, 23, "float32", "float32"),
        FloatFormat(4, "float8_e4m3fn", 8, 4, 3, "float8_e4m3fn", "uint8"),
        FloatFormat(5, "float8_e5m2", 8, 5, 2, "float8_e5m2", "uint8"),
    )
}
BY_NAME = {f.name: f for f in FORMATS.values()}


def format_for(name: str) -> FloatFormat:
    try:
        return BY_NAME[name]
    except KeyError:
        raise EnecError(
            f"unsupported dtype {name!r}; ENEC compresses {', '.join(BY_NAME)}"
        ) from None


# ---------------------------------------------------------------------------- block sizes


def padded(n: int) -> int:
    """Element count of a block rounded up to a multiple of 64 (whole 8-byte plane words)."""
    return (n + 63) & ~63


def coded_block_bytes(fmt: FloatFormat, n: int, w1: int, w2: int, n1: int, n2: int) -> int:
    """Bytes of a coded block of ``n`` elements with ``n1`` level-1 and ``n2`` level-2 escapes."""
    pn = padded(n)
    size = (
        BLOCK_HEADER_BYTES
        + fmt.rest_bytes * pn
        + (fmt.rest_planes + w1) * (pn // 8)
        + (n1 * w2 + 7) // 8
        + n2
    )
    return (size + 7) & ~7


def raw_block_bytes(fmt: FloatFormat, n: int) -> int:
    return (BLOCK_HEADER_BYTES + n * fmt.itemsize + 7) & ~7


def min_block_bytes(fmt: FloatFormat, n: int) -> int:
    """A lower bound on any valid block of ``n`` elements (used to reject hostile headers)."""
    return min(coded_block_bytes(fmt, n, 1, 0, 0, 0), raw_block_bytes(fmt, n))


def min_stream_bytes(fmt: FloatFormat, ndim: int, numel: int) -> int:
    """A lower bound on the length of any valid stream of ``numel`` elements in ``ndim``
    dimensions, whatever its block size: its fixed header and every element's rest bits plus
    one code bit. A container checks each stream's claimed size against this before
    allocating, so that a tensor can never decode to more than about twice its stream."""
    return table_bytes(ndim, 0) + (numel * (fmt.rbits + 1) + 7) // 8


# ---------------------------------------------------------------------------- checksum

P1 = 0x9E3779B1
P2 = 0x85EBCA77
P3 = 0xC2B2AE3D
LANES = 64
M32 = 0xFFFFFFFF


def block_checksum_reference(block: bytes | np.ndarray) -> int:
    """The block checksum in plain Python (slow; the kernels compute the same value).

    Words are the block's little-endian u32s. Lane ``l`` (of 64) starts at ``(l+1)*P3`` and
    absorbs words ``l, l+64, l+128, ...`` with ``acc = rotl(acc ^ w, 15) * P1``; the lanes are then
    folded in order into ``h = rotl(h + acc*P3, 17) * P1`` starting from ``h = nbytes``,
    followed by an avalanche. Every step is a bijection of the changed word, so any change
    confined to one word is always detected; other changes escape with odds about 2**-32.
    """
    words = np.frombuffer(bytes(block), dtype="<u4").tolist()
    acc = [((l + 1) * P3) & M32 for l in range(LANES)]
    for idx, w in enumerate(words):
        l = idx % LANES
        a = acc[l] ^ w
        a = ((a << 15) | (a >> 17)) & M32
        acc[l] = (a * P1) & M32
    h = (len(words) * 4) & M32
    for l in range(LANES):
        h = (h + acc[l] * P3) & M32
        h = ((h << 17) | (h >> 15)) & M32
        h = (h * P1) & M32
    h ^= h >> 15
    h = (h * P2) & M32
    h ^= h >> 13
    h = (h * P3) & M32
    h ^= h >> 16
    return h


# ---------------------------------------------------------------------------- header


@dataclass(frozen=True)
class StreamInfo:
    """Everything the header says, validated against the buffer it came from."""

    fmt: FloatFormat
    shape: tuple[int, ...]
    numel: int
    block_log2: int
    nblocks: int
    flags: int
    offsets: np.ndarray  # (nblocks + 1,) uint64, relative to payload start
    checksums: np.ndarray  # (nblocks,) uint32
    payload_start: int
    payload_bytes: int

    @property
    def block_elems(self) -> int:
        return 1 << self.block_log2

    def block_count(self, i: int) -> int:
        return min(self.block_elems, self.numel - i * self.block_elems)

    @property
    def compressed_bytes(self) -> int:
        return self.payload_start + self.payload_bytes

    @property
    def original_bytes(self) -> int:
        return self.numel * self.fmt.itemsize


def table_bytes(ndim: int, nblocks: int) -> int:
    """Bytes from the start of the stream to the start of the payload."""
    size = HEADER.size + 8 * ndim + 8 * (nblocks + 1) + 4 * nblocks + 4
    return (size + 7) & ~7


def build_header(
    fmt: FloatFormat,
    shape: tuple[int, ...],
    block_log2: int,
    flags: int,
    offsets: np.ndarray,
    checksums: np.ndarray,
) -> bytes:
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nblocks = len(checksums)
    head = HEADER.pack(
        MAGIC, VERSION, fmt.code, len(shape), flags, block_log2, 0, 0, nblocks,
        numel, int(offsets[-1]),
    )
    body = (
        head
        + struct.pack(f"<{len(shape)}Q", *shape)
        + offsets.astype("<u8").tobytes()
        + checksums.astype("<u4").tobytes()
    )
    body += struct.pack("<I", zlib.crc32(body))
    return body + bytes(table_bytes(len(shape), nblocks) - len(body))


def header_bytes(head) -> int:
    """Bytes of header and tables (:func:`table_bytes`) of the stream whose first
    ``HEADER.size`` bytes are ``head``; the fields it relies on are checked, the rest is left
    to :func:`parse_header`. A reader of a stream in pieces reads this many bytes first."""
    if len(head) < HEADER.size:
        raise EnecError(f"truncated ENEC stream: {len(head)} bytes, the header alone is {HEADER.size}")
    magic, version, _, ndim, _, _, _, _, nblocks, _, _ = HEADER.unpack_from(head, 0)
    if magic != MAGIC:
        raise EnecError("not an ENEC stream (bad magic)")
    if version != VERSION:
        raise EnecError(f"unsupported ENEC format version {version} (this build reads {VERSION})")
    if ndim > MAX_NDIM:
        raise EnecError(f"corrupted ENEC header: ndim {ndim} > {MAX_NDIM}")
    return table_bytes(ndim, nblocks)


def parse_header(buf, total: int | None = None) -> StreamInfo:
    """Parse and validate a stream header. Raises :class:`EnecError` on anything wrong.

    ``buf`` is the whole stream, or, with ``total`` (the stream's length), at least its
    header and tables (:func:`header_bytes`): a stream read in pieces is checked before its
    payload arrives, and the offsets and checksums refer to ``buf``.
    Every size is checked against the stream length before anything is allocated, so a
    hostile header cannot make the decoder allocate more than about twice the input.
    """
    mv = memoryview(buf).cast("B")
    total = len(mv) if total is None else total
    if min(total, len(mv)) < HEADER.size:
        raise EnecError(f"truncated ENEC stream: {min(total, len(mv))} bytes, the header alone is {HEADER.size}")
    magic, version, dcode, ndim, flags, block_log2, r0, r1, nblocks, numel, payload = (
        HEADER.unpack_from(mv, 0)
    )
    if magic != MAGIC:
        raise EnecError("not an ENEC stream (bad magic)")
    if version != VERSION:
        raise EnecError(f"unsupported ENEC format version {version} (this build reads {VERSION})")
    if dcode not in FORMATS:
        raise EnecError(f"corrupted ENEC header: unknown dtype code {dcode}")
    fmt = FORMATS[dcode]
    if ndim > MAX_NDIM:
        raise EnecError(f"corrupted ENEC header: ndim {ndim} > {MAX_NDIM}")
    if not MIN_BLOCK_LOG2 <= block_log2 <= MAX_BLOCK_LOG2:
        raise EnecError(f"corrupted ENEC header: block size 2^{block_log2} out of range")
    if r0 or r1 or flags & ~FLAG_NUMPY:
        raise EnecError("corrupted ENEC header: reserved bits set")
    start = table_bytes(ndim, nblocks)
    if total < start:
        raise EnecError(f"truncated ENEC stream: {total} bytes, the header says {start} before the payload")
    if len(mv) < start:
        raise EnecError(f"ENEC header: {len(mv)} bytes given, its tables need {start}")
    pos = HEADER.size
    shape = struct.unpack_from(f"<{ndim}Q", mv, pos)
    pos += 8 * ndim
    count = 1
    for d in shape:
        if d >> 63:
            raise EnecError(f"corrupted ENEC header: dimension {d} is 2**63 or more")
        count *= d
    if count != numel:
        raise EnecError(f"corrupted ENEC header: shape {shape} has {count} elements, header says {numel}")
    if nblocks != (numel + (1 << block_log2) - 1) >> block_log2:
        raise EnecError("corrupted ENEC header: block count does not match the element count")
    crc_pos = HEADER.size + 8 * ndim + 8 * (nblocks + 1) + 4 * nblocks
    (crc,) = struct.unpack_from("<I", mv, crc_pos)
    if zlib.crc32(mv[:crc_pos]) != crc:
        raise EnecError("corrupted ENEC stream: header checksum mismatch")
    if any(mv[crc_pos + 4 : start]):
        raise EnecError("corrupted ENEC header: nonzero padding")
    if total != start + payload:
        kind = "truncated" if total < start + payload else "corrupted"
        raise EnecError(
            f"{kind} ENEC stream: {total} bytes, the header says {start + payload}"
        )
    offsets = np.frombuffer(mv, dtype="<u8", count=nblocks + 1, offset=pos)
    checksums = np.frombuffer(mv, dtype="<u4", count=nblocks, offset=pos + 8 * (nblocks + 1))
    info = StreamInfo(fmt, tuple(shape), numel, block_log2, nblocks, flags,
                      offsets, checksums, start, payload)
    if nblocks:
        sizes = np.diff(offsets.astype(np.int64))
        if offsets[0] != 0 or offsets[-1] != payload or (sizes < 0).any() or (sizes % 8).any():
            raise EnecError("corrupted ENEC header: block offsets are not increasing, 8-aligned and contiguous")
        full = min_block_bytes(fmt, 1 << block_log2)
        last = min_block_bytes(fmt, info.block_count(nblocks - 1))
        if (sizes[:-1] < full).any() or sizes[-1] < last:
            raise EnecError("corrupted ENEC header: a block is smaller than its element count allows")
    elif payload:
        raise EnecError("corrupted ENEC header: payload without blocks")
    return info
