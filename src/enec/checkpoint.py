"""ENEC checkpoints: safetensors files compressed tensor by tensor.

A ``.enec`` file keeps the original safetensors header bytes verbatim and one ENEC stream
per float tensor (other dtypes raw), so ``decompress_file`` rebuilds the original file
byte for byte. docs/FORMAT.md gives the container layout.

Public helpers mirror ``safetensors.torch``: :func:`save_file` / :func:`load_file`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .codec import Encoder, Prepared, check_threads, compress, decompress, threads_set
from .errors import EnecError
from .format import FLAG_NUMPY, HEADER, format_for, header_bytes, min_stream_bytes, parse_header
from .fileio import DEFAULT_BUFFER_BYTES, Input, Output, Pipeline, as_path, lead, slot_bytes

MAGIC = b"ENECCKPT"
VERSION = 1
PREFIX = struct.Struct("<8sIIQ")  # magic, version, crc32(json), json length
ALIGN = 64
MAX_JSON = 256 << 20
MAX_ST_HEADER = 100 << 20
MAX_DIM = 1 << 63  # dimensions are below this (torch and numpy index with int64)
ST_HEADER_CRC = "safetensors_header_crc32"  # table key (source): CRC-32 of the embedded header

# safetensors dtype -> (ENEC dtype name or None for raw, itemsize, torch dtype name)
ST_DTYPES = {
    "BF16": ("bfloat16", 2, "bfloat16"),
    "F16": ("float16", 2, "float16"),
    "F32": ("float32", 4, "float32"),
    "F8_E4M3": ("float8_e4m3fn", 1, "float8_e4m3fn"),
    "F8_E5M2": ("float8_e5m2", 1, "float8_e5m2"),
    "F64": (None, 8, "float64"),
    "I64": (None, 8, "int64"),
    "I32": (None, 4, "int32"),
    "I16": (None, 2, "int16"),
    "I8": (None, 1, "int8"),
    "U8": (None, 1, "uint8"),
    "U16": (None, 2, "uint16"),
    "U32": (None, 4, "uint32"),
    "U64": (None, 8, "uint64"),
    "BOOL": (None, 1, "bool"),
}
TORCH_TO_ST = {v[2]: k for k, v in ST_DTYPES.items()}


# ------------------------------------------------------------------------------ safetensors


@dataclass
class STEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the safetensors file
    end: int


@dataclass
class STLayout:
    header_len: int  # bytes of JSON after the 8-byte length
    entries: list[STEntry] = field(default_factory=list)  # in data order
    metadata: dict | None = None

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def parse_safetensors_header(buf, size: int, what: str = "file") -> STLayout:
    """Validate a safetensors header (the first bytes of ``buf``; ``size`` = file size)."""
    if size < 8:
        raise EnecError(f"not a safetensors {what}: {size} bytes")
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    if hlen > MAX_ST_HEADER or 8 + hlen > size:
        raise EnecError(f"not a safetensors {what}: header length {hlen} does not fit")
    try:
        header = json.loads(bytes(buf[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EnecError(f"not a safetensors {what}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise EnecError(f"not a safetensors {what}: header is not a JSON object")
    layout = STLayout(hlen)
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise EnecError(f"invalid safetensors {what}: __metadata__ is not an object")
    layout.metadata = meta
    base = 8 + hlen
    for name, e in header.items():
        try:
            dtype, shape, (a, b) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            hash(dtype)
        except (KeyError, TypeError, ValueError):
            raise EnecError(f"invalid safetensors {what}: bad entry for tensor {name!r}") from None
        if dtype not in ST_DTYPES:
            raise EnecError(f"unsupported safetensors dtype {dtype!r} (tensor {name!r})")
        n = 1
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < MAX_DIM:
                raise EnecError(f"invalid safetensors {what}: dimension {d!r} of {name!r} is not an integer "
                                f"from 0 to 2**63-1")
            n *= d
        if not (isinstance(a, int) and isinstance(b, int)) or b - a != n * ST_DTYPES[dtype][1] or a < 0:
            raise EnecError(f"invalid safetensors {what}: offsets of {name!r} do not match its shape")
        layout.entries.append(STEntry(name, dtype, shape, base + a, base + b))
    layout.entries.sort(key=lambda e: (e.start, e.end))
    pos = base
    for e in layout.entries:
        if e.start != pos:
            raise EnecError(f"invalid safetensors {what}: data of {e.name!r} is not contiguous")
        pos = e.end
    if pos != size:
        raise EnecError(f"invalid safetensors {what}: data ends at {pos}, file has {size} bytes")
    return layout


def _st_header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None) -> bytes:
    """A safetensors header (length prefix + JSON, space-padded to 8 bytes) for (name, dtype, shape, nbytes)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


# ------------------------------------------------------------------------------ container


@dataclass
class CkptEntry:
    name: str
    codec: str  # "enec" or "raw"
    offset: int  # absolute offset in the .enec file
    length: int
    crc32: int | None = None


@dataclass
class Ckpt:
    source_name: str
    source_size: int
    source_sha256: str | None
    st_header: tuple[int, int]  # (offset, length) of the verbatim safetensors header bytes
    layout: STLayout
    entries: list[CkptEntry]
    size: int


# ------------------------------------------------------------------------------ reading the container


def read_checkpoint(buf, size: int, what: str = "checkpoint") -> Ckpt:
    """Parse and validate a ``.enec`` container from ``buf``: its first bytes, at least up to
    the end of the table and the safetensors header (:func:`head_end`); ``size`` = file size."""
    if size < PREFIX.size or len(buf) < PREFIX.size:
        raise EnecError(f"not an ENEC checkpoint ({what}): {size} bytes")
    magic, version, crc, jlen = PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise EnecError(f"not an ENEC checkpoint ({what}): bad magic")
    if version != VERSION:
        raise EnecError(f"unsupported ENEC checkpoint version {version} ({what})")
    if jlen > MAX_JSON or PREFIX.size + jlen > size:
        raise EnecError(f"truncated or corrupted ENEC checkpoint ({what}): table length {jlen}")
    js = bytes(buf[PREFIX.size : PREFIX.size + jlen])
    if zlib.crc32(js) != crc:
        raise EnecError(f"corrupted ENEC checkpoint ({what}): table checksum mismatch")
    try:
        meta = json.loads(js)
        src = meta["source"]
        hoff, hlen = (int(v) for v in src["safetensors_header"])
        entries = [CkptEntry(str(t["name"]), str(t["codec"]), int(t["offset"]), int(t["length"]),
                             t.get("crc32")) for t in meta["tensors"]]
        source_size = int(src["size"])
        name = str(src["name"])
        sha = src.get("sha256")
        st_crc = src.get(ST_HEADER_CRC)
        if st_crc is not None and (isinstance(st_crc, bool) or not isinstance(st_crc, int)):
            raise TypeError(f"{ST_HEADER_CRC} is not an integer")
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as exc:
        raise EnecError(f"corrupted ENEC checkpoint ({what}): bad table ({exc})") from None
    for e in [CkptEntry("<header>", "raw", hoff, hlen)] + entries:
        if e.codec not in ("enec", "raw") or e.offset < 0 or e.length < 0 or e.offset + e.length > size:
            raise EnecError(f"truncated or corrupted ENEC checkpoint ({what}): entry {e.name!r} out of range")
        if e.codec == "enec" and e.offset % 8:
            raise EnecError(f"corrupted ENEC checkpoint ({what}): stream {e.name!r} is not 8-byte aligned")
    if os.path.basename(name) != name or name in ("", ".", ".."):
        raise EnecError(f"corrupted ENEC checkpoint ({what}): bad source name {name!r}")
    if hoff + hlen > len(buf):
        raise EnecError(f"ENEC checkpoint ({what}): {len(buf)} bytes given, its header ends at {hoff + hlen}")
    st = bytes(buf[hoff : hoff + hlen])
    if st_crc is not None and zlib.crc32(st) != st_crc:
        raise EnecError(f"corrupted ENEC checkpoint ({what}): safetensors header checksum mismatch")
    layout = parse_safetensors_header(st, hlen + _st_data_bytes(st), f"header in {what}")
    if source_size != layout.data_start + sum(e.end - e.start for e in layout.entries):
        raise EnecError(f"corrupted ENEC checkpoint ({what}): source size does not match its header")
    if [e.name for e in entries] != [e.name for e in layout.entries]:
        raise EnecError(f"corrupted ENEC checkpoint ({what}): tensor table does not match the header")
    for e, t in zip(entries, layout.entries):  # every size the header claims, against the bytes there
        _check_entry_size(e, t, what)
    return Ckpt(name, source_size, sha, (hoff, hlen), layout, entries, size)


def _check_entry_size(e: CkptEntry, st: STEntry, what: str) -> None:
    """A raw entry holds exactly its tensor's bytes; a stream is at least as long as the
    smallest valid stream of its tensor (so no claimed size can drive an allocation beyond
    about twice the file). Checked for every entry before any reader allocates."""
    n = st.end - st.start
    if e.codec == "raw":
        if e.length != n:
            raise EnecError(f"corrupted ENEC checkpoint ({what}): raw tensor {e.name!r} holds {e.length} bytes, "
                            f"its header says {n}")
        return
    fmt = _enec_format(st)
    if fmt is None:
        raise EnecError(f"corrupted ENEC checkpoint ({what}): tensor {e.name!r} of {st.dtype} cannot be ENEC-coded")
    if e.length < min_stream_bytes(fmt, len(st.shape), n // fmt.itemsize):
        raise EnecError(f"corrupted ENEC checkpoint ({what}): stream of {e.name!r} ({e.length} bytes) is too short "
                        f"for the {n} bytes its header claims")


MAX_HEAD = MAX_JSON + MAX_ST_HEADER  # the most bytes a valid table and safetensors header take


def head_end(head) -> int | None:
    """How many bytes of an ``.enec`` file hold its table and safetensors header, judged from
    the ``head`` read so far: more bytes to read (a number larger than ``len(head)``), or
    None once they are in or when the table cannot be read (:func:`read_checkpoint` then
    says what is wrong)."""
    if len(head) < PREFIX.size:
        return PREFIX.size
    end = PREFIX.size + struct.unpack_from("<Q", head, PREFIX.size - 8)[0]
    if end > PREFIX.size + MAX_JSON:
        return None
    if len(head) < end:
        return end
    try:
        hoff, hlen = json.loads(bytes(head[PREFIX.size : end]))["source"]["safetensors_header"]
        end = int(hoff) + int(hlen)
    except (ValueError, KeyError, TypeError, RecursionError, OverflowError):
        return None  # read_checkpoint reports the damage
    return end if len(head) < end <= MAX_HEAD else None


def read_head(inp: Input) -> Ckpt:
    """The table and safetensors header of an open ``.enec`` file (read with ``pread``)."""
    head = b""
    while (need := head_end(head)) is not None and len(head) < min(need, inp.size):
        head += inp.read(len(head), min(need, inp.size) - len(head))
    return read_checkpoint(head, inp.size, str(inp.path))


def read_checkpoint_file(path) -> Ckpt:
    """The table of a ``.enec`` file (nothing past its safetensors header is read)."""
    with Input(as_path(path), sequential=False) as inp:
        return read_head(inp)


def _st_data_bytes(st: bytes) -> int:
    """Data bytes a safetensors header describes (so the header can be validated alone)."""
    if len(st) < 8:
        raise EnecError("corrupted ENEC checkpoint: safetensors header too short")
    try:
        header = json.loads(st[8:].decode("utf-8"))
        return max([0] + [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError, IndexError,
            OverflowError):
        raise EnecError("corrupted ENEC checkpoint: embedded safetensors header is invalid") from None


def decode_entry(buf, e: CkptEntry, st: STEntry, out: np.ndarray, threads, verify=True) -> None:
    """Decode one tensor's bytes, ``buf[e.offset : e.offset + e.length]``, into ``out`` (a
    uint8 array of the tensor's size)."""
    _decode_whole(memoryview(buf)[e.offset : e.offset + e.length], e, st, out, threads, verify)


def _decode_whole(data, e: CkptEntry, st: STEntry, out: np.ndarray, threads, verify=True) -> None:
    codec_dtype, itemsize, _ = ST_DTYPES[st.dtype]
    if e.codec == "raw":
        if e.length != st.end - st.start:
            raise EnecError(f"corrupted ENEC checkpoint: raw tensor {e.name!r} has the wrong size")
        if e.crc32 is not None and zlib.crc32(data) != e.crc32:
            raise EnecError(f"corrupted ENEC checkpoint: checksum mismatch in tensor {e.name!r}")
        out[:] = np.frombuffer(data, np.uint8)
        return
    if codec_dtype is None:
        raise EnecError(f"corrupted ENEC checkpoint: tensor {e.name!r} of {st.dtype} cannot be ENEC-coded")
    prep = Prepared(data)  # parses and validates the stream header once
    check_stream(prep.info, e, st)
    with _aligned(out, itemsize) as target:
        prep.decode(target.view(f"<u{itemsize}"), threads=threads, verify=verify)


def check_stream(info, e: CkptEntry, st: STEntry) -> None:
    """A stream's own dtype and shape must be those the safetensors header gives its tensor."""
    if info.fmt.name != ST_DTYPES[st.dtype][0] or tuple(info.shape) != tuple(st.shape):
        raise EnecError(f"corrupted ENEC checkpoint: stream of {e.name!r} does not match its header")


@contextmanager
def _aligned(view: np.ndarray, itemsize: int, copy_in: bool = False):
    """``view`` itself when it is aligned for ``itemsize`` elements, else an aligned scratch
    copy (of its bytes, with ``copy_in``) that is copied back (a safetensors file may place
    a tensor at any byte offset)."""
    if view.ctypes.data % itemsize == 0:
        yield view
        return
    scratch = view.copy() if copy_in else np.empty(view.size, np.uint8)
    yield scratch
    if not copy_in:
        view[:] = scratch


# ------------------------------------------------------------------------------ streaming files
#
# Both directions run on fileio.Pipeline: a reader thread preads the input in pieces of at
# most one buffer, worker threads (``threads`` of them) code pieces in parallel, each with
# single-threaded kernels, and the calling thread commits the results in order (file
# offsets, the container table) and queues them for the writer thread. A piece is either a
# run of whole small tensors (contiguous in the input) or a block range of one large tensor,
# so no tensor size sets the memory floor: the buffers (``buffer_bytes``, at most 32 MiB by default)
# plus, for a large tensor, its block table (12 bytes per block of 16384 elements).


@dataclass
class _Unit:
    """Bytes ``lo .. hi`` of one tensor's data (``st``), coded in one piece."""

    st: STEntry
    lo: int
    hi: int
    ck: CkptEntry | None = None  # decompress: the container entry
    info: object = None  # decompress, a block range of a large stream: its StreamInfo
    first: int = 0  # ... and the blocks
    stop: int = 0
    header: bool = False  # decompress: the safetensors header, not a tensor

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.hi == self.st.end - self.st.start

    @property
    def last(self) -> bool:
        return self.hi == self.st.end - self.st.start


def _workers(threads: int | None) -> int:
    """Coding threads: ``threads``, default every core numba may use. Workers call the
    kernels concurrently, which numba's OpenMP and TBB layers allow; its fallback layer
    (workqueue) does not, and then one worker codes everything."""
    import numba

    check_threads(threads)
    numba.get_num_threads()  # starts the threading layer, so that it can be named
    if numba.threading_layer() == "workqueue":
        return 1
    return numba.config.NUMBA_NUM_THREADS if threads is None else int(threads)


def _enec_format(st: STEntry):
    name = ST_DTYPES[st.dtype][0]
    return format_for(name) if name is not None else None


def _encoder(st: STEntry, block_size: int) -> Encoder | None:
    """The stream writer of a float tensor (None for the dtypes stored raw). Streams are
    flagged as made from numpy arrays, as the container's streams have always been."""
    fmt = _enec_format(st)
    return Encoder(fmt, st.shape, block_size=block_size, flags=FLAG_NUMPY) if fmt is not None else None


def _compress_plan(layout: STLayout, slot: int, block_size: int) -> list[list[_Unit]]:
    """The pieces of a safetensors file's data: runs of whole tensors whose bytes and worst-case
    streams fit a buffer, and block ranges of the tensors that do not."""
    room = slot  # buffers have ALIGN bytes more, for the lead
    groups: list[list[_Unit]] = []
    run: list[_Unit] = []
    run_in = run_out = 0
    for st in layout.entries:
        n = st.end - st.start
        enc = _encoder(st, block_size)
        worst = ALIGN + (enc.table_bytes + enc.payload_bound(enc.numel) if enc else n)
        if n <= room and worst <= room:
            if run and (run_in + n > room or run_out + worst > room):
                groups.append(run)
                run, run_in, run_out = [], 0, 0
            run.append(_Unit(st, 0, n))
            run_in, run_out = run_in + n, run_out + worst
            continue
        if run:
            groups.append(run)
            run, run_in, run_out = [], 0, 0
        if enc is None:
            step = room
        else:  # whole blocks whose raw bytes and worst-case stream fit
            per = enc.payload_bound(enc.block)
            blocks = max(1, min(room // (enc.block * enc.fmt.itemsize), (room - ALIGN) // per))
            step = blocks * enc.block * enc.fmt.itemsize
        groups += [[_Unit(st, lo, min(lo + step, n))] for lo in range(0, n, step)]
    if run:
        groups.append(run)
    return groups


class _ContainerWriter:
    """Lays out a ``.enec`` file: the reserved table, then entries at ALIGN-ed offsets."""

    def __init__(self, out: Output, n_tensors: int, names_bytes: int):
        self.out = out
        self.reserve = 4096 + 2 * names_bytes + 160 * n_tensors
        self.pos = PREFIX.size + self.reserve
        self.entries: list[CkptEntry] = []

    def align(self) -> int:
        self.pos += -self.pos % ALIGN
        return self.pos

    def finish(self, source_name: str, source_size: int, sha: str | None, header: tuple[int, int],
               header_crc: int) -> int:
        """Write the table; returns the file size."""
        meta = {
            "format": "enec-checkpoint",
            "version": VERSION,
            "source": {"name": source_name, "size": source_size, "sha256": sha,
                       "safetensors_header": list(header), ST_HEADER_CRC: header_crc},
            "tensors": [{"name": e.name, "codec": e.codec, "offset": e.offset, "length": e.length,
                         **({"crc32": e.crc32} if e.crc32 is not None else {})} for e in self.entries],
        }
        js = json.dumps(meta, separators=(",", ":")).encode()
        if len(js) > self.reserve:
            raise AssertionError("checkpoint table outgrew its reservation")
        js += b" " * (self.reserve - len(js))
        self.out.truncate(self.pos)
        self.out.pwrite(PREFIX.pack(MAGIC, VERSION, zlib.crc32(js), len(js)) + js, 0)
        return self.pos


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                leave=False, dynamic_ncols=True)


def _encode_piece(group: list[_Unit], inbuf: np.ndarray, in_lo: int, outbuf: np.ndarray,
                  block_size: int) -> tuple[int, list]:
    """Worker: code one piece into ``outbuf``. A run of whole tensors is laid out as it will
    be in the file from an ALIGN-ed offset (streams whole, headers included); a block range
    gives its payload. Returns (bytes used, per unit: (offset in outbuf, length, crc32 or
    the range's (offsets, checksums)))."""
    o, done = 0, []
    with threads_set(1):
        for u in group:
            st = u.st
            a = lead(in_lo) + st.start + u.lo - in_lo
            data = inbuf[a : a + u.hi - u.lo]
            enc = _encoder(st, block_size)
            if u.whole:
                pad = -o % ALIGN
                outbuf[o : o + pad] = 0
                o += pad
            if enc is None:
                outbuf[o : o + data.size] = data
                done.append((o, data.size, zlib.crc32(data) if u.whole else None))
                o += data.size
                continue
            with _aligned(data, enc.fmt.itemsize, copy_in=True) as src:
                flat = src.view(enc.fmt.uint_dtype)
                if u.whole:
                    tb = enc.table_bytes
                    n, offs, checks = enc.encode(flat, outbuf[o + tb :])
                    enc.add(offs, checks)
                    outbuf[o : o + tb] = np.frombuffer(enc.header(), np.uint8)
                    done.append((o, tb + n, None))
                    o += tb + n
                else:
                    n, offs, checks = enc.encode(flat, outbuf[o:])
                    done.append((o, n, (offs, checks)))
                    o += n
    return o, done


def compress_file(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                  threads: int | None = None, force: bool = False, progress: bool = False,
                  block_size: int = 1 << 14, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> dict:
    """Compress one ``.safetensors`` file into a ``.enec`` container (default: beside it).

    Streams: memory holds ``buffer_bytes`` of buffers (and a large tensor's block table),
    whatever the file size; reading, coding (``threads`` threads, default all cores) and
    writing overlap. The output appears under its name only when complete, with the
    source's permission bits. Returns a summary dict (sizes, per-dtype bytes, the codec's
    CPU seconds summed over its ``threads``, and the wall seconds of the whole call).
    """
    import time

    t_start = time.perf_counter()
    src = as_path(src, "source")
    dst = as_path(dst, "output") if dst is not None else src.with_suffix(".enec")
    workers = _workers(threads)
    with Input(src) as inp:
        size = inp.size
        if size < 8:
            raise EnecError(f"not a safetensors file ({src}): {size} bytes")
        (hlen,) = struct.unpack("<Q", inp.read(0, 8))
        if hlen > MAX_ST_HEADER or 8 + hlen > size:
            raise EnecError(f"not a safetensors file ({src}): header length {hlen} does not fit")
        head = inp.read(0, 8 + hlen)
        layout = parse_safetensors_header(head, size, f"file ({src})")
        _encoder(STEntry("", "BF16", (1,), 0, 2), block_size)  # a bad block size fails here
        slot = slot_bytes(buffer_bytes, 4 * block_size + 4 * ALIGN, workers)
        groups = _compress_plan(layout, slot, block_size)
        sha = hashlib.sha256(head)
        stats = {"source": str(src), "output": str(dst), "original_bytes": size,
                 "tensors": len(layout.entries), "codec_seconds": 0.0, "threads": workers, "by_dtype": {}}

        def produce(pipe):
            for group in groups:
                lo, hi = group[0].st.start + group[0].lo, group[-1].st.start + group[-1].hi
                buf = pipe.input()
                view = buf[lead(lo) : lead(lo) + hi - lo]
                inp.read_into(view, lo)
                pipe.hash(view, buf)
                yield group, buf, lo

        def work(item, outbuf):
            t0 = time.thread_time()
            used, done = _encode_piece(item[0], item[1], item[2], outbuf, block_size)
            return used, done, time.thread_time() - t0, outbuf

        with Output(dst, force=force, mode=inp.mode) as out:
            w = _ContainerWriter(out, len(layout.entries), sum(len(e.name.encode()) for e in layout.entries))
            hdr = (w.align(), len(head))
            out.pwrite(head, w.pos)
            w.pos += len(head)
            bar = _progress(size, f"compress {src.name}", progress)
            state: dict = {}  # the tensor being coded in pieces: its encoder, entry offset, crc

            def entry(st, codec, offset, length, crc):
                w.entries.append(CkptEntry(st.name, codec, offset, length, crc))
                d = stats["by_dtype"].setdefault(st.dtype, [0, 0])
                d[0] += st.end - st.start
                d[1] += length

            def commit(item, result):
                group, inbuf, _ = item
                used, done, seconds, outbuf = result
                pipe.done_with(inbuf)
                stats["codec_seconds"] += seconds
                u = group[0]
                if u.whole:  # a run of whole tensors, laid out from an ALIGN-ed offset
                    base = w.align()
                    pipe.write(outbuf[:used], base, outbuf)
                    for u, (o, n, crc) in zip(group, done):
                        entry(u.st, "raw" if crc is not None else "enec", base + o, n, crc)
                    w.pos = base + used
                else:  # a block range (or a raw slice) of a large tensor
                    o, n, extra = done[0]
                    if u.lo == 0:
                        state.update(offset=w.align(), enc=_encoder(u.st, block_size), crc=0)
                        if state["enc"] is not None:
                            w.pos += state["enc"].table_bytes  # the header goes there at the end
                    enc = state["enc"]
                    if enc is None:
                        state["crc"] = zlib.crc32(outbuf[o : o + n], state["crc"])
                    else:
                        enc.add(*extra)
                    pipe.write(outbuf[o : o + n], w.pos, outbuf)
                    w.pos += n
                    if u.last:
                        if enc is not None:
                            pipe.write(enc.header(), state["offset"])
                        entry(u.st, "raw" if enc is None else "enec", state["offset"], w.pos - state["offset"],
                              state["crc"] if enc is None else None)
                bar.update(sum(x.hi - x.lo for x in group))

            with Pipeline(produce, slot, out, workers, hasher=sha.update) as pipe:
                pipe.run(work, commit)
            bar.close()
            stats["compressed_bytes"] = w.finish(src.name, size, sha.hexdigest(), hdr, zlib.crc32(head))
    stats["seconds"] = time.perf_counter() - t_start
    return stats


def _decompress_plan(inp: Input, ck: Ckpt, slot: int):
    """Yield the pieces of a ``.enec`` file in order, each a list of units: runs of whole
    entries (the safetensors header first), or block ranges (slices) of a large stream."""
    room = slot
    hoff, hlen = ck.st_header
    header_st = STEntry("<header>", "U8", (hlen,), 0, hlen)
    items = [(CkptEntry("<header>", "raw", hoff, hlen), header_st)] + list(zip(ck.entries, ck.layout.entries))
    run: list[_Unit] = []
    for e, st in items:
        is_header = st is header_st
        n = st.end - st.start
        if e.length <= room and n <= room:
            if run and (e.offset + e.length - run[0].ck.offset > room or st.end - run[0].st.start > room):
                yield run
                run = []
            run.append(_Unit(st, 0, n, e, header=is_header))
            continue
        if run:
            yield run
            run = []
        if e.codec == "raw":
            if e.length != n:
                raise EnecError(f"corrupted ENEC checkpoint: raw tensor {e.name!r} has the wrong size")
            yield from ([_Unit(st, lo, min(lo + room, n), e, header=is_header)] for lo in range(0, n, room))
            continue
        if ST_DTYPES[st.dtype][0] is None:
            raise EnecError(f"corrupted ENEC checkpoint: tensor {e.name!r} of {st.dtype} cannot be ENEC-coded")
        info = _stream_table(inp, e)
        check_stream(info, e, st)
        isz = info.fmt.itemsize
        per = max(1, room // (info.block_elems * isz))
        offs = info.offsets
        first = 0
        while first < info.nblocks:
            fit = int(np.searchsorted(offs, offs[first] + room, side="right")) - 1
            stop = min(first + per, fit, info.nblocks)
            if stop <= first:
                raise EnecError(f"tensor {e.name!r}: block {first} takes {int(offs[first + 1] - offs[first])} bytes, "
                                f"more than a buffer ({room}); raise the buffer size")
            lo = first * info.block_elems * isz
            hi = min(stop * info.block_elems, info.numel) * isz
            yield [_Unit(st, lo, hi, e, info, first, stop)]
            first = stop
    if run:
        yield run


def _stream_table(inp: Input, e: CkptEntry):
    """The parsed header and tables of the stream of entry ``e`` (its payload is not read)."""
    start = header_bytes(inp.read(e.offset, min(HEADER.size, e.length)))
    if start > e.length:
        raise EnecError(f"truncated ENEC stream in tensor {e.name!r}")
    return parse_header(inp.read(e.offset, start), total=e.length)


def _unit_input(u: _Unit) -> tuple[int, int]:
    """The input bytes (absolute offsets in the .enec file) a decompress unit reads."""
    if u.info is None:
        if u.ck.codec == "raw" and not u.whole:
            return u.ck.offset + u.lo, u.ck.offset + u.hi
        return u.ck.offset, u.ck.offset + u.ck.length
    p = u.ck.offset + u.info.payload_start
    return p + int(u.info.offsets[u.first]), p + int(u.info.offsets[u.stop])


def _decode_piece(group: list[_Unit], inbuf: np.ndarray, in_lo: int, outbuf, target) -> None:
    """Worker: decode one piece; each unit's bytes go to ``outbuf`` (at their file offset
    from the piece's start, kept ALIGN-congruent) or, without one, to ``target(unit)``."""
    base = group[0].st.start + group[0].lo
    with threads_set(1):
        for u in group:
            a, b = _unit_input(u)
            data = inbuf[lead(in_lo) + a - in_lo : lead(in_lo) + b - in_lo]
            if outbuf is not None:
                o = lead(base) + u.st.start + u.lo - base
                out = outbuf[o : o + u.hi - u.lo]
            else:
                out = target(u)
                if out is None:
                    continue
            if u.info is None and u.whole:
                _decode_whole(data, u.ck, u.st, out, None)
            elif u.info is None:  # a slice of a large raw tensor: its checksum is summed in order
                out[:] = data
            else:
                isz = u.info.fmt.itemsize
                with _aligned(out, isz) as dst:
                    Prepared.part(u.info, data, u.first, u.stop).decode(dst.view(f"<u{isz}"))


def _restore(inp: Input, ck: Ckpt, slot: int, threads, *, target=None, out: Output | None = None,
             hasher=None, progress: bool = False, desc: str = "") -> float:
    """Decode every piece of ``inp`` (a parsed ``.enec`` file) in order, on ``threads``
    workers: into ``out`` at each piece's place in the restored file (``hasher(view)`` runs
    on its own thread over the restored bytes, in file order), or into ``target(unit)``'s
    arrays. Returns the CPU seconds spent decoding (summed over the workers)."""
    import time

    def produce(pipe):
        for group in _decompress_plan(inp, ck, slot):
            lo, hi = _unit_input(group[0])[0], _unit_input(group[-1])[1]
            buf = pipe.input()
            inp.read_into(buf[lead(lo) : lead(lo) + hi - lo], lo)
            yield group, buf, lo

    def work(item, outbuf):
        t0 = time.thread_time()
        _decode_piece(item[0], item[1], item[2], outbuf, target)
        return outbuf, time.thread_time() - t0

    seconds = 0.0
    crc = 0
    bar = _progress(ck.source_size, desc, progress)

    def commit(item, result):
        nonlocal seconds, crc
        group, inbuf, in_lo = item
        outbuf, dt = result
        seconds += dt
        u = group[0]
        if u.ck.codec == "raw" and not u.whole:  # the checksum of a large raw tensor, in order
            a, b = _unit_input(u)
            crc = zlib.crc32(inbuf[lead(in_lo) + a - in_lo : lead(in_lo) + b - in_lo], 0 if u.lo == 0 else crc)
            if u.last and u.ck.crc32 is not None and crc != u.ck.crc32:
                raise EnecError(f"corrupted ENEC checkpoint: checksum mismatch in tensor {u.ck.name!r}")
        pipe.done_with(inbuf)
        base = u.st.start + u.lo
        end = group[-1].st.start + group[-1].hi
        if outbuf is not None:
            pipe.write(outbuf[lead(base) : lead(base) + end - base], base, outbuf, hashed=hasher is not None)
        bar.update(end - base)

    with Pipeline(produce, slot, out, _workers(threads), hasher) as pipe:
        pipe.run(work, commit)
    bar.close()
    return seconds


def decompress_file(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                    threads: int | None = None, force: bool = False, progress: bool = False,
                    verify_sha256: bool = True, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> dict:
    """Rebuild the original ``.safetensors`` file byte for byte from a ``.enec`` container.

    Streams like :func:`compress_file` (bounded memory; reading, decoding on ``threads``
    threads and writing overlap); the restored file's SHA-256 is checked against the one
    recorded at compression (``verify_sha256``) before it appears under its name, with the
    container's permission bits.
    """
    import time

    t_start = time.perf_counter()
    src = as_path(src, "source")
    workers = _workers(threads)
    with Input(src) as inp:
        ck = read_head(inp)
        dst = as_path(dst, "output") if dst is not None else src.with_name(ck.source_name)
        stats = {"source": str(src), "output": str(dst), "compressed_bytes": inp.size,
                 "original_bytes": ck.source_size, "codec_seconds": 0.0, "threads": workers}
        sha = hashlib.sha256() if verify_sha256 and ck.source_sha256 else None
        with Output(dst, force=force, mode=inp.mode) as out:
            stats["codec_seconds"] = _restore(inp, ck, slot_bytes(buffer_bytes, 0, workers), workers, out=out,
                                              hasher=sha.update if sha else None, progress=progress,
                                              desc=f"decompress {src.name}")
            if sha is not None:
                if sha.hexdigest() != ck.source_sha256:
                    raise EnecError(f"corrupted ENEC checkpoint ({src}): sha256 of the restored file differs")
                stats["sha256"] = ck.source_sha256
    stats["seconds"] = time.perf_counter() - t_start
    return stats


# ------------------------------------------------------------------------------ folders

SKIP = {".git"}


def check_shards(folder, suffix: str) -> None:
    """Raise :class:`EnecError` if a shard index (``*.safetensors.index.json``) in ``folder``
    lists a shard that is not there as a ``suffix`` file (``.safetensors`` or ``.enec``)."""
    folder = as_path(folder, "folder")
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            listed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            names = [str(Path(str(n)).with_suffix(suffix)) for n in listed]
        except (ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as exc:
            raise EnecError(f"{index}: unreadable shard index ({exc})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            names = missing
            raise EnecError(f"{folder} is missing {len(missing)} of the {len(listed)} shards {index.name} lists: "
                            f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")


def _folder_files(src: Path) -> list[Path]:
    return [p for p in sorted(src.rglob("*")) if p.is_file() and not SKIP & set(p.relative_to(src).parts)]


def _copy_folder(src: Path, dst, *, force: bool, suffix: str, convert) -> list[dict]:
    """Write ``dst`` as a copy of folder ``src`` whose ``suffix`` files go through
    ``convert(path, out_path)`` (which returns its stats); the folder appears when complete."""
    out = []
    with Output(dst, force=force, mode=src.stat().st_mode & 0o777, folder=True) as o:
        for p in _folder_files(src):
            rel = p.relative_to(src)
            for parent in reversed(rel.parents[:-1]):
                if not (o.tmp / parent).is_dir():
                    (o.tmp / parent).mkdir()
                    shutil.copystat(src / parent, o.tmp / parent)
            if p.suffix == suffix:
                out.append(convert(p, o.tmp / rel))
            else:
                shutil.copy2(p, o.tmp / rel)
    for s in out:  # report final paths, not the temporary folder
        s["output"] = str(dst / Path(s["output"]).relative_to(o.tmp))
    return out


def compress_folder(src, dst=None, *, threads=None, force=False, progress=False,
                    block_size: int = 1 << 14, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> list[dict]:
    """Compress every ``*.safetensors`` of a model folder; copy every other file as is."""
    src = as_path(src, "folder")
    if not src.is_dir():
        raise EnecError(f"no such folder: {src}")
    dst = as_path(dst, "output") if dst is not None else src.with_name(src.name + "-enec")
    if not any(p.suffix == ".safetensors" for p in _folder_files(src)):
        raise EnecError(f"{src} holds no .safetensors file")
    check_shards(src, ".safetensors")
    return _copy_folder(src, dst, force=force, suffix=".safetensors", convert=lambda p, q: compress_file(
        p, q.with_suffix(".enec"), threads=threads, progress=progress, block_size=block_size,
        buffer_bytes=buffer_bytes))


def decompress_folder(src, dst=None, *, threads=None, force=False, progress=False,
                      buffer_bytes: int = DEFAULT_BUFFER_BYTES, verify_sha256: bool = True) -> list[dict]:
    """Restore a folder made by :func:`compress_folder` byte for byte."""
    src = as_path(src, "folder")
    if not src.is_dir():
        raise EnecError(f"no such folder: {src}")
    if dst is None:
        if not src.name.endswith("-enec"):
            raise EnecError(f"cannot guess the output folder for {src}: pass -o/--output")
        dst = src.with_name(src.name[: -len("-enec")])
    check_shards(src, ".enec")
    return _copy_folder(src, as_path(dst, "output"), force=force, suffix=".enec", convert=lambda p, q: decompress_file(
        p, q.with_suffix(".safetensors"), threads=threads, progress=progress, buffer_bytes=buffer_bytes,
        verify_sha256=verify_sha256))


# ------------------------------------------------------------------------------ tensors API


def save_file(tensors: dict, filename, metadata: dict | None = None, *, threads: int | None = None) -> None:
    """Save a dict of torch tensors as an ENEC checkpoint (like ``safetensors.torch.save_file``).

    Float tensors (bf16/fp16/fp32/fp8) are ENEC-coded, everything else stored raw. The file
    decompresses (``enec decompress``) to a standard ``.safetensors`` file.
    """
    import torch

    if not isinstance(tensors, dict):
        raise EnecError(f"tensors must be a dict of name -> torch tensor, got {type(tensors).__name__}")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(k, str) for k in metadata)):
        raise EnecError("metadata must be a dict with str keys, or None")
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise EnecError(f"tensor names must be strings other than '__metadata__', got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise EnecError(f"{name!r} is a {type(t).__name__}, not a torch tensor")
        dt = str(t.dtype).removeprefix("torch.")
        if dt not in TORCH_TO_ST:
            raise EnecError(f"cannot save {name!r}: unsupported dtype {t.dtype}")
        if t.layout != torch.strided or t.is_meta:
            raise EnecError(f"cannot save {name!r}: a {'meta' if t.is_meta else t.layout} tensor has no dense data")
        items.append((name, TORCH_TO_ST[dt], t.detach().cpu().contiguous()))
    head = _st_header_bytes([(n, d, tuple(t.shape), t.numel() * t.element_size()) for n, d, t in items],
                            metadata)
    path = as_path(filename, "filename")
    size = len(head) + sum(t.numel() * t.element_size() for _, _, t in items)
    parse_safetensors_header(head, size, "header")  # what we wrote must be valid
    with Output(path, force=True) as out:
        w = _ContainerWriter(out, len(items), sum(len(n.encode()) for n, _, _ in items))

        def put(data) -> tuple[int, int]:
            start = w.align()
            out.pwrite(data, start)
            n = len(memoryview(data).cast("B"))
            w.pos += n
            return start, n

        hdr = put(head)
        for name, dtype, t in items:  # the header lays tensors out in this order
            if ST_DTYPES[dtype][0] is not None:
                data, crc, codec = compress(t, threads=threads), None, "enec"
            else:
                raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
                data, crc, codec = raw, zlib.crc32(raw), "raw"
            off, n = put(data)
            w.entries.append(CkptEntry(name, codec, off, n, crc))
        w.finish(path.with_suffix(".safetensors").name, size, None, hdr, zlib.crc32(head))


def load_file(filename, device: str = "cpu", *, threads: int | None = None,
              buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> dict:
    """Load an ENEC checkpoint into a dict of torch tensors (like ``safetensors.torch.load_file``).

    The file is read in pieces (``buffer_bytes`` of buffers) and decoded straight into the
    tensors, so the load needs the tensors' memory and little more."""
    import torch

    path = as_path(filename, "filename")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise EnecError(f"bad device {device!r}: {exc}") from None
    with Input(path) as inp:
        ck = read_head(inp)
        tensors = {}
        for st in ck.layout.entries:
            tensors[st.name] = torch.empty(st.shape, dtype=getattr(torch, ST_DTYPES[st.dtype][2]))

        def target(u: _Unit):
            if u.header:
                return None
            t = tensors[u.st.name]
            flat = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
            return flat[u.lo : u.hi]

        workers = _workers(threads)
        _restore(inp, ck, slot_bytes(buffer_bytes, 0, workers), workers, target=target)
    if device.type == "cpu":
        return tensors
    try:
        return {k: v.to(device) for k, v in tensors.items()}
    except (RuntimeError, AssertionError) as exc:  # no such device here (torch's own errors)
        raise EnecError(f"cannot move the tensors to {device}: {exc}") from None


def checkpoint_info(path) -> tuple[Ckpt, list[dict]]:
    """Per-tensor facts of a ``.enec`` file (for ``enec info``): reads the table, and of each
    stream its header, tables and block heads."""
    path = as_path(path)
    with Input(path, sequential=False) as inp:
        ck = read_head(inp)
        rows = []
        for e, st in zip(ck.entries, ck.layout.entries):
            row = {"name": e.name, "dtype": st.dtype, "shape": list(st.shape),
                   "original_bytes": st.end - st.start, "compressed_bytes": e.length,
                   "codec": e.codec, "params": None, "raw_blocks": None}
            if e.codec == "enec":
                info = _stream_table(inp, e)
                start = info.payload_start
                heads = [inp.read(e.offset + start + int(o), 5) for o in info.offsets[:-1]]
                raw = sum(h[0] == 1 for h in heads)
                coded = next((h for h in heads if h[0] != 1), None)
                row["params"] = list(coded[1:5]) if coded is not None else None
                row["raw_blocks"] = f"{raw}/{info.nblocks}"
            rows.append(row)
    return ck, rows
