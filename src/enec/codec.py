"""compress / decompress on torch tensors and numpy arrays (CPU kernels)."""

from __future__ import annotations

import ctypes
import platform
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np

from . import cpu
from .errors import EnecError
from .format import (
    DEFAULT_BLOCK_LOG2,
    FLAG_NUMPY,
    FORMATS,
    MAX_BLOCK_LOG2,
    MIN_BLOCK_LOG2,
    FloatFormat,
    StreamInfo,
    build_header,
    format_for,
    padded,
    parse_header,
    raw_block_bytes,
    table_bytes,
)

_NUMPY_FLOATS = {"float16": "float16", "float32": "float32", "bfloat16": "bfloat16"}


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is installed in every supported setup
        return None
    return torch


# ------------------------------------------------------------------------------ threads


def _prefer_openmp() -> None:
    """Rank numba's OpenMP threading layer first, unless the user chose a layer or an order.

    numba's own default takes TBB whenever the ``tbb`` package is installed. Beside torch's
    matmul threads that made the compressed-resident decode about 1.5x slower than OpenMP on
    the 2-core development VM (SmolLM2 at 0.35x the uncompressed decode speed against 0.53x,
    runs minutes apart). Setting the config value directly is what numba's config module
    allows; it is read at the first parallel kernel launch."""
    import os

    if "NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ:
        return
    if str(numba.config.THREADING_LAYER).lower() == "default":
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


_prefer_openmp()


def _thread_count_fns():
    """(get, set) of numba's per-thread count of kernel threads.

    The public ``numba.get/set_num_threads`` take two locks on every call (about 10 us each,
    more than decoding a small weight); once the thread pool is up, the functions they end in
    do the same without them. Falls back to the public API if numba changes."""
    numba.get_num_threads()  # starts the pool: after this the raw functions are valid
    try:
        from numba.np.ufunc import parallel as _p

        get, put = _p._get_num_threads, _p._set_num_threads
        if get() == numba.get_num_threads():
            return get, put
    except (ImportError, AttributeError):  # pragma: no cover - another numba layout
        pass
    return numba.get_num_threads, numba.set_num_threads  # pragma: no cover


_THREAD_FNS: tuple | None = None


def check_threads(threads) -> None:
    """``threads`` must be None or an integer from 1 to numba's thread count."""
    if threads is None:
        return
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= limit:
        raise EnecError(f"threads must be an integer from 1 to {limit}, got {threads!r}")


@contextmanager
def threads_set(threads: int | None):
    """Run numba kernels with ``threads`` threads (None: all cores), restoring the old count."""
    global _THREAD_FNS
    check_threads(threads)
    if threads is None:
        yield
        return
    if _THREAD_FNS is None:
        _THREAD_FNS = _thread_count_fns()
    get, put = _THREAD_FNS
    old = get()
    if old == threads:
        yield
        return
    put(int(threads))
    try:
        yield
    finally:
        put(old)


# ------------------------------------------------------------------------------ buffers


def _new_bytes(n: int) -> tuple[bytes, np.ndarray]:
    """An uninitialised ``bytes`` of length n and a writable uint8 view of its storage.

    This is what C extensions do with ``PyBytes_FromStringAndSize(NULL, n)``: the object
    is filled before anyone else sees it, which saves a copy of the whole stream.
    """
    if platform.python_implementation() == "CPython" and n > 0:
        make = ctypes.pythonapi.PyBytes_FromStringAndSize
        make.restype = ctypes.py_object
        make.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
        obj = make(None, n)
        addr = id(obj) + bytes.__basicsize__ - 1
        view = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))
        return obj, view
    buf = bytearray(n)
    return buf, np.frombuffer(buf, dtype=np.uint8)  # type: ignore[return-value]


def _writable_alias(a: np.ndarray) -> np.ndarray:
    """The same memory as a writable array, so kernels see one array type whatever the source.

    numba compiles a separate specialisation for read-only arrays (bytes, read-only mmaps);
    the kernels never write their inputs, so aliasing them as writable is safe and saves a
    multi-second compile per variant. The caller keeps ``a`` alive for the call.
    """
    if a.flags.writeable or a.size == 0:
        return a
    addr = a.__array_interface__["data"][0]
    raw = (ctypes.c_uint8 * a.nbytes).from_address(addr)
    return np.frombuffer(raw, dtype=a.dtype).reshape(a.shape)


def _as_flat(x, dtype: str | None) -> tuple[FloatFormat, np.ndarray, tuple[int, ...], int, object]:
    """(format, flat unsigned view, shape, flags, keep-alive) for a tensor or array."""
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        name = str(x.dtype).removeprefix("torch.")
        if dtype is not None and dtype != name:
            raise EnecError(f"dtype={dtype!r} does not match the tensor's dtype {name}")
        fmt = format_for(name)
        if x.device.type != "cpu":
            raise EnecError(f"tensor on {x.device}: compress takes CPU or CUDA tensors")
        if x.layout != torch.strided:
            raise EnecError(f"cannot compress a {x.layout} tensor: pass a dense one (.to_dense())")
        t = x.detach().contiguous()
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[fmt.itemsize]
        flat = t.reshape(-1).view(int_dtype).numpy().view(fmt.uint_dtype)
        return fmt, flat, tuple(t.shape), 0, t
    if isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":  # ml_dtypes
            name = "bfloat16"
        elif x.dtype in (np.float16, np.float32):
            name = x.dtype.name
        elif x.dtype.kind == "u" and dtype is not None:
            name = dtype
        else:
            raise EnecError(
                f"cannot compress a numpy array of {x.dtype}: pass float16/float32, "
                "or an unsigned-int array of the same width with dtype= one of "
                "'bfloat16', 'float16', 'float32', 'float8_e4m3fn', 'float8_e5m2'"
            )
        if dtype is not None and dtype != name:
            raise EnecError(f"dtype={dtype!r} does not match the array's dtype {name}")
        fmt = format_for(name)
        if x.dtype.itemsize != fmt.itemsize:
            raise EnecError(f"a {fmt.name} array must have {fmt.itemsize}-byte elements, got {x.dtype}")
        a = np.ascontiguousarray(x).reshape(x.shape)  # ascontiguousarray makes 0-d arrays 1-d
        flat = _writable_alias(a.reshape(-1).view(fmt.uint_dtype))
        return fmt, flat, tuple(a.shape), FLAG_NUMPY, a
    raise EnecError(f"cannot compress {type(x).__name__}: pass a torch tensor or a numpy array")


# ------------------------------------------------------------------------------ compress


DEFAULT_ESCAPE_PENALTY = 2


def _block_log2(block_size) -> int:
    ok = not isinstance(block_size, bool) and isinstance(block_size, (int, np.integer)) and block_size > 0
    blog2 = int(block_size).bit_length() - 1 if ok else -1
    if not ok or block_size != 1 << blog2 or not MIN_BLOCK_LOG2 <= blog2 <= MAX_BLOCK_LOG2:
        raise EnecError(f"block_size must be a power of two from 64 to 2**20, got {block_size}")
    return blog2


@dataclass
class _RangePlan:
    """What encoding the next elements will write: parameters, block modes and sizes."""

    numel: int
    params: tuple[int, int, int, int]
    modes: np.ndarray
    n1: np.ndarray
    n2: np.ndarray
    offsets: np.ndarray  # local: offsets[0] = 0, offsets[-1] = payload bytes of the range

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])


class Encoder:
    """Writes one ENEC stream block range by block range, its header and tables last.

    The header and tables take a fixed :attr:`table_bytes` at the start of the stream,
    known before any element is seen. :meth:`encode` codes a range of elements (a whole
    number of blocks, or the tensor's last ones) into a caller's buffer and returns its
    block sizes and checksums; it keeps no state, so ranges can be coded on several threads
    at once. :meth:`add` then takes the ranges' results in tensor order, and :meth:`header`
    gives the bytes that go in front once every block is in. A tensor of any size is thus
    compressed through buffers of a few blocks. Each range gets the code parameters its own
    exponent histogram calls for (the format keeps them per block); :func:`compress` codes
    the whole tensor as one range.
    """

    def __init__(self, fmt: FloatFormat, shape: tuple[int, ...], *, block_size: int = 1 << DEFAULT_BLOCK_LOG2,
                 escape_penalty: int = DEFAULT_ESCAPE_PENALTY, flags: int = 0):
        self.blog2 = _block_log2(block_size)
        if not isinstance(escape_penalty, int) or not 0 <= escape_penalty <= 64:
            raise EnecError(f"escape_penalty must be an integer from 0 to 64, got {escape_penalty!r}")
        self.fmt, self.shape, self.flags, self.penalty = fmt, tuple(int(d) for d in shape), flags, escape_penalty
        self.numel = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.block = 1 << self.blog2
        self.nblocks = (self.numel + self.block - 1) >> self.blog2
        self.table_bytes = table_bytes(len(self.shape), self.nblocks)
        self.offsets = np.zeros(self.nblocks + 1, np.int64)
        self.checks = np.zeros(self.nblocks, np.uint32)
        self.blocks_done = 0

    def payload_bound(self, nelems: int) -> int:
        """Most payload bytes ``nelems`` elements can take (every block raw)."""
        full, rest = divmod(nelems, self.block)
        return full * raw_block_bytes(self.fmt, self.block) + (raw_block_bytes(self.fmt, rest) if rest else 0)

    def plan(self, flat: np.ndarray) -> _RangePlan:
        """Code parameters and block sizes for the elements of ``flat`` (an unsigned view)."""
        n = flat.size
        nb = (n + self.block - 1) >> self.blog2
        if nb == 0:
            z = np.zeros(0, np.int64)
            return _RangePlan(0, (1, 0, 0, 0), np.zeros(0, np.uint8), z, z, np.zeros(1, np.int64))
        fmt = self.fmt
        hist = cpu.histogram_kernel(fmt)(flat, n, self.blog2)
        params = cpu.choose_params(hist.sum(axis=0), fmt.ebits, self.penalty)
        counts = np.full(nb, self.block, np.int64)
        counts[-1] = n - ((nb - 1) << self.blog2)
        modes, n1, n2, offsets = cpu.plan_blocks(hist, counts, fmt.ebits, *params, fmt.rest_bytes,
                                                 fmt.rest_planes, fmt.itemsize)
        return _RangePlan(n, tuple(int(v) for v in params), modes, n1, n2, offsets)

    def write(self, plan: _RangePlan, flat: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Code the elements ``plan`` was made for into ``out[:plan.nbytes]`` (a uint8 array,
        8-byte aligned); returns the range's (offsets, checksums) for :meth:`add`."""
        checks = np.zeros(plan.modes.size, np.uint32)
        if not plan.numel:
            return plan.offsets, checks
        if out.size < plan.nbytes:
            raise EnecError(f"output holds {out.size} bytes, the range needs {plan.nbytes}")
        w1, b1, w2, b2 = plan.params
        cpu.encode_kernel(self.fmt, w1)(
            flat, flat.view(np.uint8), plan.numel, self.blog2, b1, w2, b2, plan.modes, plan.n1, plan.n2,
            plan.offsets, out, out.view(np.uint64), out.view(np.uint32), checks,
        )
        return plan.offsets, checks

    def encode(self, flat: np.ndarray, out: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """:meth:`plan` and :meth:`write`: (payload bytes, offsets, checksums) of the range."""
        plan = self.plan(flat)
        return (plan.nbytes, *self.write(plan, flat, out))

    def add(self, offsets: np.ndarray, checks: np.ndarray) -> None:
        """Append the next range's blocks (ranges in tensor order; every range but the last
        a whole number of blocks)."""
        first, nb = self.blocks_done, checks.size
        if first + nb > self.nblocks:
            raise EnecError(f"stream overfull: {first + nb} of {self.nblocks} blocks")
        self.offsets[first + 1 : first + nb + 1] = self.offsets[first] + offsets[1:]
        self.checks[first : first + nb] = checks
        self.blocks_done += nb

    @property
    def payload_bytes(self) -> int:
        return int(self.offsets[self.blocks_done])

    def header(self) -> bytes:
        """The stream's first :attr:`table_bytes` bytes (once every block is in)."""
        if self.blocks_done != self.nblocks:
            raise EnecError(f"stream incomplete: {self.blocks_done} of {self.nblocks} blocks coded")
        return build_header(self.fmt, self.shape, self.blog2, self.flags, self.offsets, self.checks)


def compress(x, *, dtype: str | None = None, threads: int | None = None,
             block_size: int = 1 << DEFAULT_BLOCK_LOG2,
             escape_penalty: int = DEFAULT_ESCAPE_PENALTY) -> bytes:
    """Compress a float tensor or array losslessly into a self-describing ENEC stream.

    ``x``: a torch tensor (bfloat16, float16, float32, float8_e4m3fn, float8_e5m2) or a
    numpy array (float16, float32, or unsigned ints of the same width with ``dtype=``, e.g.
    uint16 with ``dtype="bfloat16"``). ``threads``:
    kernel threads (default: all cores). ``block_size``: elements per independently
    decodable block, a power of two from 64 to 2**20. ``escape_penalty``: bits charged per
    level-1 escape when choosing the code parameters (0: smallest stream; the default 2
    costs about 0.6% on LLM weights and avoids escape-heavy codes that decoded 2.4x slower).

    A CUDA tensor is compressed on its GPU by the Triton kernels of :mod:`enec.gpu` (same
    bytes; ``threads`` does not apply).
    """
    if _is_cuda(x):
        from . import gpu  # imports triton lazily; EnecError without triton or CUDA

        return gpu.compress(x, dtype=dtype, block_size=block_size, escape_penalty=escape_penalty)
    fmt, flat, shape, flags, _keep = _as_flat(x, dtype)
    enc = Encoder(fmt, shape, block_size=block_size, escape_penalty=escape_penalty, flags=flags)
    with threads_set(threads):
        plan = enc.plan(flat)
        start = enc.table_bytes
        obj, buf = _new_bytes(start + plan.nbytes)
        enc.add(*enc.write(plan, flat, buf[start:]))
    buf[:start] = np.frombuffer(enc.header(), np.uint8)
    return obj


# ------------------------------------------------------------------------------ decompress


def _check_out(out, fmt: FloatFormat, numel: int):
    """Validate a caller's output buffer; return (result, flat unsigned view)."""
    torch = _torch()
    if torch is not None and isinstance(out, torch.Tensor):
        want = getattr(torch, fmt.torch_name)
        if out.dtype != want:
            raise EnecError(f"out has dtype {out.dtype}, the stream holds {fmt.name}")
        if out.device.type != "cpu":
            raise EnecError(f"out is on {out.device}: decompress writes CPU or CUDA tensors")
        if not out.is_contiguous() or out.numel() != numel:
            raise EnecError(f"out must be contiguous with {numel} elements, got {tuple(out.shape)}")
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[fmt.itemsize]
        return out, out.reshape(-1).view(int_dtype).numpy().view(fmt.uint_dtype)
    if isinstance(out, np.ndarray):
        ok = out.dtype.itemsize == fmt.itemsize and (
            out.dtype.name in (fmt.numpy_name, fmt.name) or out.dtype == fmt.uint_dtype
        )
        if not ok:
            raise EnecError(f"out has dtype {out.dtype}, the stream holds {fmt.name}")
        if not out.flags.c_contiguous or not out.flags.writeable or out.size != numel:
            raise EnecError(f"out must be a writable contiguous array of {numel} elements")
        return out, out.reshape(-1).view(fmt.uint_dtype)
    raise EnecError(f"out must be a torch tensor or numpy array, got {type(out).__name__}")


def _new_out(fmt: FloatFormat, shape: tuple[int, ...], numpy_out: bool):
    torch = _torch()
    if numpy_out or torch is None:
        arr = np.empty(shape, dtype=np.dtype(fmt.numpy_name))
        return arr, arr.reshape(-1).view(fmt.uint_dtype)
    t = torch.empty(shape, dtype=getattr(torch, fmt.torch_name))
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[fmt.itemsize]
    return t, t.reshape(-1).view(int_dtype).numpy().view(fmt.uint_dtype)


def _as_bytes(data) -> np.ndarray:
    """The bytes of a stream: any C-contiguous buffer (bytes, bytearray, memoryview, mmap,
    a numpy array); strided views are an :class:`EnecError`."""
    try:
        arr = np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise EnecError(f"expected a contiguous bytes-like ENEC stream, got {type(data).__name__} ({exc})") from None
    return arr


class Prepared:
    """A parsed ENEC stream, ready to decode again and again (whole or by block range).

    Parsing the header and grouping blocks by kernel costs tens of microseconds; code that
    decodes the same stream many times (:mod:`enec.resident`) pays it once here. The
    stream's bytes must stay alive and unchanged while this object is used.
    :meth:`part` gives the same for a stream that arrives in pieces.
    """

    def __init__(self, data):
        arr = _as_bytes(data)
        info = parse_header(arr)
        self.data = data
        self._setup(info, arr[info.payload_start:], info.offsets.astype(np.int64), info.checksums, info.numel)

    @classmethod
    def part(cls, info: StreamInfo, payload, first: int, stop: int) -> "Prepared":
        """Blocks ``first .. stop-1`` of the stream ``info`` describes (parsed from its header
        and tables alone, ``parse_header(head, total=...)``), from ``payload``: the bytes
        ``info.offsets[first] .. info.offsets[stop]`` of its payload. Decoding it writes
        element ``first * block`` of the tensor at ``flat[0]``; errors name the stream's
        own block numbers."""
        if not 0 <= first <= stop <= info.nblocks:
            raise EnecError(f"block range {first}..{stop} outside 0..{info.nblocks}")
        arr = _as_bytes(payload)
        offsets = info.offsets[first : stop + 1].astype(np.int64)
        offsets -= offsets[0]
        if arr.size != offsets[-1]:
            raise EnecError(f"blocks {first}..{stop} hold {offsets[-1]} payload bytes, got {arr.size}")
        self = cls.__new__(cls)
        self.data = payload
        numel = min(stop << info.block_log2, info.numel) - (first << info.block_log2)
        self._setup(info, arr, offsets, info.checksums[first:stop], numel, first)
        return self

    def _setup(self, info, payload: np.ndarray, offsets: np.ndarray, checksums: np.ndarray, numel: int,
               first_block: int = 0) -> None:
        self.info = info
        self.fmt = info.fmt
        self.shape = info.shape
        self.numel = numel
        self.block = 1 << info.block_log2
        self.block_log2 = info.block_log2
        self.nblocks = offsets.size - 1
        self.first_block = first_block  # of the stream, for error messages
        self.payload = _writable_alias(payload)
        self.offsets = offsets
        self.checksums = checksums
        if not self.nblocks:
            self.payload64 = self.payload32 = None
            self.groups, self.bad_header = [], np.zeros(0, np.int64)
            return
        # blocks are decoded by kernels specialised for their level-1 width; raw blocks go along
        self.payload64, self.payload32 = self.payload.view(np.uint64), self.payload.view(np.uint32)
        heads = self.payload[self.offsets[:-1]]
        widths = self.payload[self.offsets[:-1] + 1].astype(np.int64)
        coded = heads == 0
        valid = (widths >= 1) & (widths <= self.fmt.ebits)
        self.bad_header = np.flatnonzero(coded & ~valid)
        ws = np.unique(widths[coded & valid])
        if ws.size == 0:
            ws = np.array([1])
        self.groups = []
        for g, w1 in enumerate(ws.tolist()):
            pick = (coded & (widths == w1)) | (~coded if g == 0 else False)
            self.groups.append((cpu.decode_kernel(self.fmt, w1), np.flatnonzero(pick)))

    def check(self, threads: int | None = None) -> None:
        """Verify every block's checksum without decoding (raises :class:`EnecError`).

        Code that decodes the same in-memory stream many times can check it once here and
        then decode with ``verify=False``."""
        if not self.nblocks:
            return
        status = np.zeros(self.nblocks, np.uint8)
        with threads_set(threads):
            cpu.check_blocks(self.payload32, self.offsets, self.checksums, status)
        _raise_status(status, 0, self.nblocks, self.first_block)

    def decode(self, flat: np.ndarray, first: int = 0, stop: int | None = None, *,
               threads: int | None = None, verify: bool = True) -> None:
        """Decode blocks ``first .. stop-1`` into ``flat`` (unsigned view; element
        ``first * block`` of the tensor lands at ``flat[0]``)."""
        check_threads(threads)
        if not isinstance(verify, (bool, np.bool_)):
            raise EnecError(f"verify must be True or False, got {verify!r}")
        stop = self.nblocks if stop is None else stop
        if not 0 <= first <= stop <= self.nblocks:
            raise EnecError(f"block range {first}..{stop} outside 0..{self.nblocks}")
        base = first * self.block
        need = min(stop * self.block, self.numel) - base
        if flat.size < need:
            raise EnecError(f"output holds {flat.size} elements, blocks {first}..{stop} need {need}")
        if first == stop:
            return
        status = np.zeros(self.nblocks, np.uint8)
        if self.bad_header.size:
            status[self.bad_header] = cpu.ST_BLOCK_HEADER
        whole = first == 0 and stop == self.nblocks
        if stop - first == 1:  # one block is one task: skip the thread pool's wake-up and barrier
            threads = 1
        with threads_set(threads):
            for kernel, blocks in self.groups:
                if not whole:
                    lo, hi = np.searchsorted(blocks, (first, stop))
                    blocks = blocks[lo:hi]
                    if not blocks.size:
                        continue
                kernel(self.payload, self.payload64, self.payload32,
                       self.offsets, self.checksums, blocks, self.numel, self.block_log2,
                       base, verify, flat, flat.view(np.uint8), status)
        _raise_status(status, first, stop, self.first_block)


def _raise_status(status: np.ndarray, first: int, stop: int, shift: int = 0) -> None:
    """Raise :class:`EnecError` for the first block in ``first .. stop-1`` with a bad status
    (named ``shift`` + its index: its number in the whole stream)."""
    bad = np.flatnonzero(status[first:stop]) if status.any() else ()
    if len(bad):
        b = int(bad[0]) + first
        more = f" (and {len(bad) - 1} more blocks)" if len(bad) > 1 else ""
        raise EnecError(f"corrupted ENEC stream: block {b + shift}: {cpu.STATUS_TEXT[int(status[b])]}{more}")


def warmup(dtypes=("bfloat16", "float16", "float32"), widths=None) -> float:
    """Load the decode kernels for ``dtypes`` now (from numba's on-disk cache, or compile them
    on the very first use) instead of at the first decode; returns the seconds spent.

    A server can call this at start-up, e.g. while its checkpoint download begins.
    ``widths``: the level-1 code widths to load (default: all).
    """
    import time

    t0 = time.perf_counter()
    u8 = np.zeros(64, np.uint8)
    for name in dtypes:
        fmt = format_for(name)
        for w1 in widths or range(1, fmt.ebits + 1):
            cpu.decode_kernel(fmt, w1)(u8, u8.view(np.uint64), u8.view(np.uint32), np.zeros(2, np.int64),
                                       np.zeros(1, np.uint32), np.zeros(0, np.int64), 0, DEFAULT_BLOCK_LOG2,
                                       0, True, np.zeros(1, fmt.uint_dtype), np.zeros(4, np.uint8),
                                       np.zeros(1, np.uint8))
    return time.perf_counter() - t0


def _is_cuda(x) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor) and x.device.type == "cuda"


def decompress(data, out=None, *, threads: int | None = None, verify: bool = True):
    """Decode an ENEC stream. Returns a torch tensor (numpy array if the stream was made
    from numpy; bfloat16 as uint16) of the original dtype and shape, or fills ``out``
    (a contiguous tensor/array with the same dtype and element count) and returns it.

    ``verify`` checks every block's checksum (cheap; on by default). Any malformed,
    truncated or corrupted stream raises :class:`EnecError`.

    A stream held in a CUDA uint8 tensor, or a CUDA ``out``, decodes on the GPU
    (:func:`enec.gpu.decompress`; use it directly for ``stream=``/``device=``).
    """
    if not isinstance(data, Prepared) and (_is_cuda(data) or _is_cuda(out)):
        from . import gpu

        return gpu.decompress(data, out, verify=verify)
    prep = data if isinstance(data, Prepared) else Prepared(data)
    if out is None:
        result, flat = _new_out(prep.fmt, prep.shape, bool(prep.info.flags & FLAG_NUMPY))
    else:
        result, flat = _check_out(out, prep.fmt, prep.numel)
    prep.decode(flat, threads=threads, verify=verify)
    return result


# ------------------------------------------------------------------------------ info


@dataclass(frozen=True)
class Summary:
    """What ``enec info`` prints for one stream."""

    dtype: str
    shape: tuple[int, ...]
    original_bytes: int
    compressed_bytes: int
    nblocks: int
    raw_blocks: int
    params: tuple[int, int, int, int] | None  # (w1, b1, w2, b2) of the coded blocks

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.compressed_bytes if self.compressed_bytes else 0.0


def stream_info(data) -> Summary:
    """Header-level facts about a stream (validates the header, not the blocks)."""
    arr = _as_bytes(data)
    info = parse_header(arr)
    raw = 0
    params = None
    for b in range(info.nblocks):
        o = info.payload_start + int(info.offsets[b])
        if arr[o] == 1:
            raw += 1
        elif params is None:
            params = tuple(int(v) for v in arr[o + 1 : o + 5])
    return Summary(info.fmt.name, info.shape, info.original_bytes, info.compressed_bytes,
                   info.nblocks, raw, params)


__all__ = ["compress", "decompress", "stream_info", "warmup", "Prepared", "Summary", "threads_set", "FORMATS", "padded"]
