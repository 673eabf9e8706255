"""Relative perplexity of candidate profiles on non-sotu text (512-token windows).

    python benchmarks/kvserve_ppl_levers.py --split tune --profiles kvserve,kvs-t4 [--windows 16] [--json OUT]

Texts (kvserve.tasks): the first 8 kB of each King James Bible book of the split, and the first
300 kB of the Wikipedia prose of the split's HotpotQA paragraphs; ``--windows`` windows of 512 + 64 tokens from each (seed 0 on
tune, 1 on test), evaluated by :class:`kvserve.quality.Evaluator` (rel_ppl, top-1 agreement,
KL(bf16 || compressed)), threads pinned to 1. Profiles: packaged names, JSON files, or the
candidate names of benchmarks/kvserve_tasks.py (the `kvserve` variants: set ``ppl``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from kvserve_tasks import resolve  # noqa: E402

from kvserve import tasks  # noqa: E402
from kvserve.quality import EvalConfig, Evaluator  # noqa: E402

def texts_file(split: str, which: str) -> str:
    path = os.path.join(tempfile.gettempdir(), f"kvserve-text-{split}-{which}.txt")
    if not os.path.exists(path):
        # 8 kB from each book / 300 kB of paragraphs: the windows are drawn from one string
        src = [t[:8000] for t in tasks.haystack_texts(split)] if which == "kjv" else ["\n\n".join(tasks.qa_texts(split))[:300000]]
        with open(path + ".part", "w", encoding="utf-8") as f:
            f.write("\n\n".join(src))
        os.replace(path + ".part", path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="tune", choices=["tune", "test"])
    ap.add_argument("--profiles", default="kvserve")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--texts", default="kjv,wiki")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    configs = resolve([p for p in a.profiles.split(",") if p], a.model)
    out = {"method": {}, "results": {}}
    for which in a.texts.split(","):
        ev = Evaluator(EvalConfig(model=a.model, windows=a.windows, ctx=512, cont=64, gen=0, longrange=0,
                                  seed=0 if a.split == "tune" else 1, threads=1, kl=True,
                                  text_file=texts_file(a.split, which)))
        out["method"][which] = ev.method()
        for c in configs:
            r = ev.evaluate(c)
            out["results"].setdefault(c["name"], {})[which] = {"ratio": r.ratio, "rel_ppl": r.rel_ppl,
                                                             "top1_agree": r.top1_agree, "kl": r.extra["kl"]}
            print(f"{which:5s} {c['name']:22s} ratio {r.ratio:5.2f} rel_ppl {r.rel_ppl:6.2f} top1 {r.top1_agree:.3f} "
                  f"kl {r.extra['kl']:.4f}", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
