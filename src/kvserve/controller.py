"""Service-aware online controller: which profile to send a request's KV cache with.

The :class:`Controller` keeps the library entries (:mod:`kvserve.library`) that meet the
quality budget and are not cooling down, predicts each one's latency with the analytical
model of :mod:`kvserve.latency` plus learned corrections, drops those over the SLO, picks
the fastest (bf16 when nothing beats it), and learns from the observed latency
(:meth:`Controller.observe`, the one learning rule every caller uses): an EWMA residual per
candidate (ms per MB of KV, so it transfers across payload sizes), an EWMA speed factor per
codec (a codec that runs slower than profiled slows every profile using it, so siblings
learn from one observation), epsilon-greedy exploration restricted to near-optimal
candidates (so exploring cannot cost more than the margin), and a cooldown after repeated
SLO violations. A choice is judged at the bandwidth its transfer saw, with the bundle's
real size and the measured codec time when the caller has them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import asdict, dataclass

from .errors import KVServeError
from .latency import codec_ms, predict_ms, transfer_ms, uncompressed_ms
from .library import BF16, BF16_ENTRY, Entry, Library, load_library


@dataclass
class Decision:
    profile: str            # library entry name, "bf16" when sending uncompressed
    config: dict            # full profile config (kvserve.encode(kv, config))
    ratio: float
    quality: float
    predicted_ms: float     # model + learned corrections
    uncompressed_ms: float  # predicted latency of sending bf16
    reason: str
    explored: bool = False
    kv_bytes: float = 0.0
    bandwidth_mbps: float = 0.0
    t_model_ms: float = 0.0
    model_ms: float = 0.0   # analytical model alone
    step: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


# payloads below this teach the codec speed factor nothing: fixed per-request costs dominate
LEARN_CODEC_BYTES = 1_000_000


@dataclass
class _Stats:
    residual: float = 0.0     # EWMA of observed - predicted, ms per MB of KV
    n: int = 0
    last: int = -1            # step of the last observation
    violations: int = 0       # consecutive SLO violations
    cool_until: int = 0       # step until which the candidate is excluded


class Controller:
    """Online choice among a :class:`Library`'s candidates; see the module docstring.

    ``slo_ms``: latency SLO per request; ``min_quality``: quality budget (library quality,
    e.g. relative perplexity x 100); ``epsilon``: exploration probability, exploring only
    among feasible candidates predicted within ``explore_margin`` of the best;
    ``alpha``: EWMA weight of the residual (the first observation is taken whole); ``codec_alpha``: of the
    per-codec speed factor;
    ``violations``/``cooldown``: after that many consecutive SLO violations a candidate is
    skipped for ``cooldown`` decisions; ``clip``: one observation moves a prediction by at
    most this fraction of it (up; half of it down); ``forget``: per-decision fade of the
    residual of a candidate that is not being observed.
    """

    def __init__(self, library: Library | str | None = None, slo_ms: float = math.inf, min_quality: float = 97.0,
                 epsilon: float = 0.1, seed: int = 0, alpha: float = 0.15, codec_alpha: float = 0.05,
                 explore_margin: float = 0.1, violations: int = 3, cooldown: int = 50,
                 clip: float = 1.0, forget: float = 0.99):
        if library is None or isinstance(library, str):
            library = load_library(library)
        if not 0.0 <= epsilon <= 1.0:
            raise KVServeError("epsilon must be in [0, 1]")
        self.library = library
        self.slo_ms, self.min_quality, self.epsilon = float(slo_ms), float(min_quality), float(epsilon)
        self.alpha, self.codec_alpha, self.explore_margin = alpha, codec_alpha, explore_margin
        self.max_violations, self.cooldown = violations, cooldown
        self.clip, self.forget = clip, forget
        self.rng = random.Random(seed)
        self.step = 0
        self.stats: dict[str, _Stats] = {BF16: _Stats(), **{e.name: _Stats() for e in library.entries}}
        self.codec_factor: dict[str, float] = {}

    # --- prediction
    def _parts(self, e: Entry, kv_bytes: float, mbps: float, t_model: float) -> tuple[float, float]:
        """(model-only prediction without codec, codec ms after the learned codec factor)."""
        if e is BF16_ENTRY:
            return t_model + transfer_ms(kv_bytes, mbps), 0.0
        return t_model + transfer_ms(kv_bytes, mbps, e.ratio), \
            codec_ms(kv_bytes, e.encode_MBps, e.decode_MBps) * self.codec_factor.get(e.codec_id, 1.0)

    def _residual(self, name: str) -> float:
        """The candidate's residual, faded by ``forget`` per decision since it was last seen
        (stale corrections from old conditions must not lock a candidate out forever)."""
        st = self.stats[name]
        return st.residual * self.forget ** max(0, self.step - st.last) if st.n else 0.0

    def predict(self, e: Entry, kv_bytes: float, mbps: float, t_model: float = 0.0) -> float:
        base, cod = self._parts(e, kv_bytes, mbps, t_model)
        return base + cod + self._residual(e.name) * kv_bytes / 1e6

    def candidates(self) -> list[Entry]:
        return [BF16_ENTRY] + [e for e in self.library.entries
                               if e.quality >= self.min_quality and self.stats[e.name].cool_until <= self.step]

    def replan(self, current: Decision, kv_bytes: float, bytes_sent: int, bytes_total: int, seconds: float,
               *, min_bytes: int = 64 << 10, min_seconds: float = 0.05, gain: float = 0.7) -> str | None:
        """Mid-transfer check for the bundle ``current`` chose: ``bytes_sent`` of its
        ``bytes_total`` bytes went in ``seconds``. When the link runs at under half the
        bandwidth the decision assumed, and another candidate started over now (encoded
        again, sent whole at the observed rate) is predicted to finish in under ``gain``
        times what the current transfer still needs, returns that candidate's name (the
        caller abandons the transfer and decides again); otherwise None. No side effects."""
        if bytes_sent < min_bytes or seconds < min_seconds or bytes_sent >= bytes_total:
            return None
        mbps = bytes_sent * 8 / seconds / 1e6
        if mbps >= current.bandwidth_mbps / 2:
            return None
        remaining_ms = (bytes_total - bytes_sent) * 8 / mbps / 1e3
        preds = {e.name: self.predict(e, kv_bytes, mbps) for e in self.candidates()}
        best = min(preds, key=preds.get)
        if best != current.profile and preds[best] < gain * remaining_ms:
            return best
        return None

    # --- decision
    def decide(self, kv_bytes: float, bandwidth_mbps: float, t_model_ms: float = 0.0) -> Decision:
        if not (kv_bytes > 0 and math.isfinite(kv_bytes)):
            raise KVServeError("kv_bytes must be a positive number")
        if not bandwidth_mbps > 0:
            raise KVServeError("bandwidth_mbps must be positive")
        self.step += 1
        cands = self.candidates()
        preds = {e.name: self.predict(e, kv_bytes, bandwidth_mbps, t_model_ms) for e in cands}
        feasible = [e for e in cands if preds[e.name] <= self.slo_ms]
        pool = feasible or cands
        best = min(pool, key=lambda e: (preds[e.name], e.codec_ms_per_MB if e is not BF16_ENTRY else 0.0))
        explored = False
        if best is BF16_ENTRY:
            if len(cands) == 1:
                reason = "no_quality: no profile meets the quality budget" if not any(
                    e.quality >= self.min_quality for e in self.library.entries) else "cooldown: all candidates cooling down"
            else:
                reason = "no_compression: no profile beats sending bf16"
        else:
            reason = "fastest"
        if not feasible:
            reason = "slo_infeasible: no candidate meets the SLO; best effort"
        if len(pool) > 1 and self.epsilon > 0 and self.rng.random() < self.epsilon:
            near = [e for e in pool if e is not best and preds[e.name] <= preds[best.name] * (1 + self.explore_margin)]
            if near:
                oldest = min(self.stats[e.name].last for e in near)
                choice = self.rng.choice([e for e in near if self.stats[e.name].last == oldest])
                best, explored, reason = choice, True, f"explore (epsilon={self.epsilon:g})"
        base, cod = self._parts(best, kv_bytes, bandwidth_mbps, t_model_ms)
        model_only = predict_ms(kv_bytes, bandwidth_mbps, best.ratio, best.encode_MBps, best.decode_MBps, t_model_ms) \
            if best is not BF16_ENTRY else uncompressed_ms(kv_bytes, bandwidth_mbps, t_model_ms)
        unc = preds[BF16]
        return Decision(best.name, json.loads(json.dumps(best.config)), best.ratio, best.quality, preds[best.name], unc,
                        reason, explored, float(kv_bytes), float(bandwidth_mbps), float(t_model_ms), model_only, self.step)

    # --- learning
    def observe(self, decision: Decision, observed_ms: float, *, bandwidth_mbps: float | None = None,
                sent_bytes: float | None = None, codec_ms: float | None = None) -> None:
        """Feed back the measured end-to-end latency of a request sent as ``decision``.

        A serving layer that knows more says so: ``bandwidth_mbps``, the bandwidth the
        transfer actually saw (the choice is judged there: a wrong bandwidth estimate is the
        estimator's error, not the profile's residual); ``sent_bytes``, the bundle's real size
        (short prompts compress worse than the library's ratio; the transfer part of the
        prediction then uses the real size, so that difference is not learnt as a codec
        residual); ``codec_ms``, the measured encode + decode time, from which the codec's
        speed factor is learnt directly (only for payloads of at least ``LEARN_CODEC_BYTES``,
        where per-request fixed costs do not dominate) instead of being inferred from the
        end-to-end time.
        """
        if not (observed_ms >= 0 and math.isfinite(observed_ms)):
            raise KVServeError("observed_ms must be a finite number >= 0")
        for name, v in (("sent_bytes", sent_bytes), ("codec_ms", codec_ms)):
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise KVServeError(f"{name} must be a finite number >= 0")
        if bandwidth_mbps is not None:
            if not (bandwidth_mbps > 0 and math.isfinite(bandwidth_mbps)):
                raise KVServeError("bandwidth_mbps must be a finite positive number")
            decision = dataclasses.replace(decision, bandwidth_mbps=float(bandwidth_mbps))
        e = self.library.by_name(decision.profile)
        st = self.stats[e.name]
        mb = decision.kv_bytes / 1e6
        base, cod = self._parts(e, decision.kv_bytes, decision.bandwidth_mbps, decision.t_model_ms)
        if sent_bytes is not None and sent_bytes > 0 and e is not BF16_ENTRY:
            base = decision.t_model_ms + transfer_ms(sent_bytes, decision.bandwidth_mbps)
        r_old = self._residual(e.name)
        # one observation moves the model by at most ``clip`` x its prediction: a single
        # outlier (a stale bandwidth estimate at a step change) cannot poison a candidate
        pred = base + cod + r_old * mb
        obs = min(max(observed_ms, pred - self.clip * 0.5 * pred), pred + self.clip * pred)
        if e is not BF16_ENTRY and cod > 0:
            f = self.codec_factor.get(e.codec_id, 1.0)
            implied = None
            if codec_ms is not None:
                if decision.kv_bytes >= LEARN_CODEC_BYTES:
                    implied = codec_ms / (cod / f)
            elif cod > 0.1 * (base + cod):
                implied = (obs - base - r_old * mb) / (cod / f)
            if implied is not None:
                implied = min(max(implied, 0.25), 16.0)
                self.codec_factor[e.codec_id] = (1 - self.codec_alpha) * f + self.codec_alpha * implied
                cod = cod / f * self.codec_factor[e.codec_id]
        err = (obs - base - cod) / mb
        st.residual = err if st.n == 0 and self.alpha > 0 else (1 - self.alpha) * r_old + self.alpha * err
        st.n += 1
        st.last = self.step
        if observed_ms > self.slo_ms:
            st.violations += 1
            if st.violations >= self.max_violations and e is not BF16_ENTRY:
                st.cool_until = self.step + self.cooldown
                st.violations = 0
        else:
            st.violations = 0


