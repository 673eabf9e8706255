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
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .checkpoint import PREFIX, ST_DTYPES, _decode_entry, parse_safetensors_header, read_checkpoint
from .codec import threads_set
from .errors import EnecError

CHUNK = 4 << 20  # per read: fewer GIL hand-offs to the reader thread while Python code runs


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
    """Reads files one after another into memory on a thread; readers wait for byte counts."""

    def __init__(self, files: list[Path], opener: Callable, chunk: int):
        self.files = files
        self.sizes = [f.stat().st_size for f in files]
        self.bufs: list[np.ndarray | None] = [None] * len(files)
        self.got = [0] * len(files)
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._run, args=(opener, chunk), daemon=True,
                                       name="enec-read-ahead")
        self.thread.start()

    def _run(self, opener, chunk) -> None:
        try:
            for i, path in enumerate(self.files):
                buf = np.empty(self.sizes[i], np.uint8)
                with self.cond:
                    self.bufs[i] = buf
                mv = memoryview(buf)
                got = 0
                with opener(path) as fh:
                    while got < self.sizes[i]:
                        if self.stop:
                            return
                        n = fh.readinto(mv[got : got + chunk])
                        if not n:
                            raise EnecError(f"{path} ended after {got} of {self.sizes[i]} bytes")
                        got += n
                        with self.cond:
                            self.got[i] = got
                            self.cond.notify_all()
        except BaseException as exc:  # handed to the consumer
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def wait(self, i: int, upto: int) -> np.ndarray:
        """File ``i``'s buffer once its first ``upto`` bytes have arrived."""
        if upto > self.sizes[i]:
            raise EnecError(f"truncated or corrupted file {self.files[i]}: needs {upto} bytes, has {self.sizes[i]}")
        with self.cond:
            while self.got[i] < upto and self.error is None:
                self.cond.wait()
            if self.error is not None and self.got[i] < upto:
                raise self.error
            return self.bufs[i]

    def release(self, i: int) -> None:
        with self.cond:
            self.bufs[i] = None

    def close(self) -> None:
        self.stop = True
        self.thread.join()


def _iter_enec(ra: _ReadAhead, i: int, threads, keep) -> Iterator[tuple[str, object]]:
    import torch

    path = ra.files[i]
    buf = ra.wait(i, PREFIX.size)
    jlen = struct.unpack_from("<Q", buf, PREFIX.size - 8)[0]
    buf = ra.wait(i, min(PREFIX.size + jlen, ra.sizes[i]))
    try:  # the table says where the embedded safetensors header lies; read_checkpoint validates
        hoff, hlen = json.loads(bytes(buf[PREFIX.size : PREFIX.size + jlen]))["source"]["safetensors_header"]
        ra.wait(i, int(hoff) + int(hlen))
    except (ValueError, KeyError, TypeError):
        pass  # read_checkpoint reports the damage
    ck = read_checkpoint(buf, ra.sizes[i], str(path))
    dtypes = [getattr(torch, ST_DTYPES[st.dtype][2]) for st in ck.layout.entries]
    kept = [keep is not None and e.codec == "enec" and keep(e.name, dt, st.shape)
            for e, st, dt in zip(ck.entries, ck.layout.entries, dtypes)]
    arena, offsets = _arena([st.end - st.start for st, k in zip(ck.layout.entries, kept) if not k])
    slots = iter(offsets)
    for e, st, dtype, k in zip(ck.entries, ck.layout.entries, dtypes, kept):
        ra.wait(i, e.offset + e.length)
        if k:
            yield e.name, buf[e.offset : e.offset + e.length]  # a view: the shard buffer stays alive
            continue
        off = next(slots)
        flat = arena[off : off + st.end - st.start]
        if flat.size:
            with threads_set(threads):
                _decode_entry(buf, e, st, flat, None)
        yield e.name, torch.from_numpy(flat).view(dtype).reshape(st.shape)


def _arena(sizes: list[int]) -> tuple[np.ndarray, list[int]]:
    """One buffer for a shard's decoded tensors (64-byte aligned slices) and their offsets,
    its pages touched now. One large NumPy allocation gets transparent huge pages (NumPy
    advises them), so faulting it in costs a fraction of what first writes to many separate
    tensors cost, and this happens while the first compressed bytes are still arriving."""
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // 64) * 64
    raw = np.empty(total + 64, np.uint8)
    start = -raw.ctypes.data % 64
    arena = raw[start : start + total]
    arena[::4096] = 0
    return arena, offsets


def _iter_safetensors(ra: _ReadAhead, i: int) -> Iterator[tuple[str, object]]:
    import torch

    buf = ra.wait(i, 8)
    n = int(np.frombuffer(buf[:8].tobytes(), "<u8")[0])
    buf = ra.wait(i, min(8 + n, ra.sizes[i]))
    layout = parse_safetensors_header(buf, ra.sizes[i], str(ra.files[i]))
    for e in layout.entries:
        buf = ra.wait(i, e.end)
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
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise EnecError(f"no such file: {f}")
        if f.suffix not in (".enec", ".safetensors"):
            raise EnecError(f"cannot stream {f}: expected .enec or .safetensors")
    ra = _ReadAhead(files, opener or (lambda p: open(p, "rb", buffering=0)), chunk)
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
    folder = Path(folder)
    if not folder.is_dir():
        raise EnecError(f"no such folder: {folder}")
    for pattern in ("*.enec", "*.safetensors"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise EnecError(f"{folder} holds no .enec or .safetensors checkpoint")


__all__ = ["ThrottledReader", "iter_streamed", "shard_files"]
