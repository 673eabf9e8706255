"""vLLM v1 KV connector: kvserve-compressed KV from a prefill (producer) instance to a decode
(consumer) instance, through a store keyed by the prompt.

Load it with::

    KVTransferConfig(kv_connector="KVServeConnector",
                     kv_connector_module_path="kvserve.serving.vllm_connector",
                     kv_role="kv_producer" | "kv_consumer" | "kv_both",
                     kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"store": "/path/to/dir", "compression": ...})

``kv_connector_extra_config``:

* ``store``: a directory (default ``$TMPDIR/kvserve-kv``) both instances see, or a Redis
  server ``"redis://host:port"`` (needs the ``redis`` package).
* ``compression`` (producer): a packaged profile name (``"kvserve"``, ``"bf16"``, ...), a
  profile config dict, a JSON file, or ``{"mode": "controller", "bandwidth_mbps": B,
  "slo_ms": S, "min_quality": Q, "epsilon": e, "seed": s, "library": path, "t_model_ms": t}``
  to let :class:`kvserve.controller.Controller` choose per request (after each save it is fed
  the measured encode + store time plus the bundle's modelled transfer time at ``B``). The chosen profile travels in
  the bundle (kvserve bundles carry their config), so the consumer needs no setting.
  A request may override it with ``kv_transfer_params={"kvserve_compression": ...}``, or give
  the controller its own bandwidth estimate with ``{"kvserve_bandwidth_mbps": B}``.
* Requests are keyed by a hash of their prompt tokens (and ``namespace``), or by
  ``kv_transfer_params["kvserve_key"]`` (letters and digits): the producer's outputs carry
  the key they were stored under in ``kv_transfer_params``, for a router to pass on.
  Client-chosen keys live in their own namespace (store key ``u<key>``, prompt hashes
  ``p<hash>``), so a request cannot name or overwrite another prompt's entry.
* ``namespace``: mixed into the store key (e.g. a model id), default ``""``.
* ``overwrite``: the producer rewrites bundles that already exist (default ``False``).
* ``secret``: the deployment's shared secret (default ``KVSERVE_SECRET``; at least 16 bytes,
  required): every stored bundle is sealed with it (:mod:`kvserve.serving.store`).
* ``accept_profiles`` (consumer): the profiles a loaded bundle may carry: a list of profile
  names or config dicts, or ``"any"``; default: the packaged profiles and the entries of
  the packaged profile library.

Every bundle is bound to the model (``model_config.model``) and to the sha256 of the token
ids it encodes; the consumer checks that binding against its own request's tokens (and the
seal, and the profile) before it reports a hit, and again before it writes any block: KV
computed for other tokens, another model or by a party without the secret is a miss.

Hook order (vLLM >= 0.32 ``KVConnectorBase_V1``; scheduler and worker may be different
processes, only :class:`KVServeConnectorMetadata` crosses between them):

* scheduler, consumer: ``get_num_new_matched_tokens`` finds the prompt's bundle(s) in the store,
  checks their framing and CRC and reports ``len(prompt) - 1 - num_computed`` tokens as a
  synchronous load (the last prompt token is computed locally to get logits); a missing or
  corrupt bundle reports 0, so vLLM computes the prefill itself.
  ``update_state_after_alloc`` remembers the load, ``build_connector_meta`` hands the worker
  the request's block ids and token range.
* scheduler, producer: ``build_connector_meta`` follows each request's blocks (chunked
  prefill, preemption) and asks for a save in the step that completes its prompt.
* worker, consumer: ``start_load_kv`` (before the forward) reads, decodes and scatters the
  KV into the paged blocks; a failure is reported through ``get_block_ids_with_load_errors``
  (with ``kv_load_failure_policy="recompute"`` vLLM then recomputes those tokens).
* worker, producer: ``save_kv_layer`` (after each attention layer) gathers the prompt's KV of
  that layer from the paged cache; ``wait_for_save`` (end of the step) compresses all layers
  into one bundle and writes it (atomically) to the store.

Paged layout (gather/scatter on the cache's own device, the CPU backend's packed tiles,
virtual block splitting): :mod:`kvserve.serving.paged`. The push (profile choice, encode,
store, controller feedback): :mod:`kvserve.serving.push`. Stores: :mod:`kvserve.serving.store`.
MLA (single latent cache) and quantized (fp8) KV caches are refused with a clear error
(:class:`kvserve.errors.KVServeConnectorError`).

One bundle per (tensor-parallel, pipeline-parallel) rank: ``<key>.tp<r>-<R>.pp<p>-<P>.kvsv``;
each holds that rank's layers and heads, with the layer names in its ``meta``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ..errors import KVServeConnectorError, KVServeError
from ..library import load_library
from ..pipeline import Pipeline, decode, load_profile, parse_header, profile_names
from .paged import CPU_BACKENDS, gather_tokens, probe_cpu_tile_layout, scatter_tokens, split_kv, token_slots
from .push import Pusher, Sent, controller_from_settings, resolve_compression
from .store import open_store, token_digest

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# under "vllm." so that vLLM's own log configuration shows these lines with its others
logger = logging.getLogger("vllm.kvserve_connector")

# Process-wide counters (scheduler and worker roles each add theirs); for tests and logs.
STATS: dict[str, int] = {
    "lookups": 0, "hits": 0, "misses": 0, "corrupt": 0, "loads": 0, "loaded_tokens": 0,
    "load_errors": 0, "saves": 0, "saved_tokens": 0, "saved_bytes": 0, "raw_bytes": 0,
}
_STATS_LOCK = threading.Lock()


def _count(**kw: int) -> None:
    with _STATS_LOCK:
        for k, v in kw.items():
            STATS[k] = STATS.get(k, 0) + int(v)


def _sync_allowed():
    """vLLM's marker for deliberate device<->host copies (checked under VLLM_GPU_SYNC_CHECK)."""
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    except ImportError:  # older vLLM
        import contextlib

        return contextlib.nullcontext()
    return gpu_sync_allowed()


# --------------------------------------------------------------------- keys


def prompt_key(token_ids, namespace: str = "") -> str:
    """Store key of a prompt: sha256 over the namespace and the int64 token ids."""
    h = hashlib.sha256(namespace.encode("utf-8") + b"\0")
    h.update(np.asarray(list(token_ids), dtype="<i8").tobytes())
    return h.hexdigest()[:40]


def rank_tag(tp_rank: int, tp_size: int, pp_rank: int, pp_size: int) -> str:
    return f"tp{tp_rank}-{tp_size}.pp{pp_rank}-{pp_size}"


def bundle_key(key: str, tag: str) -> str:
    """The store key of one rank's bundle of a request: ``<key>.<rank tag>``."""
    return f"{key}.{tag}"


# --------------------------------------------------------------------- metadata


@dataclass
class _Transfer:
    req_id: str
    key: str
    block_ids: tuple[list[int], ...]  # per KV-cache group
    start: int  # first token to load / always 0 for saves
    end: int  # one past the last token
    is_store: bool
    compression: Any = None  # per-request override (saves)
    bandwidth_mbps: float | None = None  # per-request bandwidth estimate (saves, controller)
    tokens: str = ""  # sha256 of the token ids the bundle holds / must hold (store.token_digest)


@dataclass
class KVServeConnectorMetadata(KVConnectorMetadata):
    transfers: list[_Transfer] = field(default_factory=list)


@dataclass
class _Tracked:
    """Producer-side state of a request whose prompt is not saved yet."""

    key: str
    prompt_len: int
    block_ids: list[list[int]]
    compression: Any = None
    bandwidth_mbps: float | None = None
    tokens: str = ""
    public_key: str = ""


def canonical_profile(config: dict) -> str:
    """A profile config as the bundle stores it (every stage parameter filled in), as JSON."""
    return json.dumps(Pipeline.from_config(config).get_config(), sort_keys=True)


def accepted_profiles(spec: Any) -> set[str] | None:
    """:func:`canonical_profile` of every profile a consumer accepts (None: any)."""
    if spec == "any":
        return None
    if spec is None:
        configs = [load_profile(n) for n in profile_names()] + [e.config for e in load_library().entries]
    elif isinstance(spec, list):
        configs = [load_profile(x) if isinstance(x, str) else resolve_compression(x)[1] for x in spec]
    else:
        raise KVServeConnectorError("accept_profiles must be a list of profile names/configs or 'any'")
    return {canonical_profile(c) for c in configs}


# --------------------------------------------------------------------- the connector


class KVServeConnector(KVConnectorBase_V1):
    """kvserve compression for prefill -> decode KV transfer (see the module docstring)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        extra = dict(cfg.kv_connector_extra_config or {})
        known = {"store", "compression", "namespace", "overwrite", "secret", "accept_profiles"}
        unknown = set(extra) - known
        if unknown:
            raise KVServeConnectorError(f"kv_connector_extra_config: unknown key(s) {sorted(unknown)}; known {sorted(known)}")
        self._store = open_store(extra.get("store"), extra.get("secret"))
        model_config = vllm_config.model_config
        self._model_id = str(getattr(model_config, "model", "") or "") if model_config is not None else ""
        self._accept = accepted_profiles(extra.get("accept_profiles")) if cfg.is_kv_consumer else None
        self._namespace = str(extra.get("namespace", ""))
        self._overwrite = bool(extra.get("overwrite", False))
        self._producer = bool(cfg.is_kv_producer)
        self._consumer = bool(cfg.is_kv_consumer)
        self._block_size = vllm_config.cache_config.block_size
        cache_dtype = str(vllm_config.cache_config.cache_dtype)
        if cache_dtype not in ("auto", "bfloat16", "float16", "half", "float32", "float"):
            raise KVServeConnectorError(f"KV cache dtype {cache_dtype!r} is not supported (bf16/fp16/fp32 only)")
        if vllm_config.model_config is not None and getattr(vllm_config.model_config, "use_mla", False):
            raise KVServeConnectorError("MLA models (one latent KV cache) are not supported")
        par = vllm_config.parallel_config
        self._tp_size, self._pp_size = par.tensor_parallel_size, par.pipeline_parallel_size
        self._tags = [rank_tag(t, self._tp_size, p, self._pp_size)
                      for p in range(self._pp_size) for t in range(self._tp_size)]
        self._layer_group: dict[str, int] = {}
        for gi, group in enumerate(kv_cache_config.kv_cache_groups if kv_cache_config else []):
            for name in group.layer_names:
                self._layer_group[name] = gi
        # compression is chosen where the KV is: on the worker
        self._pusher: Pusher | None = None
        if self._producer:
            mode, setting = resolve_compression(extra.get("compression"))  # fails early on a bad setting
            if role == KVConnectorRole.WORKER:
                self._fixed = setting if mode == "fixed" else None
                self._bandwidth = float(setting["bandwidth_mbps"]) if mode == "controller" else None
                self._pusher = Pusher(
                    (lambda: controller_from_settings(setting)) if mode == "controller" else None,
                    t_model_ms=float(setting.get("t_model_ms", 0.0)) if mode == "controller" else 0.0)
                if mode == "controller":
                    self._pusher.controller  # build it now: a bad library fails at start-up
        # scheduler state
        self._verdicts: dict[str, tuple[str, int, str]] = {}  # req_id -> (key, tokens available, digest)
        self._pending_loads: dict[str, _Transfer] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._saved_keys: dict[str, str] = {}
        # worker state
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layer_info: dict[str, tuple[str, int | None, str | None]] = {}
        self._gathered: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._failed_blocks: set[int] = set()
        self._warned_cast = False
        self._my_tag: str | None = None

    # ---------------------------------------------------------------- worker side

    def _tag(self) -> str:
        if self._my_tag is None:
            tp = pp = 0
            try:
                from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

                tp = get_tensor_model_parallel_rank()
                pp = get_pp_group().rank_in_group
            except Exception:  # not initialised (single process tools)
                pass
            self._my_tag = rank_tag(tp, self._tp_size, pp, self._pp_size)
        return self._my_tag

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._kv_caches = dict(kv_caches)
        layers = self._vllm_config.compilation_config.static_forward_context
        for name in kv_caches:
            self._layer_info[name] = self._describe_layer(layers.get(name))

    @staticmethod
    def _describe_layer(layer) -> tuple[str, int | None, str | None]:
        """(attention backend name, head size, CPU kernel ISA) of an attention layer."""
        backend = getattr(layer, "attn_backend", None)
        bname = backend.get_name() if backend is not None else ""
        if "MLA" in bname.upper():
            raise KVServeConnectorError(f"attention backend {bname} (MLA) is not supported")
        isa = getattr(layer, "isa", None) or getattr(getattr(layer, "impl", None), "isa", None)
        return bname, getattr(layer, "head_size", None), isa

    def _layer(self, name: str, kv_layer: torch.Tensor | None = None):
        """(key view, value view, kernel block size, key perm, value perm) of a layer."""
        if name not in self._layer_info:
            from vllm.forward_context import get_forward_context

            self._layer_info[name] = self._describe_layer(get_forward_context().no_compile_layers.get(name))
        kv = kv_layer if kv_layer is not None else self._kv_caches[name]
        backend, head_size, isa = self._layer_info[name]
        k, v = split_kv(kv, backend, head_size)
        perm_k = perm_v = None
        if backend in CPU_BACKENDS:
            if isa is None:
                raise KVServeConnectorError(f"layer {name}: CPU attention layer without an ISA")
            perm_k, perm_v = probe_cpu_tile_layout(isa, k.dtype, k.shape[1], k.shape[2], k.shape[3])
        return k, v, k.shape[2], perm_k, perm_v

    def _blocks_of(self, tr: _Transfer, name: str) -> list[int]:
        return tr.block_ids[self._layer_group.get(name, 0)]

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVServeConnectorMetadata):
            return
        for tr in meta.transfers:
            if tr.is_store:
                continue
            try:
                t0 = time.perf_counter()
                profile = self._load(tr, forward_context)
                _count(loads=1, loaded_tokens=tr.end - tr.start)
                logger.info("kvserve: loaded tokens %d..%d of request %s (profile %r) in %.1f ms",
                            tr.start, tr.end, tr.req_id, profile, (time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # any failure: report the blocks, vLLM recomputes them
                _count(load_errors=1)
                logger.warning("kvserve: loading KV of request %s failed (%s: %s); its blocks are reported "
                               "for recomputation", tr.req_id, type(exc).__name__, exc)
                for ids in tr.block_ids:
                    first, last = tr.start // self._block_size, (tr.end - 1) // self._block_size
                    self._failed_blocks.update(ids[first:last + 1])

    def _load(self, tr: _Transfer, forward_context) -> str:
        """Fetch, decode and scatter one request's KV; returns the bundle's profile name."""
        data = self._store.get(bundle_key(tr.key, self._tag()))  # KVServeError unless the seal verifies
        if data is None:
            raise KVServeConnectorError(f"bundle {tr.key}.{self._tag()} is missing from the store")
        self._check_header(parse_header(data)[0], tr.tokens)
        if not self._kv_caches and forward_context is not None:
            for name, layer in forward_context.no_compile_layers.items():
                cache = getattr(layer, "kv_cache", None)
                if isinstance(cache, torch.Tensor):
                    self._kv_caches[name] = cache
        # the prompt's KV for these caches (len(prompt) = tr.end + 1 tokens) bounds the decode
        views = [self._layer(name)[:2] for name in self._kv_caches]
        limit = 2 * (tr.end + 1) * sum(k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3] for k, v in views)
        kv, meta = decode(data, max_bytes=limit)
        names = meta.get("layers")
        if not isinstance(names, list) or len(names) != len(kv):
            raise KVServeConnectorError("bundle meta has no layer names")
        by_name = dict(zip(names, kv))
        missing = [n for n in self._kv_caches if n not in by_name]
        if missing:
            raise KVServeConnectorError(f"bundle lacks layer(s) {missing[:3]}")
        # check everything before touching any block
        plan = []
        for name in self._kv_caches:
            k_cache, v_cache, kbs, pk, pv = self._layer(name)
            k, v = by_name[name]
            for x, cache in ((k, k_cache), (v, v_cache)):
                if x.shape[0] != 1 or x.shape[1] != cache.shape[1] or x.shape[3] != cache.shape[3] or x.shape[2] < tr.end:
                    raise KVServeConnectorError(
                        f"layer {name}: bundle KV {tuple(x.shape)} does not fit the cache "
                        f"(heads {cache.shape[1]}, head size {cache.shape[3]}, {tr.end} tokens)")
            plan.append((name, k_cache, v_cache, kbs, pk, pv, k, v))
        with _sync_allowed():  # host -> device copies of the decoded KV, on purpose
            for name, k_cache, v_cache, kbs, pk, pv, k, v in plan:
                blk, off = token_slots(self._blocks_of(tr, name), self._block_size, kbs, tr.start, tr.end, k_cache.device)
                scatter_tokens(k_cache, blk, off, k[:, :, tr.start:tr.end], pk)
                scatter_tokens(v_cache, blk, off, v[:, :, tr.start:tr.end], pv)
        return parse_header(data)[0]["profile"].get("name", "")

    def _check_header(self, header: dict, tokens: str) -> None:
        """A bundle may be used only for the tokens (digest) it is bound to, on this model,
        with a profile this consumer accepts."""
        bound = (header.get("meta") or {}).get("bind") if isinstance(header.get("meta"), dict) else None
        if bound != {"model": self._model_id, "tokens": tokens}:
            raise KVServeConnectorError("bundle is bound to another model or other tokens than this request's")
        if self._accept is not None and canonical_profile(header.get("profile")) not in self._accept:
            raise KVServeConnectorError(f"bundle profile {header.get('profile', {}).get('name')!r} is not accepted here")

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous (start_load_kv finishes before the forward)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVServeConnectorMetadata):
            return
        saves = [tr for tr in meta.transfers if tr.is_store]
        if not saves:
            return
        k_cache, v_cache, kbs, pk, pv = self._layer(layer_name, kv_layer)
        for tr in saves:
            # gathered copies stay on the cache's device until wait_for_save: no host sync
            # inside the forward (the index tensors are built on the host and sent once)
            with _sync_allowed():
                blk, off = token_slots(self._blocks_of(tr, layer_name), self._block_size, kbs, 0, tr.end, k_cache.device)
            k = gather_tokens(k_cache, blk, off, pk)
            v = gather_tokens(v_cache, blk, off, pv)
            self._gathered.setdefault(tr.req_id, {})[layer_name] = (k, v)

    def wait_for_save(self):
        meta = self._connector_metadata
        if not isinstance(meta, KVServeConnectorMetadata):
            return
        for tr in meta.transfers:
            if not tr.is_store:
                continue
            layers = self._gathered.pop(tr.req_id, None)
            if not layers:
                logger.warning("kvserve: no KV was gathered for request %s; nothing saved", tr.req_id)
                continue
            try:
                self._save(tr, layers)
            except Exception as exc:  # a failed save is a later cache miss, never a failed request
                logger.warning("kvserve: saving KV of request %s failed (%s: %s)", tr.req_id, type(exc).__name__, exc)
        self._gathered.clear()

    def _save(self, tr: _Transfer, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        names = list(layers)
        first = layers[names[0]][0]
        if first.dtype != torch.bfloat16 and not self._warned_cast:
            logger.warning("kvserve: KV cache is %s; bundles hold bf16 (not lossless for this dtype)", first.dtype)
            self._warned_cast = True
        with _sync_allowed():  # device -> host copies of the prompt's KV, on purpose
            kv = [(k.to(device="cpu", dtype=torch.bfloat16), v.to(device="cpu", dtype=torch.bfloat16))
                  for k, v in (layers[n] for n in names)]
        override = resolve_compression(tr.compression) if tr.compression is not None else None
        profile = override[1] if override is not None and override[0] == "fixed" else self._fixed
        bandwidth = tr.bandwidth_mbps or self._bandwidth
        name = bundle_key(tr.key, self._tag())

        def put(blob: bytes, progress) -> Sent:
            # the store is not the link: the controller is told the store time plus the
            # bundle's modelled transfer at the bandwidth it decided for
            t0 = time.perf_counter()
            self._store.put(name, blob)
            ms = (time.perf_counter() - t0) * 1e3
            if bandwidth:
                ms += len(blob) * 8 / (bandwidth * 1e3)
            return Sent(transfer_ms=ms)

        meta = {"seq_len": tr.end, "layers": names, "key": tr.key, "block_size": self._block_size,
                "bind": {"model": self._model_id, "tokens": tr.tokens}}
        res = self._pusher.push(kv, profile, meta, put,
                                bandwidth_mbps=bandwidth, replan=False)
        raw, size = res["raw_bytes"], res["kv_bytes"]
        _count(saves=1, saved_tokens=tr.end, saved_bytes=size, raw_bytes=raw)
        logger.info("kvserve: saved %d tokens of request %s with profile %r: %d -> %d bytes (%.2fx)",
                    tr.end, tr.req_id, res["profile"], raw, size, raw / max(1, size))

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._failed_blocks = self._failed_blocks, set()
        return out

    # ---------------------------------------------------------------- scheduler side

    def _key(self, request: "Request") -> tuple[str, str]:
        """(store key, the key a router passes on). The public key is
        ``kv_transfer_params["kvserve_key"]`` when given and well-formed (store key
        ``u<key>``), else the prompt's hash (store key ``p<hash>``); a given key equal to this
        prompt's own hash is that hash (the producer returned it)."""
        own = prompt_key(request.prompt_token_ids or [], self._namespace)
        given = (request.kv_transfer_params or {}).get("kvserve_key")
        if given is not None:
            if isinstance(given, str) and 0 < len(given) <= 128 and given.isascii() and given.isalnum():
                return ("p" + own, own) if given == own else ("u" + given, given)
            logger.warning("kvserve: ignoring malformed kvserve_key %r of request %s", given, request.request_id)
        return "p" + own, own

    def _available(self, key: str, prompt: list[int]) -> tuple[int, str]:
        """(tokens every rank's bundle in the store holds, the digest of those prompt tokens);
        0 if any is missing, does not verify, is bound to other tokens or another model, or
        carries a profile this consumer does not accept."""
        tokens, digest = None, ""
        for tag in self._tags:
            try:
                data = self._store.get(bundle_key(key, tag))  # seal
                if data is None:
                    _count(misses=1)
                    return 0, ""
                header, _ = parse_header(data)  # framing and CRC
                n = int(header["meta"]["seq_len"])
                if not 0 < n <= len(prompt):
                    raise KVServeConnectorError(f"bundle holds {n} tokens, the prompt has {len(prompt)}")
                d = token_digest(prompt[:n])
                self._check_header(header, d)
            except (KVServeError, KeyError, TypeError, ValueError, OverflowError) as exc:
                _count(corrupt=1)
                logger.warning("kvserve: bundle %s.%s is unusable (%s); the prefill is computed instead", key, tag, exc)
                return 0, ""
            if tokens is not None and n != tokens:
                logger.warning("kvserve: the ranks' bundles of %s hold different token counts", key)
                return 0, ""
            tokens, digest = n, d
        return tokens or 0, digest

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._consumer:
            return 0, False
        prompt = request.prompt_token_ids or []
        want = len(prompt) - 1  # the last prompt token is computed here, for its logits
        if want <= num_computed_tokens:
            return 0, False
        if request.request_id not in self._verdicts:
            key = self._key(request)[0]
            _count(lookups=1)
            avail, digest = self._available(key, prompt)
            if avail >= want:
                _count(hits=1)
            self._verdicts[request.request_id] = (key, avail, digest)
        key, avail, _ = self._verdicts[request.request_id]
        if avail < want:
            return 0, False
        return want - num_computed_tokens, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        key, _, digest = self._verdicts[request.request_id]
        end = len(request.prompt_token_ids or []) - 1
        self._pending_loads[request.request_id] = _Transfer(
            request.request_id, key, tuple(list(b) for b in blocks.get_block_ids()),
            end - num_external_tokens, end, is_store=False, tokens=digest)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVServeConnectorMetadata()
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            rid = new.req_id
            if rid in self._pending_loads:
                tr = self._pending_loads.pop(rid)
                tr.block_ids = tuple(list(b) for b in new.block_ids)
                meta.transfers.append(tr)
                continue
            if self._producer and new.prompt_token_ids:
                tracked = self._tracked.get(rid)
                if tracked is None:
                    continue
                tracked.block_ids = [list(b) for b in new.block_ids]
                self._maybe_save(meta, rid, new.num_computed_tokens + sched.get(rid, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if rid in self._pending_loads:  # a resumed request that loads again
                tr = self._pending_loads.pop(rid)
                if new_ids is not None:
                    tr.block_ids = tuple(list(b) for b in new_ids)
                meta.transfers.append(tr)
                continue
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            if new_ids is not None:
                if rid in cached.resumed_req_ids:
                    tracked.block_ids = [list(b) for b in new_ids]
                else:
                    for g, ids in enumerate(new_ids):
                        tracked.block_ids[g].extend(ids)
            self._maybe_save(meta, rid, cached.num_computed_tokens[i] + sched.get(rid, 0))
        for rid, tr in list(self._pending_loads.items()):  # allocated but not scheduled: keep for later
            logger.debug("kvserve: load of %s not scheduled this step", rid)
        return meta

    def _maybe_save(self, meta: KVServeConnectorMetadata, rid: str, computed_after_step: int) -> None:
        tracked = self._tracked[rid]
        if computed_after_step < tracked.prompt_len:
            return
        meta.transfers.append(_Transfer(rid, tracked.key, tuple(tracked.block_ids), 0, tracked.prompt_len,
                                        is_store=True, compression=tracked.compression,
                                        bandwidth_mbps=tracked.bandwidth_mbps, tokens=tracked.tokens))
        self._saved_keys[rid] = tracked.public_key
        del self._tracked[rid]

    def on_new_request(self, request: "Request") -> None:
        if not self._producer:
            return
        prompt = request.prompt_token_ids or []
        if len(prompt) < 2:
            return
        key, public = self._key(request)
        if not self._overwrite and all(self._store.exists(bundle_key(key, t)) for t in self._tags):
            return  # already in the store
        params = request.kv_transfer_params or {}
        bw = params.get("kvserve_bandwidth_mbps")
        if bw is not None and not (isinstance(bw, (int, float)) and bw > 0):
            logger.warning("kvserve: ignoring kvserve_bandwidth_mbps %r of request %s", bw, request.request_id)
            bw = None
        self._tracked[request.request_id] = _Tracked(key, len(prompt), [], params.get("kvserve_compression"), bw,
                                                     token_digest(prompt), public)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._tracked.pop(rid, None)
        self._pending_loads.pop(rid, None)
        self._verdicts.pop(rid, None)
        key = self._saved_keys.pop(rid, None)
        return False, ({"kvserve_key": key} if key else None)
