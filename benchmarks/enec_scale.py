"""ENEC at checkpoint scale: `enec compress` / `enec decompress` against `zstd -T<n> -1` /
`zstd -d` on multi-GB bf16 checkpoints, page cache warm and dropped. Writes JSON + PNG and
prints a table.

Data: real weights the project installs (MiniLM-L6 cast to bf16 and SmolLM2-135M exported
to bf16, see enec_inference.prepare), laid out as safetensors checkpoints of the requested
sizes by repeating those tensors under new names: a ~2 GB single file, a ~4 GB single file
that also holds one 1 GiB tensor (the real tensors concatenated; larger than every buffer,
so it goes through the block-range path), and a ~4 GB folder of four shards with a shard
index and the SmolLM2 config and tokenizer. Repeats sit hundreds of MB apart, far outside
zstd -1's window, so neither tool can exploit them.

Method: each measurement is a fresh process (`python -m enec.cli ... -t <n>` or
`zstd -T<n> -1`; `zstd -d`, which decodes on one thread and writes on another), timed from spawn
to exit (wall clock, so enec's Python start-up and kernel loading count), with its peak
resident set as GNU time reports it (ru_maxrss of the command). Contenders alternate within each repeat (order flipped
every repeat), median of --repeats. "warm": the inputs are read once before the run, so
they come from the page cache. "dropped": the inputs' pages are dropped before the run
(fdatasync + posix_fadvise DONTNEED), so they come from the disk. Outputs are new files on
the same filesystem; after every run they are deleted and the filesystem synced (untimed),
so no run pays for an earlier run's write-back, and each run starts --settle seconds (2)
later, so both tools meet the same state of free memory (on this VM, pages freed moments
ago are much cheaper to write into than pages freed seconds ago). The decompressed outputs of the first
repeat are compared with the originals (SHA-256). Decompression runs twice for enec: as it
comes (it checks the restored file's SHA-256, which zstd has no counterpart of: it checks an
XXH64) and with --no-sha256 (block checksums only). enec's own codec time (--json: the coding
threads' CPU time, divided by their number) gives the codec GB/s next to the end-to-end GB/s.

Usage: python benchmarks/enec_scale.py [--work /tmp/enec-scale-bench] [--repeats 5] [--threads 2]
       [--cases 2GB,4GB,sharded] [--caches warm,dropped] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GB = 1e9
ZSTD = shutil.which("zstd") or "/usr/bin/zstd"


# ------------------------------------------------------------------------------ data


def real_tensors(work: Path) -> list[tuple[str, str, tuple, np.ndarray]]:
    """(name, safetensors dtype, shape, bytes) of every tensor of the real bf16 models."""
    from enec_inference import prepare

    pool = []
    for name, (folder, _) in prepare(work / "models").items():
        for f in sorted(folder.glob("*.safetensors")):
            raw = np.fromfile(f, np.uint8)
            hlen = int(raw[:8].view("<u8")[0])
            meta = json.loads(raw[8 : 8 + hlen].tobytes())
            meta.pop("__metadata__", None)
            for k, v in meta.items():
                a, b = v["data_offsets"]
                pool.append((f"{name}.{k}", v["dtype"], tuple(v["shape"]), raw[8 + hlen + a : 8 + hlen + b]))
    return pool


def write_safetensors(path: Path, tensors: list[tuple[str, str, tuple, list]]) -> int:
    """Write a safetensors file from (name, dtype, shape, [byte chunks]) without holding it
    in memory; returns its size."""
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, chunks in tensors:
        n = sum(c.nbytes for c in chunks)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(len(js).to_bytes(8, "little") + js)
        for _, _, _, chunks in tensors:
            for c in chunks:
                f.write(c.data)
    tmp.rename(path)
    return path.stat().st_size


def layout(pool, target: int, prefix: str, big: int = 0, start: int = 0):
    """Tensors cycling through the pool (renamed) up to ``target`` bytes; with ``big``, first
    one bf16 tensor of that many bytes made of the pool's bf16 tensors end to end."""
    out, total = [], 0
    if big:
        bf = [a for _, d, _, a in pool if d == "BF16"]
        chunks, n, i = [], 0, 0
        while n < big:
            a = bf[i % len(bf)][: big - n]
            chunks.append(a)
            n += a.nbytes
            i += 1
        cols = 576
        out.append((f"{prefix}.stacked.weight", "BF16", (big // 2 // cols, cols), chunks))
        total += big
        assert big % (2 * cols) == 0
    k = start
    while total < target:
        name, dtype, shape, a = pool[k % len(pool)]
        out.append((f"{prefix}.copy{k // len(pool)}.{name}", dtype, shape, [a]))
        total += a.nbytes
        k += 1
    return out, k


def build(work: Path, cases: list[str]) -> dict:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    need = {"2GB": data / "single-2GB.safetensors", "4GB": data / "single-4GB.safetensors",
            "sharded": data / "sharded-4GB"}
    if all(need[c].exists() for c in cases):
        return {c: need[c] for c in cases}
    pool = real_tensors(work)
    if "2GB" in cases and not need["2GB"].exists():
        write_safetensors(need["2GB"], layout(pool, 2 * 10**9, "m")[0])
    if "4GB" in cases and not need["4GB"].exists():
        write_safetensors(need["4GB"], layout(pool, 4 * 10**9, "m", big=576 * 2 * 932067)[0])
    if "sharded" in cases and not need["sharded"].exists():
        tmp = data / "sharded-4GB.part"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        smol = work / "models" / "smollm2-bf16"
        for f in smol.iterdir():
            if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
        weight_map, k = {}, 0
        for s in range(4):
            fname = f"model-{s + 1:05d}-of-00004.safetensors"
            tensors, k = layout(pool, 10**9, "model", start=k)
            write_safetensors(tmp / fname, tensors)
            weight_map.update({t[0]: fname for t in tensors})
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        tmp.rename(need["sharded"])
    return {c: need[c] for c in cases}


def size_of(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def files_of(p: Path) -> list[Path]:
    return [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())


def sha_tree(p: Path) -> dict:
    out = {}
    for f in files_of(p):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
        out[str(f.relative_to(p)) if p.is_dir() else f.name] = h.hexdigest()
    return out


# ------------------------------------------------------------------------------ running


TIME = shutil.which("time") or "/usr/bin/time"


def run(cmd: list[str], env=None) -> dict:
    """Wall time from spawn to exit, and the peak RSS GNU time reports for the command itself
    (wait4 on a child forked from this process would count this process's pages)."""
    stats = Path(os.environ.get("TMPDIR", "/tmp")) / f"enec-scale-time-{os.getpid()}"
    t0 = time.perf_counter()
    p = subprocess.run([TIME, "-f", "%M", "-o", str(stats)] + cmd, capture_output=True, env=env)
    seconds = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    rss_kb = int(stats.read_text().split()[-1])
    stats.unlink()
    return {"seconds": seconds, "peak_rss_mb": rss_kb / 1024, "stdout": p.stdout.decode()}


def drop(path: Path) -> None:
    from enec.fileio import drop_cache

    for f in files_of(path):
        drop_cache(f)


def warm(path: Path) -> None:
    for f in files_of(path):
        with open(f, "rb", buffering=0) as fh:
            buf = bytearray(16 << 20)
            while fh.readinto(buf):
                pass


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


def commands(case: str, src: Path, out_dir: Path, threads: int) -> dict:
    """step -> contender -> (input, output, argv)."""
    enec = [sys.executable, "-m", "enec.cli"]
    is_dir = src.is_dir()
    e_c = out_dir / (src.name + "-enec" if is_dir else src.stem + ".enec")
    z_c = out_dir / (src.name + "-zst" if is_dir else src.name + ".zst")
    e_d = out_dir / ("restored-enec" if is_dir else "restored-enec.safetensors")
    z_d = out_dir / ("restored-zstd" if is_dir else "restored-zstd.safetensors")
    if is_dir:
        zc = [ZSTD, f"-T{threads}", "-1", "-q", "-f", "-r", str(src), "--output-dir-mirror", str(z_c)]
        zd = [ZSTD, "-d", "-q", "-f", "-r", str(z_c), "--output-dir-mirror", str(z_d)]
    else:
        zc = [ZSTD, f"-T{threads}", "-1", "-q", "-f", str(src), "-o", str(z_c)]
        zd = [ZSTD, "-d", "-q", "-f", str(z_c), "-o", str(z_d)]
    return {
        "compress": {"enec": (src, e_c, enec + ["compress", str(src), "-o", str(e_c), "-t", str(threads), "-q",
                                                "--json"]),
                     "zstd": (src, z_c, zc)},
        "decompress": {"enec": (e_c, e_d, enec + ["decompress", str(e_c), "-o", str(e_d), "-t", str(threads), "-q",
                                                  "--json"]),
                       "enec --no-sha256": (e_c, e_d, enec + ["decompress", str(e_c), "-o", str(e_d), "-t",
                                                              str(threads), "-q", "--json", "--no-sha256"]),
                       "zstd": (z_c, z_d, zd)},
    }


def restored_root(path: Path, src: Path) -> Path:
    """Where zstd's --output-dir-mirror put a folder's files (it mirrors the input path)."""
    if path.is_file() or not path.exists():
        return path
    hits = [p for p in path.rglob(src.name) if p.is_dir()] if src.is_dir() else []
    return hits[0] if hits else path


def measure(case: str, src: Path, work: Path, caches: list[str], repeats: int, threads: int,
            settle: float) -> list[dict]:
    out_dir = work / "out"
    out_dir.mkdir(exist_ok=True)
    cmds = commands(case, src, out_dir, threads)
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    original = sha_tree(src)
    # the compressed inputs of the decompress step (and a first, untimed run of each tool,
    # which also loads numba's kernels from its disk cache)
    for contender in ("enec", "zstd"):
        _, out, argv = cmds["compress"][contender]
        remove(out)
        run(argv, env)
    rows = []
    for cache in caches:
        for step in ("compress", "decompress"):
            contenders = list(cmds[step])
            runs: dict[str, list] = {c: [] for c in contenders}
            for rep in range(repeats):
                k = rep % len(contenders)
                order = contenders[k:] + contenders[:k]
                for contender in order:
                    inp, out, argv = cmds[step][contender]
                    if step == "compress":
                        out = out.with_name(out.name + ".timed")
                        argv = [str(out) if a == str(cmds[step][contender][1]) else a for a in argv]
                    remove(out)
                    (drop if cache == "dropped" else warm)(inp)
                    time.sleep(settle)
                    r = run(argv, env)
                    r["load"] = os.getloadavg()[0]
                    if contender.startswith("enec"):
                        stats = json.loads(r["stdout"])
                        r["codec_seconds"] = sum(s["codec_seconds"] / s["threads"] for s in stats)
                    if step == "decompress" and rep < len(contenders):
                        got = sha_tree(restored_root(out, src))
                        if sorted(got.values()) != sorted(original.values()):
                            raise SystemExit(f"{contender} {case}: restored files differ from the original")
                    r.pop("stdout")
                    runs[contender].append(r)
                    remove(out)
            nbytes = size_of(src)
            row = {"case": case, "cache": cache, "step": step, "original_bytes": nbytes,
                   "compressed_bytes": {c: size_of(cmds["compress"][c][1]) for c in ("enec", "zstd")}}
            for c, rs in runs.items():
                sec = statistics.median(r["seconds"] for r in rs)
                row[c] = {"seconds": sec, "gb_s": nbytes / sec / GB,
                          "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                          "runs": [r["seconds"] for r in rs], "load_1min": [r["load"] for r in rs]}
                if c.startswith("enec"):
                    row[c]["codec_gb_s"] = nbytes / statistics.median(r["codec_seconds"] for r in rs) / GB
            row["enec_over_zstd"] = row["enec"]["seconds"] / row["zstd"]["seconds"]
            if "enec --no-sha256" in row:
                row["no_sha256_over_zstd"] = row["enec --no-sha256"]["seconds"] / row["zstd"]["seconds"]
            rows.append(row)
            print(fmt_row(row), flush=True)
    for contender in ("enec", "zstd"):
        remove(cmds["compress"][contender][1])
    return rows


def fmt_row(r: dict) -> list[str]:
    e, z, n = r["enec"], r["zstd"], r.get("enec --no-sha256")
    return [r["case"], r["cache"], r["step"], f"{r['original_bytes'] / GB:.2f}",
            f"{r['original_bytes'] / r['compressed_bytes']['enec']:.3f}",
            f"{r['original_bytes'] / r['compressed_bytes']['zstd']:.3f}",
            f"{e['seconds']:.2f}", f"{z['seconds']:.2f}", f"{r['enec_over_zstd']:.2f}",
            f"{n['seconds']:.2f}" if n else "-", f"{r['no_sha256_over_zstd']:.2f}" if n else "-",
            f"{e['gb_s']:.2f}", f"{e['codec_gb_s']:.2f}", f"{z['gb_s']:.2f}",
            f"{e['peak_rss_mb']:.0f}", f"{z['peak_rss_mb']:.0f}"]


HEAD = ["input", "cache", "step", "GB", "enec ratio", "zstd ratio", "enec s", "zstd s", "enec/zstd",
        "enec no-sha256 s", "no-sha256/zstd", "enec GB/s", "enec codec GB/s", "zstd GB/s", "enec RSS MB",
        "zstd RSS MB"]


def table(rows: list[list[str]]) -> str:
    w = [max(len(str(r[i])) for r in rows + [HEAD]) for i in range(len(HEAD))]
    line = lambda r: "  ".join(str(c).rjust(w[i]) if i > 2 else str(c).ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(HEAD), line(["-" * x for x in w])] + [line(r) for r in rows])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8))
    labels = [f"{r['case']}\n{r['step']}\n{r['cache']}" for r in rows]
    x = np.arange(len(rows))
    for ax, key, unit in ((axes[0], "seconds", "wall time (s)"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        ax.bar(x - 0.2, [r["enec"][key] for r in rows], 0.4, label="enec")
        ax.bar(x + 0.2, [r["zstd"][key] for r in rows], 0.4, label="zstd -1 / zstd -d")
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel(unit)
        ax.legend()
    axes[0].set_title("end-to-end time per step (median)")
    axes[1].set_title("peak resident memory per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/enec-scale-bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="2GB,4GB,sharded")
    ap.add_argument("--caches", default="warm,dropped")
    ap.add_argument("--keep", action="store_true", help="keep the built checkpoints in --work")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds to wait before each run, after the previous output is deleted and synced")
    args = ap.parse_args()
    cases = args.cases.split(",")
    caches = args.caches.split(",")
    inputs = build(args.work, cases)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "method": __doc__.split("Usage:")[0].strip(),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                           "load_at_start": os.getloadavg(),
                           "zstd": subprocess.run([ZSTD, "--version"], capture_output=True, text=True).stdout.strip()},
               "rows": []}
    try:
        for case in cases:
            results["rows"] += measure(case, inputs[case], args.work, caches, args.repeats, args.threads,
                                       args.settle)
    finally:
        if not args.keep:
            shutil.rmtree(args.work / "data", ignore_errors=True)
            shutil.rmtree(args.work / "out", ignore_errors=True)
    results["machine"]["load_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "enec-scale.json").write_text(json.dumps(results, indent=1))
    plot(results["rows"], args.out / "enec-scale.png")
    print(table([fmt_row(r) for r in results["rows"]]))
    print(f"load average: start {results['machine']['load_at_start']}, end {results['machine']['load_at_end']}")
    print(f"wrote {args.out / 'enec-scale.json'} and .png")


if __name__ == "__main__":
    main()
