"""Paged-layout and tensor-parallel head-layout math (kvserve.serving.paged); no vLLM needed.

The head layout is vLLM's (``QKVParallelLinear``): with H KV heads and R ranks, rank r holds
heads [r*H/R, (r+1)*H/R) when R <= H, and head r // (R/H) when R > H (each head replicated on
R/H ranks). The re-split is checked on tensors: a KV whose every head is distinguishable is
sharded for a producer's TP size, only the ranks :func:`source_ranks` names keep their shard
(the others do not write bundles), and every rank of every other TP size assembles exactly
its own heads from them.
"""
from __future__ import annotations

import pytest
import torch

from kvserve.errors import KVServeConnectorError
from kvserve.serving import paged

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tp_sizes(heads: int, most: int = 16) -> list[int]:
    return [r for r in range(1, most + 1) if (heads % r == 0 if r <= heads else r % heads == 0)]


@pytest.mark.parametrize("heads,tp,want", [
    (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (3, 3, [[0], [1], [2]]),
    (2, 4, [[0], [0], [1], [1]]),  # replicated: TP > KV heads
    (3, 6, [[0], [0], [1], [1], [2], [2]]),
    (1, 4, [[0], [0], [0], [0]]),
    (4, 1, [[0, 1, 2, 3]]),
])
def test_heads_of_rank_follow_vllm_sharding(heads, tp, want):
    assert [list(paged.kv_heads_of_rank(r, tp, heads)) for r in range(tp)] == want
    assert paged.kv_head_replicas(tp, heads) == max(1, tp // heads)


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 8])
def test_every_head_on_exactly_replicas_ranks(heads):
    for tp in tp_sizes(heads):
        count = [0] * heads
        for r in range(tp):
            held = list(paged.kv_heads_of_rank(r, tp, heads))
            assert held == sorted(held) and len(held) == max(1, heads // tp)
            for h in held:
                count[h] += 1
        assert count == [paged.kv_head_replicas(tp, heads)] * heads
        # the source ranks hold every head exactly once
        src = [h for r in paged.source_ranks(tp, heads) for h in paged.kv_heads_of_rank(r, tp, heads)]
        assert src == list(range(heads))


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 8])
def test_resplit_between_every_pair_of_tp_sizes(heads):
    torch.manual_seed(heads)
    T, D = 7, 4
    kv = torch.randn(1, heads, T, D).bfloat16()
    kv[:, :, 0, 0] = torch.arange(heads)  # every head distinguishable
    for src_tp in tp_sizes(heads):
        # only the source ranks' bundles exist
        bundles = {r: kv[:, list(paged.kv_heads_of_rank(r, src_tp, heads))].clone()
                   for r in paged.source_ranks(src_tp, heads)}
        for dst_tp in tp_sizes(heads):
            for r in range(dst_tp):
                sources = paged.head_sources(r, dst_tp, src_tp, heads)
                assert {s.src_rank for s in sources} <= set(bundles)
                got = paged.gather_heads(sources, bundles)
                want = kv[:, list(paged.kv_heads_of_rank(r, dst_tp, heads))]
                assert torch.equal(got, want), (heads, src_tp, dst_tp, r, sources)


def test_head_sources_merge_runs():
    # 8 heads: a TP=1 rank reads two TP=2 bundles whole; a TP=4 rank half of one
    assert paged.head_sources(0, 1, 2, 8) == [paged.HeadSource(0, slice(0, 4), slice(0, 4)),
                                               paged.HeadSource(1, slice(0, 4), slice(4, 8))]
    assert paged.head_sources(3, 4, 2, 8) == [paged.HeadSource(1, slice(2, 4), slice(0, 2))]
    # replicated producer (TP=8, 2 heads): only ranks 0 and 4 write; TP=2 rank 1 reads rank 4
    assert paged.source_ranks(8, 2) == [0, 4]
    assert paged.head_sources(1, 2, 8, 2) == [paged.HeadSource(4, slice(0, 1), slice(0, 1))]
    # replicated consumer (TP=4, 2 heads) from TP=1: ranks 2 and 3 both read head 1
    assert [paged.head_sources(r, 4, 1, 2) for r in (2, 3)] == [[paged.HeadSource(0, slice(1, 2), slice(0, 1))]] * 2


@pytest.mark.parametrize("tp,heads,msg", [
    (2, 3, "cannot be split"), (4, 6, "cannot be split"), (0, 4, "tensor-parallel size"),
    (True, 4, "tensor-parallel size"), (2, 0, "number of KV heads"), (paged.MAX_TP + 1, 1, "tensor-parallel size"),
])
def test_bad_tp_layouts_refused(tp, heads, msg):
    with pytest.raises(KVServeConnectorError, match=msg):
        paged.source_ranks(tp, heads)


def test_bad_rank_refused():
    for rank in (-1, 2, 1.0):
        with pytest.raises(KVServeConnectorError, match="rank"):
            paged.kv_heads_of_rank(rank, 2, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_gather_scatter_device_layout(device):
    """The K|V-on-content layout of the GPU backends, scheduler blocks of 64 split into kernel
    blocks of 16, on each available device: tokens land in the slots vLLM's block table names."""
    h, d, bs, kbs, t = 2, 8, 64, 16, 100
    cache = torch.zeros(12 * (bs // kbs), h, kbs, 2 * d, dtype=torch.bfloat16, device=device)
    kc, vc = paged.split_kv(cache, "FLASH_ATTN", d)
    k = torch.randn(1, h, t, d, device=device).bfloat16()
    v = torch.randn(1, h, t, d, device=device).bfloat16()
    blk, off = paged.token_slots([7, 2], bs, kbs, 0, t, device)
    assert blk.device.type == device
    paged.scatter_tokens(kc, blk, off, k)
    paged.scatter_tokens(vc, blk, off, v)
    assert torch.equal(paged.gather_tokens(kc, blk, off), k) and torch.equal(paged.gather_tokens(vc, blk, off), v)
    slots = torch.tensor([7, 2]).repeat_interleave(bs)[:t] * bs + torch.arange(t) % bs
    flat = cache.permute(0, 2, 1, 3).reshape(-1, h, 2 * d).cpu()  # [slot, head, content]
    assert torch.equal(flat[slots, :, :d], k[0].permute(1, 0, 2).cpu())
    assert torch.equal(flat[slots, :, d:], v[0].permute(1, 0, 2).cpu())
    assert int((flat != 0).any(-1).any(-1).sum()) == t  # nothing else written
