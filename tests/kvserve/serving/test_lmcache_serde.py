"""The kvserve serde in LMCache's own serde machinery (lmcache >= 0.5.6, CPU build).

Skipped where LMCache is not installed (it is not part of the shared environment: it pulls
CUDA Python wheels; see the report of issue 18). Real LMCache objects: the registry's factory
builds the processor, LMCache's AsyncSerdeProcessor runs the (de)serializer on its thread pool
and narrows the temp buffer to the bundle, TensorMemoryObj holds the chunks.
"""
from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("lmcache.v1.distributed.serde")

from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey  # noqa: E402
from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj  # noqa: E402

import kvserve  # noqa: E402
from kvserve import KVServeError  # noqa: E402
from kvserve.serving import lmcache_serde  # noqa: E402  (registers "kvserve")

from kvserve_test_common import make_kv  # noqa: E402

KEY = ObjectKey(chunk_hash=b"\x01" * 16, model_name="smollm2", kv_rank=0)


def memobj(t: torch.Tensor, fmt=MemoryFormat.KV_2LTD) -> TensorMemoryObj:
    meta = MemoryObjMetadata(shape=t.shape, dtype=t.dtype, address=0, phy_size=t.numel() * t.element_size(),
                             ref_count=1, fmt=fmt)
    return TensorMemoryObj(t.reshape(-1).view(torch.uint8), meta, None)


def chunk(layers=4, heads=3, tokens=256, dim=64, seed=0) -> torch.Tensor:
    """A chunk in LMCache's KV_2LTD layout [2, L, T, H * D] from realistic synthetic KV."""
    kv = make_kv(layers=layers, heads=heads, tokens=tokens, dim=dim, seed=seed)
    return torch.stack([torch.stack([t[0].permute(1, 0, 2).reshape(tokens, heads * dim) for t in pair])
                        for pair in kv], 1).contiguous()


def wait(query, task):
    t0 = time.time()
    while (res := query(task)) is None:
        assert time.time() - t0 < 60, "serde task did not finish"
        time.sleep(0.005)
    return res


@pytest.mark.parametrize("profile", ["bf16", "kivi-4", "kvserve"])
def test_lmcache_serde_round_trip(profile):
    proc = create_serde_processor(SerdeConfig(type="kvserve", kwargs={"profile": profile, "head_dim": 64}))
    src_t = chunk()
    est = proc.estimate_serialized_size(MemoryLayoutDesc(shapes=[src_t.shape], dtypes=[src_t.dtype]))
    assert est >= src_t.numel() * 2
    src = memobj(src_t)
    tmp = memobj(torch.zeros(est, dtype=torch.uint8), MemoryFormat.BINARY_BUFFER)
    assert wait(proc.query_serialize_result, proc.submit_serialize([src], [tmp], [KEY])) is True
    stored = tmp.tensor.reshape(-1).view(torch.uint8)
    n = stored.numel()  # narrowed by LMCache to what serialize returned
    assert n < est and n == kvserve.pipeline.bundle_length(stored[:20].numpy().tobytes())
    blob = stored.numpy().tobytes()
    want, meta = kvserve.decode(blob)
    assert meta == {"lmcache_shape": list(src_t.shape)}
    out_t = torch.full_like(src_t, float("nan"))
    # a buffer longer than the bundle (as a backend may hand back) decodes the same
    padded = memobj(torch.cat([stored, torch.full((777,), 0xAB, dtype=torch.uint8)]), MemoryFormat.BINARY_BUFFER)
    assert wait(proc.query_deserialize_result, proc.submit_deserialize([padded], [memobj(out_t)], [KEY])) is True
    again = torch.empty_like(src_t)
    lmcache_serde.kv_to_chunk(want, again)
    assert torch.equal(out_t.view(torch.int16), again.view(torch.int16))
    if profile == "bf16":
        assert torch.equal(out_t.view(torch.int16), src_t.view(torch.int16))
        assert n > src_t.numel() * 2
    else:  # the profile's own loss, no more (out_t equals the pipeline's decode above)
        assert n < src_t.numel() * 2 * (0.7 if profile == "kivi-4" else 0.2)
        assert not torch.equal(out_t.view(torch.int16), src_t.view(torch.int16))


def test_lmcache_serde_rejects_bad_input():
    proc = create_serde_processor(SerdeConfig(type="kvserve", kwargs={"profile": "kivi-2", "head_dim": 64}))
    src_t = chunk(layers=2, tokens=200, seed=1)
    tmp = memobj(torch.zeros(src_t.numel() * 2 + 65536, dtype=torch.uint8), MemoryFormat.BINARY_BUFFER)
    assert wait(proc.query_serialize_result, proc.submit_serialize([memobj(src_t)], [tmp], [KEY])) is True
    blob = bytearray(tmp.tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x40  # corrupt payload: the CRC catches it, the task fails
    for buf, dst in ((bad, chunk(layers=2, tokens=200)), (blob, chunk(layers=3, tokens=200)),
                     (blob[:100], chunk(layers=2, tokens=200))):
        src = memobj(torch.frombuffer(bytearray(buf), dtype=torch.uint8), MemoryFormat.BINARY_BUFFER)
        before = dst.clone()
        assert wait(proc.query_deserialize_result, proc.submit_deserialize([src], [memobj(dst)], [KEY])) is False
        assert torch.equal(dst.view(torch.int16), before.view(torch.int16))  # nothing half-written
    with pytest.raises(KVServeError):
        lmcache_serde.create_serde({"profile": "kivi-2"})  # head_dim missing
    with pytest.raises(KVServeError):
        lmcache_serde.create_serde({"head_dim": 64, "level": 3})
    with pytest.raises(KVServeError):
        lmcache_serde.chunk_to_kv(torch.zeros(2, 1, 4, 30, dtype=torch.bfloat16), 64)
