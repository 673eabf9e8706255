"""Profiler benchmark: exhaustive grid vs the Bayesian engine on SmolLM2 (small tune-split set).

    python benchmarks/kvserve_profiler.py [--windows 4 --ctx 256 --cont 64] [--seeds 5]
        [--write-library src/kvserve/library/smollm2-ppl.json]
    python benchmarks/kvserve_profiler.py --objective tasks --qa 12 --refs DIR [--cheap-from RECORDS]

1. Measures ratio and codec speed of every configuration of the space (1 thread): the
   ``default`` space on relative perplexity (``--objective ppl``, the default here), or the
   ``tasks`` space on relative task accuracy of ``--qa`` tune-split HotpotQA items
   (``--objective tasks``, ``profiler.TaskBench``; ``--cheap-from`` reuses the ratio/speed
   measurements of a ``kvserve profile --records`` file for identical configurations).
2. Grid: evaluates the quality of every quality key (cached in
   benchmarks/results/kvserve_profiler[_tasks]_grid.json; delete it to re-run).
3. Bayesian: ``--seeds`` runs per acquisition (``ehvi``, ``paper``). Quality evaluation is
   deterministic (same windows, same forward pass), so these runs read the grid's measured
   qualities instead of recomputing them; ``--live`` adds one run that evaluates for real
   and checks that its values equal the grid's.
Writes benchmarks/results/kvserve_profiler[_tasks].json and .png, prints a table.
"""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np

from kvserve import profiler as P

RES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--cont", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--live", action="store_true", help="one Bayesian run with real evaluations")
    ap.add_argument("--write-library", default=None)
    ap.add_argument("--grid-only", action="store_true")
    ap.add_argument("--objective", default="ppl", choices=["ppl", "tasks"])
    ap.add_argument("--qa", type=int, default=12, help="tune-split QA items (tasks objective)")
    ap.add_argument("--lengths", default="1024,2048,4096", help="QA prompt lengths, cycled (tasks objective)")
    ap.add_argument("--refs", default=None, help="folder caching the items' bf16 references (tasks objective)")
    ap.add_argument("--cheap-from", default=None, help="`kvserve profile --records` JSON: reuse its ratio/speeds")
    a = ap.parse_args()
    os.makedirs(RES, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    tasks = a.objective == "tasks"
    tag = "kvserve_profiler_tasks" if tasks else "kvserve_profiler"
    cache = os.path.join(RES, tag + "_grid.json")
    configs = P.search_space("tasks" if tasks else "default")
    bench = None

    def make_bench():
        if tasks:
            return P.TaskBench("smollm2", a.qa, tuple(int(x) for x in a.lengths.split(",")), refs=a.refs, threads=1)
        return P.RealBench("smollm2", a.windows, a.ctx, a.cont, seed=1, threads=1)
    if os.path.exists(cache):
        with open(cache) as f:
            g = json.load(f)
        records = [P.Record(r["name"], r["config"], P.quality_key(r["config"]), r["ratio"], r["encode_MBps"],
                            r["decode_MBps"], r["quality"]) for r in g["records"]]
        grid_info = g["grid"]
        method = g["method"]
    else:
        bench = make_bench()
        earlier = None
        if a.cheap_from:
            with open(a.cheap_from) as f:
                earlier = {r["name"]: r for r in json.load(f)["records"]}
        t0 = time.perf_counter()
        records = P.measure_space(configs, bench.cheap, cache=earlier)
        t_cheap = time.perf_counter() - t0
        res = P.grid_search(records, bench.quality)
        grid_info = {"evaluations": res.evaluations, "seconds_quality": res.seconds, "seconds_cheap": t_cheap,
                     "mean_eval_s": float(np.mean(bench.eval_seconds)), "hv_trace": res.hv_trace}
        method = bench.method()
        method["note"] = "speeds measured with 1 thread on a shared 2-core machine (other jobs running)"
        with open(cache, "w") as f:
            json.dump({"method": method, "grid": grid_info, "records": [r.to_json() for r in records]}, f)
    sp = P.Space(records)
    truth = {r.key: r.quality for r in records}
    hv_grid = sp.hv(truth)
    n_keys = len(sp.keys)
    n_lossy = int((~sp.lossless).sum())
    print(f"space: {len(records)} configs, {n_keys} quality keys ({n_lossy} lossy); grid HV {hv_grid:.4f}, "
          f"{grid_info['evaluations']} evaluations, {grid_info['seconds_quality']:.0f} s quality + "
          f"{grid_info['seconds_cheap']:.0f} s ratio/speed")
    if a.write_library:
        lib = P.build_library(copy.deepcopy(records), {"model": "smollm2", "mode": "grid", "configs": len(records),
                                                       "quality_keys": n_keys, "evaluations": grid_info["evaluations"],
                                                       "method": method})
        lib.save(a.write_library)
        print(f"library: {len(lib.entries)} entries -> {a.write_library}")
    if a.grid_only:
        return
    budget = max(9, int(np.ceil(n_lossy / 20)))  # the profiler's default: 1/20, at least cold start + 1
    runs = []

    def lookup(key):
        return truth[json.dumps(key, sort_keys=True)]

    for acq in ("ehvi", "paper"):
        for seed in range(a.seeds):
            recs = [P.Record(r.name, r.config, r.key, r.ratio, r.encode_MBps, r.decode_MBps) for r in records]
            res = P.bayes_search(recs, lookup, budget=budget, acquisition=acq, seed=seed, progress=False)
            hv = sp.hv({r.key: r.quality for r in recs if r.quality is not None})
            runs.append({"acquisition": acq, "seed": seed, "evaluations": res.evaluations, "hv": hv,
                         "hv_frac": hv / hv_grid, "stopped": res.stopped, "seconds_engine": res.seconds,
                         "hv_trace": [h / hv_grid for h in res.hv_trace], "log": res.log})
            print(f"  {acq:5s} seed {seed}: {res.evaluations:3d} evals, HV {100 * hv / hv_grid:6.2f}% of grid "
                  f"({res.stopped}; engine {res.seconds:.1f} s)", flush=True)
    ablation = []  # sensitivity of the EHVI engine (seed 0): cold start, early stop, pruning
    for kw in [{"cold_start": 4}, {"cold_start": 6}, {"cold_start": 10}, {"early_stop": False},
               {"prune": False}, {"explore": 0.0}]:
        recs = [P.Record(r.name, r.config, r.key, r.ratio, r.encode_MBps, r.decode_MBps) for r in records]
        res = P.bayes_search(recs, lookup, budget=budget, seed=0, progress=False, **kw)
        hv = sp.hv({r.key: r.quality for r in recs if r.quality is not None})
        ablation.append({"setting": kw, "evaluations": res.evaluations, "hv_frac": hv / hv_grid, "stopped": res.stopped})
        print(f"  ehvi {kw}: {res.evaluations} evals, HV {100 * hv / hv_grid:.2f}% of grid", flush=True)
    live = None
    if a.live:
        bench = bench or make_bench()
        recs = [P.Record(r.name, r.config, r.key, r.ratio, r.encode_MBps, r.decode_MBps) for r in records]
        res = P.bayes_search(recs, bench.quality, budget=budget, acquisition="ehvi", seed=0)
        hv = sp.hv({r.key: r.quality for r in recs if r.quality is not None})
        diffs = [abs(r.quality - truth[r.key]) for r in recs if r.quality is not None]
        live = {"evaluations": res.evaluations, "hv_frac": hv / hv_grid, "seconds": res.seconds,
                "max_abs_quality_diff_vs_grid": max(diffs)}
        print(f"  live ehvi: {res.evaluations} evals, HV {100 * hv / hv_grid:.2f}% of grid, {res.seconds:.0f} s, "
              f"max |q - q_grid| {max(diffs):.2e}")
    summary = {}
    for acq in ("ehvi", "paper"):
        rs = [r for r in runs if r["acquisition"] == acq]
        summary[acq] = {"mean_evals": float(np.mean([r["evaluations"] for r in rs])),
                        "max_evals": int(max(r["evaluations"] for r in rs)),
                        "mean_hv_frac": float(np.mean([r["hv_frac"] for r in rs])),
                        "min_hv_frac": float(min(r["hv_frac"] for r in rs)),
                        "runs_meeting_target": int(sum(bool(r["hv_frac"] >= 0.98 and r["evaluations"] <= n_lossy / 20) for r in rs))}
    out = {"method": method, "space": {"configs": len(records), "quality_keys": n_keys, "lossy_keys": n_lossy},
           "grid": {k: v for k, v in grid_info.items()}, "grid_hv": hv_grid, "budget": budget,
           "target": "HV >= 98% of grid with <= 1/20 of the grid's evaluations", "summary": summary,
           "runs": runs, "ablation": ablation, "live": live,
           "front": [r.to_json() for r in P.pareto_records(records)]}
    with open(os.path.join(RES, tag + ".json"), "w") as f:
        json.dump(out, f, indent=1)
    print()
    print(f"| method | evaluations | HV (% of grid) | runs meeting target |")
    print(f"|---|---|---|---|")
    print(f"| grid | {grid_info['evaluations']} | 100.00 | - |")
    for acq in ("ehvi", "paper"):
        s = summary[acq]
        print(f"| bayes-{acq} ({a.seeds} seeds) | {s['mean_evals']:.1f} (max {s['max_evals']}) | "
              f"{100 * s['mean_hv_frac']:.2f} (min {100 * s['min_hv_frac']:.2f}) | {s['runs_meeting_target']}/{a.seeds} |")
    print()
    print("| EHVI setting (seed 0) | evaluations | HV (% of grid) |")
    print("|---|---|---|")
    print(f"| default (cold start 8, early stop, pruning) | {runs[0]['evaluations']} | {100 * runs[0]['hv_frac']:.2f} |")
    for ab in ablation:
        print(f"| {ab['setting']} | {ab['evaluations']} | {100 * ab['hv_frac']:.2f} |")
    if live:
        print(f"\nlive run (real evaluations): {live['evaluations']} evals, HV {100 * live['hv_frac']:.2f}% of grid, "
              f"{live['seconds']:.0f} s vs grid {out['grid']['seconds_quality']:.0f} s")
    plot(out, records, os.path.join(RES, tag + ".png"), tasks)


def plot(out, records, path, tasks=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    gt = out["grid"]["hv_trace"]
    ax.plot(range(1, len(gt) + 1), np.array(gt) / out["grid_hv"], color="k", label="grid (space order)")
    for r in out["runs"]:
        ax.plot(range(1, len(r["hv_trace"]) + 1), r["hv_trace"], color="C0" if r["acquisition"] == "ehvi" else "C1",
                alpha=0.6, label=f"bayes-{r['acquisition']}" if r["seed"] == 0 else None)
    ax.axhline(0.98, color="r", ls="--", lw=0.6)
    ax.axvline(out["budget"], color="0.5", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("quality evaluations")
    ax.set_ylabel("hypervolume / grid hypervolume")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    known = [r for r in records if r.quality is not None]
    front = P.pareto_records(records)
    for ax, (xa, xl) in zip(axes[1:], [("ratio", "compression ratio"), ("codec_ms_per_MB", "codec ms per MB (enc+dec, 1 thread)")]):
        ax.scatter([getattr(r, xa) for r in known], [r.quality for r in known], s=4, c="0.8", label="grid (all)")
        sc = ax.scatter([getattr(r, xa) for r in front], [r.quality for r in front], s=18,
                        c=[r.codec_ms_per_MB if xa == "ratio" else r.ratio for r in front], cmap="viridis",
                        edgecolors="k", linewidths=0.3, label="3D Pareto set")
        fig.colorbar(sc, ax=ax, label="codec ms/MB" if xa == "ratio" else "ratio")
        ax.set_ylim(85, None)
        if xa == "codec_ms_per_MB":
            ax.set_xscale("log")
        ax.axhline(P.QUALITY_FLOOR, color="r", lw=0.5, ls="--")
        ax.set_xlabel(xl)
        ax.set_ylabel("relative task accuracy (capped at 100)" if tasks else "quality (rel. PPL x 100)")
        ax.legend(fontsize=8)
    obj = "relative task accuracy, HotpotQA" if tasks else "relative perplexity"
    fig.suptitle(f"kvserve profiler on SmolLM2 ({obj}; tune split, small set): grid vs Bayesian")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
