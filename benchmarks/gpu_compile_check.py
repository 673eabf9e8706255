"""Compile every ENEC Triton kernel for a GPU target without a GPU, and report what ptxas says.

    python benchmarks/gpu_compile_check.py                 # sm_90 (H100/H200), all dtypes
    python benchmarks/gpu_compile_check.py --arch 80 --tile 128 --warps 8

Triton builds PTX and cubins without a device (ptxas ships in the triton wheel), so this
catches what the interpreter cannot: front-end type errors of compiled mode, lowering
failures (tl.histogram, scans along axis 0, alignment hints), register use and spills, and
whether loads and stores were vectorised. Pointer arguments are given the 16-byte alignment
Triton assumes for torch allocations (and numel a multiple of 16, as Triton specialises it at
launch, unless --odd-numel); launch settings come from the command line.
Exit status 1 if any kernel fails to build.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

INT = {1: "*i8", 2: "*i16", 4: "*i32"}


def ptxas_report(ptx: str, arch: int) -> str:
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        exe = bindir / name
        if not exe.exists():
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
            fh.write(ptx)
        try:
            run = subprocess.run([str(exe), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}",
                                  "-v", fh.name, "-o", os.devnull], capture_output=True, text=True, check=False)
        finally:
            os.unlink(fh.name)
        lines = [ln.split(":", 1)[-1].strip() for ln in (run.stdout + run.stderr).splitlines()
                 if "Used" in ln or "spill stores" in ln]
        if run.returncode == 0:
            return "; ".join(lines)
    return "(ptxas report unavailable)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--tile", type=int, default=256, help="TILE_K")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--block-log2", type=int, default=14)
    ap.add_argument("--no-hint", dest="hint", action="store_false")
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--odd-numel", action="store_true",
                    help="numel not a multiple of 16 (triton then knows nothing of its alignment)")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32,float8_e4m3fn,float8_e5m2")
    args = ap.parse_args(argv)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from enec import _gpu_kernels as K
    from enec.format import BY_NAME

    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}, TILE_K {args.tile}, "
          f"num_warps {args.warps}, hints {args.hint}, maxnreg {args.maxnreg or 'default'}")
    failures = 0

    def build(fn, sig, const, label):
        nonlocal failures
        sig = dict(sig)
        for k in const:
            sig[k] = "constexpr"
        sig = {a: sig[a] for a in fn.arg_names}
        aligned = {"numel"} if not args.odd_numel else set()
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig[a].startswith("*") or a in aligned}
        opts = {"num_warps": args.warps}
        if args.maxnreg:
            opts["maxnreg"] = args.maxnreg
        t0 = time.time()
        try:
            c = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=target, options=opts)
        except Exception as exc:  # noqa: BLE001 - report and go on
            failures += 1
            print(f"FAIL {fn.__name__:16s} {label}: {type(exc).__name__}: {str(exc)[:2000]}")
            return
        ptx = c.asm["ptx"]
        vec = f"ld {ptx.count('ld.global')} ({ptx.count('ld.global.v')} vector), " \
              f"st {ptx.count('st.global')} ({ptx.count('st.global.v')} vector)"
        print(f"ok   {fn.__name__:16s} {label:12s} {time.time() - t0:4.1f}s  {ptxas_report(ptx, args.arch)}; {vec}")

    for name in args.dtypes.split(","):
        f = BY_NAME[name]
        base = {"BLOG2": args.block_log2, "POS": f.pos, "EB": f.ebits, "RB": f.rest_bytes,
                "RP": f.rest_planes, "ISZ": f.itemsize, "TILE_K": min(args.tile, (1 << args.block_log2) // 8),
                "RAW_TILE": 4096, "HINT": args.hint}
        build(K.histogram_kernel, {"x_ptr": INT[f.itemsize], "hist_ptr": "*i32", "numel": "i64"},
              {"BLOG2": args.block_log2, "POS": f.pos, "K": 1 << f.ebits, "ISZ": f.itemsize,
               "TILE": min(4096, 1 << args.block_log2)}, name)
        build(K.decode_kernel, {"src_ptr": "*u8", "pstart": "i32", "off_ptr": "*i64", "numel": "i64",
                                "out_ptr": INT[f.itemsize], "outb_ptr": "*u8", "status_ptr": "*i32"},
              base, name)
        build(K.encode_kernel, {"x_ptr": INT[f.itemsize], "xb_ptr": "*u8", "numel": "i64", "out_ptr": "*u8",
                                "pstart": "i32", "off_ptr": "*i64", "mode_ptr": "*u8", "n1_ptr": "*i64",
                                "n2_ptr": "*i64", "escoff_ptr": "*i64", "scratch_ptr": "*u8",
                                "W1": "i32", "b1": "i32", "w2": "i32", "b2": "i32"},
              dict(base, PACK_TILE=512), name)
    build(K.checksum_kernel, {"w32_ptr": "*i32", "wstart": "i32", "off_ptr": "*i64", "nblocks": "i32",
                              "out_ptr": "*i32"}, {"G": 8}, "G=8")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
