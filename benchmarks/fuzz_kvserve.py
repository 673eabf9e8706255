"""Fuzz kvserve's edges (issue 16; not in CI): bundles, the profile library, the KV channel.

    python benchmarks/fuzz_kvserve.py [--bundles 100000] [--library 5000] [--channel 20000]
        [--workers 2] [--seed 0] [--max-bytes 67108864] [--hang-s 20] [--out benchmarks/results]

Every input is generated deterministically from ``(seed, target, index)`` by mutating seeds:

* ``bundle``: packaged-profile bundles of small synthetic KV (every profile plus other codecs,
  quantizers and a sliding-window layout), the golden bundles and the hostile files of
  ``tests/kvserve/data/adversarial/``. Mutations: bit flips, overwrites, truncation and
  extension as they are (the CRC must catch them), and, with lengths and CRC made right
  again so the deeper parsers are reached: payload edits, fixed-header fields, JSON header
  edits (any value anywhere: huge, negative, fractional, NaN, nested, wrong types, keys
  removed or added), part-table and layer-table edits, raw JSON-text edits and splices of
  two seeds. Each goes to ``kvserve.decode(blob, max_bytes=--max-bytes)``.
* ``library``: the packaged profile library with JSON edits or text edits, loaded with
  ``kvserve.controller.load_library(path)``.
* ``channel``: a :class:`kvserve.serving.transport.FrameServer` in the worker whose handler decodes
  type-2 bundles (as the decode worker does) and echoes other frames. Inputs are bytes from
  a peer without the secret (garbage, edited hellos, version-1 frames, forged proofs), and
  frames from an authenticated peer: valid, with flipped bits, with edited header fields
  re-tagged, with bad JSON or edited bundles re-tagged, truncated. Every 500 inputs a
  genuine request must still be served.

Outcomes: ``rejected`` (the package's own error: KVServeError / a TransportError, or the
server closing the connection), ``accepted`` (decoded / answered consistently with what the
input itself claims, e.g. a re-checksummed bundle decoding to the shapes its header
declares), ``silently_wrong`` (accepted though it must not be: a bundle whose bytes changed
without a new CRC, output that contradicts its header, an echo of a frame whose tag was
broken, server bytes beyond the handshake to a peer without the secret), ``foreign`` (any
other exception, or a server-side handler failure), ``crash`` (the worker process died),
``hang`` (one input took over ``--hang-s`` seconds). Peak memory is each worker's VmHWM.
Writes ``<out>/fuzz_kvserve.json`` (counts, findings, method) and prints a table; inputs of
every finding that is not rejected/accepted are saved under ``<out>/fuzz_kvserve_findings/``.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import random
import socket
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import fuzz_harness as fh
from fuzz_harness import bytes_edit as _bytes_edit
from fuzz_harness import deep_text as _deep_text
from fuzz_harness import dumps as _dumps
from fuzz_harness import mutate_json as _mutate_json

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "kvserve" / "data"
TARGETS = ["bundle", "library", "channel"]
INTERESTING = [0, 1, -1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 64, 255, 256, 4095, 4096, 65535, 65536,
               2 ** 20, 2 ** 30, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 34, 2 ** 40, 2 ** 53, 2 ** 63 - 1, 2 ** 63, 2 ** 64,
               10 ** 30, -2 ** 31, -2 ** 63, 0.5, -0.0, 1e-300, 1e308, float("inf"), float("-inf"), float("nan"),
               True, False, None, "", "x", "k0.x", "bfloat16", "uint8", "float32", "rans", "zstd", "none",
               [], {}, [0], [1, 2], {"id": "none"}, "\udcff"]


# ------------------------------------------------------------------ seeds


def _kv(layers, heads, tokens, dim, seed, tokens_per_layer=None):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        t = tokens_per_layer[i] if tokens_per_layer else tokens
        k = torch.randn(1, heads, t, dim, generator=g) * (1 + i)
        v = torch.randn(1, heads, t, dim, generator=g)
        out.append((k.bfloat16(), v.bfloat16()))
    return out


def build_seeds() -> list[bytes]:
    """Deterministic seed bundles (a few KB to ~100 KB each)."""
    import kvserve

    kv = _kv(3, 2, 40, 32, 0)
    slid = _kv(4, 2, 40, 64, 1, tokens_per_layer=[40, 16, 40, 16])
    seeds = []
    for name in kvserve.profile_names():
        seeds.append(kvserve.encode(kv, name, meta={"seq_len": 40}))
    seeds.append(kvserve.encode(slid, "kvserve", meta={"seq_len": 40, "rid": "r1", "first_token": 5}))
    base = kvserve.load_profile("kvserve")
    for codec in ({"id": "zstd", "level": 1, "pack": True}, {"id": "lz4", "pack": True}, {"id": "ans"},
                  {"id": "bitpack"}, {"id": "rans", "pair": False}):
        seeds.append(kvserve.encode(kv, dict(base, codec=codec), meta={"seq_len": 40}))
    for codec in ({"id": "zstd", "level": 3, "pack": False}, {"id": "none"}):
        seeds.append(kvserve.encode(slid, dict(kvserve.load_profile("bf16"), codec=codec)))
    seeds.append(kvserve.encode(slid, dict(kvserve.load_profile("cachegen"), codec={"id": "ans"})))
    for p in sorted(DATA.glob("golden-*.kvsv")) + sorted((DATA / "adversarial").glob("*.kvsv")):
        seeds.append(p.read_bytes())
    return seeds


# ------------------------------------------------------------------ bundle mutation


def mutate_json(obj, rng: random.Random, focus: tuple = ()):
    """:func:`fuzz_harness.mutate_json` with this script's constants and new keys."""
    return _mutate_json(obj, rng, focus, new_keys=["extra", "profile", "meta", "dtype", "layers", "parts", "x"],
                        interesting=INTERESTING)



def split_bundle(b: bytes):
    """(fixed fields, header bytes, payload) without validation (None if the frame is too short)."""
    from kvserve.pipeline import _FIXED, FIXED_SIZE

    if len(b) < FIXED_SIZE + 4:
        return None
    fields = list(_FIXED.unpack_from(b, 0))
    hlen = min(fields[4], len(b) - FIXED_SIZE - 4)
    return fields, b[FIXED_SIZE:FIXED_SIZE + hlen], b[FIXED_SIZE + hlen:len(b) - 4]


def refit(fields, header: bytes, payload: bytes, fix_lengths: bool = True) -> bytes:
    """Reframe with right lengths (unless told otherwise) and a right CRC."""
    from kvserve.pipeline import _FIXED

    f = list(fields)
    if fix_lengths:
        f[4], f[5] = len(header), len(payload)
    f = [f[0], f[1] & 0xFF, f[2] & 0xFF, f[3] & 0xFFFF, f[4] & 0xFFFFFFFF, f[5] & (2 ** 64 - 1)]
    out = _FIXED.pack(*f) + header + payload
    return out + struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)


def mutate_bundle(seeds: list[bytes], rng: random.Random) -> tuple[str, bytes, bytes, bool]:
    """-> (mutation kind, input, its seed, refit: whether lengths/CRC were made right again)."""
    seed = rng.choice(seeds)
    kind = rng.choice(["flip", "bytes", "payload", "fixed", "header", "table", "table", "layers", "profile", "meta",
                       "text", "deep", "splice", "stack"])
    if kind == "flip":
        b = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return kind, bytes(b), seed, False
    if kind == "bytes":
        return kind, _bytes_edit(seed, rng), seed, False
    parts = split_bundle(seed)
    fields, hbytes, payload = parts
    try:
        header = json.loads(hbytes)
    except (ValueError, RecursionError):  # the nested hostile seed
        header = None
    for _ in range(rng.randint(2, 4) if kind == "stack" else 1):
        k = rng.choice(["payload", "fixed", "header", "table", "layers", "profile", "text"]) if kind == "stack" else kind
        if k == "payload":
            payload = _bytes_edit(payload, rng)
        elif k == "fixed":
            i = rng.choice([1, 2, 3, 4, 5])
            fields[i] = rng.choice([0, 1, 2, 255, fields[i] + 1, max(0, fields[i] - 1), 2 ** 32 - 1, rng.getrandbits(32)])
            return kind, refit(fields, hbytes, payload, fix_lengths=i < 4), seed, True
        elif k == "text":
            hbytes = _bytes_edit(hbytes, rng)
            header = None
        elif k == "deep":
            hbytes = _deep_text(hbytes, rng)
            header = None
        elif k == "splice":
            other = split_bundle(rng.choice(seeds))
            payload = other[2] if rng.random() < 0.5 else payload
            hbytes = other[1] if payload is not other[2] else hbytes
            header = None
        elif header is not None:
            focus = {"header": (), "table": ("parts",), "layers": ("layers",), "profile": ("profile",),
                     "meta": ("meta",)}[k]
            header = mutate_json(header, rng, focus)
            hbytes = _dumps(header)
    return kind, refit(fields, hbytes, payload), seed, True


def classify_decode(blob: bytes, seed: bytes, refitted: bool, max_bytes: int) -> tuple[str, str]:
    import kvserve
    from kvserve.pipeline import parse_header

    try:
        kv, meta = kvserve.decode(blob, max_bytes=max_bytes)
    except kvserve.KVServeError as exc:
        return "rejected", str(exc)[:120]
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        return "foreign", f"{type(exc).__name__}: {str(exc)[:200]}"
    if not refitted and blob != seed:
        return "silently_wrong", "bytes changed without a new CRC but the bundle decoded"
    header, _ = parse_header(blob)
    want = [tuple(map(tuple, pair)) for pair in header["layers"]]
    got = [(tuple(k.shape), tuple(v.shape)) for k, v in kv]
    if got != want or any(t.dtype.__repr__() != "torch.bfloat16" for pair in kv for t in pair):
        return "silently_wrong", f"decoded shapes {got[:2]} differ from the header's {want[:2]}"
    if not isinstance(meta, dict) or meta != header["meta"]:
        return "silently_wrong", "meta differs from the header's"
    return "accepted", ""


# ------------------------------------------------------------------ library


def mutate_library(lib: dict, text: str, rng: random.Random) -> bytes:
    if rng.random() < 0.25:
        return _bytes_edit(text.encode(), rng)
    if rng.random() < 0.1:
        return _deep_text(text.encode(), rng)
    focus = rng.choice([(), ("entries",), ("entries", rng.randrange(len(lib["entries"]))), ("intervals",),
                        ("entries", 0, "config"), ("entries", 0, "optimal_mbps")])
    out = lib
    for _ in range(rng.randint(1, 3)):
        out = mutate_json(out, rng, focus)
    return _dumps(out)


def classify_library(data: bytes, path: str) -> tuple[str, str]:
    import kvserve
    from kvserve.library import load_library

    with open(path, "wb") as f:
        f.write(data)
    try:
        lib = load_library(path)
    except kvserve.KVServeError as exc:
        return "rejected", str(exc)[:120]
    except Exception as exc:  # noqa: BLE001
        return "foreign", f"{type(exc).__name__}: {str(exc)[:200]}"
    bad = [e.name for e in lib.entries if not (e.ratio > 0 and math.isfinite(e.ratio) and math.isfinite(e.quality))]
    if bad:
        return "silently_wrong", f"entries with impossible numbers accepted: {bad[:3]}"
    return "accepted", ""


# ------------------------------------------------------------------ channel


SECRET = b"fuzz-secret-0123456789abcdef"
KNOWN_REJECTIONS = {"MalformedFrame", "VersionError", "FrameTooLarge", "AuthError", "ConnectionLost",
                    "DeadlineExceeded", "RemoteError", "TransportError", "KVServeError"}


def channel_server(max_bytes: int):
    import kvserve
    from kvserve.serving import transport as tp

    def handler(ftype, payload, info):
        meta, blob = tp.unpack_message(payload)
        if ftype == 2:
            kv, m = kvserve.decode(blob, max_bytes=max_bytes)
            return 2, tp.pack_message({"layers": len(kv), "meta": m})
        return ftype, payload  # echo what was received

    return tp.FrameServer(handler, SECRET, io_timeout=2.0, handshake_timeout=1.0).start()


def _recv_all(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (True) or ``timeout`` passes (False)."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(got), False
        sock.settimeout(left)
        try:
            d = sock.recv(1 << 16)
        except socket.timeout:
            return bytes(got), False
        except OSError:
            return bytes(got), True
        if not d:
            return bytes(got), True
        got += d


def channel_input(seeds: list[bytes], rng: random.Random) -> tuple[str, dict]:
    """A description of one channel input (bytes are made against the live session)."""
    from kvserve.serving import transport as tp

    if rng.random() < 0.35:  # a peer without the secret
        kind = rng.choice(["garbage", "hello", "v1", "proof"])
        if kind == "garbage":
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        elif kind == "hello":
            data = _bytes_edit(tp._HELLO.pack(tp.HELLO_MAGIC, tp.VERSION, b"C", 0, os.urandom(16)), rng)
        elif kind == "v1":
            data = struct.pack("<4sBBHQQ", b"KVTF", 1, rng.randint(0, 255), 0, 0, rng.choice([0, 10, 2 ** 28, 2 ** 63]))
        else:
            data = tp._HELLO.pack(tp.HELLO_MAGIC, tp.VERSION, b"C", 0, os.urandom(16)) + os.urandom(32) + \
                struct.pack("<4sBBHQQ", b"KVTF", 2, 2, 0, 0, rng.choice([16, 2 ** 28]))
        return "preauth-" + kind, {"data": data}
    kind = rng.choice(["valid", "flip", "field", "json", "deep", "bundle", "bundle", "truncate", "seq"])
    meta = mutate_json({"rid": "r", "n": rng.randint(0, 9)}, rng) if kind == "json" else {"rid": "r"}
    blob = rng.choice(seeds) if kind in ("bundle", "valid", "flip", "truncate") and rng.random() < 0.7 else b""
    ftype = 2 if blob else rng.choice([1, 3, 4, 9])
    if kind == "bundle":
        blob = mutate_bundle(seeds, rng)[1]
    if kind == "deep" or (kind == "json" and rng.random() < 0.5):
        text = json.dumps(meta).encode()
        text = _deep_text(text, rng) if kind == "deep" else _bytes_edit(text, rng)
        payload = struct.pack("<I", len(text)) + text
    else:
        payload = b"".join(bytes(p) for p in tp.pack_message(meta if isinstance(meta, dict) else {"m": 1}, blob)) \
            if isinstance(meta, dict) else struct.pack("<I", 2) + b"[]"
    return "auth-" + kind, {"ftype": ftype, "payload": payload, "field": rng.randrange(6), "value": rng.getrandbits(16),
                            "flips": [rng.getrandbits(32) for _ in range(rng.randint(1, 4))], "cut": rng.random()}


def classify_channel(srv, kind: str, spec: dict) -> tuple[str, str]:
    from kvserve.serving import transport as tp

    if kind.startswith("preauth"):
        s = socket.create_connection(srv.address, timeout=5)
        try:
            s.sendall(spec["data"])
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        got, closed = _recv_all(s, 5.0)
        s.close()
        if not closed:
            return "hang", "the server kept a peer without the secret connected"
        if len(got) > tp.HELLO_SIZE + tp.TAG_SIZE:
            return "silently_wrong", f"{len(got)} bytes sent to a peer without the secret"
        return "rejected", ""
    ch = tp.connect(srv.address, SECRET, timeout=5)
    try:
        hdr = tp._HDR.pack(tp.MAGIC, tp.VERSION, spec["ftype"], 0, 0, len(spec["payload"]))
        tag_ok = True
        if kind == "auth-field":  # edit a header field, re-tag
            f = list(tp._HDR.unpack(hdr))
            i = spec["field"]
            f[i] = {0: b"KVTX", 1: spec["value"] & 0xFF, 2: spec["value"] & 0xFF, 3: spec["value"],
                    4: spec["value"], 5: spec["value"] * 1000}[i]
            hdr = tp._HDR.pack(*f)
        if kind == "auth-seq":
            hdr = tp._HDR.pack(tp.MAGIC, tp.VERSION, spec["ftype"], 0, 1 + spec["value"] % 5, len(spec["payload"]))
        frame = bytearray(hdr + spec["payload"] + hmac.new(ch.key, b"C" + hdr + spec["payload"], hashlib.sha256).digest())
        original = bytes(frame)
        if kind == "auth-flip":
            for r in spec["flips"]:
                frame[r % len(frame)] ^= 1 << (r % 8)
            tag_ok = bytes(frame) == original  # flips that cancelled out
        if kind == "auth-truncate":
            frame = frame[:int(len(frame) * spec["cut"])]
        try:
            ch.sock.sendall(frame)
            ch.sock.shutdown(socket.SHUT_WR)  # nothing more comes: a verdict, not a wait
        except OSError:
            pass
        ch.idle_timeout = 10.0
        try:
            ftype, reply = ch.recv()
        except tp.RemoteError as exc:
            if "internal error" in str(exc):
                return "foreign", str(exc)[:200]
            return "rejected", str(exc)[:120]
        except tp.ConnectionLost as exc:
            if "timed out" in str(exc):
                return "hang", "no reply and no close within 10 s"
            return "rejected", str(exc)[:120]
        except tp.TransportError as exc:
            return "rejected", str(exc)[:120]
        except Exception as exc:  # noqa: BLE001
            return "foreign", f"client: {type(exc).__name__}: {exc}"[:200]
        if not tag_ok:
            return "silently_wrong", "a frame with broken bits was answered"
        sent_type = tp._HDR.unpack(hdr)[2]
        if ftype != sent_type or (sent_type != 2 and reply != spec["payload"]):
            return "silently_wrong", "the reply differs from the request"
        return "accepted", ""
    finally:
        ch.close()


def healthy(srv) -> bool:
    from kvserve.serving import transport as tp

    try:
        with tp.FrameClient(srv.address, SECRET, retries=1, timeout=10) as c:
            return c.call(4, {"ping": 1}, b"x")[0] == {"ping": 1}
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------ workers


def build(target: str, options: dict) -> dict:
    """A worker's state (fuzz_harness): seeds, the library, a scratch file, the server."""
    import numba
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)  # codec threads are per call; this bounds numba's own default
    lib_text = (ROOT / "src" / "kvserve" / "library" / "smollm2.json").read_text()
    tmp = tempfile.NamedTemporaryFile(prefix="fuzz-lib-", suffix=".json", delete=False,
                                      dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    tmp.close()
    return {"seeds": build_seeds(), "lib_text": lib_text, "lib": json.loads(lib_text), "tmp": tmp.name,
            "max_bytes": options["max_bytes"], "target": target,
            "srv": channel_server(options["max_bytes"]) if target == "channel" else None}


def one(state: dict, i: int, rng: random.Random) -> tuple[str, str, str, bytes]:
    """Input ``i`` of the worker's target: (mutation kind, outcome, why, the input's bytes)."""
    seeds, target = state["seeds"], state["target"]
    if target == "bundle":
        kind, blob, s, refitted = mutate_bundle(seeds, rng)
        return (kind, *classify_decode(blob, s, refitted, state["max_bytes"]), blob)
    if target == "library":
        data = mutate_library(state["lib"], state["lib_text"], rng)
        return ("library", *classify_library(data, state["tmp"]), data)
    kind, spec = channel_input(seeds, rng)
    cat, why = classify_channel(state["srv"], kind, spec)
    if (i + 1) % 500 == 0 and not healthy(state["srv"]):
        cat, why = "hang", "the server stopped serving genuine requests"
    return kind, cat, why, spec.get("data") or spec.get("payload", b"")


def finish(state: dict) -> list[str]:
    """The server's rejections that are not the package's own errors (each a foreign finding)."""
    os.unlink(state["tmp"])
    srv = state["srv"]
    if srv is None:
        return []
    srv.stop()
    return [r for r in list(srv.rejected) if r.split(": ")[1] not in KNOWN_REJECTIONS]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundles", type=int, default=100_000)
    ap.add_argument("--library", type=int, default=5_000)
    ap.add_argument("--channel", type=int, default=20_000)
    ap.add_argument("--max-bytes", type=int, default=64 << 20, help="decode's max_bytes for bundles (default 64 MiB)")
    fh.add_arguments(ap, workers=2)
    args = ap.parse_args(argv)
    rows, work = fh.run_all("fuzz_kvserve", [("bundle", args.bundles), ("library", args.library),
                                             ("channel", args.channel)], args, {"max_bytes": args.max_bytes})
    fh.report(work, args.out, "fuzz_kvserve", rows, {"seed": args.seed, "max_bytes": args.max_bytes,
                                                     "hang_s": args.hang_s, "workers": args.workers,
                                                     "method": __doc__.split("\n\n", 2)[2][:3000]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
