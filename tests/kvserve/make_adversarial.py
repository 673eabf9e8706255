"""Write the hostile files of ``tests/kvserve/data/adversarial/`` (see its README.md).

    python tests/kvserve/make_adversarial.py

Each file attacks one receiver; ``test_adversarial.py`` feeds them in and asserts the
package's own error (or a clean fallback), and ``benchmarks/fuzz_kvserve.py`` mutates them.
Deterministic: the same bytes on every run.
"""
import json
import pathlib
import struct
import sys
import zlib

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import make_kv  # noqa: E402

import kvserve  # noqa: E402
from kvserve.pipeline import _FIXED, MAGIC, VERSION, parse_header  # noqa: E402
from kvserve.stages import rans  # noqa: E402

DATA = pathlib.Path(__file__).with_name("data") / "adversarial"
DEPTH = 100_000  # far beyond Python's recursion limit


def frame_bundle(header: dict, payload: bytes) -> bytes:
    """A well-framed bundle (right lengths, right CRC) around any header and payload."""
    hb = json.dumps(header, separators=(",", ":")).encode()
    out = bytearray(_FIXED.pack(MAGIC, VERSION, 0, 0, len(hb), len(payload))) + hb + payload
    return bytes(out + struct.pack("<I", zlib.crc32(out)))


def _constant_rans(stream: bytes, count: int) -> bytes:
    """Stretch a rANS stream of one all-equal chunk to ``count`` symbols: every chunk of a
    constant run is the same 4-byte state, so each 256 Ki symbols cost 8 bytes."""
    mv = memoryview(stream)
    alpha = struct.unpack_from("<BH", mv, 0)[1]
    off = 3 + 2 * alpha
    nch = struct.unpack_from("<I", mv, off)[0]
    first = int(np.frombuffer(mv, np.uint32, 1, off + 4)[0])
    chunk = bytes(mv[off + 4 + 4 * nch: off + 4 + 4 * nch + first])
    k = -(-count // rans.CHUNK)
    return bytes(mv[:off]) + struct.pack("<I", k) + np.full(k, first, np.uint32).tobytes() + chunk * k


def bomb(elements: int, claim_elements: int | None = None) -> bytes:
    """CacheGen + rANS bundle of one layer ``(1, 1, 1, elements)`` of zeros: a few tens of KB
    whose layer table claims ``4 * elements`` bytes of bf16 KV. With ``claim_elements`` the
    layer table claims only that many elements while the symbol parts still carry
    ``elements`` symbols (a part count beyond its geometry)."""
    cfg = kvserve.load_profile("cachegen")
    cfg["codec"] = {"id": "rans", "pair": True}
    zeros = torch.zeros(1, 1, 1, 2 * rans.CHUNK, dtype=torch.bfloat16)
    header, payload = parse_header(kvserve.encode([(zeros, zeros)], cfg))
    rows, chunks, off = [], [], 0
    for name, dtype, count, bits, nbytes in header["parts"]:
        blob = bytes(payload[off:off + nbytes])
        off += nbytes
        if bits is not None:
            blob, count = _constant_rans(blob, elements), elements
        rows.append([name, dtype, count, bits, len(blob)])
        chunks.append(blob)
    d = claim_elements or elements
    header.update(parts=rows, layers=[[[1, 1, 1, d], [1, 1, 1, d]]], meta={"seq_len": 1})
    return frame_bundle(header, b"".join(chunks))


def nested_bundle() -> bytes:
    """Valid framing and CRC; the header's ``meta`` is an array nested 100,000 deep."""
    text = b'{"meta":' + b"[" * DEPTH + b"]" * DEPTH + b"}"
    out = bytearray(_FIXED.pack(MAGIC, VERSION, 0, 0, len(text), 0)) + text
    return bytes(out + struct.pack("<I", zlib.crc32(out)))


def smollm2_kv(tokens: int, seed: int):
    """Random KV in SmolLM2's geometry (30 layers, 3 KV heads, head_dim 64)."""
    return make_kv(layers=30, heads=3, tokens=tokens, dim=64, seed=seed)


FILES = {
    # item 7: decompression bombs
    "bomb-3.6GB.kvsv": lambda: bomb(900_000_000),
    "bomb-part-count.kvsv": lambda: bomb(400_000_000, claim_elements=64),
    # item 8: nesting
    "nested-meta.kvsv": nested_bundle,
    "nested-library.json": lambda: b'{"format":"kvserve-profile-library","entries":' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    "nested-profile.json": lambda: b'{"name":"x","quantizer":' + b"{\"a\":" * DEPTH + b"1" + b"}" * DEPTH + b"}",
    # item 3: KV the decode worker must not use (rid "adv", a 24-token prompt)
    "foreign-gemma3.kvsv": lambda: kvserve.encode(make_kv(layers=18, heads=1, tokens=24, dim=256, seed=3), "kvserve",
                                                   meta={"rid": "adv", "seq_len": 24, "first_token": 0}),
    "short-kv.kvsv": lambda: kvserve.encode(smollm2_kv(12, 4), "kvserve",
                                            meta={"rid": "adv", "seq_len": 24, "first_token": 0}),
    "heads-4.kvsv": lambda: kvserve.encode(make_kv(layers=30, heads=4, tokens=24, dim=64, seed=5), "kvserve",
                                            meta={"rid": "adv", "seq_len": 24, "first_token": 0}),
    "bad-first-token.kvsv": lambda: kvserve.encode(smollm2_kv(24, 6), "kvserve",
                                                    meta={"rid": "adv", "seq_len": 24, "first_token": 10 ** 9}),
    # items 1 and 2: bytes a peer without the secret sends first
    "v1-huge-header.bin": lambda: struct.pack("<4sBBHQQ", b"KVTF", 1, 2, 0, 0, 256 << 20),
    "v2-hello-then-huge-header.bin": lambda: (struct.pack("<4sBcH16s", b"KVTH", 2, b"C", 0, bytes(16))
                                              + bytes(32) + struct.pack("<4sBBHQQ", b"KVTF", 2, 2, 0, 0, 256 << 20)),
}


if __name__ == "__main__":
    DATA.mkdir(parents=True, exist_ok=True)
    for name, make in FILES.items():
        data = make()
        (DATA / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")
