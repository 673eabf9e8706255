"""Transforms: invertible maps over ``head_dim`` applied before quantization.

Shapes: ``forward(x, layer_ids, which)`` takes ``x`` of shape ``(n, B, H, T, D)`` float32
(``which`` is ``"k"`` for keys, ``"v"`` for values) and returns the same shape; ``inverse``
undoes it (exactly for identity, to float rounding for Hadamard).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..errors import KVServeError
from .base import Stage, register


class Transform(Stage):
    kind = "transform"

    def forward(self, x: torch.Tensor, layer_ids: list[int], which: str = "k") -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, layer_ids: list[int], which: str = "k") -> torch.Tensor:
        raise NotImplementedError


@register
class Identity(Transform):
    """No transform."""

    stage_id = "identity"

    def forward(self, x, layer_ids, which="k"):
        return x

    def inverse(self, y, layer_ids, which="k"):
        return y


def _pow2_blocks(d: int) -> list[int]:
    """Split ``d`` into descending powers of two (96 -> [64, 32]); any d >= 1 works."""
    return [1 << b for b in range(d.bit_length() - 1, -1, -1) if d >> b & 1]


@functools.lru_cache(maxsize=32)
def _hadamard_matrix(d: int) -> torch.Tensor:
    """Block-diagonal orthonormal Sylvester-Hadamard matrix of size ``d x d`` (float32)."""
    m = torch.zeros(d, d, dtype=torch.float64)
    off = 0
    for n in _pow2_blocks(d):
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        m[off:off + n, off:off + n] = h / math.sqrt(n)
        off += n
    return m.to(torch.float32)


@functools.lru_cache(maxsize=256)
def _signs(seed: int, layer: int, heads: int, d: int) -> torch.Tensor:
    """Rademacher signs for one layer, shape ``(H, d)``: seeded by (seed, layer, head)."""
    rows = []
    for h in range(heads):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, layer, h])))
        rows.append(rng.integers(0, 2, size=d) * 2 - 1)
    return torch.from_numpy(np.asarray(rows, dtype=np.float32))


@functools.lru_cache(maxsize=64)
def _sign_stack(seed: int, layer_ids: tuple, heads: int, d: int) -> torch.Tensor:
    """Signs for a stack of layers, shape ``(n, 1, H, 1, D)``."""
    return torch.stack([_signs(seed, li, heads, d) for li in layer_ids])[:, None, :, None, :].contiguous()


@functools.lru_cache(maxsize=64)
def _signed_hadamard(seed: int, layer_ids: tuple, heads: int, d: int, inverse: bool) -> torch.Tensor:
    """``diag(s) @ H`` per (layer, head), or its inverse ``H^T @ diag(s)``, shape
    ``(n, 1, H, D, D)``: the sign flip folded into the matrix (one pass over the KV)."""
    s = _sign_stack(seed, layer_ids, heads, d)[..., 0, :]  # (n, 1, H, D)
    h = _hadamard_matrix(d)
    m = h.T[None, None, None] * s[..., None, :] if inverse else s[..., :, None] * h[None, None, None]
    return m.contiguous()


@functools.lru_cache(maxsize=64)
def _rope_cos_sin(theta: float, t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(t, d//2)`` for positions ``0..t-1`` (float64 angles)."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)


@functools.lru_cache(maxsize=64)
def _rope_stack(thetas: tuple, t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` for a stack of layers, shape ``(n, 1, 1, t, d//2)``."""
    cs = [_rope_cos_sin(float(th), t, d) for th in thetas]
    c = torch.stack([a for a, _ in cs])[:, None, None]
    s = torch.stack([b for _, b in cs])[:, None, None]
    return c.contiguous(), s.contiguous()


def _rotate(x: torch.Tensor, thetas: list[float], sign: float) -> torch.Tensor:
    """Rotate channel pairs ``(i, i + D/2)`` (the ``rotate_half`` RoPE layout) of each stacked
    layer by ``sign * position * theta**(-2i/D)``; ``sign=-1`` undoes RoPE."""
    n, b, h, t, d = x.shape
    half = d // 2
    c, s = _rope_stack(tuple(float(th) for th in thetas), t, d)
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1)
    torch.mul(x2, c, out=o2)
    if sign < 0:
        o1.addcmul_(x2, s)
        o2.addcmul_(x1, s, value=-1.0)
    else:
        o1.addcmul_(x2, s, value=-1.0)
        o2.addcmul_(x1, s)
    return out


@register
class Hadamard(Transform):
    """Randomized Hadamard over ``head_dim`` (KVServe, QuaRot-style).

    ``y = (x * s_{layer,head}) @ H`` with ``s`` random +-1 signs seeded by
    ``(seed, layer, head)`` and ``H`` the orthonormal Walsh-Hadamard matrix, block-diagonal
    over power-of-two chunks when ``head_dim`` is not a power of two (96 -> 64 + 32).
    Orthogonal, so ``x = (y @ H^T) * s``. Spreads outlier channels over all channels, which
    makes min-max quantization much less wasteful.

    ``key_rope_theta`` (default None: off) first undoes rotary position embedding on the
    *keys* (KVQuant's pre-RoPE key quantization): channel pairs ``(i, i + D/2)`` (the
    ``rotate_half`` layout of Llama/Gemma in transformers) are rotated back by
    ``p * theta**(-2i/D)`` for token index ``p = 0..T-1``. A number, or one number per model
    layer (Gemma-3: 10000 on sliding layers, 1e6 on global ones). It is an exact rotation
    whatever the true positions are; when the cache holds a suffix of the sequence (a
    sliding window) the residual is a constant rotation per channel pair, which keeps the
    per-channel statistics that make pre-RoPE keys cheap to quantize.
    """

    stage_id = "hadamard"
    params = {"seed": 0, "key_rope_theta": None}

    def validate(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise KVServeError("hadamard: seed must be an int in [0, 2**32)")
        th = self.key_rope_theta
        vals = th if isinstance(th, list) else [th]
        if th is not None and not (1 <= len(vals) <= 4096 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 1.0 < v < 1e12 for v in vals)):
            raise KVServeError("hadamard: key_rope_theta must be null, a number > 1 or a per-layer list of them")

    def _thetas(self, layer_ids, d):
        if self.key_rope_theta is None:
            return None
        if d % 2:
            raise KVServeError("hadamard: key_rope_theta needs an even head_dim")
        th = self.key_rope_theta
        if not isinstance(th, list):
            return [th] * len(layer_ids)
        if max(layer_ids) >= len(th):
            raise KVServeError(f"hadamard: key_rope_theta has {len(th)} layers, KV has more")
        return [th[int(li)] for li in layer_ids]

    def forward(self, x, layer_ids, which="k"):
        n, b, h, t, d = x.shape
        th = self._thetas(layer_ids, d) if which == "k" else None
        if th is not None:
            x = _rotate(x, th, -1.0)
        return x @ _signed_hadamard(self.seed, tuple(int(li) for li in layer_ids), h, d, False)

    def inverse(self, y, layer_ids, which="k"):
        n, b, h, t, d = y.shape
        x = y @ _signed_hadamard(self.seed, tuple(int(li) for li in layer_ids), h, d, True)
        th = self._thetas(layer_ids, d) if which == "k" else None
        return _rotate(x, th, 1.0) if th is not None else x
