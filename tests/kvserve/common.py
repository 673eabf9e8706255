"""Conformance helpers every KVServe stage must pass (numcodecs-style)."""
from __future__ import annotations

import json

import numpy as np
import torch

from kvserve import get_stage
from kvserve.stages.base import Stage


def check_config(stage: Stage) -> None:
    """The config is JSON, rebuilds an equal stage, and is stable under the round trip."""
    cfg = stage.get_config()
    text = json.dumps(cfg)
    again = get_stage(stage.kind, json.loads(text))
    assert type(again) is type(stage)
    assert again.get_config() == cfg
    assert again == stage
    assert cfg["id"] == stage.stage_id


def check_codec_roundtrip(codec, arr: np.ndarray, bits: int) -> bytes:
    """Lossless codecs must give back the exact symbols."""
    buf = codec.encode(arr, bits)
    out = codec.decode(buf, arr.size, bits)
    assert out.dtype == arr.dtype and out.shape == arr.reshape(-1).shape
    np.testing.assert_array_equal(out, arr.reshape(-1))
    return buf


def check_transform_inverse(transform, x: torch.Tensor, layer_ids, atol=1e-4) -> torch.Tensor:
    y = transform.forward(x.clone(), layer_ids)
    assert y.shape == x.shape
    back = transform.inverse(y, layer_ids)
    torch.testing.assert_close(back, x, atol=atol, rtol=1e-5)
    return y


def check_quantizer_roundtrip(quantizer, x: torch.Tensor, layer_ids, which, geometry):
    """Encode/decode through the part protocol; returns the reconstruction."""
    parts = quantizer.encode(x, layer_ids, which, geometry)
    names = [p.name for p in parts]
    assert len(names) == len(set(names))
    arrays = {}
    for p in parts:
        if p.bits is not None and p.bits <= 8:
            assert p.array.dtype == np.uint8
            assert p.array.size == 0 or int(p.array.max()) < (1 << p.bits)
        arrays[p.name] = p.array.copy()
    out = quantizer.decode(arrays, tuple(x.shape), layer_ids, which)
    assert out.shape == x.shape and out.dtype == torch.float32
    return out


def make_kv(layers=4, heads=3, tokens=40, dim=64, seed=0, batch=1, tokens_per_layer=None):
    """Synthetic bf16 KV with an outlier channel and a large first token (like real caches)."""
    g = torch.Generator().manual_seed(seed)
    kv = []
    for i in range(layers):
        t = tokens_per_layer[i] if tokens_per_layer else tokens
        k = torch.randn(batch, heads, t, dim, generator=g) * (1 + i)
        k[..., 3] *= 8
        v = torch.randn(batch, heads, t, dim, generator=g)
        if t:
            v[..., 0, :] *= 5
        kv.append((k.bfloat16(), v.bfloat16()))
    return kv
