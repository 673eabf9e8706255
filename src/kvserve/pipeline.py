"""Profiles (JSON configs of stages) <-> pipelines; ``encode(kv) -> bundle`` and ``decode``.

KV layout (as transformers' ``DynamicCache`` holds it): a list with one ``(keys, values)``
pair per layer, each a ``torch.bfloat16`` tensor of shape ``(batch, kv_heads, tokens,
head_dim)``. Layers may differ in ``tokens`` (sliding-window layers) or ``head_dim``.

A bundle is self-describing: magic, version, a JSON header (profile config, per-layer
shapes, dtype, part table, caller metadata), the payload and a CRC-32; see docs/KVSERVE.md.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from importlib import resources
from typing import Any, Iterable

import numpy as np
import torch

from .errors import KVServeError
from .stages import codecs as _codecs  # noqa: F401  (registers stages)
from .stages import gpu as _gpu
from .stages import quantizers as _quantizers  # noqa: F401
from .stages import transforms as _transforms  # noqa: F401
from .stages.base import get_stage
from .stages.codecs import resolve_threads

MAGIC = b"KVSV"
VERSION = 1
_FIXED = struct.Struct("<4sBBHIQ")  # magic, version, flags, reserved, header_len, payload_len
FIXED_SIZE = _FIXED.size  # 20
CRC_SIZE = 4
MAX_HEADER = 4 << 20
MAX_LAYERS = 4096
MAX_ELEMENTS = 1 << 34
DEFAULT_MAX_BYTES = 1 << 30  # decode's default bound on the decoded KV (bf16 bytes)
_SIDE_DTYPES = {"float16", "float32", "int64", "uint8", "uint16", "bfloat16"}
_PROFILE_KEYS = {"name", "transform", "quantizer", "codec"}

KV = list  # list[tuple[torch.Tensor, torch.Tensor]]


def kv_from_cache(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` from a transformers ``DynamicCache`` (v5 ``cache.layers``)
    or a legacy tuple of pairs; tensors are returned as they are (no copy)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v, *_ in cache]


class Pipeline:
    """``transform -> quantizer -> codec``, built from a profile config.

    ``config = {"name": str, "transform": {...}, "quantizer": {...}, "codec": {...}}``;
    each stage config is ``{"id": ..., **params}`` (see :func:`kvserve.get_stage`).
    """

    def __init__(self, transform, quantizer, codec, name: str = ""):
        self.transform, self.quantizer, self.codec, self.name = transform, quantizer, codec, name
        if self.quantizer.stage_id == "none" and not self.codec.accepts(16):
            raise KVServeError(f"codec {self.codec.stage_id!r} cannot take bf16 passthrough")
        if self.quantizer.lossy and not self.codec.accepts(8):
            raise KVServeError(f"codec {self.codec.stage_id!r} cannot take quantized symbols")
        if self.quantizer.stage_id == "none" and self.transform.stage_id != "identity":
            raise KVServeError("a transform without a quantizer would only add rounding error")

    @classmethod
    def from_config(cls, config: dict) -> "Pipeline":
        if not isinstance(config, dict):
            raise KVServeError("profile config must be a dict")
        extra = set(config) - _PROFILE_KEYS
        if extra:
            raise KVServeError(f"profile config: unknown key(s) {sorted(extra)}")
        name = config.get("name", "")
        if not isinstance(name, str) or len(name) > 200:
            raise KVServeError("profile name must be a short string")
        return cls(get_stage("transform", config.get("transform")),
                   get_stage("quantizer", config.get("quantizer")),
                   get_stage("codec", config.get("codec")), name)

    def get_config(self) -> dict:
        return {"name": self.name, "transform": self.transform.get_config(),
                "quantizer": self.quantizer.get_config(), "codec": self.codec.get_config()}

    def __repr__(self):
        return f"Pipeline({json.dumps(self.get_config())})"

    # ----------------------------------------------------------------- encode

    def encode(self, kv: Any, meta: dict | None = None, *, threads: int | None = None) -> bytes:
        """Compress per-layer bf16 KV (list of ``(k, v)`` or a ``DynamicCache``) into a bundle.

        ``meta`` is a small JSON-serialisable dict carried verbatim (e.g. ``{"seq_len": n}``);
        ``threads``: the codec's threads (default: every core).
        """
        threads = resolve_threads(threads)
        layers = kv_from_cache(kv) if not isinstance(kv, (list, tuple)) else list(kv)
        shapes = _check_kv(layers)
        layers = [(k.detach(), v.detach()) for k, v in layers]  # KV of a forward pass with autograd on
        dev = _gpu.for_kv(layers)  # on a GPU every stage runs there (kvserve.stages.gpu)
        geometry = (len(layers), shapes[0][0][1]) if layers else (0, 0)
        header_parts: list[list] = []
        chunks: list = []
        for w, which in enumerate("kv"):
            for gi, ids in enumerate(_groups([s[w] for s in shapes])):
                x = torch.stack([layers[i][w] for i in ids]).to(torch.float32)
                x = _gpu.transform_forward(self.transform, x, ids, which) if dev else \
                    self.transform.forward(x, ids, which)
                parts = _gpu.quantizer_encode(self.quantizer, x, ids, which, geometry) if dev else \
                    self.quantizer.encode(x, ids, which, geometry)
                for part in parts:
                    if part.bits is not None:
                        blob = _gpu.codec_encode(self.codec, part.array, part.bits, threads) if dev else \
                            self.codec.encode(part.array, part.bits, threads)
                    else:
                        blob = _gpu.side_bytes(part.array)
                    count = part.array.numel() if isinstance(part.array, torch.Tensor) else part.array.size
                    header_parts.append([f"{which}{gi}.{part.name}", part.dtype, int(count), part.bits, len(blob)])
                    chunks.append(blob)
        if dev:
            chunks = [_gpu.gather(chunks)]
        header = {"profile": self.get_config(), "dtype": "bfloat16",
                  "layers": [[list(k), list(v)] for k, v in shapes], "parts": header_parts,
                  "meta": meta if meta is not None else {}}
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        if len(hbytes) > MAX_HEADER:
            raise KVServeError("bundle header too large")
        payload_len = sum(len(c) for c in chunks)
        out = bytearray(_FIXED.pack(MAGIC, VERSION, 0, 0, len(hbytes), payload_len))
        out += hbytes
        for c in chunks:
            out += c
        out += struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)
        return bytes(out)


def _check_kv(layers) -> list[tuple[tuple, tuple]]:
    if not layers or len(layers) > MAX_LAYERS:
        raise KVServeError(f"KV must have 1..{MAX_LAYERS} layers")
    shapes = []
    heads = None
    for i, pair in enumerate(layers):
        if len(pair) != 2:
            raise KVServeError(f"layer {i}: expected a (keys, values) pair")
        for t in pair:
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise KVServeError(f"layer {i}: KV tensors must be 4-D (batch, kv_heads, tokens, head_dim)")
            if t.dtype != torch.bfloat16:
                raise KVServeError(f"layer {i}: KV must be torch.bfloat16, got {t.dtype}")
        k, v = pair
        if k.shape[:3] != v.shape[:3]:
            raise KVServeError(f"layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} disagree")
        heads = k.shape[1] if heads is None else heads
        if k.shape[1] != heads:
            raise KVServeError("all layers must have the same number of kv heads")
        shapes.append((tuple(k.shape), tuple(v.shape)))
    return shapes


def _groups(shapes: list[tuple]) -> list[list[int]]:
    """Layers with one shape, in order of first appearance (deterministic on both sides)."""
    order: dict[tuple, list[int]] = {}
    for i, s in enumerate(shapes):
        order.setdefault(tuple(s), []).append(i)
    return list(order.values())


# ----------------------------------------------------------------- decode


def parse_header(data: bytes) -> tuple[dict, memoryview]:
    """Check framing and CRC; return the JSON header and the payload view. Raises KVServeError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise KVServeError("bundle must be bytes")
    mv = memoryview(data).cast("B")
    if len(mv) < FIXED_SIZE + CRC_SIZE:
        raise KVServeError("bundle truncated")
    magic, version, flags, reserved, hlen, plen = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise KVServeError("not a KVServe bundle (bad magic)")
    if version != VERSION:
        raise KVServeError(f"unsupported bundle version {version}")
    if flags or reserved:
        raise KVServeError("unsupported bundle flags")
    if hlen > MAX_HEADER:
        raise KVServeError("bundle header too large")
    if FIXED_SIZE + hlen + plen + CRC_SIZE != len(mv):
        raise KVServeError("bundle length does not match its header (truncated or padded)")
    (crc,) = struct.unpack_from("<I", mv, len(mv) - CRC_SIZE)
    if zlib.crc32(mv[:len(mv) - CRC_SIZE]) & 0xFFFFFFFF != crc:
        raise KVServeError("bundle checksum mismatch (corrupted)")
    try:
        header = json.loads(bytes(mv[FIXED_SIZE:FIXED_SIZE + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise KVServeError("bundle header is not valid JSON (or nested too deeply)") from None
    if not isinstance(header, dict):
        raise KVServeError("bundle header must be an object")
    return header, mv[FIXED_SIZE + hlen:FIXED_SIZE + hlen + plen]


def bundle_length(head) -> int:
    """Total length of the bundle that starts with ``head`` (at least its first 20 bytes), from
    its fixed header: for bundles stored in larger buffers. Raises :class:`KVServeError`."""
    mv = memoryview(head).cast("B")
    if len(mv) < FIXED_SIZE:
        raise KVServeError("bundle truncated")
    magic, version, flags, reserved, hlen, plen = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC or version != VERSION:
        raise KVServeError("not a KVServe bundle (bad magic or version)")
    if hlen > MAX_HEADER:
        raise KVServeError("bundle header too large")
    return FIXED_SIZE + hlen + plen + CRC_SIZE


def _int(x, lo, hi, what):
    if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
        raise KVServeError(f"bundle: bad {what}")
    return x


def _parse_layers(raw) -> list[tuple[tuple, tuple]]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_LAYERS:
        raise KVServeError("bundle: bad layer table")
    shapes, total = [], 0
    for entry in raw:
        if not isinstance(entry, list) or len(entry) != 2:
            raise KVServeError("bundle: bad layer entry")
        pair = []
        for s in entry:
            if not isinstance(s, list) or len(s) != 4:
                raise KVServeError("bundle: bad layer shape")
            pair.append(tuple(_int(d, 0, 1 << 30, "dimension") for d in s))
            total += math.prod(pair[-1])
        shapes.append(tuple(pair))
        if total > MAX_ELEMENTS:
            raise KVServeError("bundle: KV too large")
    _check_shapes(shapes)
    return shapes


def _check_shapes(shapes):
    heads = shapes[0][0][1]
    for k, v in shapes:
        if k[:3] != v[:3] or k[1] != heads:
            raise KVServeError("bundle: inconsistent layer shapes")


def kv_nbytes(shapes) -> int:
    """bf16 bytes of KV with per-layer ``[((B, H, T, Dk), (B, H, T, Dv)), ...]`` shapes: the
    ``max_bytes`` a receiver that knows its geometry passes to :func:`decode`."""
    return 2 * sum(math.prod(k) + math.prod(v) for k, v in shapes)


def decode(data: bytes, max_bytes: int | None = DEFAULT_MAX_BYTES, expect=None, *, device=None,
           threads: int | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """Bundle -> (per-layer ``(k, v)`` bf16 tensors, meta dict). Raises only :class:`KVServeError`.

    ``max_bytes`` bounds the decoded KV (bf16 bytes, :func:`kv_nbytes` of the layer table):
    a bundle claiming more is refused before anything is decoded, however small it is (a
    few KB of entropy-coded constants can claim gigabytes). The default,
    :data:`DEFAULT_MAX_BYTES` (1 GiB), suits contexts up to about 45k tokens of SmolLM2; a
    receiver that knows the geometry it expects passes exactly that size, ``None`` removes
    the bound (trusted input only). Decoding needs up to about 4x the decoded size at its
    peak (float32 work arrays of a layer group; 2.4-3.9x measured for the packaged profiles).
    ``expect(shapes, meta)``, if given, is called with the validated layer table
    ``[((B, H, T, Dk), (B, H, T, Dv)), ...]`` and the bundle's meta before any part is
    decoded, and raises :class:`KVServeError` to refuse KV the caller cannot use (another
    model's geometry, a token count that disagrees with the request).
    ``device`` (e.g. ``"cuda"``): decode there (:mod:`kvserve.stages.gpu`; the same bits as
    on the CPU); default: on the CPU. ``threads``: the host codecs' threads (default: every
    core).
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
        raise KVServeError("max_bytes must be a non-negative int or None")
    threads = resolve_threads(threads)
    header, payload = parse_header(data)
    try:
        return _decode(header, payload, threads, max_bytes, expect, device)
    except KVServeError:
        raise
    except Exception as exc:  # defensive: no IndexError/RuntimeError escapes for bad input
        raise KVServeError(f"malformed bundle ({type(exc).__name__}: {exc})") from exc


def _decode(header: dict, payload: memoryview, threads: int, max_bytes: int | None = None, expect=None,
            device=None):
    if set(header) != {"profile", "dtype", "layers", "parts", "meta"}:
        raise KVServeError("bundle: unexpected header keys")
    if header["dtype"] != "bfloat16":
        raise KVServeError("bundle: unsupported dtype")
    pipe = Pipeline.from_config(header["profile"])
    dev = _gpu.is_device(device)
    if dev:
        _gpu.require()
    if getattr(pipe.codec, "device_only", False) and not dev:
        raise KVServeError(f"bundle codec {pipe.codec.stage_id!r} runs only on a CUDA device: "
                           "decode with kvserve.decode(data, device='cuda') on a GPU machine")
    shapes = _parse_layers(header["layers"])
    meta = header["meta"]
    if not isinstance(meta, dict):
        raise KVServeError("bundle: meta must be an object")
    size = kv_nbytes(shapes)
    if max_bytes is not None and size > max_bytes:
        raise KVServeError(f"bundle: decoded KV would take {size} bytes, over the receiver's limit of "
                           f"{max_bytes} (max_bytes)")
    if expect is not None:
        expect(shapes, meta)
    table = header["parts"]
    if not isinstance(table, list) or len(table) > 1 << 16:
        raise KVServeError("bundle: bad part table")
    parts: dict[str, tuple] = {}
    off = 0
    for row in table:
        if not isinstance(row, list) or len(row) != 5 or not isinstance(row[0], str) or row[0] in parts:
            raise KVServeError("bundle: bad part entry")
        name, dtype, count, bits, nbytes = row
        _int(count, 0, MAX_ELEMENTS, "part size")
        _int(nbytes, 0, len(payload) - off, "part length")
        if bits is None:
            if dtype not in _SIDE_DTYPES:
                raise KVServeError("bundle: bad part dtype")
            item = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
            if count * item != nbytes:
                raise KVServeError(f"bundle: part {name!r} has the wrong length")
        else:
            _int(bits, 1, 16, "symbol width")
            if bits > 8 and bits != 16:
                raise KVServeError("bundle: bad symbol width")
        parts[name] = (dtype, count, bits, payload[off:off + nbytes])
        off += nbytes
    if off != len(payload):
        raise KVServeError("bundle: part table does not cover the payload")
    # a codec allocates its part's symbol count: bound it by the geometry, before decoding
    for w, which in enumerate("kv"):
        for gi, ids in enumerate(_groups([s[w] for s in shapes])):
            prefix = f"{which}{gi}."
            symbols = sum(c for n, (_, c, b, _) in parts.items() if b is not None and n.startswith(prefix))
            if symbols > len(ids) * math.prod(shapes[ids[0]][w]):
                raise KVServeError(f"bundle: group {prefix[:-1]} claims more symbols than its layers hold")
    out: list[list] = [[None, None] for _ in shapes]
    for w, which in enumerate("kv"):
        for gi, ids in enumerate(_groups([s[w] for s in shapes])):
            prefix = f"{which}{gi}."
            arrays = {}
            for name, (dtype, count, bits, blob) in parts.items():
                if not name.startswith(prefix):
                    continue
                if bits is None:
                    npdt = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
                    arrays[name[len(prefix):]] = np.frombuffer(blob, dtype=npdt).copy()
                else:
                    a = _gpu.codec_decode(pipe.codec, blob, count, bits, device, threads) if dev else \
                        pipe.codec.decode(blob, count, bits, threads)
                    size = a.numel() if dev else a.size
                    if size != count:
                        raise KVServeError(f"bundle: part {name!r} decoded to the wrong size")
                    if bits <= 8 and size and int(a.max()) >= 1 << bits:
                        raise KVServeError(f"bundle: part {name!r} has out-of-range symbols")
                    arrays[name[len(prefix):]] = a
            shape = (len(ids),) + tuple(shapes[ids[0]][w])
            x = _gpu.quantizer_decode(pipe.quantizer, arrays, shape, ids, which, device) if dev else \
                pipe.quantizer.decode(arrays, shape, ids, which)
            if tuple(x.shape) != shape:
                raise KVServeError("bundle: decoded group has the wrong shape")
            x = (_gpu.transform_inverse(pipe.transform, x, ids, which) if dev else
                 pipe.transform.inverse(x, ids, which)).to(torch.bfloat16)
            for j, li in enumerate(ids):
                out[li][w] = x[j]
    return [(k, v) for k, v in out], meta


# ----------------------------------------------------------------- profiles


def profile_from_config(config: dict | str) -> Pipeline:
    """A :class:`Pipeline` from a profile config dict, a named profile or a JSON file path."""
    if isinstance(config, str):
        config = load_profile(config)
    return Pipeline.from_config(config)


def profile_names() -> list[str]:
    """Names of the packaged profiles (``kvserve/profiles/*.json``)."""
    root = resources.files("kvserve").joinpath("profiles")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_file: str) -> dict:
    """Profile config from a packaged name (``kivi-2``) or a JSON file path."""
    if os.path.isfile(name_or_file):
        with open(name_or_file, "rb") as f:  # bytes: bad UTF-8 is a JSON error below
            text = f.read()
    else:
        if name_or_file not in profile_names():
            raise KVServeError(f"unknown profile {name_or_file!r}; known: {profile_names()}")
        text = resources.files("kvserve").joinpath("profiles", name_or_file + ".json").read_text()
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError):
        raise KVServeError(f"profile {name_or_file!r} is not valid JSON (or nested too deeply)") from None
    Pipeline.from_config(cfg)  # validate
    return cfg


def encode(kv: Any, profile: dict | str | Pipeline = "bf16", meta: dict | None = None, *,
           threads: int | None = None) -> bytes:
    """Compress KV with a profile (name, file, config dict or Pipeline) into a bundle."""
    pipe = profile if isinstance(profile, Pipeline) else profile_from_config(profile)
    return pipe.encode(kv, meta, threads=threads)


def iter_stage_configs(kind: str) -> Iterable[dict]:  # pragma: no cover - convenience for the profiler
    from .stages.base import registered

    for cls in registered(kind):
        yield cls().get_config() if not cls.params else {"id": cls.stage_id, **cls.params}
