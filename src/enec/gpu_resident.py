"""Compressed-resident inference on the GPU: weights stay ENEC streams in device memory (or,
with ``offload=True``, in pinned host memory) and each is decoded by the Triton kernels of
:mod:`enec.gpu` into a scratch tensor just before its module runs.

The GPU twin of :mod:`enec.resident` (which decodes on CPU cores), and simpler, because a
GPU decodes a whole layer in microseconds:

* every float ``nn.Linear`` / ``nn.Embedding`` weight with at least ``min_numel`` elements is
  compressed on its device (tied weights once); between uses the parameter is a zero-stride
  placeholder, so ``model.device`` and ``model.dtype`` stay right;
* a forward pre-hook hands the module its decoded weight, a forward hook takes it back; the
  scratch tensor comes from torch's caching allocator and is returned to it at once, so the
  decoded bytes held at any time are those of the running module plus the prefetched ones;
* with ``prefetch`` (the default on CUDA) the next weights, in the order learnt on the first
  forward pass, are decoded on a side CUDA stream while the current module computes; the
  compute stream waits on an event, never on the host;
* ``offload=True`` is the memory-capped case ENEC's paper measures: the compressed streams
  live in pinned host memory, and each use copies the compressed bytes to the device (on the
  side stream) and decodes them there, instead of copying the uncompressed weight.

Every stream is decoded once with its checksums verified when it is attached (and compared
with the original bits); later decodes skip the checksum pass. Each decode still reports
per-block status, which :meth:`GpuResidentModel.check` reads (it synchronises).

Without CUDA the same code runs the kernels in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, no prefetch stream): that is how CI tests it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .errors import EnecError
from .resident_base import DEFAULT_MIN_NUMEL, compress_in_place, managed_weights, other_bytes, restore_weights


def _torch():
    import torch

    return torch


class GpuWeight:
    """One weight as an ENEC stream whose block table is on the device; the payload is on the
    device too, or in pinned host memory (``offload``)."""

    def __init__(self, tensor, name: str = "", offload: bool = False):
        from . import gpu

        torch = _torch()
        self.name = name
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.device = tensor.device
        stream = gpu.compress(tensor, as_tensor=True)
        self.prep = gpu.prepare(stream)
        self.stream_bytes = int(stream.numel())
        self.original_bytes = tensor.numel() * tensor.element_size()
        # attach-time check: decode with checksums and compare with the source bits
        got = self.prep.decode(verify=True)
        if not torch.equal(got.reshape(-1).view(torch.uint8), tensor.detach().reshape(-1).view(torch.uint8)):
            raise EnecError(f"{name or 'weight'}: the GPU round trip changed the weight")
        del got
        self.status = torch.zeros(max(1, self.prep.nblocks), dtype=torch.int32, device=self.device)
        self.host = None
        if offload:
            # the payload moves to pinned host memory; only the block table stays on the device
            payload = self.prep.base[self.prep.pstart:]
            host = torch.empty(payload.numel(), dtype=torch.uint8,
                               pin_memory=self.device.type == "cuda")
            host.copy_(payload)
            self.host = host
            self.prep.base = None  # frees the device copy (prepare() held the whole stream)
            self.prep.payload_owner = None

    @property
    def resident_bytes(self) -> int:
        """Bytes this weight keeps on the device between uses."""
        table = (self.prep.nblocks + 1) * 8 + self.prep.nblocks * 4 + self.status.numel() * 4
        return table + (0 if self.host is not None else self.stream_bytes)

    def placeholder(self):
        torch = _torch()
        return torch.nn.Parameter(torch.zeros((), dtype=self.dtype, device=self.device).expand(self.shape),
                                  requires_grad=False)

    def launch(self, out) -> None:
        """Queue the decode of this weight into ``out`` on the current stream (no host wait)."""
        torch = _torch()
        prep = self.prep
        if self.host is not None:  # offloaded: bring the compressed bytes over first
            prep = copy.copy(prep)
            prep.base = self.host.to(self.device, non_blocking=True)
            prep.pstart = 0
            staged = prep.base
        else:
            staged = None
        if self.prep.nblocks:
            prep.launch(out, self.status)
        if staged is not None and self.device.type == "cuda":
            staged.record_stream(torch.cuda.current_stream(self.device))

    def decode(self):
        torch = _torch()
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.launch(out)
        return out


@dataclass
class GpuResidentStats:
    weights: int
    compressed_bytes: int  # the managed weights' ENEC streams
    original_bytes: int  # their uncompressed size
    device_bytes: int  # what the managed weights keep on the device between uses
    other_bytes: int  # parameters and buffers left uncompressed (on the device)
    decodes: int
    prefetch_hits: int
    offload: bool

    @property
    def resident_bytes(self) -> int:
        """Weight memory on the device between layers (scratch tensors not counted)."""
        return self.device_bytes + self.other_bytes

    @property
    def uncompressed_bytes(self) -> int:
        return self.original_bytes + self.other_bytes


class GpuResidentModel:
    """Hooks that keep a model's large weights compressed on (or offloaded from) its GPU."""

    def __init__(self, model, weights: dict, *, prefetch: bool = True, ahead: int = 2, offload: bool = False):
        torch = _torch()
        self.model = model
        self.weights = weights  # id(placeholder) -> GpuWeight
        self.offload = offload
        devices = {w.device for w in weights.values()}
        self.device = next(iter(devices))
        self.prefetch = bool(prefetch) and self.device.type == "cuda"
        self.ahead = max(1, int(ahead))
        self.side = torch.cuda.Stream(self.device) if self.prefetch else None
        self.pending: dict[int, tuple] = {}  # id(weight) -> (tensor, event)
        self.schedule: list = []
        self.recording = True
        self.pos = 0
        self.decodes = 0
        self.hits = 0
        self.handles = []
        for m in model.modules():
            p = m._parameters.get("weight") if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) else None
            if p is not None and id(p) in weights:
                w = weights[id(p)]
                self.handles.append(m.register_forward_pre_hook(self._pre(w)))
                self.handles.append(m.register_forward_hook(self._post(p), always_call=True))
        if not self.handles:
            raise EnecError("no Linear/Embedding weight of this model is compressed")

    # -- decoding

    def _launch_side(self, w: GpuWeight):
        torch = _torch()
        cur = torch.cuda.current_stream(self.device)
        self.side.wait_stream(cur)  # the scratch memory may have just been freed by the compute stream
        with torch.cuda.stream(self.side):
            out = torch.empty(w.shape, dtype=w.dtype, device=self.device)
            w.launch(out)
            ev = torch.cuda.Event()
            ev.record(self.side)
        return out, ev

    def _acquire(self, w: GpuWeight):
        torch = _torch()
        got = self.pending.pop(id(w), None)
        self.decodes += 1
        if got is None:
            return w.decode()
        out, ev = got
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(ev)
        out.record_stream(cur)
        self.hits += 1
        return out

    def _note(self, w: GpuWeight) -> None:
        if not self.prefetch:
            return
        if self.recording:
            if self.schedule and w is self.schedule[0]:
                self.recording = False
            else:
                self.schedule.append(w)
                return
        n = len(self.schedule)
        if self.schedule[self.pos % n] is not w:
            try:
                self.pos = next(i for i, s in enumerate(self.schedule) if s is w)
            except StopIteration:
                return
        self.pos = (self.pos + 1) % n
        for k in range(min(self.ahead, n - 1)):
            nxt = self.schedule[(self.pos + k) % n]
            if id(nxt) not in self.pending:
                self.pending[id(nxt)] = self._launch_side(nxt)

    # -- hooks

    def _pre(self, w: GpuWeight):
        def pre(m, args):
            m._parameters["weight"] = self._acquire(w)
            self._note(w)

        return pre

    def _post(self, placeholder):
        def post(m, args, out):
            m._parameters["weight"] = placeholder  # the scratch tensor goes back to the allocator

        return post

    # -- public

    def check(self) -> None:
        """Raise :class:`EnecError` if any decode so far met a malformed block (synchronises)."""
        from .cpu import STATUS_TEXT

        for w in {id(w): w for w in self.weights.values()}.values():
            bad = int(w.status.count_nonzero())
            if bad:
                st = w.status.cpu().numpy()
                b = int((st != 0).nonzero()[0][0])
                raise EnecError(f"{w.name}: corrupted ENEC stream: block {b}: {STATUS_TEXT[int(st[b])]}")

    def stats(self) -> GpuResidentStats:
        uniq = list({id(w): w for w in self.weights.values()}.values())
        other = other_bytes(self.model, self.weights)
        return GpuResidentStats(len(uniq), sum(w.stream_bytes for w in uniq), sum(w.original_bytes for w in uniq),
                                sum(w.resident_bytes for w in uniq), other, self.decodes, self.hits, self.offload)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.pending.clear()

    def restore(self) -> None:
        """Decode every weight back into an ordinary parameter and remove the hooks."""
        self.close()
        restore_weights(self.model, self.weights, lambda w: w.decode())
        self.weights = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def make_resident_gpu(model, *, min_numel: int = DEFAULT_MIN_NUMEL, prefetch: bool = True, ahead: int = 2,
                      offload: bool = False, progress: bool = False) -> GpuResidentModel:
    """Compress a GPU model's large Linear/Embedding weights on its device and decode them just
    in time (see the module docstring). ``offload``: keep the compressed streams in pinned host
    memory. ``ahead``: weights decoded ahead on the side stream. Outputs are bit-identical."""
    from . import gpu

    torch = _torch()
    interp = gpu.interpreting()
    pairs = managed_weights(model, min_numel,
                            lambda device: device.type == "cuda" or (interp and device.type == "cpu"))
    if not pairs:
        raise EnecError(f"no float Linear/Embedding weight with at least {min_numel} elements on a CUDA device")
    if len({p.device for _, p in pairs}) > 1:
        raise EnecError("make_resident_gpu needs the model's weights on one device")
    weights = compress_in_place(model, pairs, lambda p, name: GpuWeight(p.detach(), name, offload=offload),
                                desc="compress weights (GPU)", progress=progress)
    if torch.cuda.is_available() and pairs[0][1].device.type == "cuda":
        torch.cuda.empty_cache()  # give back the uncompressed weights' memory
    return GpuResidentModel(model, weights, prefetch=prefetch, ahead=ahead, offload=offload)


__all__ = ["GpuResidentModel", "GpuResidentStats", "GpuWeight", "make_resident_gpu"]
