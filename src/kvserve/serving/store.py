"""Stores for kvserve bundles, and the prefix cache built on them.

One store abstraction serves both users: the vLLM connector (one bundle per request and
rank) and :class:`PrefixCache` (the compressed KV of long shared prefixes).

* :class:`FileStore` - a directory, one file ``<key>.kvsv`` per bundle, written atomically
  (a temporary name, then a rename);
* :class:`RedisStore` - a Redis server, values under ``<namespace>:<key>`` (redis-py);
* :func:`open_store` - either, from a directory path or a ``redis://`` / ``rediss://`` URL.

Keys are 1-200 characters of letters, digits, ``-``, ``_`` and ``.``, not starting with a dot
(so they can never name a path outside the store or a temporary file). Values are kvserve
bundles, self-describing and CRC-checked: a corrupted or foreign value raises
:class:`kvserve.KVServeError` when decoded and the reader recomputes instead.

Prefix cache (KV-disaggregated serving): a request whose prompt starts with a stored prefix
fetches the prefix's bundle, decodes it, rebuilds the cache and prefills only its own suffix.
Prefix keys are ``sha256(model, profile config, prefix token ids)``: a different profile or
prefix never aliases.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KVServeError
from ..models import cache_from_kv, prefill
from ..pipeline import decode, profile_from_config

SUFFIX = ".kvsv"
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_key(key: str) -> str:
    """``key`` if it is a valid store key, else :class:`KVServeError`."""
    if not isinstance(key, str) or not 0 < len(key) <= 200 or key[0] == "." or not set(key) <= _KEY_CHARS:
        raise KVServeError(f"bad store key {key!r} (1-200 letters, digits, '-', '_', '.'; not starting with '.')")
    return key


class Store:
    """What every store offers: bytes under string keys (see :func:`check_key`)."""

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def put(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.get(key) is not None

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FileStore(Store):
    """One file ``<root>/<key>.kvsv`` per value, written atomically; files are created 0600."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{check_key(key)}{SUFFIX}"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, value: bytes) -> None:
        dst = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, dst)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


class RedisStore(Store):
    """Values in Redis under ``<namespace>:<key>``: ``RedisStore("redis://[:password@]host:port[/db]")``
    (``rediss://`` for TLS, ``unix://`` for a socket); needs the ``redis`` package."""

    def __init__(self, url: str, namespace: str = "kvserve", timeout: float = 60.0):
        try:
            import redis
        except ImportError as exc:
            raise KVServeError(f"store {url!r} needs the redis package (pip install redis)") from exc
        self.url, self.ns = url, namespace
        self.r = redis.Redis.from_url(url, socket_timeout=timeout)

    def _name(self, key: str) -> str:
        return f"{self.ns}:{check_key(key)}"

    def exists(self, key: str) -> bool:
        return bool(self.r.exists(self._name(key)))

    def get(self, key: str) -> bytes | None:
        return self.r.get(self._name(key))

    def put(self, key: str, value: bytes) -> None:
        self.r.set(self._name(key), value)

    def delete(self, key: str) -> None:
        self.r.delete(self._name(key))

    def close(self) -> None:
        self.r.close()


def open_store(spec, default_dir: str | None = None) -> Store:
    """A :class:`FileStore` for a directory path, a :class:`RedisStore` for a ``redis://``,
    ``rediss://`` or ``unix://`` URL; ``None`` means ``default_dir``
    (default ``$TMPDIR/kvserve-kv``)."""
    if spec is None:
        spec = default_dir or os.path.join(tempfile.gettempdir(), "kvserve-kv")
    if not isinstance(spec, (str, os.PathLike)):
        raise KVServeError(f"a store is a directory or a redis:// URL, got {spec!r}")
    if isinstance(spec, str) and "://" in spec:
        if spec.startswith(("redis://", "rediss://", "unix://")):
            return RedisStore(spec)
        raise KVServeError(f"store {spec!r}: only a directory or a redis:// URL is supported")
    return FileStore(spec)


# ------------------------------------------------------------------ prefix cache


def prefix_key(model: str, ids: list[int], profile) -> str:
    h = hashlib.sha256()
    h.update(model.encode() + b"\0")
    h.update(json.dumps(profile, sort_keys=True).encode() + b"\0")
    h.update(b",".join(str(int(i)).encode() for i in ids))
    return h.hexdigest()


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

    def __init__(self, model, store: Store, profile="kvserve", model_name: str = "smollm2",
                 threads: int | None = None):
        self.model, self.store, self.model_name, self.threads = model, store, model_name, threads
        self.pipe = profile_from_config(profile)
        self.config = self.pipe.get_config()

    def key(self, prefix_ids) -> str:
        return prefix_key(self.model_name, prefix_ids, self.config)

    def put_prefix(self, prefix_ids: list[int]) -> int:
        """Prefill the prefix, compress its KV, store it; returns the bundle size."""
        kv = prefill(self.model, list(prefix_ids))
        blob = self.pipe.encode(kv, meta={"seq_len": len(prefix_ids)}, threads=self.threads)
        self.store.put(self.key(prefix_ids), blob)
        return len(blob)

    def first_token(self, prefix_ids: list[int], suffix_ids: list[int]) -> PrefixResult:
        """TTFT of ``prefix + suffix`` reusing the stored prefix (recompute if it is missing
        or does not decode)."""
        t0 = time.monotonic()
        blob = self.store.get(self.key(prefix_ids))
        t1 = time.monotonic()
        if blob is not None:
            try:
                kv, meta = decode(blob, threads=self.threads)
                if meta.get("seq_len") != len(prefix_ids):
                    raise KVServeError("stored prefix has the wrong length")
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
        t0 = time.monotonic()
        with torch.no_grad():
            logits = self.model(torch.tensor([list(ids)]), use_cache=True).logits
        tok = int(logits[0, -1].argmax())
        return PrefixResult("recompute", tok, (time.monotonic() - t0) * 1e3)
