"""Pipelined loading: read checkpoint files sequentially while decoding what has arrived.

The cold start of a serverless or autoscaled replica is bound by how fast the checkpoint
comes off storage or the network. :func:`iter_streamed` reads the files in order on a
background thread (large sequential reads, one shard after another) and hands each tensor
to the caller as soon as its bytes are in, so decoding overlaps the transfer: with ENEC the
time to a ready model approaches ``compressed size / bandwidth`` plus the decode of the last
tensor. The same function reads plain ``.safetensors`` files (no decoding), which is the
baseline the benchmark compares against.

:class:`ThrottledReader` caps a file's read bandwidth, to measure this on one machine.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numba
import numpy as np

from .checkpoint import (ALIGN, MAX_HEAD, PREFIX, ST_DTYPES, check_shards, check_stream, decode_entry,
                         head_end, parse_safetensors_header, read_checkpoint)
from .codec import check_threads, threads_set
from .errors import EnecError
from .fileio import as_path, check_count
from .format import parse_header

CHUNK = 4 << 20  # per read: fewer GIL hand-offs to the reader thread while Python code runs
PARALLEL_BYTES = 4 << 20  # decoded tensors smaller than this decode on one thread


class ThrottledReader(io.RawIOBase):
    """A binary file whose reads never run faster than ``bandwidth`` bytes per second.

    Pacing is cumulative (after ``n`` bytes at least ``n / bandwidth`` seconds have passed
    since open), so it models a link of that speed; ``None`` means unthrottled.
    """

    def __init__(self, path, bandwidth: float | None = None):
        super().__init__()
        if bandwidth is not None and bandwidth <= 0:
            raise EnecError(f"bandwidth must be positive, got {bandwidth}")
        self._f = open(path, "rb", buffering=0)
        self.bandwidth = bandwidth
        self._t0 = time.perf_counter()
        self._n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n and self.bandwidth:
            self._n += n
            ahead = self._n / self.bandwidth - (time.perf_counter() - self._t0)
            if ahead > 0:
                time.sleep(ahead)
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class _ReadAhead:
    """Reads files one after another into memory on a thread; readers wait for byte counts.

    With ``inplace``, an ``.enec`` file goes to the tail of one buffer whose head receives its
    decoded tensors (see :func:`_inplace_plan`); ``plans[i]`` then holds that arena."""

    def __init__(self, files: list[Path], opener: Callable, chunk: int, inplace: bool = False):
        self.files = files
        self.sizes = [f.stat().st_size for f in files]
        self.bufs: list[np.ndarray | None] = [None] * len(files)
        self.plans: list[_Plan | None] = [None] * len(files)
        self.got = [0] * len(files)
        self.error: BaseException | None = None
        self.finished = False  # every file read (or the reader failed)
        self.inplace = inplace
        self.cond = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._run, args=(opener, chunk), daemon=True,
                                       name="enec-read-ahead")
        self.thread.start()

    def _run(self, opener, chunk) -> None:
        try:
            for i, path in enumerate(self.files):
                size = self.sizes[i]
                with opener(path) as fh:
                    head = b""
                    if self.inplace and path.suffix == ".enec":
                        head = self._read_head(fh, path, size, chunk)
                        if head is None:
                            return
                    plan = _inplace_plan(head, size) if head else None
                    buf = plan.file if plan is not None else _anon(size)[1]
                    buf[: len(head)] = np.frombuffer(head, np.uint8)
                    got = len(head)
                    with self.cond:
                        self.bufs[i], self.plans[i], self.got[i] = buf, plan, got
                        self.cond.notify_all()
                    mv = memoryview(buf)
                    while got < size:
                        if self.stop:
                            return
                        n = fh.readinto(mv[got : got + chunk])
                        if not n:
                            raise EnecError(f"{path} ended after {got} of {size} bytes")
                        got += n
                        with self.cond:
                            self.got[i] = got
                            self.cond.notify_all()
        except BaseException as exc:  # handed to the consumer
            with self.cond:
                self.error = exc
                self.cond.notify_all()
        finally:
            self.finished = True

    def _read_head(self, fh, path, size: int, chunk: int) -> bytes | None:
        """An ``.enec`` file's first bytes, up to the end of its table and safetensors header
        (or as far as they could be told apart: the consumer reports a damaged file)."""
        head = bytearray()
        while (need := head_end(head)) is not None and len(head) < min(need, size, MAX_HEAD):
            if self.stop:
                return None
            # small reads: the table and header are small, and these copies hold the GIL
            part = bytearray(min(max(need - len(head), 64 << 10), chunk, size - len(head)))
            n = fh.readinto(part)
            if not n:
                raise EnecError(f"{path} ended after {len(head)} of {size} bytes")
            head += part[:n]
        return bytes(head)

    def wait(self, i: int, upto: int, idle: Callable[[], bool] | None = None) -> np.ndarray:
        """File ``i``'s buffer once its first ``upto`` bytes have arrived; until then
        ``idle()`` is called (one short piece of work each, False when none is left)."""
        if upto > self.sizes[i]:
            raise EnecError(f"truncated or corrupted file {self.files[i]}: needs {upto} bytes, has {self.sizes[i]}")
        if idle is not None:
            while self.got[i] < upto and self.error is None and not self.stop and idle():
                pass
        with self.cond:
            while self.got[i] < upto and self.error is None:
                self.cond.wait()
            if self.error is not None and self.got[i] < upto:
                raise self.error
            return self.bufs[i]

    def release(self, i: int) -> None:
        with self.cond:
            self.bufs[i] = self.plans[i] = None

    def close(self) -> None:
        self.stop = True
        self.thread.join()


def _anon(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """A private anonymous mapping of ``nbytes`` and a uint8 array over it (the array keeps
    the mapping alive). Huge pages are advised, as NumPy does for its large buffers: they
    fault in several times faster."""
    mm = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    return mm, np.frombuffer(mm, np.uint8)[:nbytes]


class _Faulter:
    """Page faults for the consumer's idle moments, one 2 MiB step per call.

    Fresh pages cost more than the copy into them, so while the consumer waits for bytes it
    faults in the buffer the reader fills (from ``start`` on): from the buffer's end back
    towards the reader, which, meeting it halfway, then mostly writes into pages that are
    already there. Then the pages of ``buf[ahead_from:ahead_to]`` (decode outputs not yet
    written) from the front; ``ahead_from`` is raised as outputs are written. The reader's
    part uses MADV_POPULATE_WRITE, which keeps whatever the pages hold, so racing the reader is
    harmless; where the kernel lacks it (Linux before 5.14) that part is skipped.
    """

    STEP = 2 << 20

    def __init__(self, buf: np.ndarray, start: int, reached: Callable[[], int], ahead_to: int = 0):
        self.buf, self.start, self.reached = buf, start, reached
        self.end = buf.size
        self.ahead_from, self.ahead_to = 0, ahead_to

    def step(self) -> bool:
        s = self.STEP
        if self.end - s > self.start + self.reached() + s:
            if _populate(self.buf[self.end - s : self.end]):
                self.end -= s
                return True
            self.end = 0  # not supported here
        if self.ahead_from < self.ahead_to:
            seg = self.buf[self.ahead_from : min(self.ahead_from + s, self.ahead_to)]
            if not _populate(seg):
                seg[::4096] = 0  # nothing is there yet: the decode writes outputs in order
            self.ahead_from += seg.size
            return True
        return False


class _Plan:
    """One anonymous mapping for a shard: decoded tensors at its start, the file at its tail."""

    def __init__(self, ck, offsets: list[int], total: int, base: int, size: int):
        self.ck = ck  # parsed and validated once, by the reader
        self.offsets, self.total = offsets, total
        self.nbytes = max(base + size, total)
        self.mm, whole = _anon(self.nbytes)
        self.arena = whole[:total]
        self.file = whole[base : base + size]
        self.whole = whole[: base + size]  # up to the file's end
        self.base = base

    def trim(self) -> None:
        """Give back the pages past the decoded tensors once the shard is done."""
        start = -(-self.total // mmap.PAGESIZE) * mmap.PAGESIZE
        if start < self.nbytes:
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, start, self.nbytes - start)
            except (AttributeError, OSError):
                pass


_MADV_POPULATE_WRITE = 23
_LIBC = None


def _populate(view: np.ndarray) -> bool:
    """madvise(MADV_POPULATE_WRITE) over ``view``'s whole pages, outside the GIL (ctypes
    releases it); False where the kernel or platform cannot."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    page = mmap.PAGESIZE
    start = view.ctypes.data // page * page
    end = -(-(view.ctypes.data + view.size) // page) * page
    if end <= start:
        return True
    if _LIBC.madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
        _LIBC = False  # not supported here: stop trying
        return False
    return True


def _inplace_plan(head: bytes, size: int) -> _Plan | None:
    """Where an ``.enec`` file goes so that its tensors decode into the same buffer.

    Tensor ``i`` decodes to ``offsets[i]`` (the order of the file) from its stream at
    ``base + e.offset``. ``base`` is the least (64-aligned) with ``offsets[i] + raw_i <= base +
    e.offset`` for every tensor, so an output never reaches a stream that is still to be
    decoded or still arriving; the mapping then needs about ``size`` plus the largest
    tensor's compressed size beyond the decoded bytes, instead of ``size`` more, and the file
    shares pages with the output. None when the table is unreadable (the consumer reports it)."""
    try:
        ck = read_checkpoint(head, size)
    except EnecError:
        return None
    raws = [st.end - st.start for st in ck.layout.entries]
    offsets, total = _offsets(raws)
    base = max([0] + [o + n - e.offset for o, n, e in zip(offsets, raws, ck.entries)])
    return _Plan(ck, offsets, total, base + -base % ALIGN, size)


def _iter_enec(ra: _ReadAhead, i: int, threads, keep) -> Iterator[tuple[str, object]]:
    import torch

    path = ra.files[i]
    buf = ra.wait(i, PREFIX.size)
    plan = ra.plans[i]  # set with the buffer: the reader has parsed the table already
    if plan is not None:
        ck = plan.ck
    else:
        while (need := head_end(buf[: ra.got[i]])) is not None:
            buf = ra.wait(i, need)
        ck = read_checkpoint(buf, ra.sizes[i], str(path))
    dtypes = [getattr(torch, ST_DTYPES[st.dtype][2]) for st in ck.layout.entries]
    kept = [keep is not None and e.codec == "enec" and keep(e.name, dt, st.shape)
            for e, st, dt in zip(ck.entries, ck.layout.entries, dtypes)]
    reached = lambda: ra.got[i]  # noqa: E731
    if plan is not None and not any(kept):
        arena, offsets = plan.arena, plan.offsets
        faulter = _Faulter(plan.whole, plan.base, reached, ahead_to=plan.base)
    else:
        plan = None
        arena, offsets = _arena([st.end - st.start for st, k in zip(ck.layout.entries, kept) if not k])
        faulter = _Faulter(buf, 0, reached)
    slots = iter(offsets)
    every = threads if threads is not None else numba.get_num_threads()
    for e, st, dtype, k in zip(ck.entries, ck.layout.entries, dtypes, kept):
        ra.wait(i, e.offset + e.length, faulter.step)
        if k:
            stream = buf[e.offset : e.offset + e.length]  # a view: the shard buffer stays alive
            check_stream(parse_header(stream), e, st)  # its own dtype and shape are the header's
            yield e.name, stream
            continue
        off = next(slots)
        flat = arena[off : off + st.end - st.start]
        cold = faulter.ahead_from < min(off + flat.size, faulter.ahead_to)  # pages not faulted in yet
        faulter.ahead_from = max(faulter.ahead_from, off + flat.size)  # the decode faults these
        if flat.size:
            # Small tensors decode on one thread: waking an OpenMP team costs more than they
            # do, and on a busy machine a woken worker can be late by milliseconds. While the
            # reader still copies bytes in, it keeps a core: one decoder thread fewer (the
            # decode outpaces any link it waits on, and an idle team's spinning workers would
            # slow the reader), unless the output's pages are not faulted in yet: first
            # writes to fresh pages can cost more than the decode, and they go faster spread
            # over every core.
            n = 1 if flat.size < PARALLEL_BYTES else every if ra.finished or cold else max(1, every - 1)
            with threads_set(n):
                decode_entry(buf, e, st, flat, None)
        yield e.name, torch.from_numpy(flat).view(dtype).reshape(st.shape)
    if plan is not None:
        plan.trim()


def _offsets(sizes: list[int]) -> tuple[list[int], int]:
    """64-byte-aligned offsets for tensors of ``sizes`` bytes laid out in order, and the total."""
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // 64) * 64
    return offsets, total


def _arena(sizes: list[int]) -> tuple[np.ndarray, list[int]]:
    """One buffer for a shard's decoded tensors (64-byte aligned slices) and their offsets,
    its pages touched now (huge pages advised, see :func:`_anon`, so faulting it in costs a
    fraction of what first writes to many separate tensors cost), while the first compressed
    bytes are still arriving."""
    offsets, total = _offsets(sizes)
    arena = _anon(total)[1]  # page-aligned
    arena[::4096] = 0
    return arena, offsets


def _iter_safetensors(ra: _ReadAhead, i: int) -> Iterator[tuple[str, object]]:
    import torch

    buf = ra.wait(i, 8)
    n = int(np.frombuffer(buf[:8].tobytes(), "<u8")[0])
    buf = ra.wait(i, min(8 + n, ra.sizes[i]))
    layout = parse_safetensors_header(buf, ra.sizes[i], str(ra.files[i]))
    faulter = _Faulter(buf, 0, lambda: ra.got[i])
    for e in layout.entries:
        buf = ra.wait(i, e.end, faulter.step)
        dtype = getattr(torch, ST_DTYPES[e.dtype][2])
        if e.end == e.start:
            yield e.name, torch.empty(e.shape, dtype=dtype)
            continue
        yield e.name, torch.frombuffer(buf[e.start : e.end], dtype=dtype).reshape(e.shape)


def iter_streamed(files, *, opener: Callable | None = None, threads: int | None = None,
                  keep: Callable | None = None, chunk: int = CHUNK) -> Iterator[tuple[str, object]]:
    """Yield ``(name, tensor)`` from ``.enec`` / ``.safetensors`` files while they are read.

    Reading starts at once, on one background thread, in the given order (``opener(path)``
    returns a binary file object; default :func:`open`), so the caller can build its model
    meanwhile and iterate later; each tensor is yielded as soon as its bytes are in.
    Safetensors tensors alias the read buffer (no copy); the decoded tensors of an ENEC file
    are slices of one buffer per file. ``keep(name, dtype, shape)`` returns ENEC tensors as
    their raw stream instead, a uint8 array viewing the file's read buffer (no copy; see
    :func:`enec.hf.iter_tensors`). Reading stops when the iterator is closed or dropped.
    """
    if isinstance(files, (str, bytes, os.PathLike)) or not isinstance(files, Iterable):
        raise EnecError(f"files must be a list of paths, got {type(files).__name__}")
    files = [as_path(f, "file") for f in files]
    check_count(chunk, "chunk")
    check_threads(threads)
    if keep is not None and not callable(keep):
        raise EnecError(f"keep must be callable, got {type(keep).__name__}")
    for f in files:
        if not f.is_file():
            raise EnecError(f"no such file: {f}")
        if f.suffix not in (".enec", ".safetensors"):
            raise EnecError(f"cannot stream {f}: expected .enec or .safetensors")
    ra = _ReadAhead(files, opener or (lambda p: open(p, "rb", buffering=0)), chunk, inplace=keep is None)
    gen = _stream(ra, files, threads, keep)
    weakref.finalize(gen, setattr, ra, "stop", True)  # never iterated: the reader still stops
    return gen


def _stream(ra: _ReadAhead, files: list[Path], threads, keep) -> Iterator[tuple[str, object]]:
    try:
        for i, f in enumerate(files):
            if f.suffix == ".enec":
                yield from _iter_enec(ra, i, threads, keep)
                ra.release(i)  # decoded tensors are copies; kept streams hold their own view
            else:
                yield from _iter_safetensors(ra, i)  # tensors alias the read buffer
    finally:
        ra.close()


def shard_files(folder) -> list[Path]:
    """Checkpoint files of a model folder in load order: ``.enec`` if any, else ``.safetensors``."""
    folder = as_path(folder, "folder")
    if not folder.is_dir():
        raise EnecError(f"no such folder: {folder}")
    for suffix in (".enec", ".safetensors"):
        files = sorted(folder.glob("*" + suffix))
        if files:
            check_shards(folder, suffix)
            return files
    raise EnecError(f"{folder} holds no .enec or .safetensors checkpoint")


__all__ = ["ThrottledReader", "iter_streamed", "shard_files"]
