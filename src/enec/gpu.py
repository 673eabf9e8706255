"""ENEC on the GPU: Triton kernels that read and write the same stream format as the CPU codec.

>>> import enec.gpu, torch
>>> w = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
>>> blob = enec.gpu.compress(w)                 # bytes, identical to enec.compress(w.cpu())
>>> torch.equal(enec.gpu.decompress(blob), w)   # a CUDA tensor
True

A stream made on either side decodes on the other bit-exactly, and :func:`compress` returns
exactly the bytes of :func:`enec.compress` for the same tensor and options: the parameters
come from the same histogram through the same :func:`enec.cpu.choose_params` (run on the
host on the ``2**ebits``-bin histogram the GPU builds), the block plan uses the same
formulas, and the kernels write every byte of every block, padding included.

How the work is split (docs/FORMAT.md has the bytes):

* compress: a histogram kernel (one program per block, per-block histograms stay on the
  device) -> total histogram to the host -> ``choose_params`` -> block plan with torch on the
  device (escape counts per block from the per-block histograms, coded-or-raw, sizes,
  prefix sums -> offsets) -> the encode kernel (one program per block) -> the checksum
  kernel -> header and block table built on the host with :mod:`enec.format` and copied in
  front of the payload.
* decompress: the header and block table are parsed on the host (:func:`format.parse_header`,
  the same checks as the CPU); the decode kernel (one program per block) rebuilds the
  exponents from the level-1 planes, the escapes (prefix counts give each escape its
  lane-order rank), the level-2 bit stream and the level-3 bytes, and writes the floats; a
  checksum kernel verifies the blocks (``verify=True``). Block problems come back as status
  codes and raise :class:`EnecError` with the CPU's messages.

Nothing here imports triton until a function is called; without triton, torch or a CUDA
device the functions raise :class:`EnecError`. With ``TRITON_INTERPRET=1`` set before triton
is first imported, the same kernels run in Triton's interpreter on CPU tensors (tests).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np

from .errors import EnecError
from .format import (
    DEFAULT_BLOCK_LOG2,
    HEADER,
    MAX_BLOCK_LOG2,
    MIN_BLOCK_LOG2,
    FloatFormat,
    build_header,
    format_for,
    header_bytes,
    parse_header,
    table_bytes,
)

__all__ = ["GpuPrepared", "available", "compress", "decompress", "prepare"]

DEFAULT_ESCAPE_PENALTY = 2

# Launch settings, read at every call (benchmarks/gpu_bench.py sweeps some of them).
TILE_K = 256  # plane bytes per decode/encode step: an [8, 256] tile of 2048 elements
NUM_WARPS = 4
ALIGN_HINTS = True  # tell the compiler block starts are 8-aligned (tl.multiple_of; always true)
MAXNREG = None  # register cap per thread for the decode/encode kernels (None: the compiler's choice)
HIST_TILE = 4096
RAW_TILE = 4096
PACK_TILE = 512
CHECK_GROUP = 8  # blocks hashed side by side by one checksum program
HISTOGRAM = "triton"  # "torch" after the Triton histogram failed once (see _block_histograms)

_INT_VIEW = {1: "int8", 2: "int16", 4: "int32"}


# ------------------------------------------------------------------------------ plumbing


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise EnecError("enec.gpu needs torch (with CUDA)") from exc
    return torch


def _kernels():
    """The kernel module (imports triton), or EnecError saying what is missing."""
    torch = _torch()
    if not interpreting() and not torch.cuda.is_available():
        raise EnecError(
            "enec.gpu needs a CUDA device: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); use enec.compress/decompress on the CPU, "
            "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
        )
    try:
        from . import _gpu_kernels
    except ImportError as exc:
        raise EnecError(f"enec.gpu needs triton (pip install triton): {exc}") from exc
    return _gpu_kernels


def available() -> bool:
    """True when the GPU codec can run here (triton importable and CUDA, or the interpreter)."""
    try:
        _kernels()
    except EnecError:
        return False
    return True


def _default_device():
    return _torch().device("cpu" if interpreting() else "cuda")


def _norm_device(d):
    """torch.device with the index filled in ('cuda' -> 'cuda:N', N the current device)."""
    torch = _torch()
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def _check_device(t, what: str):
    if t.device.type == "cuda" or (interpreting() and t.device.type == "cpu"):
        return
    raise EnecError(f"{what} is on {t.device}: enec.gpu works on CUDA tensors "
                    "(use enec.compress / enec.decompress for CPU tensors)")


def _int_view(flat, fmt: FloatFormat):
    torch = _torch()
    return flat.view(getattr(torch, _INT_VIEW[fmt.itemsize]))


def _stream_ctx(stream, device):
    torch = _torch()
    if stream is None or device.type != "cuda":
        return nullcontext()
    return torch.cuda.stream(stream)


def _pow2_at_most(v: int, cap: int) -> int:
    p = 1
    while p < v and p < cap:
        p <<= 1
    return p


def _launch_opts() -> dict:
    opts = {"num_warps": NUM_WARPS}
    if MAXNREG:
        opts["maxnreg"] = int(MAXNREG)
    return opts


def _consts(fmt: FloatFormat, blog2: int) -> dict:
    t_full = (1 << blog2) // 8
    return {"BLOG2": blog2, "POS": fmt.pos, "EB": fmt.ebits, "RB": fmt.rest_bytes,
            "RP": fmt.rest_planes, "ISZ": fmt.itemsize, "TILE_K": _pow2_at_most(t_full, TILE_K),
            "RAW_TILE": RAW_TILE, "HINT": bool(ALIGN_HINTS)}


def _block_histograms(K, flat, fmt: FloatFormat, blog2: int, nb: int):
    """(nb, 2**ebits) int64 exponent histograms, one row per block, on the device.

    The Triton kernel (tl.histogram) is the fast path; if it fails to build on some triton
    version, a chunked torch.bincount computes the same numbers (slower) from then on.
    """
    global HISTOGRAM
    torch = _torch()
    k = 1 << fmt.ebits
    numel = flat.numel()
    if HISTOGRAM == "triton":
        try:
            hist = torch.empty((nb, k), dtype=torch.int32, device=flat.device)
            K.histogram_kernel[(nb,)](flat, hist, numel, BLOG2=blog2, POS=fmt.pos, K=k,
                                      ISZ=fmt.itemsize, TILE=min(HIST_TILE, 1 << blog2),
                                      num_warps=NUM_WARPS)
            return hist.to(torch.int64)
        except Exception as exc:  # noqa: BLE001 - a compiler problem, not bad data: fall back for good
            import warnings

            warnings.warn(f"enec.gpu: Triton histogram failed ({exc!r}); using torch.bincount")
            HISTOGRAM = "torch"
    hist = torch.zeros(nb * k, dtype=torch.int64, device=flat.device)
    mask = (1 << fmt.bits) - 1
    step = max(1 << blog2, 1 << 24) >> blog2 << blog2  # whole blocks per chunk
    for s0 in range(0, numel, step):
        x = flat[s0 : s0 + step].to(torch.int64) & mask
        e = (x >> fmt.pos) & (k - 1)
        idx = ((torch.arange(s0, s0 + x.numel(), device=flat.device) >> blog2) * k) + e
        hist += torch.bincount(idx, minlength=nb * k)
    return hist.view(nb, k)


# ------------------------------------------------------------------------------ compress


def compress(x, *, dtype: str | None = None, block_size: int = 1 << DEFAULT_BLOCK_LOG2,
             escape_penalty: int = DEFAULT_ESCAPE_PENALTY, as_tensor: bool = False, stream=None):
    """Compress a CUDA tensor (bfloat16, float16, float32, float8_e4m3fn, float8_e5m2) into an
    ENEC stream: ``bytes`` (the same bytes :func:`enec.compress` makes for ``x.cpu()``), or
    with ``as_tensor=True`` a CUDA ``uint8`` tensor holding them (no copy to the host).

    ``dtype``, ``block_size`` and ``escape_penalty`` mean what they mean for
    :func:`enec.compress` (``dtype``, if given, must match the tensor's).
    ``stream``: a ``torch.cuda.Stream`` to run on (default: the current stream). The call
    synchronises that stream three times (histogram, payload size, block table).
    """
    torch = _torch()
    if not isinstance(x, torch.Tensor):
        raise EnecError(f"enec.gpu.compress takes a torch tensor, got {type(x).__name__}")
    name = str(x.dtype).removeprefix("torch.")
    if dtype is not None and dtype != name:
        raise EnecError(f"dtype={dtype!r} does not match the tensor's dtype {name}")
    fmt = format_for(name)
    _check_device(x, "the tensor")
    blog2 = int(block_size).bit_length() - 1
    if block_size != 1 << blog2 or not MIN_BLOCK_LOG2 <= blog2 <= MAX_BLOCK_LOG2:
        raise EnecError(f"block_size must be a power of two from 64 to 2**20, got {block_size}")
    if not isinstance(escape_penalty, int) or not 0 <= escape_penalty <= 64:
        raise EnecError(f"escape_penalty must be an integer from 0 to 64, got {escape_penalty!r}")
    K = _kernels()
    from . import cpu  # choose_params: the CPU's exact search (numba, on the host)

    dev = x.device
    shape = tuple(x.shape)
    with _stream_ctx(stream, dev):
        src = x.detach().contiguous().reshape(-1)
        flat = _int_view(src, fmt)
        numel = flat.numel()
        nb = (numel + (1 << blog2) - 1) >> blog2
        start = table_bytes(len(shape), nb)
        if nb == 0:
            head = build_header(fmt, shape, blog2, 0, np.zeros(1, np.int64), np.zeros(0, np.uint32))
            return _finish(head, None, as_tensor, dev)
        k = 1 << fmt.ebits
        c = _consts(fmt, blog2)
        h64 = _block_histograms(K, flat, fmt, blog2, nb)
        total = h64.sum(0).cpu().numpy()
        w1, b1, w2, b2 = (int(v) for v in cpu.choose_params(total, fmt.ebits, escape_penalty))
        # the block plan (enec.cpu.plan_blocks, on the device)
        idx = torch.arange(k, device=dev)
        out1 = ((idx - b1) % k) >= (1 << w1) - 1
        out2 = out1 & (((idx - b2) % k) >= min((1 << w2) - 1, k))
        n1 = (h64 * out1).sum(1)
        n2 = (h64 * out2).sum(1)
        counts = torch.full((nb,), 1 << blog2, dtype=torch.int64, device=dev)
        counts[-1] = numel - ((nb - 1) << blog2)
        pn = (counts + 63) & ~63
        coded = (16 + fmt.rest_bytes * pn + (fmt.rest_planes + w1) * (pn // 8)
                 + (n1 * w2 + 7) // 8 + n2 + 7) & ~7
        raw = (16 + counts * fmt.itemsize + 7) & ~7
        mode = coded >= raw
        offsets = torch.zeros(nb + 1, dtype=torch.int64, device=dev)
        torch.cumsum(torch.where(mode, raw, coded), 0, out=offsets[1:])
        n1c = torch.where(mode, 0, n1)
        escoff = torch.cumsum(n1c, 0) - n1c
        payload_bytes, nesc = (int(v) for v in torch.stack([offsets[-1], n1c.sum()]).cpu())
        buf = torch.empty(start + payload_bytes, dtype=torch.uint8, device=dev)
        scratch = torch.empty(max(nesc, 1), dtype=torch.uint8, device=dev)
        K.encode_kernel[(nb,)](flat, src.view(torch.uint8), numel, buf, start, offsets,
                               mode.to(torch.uint8), n1, n2, escoff, scratch, w1, b1, w2, b2,
                               PACK_TILE=PACK_TILE, **_launch_opts(), **c)
        checks = torch.empty(nb, dtype=torch.int32, device=dev)
        K.checksum_kernel[(_cdiv(nb, CHECK_GROUP),)](
            buf.view(torch.int32), start // 4, offsets, nb, checks, G=CHECK_GROUP, num_warps=NUM_WARPS)
        table = torch.cat([offsets, checks.to(torch.int64)]).cpu().numpy()
        head = build_header(fmt, shape, blog2, 0, table[: nb + 1],
                            table[nb + 1 :].astype(np.int64).astype(np.uint32))
        return _finish(head, buf, as_tensor, dev)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _finish(head: bytes, buf, as_tensor: bool, dev):
    torch = _torch()
    if buf is None:
        if not as_tensor:
            return head
        return torch.frombuffer(bytearray(head), dtype=torch.uint8).to(dev)
    buf[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
    if as_tensor:
        return buf
    return buf.cpu().numpy().tobytes()


# ------------------------------------------------------------------------------ decompress


class GpuPrepared:
    """A parsed stream with its payload and block table on the device, ready to decode again
    and again (what :func:`decompress` does on every call; keep one to skip the parsing and
    the upload)."""

    def __init__(self, data, device=None):
        torch = _torch()
        if isinstance(data, GpuPrepared):
            data = data.payload_owner
        if isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8 or data.dim() != 1:
                raise EnecError(f"a stream tensor must be 1-D uint8, got {data.dtype} {tuple(data.shape)}")
            _check_device(data, "the stream")
            dev = _norm_device(data.device)
            stream_t = data.contiguous()
            if stream_t.storage_offset() % 8 or stream_t.data_ptr() % 8:
                stream_t = stream_t.clone()
            info = _parse_device_header(stream_t)
            base, pstart = stream_t, info.payload_start
        else:
            try:
                arr = np.frombuffer(data, dtype=np.uint8)
            except (TypeError, ValueError) as exc:
                raise EnecError(f"expected a bytes-like ENEC stream or a uint8 tensor, got {type(data).__name__}") from exc
            info = parse_header(arr)
            dev = _norm_device(torch.device(device) if device is not None else _default_device())
            stream_t = None
            base, pstart = _upload(arr[info.payload_start:], dev), 0
        self.payload_owner = stream_t if stream_t is not None else data
        self.info = info
        self.fmt = info.fmt
        self.shape = info.shape
        self.numel = info.numel
        self.nblocks = info.nblocks
        self.device = dev
        self.base = base  # uint8, 8-aligned; the payload starts at byte pstart
        self.pstart = pstart
        self.offsets = torch.from_numpy(np.array(info.offsets, dtype=np.int64)).to(dev)
        self.checksums = torch.from_numpy(np.array(info.checksums, dtype=np.uint32).view(np.int32)).to(dev)

    def decode(self, out=None, *, verify: bool = True, stream=None):
        """Decode into ``out`` (or a new tensor on the stream's device); returns it."""
        torch = _torch()
        _kernels()  # EnecError now if triton/CUDA is missing
        fmt = self.fmt
        want = getattr(torch, fmt.torch_name)
        if out is None:
            out = torch.empty(self.shape, dtype=want, device=self.device)
        else:
            if not isinstance(out, torch.Tensor):
                raise EnecError(f"out must be a torch tensor, got {type(out).__name__}")
            if out.dtype != want:
                raise EnecError(f"out has dtype {out.dtype}, the stream holds {fmt.name}")
            if _norm_device(out.device) != self.device:
                raise EnecError(f"out is on {out.device}, the stream's payload is on {self.device}")
            if not out.is_contiguous() or out.numel() != self.numel:
                raise EnecError(f"out must be contiguous with {self.numel} elements, got {tuple(out.shape)}")
        if self.nblocks == 0:
            return out
        with _stream_ctx(stream, self.device):
            status = torch.empty(self.nblocks, dtype=torch.int32, device=self.device)
            got = torch.empty(self.nblocks, dtype=torch.int32, device=self.device) if verify else None
            self.launch(out, status, got)
            if verify:
                status = torch.where(got != self.checksums, 1, status)  # ST_CHECKSUM wins, as on the CPU
            nbad = int(torch.count_nonzero(status))
        if nbad:
            from .cpu import STATUS_TEXT

            st = status.cpu().numpy()
            b = int(np.flatnonzero(st)[0])
            more = f" (and {nbad - 1} more blocks)" if nbad > 1 else ""
            raise EnecError(f"corrupted ENEC stream: block {b}: {STATUS_TEXT[int(st[b])]}{more}")
        return out

    def launch(self, out, status, checks=None) -> None:
        """Queue the kernels and return without waiting: the decode kernel writes ``out`` (a
        checked, contiguous tensor) and one status code per block into ``status`` (int32);
        with ``checks`` (int32, one per block) the checksum kernel writes the blocks'
        checksums there. Nothing is compared: :meth:`decode` does that (benchmarks time this)."""
        torch = _torch()
        K = _kernels()
        flat = out.reshape(-1)
        K.decode_kernel[(self.nblocks,)](
            self.base, self.pstart, self.offsets, self.numel, _int_view(flat, self.fmt), flat.view(torch.uint8),
            status, **_launch_opts(), **_consts(self.fmt, self.info.block_log2))
        if checks is not None:
            K.checksum_kernel[(_cdiv(self.nblocks, CHECK_GROUP),)](
                self.base.view(torch.int32), self.pstart // 4, self.offsets, self.nblocks, checks,
                G=CHECK_GROUP, num_warps=NUM_WARPS)


def prepare(data, device=None) -> GpuPrepared:
    """Parse a stream (bytes-like, or a 1-D uint8 CUDA tensor) and put it on the device."""
    return GpuPrepared(data, device)


def decompress(data, out=None, *, verify: bool = True, stream=None, device=None):
    """Decode an ENEC stream on the GPU into a CUDA tensor of the original dtype and shape.

    ``data``: bytes-like (uploaded to ``device``, default the current CUDA device), a 1-D
    uint8 CUDA tensor (decoded in place, only the header and block table visit the host), or
    a :class:`GpuPrepared`. ``out``: a contiguous CUDA tensor of the stream's dtype and
    element count to fill (returned). ``verify`` checks every block's checksum. ``stream``:
    a ``torch.cuda.Stream`` to run on; the call synchronises it once to read the per-block
    status, and raises :class:`EnecError` on any malformed or corrupted block. Streams made
    from numpy arrays decode to tensors here too (bfloat16 as torch.bfloat16).
    """
    prep = data if isinstance(data, GpuPrepared) else GpuPrepared(data, device)
    return prep.decode(out, verify=verify, stream=stream)


def _upload(arr: np.ndarray, dev):
    torch = _torch()
    host = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))
    if dev.type == "cuda":
        return host.pin_memory().to(dev, non_blocking=False)
    return host


def _parse_device_header(stream_t):
    """parse_header for a stream that lives on the device: only the header and tables travel
    (the kernels check the blocks)."""
    total = int(stream_t.numel())
    head = stream_t[: min(total, HEADER.size)].cpu().numpy()
    start = min(total, header_bytes(head) if total >= HEADER.size else total)
    info = parse_header(stream_t[:start].cpu().numpy(), total=total)
    # copy what the info refers to off the host copy of the tables
    return type(info)(info.fmt, info.shape, info.numel, info.block_log2, info.nblocks, info.flags,
                      np.array(info.offsets, dtype=np.uint64), np.array(info.checksums, dtype=np.uint32),
                      info.payload_start, info.payload_bytes)
