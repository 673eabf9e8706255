"""KV-disaggregated serving: compressed KV of shared prefixes in an external store.

A request whose prompt starts with a stored prefix fetches the prefix's bundle, decodes it,
rebuilds the cache and only prefills its own suffix. Stores: :class:`FileStore` (the
embedded default, a directory) and :class:`RedisStore` (a real Redis server; the Debian
``redis-server`` package, started on a loopback port by :class:`RedisServer` in tests and
benchmarks). A :class:`kvserve.transport.PacedRelay` in front of Redis emulates a remote
store at a given bandwidth.

Keys are ``sha256(model, prefix token ids, profile config)``: a different profile or prefix
never aliases. Values are kvserve bundles (self-describing, CRC-checked), so a corrupted or
foreign value raises :class:`kvserve.KVServeError` and the request recomputes instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import KVServeError


def prefix_key(model: str, ids: list[int], profile) -> str:
    h = hashlib.sha256()
    h.update(model.encode() + b"\0")
    h.update(json.dumps(profile, sort_keys=True).encode() + b"\0")
    h.update(b",".join(str(int(i)).encode() for i in ids))
    return h.hexdigest()


def read_regular(path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file, else None: missing, or a FIFO, device,
    socket or directory planted in a store directory, which is skipped without being read
    (a FIFO would block the reader forever, a device could stream without end)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped after the stat
            return None
        return f.read()


class FileStore:
    """One file per key under ``root`` (atomic writes; only regular files are read)."""

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not all(c in "0123456789abcdef" for c in key) or len(key) != 64:
            raise KVServeError("store key must be a sha256 hex digest")
        return self.root / f"{key}.kvsv"

    def put(self, key: str, value: bytes) -> None:
        p = self._path(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        os.replace(tmp, p)

    def get(self, key: str) -> bytes | None:
        return read_regular(self._path(key))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class RedisStore:
    """Values in Redis under ``namespace:key`` (redis-py client)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, namespace: str = "kvserve", password: str | None = None,
                 timeout: float = 60.0):
        import redis

        self.ns = namespace
        self.r = redis.Redis(host=host, port=port, password=password, socket_timeout=timeout)

    def put(self, key: str, value: bytes) -> None:
        self.r.set(f"{self.ns}:{key}", value)

    def get(self, key: str) -> bytes | None:
        return self.r.get(f"{self.ns}:{key}")

    def delete(self, key: str) -> None:
        self.r.delete(f"{self.ns}:{key}")

    def close(self):
        self.r.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port (no persistence, own temp dir)."""

    def __init__(self, binary: str | None = None):
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = None
        self.port = None
        self.dir = None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if not os.path.exists(self.binary):
            raise KVServeError("redis-server is not installed (apt-get install redis-server; see scripts/setup.sh)")
        self.dir = tempfile.mkdtemp(prefix="kvserve-redis-")
        self.port = _free_port()
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir, "--protected-mode", "yes",
                                      "--proto-max-bulk-len", "1gb"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise KVServeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@dataclass
class PrefixResult:
    source: str          # "store" or "recompute"
    first_token: int
    ttft_ms: float
    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    suffix_ms: float = 0.0
    bundle_bytes: int = 0


class PrefixCache:
    """Store and reuse the compressed KV of long shared prefixes for one model."""

    def __init__(self, model, store, profile="kvserve", model_name: str = "smollm2"):
        from ..pipeline import profile_from_config

        self.model, self.store, self.model_name = model, store, model_name
        self.pipe = profile_from_config(profile)
        self.config = self.pipe.get_config()

    def key(self, prefix_ids) -> str:
        return prefix_key(self.model_name, prefix_ids, self.config)

    def put_prefix(self, prefix_ids: list[int]) -> int:
        """Prefill the prefix, compress its KV, store it; returns the bundle size."""
        from ..quality import prefill

        kv = prefill(self.model, list(prefix_ids))
        blob = self.pipe.encode(kv, meta={"seq_len": len(prefix_ids)})
        self.store.put(self.key(prefix_ids), blob)
        return len(blob)

    def first_token(self, prefix_ids: list[int], suffix_ids: list[int]) -> PrefixResult:
        """TTFT of ``prefix + suffix`` reusing the stored prefix (recompute if it is missing
        or does not decode)."""
        import torch

        from ..models import check_kv_fits, kv_shapes
        from ..pipeline import decode, kv_nbytes
        from ..quality import cache_from_kv

        def expect(shapes, meta):  # this prefix's KV for this model, checked before decoding
            if meta.get("seq_len") != len(prefix_ids):
                raise KVServeError("stored prefix has the wrong length")
            check_kv_fits(self.model, shapes, len(prefix_ids))

        t0 = time.monotonic()
        blob = self.store.get(self.key(prefix_ids))
        t1 = time.monotonic()
        if blob is not None:
            try:
                kv, meta = decode(blob, max_bytes=kv_nbytes(kv_shapes(self.model, len(prefix_ids))), expect=expect)
            except KVServeError:
                blob = None
        if blob is None:
            return self.recompute(list(prefix_ids) + list(suffix_ids))
        t2 = time.monotonic()
        with torch.no_grad():
            cache = cache_from_kv(self.model, kv, len(prefix_ids))
            logits = self.model(torch.tensor([list(suffix_ids)]), past_key_values=cache, use_cache=True).logits
        tok = int(logits[0, -1].argmax())
        t3 = time.monotonic()
        return PrefixResult("store", tok, (t3 - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, len(blob))

    def recompute(self, ids: list[int]) -> PrefixResult:
        import torch

        t0 = time.monotonic()
        with torch.no_grad():
            logits = self.model(torch.tensor([list(ids)]), use_cache=True).logits
        tok = int(logits[0, -1].argmax())
        return PrefixResult("recompute", tok, (time.monotonic() - t0) * 1e3)
