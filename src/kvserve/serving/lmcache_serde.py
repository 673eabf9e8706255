"""A kvserve serde for LMCache (>= 0.5.6): LMCache users compress the KV chunks they store in
an L2 backend with any kvserve profile.

    import kvserve.serving.lmcache_serde        # registers the LMCache serde type "kvserve"

    # an L2 adapter spec in LMCache's config:
    {"type": "fs", "base_path": "/cache",
     "serde": {"type": "kvserve", "profile": "kivi-4", "head_dim": 128}}

Kwargs: ``profile`` (a packaged profile name, a JSON file path or a profile config dict;
default ``"kvserve"``), ``head_dim`` (required: LMCache's chunks are ``[2, num_layers,
num_tokens, kv_heads * head_dim]``), ``max_workers`` (LMCache's serde thread pool, default 1).

The serializer turns a chunk into one ``(keys, values)`` pair per layer, ``(1, kv_heads,
tokens, head_dim)`` bf16 (an fp16 chunk is rounded to bf16 first, so even the ``bf16``
profile is then not lossless), and writes the bundle into LMCache's temp buffer, returning its
length (LMCache narrows the buffer to it). The encode runs on the chunk's device (the GPU path
when LMCache's L1 lives on a GPU). The deserializer reads the bundle's length from its fixed
header, so a buffer longer than the bundle is fine, decodes on the destination's device and
checks the shape before it writes. Every bad buffer raises :class:`kvserve.KVServeError`,
which LMCache's async processor reports as a failed task.
"""
from __future__ import annotations

import torch

from ..errors import KVServeError
from ..pipeline import FIXED_SIZE, Pipeline, bundle_length, decode, profile_from_config

TYPE = "kvserve"
HEADER_SLACK = 64 << 10  # JSON header and part tables: far below this for any real model


def chunk_to_kv(t: torch.Tensor, head_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[2, L, T, H * head_dim]`` -> per layer ``(k, v)`` of shape ``(1, H, T, head_dim)`` bf16."""
    if t.dim() != 4 or t.shape[0] != 2 or t.shape[3] % head_dim:
        raise KVServeError(f"LMCache chunk must be [2, layers, tokens, heads * {head_dim}], got {tuple(t.shape)}")
    _, layers, tokens, hidden = t.shape
    x = t.to(torch.bfloat16).reshape(2, layers, tokens, hidden // head_dim, head_dim).permute(1, 0, 3, 2, 4)
    return [(x[i, 0][None], x[i, 1][None]) for i in range(layers)]


def kv_to_chunk(kv, out: torch.Tensor) -> None:
    """Write per-layer ``(k, v)`` into an LMCache chunk ``out`` ``[2, L, T, H * D]`` (checked)."""
    layers, tokens = out.shape[1], out.shape[2]
    if len(kv) != layers or any(k.shape[0] != 1 or k.shape[2] != tokens or k.shape[1] * k.shape[3] != out.shape[3]
                                for pair in kv for k in pair):
        raise KVServeError(f"bundle KV does not fit the LMCache chunk {tuple(out.shape)}")
    for i, (k, v) in enumerate(kv):
        for w, t in enumerate((k, v)):
            out[w, i].copy_(t[0].permute(1, 0, 2).reshape(tokens, -1).to(out.dtype))


def _serializer_classes():
    from lmcache.v1.distributed.serde.base import Deserializer, Serializer

    class KVServeSerializer(Serializer):
        """Chunk -> kvserve bundle bytes in the destination buffer."""

        def __init__(self, pipe: Pipeline, head_dim: int):
            self.pipe, self.head_dim = pipe, head_dim

        def serialize(self, src, dst, key) -> int:
            t = src.tensor
            blob = self.pipe.encode(chunk_to_kv(t, self.head_dim), meta={"lmcache_shape": list(t.shape)})
            out = dst.tensor.reshape(-1).view(torch.uint8)
            if len(blob) > out.numel():
                raise KVServeError(f"bundle of {len(blob)} bytes exceeds LMCache's {out.numel()}-byte buffer")
            out[:len(blob)].copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
            return len(blob)

        def estimate_serialized_size(self, layout_desc) -> int:
            # every kvserve stage stores at most ~2 bytes per element (the bf16 passthrough's
            # size); headers add a few KiB
            return sum(int(torch.Size(s).numel()) * 2 for s in layout_desc.shapes) + HEADER_SLACK

    class KVServeDeserializer(Deserializer):
        """Bundle bytes (possibly followed by slack) -> the destination chunk."""

        def deserialize(self, src, dst, key) -> None:
            buf = src.tensor.reshape(-1).view(torch.uint8)
            n = bundle_length(buf[:FIXED_SIZE].cpu().numpy().tobytes() if buf.numel() >= FIXED_SIZE else b"")
            if n > buf.numel():
                raise KVServeError(f"LMCache buffer holds {buf.numel()} bytes, the bundle says {n}")
            out = dst.tensor
            kv, meta = decode(buf[:n].cpu().numpy().tobytes(), device=out.device if out.is_cuda else None)
            if meta.get("lmcache_shape") != list(out.shape):
                raise KVServeError(f"bundle holds an LMCache chunk of {meta.get('lmcache_shape')}, "
                                   f"the destination is {list(out.shape)}")
            kv_to_chunk(kv, out)

    return KVServeSerializer, KVServeDeserializer


def create_serde(kwargs: dict):
    """LMCache serde factory: ``{"profile": ..., "head_dim": int, "max_workers": int}``."""
    from lmcache.v1.distributed.serde.async_processor import AsyncSerdeProcessor

    unknown = set(kwargs) - {"profile", "head_dim", "max_workers"}
    if unknown:
        raise KVServeError(f"kvserve serde: unknown option(s) {sorted(unknown)}")
    head_dim = kwargs.get("head_dim")
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or not 1 <= head_dim <= 4096:
        raise KVServeError("kvserve serde: head_dim must be an int in [1, 4096]")
    workers = kwargs.get("max_workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
        raise KVServeError("kvserve serde: max_workers must be an int in [1, 64]")
    pipe = profile_from_config(kwargs.get("profile", "kvserve"))
    ser, de = _serializer_classes()
    return AsyncSerdeProcessor(ser(pipe, head_dim), de(), max_workers=workers)


def register() -> None:
    """Register the ``"kvserve"`` serde type with LMCache (once; importing this module does it)."""
    from lmcache.v1.distributed.serde.factory import get_registered_serde_types, register_serde_factory

    if TYPE not in get_registered_serde_types():
        register_serde_factory(TYPE, create_serde)


try:
    register()
except ImportError:  # LMCache not installed: the helpers above still work
    pass
