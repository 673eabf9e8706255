"""vLLM v1 KV connector: kvserve-compressed KV from a prefill (producer) instance to a decode
(consumer) instance, through a store keyed by the prompt or pushed directly to the consumer.

Load it with::

    KVTransferConfig(kv_connector="KVServeConnector",
                     kv_connector_module_path="kvserve.serving.vllm_connector",
                     kv_role="kv_producer" | "kv_consumer" | "kv_both",
                     kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"store": "/path/to/dir", "compression": ...})

``kv_connector_extra_config``:

* ``transfer``: ``"store"`` (default: bundles go through a store both instances reach, which
  also serves repeated prompts) or ``"direct"`` (the producer pushes each bundle over the
  authenticated KV channel to the consumer; no store, see below).
* ``store`` (store mode): a directory (default ``$TMPDIR/kvserve-kv``) both instances see, or a
  Redis server ``"redis://host:port"`` (needs the ``redis`` package).
* ``peer`` (direct mode, producer): the consumer's ``"host:port"``, or a list of them (the
  first is the default; a request picks another of the list with
  ``kv_transfer_params={"kvserve_peer": "host:port"}``).
* ``listen`` (direct mode, consumer): ``"host:port"`` its receiver binds (port 0: any free
  port, logged); ``inbox_mb`` (default 4096) and ``inbox_ttl_s`` (default 600) bound the
  bundles it holds until their requests come; ``push_timeout_s`` (producer, default 10): the
  push's connect/reply timeout (one retry).
* ``compression`` (producer): a packaged profile name (``"kvserve"``, ``"bf16"``, ...), a
  profile config dict, a JSON file, or ``{"mode": "controller", "bandwidth_mbps": B,
  "slo_ms": S, "min_quality": Q, "epsilon": e, "seed": s, "library": path, "t_model_ms": t}``
  to let :class:`kvserve.controller.Controller` choose per request. Store mode: it decides at
  ``B`` and after each save is fed the measured encode + store time plus the bundle's
  modelled transfer time at ``B``. Direct mode: ``B`` is the initial bandwidth estimate; the
  controller decides from the live estimate of the producer's pushes, is fed what each push
  saw, and re-plans mid-transfer when the link is far slower than assumed
  (:class:`kvserve.serving.push.Pusher`, as the embedded PD engine does). The chosen profile
  travels in the bundle (kvserve bundles carry their config), so the consumer needs no setting.
  A request may override it with ``kv_transfer_params={"kvserve_compression": ...}``, or give
  the controller its own bandwidth estimate with ``{"kvserve_bandwidth_mbps": B}``.
* Requests are keyed by a hash of their prompt tokens (and ``namespace``), or by
  ``kv_transfer_params["kvserve_key"]`` (letters and digits): the producer's outputs carry
  the key they were stored under (and the producer's tensor-parallel size, ``kvserve_tp``) in
  ``kv_transfer_params``, for a router to pass on.
  Client-chosen keys live in their own namespace (store key ``u<key>``, prompt hashes
  ``p<hash>``), so a request cannot name or overwrite another prompt's entry.
* ``namespace``: mixed into the store key (e.g. a model id), default ``""``.
* ``overwrite`` (store mode): the producer rewrites bundles that already exist (default ``False``).
* ``secret``: the deployment's shared secret (default ``KVSERVE_SECRET``; at least 16 bytes,
  required): every stored bundle is sealed with it (:mod:`kvserve.serving.store`), every
  direct push is authenticated with it (:mod:`kvserve.serving.transport`).
* ``accept_profiles`` (consumer): the profiles a loaded bundle may carry: a list of profile
  names or config dicts, or ``"any"``; default: the packaged profiles and the entries of
  every packaged profile library (``smollm2``, ``smollm2-ppl``).
* ``producer_tp`` (consumer): the producer's tensor-parallel size (default: the consumer's
  own); a request's ``kv_transfer_params["kvserve_tp"]`` (the producer returns it) overrides it.

Every bundle is bound to the model (``model_config.model``) and to the sha256 of the token
ids it encodes; the consumer checks that binding against its own request's tokens (and the
seal or the channel's authentication, and the profile) before it reports a hit, and again
before it writes any block: KV computed for other tokens, another model or by a party
without the secret is a miss.

Hook order (vLLM >= 0.32 ``KVConnectorBase_V1``; scheduler and worker may be different
processes, only :class:`KVServeConnectorMetadata` crosses between them):

* scheduler, consumer: ``get_num_new_matched_tokens`` finds the prompt's bundle(s) in the store
  (direct mode: in the receiver's inbox), checks their framing, CRC and binding and reports
  ``len(prompt) - 1 - num_computed`` tokens as a synchronous load (the last prompt token is
  computed locally to get logits); a missing or corrupt bundle reports 0, so vLLM computes
  the prefill itself. ``update_state_after_alloc`` remembers the load, ``build_connector_meta``
  hands the worker the request's block ids and token range (direct mode: and the received
  bundles themselves, so the worker needs no access to the scheduler's process).
* scheduler, producer: ``build_connector_meta`` follows each request's blocks (chunked
  prefill, preemption) and asks for a save in the step that completes its prompt.
* worker, consumer: ``start_load_kv`` (before the forward) reads, decodes and scatters the
  KV into the paged blocks; a failure is reported through ``get_block_ids_with_load_errors``
  (with ``kv_load_failure_policy="recompute"`` vLLM then recomputes those tokens).
* worker, producer: ``save_kv_layer`` (after each attention layer) gathers the prompt's KV of
  that layer from the paged cache; ``wait_for_save`` (end of the step) compresses all layers
  into one bundle and writes it (atomically) to the store, or pushes it to the consumer.

Direct mode: the consumer's scheduler-side connector runs a
:class:`kvserve.serving.direct.BundleReceiver` on ``listen``; a pushed bundle is kept (in
memory, bounded) only if its key names a rank layout this model can have, its framing and CRC
check, it is bound to this model, carries an accepted profile and has this model's geometry
(heads of its rank, head size, at most ``max_model_len`` tokens), all without decoding it.
The producer pushes in ``wait_for_save`` and the push is acknowledged after those checks, so
the producer's output (which a router waits for) comes after the bundle is at the consumer.

Device path: on a CUDA cache the gathered KV stays on the device and is encoded there
(:mod:`kvserve.stages.gpu`); a consumer decodes straight onto its cache's device and scatters
there. Only the compressed bundle crosses the host (the wire or the store needs bytes).

Paged layout (gather/scatter on the cache's own device, the CPU backend's packed tiles,
virtual block splitting, the tensor-parallel head layout): :mod:`kvserve.serving.paged`. The
push (profile choice, encode, store or send, controller feedback):
:mod:`kvserve.serving.push`. Stores: :mod:`kvserve.serving.store`; direct receiver:
:mod:`kvserve.serving.direct`. MLA (single latent cache) and quantized (fp8) KV caches are
refused with a clear error (:class:`kvserve.errors.KVServeConnectorError`).

One bundle per (tensor-parallel, pipeline-parallel) rank: ``<key>.tp<r>-<R>.pp<p>-<P>``; each
holds that rank's layers and KV heads, with the layer names in its ``meta``. When KV heads are
replicated (``R`` > KV heads), only the first rank of each head's replicas writes one. A
consumer of another TP size reads the bundles holding its heads and slices/concatenates them
(:func:`kvserve.serving.paged.head_sources`); pipeline-parallel sizes must match.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
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
from ..library import load_library, packaged_libraries
from ..pipeline import MAX_HEADER, Pipeline, decode, header_shapes, load_profile, parse_header, profile_names
from ..stages import gpu as _gpu
from . import transport as tp
from .direct import T_BUNDLE, BundleReceiver, Inbox
from .paged import (CPU_BACKENDS, HeadSource, check_tp, gather_heads, gather_tokens, head_sources, kv_heads_of_rank,
                    probe_cpu_tile_layout, scatter_tokens, source_ranks, split_kv, token_slots)
from .push import Pusher, Sent, channel_sender, controller_from_settings, resolve_compression
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
    "save_errors": 0, "received": 0, "refused": 0, "device_encodes": 0, "device_decodes": 0,
}
# Receivers of direct mode started in this process (consumer schedulers), for tests and tools.
RECEIVERS: list[BundleReceiver] = []
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


# a rank's bundle key: u<client key> or p<prompt hash>, then the rank tag
_RANK_KEY = re.compile(r"[up][A-Za-z0-9]{1,128}\.tp([0-9]{1,4})-([0-9]{1,4})\.pp([0-9]{1,4})-([0-9]{1,4})")


def parallel_ranks() -> tuple[int, int]:
    """(tensor-parallel rank, pipeline-parallel rank) of this worker; (0, 0) where vLLM's
    process groups are not initialised (single-process tools). Tests replace it to drive
    several ranks in one process."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank()), int(get_pp_group().rank_in_group)
    except Exception:
        return 0, 0


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
    src_tp: int = 0  # loads: the producer's tensor-parallel size (0: the consumer's own)
    bundles: dict[str, bytes] | None = None  # loads, direct mode: the received bundles by store key
    peer: tuple[str, int] | None = None  # saves, direct mode: where to push


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
    peer: tuple[str, int] | None = None


def canonical_profile(config: dict) -> str:
    """A profile config as the bundle stores it (every stage parameter filled in), as JSON."""
    return json.dumps(Pipeline.from_config(config).get_config(), sort_keys=True)


def accepted_profiles(spec: Any) -> set[str] | None:
    """:func:`canonical_profile` of every profile a consumer accepts (None: any)."""
    if spec == "any":
        return None
    if spec is None:
        configs = [load_profile(n) for n in profile_names()] + [e.config for lib in packaged_libraries()
                                                                for e in load_library(lib).entries]
    elif isinstance(spec, list):
        configs = [load_profile(x) if isinstance(x, str) else resolve_compression(x)[1] for x in spec]
    else:
        raise KVServeConnectorError("accept_profiles must be a list of profile names/configs or 'any'")
    return {canonical_profile(c) for c in configs}


# --------------------------------------------------------------------- the connector


class KVServeConnector(KVConnectorBase_V1):
    """kvserve compression for prefill -> decode KV transfer (see the module docstring)."""

    STORE_KEYS = {"store", "overwrite"}
    DIRECT_KEYS = {"peer", "listen", "inbox_mb", "inbox_ttl_s", "push_timeout_s"}

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        extra = dict(cfg.kv_connector_extra_config or {})
        known = {"transfer", "compression", "namespace", "secret", "accept_profiles", "producer_tp"} \
            | self.STORE_KEYS | self.DIRECT_KEYS
        unknown = set(extra) - known
        if unknown:
            raise KVServeConnectorError(f"kv_connector_extra_config: unknown key(s) {sorted(unknown)}; known {sorted(known)}")
        transfer = extra.get("transfer", "store")
        if transfer not in ("store", "direct"):
            raise KVServeConnectorError(f"transfer must be 'store' or 'direct', got {transfer!r}")
        self._direct = transfer == "direct"
        misplaced = set(extra) & (self.STORE_KEYS if self._direct else self.DIRECT_KEYS)
        if misplaced:
            raise KVServeConnectorError(f"kv_connector_extra_config: {sorted(misplaced)} do not apply to "
                                        f"transfer={transfer!r}")
        self._producer = bool(cfg.is_kv_producer)
        self._consumer = bool(cfg.is_kv_consumer)
        if self._direct:
            self._store = None
            self._secret = tp.shared_secret(extra.get("secret"))
        else:
            self._store = open_store(extra.get("store"), extra.get("secret"))
        model_config = vllm_config.model_config
        self._model_id = str(getattr(model_config, "model", "") or "") if model_config is not None else ""
        self._accept = accepted_profiles(extra.get("accept_profiles")) if self._consumer else None
        self._namespace = str(extra.get("namespace", ""))
        self._overwrite = bool(extra.get("overwrite", False))
        self._block_size = vllm_config.cache_config.block_size
        cache_dtype = str(vllm_config.cache_config.cache_dtype)
        if cache_dtype not in ("auto", "bfloat16", "float16", "half", "float32", "float"):
            raise KVServeConnectorError(f"KV cache dtype {cache_dtype!r} is not supported (bf16/fp16/fp32 only)")
        if model_config is not None and getattr(model_config, "use_mla", False):
            raise KVServeConnectorError("MLA models (one latent KV cache) are not supported")
        # the model's geometry (None where the config does not say)
        self._heads = _model_int(model_config, "get_total_num_kv_heads")
        self._head_size = _model_int(model_config, "get_head_size")
        self._num_layers = _model_int(model_config, "get_total_num_hidden_layers")
        max_len = getattr(model_config, "max_model_len", None)
        self._max_len = int(max_len) if isinstance(max_len, int) and max_len > 0 else None
        par = vllm_config.parallel_config
        self._tp_size, self._pp_size = par.tensor_parallel_size, par.pipeline_parallel_size
        self._check_tp_size(self._tp_size)
        self._producer_tp = self._check_tp_size(extra.get("producer_tp", self._tp_size))
        self._layer_group: dict[str, int] = {}
        for gi, group in enumerate(kv_cache_config.kv_cache_groups if kv_cache_config else []):
            for name in group.layer_names:
                self._layer_group[name] = gi
        # direct mode: where the producer pushes, and the consumer's receiver (scheduler side)
        self._peers: list[tuple[str, int]] = []
        self._push_timeout = _positive(extra, "push_timeout_s", 10.0)
        self._inbox: Inbox | None = None
        self._receiver: BundleReceiver | None = None
        if self._direct and self._producer:
            peers = extra.get("peer")
            peers = [peers] if isinstance(peers, str) else peers
            if not isinstance(peers, list) or not peers:
                raise KVServeConnectorError("transfer='direct' needs 'peer': the consumer's host:port (or a list)")
            self._peers = [tp.parse_address(x) for x in peers]
        if self._direct and self._consumer:
            if extra.get("listen") is None:
                raise KVServeConnectorError("transfer='direct' needs 'listen': the host:port this consumer receives on")
            host, port = tp.parse_address(extra["listen"])
            if role == KVConnectorRole.SCHEDULER:
                self._inbox = Inbox(int(_positive(extra, "inbox_mb", 4096) * (1 << 20)),
                                    ttl_s=_positive(extra, "inbox_ttl_s", 600.0))
                self._receiver = BundleReceiver(self._inbox, self._check_pushed, self._secret, host=host, port=port,
                                                max_frame=self._max_bundle_bytes()).start()
                RECEIVERS.append(self._receiver)
                logger.info("kvserve: direct KV receiver listening on %s:%d", *self._receiver.address)
        # compression is chosen where the KV is: on the worker
        self._pusher: Pusher | None = None
        if self._producer:
            mode, setting = resolve_compression(extra.get("compression"))  # fails early on a bad setting
            if role == KVConnectorRole.WORKER:
                self._fixed = setting if mode == "fixed" else None
                self._bandwidth = float(setting["bandwidth_mbps"]) if mode == "controller" else None
                self._pusher = Pusher(
                    (lambda: controller_from_settings(setting)) if mode == "controller" else None,
                    tp.BandwidthEstimator(alpha=0.5, initial_mbps=self._bandwidth or 1000.0),
                    t_model_ms=float(setting.get("t_model_ms", 0.0)) if mode == "controller" else 0.0)
                if mode == "controller":
                    self._pusher.controller  # build it now: a bad library fails at start-up
        # scheduler state
        self._verdicts: dict[str, tuple[str, int, str, int]] = {}  # req_id -> (key, tokens, digest, producer TP)
        self._used: dict[str, int] = {}  # direct mode: keys used by a finished request -> producer TP
        self._pending_loads: dict[str, _Transfer] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._saved_keys: dict[str, str] = {}
        # worker state
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layer_info: dict[str, tuple[str, int | None, str | None]] = {}
        self._gathered: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._failed_blocks: set[int] = set()
        self._warned_cast = False
        self._warned_host = False
        self._my_ranks: tuple[int, int] | None = None

    def shutdown(self):
        if self._receiver is not None:
            self._receiver.stop()
            if self._receiver in RECEIVERS:
                RECEIVERS.remove(self._receiver)
            self._receiver = None

    # ---------------------------------------------------------------- tensor-parallel layout

    def _check_tp_size(self, size) -> int:
        """A tensor-parallel size this model's KV heads can be sharded over (any, when the
        config does not say how many heads there are, only the consumer's own)."""
        if self._heads is not None:
            check_tp(size, self._heads)
        elif size != getattr(self, "_tp_size", size):
            raise KVServeConnectorError("the model config does not give its KV heads: the producer's "
                                        "tensor-parallel size must equal the consumer's")
        return int(size)

    def _source_ranks(self, tp_size: int) -> list[int]:
        """The ranks of a ``tp_size`` layout that write bundles (one per KV head replica set)."""
        return source_ranks(tp_size, self._heads) if self._heads is not None else list(range(tp_size))

    def _source_tags(self, tp_size: int) -> list[str]:
        return [rank_tag(t, tp_size, p, self._pp_size) for p in range(self._pp_size) for t in self._source_ranks(tp_size)]

    def _heads_of(self, tp_rank: int, tp_size: int) -> int | None:
        """KV heads in the bundle of rank ``tp_rank`` of ``tp_size`` (None: not known here)."""
        return len(kv_heads_of_rank(tp_rank, tp_size, self._heads)) if self._heads is not None else None

    def _sources(self, tp_rank: int, src_tp: int) -> list[HeadSource]:
        if self._heads is not None:
            return head_sources(tp_rank, self._tp_size, src_tp, self._heads)
        return [HeadSource(tp_rank, slice(None), slice(None))]  # same TP size (checked at start-up)

    def _ranks(self) -> tuple[int, int]:
        if self._my_ranks is None:
            self._my_ranks = parallel_ranks()
        return self._my_ranks

    def _tag(self) -> str:
        t, p = self._ranks()
        return rank_tag(t, self._tp_size, p, self._pp_size)

    def _writes_bundles(self) -> bool:
        """Whether this producer rank writes a bundle (not a replica of another rank's heads)."""
        return self._ranks()[0] in self._source_ranks(self._tp_size)

    # ---------------------------------------------------------------- worker side

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

    def _codec_device(self, device: torch.device) -> torch.device:
        """Where KV on ``device`` is encoded and decoded: on that device when kvserve's device
        path runs there (CUDA with triton), else on the host."""
        if _gpu.is_device(device):
            if _gpu.available():
                return device
            if not self._warned_host:
                logger.warning("kvserve: the KV cache is on %s but kvserve's device path cannot run here "
                               "(no triton?); KV is compressed and decompressed on the host", device)
                self._warned_host = True
            return torch.device("cpu")
        return device

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

    def _fetch(self, tr: _Transfer, name: str) -> bytes | None:
        """A bundle of a load: from the metadata (direct mode) or the store (verifies the seal)."""
        if tr.bundles is not None:
            return tr.bundles.get(name)
        if self._store is None:
            return None
        return self._store.get(name)

    def _expect(self, heads: int | None, views: dict, end: int):
        """decode's ``expect``: the bundle names every layer of this rank's caches and each has
        ``heads`` KV heads, the caches' head sizes and at least ``end`` tokens."""
        def expect(shapes, meta):
            names = meta.get("layers")
            if not isinstance(names, list) or len(names) != len(shapes) or len(set(map(str, names))) != len(names):
                raise KVServeConnectorError("bundle meta has no layer names")
            by_name = dict(zip(names, shapes))
            missing = [n for n in views if n not in by_name]
            if missing:
                raise KVServeConnectorError(f"bundle lacks layer(s) {missing[:3]}")
            for name, (k_cache, v_cache, *_) in views.items():
                ks, vs = by_name[name]
                want_heads = k_cache.shape[1] if heads is None else heads
                if ks[0] != 1 or ks[1] != want_heads or ks[3] != k_cache.shape[3] or vs[3] != v_cache.shape[3] \
                        or ks[2] < end:
                    raise KVServeConnectorError(
                        f"layer {name}: bundle KV {ks} does not fit (heads {want_heads}, head size "
                        f"{k_cache.shape[3]}, {end} tokens)")

        return expect

    def _load(self, tr: _Transfer, forward_context) -> str:
        """Fetch, decode, re-split and scatter one request's KV; returns the bundle's profile name."""
        tp_rank, pp_rank = self._ranks()
        src_tp = tr.src_tp or self._tp_size
        sources = self._sources(tp_rank, src_tp)
        if not self._kv_caches and forward_context is not None:
            for name, layer in forward_context.no_compile_layers.items():
                cache = getattr(layer, "kv_cache", None)
                if isinstance(cache, torch.Tensor):
                    self._kv_caches[name] = cache
        views = {name: self._layer(name) for name in self._kv_caches}
        device = self._codec_device(next(iter(views.values()))[0].device) if views else None
        decoded: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        profile = ""
        for r in sorted({s.src_rank for s in sources}):
            name = bundle_key(tr.key, rank_tag(r, src_tp, pp_rank, self._pp_size))
            data = self._fetch(tr, name)  # KVServeError unless the seal verifies
            if data is None:
                raise KVServeConnectorError(f"bundle {name} is missing")
            header = parse_header(data)[0]
            self._check_header(header, tr.tokens)
            profile = header["profile"].get("name", "")
            heads = self._heads_of(r, src_tp)
            # the prompt's KV of this rank's layers in that bundle's heads bounds the decode
            limit = 2 * (tr.end + 1) * sum((heads or k.shape[1]) * (k.shape[3] + v.shape[3])
                                           for k, v, *_ in views.values())
            with _sync_allowed():  # the bundle's parts go to the device, on purpose
                kv, meta = decode(data, max_bytes=limit, expect=self._expect(heads, views, tr.end), device=device)
            if _gpu.is_device(device):
                _count(device_decodes=1)
            decoded[r] = dict(zip(meta["layers"], kv))
        # assemble this rank's heads and check everything before touching any block
        plan = []
        for name, (k_cache, v_cache, kbs, pk, pv) in views.items():
            k = gather_heads(sources, {r: d[name][0] for r, d in decoded.items()})
            v = gather_heads(sources, {r: d[name][1] for r, d in decoded.items()})
            for x, cache in ((k, k_cache), (v, v_cache)):
                if x.shape[0] != 1 or x.shape[1] != cache.shape[1] or x.shape[3] != cache.shape[3] or x.shape[2] < tr.end:
                    raise KVServeConnectorError(
                        f"layer {name}: bundle KV {tuple(x.shape)} does not fit the cache "
                        f"(heads {cache.shape[1]}, head size {cache.shape[3]}, {tr.end} tokens)")
            plan.append((name, k_cache, v_cache, kbs, pk, pv, k, v))
        with _sync_allowed():  # host -> device copies of KV decoded on the host, on purpose
            for name, k_cache, v_cache, kbs, pk, pv, k, v in plan:
                blk, off = token_slots(self._blocks_of(tr, name), self._block_size, kbs, tr.start, tr.end, k_cache.device)
                scatter_tokens(k_cache, blk, off, k[:, :, tr.start:tr.end], pk)
                scatter_tokens(v_cache, blk, off, v[:, :, tr.start:tr.end], pv)
        return profile

    def _check_header(self, header: dict, tokens: str) -> None:
        """A bundle may be used only for the tokens (digest) it is bound to, on this model,
        with a profile this consumer accepts."""
        bound = (header.get("meta") or {}).get("bind") if isinstance(header.get("meta"), dict) else None
        if bound != {"model": self._model_id, "tokens": tokens}:
            raise KVServeConnectorError("bundle is bound to another model or other tokens than this request's")
        self._check_profile(header)

    def _check_profile(self, header: dict) -> None:
        if self._accept is not None and canonical_profile(header.get("profile")) not in self._accept:
            raise KVServeConnectorError(f"bundle profile {header.get('profile', {}).get('name')!r} is not accepted here")

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous (start_load_kv finishes before the forward)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVServeConnectorMetadata):
            return
        saves = [tr for tr in meta.transfers if tr.is_store]
        if not saves or not self._writes_bundles():
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
            if not tr.is_store or not self._writes_bundles():
                continue
            layers = self._gathered.pop(tr.req_id, None)
            if not layers:
                logger.warning("kvserve: no KV was gathered for request %s; nothing saved", tr.req_id)
                continue
            try:
                self._save(tr, layers)
            except Exception as exc:  # a failed save is a later cache miss, never a failed request
                _count(save_errors=1)
                logger.warning("kvserve: saving KV of request %s failed (%s: %s)", tr.req_id, type(exc).__name__, exc)
        self._gathered.clear()

    def _save(self, tr: _Transfer, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        names = list(layers)
        first = layers[names[0]][0]
        if first.dtype != torch.bfloat16 and not self._warned_cast:
            logger.warning("kvserve: KV cache is %s; bundles hold bf16 (not lossless for this dtype)", first.dtype)
            self._warned_cast = True
        # on a device where kvserve's stages run, the KV stays there (no copy); else to the host
        device = self._codec_device(first.device)
        with _sync_allowed():  # device -> host copies of the prompt's KV, on purpose (host path only)
            kv = [(k.to(device=device, dtype=torch.bfloat16), v.to(device=device, dtype=torch.bfloat16))
                  for k, v in (layers[n] for n in names)]
        override = resolve_compression(tr.compression) if tr.compression is not None else None
        profile = override[1] if override is not None and override[0] == "fixed" else self._fixed
        name = bundle_key(tr.key, self._tag())
        meta = {"seq_len": tr.end, "layers": names, "key": tr.key, "block_size": self._block_size,
                "bind": {"model": self._model_id, "tokens": tr.tokens}}
        if self._direct:
            # the controller decides from the request's estimate or the live one, learns what
            # each push saw and may re-plan mid-transfer (as the embedded prefill worker does)
            bandwidth = tr.bandwidth_mbps
            send = channel_sender(tr.peer or self._peers[0], self._secret, T_BUNDLE, {"key": name},
                                  retries=1, timeout=self._push_timeout)
        else:
            bandwidth = tr.bandwidth_mbps or self._bandwidth

            def send(blob: bytes, progress) -> Sent:
                # the store is not the link: the controller is told the store time plus the
                # bundle's modelled transfer at the bandwidth it decided for
                t0 = time.perf_counter()
                self._store.put(name, blob)
                ms = (time.perf_counter() - t0) * 1e3
                if bandwidth:
                    ms += len(blob) * 8 / (bandwidth * 1e3)
                return Sent(transfer_ms=ms)

        with _sync_allowed():  # the compressed bundle leaves the device, on purpose
            res = self._pusher.push(kv, profile, meta, send, bandwidth_mbps=bandwidth, replan=self._direct)
        if _gpu.is_device(device):
            _count(device_encodes=1)
        if not res["ok"]:
            raise KVServeConnectorError(f"push to the consumer failed: {res.get('error')}")
        raw, size = res["raw_bytes"], res["kv_bytes"]
        _count(saves=1, saved_tokens=tr.end, saved_bytes=size, raw_bytes=raw)
        logger.info("kvserve: %s %d tokens of request %s with profile %r: %d -> %d bytes (%.2fx)%s",
                    "pushed" if self._direct else "saved", tr.end, tr.req_id, res["profile"], raw, size,
                    raw / max(1, size), f" in {res['transfer_ms']:.1f} ms" if self._direct else "")

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

    def _src_tp(self, request: "Request") -> int:
        """The producer's tensor-parallel size for a request: its ``kvserve_tp`` (the producer
        returned it) when this model's heads can be sharded so, else ``producer_tp``."""
        given = (request.kv_transfer_params or {}).get("kvserve_tp")
        if given is None:
            return self._producer_tp
        try:
            return self._check_tp_size(given)
        except KVServeConnectorError as exc:
            logger.warning("kvserve: ignoring kvserve_tp %r of request %s (%s)", given, request.request_id, exc)
            return self._producer_tp

    def _lookup(self, name: str) -> bytes | None:
        """A bundle by store key: from the direct receiver's inbox or the store (sealed)."""
        return self._inbox.get(name) if self._direct else self._store.get(name)

    def _available(self, key: str, prompt: list[int], src_tp: int) -> tuple[int, str]:
        """(tokens every needed rank's bundle holds, the digest of those prompt tokens); 0 if
        any is missing, does not verify, is bound to other tokens or another model, or
        carries a profile this consumer does not accept."""
        tokens, digest = None, ""
        for tag in self._source_tags(src_tp):
            try:
                data = self._lookup(bundle_key(key, tag))  # seal
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

    def _max_bundle_bytes(self) -> int:
        """The largest bundle this model's KV makes (one rank with every KV head, at
        ``max_model_len`` tokens, bf16, plus header room); the channel's default without the
        geometry."""
        if None in (self._heads, self._head_size, self._num_layers, self._max_len):
            return tp.DEFAULT_MAX_FRAME
        raw = 2 * 2 * self._num_layers * self._heads * self._head_size * self._max_len
        return int(raw * 1.05) + MAX_HEADER + (1 << 20)

    def _check_pushed(self, key: str, header: dict) -> None:
        """The direct receiver's check of a pushed bundle, before it is kept (nothing decoded):
        a rank layout this model can have, this model's binding, an accepted profile, at most
        ``max_model_len`` tokens, and that rank's geometry. Raises :class:`KVServeError`."""
        try:
            m = _RANK_KEY.fullmatch(key)
            if m is None:
                raise KVServeConnectorError(f"bundle key {key!r} names no rank")
            r, size, p, pp = map(int, m.groups())
            self._check_tp_size(size)
            if not r < size or pp != self._pp_size or not p < pp:
                raise KVServeConnectorError(f"bundle key {key!r}: rank outside this deployment's layout")
            meta = header.get("meta")
            bound = meta.get("bind") if isinstance(meta, dict) else None
            if not isinstance(bound, dict) or bound.get("model") != self._model_id or \
                    not isinstance(bound.get("tokens"), str):
                raise KVServeConnectorError("bundle is not bound to this model")
            self._check_profile(header)
            n = meta.get("seq_len")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= (self._max_len or n):
                raise KVServeConnectorError(f"bundle: bad seq_len {n!r}")
            shapes = header_shapes(header)
            names = meta.get("layers")
            if not isinstance(names, list) or len(names) != len(shapes) or \
                    not all(isinstance(x, str) for x in names) or len(set(names)) != len(names):
                raise KVServeConnectorError("bundle meta has no layer names")
            if self._num_layers is not None and len(shapes) > self._num_layers:
                raise KVServeConnectorError(f"bundle has {len(shapes)} layers, the model {self._num_layers}")
            heads = self._heads_of(r, size)
            for ks, vs in shapes:
                if ks[0] != 1 or ks[2] != n or (heads is not None and ks[1] != heads) or \
                        (self._head_size is not None and (ks[3], vs[3]) != (self._head_size,) * 2):
                    raise KVServeConnectorError(f"bundle layer shape {ks} does not fit this model "
                                                f"(heads {heads}, head size {self._head_size}, {n} tokens)")
        except KVServeError as exc:
            _count(refused=1)
            logger.warning("kvserve: refused a pushed bundle %r: %s", key, exc)
            raise
        _count(received=1)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._consumer:
            return 0, False
        prompt = request.prompt_token_ids or []
        want = len(prompt) - 1  # the last prompt token is computed here, for its logits
        if want <= num_computed_tokens:
            return 0, False
        if request.request_id not in self._verdicts:
            key = self._key(request)[0]
            src_tp = self._src_tp(request)
            _count(lookups=1)
            avail, digest = self._available(key, prompt, src_tp)
            if avail >= want:
                _count(hits=1)
            self._verdicts[request.request_id] = (key, avail, digest, src_tp)
        key, avail, _, _ = self._verdicts[request.request_id]
        if avail < want:
            return 0, False
        return want - num_computed_tokens, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        key, _, digest, src_tp = self._verdicts[request.request_id]
        end = len(request.prompt_token_ids or []) - 1
        self._pending_loads[request.request_id] = _Transfer(
            request.request_id, key, tuple(list(b) for b in blocks.get_block_ids()),
            end - num_external_tokens, end, is_store=False, tokens=digest, src_tp=src_tp)

    def _emit_load(self, meta: KVServeConnectorMetadata, tr: _Transfer) -> None:
        if self._direct:  # the worker may be another process: the bundles travel with the plan
            names = [bundle_key(tr.key, t) for t in self._source_tags(tr.src_tp or self._tp_size)]
            tr.bundles = {n: b for n in names if (b := self._inbox.get(n)) is not None}
        meta.transfers.append(tr)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVServeConnectorMetadata()
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            rid = new.req_id
            if rid in self._pending_loads:
                tr = self._pending_loads.pop(rid)
                tr.block_ids = tuple(list(b) for b in new.block_ids)
                self._emit_load(meta, tr)
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
                self._emit_load(meta, tr)
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
                                        bandwidth_mbps=tracked.bandwidth_mbps, tokens=tracked.tokens,
                                        peer=tracked.peer))
        self._saved_keys[rid] = tracked.public_key
        del self._tracked[rid]

    def _peer(self, request: "Request") -> tuple[str, int] | None:
        """A request's consumer (direct mode): its ``kvserve_peer`` when that is one of the
        configured peers, else the first of them."""
        given = (request.kv_transfer_params or {}).get("kvserve_peer")
        if given is None:
            return None
        try:
            addr = tp.parse_address(given)
        except KVServeError:
            addr = None
        if addr not in self._peers:
            logger.warning("kvserve: ignoring kvserve_peer %r of request %s (not a configured peer)",
                           given, request.request_id)
            return None
        return addr

    def on_new_request(self, request: "Request") -> None:
        if not self._producer:
            return
        prompt = request.prompt_token_ids or []
        if len(prompt) < 2:
            return
        key, public = self._key(request)
        if not self._direct and not self._overwrite and \
                all(self._store.exists(bundle_key(key, t)) for t in self._source_tags(self._tp_size)):
            return  # already in the store
        params = request.kv_transfer_params or {}
        bw = params.get("kvserve_bandwidth_mbps")
        if bw is not None and not (isinstance(bw, (int, float)) and bw > 0):
            logger.warning("kvserve: ignoring kvserve_bandwidth_mbps %r of request %s", bw, request.request_id)
            bw = None
        self._tracked[request.request_id] = _Tracked(key, len(prompt), [], params.get("kvserve_compression"), bw,
                                                     token_digest(prompt), public,
                                                     self._peer(request) if self._direct else None)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._tracked.pop(rid, None)
        self._pending_loads.pop(rid, None)
        verdict = self._verdicts.pop(rid, None)
        if verdict is not None and self._inbox is not None:
            # direct mode: a request's bundles leave the inbox once they were used and no other
            # live request names their key
            key, avail, _, src_tp = verdict
            if avail:
                self._used[key] = src_tp
            if key in self._used and not any(v[0] == key for v in self._verdicts.values()):
                for tag in self._source_tags(self._used.pop(key)):
                    self._inbox.pop(bundle_key(key, tag))
        key = self._saved_keys.pop(rid, None)
        return False, ({"kvserve_key": key, "kvserve_tp": self._tp_size} if key else None)


def _positive(extra: dict, key: str, default: float) -> float:
    x = extra.get(key, default)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < float("inf"):
        raise KVServeConnectorError(f"kv_connector_extra_config: {key} must be a positive number, got {x!r}")
    return float(x)


def _model_int(model_config, method: str) -> int | None:
    """``model_config.<method>()`` as a positive int, or None where the config lacks it."""
    fn = getattr(model_config, method, None)
    try:
        x = fn() if callable(fn) else None
    except Exception:
        return None
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None
