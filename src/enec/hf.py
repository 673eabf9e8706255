"""Hugging Face folders: load an ENEC-compressed model, export GGUF checkpoints to safetensors.

``enec compress <model folder>`` writes ``<folder>-enec``: every ``*.safetensors`` shard becomes a
``.enec`` container and every other file (config, tokenizer, shard index) is copied. This module
loads such a folder back into a ``transformers`` model whose weights are bit-identical to the
original (:func:`from_pretrained`), or into a compressed-resident one (``resident=True``, see
:mod:`enec.resident`, :func:`load_resident`). :func:`load_streamed` is the cold-start path: the model is built while
its checkpoint is still being read, and tensors are decoded as their bytes arrive.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import check_shards
from .errors import EnecError
from .fileio import as_path
from .streaming import iter_streamed, shard_files


def checkpoint_files(folder) -> list[Path]:
    """The ``.enec`` shards of a compressed folder, in shard order."""
    folder = as_path(folder, "folder")
    if not folder.is_dir():
        raise EnecError(f"no such folder: {folder}")
    files = sorted(folder.glob("*.enec"))
    if not files:
        hint = " (it holds .safetensors files: compress it first with `enec compress`)" \
            if any(folder.glob("*.safetensors")) else ""
        raise EnecError(f"{folder} holds no .enec checkpoint{hint}")
    check_shards(folder, ".enec")
    return files


def iter_tensors(folder, *, threads: int | None = None, keep=None, opener=None) -> Iterator[tuple[str, object]]:
    """Yield ``(name, tensor)`` for every tensor of a compressed folder (or one ``.enec`` file).

    Shards are read ahead on a background thread while earlier tensors decode (see
    :mod:`enec.streaming`; ``opener`` replaces :func:`open`, e.g. a throttled reader).
    ``keep(name, dtype, shape) -> bool``, when given, turns matching tensors into raw ENEC
    streams instead: the item is then ``(name, uint8 array)`` viewing the shard's read buffer
    (used by the compressed-resident loader, which never decodes them whole).
    """
    path = as_path(folder, "folder")
    files = [path] if path.is_file() else checkpoint_files(path)
    yield from iter_streamed(files, opener=opener, threads=threads, keep=keep)


def _quiet_transformers():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def from_pretrained(path, *, model_class=None, dtype=None, resident: bool = False,
                    threads: int | None = None, resident_options: dict | None = None, **kwargs):
    """Load a folder made by ``enec compress`` into a ``transformers`` model.

    ``model_class`` defaults to ``AutoModelForCausalLM``; any ``Auto*`` class or model class
    works. ``dtype`` and other keyword arguments go to ``from_pretrained`` (plain load) or
    ``from_config`` (resident load). With ``resident=False`` (default) the weights are decoded
    and handed to transformers' own loader, so they are bit-identical to loading the
    uncompressed folder. With ``resident=True`` large Linear/Embedding weights stay as ENEC
    streams and are decoded just in time (see :func:`enec.resident.make_resident`;
    ``resident_options`` go there); the full model is never materialised.
    """
    _quiet_transformers()
    import transformers

    path = as_path(path, "path")
    files = checkpoint_files(path)
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    if resident:
        return load_resident(path, model_class=model_class, dtype=dtype, threads=threads,
                             options=resident_options or {}, **kwargs)
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(str(path))
    state = dict(iter_tensors(path, threads=threads))
    if dtype is not None:
        kwargs["dtype"] = dtype
    want_info = bool(kwargs.pop("output_loading_info", False))
    cls = concrete_class(model_class, config)
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True, **kwargs)
    del state
    # transformers initialises what the checkpoint lacks at random and only reports it
    lost = sorted(info.get("missing_keys") or ()) + sorted(str(k[0]) for k in info.get("mismatched_keys") or ())
    if lost:
        raise EnecError(f"the checkpoint in {path} does not fill {cls.__name__}: {len(lost)} parameters missing "
                        f"or of another shape, e.g. {lost[:5]}")
    _attach_generation_config(model, path)
    model.eval()
    model.enec_source = [str(f) for f in files]
    return (model, info) if want_info else model


def load_streamed(path, *, model_class=None, dtype=None, threads: int | None = None, opener=None, **kwargs):
    """Cold start: a ``transformers`` model that is ready as soon as its checkpoint is in.

    Reading starts first, on a background thread, shard after shard (``opener(path)`` replaces
    :func:`open`, e.g. a network or :class:`~enec.streaming.ThrottledReader`). Meanwhile the
    model skeleton is built on the meta device without initialising any weight; then each
    tensor is assigned as it arrives (``.enec`` shards are decoded on arrival; plain
    ``.safetensors`` tensors alias the read buffer). ``path`` is a folder of ``.enec`` shards
    (made by ``enec compress``) or, as a baseline, of ``.safetensors`` shards.

    ``model_class`` defaults to ``AutoModelForCausalLM``. ``dtype=None`` keeps the stored
    dtypes; a dtype casts the floating tensors. Other keyword arguments (``config``,
    ``attn_implementation``, ...) go to the model's ``_from_config``. CPU only; tied weights
    are tied after loading. Checkpoint names may carry or lack the model's
    ``base_model_prefix``. A parameter the checkpoint does not fill raises :class:`EnecError`;
    checkpoint tensors the model has no place for are skipped with a warning.
    """
    _quiet_transformers()
    import torch
    import transformers

    path = as_path(path, "path")
    files = shard_files(path)
    if dtype == "auto":
        dtype = None
    given = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise EnecError(f"dtype must be a floating torch dtype, its name or 'auto', got {given!r}")
    stream = iter_streamed(files, opener=opener, threads=threads)  # reading starts now
    try:
        config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(str(path))
        cls = concrete_class(model_class or transformers.AutoModelForCausalLM, config)
        model = _skeleton(cls, config, dtype or _config_dtype(config), **kwargs)
        keys = set(model.state_dict())
        prefix = (getattr(model, "base_model_prefix", "") or "") + "."
        state, unexpected = {}, []
        for name, tensor in stream:
            key = name if name in keys else (prefix + name if prefix + name in keys else
                                              name.removeprefix(prefix))
            if key not in keys:
                unexpected.append(name)
                continue
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            state[key] = tensor
    finally:
        stream.close()
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that do not fit
        raise EnecError(f"the checkpoint in {path} does not fit {cls.__name__}: {exc}") from None
    del state
    model.tie_weights()
    missing = unfilled(model)
    if missing:
        raise EnecError(f"the checkpoint in {path} does not fill {cls.__name__}: {len(missing)} parameters "
                        f"missing, e.g. {missing[:5]}")
    buffers = {n.rpartition(".")[2] for n, _ in model.named_buffers()}
    skipped = [n for n in unexpected if n.rpartition(".")[2] not in buffers]  # (legacy buffers)
    if skipped:
        import warnings

        warnings.warn(f"{len(skipped)} checkpoint tensors have no place in {cls.__name__} and were skipped, "
                      f"e.g. {skipped[:5]}", stacklevel=2)
    model.eval()
    _attach_generation_config(model, path)
    model.enec_source = [str(f) for f in files]
    return model


def load_resident(path, *, model_class, dtype=None, threads=None, options: dict, **kwargs):
    """Build a model from a compressed folder keeping its large weights compressed
    (``enec.from_pretrained(path, resident=True)``); the full model is never decoded."""
    import math

    import torch
    import transformers

    from .resident import CompressedWeight, ResidentModel
    from .resident_base import DEFAULT_MIN_NUMEL

    options = dict(options)
    unknown = set(options) - {"min_numel", "buffer_bytes", "chunk_bytes", "prefetch", "memory_budget"}
    if unknown:
        raise EnecError(f"unknown resident_options {sorted(unknown)}; known: buffer_bytes, chunk_bytes, "
                        "memory_budget, min_numel, prefetch")
    min_numel = options.pop("min_numel", DEFAULT_MIN_NUMEL)
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(str(path))
    cls = concrete_class(model_class, config)
    if dtype is None:
        dtype = _config_dtype(config)
    model = _skeleton(cls, config, dtype, **kwargs)
    model.eval()
    slots = dict(model.named_parameters(remove_duplicate=False))
    floats = (torch.bfloat16, torch.float16, torch.float32)

    def owner(name):
        mod, _, attr = name.rpartition(".")
        try:
            return model.get_submodule(mod), attr
        except AttributeError:
            return None, attr

    def keep(name, dt, shape):
        m, attr = owner(name)
        return (attr == "weight" and isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and dt in floats
                and math.prod(shape) >= min_numel)

    weights: dict[int, CompressedWeight] = {}
    unexpected = []
    for name, value in iter_tensors(path, threads=threads, keep=keep):
        m, attr = owner(name)
        if m is None or name not in slots:
            unexpected.append(name)
            continue
        if isinstance(value, torch.Tensor):
            if attr in m._parameters:
                want = slots[name].dtype
                m._parameters[attr] = torch.nn.Parameter(value.to(want), requires_grad=False)
            else:
                m._buffers[attr] = value
            continue
        w = CompressedWeight(value, name)
        if w.dtype != dtype:
            raise EnecError(f"{name} is stored as {w.dtype}; a resident model keeps weights in their "
                            f"stored dtype, so load it with dtype={w.dtype} (got {dtype})")
        if tuple(slots[name].shape) != w.shape:
            raise EnecError(f"{name}: checkpoint shape {w.shape} does not match the model's "
                            f"{tuple(slots[name].shape)}")
        ph = w.placeholder()
        weights[id(ph)] = w
        m._parameters[attr] = ph
    model.tie_weights()
    missing = unfilled(model)
    if missing or unexpected:
        raise EnecError(f"the checkpoint does not fit {cls.__name__}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]} (resident loading needs checkpoint names equal to "
                        "the model's parameter names; load with resident=False instead)")
    _attach_generation_config(model, path)
    handle = ResidentModel(model, weights, threads=threads, **options)
    model.enec_resident = handle
    return model


def unfilled(model) -> list[str]:
    """Names of the parameters still on the meta device (no checkpoint tensor reached them)."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]


def _config_dtype(config):
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _skeleton(cls, config, dtype, **kwargs):
    """``cls`` built from ``config`` on the meta device with no weight initialised (all of
    them are assigned afterwards; initialising meta tensors still runs torch's reference
    kernels, two thirds of the build time of a small model). Buffers are real: models compute
    some of them (position ids, rotary frequencies) in their constructors."""
    from accelerate import init_empty_weights

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    with init_empty_weights(include_buffers=False), no_init_weights():
        return cls._from_config(config, dtype=dtype, **kwargs)


def concrete_class(model_class, config):
    """The model class an ``Auto*`` class picks for ``config`` (other classes unchanged)."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return model_class
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, mapping)
    except (KeyError, ValueError) as exc:
        raise EnecError(f"{model_class.__name__} has no model for a {type(config).__name__}: {exc}") from None


def _attach_generation_config(model, path: Path) -> None:
    if (path / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))


def export_gguf(gguf_file, dst, *, dtype: str = "bfloat16", max_shard_size: str | int = "5GB") -> Path:
    """Write a GGUF checkpoint (as ``transformers`` dequantizes it) as a plain safetensors folder.

    ``save_pretrained`` refuses GGUF-loaded models, so the model is rebuilt from its config
    without the quantization config and the state dict moved over. The folder gets the
    config, generation config and tokenizer, and loads with ``from_pretrained(dst)``.
    """
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise EnecError(f"no such GGUF file: {gguf_file}")
    dst = Path(dst)
    torch_dtype = getattr(torch, dtype)
    src = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                               dtype=torch_dtype)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(src.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    result = model.load_state_dict(src.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise EnecError(f"GGUF export of {gguf_file.name} lost tensors: {result}")
    model.generation_config = src.generation_config
    from .fileio import Output

    with Output(dst, folder=True) as out:
        model.save_pretrained(str(out.tmp), max_shard_size=max_shard_size)
        tok.save_pretrained(str(out.tmp))
    return dst
