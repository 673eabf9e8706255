"""Service-aware online controller: which profile to send a request's KV cache with.

Latency model (both codec ends counted). For a KV payload of ``V`` bytes, a link of ``B``
Mbps (1 Mbps = 125 bytes/ms) and a profile with compression ratio ``cr`` and codec speeds
``S_enc`` / ``S_dec`` (bf16 MB per second, 1 MB = 1e6 bytes)::

    T   = T_model + V/S_enc + V/(B*cr) + V/S_dec      (compressed)
    T_0 = T_model + V/B                              (uncompressed bf16)

Compression helps iff ``B < B* = (1 - 1/cr) / (1/S_enc + 1/S_dec)`` (in bytes/s; reported in
Mbps). Per MB of KV a profile costs ``a + 8000*x`` ms with ``a = 1000/S_enc + 1000/S_dec``
and ``x = 1/(B*cr)``-scaled transfer, i.e. a line in ``1/B``; the lower envelope of those
lines gives the bandwidth intervals in which each candidate is optimal
(:func:`optimal_intervals`, independent of ``V`` and ``T_model``).

The online :class:`Controller` keeps the library entries that meet the quality budget and
are not cooling down, predicts each one's latency (model + learned corrections), drops
those over the SLO, picks the fastest (bf16 when nothing beats it), and learns from the
observed latency: an EWMA residual per candidate (ms per MB of KV, so it transfers across
payload sizes), an EWMA speed factor per codec (a codec that runs slower than profiled
slows every profile using it, so siblings learn from one observation), epsilon-greedy
exploration restricted to near-optimal candidates (so exploring cannot cost more than the
margin), and a cooldown after repeated SLO violations.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from .errors import KVServeError

BF16 = "bf16"
BF16_CONFIG = {"name": "bf16", "transform": {"id": "identity"}, "quantizer": {"id": "none"}, "codec": {"id": "none"}}
LIBRARY_FORMAT = "kvserve-profile-library"
LIBRARY_VERSION = 1
BYTES_PER_MS_PER_MBPS = 125.0  # 1 Mbps = 1e6 bit/s = 125 bytes per ms
#: SmolLM2-135M: 30 layers x (K, V) x 3 kv heads x 64 dims x 2 bytes = 23040 bytes per token
SMOLLM2_KV_BYTES_PER_TOKEN = 23040
DEFAULT_KV_BYTES = SMOLLM2_KV_BYTES_PER_TOKEN * 1024
QUALITY_BUDGETS = (90.0, 95.0, 97.0, 98.0, 99.0)


# ----------------------------------------------------------------- latency model


def transfer_ms(kv_bytes: float, bandwidth_mbps: float, ratio: float = 1.0) -> float:
    """Time to send ``kv_bytes / ratio`` bytes over ``bandwidth_mbps``."""
    if bandwidth_mbps <= 0:
        return math.inf
    return kv_bytes / ratio / (bandwidth_mbps * BYTES_PER_MS_PER_MBPS)


def codec_ms(kv_bytes: float, encode_MBps: float, decode_MBps: float) -> float:
    """Encode at the sender plus decode at the receiver (speeds in bf16 MB/s)."""
    return kv_bytes / (encode_MBps * 1e3) + kv_bytes / (decode_MBps * 1e3)


def predict_ms(kv_bytes: float, bandwidth_mbps: float, ratio: float, encode_MBps: float,
               decode_MBps: float, t_model_ms: float = 0.0) -> float:
    """``T = T_model + V/S_enc + V/(B*cr) + V/S_dec`` in ms."""
    return t_model_ms + codec_ms(kv_bytes, encode_MBps, decode_MBps) + transfer_ms(kv_bytes, bandwidth_mbps, ratio)


def uncompressed_ms(kv_bytes: float, bandwidth_mbps: float, t_model_ms: float = 0.0) -> float:
    """``T_0 = T_model + V/B`` in ms."""
    return t_model_ms + transfer_ms(kv_bytes, bandwidth_mbps)


def breakeven_mbps(ratio: float, encode_MBps: float, decode_MBps: float) -> float:
    """Bandwidth below which the profile beats sending bf16 (0 if it never does)."""
    if ratio <= 1.0:
        return 0.0
    sec_per_byte = 1.0 / (encode_MBps * 1e6) + 1.0 / (decode_MBps * 1e6)
    return (1.0 - 1.0 / ratio) / sec_per_byte * 8 / 1e6


# ----------------------------------------------------------------- library


@dataclass
class Entry:
    """One profiled candidate: its full profile config and the measured figures."""

    name: str
    config: dict
    ratio: float
    quality: float
    encode_MBps: float
    decode_MBps: float
    extra: dict = field(default_factory=dict)

    @property
    def codec_ms_per_MB(self) -> float:
        return 1e3 / self.encode_MBps + 1e3 / self.decode_MBps

    @property
    def codec_id(self) -> str:
        return str(self.config.get("codec", {}).get("id", "?"))


BF16_ENTRY = Entry(BF16, BF16_CONFIG, 1.0, 100.0, math.inf, math.inf)


@dataclass
class Library:
    entries: list[Entry]
    meta: dict = field(default_factory=dict)

    def by_name(self, name: str) -> Entry:
        if name == BF16:
            return BF16_ENTRY
        for e in self.entries:
            if e.name == name:
                return e
        raise KVServeError(f"library has no profile {name!r}")

    def to_json(self) -> dict:
        out = {"format": LIBRARY_FORMAT, "version": LIBRARY_VERSION, **{k: v for k, v in self.meta.items()
                                                                       if k not in ("format", "version", "entries", "intervals")}}
        budgets = sorted(set(QUALITY_BUDGETS) | set(self.meta.get("quality_budgets", [])))
        intervals = {f"{q:g}": [{"profile": n, "lo_mbps": lo, "hi_mbps": None if math.isinf(hi) else hi}
                                for n, lo, hi in optimal_intervals(self.entries, q)] for q in budgets}
        entries = []
        for e in self.entries:
            d = {"name": e.name, "config": e.config, "ratio": e.ratio, "quality": e.quality,
                 "encode_MBps": e.encode_MBps, "decode_MBps": e.decode_MBps,
                 "codec_ms_per_MB": e.codec_ms_per_MB,
                 "breakeven_mbps": breakeven_mbps(e.ratio, e.encode_MBps, e.decode_MBps),
                 "optimal_mbps": {q: [[r["lo_mbps"], r["hi_mbps"]] for r in rows if r["profile"] == e.name]
                                  for q, rows in intervals.items()}}
            d.update({k: v for k, v in e.extra.items() if k not in d})
            entries.append(d)
        out["entries"] = entries
        out["intervals"] = intervals
        return out

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")


def _num(d: dict, key: str, where: str, lo: float = 0.0, strict: bool = True) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (v <= lo if strict else v < lo):
        raise KVServeError(f"{where}: {key!r} must be a finite number {'>' if strict else '>='} {lo:g}, got {v!r}")
    return float(v)


def library_from_json(obj: Any, source: str = "library") -> Library:
    """Validate a parsed library file; every problem raises :class:`KVServeError`."""
    from .pipeline import Pipeline

    if not isinstance(obj, dict):
        raise KVServeError(f"{source}: a profile library must be a JSON object")
    if obj.get("format") != LIBRARY_FORMAT:
        raise KVServeError(f"{source}: not a profile library (format must be {LIBRARY_FORMAT!r})")
    if obj.get("version") != LIBRARY_VERSION:
        raise KVServeError(f"{source}: unsupported library version {obj.get('version')!r}")
    raw = obj.get("entries")
    if not isinstance(raw, list) or not raw:
        raise KVServeError(f"{source}: 'entries' must be a non-empty list")
    entries, seen = [], set()
    known = {"name", "config", "ratio", "quality", "encode_MBps", "decode_MBps", "codec_ms_per_MB",
             "breakeven_mbps", "optimal_mbps"}
    for i, d in enumerate(raw):
        where = f"{source}: entry {i}"
        if not isinstance(d, dict):
            raise KVServeError(f"{where} must be an object")
        name = d.get("name")
        if not isinstance(name, str) or not name or len(name) > 200:
            raise KVServeError(f"{where}: 'name' must be a non-empty string")
        if name == BF16 or name in seen:
            raise KVServeError(f"{where}: name {name!r} is reserved or duplicated")
        seen.add(name)
        where = f"{source}: entry {name!r}"
        cfg = d.get("config")
        if not isinstance(cfg, dict):
            raise KVServeError(f"{where}: 'config' must be a profile config object")
        try:
            Pipeline.from_config(cfg)
        except KVServeError as exc:
            raise KVServeError(f"{where}: invalid profile config ({exc})") from exc
        ratio = _num(d, "ratio", where)
        quality = _num(d, "quality", where, strict=False)
        if quality > 1000:
            raise KVServeError(f"{where}: 'quality' {quality} is not a relative score (0..~100)")
        entries.append(Entry(name, cfg, ratio, quality, _num(d, "encode_MBps", where), _num(d, "decode_MBps", where),
                             {k: v for k, v in d.items() if k not in known}))
    meta = {k: v for k, v in obj.items() if k not in ("entries", "intervals")}
    return Library(entries, meta)


def default_library_path() -> str:
    return str(resources.files("kvserve").joinpath("library", "smollm2.json"))


def load_library(path: str | None = None) -> Library:
    """The packaged SmolLM2 library (``path=None``) or a library JSON file."""
    if path is None:
        try:
            text = resources.files("kvserve").joinpath("library", "smollm2.json").read_text(encoding="utf-8")
        except (FileNotFoundError, OSError) as exc:
            raise KVServeError("the packaged profile library kvserve/library/smollm2.json is missing") from exc
        source = "kvserve/library/smollm2.json"
    else:
        if not os.path.isfile(path):
            raise KVServeError(f"profile library {path!r} does not exist")
        with open(path, "rb") as f:  # bytes: bad UTF-8 is a JSON error below
            text = f.read()
        source = path
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise KVServeError(f"{source}: not valid JSON ({type(exc).__name__}: {exc})") from None
    return library_from_json(obj, source)


def optimal_intervals(entries: list[Entry], min_quality: float = 0.0) -> list[tuple[str, float, float]]:
    """``[(name, lo_mbps, hi_mbps), ...]`` ascending in bandwidth: which candidate (bf16
    included) has the lowest modelled latency in each bandwidth interval, among entries with
    ``quality >= min_quality``. ``hi`` is ``inf`` for the top interval (bf16 there when any
    codec costs time). Ties go to the cheaper codec."""
    cands = [BF16_ENTRY] + [e for e in entries if e.quality >= min_quality]
    # cost per MB: a + x / cr with x = 8000 / B (ms of bf16 transfer per MB)
    lines = [(0.0 if e is BF16_ENTRY else e.codec_ms_per_MB, 1.0 / e.ratio, e.name) for e in cands]
    xs = set()
    for i, (a1, b1, _) in enumerate(lines):
        for a2, b2, _ in lines[i + 1:]:
            if b1 != b2:
                x = (a2 - a1) / (b1 - b2)
                if x > 0 and math.isfinite(x):
                    xs.add(x)
    pts = sorted(xs)

    def best(x):
        return min(lines, key=lambda ln: (ln[0] + ln[1] * x, ln[0]))[2]

    probes = ([pts[0] / 2] if pts else [1.0]) + [(p + q) / 2 for p, q in zip(pts, pts[1:])] + ([pts[-1] * 2] if pts else [])
    bounds = [0.0] + pts + [math.inf]
    segs: list[list] = []  # in x, ascending: [name, x_lo, x_hi]
    for j, x in enumerate(probes):
        name = best(x)
        lo, hi = bounds[j], bounds[j + 1]
        if segs and segs[-1][0] == name:
            segs[-1][2] = hi
        else:
            segs.append([name, lo, hi])
    out = []
    for name, xlo, xhi in reversed(segs):  # x = 8000/B: high x = low bandwidth
        lo = 0.0 if math.isinf(xhi) else 8000.0 / xhi
        hi = math.inf if xlo == 0 else 8000.0 / xlo
        out.append((name, lo, hi))
    return out


# ----------------------------------------------------------------- controller


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
    def observe(self, decision: Decision, observed_ms: float, *, sent_bytes: float | None = None,
                codec_ms: float | None = None) -> None:
        """Feed back the measured end-to-end latency of a request sent as ``decision``.

        A serving layer that knows more says so: ``sent_bytes``, the bundle's real size
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


# ----------------------------------------------------------------- CLI (registered in kvserve.cli)


def add_decide_parser(sub) -> None:
    d = sub.add_parser("decide", help="choose a profile for a KV transfer from bandwidth, SLO and quality budget")
    d.add_argument("--library", default=None, help="profile library JSON (default: the packaged SmolLM2 library)")
    d.add_argument("--bandwidth-mbps", type=float, required=True)
    d.add_argument("--slo-ms", type=float, default=math.inf)
    d.add_argument("--min-quality", type=float, default=97.0, help="quality budget (relative perplexity x 100)")
    d.add_argument("--kv-bytes", type=float, default=DEFAULT_KV_BYTES,
                   help=f"KV payload in bytes (default {DEFAULT_KV_BYTES}: SmolLM2, 1024 tokens)")
    d.add_argument("--t-model-ms", type=float, default=0.0)
    d.add_argument("--json", default=None, help="write the decision as JSON here")
    d.set_defaults(fn=cli_decide)


def cli_decide(args) -> int:
    lib = load_library(args.library)
    ctl = Controller(lib, slo_ms=args.slo_ms, min_quality=args.min_quality, epsilon=0.0)
    d = ctl.decide(args.kv_bytes, args.bandwidth_mbps, args.t_model_ms)
    print(f"profile        {d.profile}")
    print(f"reason         {d.reason}")
    print(f"ratio          {d.ratio:.2f}x   quality {d.quality:.2f}")
    print(f"predicted      {d.predicted_ms:.2f} ms   (uncompressed {d.uncompressed_ms:.2f} ms, "
          f"{d.uncompressed_ms / d.predicted_ms:.2f}x)")
    rows = optimal_intervals(lib.entries, args.min_quality)
    print("optimal by bandwidth (quality >= %g):" % args.min_quality)
    for name, lo, hi in rows:
        print(f"  {lo:10.1f} .. {'inf' if math.isinf(hi) else f'{hi:.1f}':>10} Mbps  {name}")
    if args.json:
        out = {"profile": d.profile, "ratio": d.ratio, "quality": d.quality, "predicted_ms": d.predicted_ms,
               "uncompressed_ms": d.uncompressed_ms, "reason": d.reason, "config": d.config,
               "bandwidth_mbps": args.bandwidth_mbps, "kv_bytes": args.kv_bytes,
               "slo_ms": None if math.isinf(args.slo_ms) else args.slo_ms, "min_quality": args.min_quality}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(__import__("kvserve.cli").cli.main(["decide", *sys.argv[1:]]))
