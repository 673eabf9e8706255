"""Compile every kvserve Triton kernel for a GPU target without a GPU; report ptxas's register
and spill figures and whether the float kernels kept every multiply and add apart.

    python benchmarks/kvserve_gpu_compile_check.py            # sm_90 (H100/H200)
    python benchmarks/kvserve_gpu_compile_check.py --arch 80

The interpreter runs the kernels in numpy, so it cannot see compiled-mode type errors or
lowering failures (scans, 64-bit reductions, split/join/permute), nor an FMA that would
round differently from the CPU: the quantize, dequantize and Hadamard kernels are built
with ``enable_fp_fusion=False`` as kvserve.stages.gpu launches them, and their PTX must hold
no ``fma`` instruction. Exit status 1 if any kernel fails to build or holds an fma.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_compile_check import ptxas_report  # noqa: E402  (one owner of the ptxas call)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args(argv)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvserve.stages import _triton_kernels as K
    from kvserve.stages import gpu, irans

    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}, num_warps {args.warps}")
    failures = 0

    def build(fn, sig, const, label, exact=False):
        nonlocal failures
        sig = dict(sig)
        for k in const:
            sig[k] = "constexpr"
        sig = {a: sig[a] for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
        opts = {"num_warps": args.warps, "enable_fp_fusion": False}
        t0 = time.time()
        try:
            c = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=target, options=opts)
        except Exception as exc:  # noqa: BLE001 - report and go on
            failures += 1
            print(f"FAIL {fn.__name__:22s} {label}: {type(exc).__name__}: {str(exc)[:2000]}")
            return
        ptx = c.asm["ptx"]
        fma = sum(ptx.count(op) for op in ("fma.rn.f32", "fma.rn.ftz.f32", "mad.f32"))
        if exact and fma:
            failures += 1
        print(f"{'FAIL' if exact and fma else 'ok  '} {fn.__name__:22s} {label:16s} {time.time() - t0:4.1f}s  "
              f"{ptxas_report(ptx, args.arch)}; fma {fma}")

    stat = {"sP": "i64", "sQ": "i64", "sR": "i64", "sS": "i64", "lP": "i64", "lQ": "i64", "lR": "i64", "lS": "i64"}
    for has_mn, sym in ((True, False), (False, True)):
        label = "minmax" if has_mn else "symmetric"
        build(K.quantize_kernel, {"x_ptr": "*fp32", "mn_ptr": "*fp32", "inv_ptr": "*fp32", "lv_ptr": "*fp32",
                                  "q_ptr": "*u8", "numel": "i64", **stat},
              {"HAS_MN": has_mn, "SYM": sym, "BLOCK": gpu.BLOCK}, label, exact=True)
        build(K.dequantize_kernel, {"q_ptr": "*u8", "scale_ptr": "*fp32", "mn_ptr": "*fp32", "lv_ptr": "*fp32",
                                    "y_ptr": "*fp32", "numel": "i64", **stat},
              {"HAS_MN": has_mn, "SYM": sym, "BLOCK": gpu.BLOCK}, label, exact=True)
    for bits in (1, 3, 8):
        build(K.pack_kernel, {"sym_ptr": "*u8", "out_ptr": "*u8", "nsym": "i64", "ngroups": "i64"},
              {"BITS": bits, "G": gpu.PACK_GROUPS}, f"bits={bits}")
        build(K.unpack_kernel, {"buf_ptr": "*u8", "out_ptr": "*u8", "nsym": "i64", "ngroups": "i64"},
              {"BITS": bits, "G": gpu.PACK_GROUPS}, f"bits={bits}")
    blog2 = irans.DEFAULT_BLOCK_LOG2
    build(K.irans_encode_kernel, {"sym_ptr": "*u8", "nsym": "i64", "freq_ptr": "*i32", "cum_ptr": "*i32",
                                  "scratch_ptr": "*i16", "cap": "i32", "start_ptr": "*i32"},
          {"BLOCK_LOG2": blog2, "LANES": irans.LANES}, f"block 2**{blog2}")
    build(K.gather_rows_kernel, {"src_ptr": "*i16", "cap": "i32", "start_ptr": "*i32", "off_ptr": "*i64",
                                 "out_ptr": "*i16"}, {"TILE": 1024}, "")
    for pb in (0, 3):
        build(K.irans_decode_kernel, {"buf_ptr": "*u8", "off_ptr": "*i64", "table_ptr": "*i32", "nsym": "i64",
                                      "out_ptr": "*u8", "status_ptr": "*i32"},
              {"BLOCK_LOG2": blog2, "LANES": irans.LANES, "PAIR_BITS": pb}, f"pair_bits={pb}")
    hk = getattr(K, "hadamard_kernel", None)
    if hk is not None:
        for d, rope, fwd in ((128, True, True), (128, True, False), (64, False, True), (256, False, False)):
            build(hk, {"x_ptr": "*fp32", "y_ptr": "*fp32", "sign_ptr": "*fp32", "cos_ptr": "*fp32",
                       "sin_ptr": "*fp32", "idx_ptr": "*i32", "rows": "i64", "B": "i32", "H": "i32", "T": "i32",
                       "scale": "fp32"},
                  {"D": d, "LOG2D": d.bit_length() - 1, "ROPE": rope, "FORWARD": fwd, "R": gpu.HADAMARD_TILE // d},
                  f"D={d} rope={rope} fwd={fwd}",
                  exact=True)
    print("FAILED" if failures else "all kernels built")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
