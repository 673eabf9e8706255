"""The ``enec`` command: compress, decompress, info, bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import EnecError
from .fileio import DEFAULT_BUFFER_BYTES, Terminated, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except EnecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _summary(stats: list[dict], verb: str, seconds: float) -> str:
    """One row per file: sizes, ratio, end-to-end GB/s (wall clock) and the codec's GB/s
    (its CPU time spread over its threads: what reading and writing did not slow)."""
    def rate(n, t):
        return f"{n / t / 1e9:.2f}" if t else "-"

    def codec(group):
        return sum(s["codec_seconds"] / s.get("threads", 1) for s in group)

    rows = []
    for s in stats:
        o, c = s["original_bytes"], s["compressed_bytes"]
        rows.append([Path(s["output"]).name, _gb(o), _gb(c), f"{o / c:.4f}" if c else "-",
                     rate(o, s.get("seconds", 0)), rate(o, codec([s]))])
    o = sum(s["original_bytes"] for s in stats)
    c = sum(s["compressed_bytes"] for s in stats)
    if len(stats) > 1:
        rows.append(["total", _gb(o), _gb(c), f"{o / c:.4f}" if c else "-", rate(o, seconds), rate(o, codec(stats))])
    out = _table(rows, ["file", "original", "compressed", "ratio", "end-to-end GB/s", "codec GB/s"])
    return out + f"\n{verb} in {seconds:.2f} s wall ({o / max(seconds, 1e-9) / 1e9:.2f} GB/s end to end)"


def _compress(args) -> int:
    from . import checkpoint as ck

    path = Path(args.path)
    t0 = time.perf_counter()
    kw = dict(threads=args.threads, force=args.force, progress=not args.quiet, block_size=args.block_size,
              buffer_bytes=args.buffer)
    if path.is_dir():
        stats = ck.compress_folder(path, args.output, **kw)
    elif path.is_file():
        stats = [ck.compress_file(path, args.output, **kw)]
    else:
        raise EnecError(f"no such file or folder: {path}")
    if args.json:
        print(json.dumps(stats, indent=1))
    elif not args.quiet:
        print(_summary(stats, "compressed", time.perf_counter() - t0))
    return 0


def _decompress(args) -> int:
    from . import checkpoint as ck

    path = Path(args.path)
    t0 = time.perf_counter()
    kw = dict(threads=args.threads, force=args.force, progress=not args.quiet, buffer_bytes=args.buffer,
              verify_sha256=not args.no_sha256)
    if path.is_dir():
        stats = ck.decompress_folder(path, args.output, **kw)
    elif path.is_file():
        stats = [ck.decompress_file(path, args.output, **kw)]
    else:
        raise EnecError(f"no such file or folder: {path}")
    if args.json:
        print(json.dumps(stats, indent=1))
    elif not args.quiet:
        how = "sha256 verified" if not args.no_sha256 else "block checksums verified, sha256 skipped"
        print(_summary(stats, f"restored ({how})", time.perf_counter() - t0))
    return 0


def _info(args) -> int:
    from . import checkpoint as ck

    path = Path(args.path)
    files = sorted(path.rglob("*.enec")) if path.is_dir() else [path]
    if not files:
        raise EnecError(f"no .enec file in {path}")
    report = []
    for f in files:
        meta, rows = ck.checkpoint_info(f)
        report.append({"file": str(f), "source": meta.source_name, "sha256": meta.source_sha256,
                       "tensors": rows})
        if args.json:
            continue
        print(f"{f}  (restores {meta.source_name}, {_gb(meta.source_size)} -> {_gb(meta.size)},"
              f" ratio {meta.source_size / meta.size:.4f})")
        table = []
        for r in rows:
            p = r["params"]
            table.append([r["name"], r["dtype"], "x".join(map(str, r["shape"])) or "scalar",
                          f"{r['original_bytes'] / r['compressed_bytes']:.4f}" if r["compressed_bytes"] else "-",
                          r["codec"],
                          f"w1={p[0]} b1={p[1]} w2={p[2]} b2={p[3]}" if p else "-",
                          r["raw_blocks"] or "-"])
        print(_table(table, ["tensor", "dtype", "shape", "ratio", "codec", "params", "raw blocks"]))
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


def _bench(args) -> int:
    from . import bench

    return bench.main(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="enec", description="Lossless ENEC compression of model weights.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, output=True):
        if output:
            sp.add_argument("-o", "--output", help="output file or folder (default: beside the input)")
            sp.add_argument("-f", "--force", action="store_true", help="overwrite an existing output")
        sp.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
        if output:
            sp.add_argument("--json", action="store_true", help="print the summary as JSON")
            sp.add_argument("--buffer", type=_size, default=DEFAULT_BUFFER_BYTES, metavar="SIZE",
                            help="most memory for read and write buffers (default 32M; buffers are at most "
                                 "1.5 MiB each); the peak memory is this plus a large tensor's block table, "
                                 "whatever the file size")

    c = sub.add_parser("compress", help="compress a .safetensors file or a model folder")
    c.add_argument("path")
    common(c)
    c.add_argument("--block-size", type=int, default=1 << 14, help="elements per block (power of two)")
    c.set_defaults(func=_compress)

    d = sub.add_parser("decompress", help="restore the original .safetensors file(s) byte for byte")
    d.add_argument("path")
    common(d)
    d.add_argument("--no-sha256", action="store_true",
                   help="skip the end-to-end SHA-256 check of the restored file (about 0.5 s of CPU per GB; "
                        "every block checksum and raw-tensor CRC is still checked)")
    d.set_defaults(func=_decompress)

    i = sub.add_parser("info", help="per-tensor dtype, shape, ratio and parameters of a .enec file")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_info)

    b = sub.add_parser("bench", help="benchmark ENEC against zstd, lz4, ZipNN and memcpy")
    from . import bench

    bench.add_arguments(b)
    b.set_defaults(func=_bench)
    return p


def _without_scipy() -> None:
    """numba imports SciPy when it is imported (a version check, and BLAS for np.linalg in
    jitted code, which enec's kernels never use): 0.2 s of a file command's start-up and two
    OpenBLAS thread pools. The `enec` program's file commands run without it (only when
    :func:`main` is the program: called with ``argv=None``, in a process of its own)."""
    if "scipy" not in sys.modules and "numba" not in sys.modules:
        sys.modules["scipy"] = None  # `import scipy` now raises ImportError, which numba allows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.cmd in ("compress", "decompress", "info"):
        _without_scipy()
    try:
        return args.func(args)
    except (EnecError, OSError) as exc:
        print(f"enec: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (Exception, RecursionError) as exc:  # a bug: still one line, no traceback
        print(f"enec: error: unexpected {type(exc).__name__}: {_one_line(exc)} (please report this)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("enec: interrupted (no partial output was left)", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"enec: {exc} (no partial output was left)", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
