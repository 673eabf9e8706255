"""Transforms: invertible maps over ``head_dim`` applied before quantization.

Shapes: ``forward(x, layer_ids)`` takes ``x`` of shape ``(n, B, H, T, D)`` float32 and
returns the same shape; ``inverse`` undoes it (exactly for identity, to float rounding for
Hadamard).
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

    def forward(self, x: torch.Tensor, layer_ids: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, layer_ids: list[int]) -> torch.Tensor:
        raise NotImplementedError


@register
class Identity(Transform):
    """No transform."""

    stage_id = "identity"

    def forward(self, x, layer_ids):
        return x

    def inverse(self, y, layer_ids):
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


@register
class Hadamard(Transform):
    """Randomized Hadamard over ``head_dim`` (KVServe, QuaRot-style).

    ``y = (x * s_{layer,head}) @ H`` with ``s`` random +-1 signs seeded by
    ``(seed, layer, head)`` and ``H`` the orthonormal Walsh-Hadamard matrix, block-diagonal
    over power-of-two chunks when ``head_dim`` is not a power of two (96 -> 64 + 32).
    Orthogonal, so ``x = (y @ H^T) * s``. Spreads outlier channels over all channels, which
    makes min-max quantization much less wasteful.
    """

    stage_id = "hadamard"
    params = {"seed": 0}

    def validate(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise KVServeError("hadamard: seed must be an int in [0, 2**32)")

    def _sign_tensor(self, layer_ids, heads, d):
        s = torch.stack([_signs(self.seed, int(li), heads, d) for li in layer_ids])  # (n, H, D)
        return s[:, None, :, None, :]  # (n, 1, H, 1, D)

    def forward(self, x, layer_ids):
        n, b, h, t, d = x.shape
        return (x * self._sign_tensor(layer_ids, h, d)) @ _hadamard_matrix(d)

    def inverse(self, y, layer_ids):
        n, b, h, t, d = y.shape
        return (y @ _hadamard_matrix(d).T) * self._sign_tensor(layer_ids, h, d)
