"""Trace-driven simulation of the online controller (driven by benchmarks/kvserve_controller.py).

Each trace is a sequence of requests: a KV payload (SmolLM2, 256-2048 tokens), the true
link bandwidth for that request and the true codec speeds. The *ground truth* latency of
sending a request with a profile is the latency model evaluated at the true bandwidth and
true codec speeds, times a small multiplicative jitter (lognormal, 3%) - so the controller
never sees the truth directly: it is given the bandwidth *estimated from the previous
transfer* (as a serving system measures it) and learns only from observed latencies.

Compared per request: the controller; the oracle (best candidate in hindsight: the truth's
argmin over bf16 and every library entry meeting the quality budget); always-bf16; every
fixed profile. Traces: ``steady``, ``steps`` (bandwidth changes every 80 requests over
two orders of magnitude), ``noisy`` (log-bandwidth AR(1), sigma 0.5, rho 0.9, plus 10% per-request jitter), ``slowdown`` (from
the middle of the trace on, the codec of the profile that was best runs 4x slower than
profiled; at the bandwidth where staying on it would hurt most),
``fast`` (5 Gbps: compression cannot help on this CPU) and ``fast-noisy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvserve.controller import Controller
from kvserve.latency import SMOLLM2_KV_BYTES_PER_TOKEN, codec_ms, transfer_ms
from kvserve.library import BF16, BF16_ENTRY, Library

WARMUP = 20


@dataclass
class Trace:
    name: str
    kv_bytes: np.ndarray       # per request
    bandwidth: np.ndarray      # true Mbps per request
    slow_codec: str | None = None
    slow_from: int | None = None
    slow_factor: float = 4.0
    can_help: bool = True      # False: compression cannot help (checks the 3% rule)


def make_traces(lib: Library, n: int = 300, seed: int = 0, min_quality: float = 97.0) -> list[Trace]:
    rng = np.random.default_rng(seed)

    def sizes():
        return rng.integers(256, 2049, n) * SMOLLM2_KV_BYTES_PER_TOKEN

    out = [Trace("steady", sizes(), np.full(n, 100.0))]
    levels = [1000.0, 50.0, 400.0, 10.0, 2000.0, 150.0]
    out.append(Trace("steps", sizes(), np.array([levels[(i // 80) % len(levels)] for i in range(n)])))
    out.append(Trace("noisy", sizes(), 100.0 * np.exp(_ar1(rng, n, 0.5, 0.9))))
    # slowdown: at the bandwidth where it hurts most, the codec of the profile that was best
    # there runs 4x slower: staying on it costs the most relative to the new best
    ents = [e for e in lib.entries if e.quality >= min_quality]
    v = 1024 * SMOLLM2_KV_BYTES_PER_TOKEN

    def lat(e, bw, slow=None):
        if e is BF16_ENTRY:
            return transfer_ms(v, bw)
        c = codec_ms(v, e.encode_MBps, e.decode_MBps) * (4.0 if e.codec_id == slow else 1.0)
        return c + transfer_ms(v, bw, e.ratio)

    worst = (0.0, 100.0, None)
    for bw in np.geomspace(5, 5000, 61):
        best = min([BF16_ENTRY] + ents, key=lambda e: lat(e, bw))
        if best is BF16_ENTRY:
            continue
        after = min(lat(e, bw, best.codec_id) for e in [BF16_ENTRY] + ents)
        gap = lat(best, bw, best.codec_id) / after
        if gap > worst[0]:
            worst = (gap, float(bw), best.codec_id)
    out.append(Trace("slowdown", sizes(), np.full(n, worst[1]), worst[2], n // 2, 4.0))
    out.append(Trace("fast", sizes(), np.full(n, 5000.0), can_help=False))
    out.append(Trace("fast-noisy", sizes(), 5000.0 * np.exp(_ar1(rng, n, 0.3, 0.9)), can_help=False))
    return out


def _ar1(rng, n: int, sigma: float, rho: float) -> np.ndarray:
    """Log-bandwidth noise: AR(1) with stationary std ``sigma`` (links drift, they do not
    jump independently per request) plus 10% i.i.d. per-request jitter."""
    x = np.zeros(n)
    x[0] = rng.normal(0, sigma)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + math.sqrt(1 - rho * rho) * sigma * rng.normal()
    return x + rng.normal(0, 0.1, n)


def true_ms(entry, kv, bw, trace: Trace, i: int, jitter: float) -> float:
    if entry is BF16_ENTRY:
        return transfer_ms(kv, bw) * jitter
    c = codec_ms(kv, entry.encode_MBps, entry.decode_MBps)
    if trace.slow_codec is not None and i >= trace.slow_from and entry.codec_id == trace.slow_codec:
        c *= trace.slow_factor
    return (c + transfer_ms(kv, bw, entry.ratio)) * jitter


def run_trace(lib: Library, trace: Trace, min_quality: float = 97.0, epsilon: float = 0.1, seed: int = 0,
              slo_ms: float = math.inf, **controller_kw) -> dict:
    rng = np.random.default_rng(seed + 1000)
    ctl = Controller(lib, slo_ms=slo_ms, min_quality=min_quality, epsilon=epsilon, seed=seed, **controller_kw)
    cands = [BF16_ENTRY] + [e for e in lib.entries if e.quality >= min_quality]
    n = len(trace.kv_bytes)
    truth = np.zeros((n, len(cands)))
    ctl_ms = np.zeros(n)
    chosen = []
    est = float(trace.bandwidth[0])  # the first estimate comes from a probe of the link
    for i in range(n):
        kv, bw = float(trace.kv_bytes[i]), float(trace.bandwidth[i])
        jit = float(np.exp(rng.normal(0, 0.03)))
        truth[i] = [true_ms(e, kv, bw, trace, i, jit) for e in cands]
        d = ctl.decide(kv, est)
        j = next(k for k, e in enumerate(cands) if e.name == d.profile)
        ctl_ms[i] = truth[i, j]
        chosen.append(d.profile)
        # as the serving layer does: the choice is judged at the bandwidth the transfer saw,
        # and that measurement is the estimate for the next request
        ctl.observe(d, ctl_ms[i], bandwidth_mbps=bw)
        est = bw
    oracle = truth.min(axis=1)
    w = slice(WARMUP, n)
    fixed = {e.name: float(truth[w, k].mean()) for k, e in enumerate(cands)}
    best_fixed = min(fixed, key=fixed.get)
    res = {"trace": trace.name, "requests": n, "warmup": WARMUP, "candidates": len(cands),
           "controller_ms": float(ctl_ms[w].mean()), "oracle_ms": float(oracle[w].mean()),
           "bf16_ms": fixed[BF16], "best_fixed": best_fixed, "best_fixed_ms": fixed[best_fixed],
           "fixed_ms": fixed, "can_help": trace.can_help}
    res["vs_oracle"] = res["controller_ms"] / res["oracle_ms"]
    res["vs_bf16"] = res["controller_ms"] / res["bf16_ms"]
    if trace.slow_from is not None:
        ratio = ctl_ms / oracle
        rec = None
        for k in range(trace.slow_from, n - 4):
            if ratio[k:k + 5].mean() <= 1.05:
                rec = k - trace.slow_from
                break
        res["slow_codec"] = trace.slow_codec
        res["bandwidth_mbps"] = float(trace.bandwidth[0])
        res["stay_vs_oracle_after"] = float(truth[trace.slow_from:, [e.name for e in cands].index(chosen[trace.slow_from - 1])].mean()
                                            / oracle[trace.slow_from:].mean())
        res["recovery_requests"] = rec
        res["after_slowdown_vs_oracle"] = float(ctl_ms[trace.slow_from:].mean() / oracle[trace.slow_from:].mean())
    res["per_request"] = {"controller": ctl_ms.tolist(), "oracle": oracle.tolist(), "bf16": truth[:, 0].tolist(),
                          "best_fixed": truth[:, [e.name for e in cands].index(best_fixed)].tolist(),
                          "bandwidth": trace.bandwidth.tolist(), "chosen": chosen}
    return res


def simulate(lib: Library, n: int = 300, seed: int = 0, min_quality: float = 97.0, epsilon: float = 0.1,
             **controller_kw) -> list[dict]:
    return [run_trace(lib, t, min_quality, epsilon, seed, **controller_kw) for t in make_traces(lib, n, seed, min_quality)]


def targets(results: list[dict]) -> dict:
    out = {}
    for r in results:
        t = {"within_5pct_of_oracle": r["vs_oracle"] <= 1.05}
        if not r["can_help"]:
            t["within_3pct_of_bf16"] = r["vs_bf16"] <= 1.03
        if "recovery_requests" in r:
            t["recovery_within_20"] = r["recovery_requests"] is not None and r["recovery_requests"] <= 20
        out[r["trace"]] = t
    return out


def format_table(results: list[dict]) -> str:
    rows = [["trace", "controller ms", "oracle ms", "ctl/oracle", "bf16 ms", "ctl/bf16", "best fixed", "fixed ms", "recovery"]]
    for r in results:
        rows.append([r["trace"], f"{r['controller_ms']:.1f}", f"{r['oracle_ms']:.1f}", f"{r['vs_oracle']:.3f}",
                     f"{r['bf16_ms']:.1f}", f"{r['vs_bf16']:.3f}", r["best_fixed"], f"{r['best_fixed_ms']:.1f}",
                     "-" if "recovery_requests" not in r else str(r["recovery_requests"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, (len(results) + 1) // 2, figsize=(5 * ((len(results) + 1) // 2), 7.5))
    for ax, r in zip(axes.flat, results):
        pr = r["per_request"]
        k = 9

        def sm(a):
            return np.convolve(a, np.ones(k) / k, mode="same")
        x = np.arange(len(pr["controller"]))
        ax.plot(x, sm(pr["bf16"]), label="bf16", color="0.5")
        ax.plot(x, sm(pr["best_fixed"]), label=f"best fixed ({r['best_fixed']})", color="C2", lw=0.8)
        ax.plot(x, sm(pr["oracle"]), label="oracle", color="k", ls="--")
        ax.plot(x, sm(pr["controller"]), label="controller", color="C3", lw=1.0)
        ax.set_yscale("log")
        ax.set_title(f"{r['trace']}: ctl/oracle {r['vs_oracle']:.3f}, ctl/bf16 {r['vs_bf16']:.3f}", fontsize=9)
        ax.set_xlabel("request")
        ax.set_ylabel("latency ms (9-request mean)")
        ax.legend(fontsize=6)
        ax2 = ax.twinx()
        ax2.plot(x, pr["bandwidth"], color="C0", alpha=0.25, lw=0.6)
        ax2.set_yscale("log")
        ax2.set_ylabel("Mbps", color="C0", fontsize=7)
    fig.suptitle("kvserve controller simulation (SmolLM2 library; codec speeds from the profiler, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
