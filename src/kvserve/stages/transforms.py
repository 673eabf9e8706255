"""Transforms: invertible maps over ``head_dim`` applied before quantization.

Shapes: ``forward(x, layer_ids, which)`` takes ``x`` of shape ``(n, B, H, T, D)`` float32
(``which`` is ``"k"`` for keys, ``"v"`` for values) and returns the same shape; ``inverse``
undoes it (exactly for identity, to float rounding for Hadamard).
"""
from __future__ import annotations

import functools
import math

import numba
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


@functools.lru_cache(maxsize=8)
def rope_tables_on(thetas: tuple, t: int, d: int, device: torch.device):
    """``cos, sin`` of shape ``(U, t, d//2)`` on ``device`` for the ``U`` distinct thetas (computed
    on the host, float64 angles) and the int32 index ``(n,)`` of each stacked layer's table."""
    uniq = sorted(set(thetas))
    c = torch.stack([_rope_cos_sin(th, t, d)[0] for th in uniq]).to(device)
    s = torch.stack([_rope_cos_sin(th, t, d)[1] for th in uniq]).to(device)
    return c, s, torch.tensor([uniq.index(th) for th in thetas], dtype=torch.int32, device=device)


def _rope_on(thetas: tuple, t: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_rope_stack` on ``device``, broadcast over the layers when they share one theta."""
    c, s, idx = rope_tables_on(thetas, t, d, device)
    if c.shape[0] > 1:
        c, s = c[idx.long()], s[idx.long()]
    return c[:, None, None], s[:, None, None]


def _rotate(x: torch.Tensor, thetas: list[float], sign: float, portable: bool = False) -> torch.Tensor:
    """Rotate channel pairs ``(i, i + D/2)`` (the ``rotate_half`` RoPE layout) of each stacked
    layer by ``sign * position * theta**(-2i/D)``; ``sign=-1`` undoes RoPE. ``portable``: each
    product rounded on its own (``x1*c + x2*s``), the same bits on every device; otherwise
    ``addcmul``, which a CPU may fuse into one FMA."""
    n, b, h, t, d = x.shape
    half = d // 2
    key = (tuple(float(th) for th in thetas), t, d)
    c, s = _rope_stack(*key) if x.device.type == "cpu" else _rope_on(*key, x.device)
    x1, x2 = x[..., :half], x[..., half:]
    if portable:
        if sign < 0:
            return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], -1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
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

    ``portable`` (default False) computes the same transform in a fixed order of correctly
    rounded float32 operations: fast Walsh-Hadamard butterflies (``a + b``, ``a - b`` with
    pair distance 1, 2, 4, ... within each power-of-two chunk), then one multiply by the
    chunk's ``float32(1/sqrt(n))`` (forward: signs first; inverse: signs last), and RoPE with
    each product rounded on its own. Every CPU and GPU then produces the same bits, so a
    bundle decodes identically everywhere. ``False`` (bundles made before) uses one float32
    matrix product, whose last bits depend on the BLAS, the ISA and the device; it is left
    out of the config so older configs keep their identity.
    """

    stage_id = "hadamard"
    params = {"seed": 0, "key_rope_theta": None, "portable": False}

    def get_config(self):
        cfg = super().get_config()
        if not self.portable:
            del cfg["portable"]
        return cfg

    def validate(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise KVServeError("hadamard: seed must be an int in [0, 2**32)")
        th = self.key_rope_theta
        vals = th if isinstance(th, list) else [th]
        if th is not None and not (1 <= len(vals) <= 4096 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 1.0 < v < 1e12 for v in vals)):
            raise KVServeError("hadamard: key_rope_theta must be null, a number > 1 or a per-layer list of them")
        if not isinstance(self.portable, bool):
            raise KVServeError("hadamard: portable must be a bool")

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
        ids = tuple(int(li) for li in layer_ids)
        if self.portable:
            return _portable(x, _on(_sign_stack, x.device, self.seed, ids, h, d), th, True)
        if th is not None:
            x = _rotate(x, th, -1.0)
        return x @ _on(_signed_hadamard, x.device, self.seed, ids, h, d, False)

    def inverse(self, y, layer_ids, which="k"):
        n, b, h, t, d = y.shape
        ids = tuple(int(li) for li in layer_ids)
        th = self._thetas(layer_ids, d) if which == "k" else None
        if self.portable:
            return _portable(y, _on(_sign_stack, y.device, self.seed, ids, h, d), th, False)
        x = y @ _on(_signed_hadamard, y.device, self.seed, ids, h, d, True)
        return _rotate(x, th, 1.0) if th is not None else x


@functools.lru_cache(maxsize=64)
def _on_device(fn, device, *args):
    return fn(*args).to(device)


def _on(fn, device, *args) -> torch.Tensor:
    """``fn(*args)`` (a cached host table) on ``device`` (cached there too)."""
    return fn(*args) if device.type == "cpu" else _on_device(fn, device, *args)


def butterfly_scale(n: int) -> float:
    """The float32 ``1/sqrt(n)`` of a power-of-two chunk of ``n`` channels (exact in float32)."""
    return float(np.float32(1.0 / math.sqrt(n)))


@numba.njit(cache=True, nogil=True)
def _butterflies(y, offs, sizes, scales):
    for blk in range(offs.size):
        o, n = offs[blk], sizes[blk]
        h = 1
        while h < n:
            for j in range(o, o + n, 2 * h):
                for k in range(j, j + h):
                    a = y[k]
                    b = y[k + h]
                    y[k] = a + b
                    y[k + h] = a - b
            h *= 2
        for k in range(o, o + n):
            y[k] = y[k] * scales[blk]


@numba.njit(parallel=True, cache=True, nogil=True)
def _portable_rows(x, out, signs, cos, sin, b, h, t, rope, forward, offs, sizes, scales):
    """:func:`_portable` for a contiguous (n, B, H, T, D) stack viewed as rows of D: one pass."""
    d = x.shape[1]
    half = d // 2
    for r in numba.prange(x.shape[0]):
        tok = r % t
        head = (r // t) % h
        layer = r // (t * h * b)
        lc = layer if cos.shape[0] > 1 else 0
        y = out[r]
        if forward:
            if rope:
                for i in range(half):
                    a = x[r, i]
                    c = x[r, i + half]
                    y[i] = a * cos[lc, tok, i] + c * sin[lc, tok, i]
                    y[i + half] = c * cos[lc, tok, i] - a * sin[lc, tok, i]
            else:
                y[:] = x[r]
            for i in range(d):
                y[i] = y[i] * signs[layer, head, i]
            _butterflies(y, offs, sizes, scales)
        else:
            y[:] = x[r]
            _butterflies(y, offs, sizes, scales)
            for i in range(d):
                y[i] = y[i] * signs[layer, head, i]
            if rope:
                for i in range(half):
                    a = y[i]
                    c = y[i + half]
                    y[i] = a * cos[lc, tok, i] - c * sin[lc, tok, i]
                    y[i + half] = c * cos[lc, tok, i] + a * sin[lc, tok, i]


def _chunks(d: int):
    sizes = np.asarray(_pow2_blocks(d), dtype=np.int64)
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return offs, sizes, np.asarray([butterfly_scale(int(n)) for n in sizes], dtype=np.float32)


def _portable(x: torch.Tensor, signs: torch.Tensor, thetas, forward: bool) -> torch.Tensor:
    """The ``portable`` randomized Hadamard of a stack ``(n, B, H, T, D)``: forward = undo
    RoPE (``thetas`` not None), times the signs ``(n, 1, H, 1, D)``, butterflies; inverse =
    butterflies, times the signs, redo RoPE. One numba pass on the CPU, torch operations
    elsewhere (:func:`_portable_torch`); the same float32 operations in the same order."""
    if x.device.type != "cpu" or not x.numel():
        return _portable_torch(x, signs, thetas, forward)
    n, b, h, t, d = x.shape
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    if thetas is not None:
        c, s = _rope_stack(tuple(float(th) for th in thetas), t, d)
        c, s = c.reshape(-1, t, d // 2).numpy(), s.reshape(-1, t, d // 2).numpy()
    else:
        c = s = np.zeros((1, 1, 1), dtype=np.float32)
    _portable_rows(x.view(-1, d).numpy(), out.view(-1, d).numpy(), signs.reshape(n, h, d).numpy(),
                   c, s, b, h, t, thetas is not None, forward, *_chunks(d))
    return out


def _portable_torch(x, signs, thetas, forward):
    if forward:
        if thetas is not None:
            x = _rotate(x, thetas, -1.0, True)
        return _butterfly_hadamard(x * signs, x.shape[-1])
    y = _butterfly_hadamard(x, x.shape[-1]) * signs
    return _rotate(y, thetas, 1.0, True) if thetas is not None else y


def _butterfly_hadamard(x: torch.Tensor, d: int) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard over the last dim in float32 butterflies (``portable``):
    per power-of-two chunk, pairs at distance 1, 2, 4, ... become ``(a + b, a - b)``, then
    the chunk is multiplied by :func:`butterfly_scale`."""
    out, off = [], 0
    for n in _pow2_blocks(d):
        y = x[..., off:off + n]
        lead = y.shape[:-1]
        h = 1
        while h < n:
            v = y.reshape(-1, n // (2 * h), 2, h)
            a, b = v[:, :, 0], v[:, :, 1]
            y = torch.stack((a + b, a - b), dim=2).reshape(*lead, n)
            h *= 2
        out.append(y * butterfly_scale(n))
        off += n
    return out[0] if len(out) == 1 else torch.cat(out, -1)
