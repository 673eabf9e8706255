"""The push sequence of one request's KV: decide, encode, send, observe, re-plan.

Every producer of KV uses it the same way: the embedded prefill worker (over the KV channel)
and the vLLM connector (into a store). :meth:`Pusher.push` takes the request's KV, the
profile (a fixed one, or ``None`` to let the controller decide from the live bandwidth
estimate) and a *send function* that moves the bundle and reports what it saw
(:class:`Sent`). The controller is then fed back through :meth:`Controller.observe`, the one
learning rule: the choice judged at the bandwidth the transfer saw, with the bundle's real
size and, when the receiver reports its decode time, the measured codec time.

While a controller-chosen bundle is on the wire, a progress callback watches it: when the
link turns out far slower than assumed and another profile, started over, would finish
sooner (:meth:`Controller.replan`), the send is abandoned
(:class:`~kvserve.serving.transport.TransferAbandoned`), the controller decides again at the
rate just seen and the new bundle is sent instead (once).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..controller import Controller, Decision
from ..errors import KVServeError
from ..library import load_library
from ..pipeline import Pipeline, load_profile, profile_from_config
from . import transport as tp

REPLAN_EVERY_S = 0.05


@dataclass
class Sent:
    """What a send function reports after moving a bundle."""

    transfer_ms: float                 # time the move took, as the sender saw it (or modelled)
    sample_mbps: float | None = None   # the bandwidth this transfer saw; None: not a link measurement
    sample_s: float | None = None      # seconds the payload took to arrive (for the estimator)
    remote_decode_ms: float | None = None  # the receiver's decode time, when it reports it
    extra: dict = field(default_factory=dict)  # merged into the result


CONTROLLER_KEYS = {"mode", "bandwidth_mbps", "slo_ms", "min_quality", "epsilon", "seed", "library", "t_model_ms"}


def resolve_compression(spec: Any) -> tuple[str, Any]:
    """A producer's compression setting: ``("fixed", profile config dict)`` for a profile
    name, JSON file or config dict (``None``: ``"kvserve"``), or ``("controller", settings)``
    for ``{"mode": "controller", "bandwidth_mbps": B, ...}`` (keys in ``CONTROLLER_KEYS``)."""
    if spec is None:
        spec = "kvserve"
    if isinstance(spec, dict) and spec.get("mode") == "controller":
        extra = set(spec) - CONTROLLER_KEYS
        if extra:
            raise KVServeError(f"compression controller: unknown key(s) {sorted(extra)}")
        bw = spec.get("bandwidth_mbps")
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not bw > 0:
            raise KVServeError("compression controller needs a positive 'bandwidth_mbps'")
        return "controller", dict(spec)
    if isinstance(spec, str):
        return "fixed", load_profile(spec)
    if isinstance(spec, dict):
        return "fixed", Pipeline.from_config(spec).get_config()
    raise KVServeError(f"compression must be a profile name, a profile dict or a controller dict, got {spec!r}")


def controller_from_settings(settings: dict) -> Controller:
    """The :class:`Controller` a ``("controller", settings)`` compression setting asks for."""
    kw = {k: settings[k] for k in ("slo_ms", "min_quality", "epsilon", "seed") if k in settings}
    return Controller(load_library(settings.get("library")), **kw)


SendFn = Callable[[bytes, Callable[[int, float], None] | None], Sent]


def _ms(s: float) -> float:
    return round(s * 1e3, 3)


def kv_nbytes(kv) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class Pusher:
    """Pushes KV bundles for one producer; thread-safe.

    ``controller``: a :class:`Controller` (or a zero-argument factory, called on first use)
    for requests that leave the profile to it; ``estimator``: the producer's
    :class:`~kvserve.serving.transport.BandwidthEstimator` (its estimate is what the
    controller decides from when the request gives no bandwidth); ``threads``: codec threads;
    ``t_model_ms``: the model time added to every prediction.
    """

    def __init__(self, controller: Controller | Callable[[], Controller] | None = None,
                 estimator: tp.BandwidthEstimator | None = None, threads: int | None = None,
                 t_model_ms: float = 0.0):
        self._controller = controller
        self.t_model_ms = float(t_model_ms)
        self.estimator = estimator or tp.BandwidthEstimator(alpha=0.5, initial_mbps=1000.0)
        self.threads = threads
        self.lock = threading.Lock()
        self._pipes: dict[str, Pipeline] = {}

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            raise KVServeError("no controller configured: give the request a profile")
        if not isinstance(self._controller, Controller):
            self._controller = self._controller()
        return self._controller

    def state(self) -> dict:
        """The bandwidth estimate and what the controller has learnt (None before its first use)."""
        with self.lock:
            ctl = self._controller if isinstance(self._controller, Controller) else None
            learnt = None if ctl is None else {
                "codec_factor": dict(ctl.codec_factor),
                "residual_ms_per_MB": {n: round(ctl._residual(n), 3) for n, st in ctl.stats.items() if st.n}}
            return {"bandwidth_mbps": self.estimator.mbps, "samples": self.estimator.samples, "controller": learnt}

    def _pipeline(self, profile: Any) -> Pipeline:
        if isinstance(profile, Pipeline):
            return profile
        key = profile if isinstance(profile, str) else json.dumps(profile, sort_keys=True)
        pipe = self._pipes.get(key)
        if pipe is None:
            pipe = self._pipes[key] = profile_from_config(profile)
        return pipe

    def decide(self, raw: int, bandwidth_mbps: float | None = None) -> Decision:
        """The controller's choice for ``raw`` bytes of KV at ``bandwidth_mbps`` (default:
        the producer's estimate)."""
        with self.lock:
            return self.controller.decide(raw, bandwidth_mbps or self.estimator.mbps, self.t_model_ms)

    def _watch(self, decision: Decision, raw: int, total: int):
        """A send-progress callback that abandons the transfer when the controller would
        rather start over with another profile; checked every ``REPLAN_EVERY_S``."""
        due = [0.0]

        def watch(sent: int, seconds: float) -> None:
            if seconds < due[0]:
                return
            due[0] = seconds + REPLAN_EVERY_S
            with self.lock:
                alt = self.controller.replan(decision, raw, sent, total, seconds)
            if alt is not None:
                raise tp.TransferAbandoned(f"link at {sent * 8 / seconds / 1e6:.2f} Mbps, far below the "
                                           f"{decision.bandwidth_mbps:.1f} Mbps assumed; switching to {alt}",
                                           sent, seconds)

        return watch

    @staticmethod
    def _describe(decision: Decision, prefix: str = "") -> dict:
        return {"profile": decision.profile, "reason": prefix + decision.reason,
                "predicted_ms": decision.predicted_ms, "bandwidth_est_mbps": decision.bandwidth_mbps,
                "explored": decision.explored}

    def push(self, kv, profile: Any, meta: dict, send: SendFn, *, bandwidth_mbps: float | None = None,
             replan: bool = True) -> dict:
        """Encode ``kv`` with ``profile`` (a name, config dict or Pipeline; ``None``: the
        controller decides at ``bandwidth_mbps`` or the estimate) and ``send`` it.

        Returns a result dict: ``profile``, ``raw_bytes``, ``kv_bytes``, ``encode_ms``, ``ok``,
        and on success ``transfer_ms``, ``remote_decode_ms``, ``bandwidth_sample_mbps``; on a
        transport failure ``error``; ``decision`` / ``replanned`` when the controller chose.
        Transport errors are reported in the result, never raised."""
        raw = kv_nbytes(kv)
        decision = self.decide(raw, bandwidth_mbps) if profile is None else None
        pipe = self._pipeline(decision.config if decision is not None else profile)
        name = decision.profile if decision is not None else (pipe.name or "custom")
        t1 = time.monotonic()
        blob = pipe.encode(kv, meta=meta, threads=self.threads)
        encode_s = time.monotonic() - t1
        res: dict = {"profile": name, "raw_bytes": raw, "kv_bytes": len(blob), "encode_ms": _ms(encode_s), "ok": False}
        if decision is not None:
            res["decision"] = self._describe(decision)
        watch = self._watch(decision, raw, len(blob)) if decision is not None and replan else None
        while True:
            try:
                sent = send(blob, watch)
            except tp.TransferAbandoned as ab:
                with self.lock:
                    self.estimator.update(ab.sent, ab.seconds)
                decision = self.decide(raw, None)
                res["replanned"] = {"from": name, "to": decision.profile, "after_ms": _ms(ab.seconds),
                                    "sent_bytes": ab.sent, "abandoned_bytes": len(blob),
                                    "observed_mbps": round(ab.sent * 8 / ab.seconds / 1e6, 3)}
                pipe, name = self._pipeline(decision.config), decision.profile
                t1 = time.monotonic()
                blob = pipe.encode(kv, meta=meta, threads=self.threads)
                encode_s += time.monotonic() - t1
                res.update(profile=name, kv_bytes=len(blob), encode_ms=_ms(encode_s),
                           decision=self._describe(decision, "replanned: "))
                watch = None
                continue
            except tp.TransportError as exc:
                res["error"] = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, SendFailed):
                    res.update(exc.extra)
                return res
            break
        res.update(ok=True, transfer_ms=round(sent.transfer_ms, 3), **sent.extra)
        if sent.remote_decode_ms is not None:
            res["remote_decode_ms"] = sent.remote_decode_ms
        if sent.sample_mbps is not None:
            res["bandwidth_sample_mbps"] = round(sent.sample_mbps, 3)
        with self.lock:
            if sent.sample_s is not None:
                self.estimator.update(len(blob), sent.sample_s)
            if decision is not None:
                codec = encode_s * 1e3 + (sent.remote_decode_ms or 0.0)
                self.controller.observe(decision, codec + sent.transfer_ms, bandwidth_mbps=sent.sample_mbps,
                                        sent_bytes=len(blob),
                                        codec_ms=codec if sent.remote_decode_ms is not None else None)
        return res


class SendFailed(tp.TransportError):
    """A send function's failure that carries details for the result (e.g. attempts)."""

    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.extra = extra
