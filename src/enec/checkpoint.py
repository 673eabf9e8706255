"""ENEC checkpoints: safetensors files compressed tensor by tensor.

A ``.enec`` file keeps the original safetensors header bytes verbatim and one ENEC stream
per float tensor (other dtypes raw), so ``decompress_file`` rebuilds the original file
byte for byte. docs/FORMAT.md gives the container layout.

Public helpers mirror ``safetensors.torch``: :func:`save_file` / :func:`load_file`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .codec import Prepared, compress, decompress, stream_info, threads_set
from .errors import EnecError

MAGIC = b"ENECCKPT"
VERSION = 1
PREFIX = struct.Struct("<8sIIQ")  # magic, version, crc32(json), json length
ALIGN = 64
MAX_JSON = 256 << 20
MAX_ST_HEADER = 100 << 20

# safetensors dtype -> (ENEC dtype name or None for raw, itemsize, torch dtype name)
ST_DTYPES = {
    "BF16": ("bfloat16", 2, "bfloat16"),
    "F16": ("float16", 2, "float16"),
    "F32": ("float32", 4, "float32"),
    "F8_E4M3": ("float8_e4m3fn", 1, "float8_e4m3fn"),
    "F8_E5M2": ("float8_e5m2", 1, "float8_e5m2"),
    "F64": (None, 8, "float64"),
    "I64": (None, 8, "int64"),
    "I32": (None, 4, "int32"),
    "I16": (None, 2, "int16"),
    "I8": (None, 1, "int8"),
    "U8": (None, 1, "uint8"),
    "U16": (None, 2, "uint16"),
    "U32": (None, 4, "uint32"),
    "U64": (None, 8, "uint64"),
    "BOOL": (None, 1, "bool"),
}
TORCH_TO_ST = {v[2]: k for k, v in ST_DTYPES.items()}


# ------------------------------------------------------------------------------ safetensors


@dataclass
class STEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the safetensors file
    end: int


@dataclass
class STLayout:
    header_len: int  # bytes of JSON after the 8-byte length
    entries: list[STEntry] = field(default_factory=list)  # in data order
    metadata: dict | None = None

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def parse_safetensors_header(buf, size: int, what: str = "file") -> STLayout:
    """Validate a safetensors header (the first bytes of ``buf``; ``size`` = file size)."""
    if size < 8:
        raise EnecError(f"not a safetensors {what}: {size} bytes")
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    if hlen > MAX_ST_HEADER or 8 + hlen > size:
        raise EnecError(f"not a safetensors {what}: header length {hlen} does not fit")
    try:
        header = json.loads(bytes(buf[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EnecError(f"not a safetensors {what}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise EnecError(f"not a safetensors {what}: header is not a JSON object")
    layout = STLayout(hlen)
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise EnecError(f"invalid safetensors {what}: __metadata__ is not an object")
    layout.metadata = meta
    base = 8 + hlen
    for name, e in header.items():
        try:
            dtype, shape, (a, b) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise EnecError(f"invalid safetensors {what}: bad entry for tensor {name!r}") from None
        if dtype not in ST_DTYPES:
            raise EnecError(f"unsupported safetensors dtype {dtype!r} (tensor {name!r})")
        n = 1
        for d in shape:
            if d < 0:
                raise EnecError(f"invalid safetensors {what}: negative dimension in {name!r}")
            n *= d
        if not (isinstance(a, int) and isinstance(b, int)) or b - a != n * ST_DTYPES[dtype][1] or a < 0:
            raise EnecError(f"invalid safetensors {what}: offsets of {name!r} do not match its shape")
        layout.entries.append(STEntry(name, dtype, shape, base + a, base + b))
    layout.entries.sort(key=lambda e: (e.start, e.end))
    pos = base
    for e in layout.entries:
        if e.start != pos:
            raise EnecError(f"invalid safetensors {what}: data of {e.name!r} is not contiguous")
        pos = e.end
    if pos != size:
        raise EnecError(f"invalid safetensors {what}: data ends at {pos}, file has {size} bytes")
    return layout


def _st_header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict | None) -> bytes:
    """A safetensors header (length prefix + JSON, space-padded to 8 bytes) for (name, dtype, shape, nbytes)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


# ------------------------------------------------------------------------------ container


@dataclass
class CkptEntry:
    name: str
    codec: str  # "enec" or "raw"
    offset: int  # absolute offset in the .enec file
    length: int
    crc32: int | None = None


@dataclass
class Ckpt:
    source_name: str
    source_size: int
    source_sha256: str | None
    st_header: tuple[int, int]  # (offset, length) of the verbatim safetensors header bytes
    layout: STLayout
    entries: list[CkptEntry]
    size: int


@contextmanager
def mapped(path: Path):
    """(read-only mmap, size) of an existing file; an empty file maps to b""."""
    if not path.is_file():
        raise EnecError(f"no such file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            yield mm, size
        finally:
            _close(mm)


def _close(mm) -> None:
    """Close an mmap; if views of it are still alive (a traceback holds them), let GC do it."""
    if isinstance(mm, mmap.mmap):
        try:
            mm.close()
        except BufferError:
            pass


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_write(path: Path, force: bool):
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    if path.exists() and not force:
        raise EnecError(f"{path} exists (use --force / force=True to overwrite)")
    tmp = _atomic_target(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


class _Writer:
    """Writes the container: a JSON table first (reserved, patched at the end), then data."""

    def __init__(self, f, reserve: int):
        self.f = f
        self.reserve = reserve
        self.pos = PREFIX.size + reserve
        self.pos += -self.pos % ALIGN
        f.seek(self.pos)

    def put(self, data) -> tuple[int, int]:
        pad = -self.pos % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.pos += pad
        start = self.pos
        n = len(memoryview(data).cast("B"))
        self.f.write(data)
        self.pos += n
        return start, n

    def finish(self, meta: dict) -> None:
        js = json.dumps(meta, separators=(",", ":")).encode()
        if len(js) > self.reserve:
            raise AssertionError("checkpoint table outgrew its reservation")
        js += b" " * (self.reserve - len(js))
        self.f.seek(0)
        self.f.write(PREFIX.pack(MAGIC, VERSION, zlib.crc32(js), len(js)))
        self.f.write(js)


def _table_reserve(n_tensors: int, names_bytes: int) -> int:
    return 4096 + names_bytes + 160 * n_tensors


def _meta(source_name, source_size, sha, st_header, entries) -> dict:
    return {
        "format": "enec-checkpoint",
        "version": VERSION,
        "source": {"name": source_name, "size": source_size, "sha256": sha,
                   "safetensors_header": list(st_header)},
        "tensors": [
            {"name": e.name, "codec": e.codec, "offset": e.offset, "length": e.length,
             **({"crc32": e.crc32} if e.crc32 is not None else {})}
            for e in entries
        ],
    }


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                leave=False, dynamic_ncols=True)


def compress_file(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                  threads: int | None = None, force: bool = False, progress: bool = False,
                  block_size: int = 1 << 14) -> dict:
    """Compress one ``.safetensors`` file into a ``.enec`` container (default: beside it).

    Returns a summary dict (sizes, per-dtype bytes, seconds spent in the codec).
    """
    import time

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".enec")
    sha = hashlib.sha256()
    with mapped(src) as (mm, size):
        layout = parse_safetensors_header(mm, size, f"file ({src})")
        names = sum(len(e.name.encode()) for e in layout.entries)
        stats = {"source": str(src), "output": str(dst), "original_bytes": size,
                 "tensors": len(layout.entries), "codec_seconds": 0.0, "by_dtype": {}}
        with atomic_write(dst, force) as tmp, open(tmp, "wb") as fout:
            w = _Writer(fout, _table_reserve(len(layout.entries), 2 * names))
            head = w.put(mm[: layout.data_start])
            sha.update(mm[: layout.data_start])
            entries = []
            bar = _progress(size, f"compress {src.name}", progress)
            for e in layout.entries:
                view = memoryview(mm)[e.start : e.end]
                sha.update(view)
                codec_dtype, itemsize, _ = ST_DTYPES[e.dtype]
                t0 = time.perf_counter()
                if codec_dtype is not None:
                    arr = np.frombuffer(view, dtype=f"<u{itemsize}").reshape(e.shape)
                    data = compress(arr, dtype=codec_dtype, threads=threads, block_size=block_size)
                    crc = None
                    codec = "enec"
                else:
                    data, crc, codec = view, zlib.crc32(view), "raw"
                stats["codec_seconds"] += time.perf_counter() - t0
                off, n = w.put(data)
                d = stats["by_dtype"].setdefault(e.dtype, [0, 0])
                d[0] += e.end - e.start
                d[1] += n
                entries.append(CkptEntry(e.name, codec, off, n, crc))
                del view
                bar.update(e.end - e.start)
            bar.close()
            fout.truncate(w.pos)
            stats["compressed_bytes"] = w.pos
            w.finish(_meta(src.name, size, sha.hexdigest(), head, entries))
    return stats


def read_checkpoint(buf, size: int, what: str = "checkpoint") -> Ckpt:
    """Parse and validate a ``.enec`` container held in ``buf`` (bytes or mmap)."""
    if size < PREFIX.size:
        raise EnecError(f"not an ENEC checkpoint ({what}): {size} bytes")
    magic, version, crc, jlen = PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise EnecError(f"not an ENEC checkpoint ({what}): bad magic")
    if version != VERSION:
        raise EnecError(f"unsupported ENEC checkpoint version {version} ({what})")
    if jlen > MAX_JSON or PREFIX.size + jlen > size:
        raise EnecError(f"truncated or corrupted ENEC checkpoint ({what}): table length {jlen}")
    js = bytes(buf[PREFIX.size : PREFIX.size + jlen])
    if zlib.crc32(js) != crc:
        raise EnecError(f"corrupted ENEC checkpoint ({what}): table checksum mismatch")
    try:
        meta = json.loads(js)
        src = meta["source"]
        hoff, hlen = (int(v) for v in src["safetensors_header"])
        entries = [CkptEntry(str(t["name"]), str(t["codec"]), int(t["offset"]), int(t["length"]),
                             t.get("crc32")) for t in meta["tensors"]]
        source_size = int(src["size"])
        name = str(src["name"])
        sha = src.get("sha256")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise EnecError(f"corrupted ENEC checkpoint ({what}): bad table ({exc})") from None
    for e in [CkptEntry("<header>", "raw", hoff, hlen)] + entries:
        if e.codec not in ("enec", "raw") or e.offset < 0 or e.length < 0 or e.offset + e.length > size:
            raise EnecError(f"truncated or corrupted ENEC checkpoint ({what}): entry {e.name!r} out of range")
    if os.path.basename(name) != name or name in ("", ".", ".."):
        raise EnecError(f"corrupted ENEC checkpoint ({what}): bad source name {name!r}")
    st = bytes(buf[hoff : hoff + hlen])
    layout = parse_safetensors_header(st, hlen + _st_data_bytes(st), f"header in {what}")
    if source_size != layout.data_start + sum(e.end - e.start for e in layout.entries):
        raise EnecError(f"corrupted ENEC checkpoint ({what}): source size does not match its header")
    if [e.name for e in entries] != [e.name for e in layout.entries]:
        raise EnecError(f"corrupted ENEC checkpoint ({what}): tensor table does not match the header")
    return Ckpt(name, source_size, sha, (hoff, hlen), layout, entries, size)


def _st_data_bytes(st: bytes) -> int:
    """Data bytes a safetensors header describes (so the header can be validated alone)."""
    if len(st) < 8:
        raise EnecError("corrupted ENEC checkpoint: safetensors header too short")
    try:
        header = json.loads(st[8:].decode("utf-8"))
        return max([0] + [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise EnecError("corrupted ENEC checkpoint: embedded safetensors header is invalid") from None


def decode_entry(buf, e: CkptEntry, st: STEntry, out: np.ndarray, threads, verify=True) -> None:
    """Decode one tensor's bytes into ``out`` (a uint8 array of the tensor's size)."""
    data = memoryview(buf)[e.offset : e.offset + e.length]
    codec_dtype, itemsize, _ = ST_DTYPES[st.dtype]
    if e.codec == "raw":
        if e.length != st.end - st.start:
            raise EnecError(f"corrupted ENEC checkpoint: raw tensor {e.name!r} has the wrong size")
        if e.crc32 is not None and zlib.crc32(data) != e.crc32:
            raise EnecError(f"corrupted ENEC checkpoint: checksum mismatch in tensor {e.name!r}")
        out[:] = np.frombuffer(data, np.uint8)
        return
    if codec_dtype is None:
        raise EnecError(f"corrupted ENEC checkpoint: tensor {e.name!r} of {st.dtype} cannot be ENEC-coded")
    prep = Prepared(data)  # parses and validates the stream header once
    if prep.fmt.name != codec_dtype or tuple(prep.shape) != tuple(st.shape):
        raise EnecError(f"corrupted ENEC checkpoint: stream of {e.name!r} does not match its header")
    decompress(prep, out=out.view(f"<u{itemsize}"), threads=threads, verify=verify)


def decompress_file(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                    threads: int | None = None, force: bool = False, progress: bool = False,
                    verify_sha256: bool = True) -> dict:
    """Rebuild the original ``.safetensors`` file byte for byte from a ``.enec`` container."""
    import time

    src = Path(src)
    with mapped(src) as (mm, size):
        ck = read_checkpoint(mm, size, str(src))
        dst = Path(dst) if dst is not None else src.with_name(ck.source_name)
        stats = {"source": str(src), "output": str(dst), "compressed_bytes": size,
                 "original_bytes": ck.source_size, "codec_seconds": 0.0}
        with atomic_write(dst, force) as tmp:
            with open(tmp, "wb+") as fout:
                fout.truncate(ck.source_size)
                om = mmap.mmap(fout.fileno(), ck.source_size) if ck.source_size else None
                try:
                    out = np.frombuffer(om, np.uint8) if om is not None else np.zeros(0, np.uint8)
                    hoff, hlen = ck.st_header
                    out[:hlen] = np.frombuffer(mm, np.uint8, count=hlen, offset=hoff)
                    bar = _progress(ck.source_size, f"decompress {src.name}", progress)
                    for e, st in zip(ck.entries, ck.layout.entries):
                        t0 = time.perf_counter()
                        decode_entry(mm, e, st, out[st.start : st.end], threads)
                        stats["codec_seconds"] += time.perf_counter() - t0
                        bar.update(st.end - st.start)
                    bar.close()
                    if verify_sha256 and ck.source_sha256:
                        if hashlib.sha256(out).hexdigest() != ck.source_sha256:
                            raise EnecError(f"corrupted ENEC checkpoint ({src}): sha256 of the restored file differs")
                        stats["sha256"] = ck.source_sha256
                    del out
                    if om is not None:
                        om.flush()
                finally:
                    _close(om)
    return stats


# ------------------------------------------------------------------------------ folders

SKIP = {".git"}


def compress_folder(src, dst=None, *, threads=None, force=False, progress=False,
                    block_size: int = 1 << 14) -> list[dict]:
    """Compress every ``*.safetensors`` of a model folder; copy every other file as is."""
    src = Path(src)
    if not src.is_dir():
        raise EnecError(f"no such folder: {src}")
    dst = Path(dst) if dst is not None else src.with_name(src.name + "-enec")
    files = [p for p in sorted(src.rglob("*")) if p.is_file() and not SKIP & set(p.relative_to(src).parts)]
    if not any(p.suffix == ".safetensors" for p in files):
        raise EnecError(f"{src} holds no .safetensors file")
    out = []
    with atomic_write(dst, force) as tmp:
        tmp.mkdir()
        for p in files:
            rel = p.relative_to(src)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if p.suffix == ".safetensors":
                out.append(compress_file(p, (tmp / rel).with_suffix(".enec"), threads=threads,
                                         progress=progress, block_size=block_size))
            else:
                shutil.copy2(p, tmp / rel)
    for s in out:  # report final paths, not the temporary folder
        s["output"] = str(dst / Path(s["output"]).relative_to(_atomic_target(dst)))
    return out


def decompress_folder(src, dst=None, *, threads=None, force=False, progress=False) -> list[dict]:
    """Restore a folder made by :func:`compress_folder` byte for byte."""
    src = Path(src)
    if not src.is_dir():
        raise EnecError(f"no such folder: {src}")
    if dst is None:
        if not src.name.endswith("-enec"):
            raise EnecError(f"cannot guess the output folder for {src}: pass -o/--output")
        dst = src.with_name(src.name[: -len("-enec")])
    dst = Path(dst)
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    out = []
    with atomic_write(dst, force) as tmp:
        tmp.mkdir()
        for p in files:
            rel = p.relative_to(src)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if p.suffix == ".enec":
                out.append(decompress_file(p, tmp / rel.with_suffix(".safetensors"), threads=threads,
                                           progress=progress))
            else:
                shutil.copy2(p, tmp / rel)
    for s in out:
        s["output"] = str(dst / Path(s["output"]).relative_to(_atomic_target(dst)))
    return out


# ------------------------------------------------------------------------------ tensors API


def save_file(tensors: dict, filename, metadata: dict | None = None, *, threads: int | None = None) -> None:
    """Save a dict of torch tensors as an ENEC checkpoint (like ``safetensors.torch.save_file``).

    Float tensors (bf16/fp16/fp32/fp8) are ENEC-coded, everything else stored raw. The file
    decompresses (``enec decompress``) to a standard ``.safetensors`` file.
    """
    import torch

    items = []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise EnecError(f"{name!r} is a {type(t).__name__}, not a torch tensor")
        dt = str(t.dtype).removeprefix("torch.")
        if dt not in TORCH_TO_ST:
            raise EnecError(f"cannot save {name!r}: unsupported dtype {t.dtype}")
        items.append((name, TORCH_TO_ST[dt], t.detach().cpu().contiguous()))
    head = _st_header_bytes([(n, d, tuple(t.shape), t.numel() * t.element_size()) for n, d, t in items],
                            metadata)
    path = Path(filename)
    size = len(head) + sum(t.numel() * t.element_size() for _, _, t in items)
    parse_safetensors_header(head, size, "header")  # what we wrote must be valid
    names = sum(len(n.encode()) for n, _, _ in items)
    with atomic_write(path, force=True) as tmp, open(tmp, "wb") as f:
        w = _Writer(f, _table_reserve(len(items), 2 * names))
        hdr = w.put(head)
        entries = []
        for name, dtype, t in items:  # the header lays tensors out in this order
            if ST_DTYPES[dtype][0] is not None:
                data, crc, codec = compress(t, threads=threads), None, "enec"
            else:
                raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
                data, crc, codec = raw, zlib.crc32(raw), "raw"
            off, n = w.put(data)
            entries.append(CkptEntry(name, codec, off, n, crc))
        f.truncate(w.pos)
        w.finish(_meta(path.with_suffix(".safetensors").name, size, None, hdr, entries))


def load_file(filename, device: str = "cpu", *, threads: int | None = None) -> dict:
    """Load an ENEC checkpoint into a dict of torch tensors (like ``safetensors.torch.load_file``)."""
    import torch

    path = Path(filename)
    out = {}
    with mapped(path) as (mm, size):
        ck = read_checkpoint(mm, size, str(path))
        with threads_set(threads):
            for e, st in zip(ck.entries, ck.layout.entries):
                t = torch.empty(st.shape, dtype=getattr(torch, ST_DTYPES[st.dtype][2]))
                flat = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
                decode_entry(mm, e, st, flat, None)
                out[e.name] = t if device == "cpu" else t.to(device)
    return out


def checkpoint_info(path) -> tuple[Ckpt, list[dict]]:
    """Per-tensor facts of a ``.enec`` file (for ``enec info``)."""
    path = Path(path)
    with mapped(path) as (mm, size):
        ck = read_checkpoint(mm, size, str(path))
        rows = []
        for e, st in zip(ck.entries, ck.layout.entries):
            row = {"name": e.name, "dtype": st.dtype, "shape": list(st.shape),
                   "original_bytes": st.end - st.start, "compressed_bytes": e.length,
                   "codec": e.codec, "params": None, "raw_blocks": None}
            if e.codec == "enec":
                s = stream_info(memoryview(mm)[e.offset : e.offset + e.length])
                row["params"] = list(s.params) if s.params else None
                row["raw_blocks"] = f"{s.raw_blocks}/{s.nblocks}"
            rows.append(row)
    return ck, rows
