"""What the fuzz scripts share (not in CI): deterministic mutations of bytes and JSON, and a
watchdog that runs inputs in worker processes and counts crashes and hangs.

A fuzz script defines ``build(target, options)`` state once per worker, ``one(state, i, rng)``
returning ``(kind, outcome, why, data)`` for input ``i`` and, optionally, ``finish(state)``
returning problems found after the last input (each counted as ``foreign``) (``rng`` is seeded from the run's
seed, the target and ``i``, so every input can be rebuilt alone); :func:`run_target` runs
``start..end`` ranges of inputs on ``workers`` processes. A worker that dies counts its
current input as a ``crash``, one input running longer than ``hang_s`` is killed and counted
as a ``hang``; either way a fresh worker goes on after that input. Peak memory is each
worker's VmHWM (sampled by the parent; the largest over its restarts).
"""
from __future__ import annotations

import ctypes
import json
import math
import multiprocessing as mp
import os
import random
import time
from pathlib import Path

CATS = ["tried", "rejected", "accepted", "silently_wrong", "foreign", "crash", "hang"]
INTERESTING = [0, 1, -1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 63, 64, 255, 256, 4095, 4096, 65535, 65536,
               2 ** 20, 2 ** 30, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 34, 2 ** 40, 2 ** 53, 2 ** 63 - 1, 2 ** 63, 2 ** 64,
               10 ** 30, -2 ** 31, -2 ** 63, 0.5, -0.0, 1e-300, 1e308, float("inf"), float("-inf"), float("nan"),
               True, False, None, "", "x", "BF16", "F16", "F32", "I64", "U8", "enec", "raw", "bfloat16",
               [], {}, [0], [1, 2], [0, 2 ** 40], "\udcff"]


# ------------------------------------------------------------------ mutations


def value(rng: random.Random, old=None, interesting: list = INTERESTING):
    """A replacement for a JSON value: an ``interesting`` constant, a neighbour of ``old``, deep
    lists, huge integers, odd strings, or a small list of those."""
    r = rng.random()
    if r < 0.45:
        return rng.choice(interesting)
    if r < 0.6 and isinstance(old, (int, float)) and not isinstance(old, bool) and math.isfinite(old):
        return rng.choice([old + 1, old - 1, old * 2, -old, old // 2 if isinstance(old, int) else old / 2,
                           old + rng.randint(-1000, 1000), int(old) * 2 ** rng.randint(1, 40)])
    if r < 0.7:
        out: list = []
        for _ in range(rng.choice([2, 10, 100])):
            out = [out]
        return out
    if r < 0.8:
        return rng.randint(-2 ** 64, 2 ** 64)
    if r < 0.9:
        return "".join(rng.choice("abcxyz.0129-\u00e9\u4e2d") for _ in range(rng.randint(0, 12)))
    return [value(rng, interesting=interesting) for _ in range(rng.randint(0, 4))]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_json(obj, rng: random.Random, focus: tuple = (), new_keys=("extra", "x"), interesting=INTERESTING):
    """A copy of ``obj`` with one place (under ``focus`` if it exists) edited: a value replaced
    (see :func:`value`), a key deleted or added (named from ``new_keys``), a list shortened or
    grown."""
    obj = json.loads(json.dumps(obj))
    try:
        root = _get(obj, focus)
    except (KeyError, IndexError, TypeError):
        root, focus = obj, ()
    path = focus + rng.choice(list(_paths(root)))
    if not path:
        return value(rng, interesting=interesting) if rng.random() < 0.2 else obj
    parent, key = _get(obj, path[:-1]), path[-1]
    op = rng.random()
    if op < 0.7:
        parent[key] = value(rng, parent[key], interesting)
    elif op < 0.8:
        del parent[key]
    elif op < 0.9 and isinstance(parent, dict):
        parent[rng.choice(new_keys)] = value(rng, interesting=interesting)
    elif isinstance(parent, list):
        if rng.random() < 0.5:
            parent.append(json.loads(json.dumps(parent[key])))
        else:
            parent.insert(rng.randint(0, len(parent)), value(rng, interesting=interesting))
    else:
        parent[key] = value(rng, interesting=interesting)
    return obj


def dumps(obj) -> bytes:
    """Compact JSON (lone surrogates kept); ``{}`` for what JSON cannot hold."""
    try:
        return json.dumps(obj, separators=(",", ":")).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return b"{}"


def deep_text(text: bytes, rng: random.Random) -> bytes:
    """One JSON value (after a ``:`` or ``[``) replaced by arrays nested 1,000-100,000 deep."""
    spots = [i + 1 for i, c in enumerate(text) if c in b":["] or [0]
    i = rng.choice(spots)
    depth = rng.choice([1000, 5000, 100_000])
    return text[:i] + b"[" * depth + b"]" * depth + b"," + text[i:]


def bytes_edit(b: bytes, rng: random.Random) -> bytes:
    """Bit flips, an overwrite (zeros, ones or random), truncation, extension or a splice."""
    b = bytearray(b)
    op = rng.random()
    if not b:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
    if op < 0.35:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op < 0.6:
        i = rng.randrange(len(b))
        n = rng.randint(1, 64)
        fill = rng.choice([b"\x00", b"\xff", None])
        b[i:i + n] = (fill * n) if fill else bytes(rng.getrandbits(8) for _ in range(n))
    elif op < 0.75:
        del b[rng.randrange(len(b)):]
    elif op < 0.85:
        b += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    else:
        i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
        k = rng.randrange(len(b) + 1)
        b[k:k] = b[i:j]
    return bytes(b)


# ------------------------------------------------------------------ workers and watchdog


def _worker(module: str, target: str, seed: int, wid: int, start: int, end: int, counts, progress, out_dir: str,
            options: dict, selftest: bool) -> None:
    """Run inputs ``start..end-1``: ``module.build(target, options)`` once, then
    ``module.one(state, i, rng)`` per input. The current index and its start time go to
    ``progress`` for the parent's watchdog. With ``selftest``, input 3 aborts the process
    and input 7 sleeps: the watchdog must count one crash and one hang."""
    import importlib

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mod = importlib.import_module(module)
    state = mod.build(target, options)
    by_kind: dict[str, dict[str, int]] = {}
    found = Path(out_dir) / f"findings-{target}"
    with open(Path(out_dir) / f"findings-{target}-{wid}.jsonl", "a") as log:
        for i in range(start, end):
            progress[0], progress[1] = i, time.time()
            if selftest and i == 3:
                os.abort()
            if selftest and i == 7:
                time.sleep(3600)
            rng = random.Random(f"{seed}-{target}-{i}")
            try:
                kind, cat, why, data = mod.one(state, i, rng)
            except Exception as exc:  # noqa: BLE001 - the harness must not die silently
                kind, cat, why, data = "harness", "foreign", f"harness: {type(exc).__name__}: {exc}", b""
            counts[CATS.index("tried")] += 1
            counts[CATS.index(cat)] += 1
            k = by_kind.setdefault(kind, {})
            k[cat] = k.get(cat, 0) + 1
            if cat not in ("rejected", "accepted"):
                found.mkdir(exist_ok=True)
                (found / f"{target}-{i}.bin").write_bytes(data)
                log.write(json.dumps({"target": target, "index": i, "kind": kind, "outcome": cat, "why": why}) + "\n")
                log.flush()
        for why in getattr(mod, "finish", lambda state: [])(state):  # e.g. a server's log, read at the end
            counts[CATS.index("foreign")] += 1
            log.write(json.dumps({"target": target, "index": -1, "kind": "finish", "outcome": "foreign",
                                  "why": why[:300]}) + "\n")
    (Path(out_dir) / f"kinds-{target}-{wid}-{start}.json").write_text(json.dumps(by_kind))
    progress[0], progress[1] = end, time.time()


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory of process ``pid`` in MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0


def run_target(module: str, target: str, n: int, *, seed: int, workers: int, hang_s: float, out_dir: str,
               options: dict | None = None, selftest: bool = False) -> dict:
    """Run ``n`` inputs of ``target`` (module ``module``'s ``build`` and ``one``) on ``workers``
    processes under the watchdog; returns the counts per outcome, per mutation kind, the
    seconds, each worker's peak memory and how many workers were restarted."""
    ctx = mp.get_context("spawn")
    per = -(-n // workers)
    slots = []
    for wid, a in enumerate(range(0, n, per)):
        slots.append({"wid": wid, "next": a, "end": min(n, a + per), "proc": None, "peak_mb": 0.0, "restarts": 0,
                      "counts": ctx.Array(ctypes.c_longlong, len(CATS), lock=False),
                      "progress": ctx.Array(ctypes.c_double, 2, lock=False)})
    t0 = time.time()

    def launch(s):
        s["progress"][0], s["progress"][1] = s["next"], 0.0  # 0: starting up (imports, seeds), not timed
        s["proc"] = ctx.Process(target=_worker, daemon=True,
                                args=(module, target, seed, s["wid"], s["next"], s["end"], s["counts"],
                                      s["progress"], out_dir, options or {}, selftest))
        s["proc"].start()

    for s in slots:
        launch(s)
    last_print = time.time()
    while any(s["proc"] is not None for s in slots):
        time.sleep(0.5)
        for s in slots:
            p = s["proc"]
            if p is None:
                continue
            s["peak_mb"] = max(s["peak_mb"], vm_hwm_mb(p.pid))
            i, since = int(s["progress"][0]), s["progress"][1]
            if not p.is_alive():
                p.join()
                if p.exitcode == 0 and i >= s["end"]:
                    s["proc"] = None
                    continue
                outcome, why = "crash", f"worker exit code {p.exitcode}"
            elif i < s["end"] and since and time.time() - since > hang_s:
                p.kill()
                p.join()
                outcome, why = "hang", f"input still running after {hang_s} s"
            else:
                continue
            s["counts"][CATS.index("tried")] += 1  # input i ended its worker: count it, go on after it
            s["counts"][CATS.index(outcome)] += 1
            with open(Path(out_dir) / f"findings-{target}-parent.jsonl", "a") as f:
                f.write(json.dumps({"target": target, "index": i, "kind": "?", "outcome": outcome, "why": why}) + "\n")
            s["next"], s["restarts"], s["proc"] = i + 1, s["restarts"] + 1, None
            if s["next"] < s["end"]:
                launch(s)
        if time.time() - last_print > 30:
            last_print = time.time()
            print(f"  {target}: {sum(s['counts'][0] for s in slots)}/{n} in {time.time() - t0:.0f} s", flush=True)
    by_kind: dict[str, dict[str, int]] = {}
    for p in Path(out_dir).glob(f"kinds-{target}-*.json"):
        for kind, cats in json.loads(p.read_text()).items():
            for c, v in cats.items():
                by_kind.setdefault(kind, {}).setdefault(c, 0)
                by_kind[kind][c] += v
    totals = {c: int(sum(s["counts"][k] for s in slots)) for k, c in enumerate(CATS)}
    return {"target": target, **totals, "by_kind": by_kind, "seconds": round(time.time() - t0, 1),
            "peak_mb_per_worker": [round(s["peak_mb"], 1) for s in slots],
            "worker_restarts": sum(s["restarts"] for s in slots)}


def add_arguments(ap, workers: int) -> None:
    """The options every fuzz script takes (beside its per-target input counts)."""
    ap.add_argument("--workers", type=int, default=workers)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hang-s", type=float, default=20.0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--selftest", action="store_true", help="inject a crash (input 3) and a hang (input 7)")


def run_all(module: str, targets: list[tuple[str, int]], args, options: dict | None = None) -> tuple[list[dict], str]:
    """Each ``(target, n)`` with ``n > 0`` through :func:`run_target`; returns the rows and the
    scratch folder the workers wrote to."""
    import tempfile

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{module}-")
    rows = []
    for target, n in targets:
        if n > 0:
            print(f"{target}: {n} inputs, {args.workers} worker(s)", flush=True)
            rows.append(run_target(module, target, n, seed=args.seed, workers=args.workers, hang_s=args.hang_s,
                                   out_dir=work, options=options, selftest=args.selftest))
    return rows, work


def findings(out_dir: str) -> list[dict]:
    """Every finding the workers and the watchdog logged under ``out_dir``."""
    out = []
    for p in sorted(Path(out_dir).glob("findings-*.jsonl")):
        out += [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return out


def report(work: str, out: str, name: str, rows: list[dict], meta: dict) -> list[dict]:
    """Write ``<out>/<name>.json`` (``meta``, the date, load average, rows and findings), copy
    the inputs of findings to ``<out>/<name>_findings/``, print the table; returns the findings."""
    found = findings(work)
    for saved in Path(work).glob("findings-*"):
        if saved.is_dir():
            dst = Path(out) / f"{name}_findings"
            dst.mkdir(exist_ok=True)
            for f in saved.iterdir():
                (dst / f.name).write_bytes(f.read_bytes())
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **meta, "loadavg": os.getloadavg(),
           "results": rows, "findings": found[:500]}
    Path(out, f"{name}.json").write_text(json.dumps(res, indent=1))
    print(format_table(rows))
    print(f"findings: {len(found)} (written to {out}/{name}.json)")
    return found


def format_table(rows) -> str:
    head = "| target | " + " | ".join(CATS) + " | peak MB / worker | seconds |"
    lines = [head, "|" + "---|" * (len(CATS) + 3)]
    for r in rows:
        lines.append(f"| {r['target']} | " + " | ".join(str(r[c]) for c in CATS)
                     + f" | {max(r['peak_mb_per_worker'] or [0]):.0f} | {r['seconds']:.0f} |")
    tot = {c: sum(r[c] for r in rows) for c in CATS}
    lines.append("| **all** | " + " | ".join(str(tot[c]) for c in CATS) + " | | |")
    return "\n".join(lines)
