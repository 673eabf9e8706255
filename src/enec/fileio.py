"""File I/O for the checkpoint tools: bounded buffers, a reader and a writer thread, and an
output that is either complete under its final name or not there at all.

* :class:`Input` reads with ``pread`` into caller buffers. A file that ends early (truncated
  while it is read) is an :class:`EnecError`, never a signal: nothing here maps a file.
* :class:`Output` writes a hidden temporary file (or folder) beside the target and renames it
  over the target only when the caller's block ends without an error. It never replaces a
  directory; it removes its temporary file on any exception, on a write error such as a full
  filesystem (one :class:`EnecError` line), and on SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 and
  SIGALRM (while their handlers are the default ones: the signal raises :class:`Terminated`
  in the main thread, which unwinds through every open :class:`Output`; one that Python
  swallows inside a callback is raised again at the next write or at the commit). The finished output
  gets the permission bits of its source.
* :class:`Pipeline` runs a reader thread (``pread`` into a fixed set of input buffers), the
  caller's codec in the calling thread, and a writer thread (``pwrite`` from a fixed set of
  output buffers), so reading, coding and writing overlap and memory is bounded by the
  buffers, whatever the file size. The codec kernels release the GIL.
"""

from __future__ import annotations

import errno
import gc
import os
import queue
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import EnecError

DEFAULT_BUFFER_BYTES = 32 << 20
SLOTS = 3  # buffers per side (reader -> codec, codec -> writer), plus one per worker
# Buffers larger than a core's L2 cache made the writer's copies into the page cache (and
# the hasher's reads) go to DRAM: with 6.4 MiB buffers `enec decompress` of a 2 GB file spent
# 2.7-3.3 s in the kernel, with 1-2 MiB buffers 0.5-0.9 s (2-core VM, 2 MiB L2 per core).
MAX_SLOT = 3 << 19  # 1.5 MiB
WRITE_CHUNK = 128 << 10  # bytes per write call (see Output.pwrite)
ALIGN = 64  # buffers hold file bytes at the same offset mod ALIGN as in the file


def parse_size(text: str | int) -> int:
    """``"64M"``, ``"1G"``, ``"512k"`` or a plain byte count, as bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise EnecError(f"not a size: {text!r} (e.g. 64M, 1G, 1048576)") from None
    if not 0 < value < float(1 << 62):  # NaN and infinity included
        raise EnecError(f"size must be a positive number of bytes below 2**62, got {text!r}")
    return int(value * scale)


def as_path(value, what: str = "path") -> Path:
    """``value`` (str, bytes or os.PathLike) as a Path; anything else is an :class:`EnecError`."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise EnecError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")
    try:
        path = Path(value)
    except TypeError as exc:  # an os.PathLike whose __fspath__ returns something else
        raise EnecError(f"{what} must be a path: {exc}") from None
    if "\0" in str(path):
        raise EnecError(f"{what} contains a NUL byte: {str(path)!r}")
    return path


def check_count(value, what: str, low: int = 1) -> int:
    """``value`` as an int of at least ``low`` (bools and other types are an :class:`EnecError`)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise EnecError(f"{what} must be an integer of at least {low}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------ input


class Input:
    """A file opened for ``pread``; ``size`` and permission ``mode`` are taken at open."""

    def __init__(self, path: Path, sequential: bool = True):
        self.path = as_path(path)
        self.fd = -1
        if self.path.is_dir():
            raise EnecError(f"{self.path} is a directory, not a file")
        try:  # non-blocking: opening a FIFO must not wait for a writer
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise EnecError(f"no such file: {self.path}") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            self.close()
            raise EnecError(f"{self.path} is not a regular file")
        os.set_blocking(self.fd, True)
        self.size = st.st_size
        self.mode = st.st_mode & 0o777
        if sequential and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read_into(self, view, offset: int) -> None:
        """Fill ``view`` (a writable buffer) with the bytes at ``offset``."""
        mv = memoryview(view).cast("B")
        got = 0
        while got < len(mv):
            n = os.preadv(self.fd, [mv[got:]], offset + got)
            if n == 0:
                raise EnecError(f"{self.path} was truncated while being read: it ends at {offset + got} bytes, "
                                f"{self.size} were expected")
            got += n

    def read(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.read_into(buf, offset)
        return bytes(buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def drop_cache(path) -> None:
    """Ask the kernel to drop ``path``'s clean pages from the page cache (its dirty pages are
    written first), so the next read comes from the storage device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ signals


class Terminated(BaseException):
    """Raised in the main thread by a terminating signal while an :class:`Output` is open."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


CLEANUP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
                        if hasattr(signal, n))
_SIGNAL_DEPTH = 0
_SAVED: dict = {}
_PENDING = 0  # the last terminating signal raised as Terminated, until it ends an Output
_SAVED_HOOK = None


def _raise_terminated(signum, frame):
    global _PENDING
    _PENDING = signum
    raise Terminated(signum)


def _unraisable(info) -> None:
    """``sys.unraisablehook`` while signals are held: a Terminated raised inside a callback
    Python ignores (a weakref callback of the import machinery, a ``__del__``) is kept quiet;
    ``_PENDING`` remembers it and the Output's next write or its commit raises it again (before:
    such a signal was printed as 'Exception ignored in ...' and the command finished, exit 0)."""
    global _PENDING
    if isinstance(info.exc_value, KeyboardInterrupt):  # Ctrl-C swallowed the same way
        _PENDING = signal.SIGINT
    elif not isinstance(info.exc_value, Terminated):
        (_SAVED_HOOK or sys.__unraisablehook__)(info)


def check_terminated() -> None:
    """Raise :class:`Terminated` again for a terminating signal whose first raise was swallowed
    (main thread only: writer threads leave it to the commit)."""
    global _PENDING
    if _PENDING and threading.current_thread() is threading.main_thread():
        signum, _PENDING = _PENDING, 0
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)


def _hold_signals() -> None:
    """Turn terminating signals into :class:`Terminated` (main thread, default handlers only)."""
    global _SIGNAL_DEPTH, _SAVED_HOOK, _PENDING
    if threading.current_thread() is not threading.main_thread():
        return
    if _SIGNAL_DEPTH == 0:
        _PENDING = 0
        for s in CLEANUP_SIGNALS:
            if signal.getsignal(s) is signal.SIG_DFL:
                _SAVED[s] = signal.signal(s, _raise_terminated)
        if _SAVED:
            _SAVED_HOOK, sys.unraisablehook = sys.unraisablehook, _unraisable
    _SIGNAL_DEPTH += 1


def _release_signals() -> None:
    global _SIGNAL_DEPTH, _SAVED_HOOK, _PENDING
    if threading.current_thread() is not threading.main_thread() or _SIGNAL_DEPTH == 0:
        return
    _SIGNAL_DEPTH -= 1
    if _SIGNAL_DEPTH == 0:
        for s, old in _SAVED.items():
            signal.signal(s, old)
        if _SAVED and sys.unraisablehook is _unraisable:
            sys.unraisablehook = _SAVED_HOOK
        _SAVED.clear()
        _SAVED_HOOK, _PENDING = None, 0


# ------------------------------------------------------------------------------ output


class Output:
    """``with Output(path, force=..., mode=...) as out:`` write ``out.tmp`` (a file, open as
    ``out.fd``; or a folder with ``folder=True``); on a clean exit it is renamed to ``path``.

    An existing ``path`` is an error unless ``force``, and even then only a file (or a symlink)
    is replaced, never a directory. ``mode``: permission bits of the result (default 0o644
    less the umask, like any new file).
    """

    def __init__(self, path, *, force: bool = False, mode: int | None = None, folder: bool = False):
        self.path = as_path(path, "output")
        if self.path.name in ("", ".", ".."):
            raise EnecError(f"{path} is a directory: an output never replaces a directory (name a file)")
        self.force, self.mode, self.folder = force, mode, folder
        self.tmp = self.path.with_name(f".{self.path.name}.enec-tmp-{os.getpid()}")
        self.fd = -1

    def _check_target(self) -> None:
        p = self.path
        if p.is_dir() and not p.is_symlink():
            raise EnecError(f"{p} is a directory: an output never replaces a directory "
                            "(name a file, or remove the directory first)")
        if (p.exists() or p.is_symlink()) and not self.force:
            raise EnecError(f"{p} exists (use --force / force=True to overwrite)")
        if p.exists() and not p.is_file():
            raise EnecError(f"{p} is not a regular file: an output never replaces a device, FIFO or socket")
        if not p.parent.is_dir():
            raise EnecError(f"no such folder: {p.parent}")

    def __enter__(self) -> Output:
        self._check_target()
        _hold_signals()
        try:
            if self.folder:
                os.mkdir(self.tmp, 0o700)
            else:
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            _release_signals()
            raise EnecError(f"{self.tmp} exists: another enec process writes {self.path}?") from None
        except BaseException:  # e.g. a signal right after the temporary was made: remove it
            try:
                self._discard()
            finally:
                _release_signals()
            raise
        return self

    def pwrite(self, data, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (short writes continue; errors are one line),
        in calls of at most :data:`WRITE_CHUNK` bytes: on ext4 a 2 GB file written in
        1.5 MiB calls took 2.3-2.7 s of kernel time, in 128 KiB calls 0.8 s (2-core VM)."""
        check_terminated()
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            try:
                n = os.pwrite(self.fd, mv[done : done + WRITE_CHUNK], offset + done)
            except OSError as exc:
                raise write_error(self.path, exc) from None
            if n <= 0:
                raise write_error(self.path, OSError(errno.EIO, "short write"))
            done += n

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise write_error(self.path, exc) from None

    def _finish(self) -> None:
        if self.folder:
            os.chmod(self.tmp, self.mode if self.mode is not None else 0o777 & ~_umask())
        else:
            os.fchmod(self.fd, self.mode if self.mode is not None else 0o666 & ~_umask())
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)  # a network filesystem reports write errors here
            except OSError as exc:
                raise write_error(self.path, exc) from None
        self._check_target()  # still not a directory (or a new file, without force)
        check_terminated()
        os.replace(self.tmp, self.path)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                try:
                    self._finish()
                except BaseException:
                    self._discard()
                    raise
            else:
                self._discard()
        finally:
            _release_signals()

    def _discard(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if self.tmp.is_dir() and not self.tmp.is_symlink():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_error(path: Path, exc: OSError) -> EnecError:
    if exc.errno == errno.ENOSPC:
        return EnecError(f"cannot write {path}: no space left on the device (nothing was left behind)")
    if exc.errno == errno.EDQUOT:
        return EnecError(f"cannot write {path}: disk quota exceeded (nothing was left behind)")
    return EnecError(f"cannot write {path}: {exc.strerror or exc}")


# ------------------------------------------------------------------------------ pipeline


def slot_bytes(buffer_bytes: int, floor: int, workers: int = 1) -> int:
    """Bytes per buffer when at most ``buffer_bytes`` is shared by the ``2 * (SLOTS +
    workers)`` buffers of a :class:`Pipeline`, and at most :data:`MAX_SLOT`; at least
    ``floor`` (the largest indivisible piece of work), rounded up to a page."""
    buffer_bytes = check_count(buffer_bytes, "buffer_bytes")
    size = max(min(buffer_bytes // (2 * (SLOTS + workers)), MAX_SLOT), int(floor), 1 << 16)
    return -(-size // 4096) * 4096


class _Slots:
    """A fixed number of reusable byte buffers, each allocated and faulted in when first
    needed and then reused: fresh pages cost more than the copies into them, and a large
    allocation gets fresh pages each time."""

    def __init__(self, count: int, size: int, stop: threading.Event):
        self.size = size
        self.count = count
        self.free: list[np.ndarray] = []
        self.made = 0
        self.cond = threading.Condition()
        self.stop = stop
        self.users: dict[int, int] = {}

    def _new(self) -> np.ndarray:
        raw = np.empty(self.size + 2 * ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        buf = raw[start : start + self.size + ALIGN]  # ALIGN-aligned, with room for a lead
        buf[::4096] = 0
        return buf

    def get(self) -> np.ndarray:
        with self.cond:
            while not self.free and self.made >= self.count:
                if self.stop.is_set():
                    raise _Stopped
                self.cond.wait(0.1)
            if self.free:
                buf = self.free.pop()
            else:
                self.made += 1
                buf = self._new()
            self.users[id(buf)] = 1
            return buf

    def share(self, buf: np.ndarray) -> None:
        """One more user of ``buf``: it is free again after one more :meth:`put`."""
        with self.cond:
            self.users[id(buf)] += 1

    def put(self, buf: np.ndarray) -> None:
        with self.cond:
            self.users[id(buf)] -= 1
            if not self.users[id(buf)]:
                self.free.append(buf)
                self.cond.notify()


class _Stopped(Exception):
    """The pipeline is shutting down (a thread that sees it just ends)."""


_END = object()


class Pipeline:
    """A reader thread, ``workers`` coding threads, a writer thread and a hashing thread over
    reusable buffers.

    ``produce(pipe)`` runs on the reader thread and yields work items, filling input buffers
    from :meth:`input` (and handing views to :meth:`hash` when the input is to be hashed).
    :meth:`run` hands each item, with an output buffer when there is an output, to
    ``work(item, outbuf)`` on a pool of worker threads (each runs the codec kernels
    single-threaded: independent pieces on separate cores scale on a busy machine, where one
    parallel kernel's threads would wait for each other at every barrier), and passes the
    results, in item order, to ``commit(item, result)`` on the calling thread, which queues
    writes with :meth:`write`; the writer thread performs them in that order. ``hasher``
    (e.g. ``sha256().update``) runs on its own thread over the views given to :meth:`hash`
    or written with ``hashed=True``, in order. An error in any thread is raised in the
    caller, and leaving the ``with`` block stops every thread.
    """

    def __init__(self, produce: Callable[[Pipeline], Iterable], slot: int, out: Output | None = None,
                 workers: int = 1, hasher: Callable | None = None):
        self.stop = threading.Event()
        self.slot = slot
        self.inputs = _Slots(SLOTS + workers, slot, self.stop)
        self.outputs = _Slots(SLOTS + workers, slot, self.stop) if out is not None else None
        self.window = SLOTS + workers - 1  # items in flight between submit and commit
        self.ready: queue.Queue = queue.Queue()
        self.writes: queue.Queue = queue.Queue()
        self.hashes: queue.Queue = queue.Queue()
        self.out = out
        self.hasher = hasher
        self.errors: list[BaseException] = []
        self.workers = max(1, int(workers))
        self.pool = None
        self.threads = [threading.Thread(target=self._read, args=(produce,), name="enec-reader", daemon=True)]
        if out is not None:
            self.threads.append(threading.Thread(target=self._drain, args=(self.writes, self._pwrite),
                                                 name="enec-writer", daemon=True))
        if hasher is not None:
            self.threads.append(threading.Thread(target=self._drain, args=(self.hashes, hasher),
                                                 name="enec-hasher", daemon=True))

    def __enter__(self) -> Pipeline:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="enec-codec")
        for t in self.threads:
            t.start()
        return self

    def _read(self, produce) -> None:
        try:
            for item in produce(self):
                self.ready.put(item)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the caller
            self.errors.append(exc)
        finally:
            self.ready.put(_END)

    def _pwrite(self, view, offset) -> None:
        self.out.pwrite(view, offset)

    def _drain(self, jobs: queue.Queue, fn: Callable) -> None:
        """Run ``fn(*args)`` for the jobs of ``jobs`` in order; give their buffers back."""
        while True:
            job = jobs.get()
            if job is _END:
                return
            args, slots, buf = job
            try:
                if not self.errors and not self.stop.is_set():
                    fn(*args)
            except BaseException as exc:
                self.errors.append(exc)
                self.stop.set()
            finally:
                if buf is not None:
                    slots.put(buf)

    def _raise(self) -> None:
        if self.errors:
            raise self.errors[0]

    def input(self) -> np.ndarray:
        """A free input buffer (reader thread; blocks until one is free)."""
        return self.inputs.get()

    def done_with(self, buf: np.ndarray) -> None:
        """Give an input buffer back."""
        self.inputs.put(buf)

    def hash(self, view, buf: np.ndarray) -> None:
        """Queue input ``view`` (in input buffer ``buf``) for the hasher."""
        self.inputs.share(buf)
        self.hashes.put(((view,), self.inputs, buf))

    def _items(self) -> Iterator:
        while True:
            self._raise()
            item = self.ready.get()
            if item is _END:
                self._raise()
                return
            yield item

    def _output(self) -> np.ndarray:
        while True:
            self._raise()
            try:
                return self.outputs.get()
            except _Stopped:
                continue

    def run(self, work: Callable, commit: Callable) -> None:
        """Code every item (see the class docstring) and wait for every write and hash."""
        from collections import deque

        pending: deque = deque()

        def settle_oldest():
            item, fut = pending.popleft()
            commit(item, fut.result())

        if gc.isenabled():  # the objects here are not cyclic; full collections over the
            gc.disable()  # imported modules' objects cost more than the codec on small pieces
            self._gc = True
        for item in self._items():
            while len(pending) >= self.window or (pending and pending[0][1].done()):
                settle_oldest()
            outbuf = self._output() if self.outputs is not None else None
            pending.append((item, self.pool.submit(work, item, outbuf)))
        while pending:
            settle_oldest()
        self._join()
        self._raise()

    def _join(self) -> None:
        if self.out is not None:
            self.writes.put(_END)
        if self.hasher is not None:
            self.hashes.put(_END)
        for t in self.threads[1:]:
            t.join()

    def write(self, view, offset: int, buf: np.ndarray | None = None, hashed: bool = False) -> None:
        """Queue ``view`` to be written at ``offset`` (and hashed, with ``hashed``); ``buf``
        (the output buffer it views) goes back to the free set afterwards."""
        self._raise()
        if hashed:
            if buf is not None:
                self.outputs.share(buf)
            self.hashes.put(((view,), self.outputs, buf))
        self.writes.put(((view, offset), self.outputs, buf))

    def __exit__(self, *exc):
        if getattr(self, "_gc", False):
            gc.enable()
        self.stop.set()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if any(t.is_alive() for t in self.threads[1:]):
            self._join()
        while self.threads[0].is_alive():
            try:  # unblock a reader waiting to hand over an item
                while True:
                    self.ready.get_nowait()
            except queue.Empty:
                pass
            self.threads[0].join(0.05)


def lead(offset: int) -> int:
    """Where the byte at file ``offset`` goes in a buffer: same offset modulo :data:`ALIGN`,
    so every aligned tensor or stream in the file is aligned in memory too."""
    return offset % ALIGN


__all__ = ["DEFAULT_BUFFER_BYTES", "Input", "Output", "Pipeline", "Terminated", "drop_cache", "parse_size"]
