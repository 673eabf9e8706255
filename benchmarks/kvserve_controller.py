"""Controller simulation on bandwidth traces vs oracle, always-bf16 and every fixed profile.

    python benchmarks/kvserve_controller.py [--library L] [--requests 300] [--seeds 3] [--min-quality 97]

Uses the packaged SmolLM2 library by default (ratios, qualities and codec speeds measured by
the profiler, 1 thread on a shared machine). Writes benchmarks/results/kvserve_controller.json
and .png (seed 0) and prints the table per seed plus the targets.
"""
import argparse
import json
import os
import sys

import numpy as np

import kvserve_simulate as S  # beside this script
from kvserve.library import load_library

RES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--library", default=None)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--min-quality", type=float, default=97.0)
    ap.add_argument("--epsilon", type=float, default=0.1)
    a = ap.parse_args()
    os.makedirs(RES, exist_ok=True)
    lib = load_library(a.library)
    runs = []
    for seed in range(a.seeds):
        res = S.simulate(lib, a.requests, seed, a.min_quality, a.epsilon)
        print(f"seed {seed} ({len(lib.entries)} library entries, min quality {a.min_quality:g}):")
        print(S.format_table(res))
        runs.append({"seed": seed, "targets": S.targets(res), "results": res})
        if seed == 0:
            S.plot(res, os.path.join(RES, "kvserve_controller.png"))
    names = [r["trace"] for r in runs[0]["results"]]
    summary = {}
    for i, n in enumerate(names):
        rs = [run["results"][i] for run in runs]
        summary[n] = {"vs_oracle_mean": float(np.mean([r["vs_oracle"] for r in rs])),
                      "vs_oracle_max": float(max(r["vs_oracle"] for r in rs)),
                      "vs_bf16_max": float(max(r["vs_bf16"] for r in rs)),
                      "targets_met": all(all(run["targets"][n].values()) for run in runs)}
        if "recovery_requests" in rs[0]:
            summary[n]["recovery_max"] = max((r["recovery_requests"] if r["recovery_requests"] is not None else 10**9) for r in rs)
    for run in runs:  # keep the JSON small: per-request series only for seed 0
        if run["seed"]:
            for r in run["results"]:
                r.pop("per_request")
    out = {"library": a.library or "packaged smollm2", "library_entries": len(lib.entries), "requests": a.requests,
           "warmup": S.WARMUP, "min_quality": a.min_quality, "epsilon": a.epsilon, "summary": summary, "runs": runs,
           "note": "codec speeds are the profiler's, measured with 1 thread on a shared 2-core machine"}
    with open(os.path.join(RES, "kvserve_controller.json"), "w") as f:
        json.dump(out, f)
    print("\nsummary over seeds:")
    print("| trace | ctl/oracle mean | ctl/oracle max | ctl/bf16 max | recovery (max) | targets met |")
    print("|---|---|---|---|---|---|")
    for n, s in summary.items():
        print(f"| {n} | {s['vs_oracle_mean']:.3f} | {s['vs_oracle_max']:.3f} | {s['vs_bf16_max']:.3f} | "
              f"{s.get('recovery_max', '-')} | {'yes' if s['targets_met'] else 'NO'} |")
    sys.exit(0)
