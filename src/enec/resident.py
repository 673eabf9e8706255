"""Compressed-resident inference: large weights stay ENEC streams in memory and are decoded
just in time, into a bounded pool of buffers, by a background thread that runs ahead of the
forward pass.

Works on any ``nn.Module``: every ``nn.Linear`` / ``nn.Embedding`` (subclasses included)
whose weight is big enough is managed, with no per-architecture table.

* Linear layers get their weight decoded into a pooled buffer by a forward pre-hook and
  handed back by a forward hook. Plain ``nn.Linear`` layers whose weight is larger than
  ``chunk_bytes`` (an LM head) are computed in row chunks instead, each chunk decoded while
  the previous one multiplies, so no buffer ever holds the whole matrix.
* Embeddings decode only the ENEC blocks that hold the requested rows: a pre-hook gathers
  those rows into a small table and renumbers the indices, so the module's own forward
  (scaling subclasses included) runs unchanged.
* Tied weights (an LM head sharing the embedding) are stored once.
* The order in which weights are used is learnt on the first forward pass; afterwards a
  single background thread decodes the next weights while the current layer computes, as
  far ahead as the buffer budget allows (cyclically, so the next step's first layers are
  prepared while the LM head runs). By default this prefetching is on only where a core is
  left over beside torch's threads; otherwise each weight is decoded just before use with
  all cores (see :func:`auto_prefetch`).

Outputs are bit-identical to the uncompressed model: the decoded weights are the original
bits. One caveat: a chunked product equals the full one only if the BLAS library sums each
output in the same order for a slice of the rows. Chunks are therefore a multiple of 256
rows, which matched the full product exactly for every bf16 and fp32 case we tested
(PyTorch's CPU BLAS; the tests compare real models). ``chunk_bytes=0`` turns chunking off:
every weight is then decoded whole, and the buffer must hold the largest one.

Between calls a managed parameter is a zero-stride placeholder of the right shape, dtype
and device (so ``model.device``, ``model.dtype`` and parameter counts stay right); do not
cast or move a resident model, and use :meth:`ResidentModel.restore` to get ordinary
weights back.

A compressed folder loads straight into this form with :func:`enec.hf.load_resident`
(``enec.from_pretrained(path, resident=True)``); what this module shares with its GPU twin
(:mod:`enec.gpu_resident`) lives in :mod:`enec.resident_base`.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .codec import Prepared, compress
from .errors import EnecError
from .resident_base import DEFAULT_MIN_NUMEL, compress_in_place, managed_weights, other_bytes, restore_weights

DEFAULT_BUFFER_BYTES = 8 << 20
DEFAULT_CHUNK_BYTES = 2 << 20
# BLAS libraries may pick another kernel (another summation order) for an odd number of output
# columns; chunks of a multiple of 256 rows gave results identical to the full product for
# every bf16 and fp32 shape we tried (the tests check the real models), odd sizes did not.
CHUNK_ROW_MULTIPLE = 256
_GAP_BLOCKS = 4  # embedding rows whose blocks are this close are decoded in one call


def _torch():
    import torch

    return torch


# ------------------------------------------------------------------------------ weights


class CompressedWeight:
    """One weight held as an ENEC stream (header parsed once), decodable by row ranges.

    The block checksums are verified once, here (``verified=True`` skips that for a stream
    this process has just made); decodes then skip them, since the stream sits unchanged
    in memory and is decoded on every forward pass.
    """

    def __init__(self, stream, name: str = "", *, verified: bool = False):
        torch = _torch()
        self.stream = stream
        self.prep = Prepared(stream)
        if not verified:
            try:
                self.prep.check()
            except EnecError as e:
                raise EnecError(f"{name or 'weight'}: {e}") from None
        self.name = name
        self.shape = tuple(self.prep.shape)
        if not self.shape:
            raise EnecError(f"{name or 'weight'}: a scalar cannot be a resident weight")
        self.dtype = getattr(torch, self.prep.fmt.torch_name)
        self.itemsize = self.prep.fmt.itemsize
        self.rows = self.shape[0]
        self.cols = math.prod(self.shape[1:])
        self.numel = self.prep.numel
        self.nbytes = len(memoryview(stream).cast("B"))
        self.original_bytes = self.numel * self.itemsize

    @classmethod
    def from_tensor(cls, t, name: str = "", threads: int | None = None) -> "CompressedWeight":
        return cls(compress(t.detach().cpu(), threads=threads), name, verified=True)

    def placeholder(self):
        """A zero-stride stand-in with this weight's shape and dtype (2 bytes of storage)."""
        torch = _torch()
        return torch.nn.Parameter(torch.zeros((), dtype=self.dtype).expand(self.shape), requires_grad=False)

    def span(self, r0: int, r1: int) -> tuple[int, int, int]:
        """(first block, stop block, elements the decode writes) covering rows r0..r1-1."""
        b = self.prep.block
        first = r0 * self.cols // b
        stop = -(-(r1 * self.cols) // b)
        return first, stop, min(stop * b, self.numel) - first * b

    def decode_rows(self, r0: int, r1: int, buf, threads: int | None = None):
        """Rows ``r0:r1`` as a tensor view into ``buf`` (a uint8 tensor big enough for the span)."""
        torch = _torch()
        first, stop, n = self.span(r0, r1)
        flat = buf[: n * self.itemsize].view(self.dtype)
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[self.itemsize]
        self.prep.decode(flat.view(int_dtype).numpy().view(self.prep.fmt.uint_dtype), first, stop,
                         threads=threads, verify=False)
        off = r0 * self.cols - first * self.prep.block
        return flat[off : off + (r1 - r0) * self.cols].view((r1 - r0,) + self.shape[1:])

    def decode(self, threads: int | None = None):
        """The whole weight as a fresh tensor."""
        torch = _torch()
        return self.decode_rows(0, self.rows, torch.empty(self.original_bytes, dtype=torch.uint8), threads)


# ------------------------------------------------------------------------------ buffer pool


class _Pool:
    """Reusable uint8 buffers under a byte budget.

    Prefetches only get a buffer while the total stays within the budget; a demand (the
    layer about to run) always gets one, so the pool can exceed the budget by at most the
    buffers of the layer being computed.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.free: dict[int, list] = {}
        self.allocated = 0
        self.peak = 0
        self.lock = threading.Lock()

    def get(self, nbytes: int, demand: bool):
        torch = _torch()
        with self.lock:
            bucket = self.free.get(nbytes)
            if bucket:
                return bucket.pop()
            if self.allocated + nbytes > self.budget:
                for size in sorted(self.free, reverse=True):  # drop idle buffers of other sizes
                    while self.free[size] and self.allocated + nbytes > self.budget:
                        self.free[size].pop()
                        self.allocated -= size
                if self.allocated + nbytes > self.budget and not demand:
                    return None
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)
        return torch.empty(nbytes, dtype=torch.uint8)

    def put(self, buf) -> None:
        with self.lock:
            self.free.setdefault(buf.numel(), []).append(buf)


@dataclass
class ResidentStats:
    """Memory and work of a resident model (bytes; counts since attach)."""

    weights: int  # managed (unique) weights
    compressed_bytes: int  # their ENEC streams
    original_bytes: int  # their uncompressed size
    other_bytes: int  # parameters and buffers left uncompressed
    buffer_budget: int
    buffer_peak: int  # most pool bytes ever allocated
    decodes: int
    prefetch_hits: int
    wait_seconds: float  # time the forward pass waited for the background decoder
    kept_decoded: int = 0  # weights a memory_budget let stay decoded (counted in other_bytes)

    @property
    def resident_bytes(self) -> int:
        """Weight memory held: compressed streams, uncompressed leftovers, peak buffers."""
        return self.compressed_bytes + self.other_bytes + self.buffer_peak

    @property
    def uncompressed_bytes(self) -> int:
        return self.original_bytes + self.other_bytes


# ------------------------------------------------------------------------------ the manager


class ResidentModel:
    """Hooks that keep a model's large weights compressed; made by :func:`make_resident`."""

    def __init__(self, model, weights: dict, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, prefetch: bool | None = None,
                 threads: int | None = None, memory_budget: int | None = None):
        torch = _torch()
        if prefetch is None:
            prefetch = auto_prefetch()
        self.model = model
        self.weights = weights  # id(placeholder parameter) -> CompressedWeight
        self.chunk_bytes = int(chunk_bytes)
        self.threads = threads
        self.handles = []
        self.saved_forward = {}
        self.decodes = 0
        self.hits = 0
        self.wait = 0.0
        self.schedule: list = []  # weights in the order the forward pass used them
        self.recording = True
        self.pos = 0
        self.pending: dict[int, Future] = {}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="enec-prefetch") if prefetch else None
        mods = []
        for m in model.modules():
            p = m._parameters.get("weight") if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) else None
            if p is not None and id(p) in weights:
                mods.append((m, weights[id(p)], p))
        if not mods:
            raise EnecError("no Linear/Embedding weight of this model is compressed")
        need = max((2 * (w.original_bytes if self._whole(m, w) else self._chunk_span_bytes(w))
                    for m, w, _ in mods), default=0)
        self.pool = _Pool(max(int(buffer_bytes), need))
        self.kept = 0
        if memory_budget is not None:
            keep = self._within_budget(mods, memory_budget)
            mods = [(m, w, p) for m, w, p in mods if id(w) not in keep]
            self.kept = len(keep)
        for m, w, p in mods:
            self._attach(m, w, p)

    # -- setup

    def _chunk_rows(self, w: CompressedWeight) -> int:
        """Rows per chunk: a multiple of CHUNK_ROW_MULTIPLE (see the module docstring)."""
        rows = self.chunk_bytes // max(1, w.cols * w.itemsize)
        return max(CHUNK_ROW_MULTIPLE, rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)

    def _chunk_span_bytes(self, w: CompressedWeight) -> int:
        return (self._chunk_rows(w) * w.cols + 2 * w.prep.block) * w.itemsize

    def _chunked(self, m, w) -> bool:
        torch = _torch()
        return (self.chunk_bytes > 0 and type(m) is torch.nn.Linear and w.original_bytes > self.chunk_bytes
                and w.rows > self._chunk_rows(w))

    def _gathered(self, m) -> bool:
        return isinstance(m, _torch().nn.Embedding) and m.max_norm is None

    def _whole(self, m, w) -> bool:
        """Whether ``m`` decodes ``w`` whole (not gathered rows, not chunks)."""
        return not self._gathered(m) and not self._chunked(m, w)

    def _attach(self, m, w: CompressedWeight, placeholder) -> None:
        if self._gathered(m):
            self.handles.append(m.register_forward_pre_hook(self._embedding_pre(w), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._restore_hook(w, placeholder), always_call=True))
        elif self._chunked(m, w):
            self.saved_forward[m] = m.__dict__.get("forward")
            m.forward = self._chunked_forward(m, w)
        else:
            self.handles.append(m.register_forward_pre_hook(self._full_pre(w)))
            self.handles.append(m.register_forward_hook(self._restore_hook(w, placeholder), always_call=True))

    def _within_budget(self, mods, budget) -> set:
        """Decode for good the weights that a ``memory_budget`` leaves room for; returns their ids.

        The budget covers the streams, the parameters left uncompressed and the whole decode
        buffer budget. What is left over goes to the weights that compress least first:
        each of them saves the most decode work per extra byte held (greedy; a weight that
        does not fit is skipped for smaller ones).
        """
        _check_budget(budget)
        uniq = {id(w): w for _, w, _ in mods}
        need = sum(w.nbytes for w in uniq.values()) + self._other_bytes() + self.pool.budget
        if budget < need:
            raise EnecError(f"memory_budget {budget} bytes is below what the compressed weights need: {need} "
                            f"(streams, uncompressed parameters and the {self.pool.budget}-byte decode buffer)")
        spare = budget - need
        keep = set()
        for w in sorted(uniq.values(), key=lambda w: w.nbytes / w.original_bytes, reverse=True):
            extra = w.original_bytes - w.nbytes
            if extra <= spare:
                keep.add(id(w))
                spare -= extra
        if keep:
            restore_weights(self.model, {k: w for k, w in self.weights.items() if id(w) in keep},
                            lambda w: w.decode(self.threads))
            self.weights = {k: w for k, w in self.weights.items() if id(w) not in keep}
        return keep

    def _other_bytes(self) -> int:
        """Bytes of the model's parameters and buffers that are not managed weights."""
        return other_bytes(self.model, self.weights)

    # -- scheduling

    def _note(self, w: CompressedWeight, whole: bool) -> None:
        """Track where the forward pass is and prefetch what comes next.

        ``whole``: this use decodes the whole weight (chunked and gathered uses are tracked
        for position but decode on demand).
        """
        if self.executor is None:
            return  # decoding on demand: nothing to plan
        step = (w, whole)
        if self.recording:
            if self.schedule and step == self.schedule[0]:
                self.recording = False
            else:
                self.schedule.append(step)
                return
        n = len(self.schedule)
        if self.schedule[self.pos % n] != step:
            try:
                self.pos = self.schedule.index(step)
            except ValueError:
                return
        self.pos = (self.pos + 1) % n
        for k in range(n - 1):
            nxt, nxt_whole = self.schedule[(self.pos + k) % n]
            if not nxt_whole or id(nxt) in self.pending:
                continue
            buf = self.pool.get(nxt.original_bytes, demand=False)
            if buf is None:
                break
            self.pending[id(nxt)] = self.executor.submit(self._decode_full, nxt, buf)

    def _decode_full(self, w: CompressedWeight, buf):
        try:
            # pool buffers are reused: keep the views made for a weight on the buffer itself
            # (saves ~15 us per layer; they go when the pool drops the buffer)
            views = buf.__dict__.setdefault("_enec_views", {}).get(id(w))
            if views is None:
                flat = buf[: w.original_bytes].view(w.dtype)
                int_dtype = {1: _torch().uint8, 2: _torch().int16, 4: _torch().int32}[w.itemsize]
                views = (flat.view(w.shape), flat.view(int_dtype).numpy().view(w.prep.fmt.uint_dtype))
                buf.__dict__["_enec_views"][id(w)] = views
            w.prep.decode(views[1], threads=self.threads, verify=False)  # checked once on load
            return views[0], buf
        except BaseException:
            self.pool.put(buf)
            raise

    def _acquire(self, w: CompressedWeight):
        import time

        fut = self.pending.pop(id(w), None)
        if fut is not None:
            t0 = time.perf_counter()
            t, buf = fut.result()
            self.wait += time.perf_counter() - t0
            self.hits += 1
        else:
            buf = self.pool.get(w.original_bytes, demand=True)
            t, buf = self._decode_full(w, buf)
        self.decodes += 1
        return t, buf

    # -- hooks

    def _full_pre(self, w):
        def pre(m, args):
            t, buf = self._acquire(w)
            m._parameters["weight"] = t
            m.__dict__["_enec_buf"] = buf
            self._note(w, True)

        return pre

    def _restore_hook(self, w, placeholder):
        def post(m, args, out):
            m._parameters["weight"] = placeholder
            buf = m.__dict__.pop("_enec_buf", None)
            if buf is not None:
                self.pool.put(buf)
            if "_enec_padding_idx" in m.__dict__:
                m.padding_idx = m.__dict__.pop("_enec_padding_idx")

        return post

    def _embedding_pre(self, w):
        torch = _torch()

        def pre(m, args, kwargs):
            if args:
                ids, rest, key = args[0], args[1:], None
            else:
                key = "input" if "input" in kwargs else next(iter(kwargs))
                ids, rest = kwargs[key], ()
            if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
                raise EnecError(f"embedding input must be an integer tensor, got {type(ids).__name__}")
            uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
            if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= w.rows):
                raise IndexError("index out of range in self")
            table, buf = self._gather(w, uniq.numpy().astype(np.int64))
            m._parameters["weight"] = table
            m.__dict__["_enec_buf"] = buf
            m.__dict__["_enec_padding_idx"] = m.padding_idx
            m.padding_idx = None  # only affects gradients; the small table may not have that row
            self._note(w, False)
            inv = inv.to(ids.dtype)
            if key is None:
                return (inv,) + tuple(rest), kwargs
            return args, {**kwargs, key: inv}

        return pre

    def _gather(self, w: CompressedWeight, rows: np.ndarray):
        """Rows of ``w`` (sorted, unique) decoded into one pooled table."""
        torch = _torch()
        n = rows.size
        buf = self.pool.get(max(1, n * w.cols * w.itemsize), demand=True)
        table = buf[: n * w.cols * w.itemsize].view(w.dtype).view((n,) + w.shape[1:])
        if n == 0:
            return table, buf
        b = w.prep.block
        lo = rows * w.cols // b
        hi = -(-((rows + 1) * w.cols) // b)
        cap = max(1, max(self.chunk_bytes, DEFAULT_CHUNK_BYTES) // (b * w.itemsize))
        flat_table = table.view(n, w.cols)
        i = 0
        while i < n:  # runs of nearby rows, each decoded with one call into a scratch buffer
            j = i + 1
            while j < n and lo[j] <= hi[j - 1] + _GAP_BLOCKS and hi[j] - lo[i] <= cap:
                j += 1
            first, stop, count = w.span(int(rows[i]), int(rows[j - 1]) + 1)
            scratch = self.pool.get(count * w.itemsize, demand=True)
            try:
                flat = w.decode_rows(int(rows[i]), int(rows[j - 1]) + 1, scratch, self.threads).reshape(-1)
                offs = torch.from_numpy((rows[i:j] - rows[i]) * w.cols)
                idx = offs[:, None] + torch.arange(w.cols)
                flat_table[i:j] = flat[idx]
            finally:
                self.pool.put(scratch)
            i = j
        self.decodes += 1
        return table, buf

    def _chunked_forward(self, m, w: CompressedWeight):
        torch = _torch()
        F = torch.nn.functional
        step = self._chunk_rows(w)
        spans = [(r, min(r + step, w.rows)) for r in range(0, w.rows, step)]

        def submit(r0, r1):
            first, stop, count = w.span(r0, r1)
            buf = self.pool.get(count * w.itemsize, demand=True)

            def run():
                try:
                    return w.decode_rows(r0, r1, buf, self.threads), buf
                except BaseException:
                    self.pool.put(buf)
                    raise

            if self.executor is None:
                f = Future()
                f.set_result(run())
                return f
            return self.executor.submit(run)

        def forward(input):
            x = input
            bias = m.bias
            outs = []
            fut = submit(*spans[0])
            for k, (r0, r1) in enumerate(spans):
                nxt = submit(*spans[k + 1]) if k + 1 < len(spans) else None
                t, buf = fut.result()
                outs.append(F.linear(x, t, None if bias is None else bias[r0:r1]))
                self.pool.put(buf)
                fut = nxt
            self.decodes += 1
            self._note(w, False)
            return torch.cat(outs, dim=-1)

        return forward

    # -- public

    def stats(self) -> ResidentStats:
        uniq = {id(w): w for w in self.weights.values()}.values()
        return ResidentStats(len(uniq), sum(w.nbytes for w in uniq), sum(w.original_bytes for w in uniq),
                             self._other_bytes(), self.pool.budget, self.pool.peak, self.decodes, self.hits,
                             self.wait, self.kept)

    def close(self) -> None:
        """Remove the hooks and stop the prefetcher (weights stay placeholders)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for m, fwd in self.saved_forward.items():
            if fwd is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = fwd
        self.saved_forward.clear()
        for fut in self.pending.values():
            fut.cancel()
        self.pending.clear()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None

    def restore(self) -> None:
        """Decode every weight back into an ordinary parameter and remove the hooks."""
        self.close()
        restore_weights(self.model, self.weights, lambda w: w.decode(self.threads))
        self.weights = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def _check_budget(budget) -> None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
        raise EnecError(f"memory_budget must be a positive number of bytes, got {budget!r}")


def auto_prefetch() -> bool:
    """Prefetch only where a core is left over beside torch's threads.

    On a machine whose cores all run torch's matmuls, a background decoder competes with them
    (both thread pools spin-wait): on the 2-core development VM, SmolLM2 decode ran at 76 ms
    per token decoding synchronously with 2 threads, 105-134 ms with the prefetch thread.
    """
    import os

    return (os.cpu_count() or 1) > _torch().get_num_threads()


def make_resident(model, *, min_numel: int = DEFAULT_MIN_NUMEL, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES, prefetch: bool | None = None,
                  threads: int | None = None, memory_budget: int | None = None,
                  progress: bool = False) -> ResidentModel:
    """Compress a model's large Linear/Embedding weights in place and decode them just in time.

    ``buffer_bytes`` bounds the decoded weights held at once (raised to two of the largest
    weight a layer decodes whole); ``chunk_bytes`` is the largest weight a plain Linear
    decodes whole (bigger ones are computed in row chunks of this size); ``threads`` is the
    decoder's thread count; ``prefetch`` runs the decoder ahead in a background thread
    (default: only if the machine has more cores than torch uses, see :func:`auto_prefetch`).
    ``memory_budget`` (bytes) trades memory for speed: it bounds the managed weights' memory
    (streams, uncompressed parameters, decode buffer budget), and where it leaves room, the
    weights that compress least stay decoded, so fewer are decoded per forward pass
    (default: every weight stays compressed). Returns the :class:`ResidentModel` (use
    ``.stats()``, ``.restore()``, or ``with``).

    A model on a CUDA device is handed to :func:`enec.gpu_resident.make_resident_gpu`
    (streams kept on the GPU, decoded by the Triton kernels; ``buffer_bytes``,
    ``chunk_bytes`` and ``threads`` do not apply there).
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise EnecError(f"make_resident takes a torch.nn.Module, got {type(model).__name__}")
    if any(p.device.type == "cuda" for p in model.parameters()):
        from .gpu_resident import make_resident_gpu

        if memory_budget is not None:
            raise EnecError("memory_budget applies to CPU models only (a CUDA model keeps every stream on the GPU)")
        return make_resident_gpu(model, min_numel=min_numel, prefetch=prefetch is not False, progress=progress)
    _check_budget(memory_budget)
    pairs = managed_weights(model, min_numel, lambda device: device.type == "cpu")
    if not pairs:
        raise EnecError(f"no float Linear/Embedding weight with at least {min_numel} elements on the CPU")
    weights = compress_in_place(model, pairs, lambda p, name: CompressedWeight.from_tensor(p, name, threads),
                                desc="compress weights", progress=progress)
    try:
        return ResidentModel(model, weights, buffer_bytes=buffer_bytes, chunk_bytes=chunk_bytes,
                             prefetch=prefetch, threads=threads, memory_budget=memory_budget)
    except BaseException:
        for m, p in pairs:  # a refused setup leaves the model as it was
            m._parameters["weight"] = p
        raise
