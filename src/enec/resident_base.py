"""What the CPU and GPU compressed-resident modules share (:mod:`enec.resident`,
:mod:`enec.gpu_resident`): which weights are managed, swapping them for placeholders and back,
and the bytes left uncompressed. Depends on nothing else in :mod:`enec`.

A managed weight is a float ``nn.Linear`` / ``nn.Embedding`` weight (subclasses included) with
at least ``min_numel`` elements. Between uses its parameter is a zero-stride placeholder with
the weight's shape, dtype and device; ``weights`` dicts map ``id(placeholder)`` to the
compressed form (tied weights share one placeholder and one compressed form).
"""

from __future__ import annotations

DEFAULT_MIN_NUMEL = 1 << 16


def managed_weights(model, min_numel: int, device_ok) -> list:
    """(module, parameter) pairs to compress: float Linear/Embedding weights with at least
    ``min_numel`` elements whose device passes ``device_ok(device)``, in module order."""
    import torch

    floats = (torch.bfloat16, torch.float16, torch.float32)
    pairs = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            p = m._parameters.get("weight")
            if p is not None and p.dtype in floats and p.numel() >= min_numel and device_ok(p.device):
                pairs.append((m, p))
    return pairs


def compress_in_place(model, pairs, make, *, desc: str, progress: bool = False) -> dict:
    """Replace each pair's weight by a placeholder; ``make(parameter, name)`` gives its compressed
    form, which must have ``placeholder()``. A parameter shared by several modules is compressed
    once. Returns ``{id(placeholder): compressed form}``."""
    from tqdm import tqdm

    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    placeholders: dict[int, object] = {}
    weights: dict[int, object] = {}
    for m, p in tqdm(pairs, desc=desc, disable=not progress, leave=False):
        if id(p) not in placeholders:
            w = make(p, names.get(id(p), ""))
            ph = w.placeholder()
            placeholders[id(p)] = ph
            weights[id(ph)] = w
        m._parameters["weight"] = placeholders[id(p)]
    return weights


def restore_weights(model, weights: dict, decode) -> None:
    """Put ordinary parameters back for the managed weights: ``weights`` maps ``id`` of each
    placeholder parameter to its compressed form, ``decode(form)`` gives the tensor. A weight
    shared by several modules (tied) is decoded once and shared again."""
    import torch

    real = {}
    for m in model.modules():
        p = m._parameters.get("weight")
        if p is not None and id(p) in weights:
            if id(p) not in real:
                real[id(p)] = torch.nn.Parameter(decode(weights[id(p)]), requires_grad=False)
            m._parameters["weight"] = real[id(p)]


def other_bytes(model, managed) -> int:
    """Bytes of the model's parameters and buffers whose ``id`` is not in ``managed``
    (each tensor counted once)."""
    seen = set(managed)
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
