"""Stores for kvserve bundles, and the prefix cache built on them.

One store abstraction serves both users: the vLLM connector (one bundle per request and
rank) and :class:`PrefixCache` (the compressed KV of long shared prefixes).

* :class:`FileStore` - a directory, one file ``<key>.kvsv`` per bundle, written atomically
  (a temporary name, then a rename), files 0600, a new directory 0700;
* :class:`RedisStore` - a Redis server, values under ``<namespace>:<key>`` (redis-py;
  ``redis://:password@host:port/db``, ``rediss://`` for TLS);
* :func:`open_store` - either, from a directory path or a URL.

Keys are 1-200 characters of letters, digits, ``-``, ``_`` and ``.``, not starting with a dot
(so they can never name a path outside the store or a temporary file).

Every value is *sealed* with the deployment's shared secret (``KVSERVE_SECRET``, the same
secret as the KV channel's): ``KVSS | version | 3 zero bytes | HMAC-SHA256(secret,
"kvserve-store" NUL key NUL bundle) | bundle``. The tag binds a bundle to its key, so a
party that can write the directory or the Redis server but holds no secret can neither
forge an entry nor move one to another key: :meth:`Store.get` raises
:class:`kvserve.KVServeError` and the reader recomputes. Inside the bundle, ``meta["bind"]``
names the model and the sha256 of the token ids it encodes (:func:`binding`); readers check
it against their own request (:func:`check_binding`), so KV is only ever used for the tokens
it was computed from.

Prefix cache (KV-disaggregated serving): a request whose prompt starts with a stored prefix
fetches the prefix's bundle, decodes it, rebuilds the cache and prefills only its own suffix.
Prefix keys are ``sha256(model, profile config, prefix token ids)``: a different profile or
prefix never aliases.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import KVServeError
from ..models import cache_from_kv, check_kv_fits, kv_shapes, prefill
from ..pipeline import decode, kv_nbytes, parse_header, profile_from_config
from .transport import shared_secret

SUFFIX = ".kvsv"
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
SEAL_MAGIC = b"KVSS"
SEAL_VERSION = 1
_SEAL = struct.Struct("<4sB3x32s")  # magic, version, reserved, tag
SEAL_SIZE = _SEAL.size  # 40


def check_key(key: str) -> str:
    """``key`` if it is a valid store key, else :class:`KVServeError`."""
    if not isinstance(key, str) or not 0 < len(key) <= 200 or key[0] == "." or not set(key) <= _KEY_CHARS:
        raise KVServeError(f"bad store key {key!r} (1-200 letters, digits, '-', '_', '.'; not starting with '.')")
    return key


def _tag(secret: bytes, key: str, bundle) -> bytes:
    mac = hmac.new(secret, b"kvserve-store\0" + key.encode() + b"\0", hashlib.sha256)
    mac.update(bundle)
    return mac.digest()


def seal(secret: bytes, key: str, bundle: bytes) -> bytes:
    """The stored form of ``bundle`` under ``key`` (see the module docstring)."""
    return _SEAL.pack(SEAL_MAGIC, SEAL_VERSION, _tag(secret, key, bundle)) + bytes(bundle)


def unseal(secret: bytes, key: str, value: bytes) -> bytes:
    """The bundle inside a stored value; :class:`KVServeError` unless its tag verifies."""
    if len(value) < SEAL_SIZE:
        raise KVServeError(f"store entry {key!r} is too short to be a sealed bundle")
    magic, version, tag = _SEAL.unpack_from(value, 0)
    if magic != SEAL_MAGIC:
        raise KVServeError(f"store entry {key!r} is not a sealed kvserve bundle")
    if version != SEAL_VERSION:
        raise KVServeError(f"store entry {key!r} has unsupported seal version {version}")
    bundle = memoryview(value)[SEAL_SIZE:]
    if not hmac.compare_digest(_tag(secret, key, bundle), tag):
        raise KVServeError(f"store entry {key!r} fails authentication (wrong secret, tampered or moved)")
    return bytes(bundle)


def token_digest(ids) -> str:
    """sha256 (hex) of token ids as little-endian int64."""
    return hashlib.sha256(np.asarray(list(ids), dtype="<i8").tobytes()).hexdigest()


def binding(model: str, ids) -> dict:
    """What a bundle is bound to: ``{"model": model, "tokens": token_digest(ids)}``."""
    return {"model": str(model), "tokens": token_digest(ids)}


def check_binding(meta: dict, model: str, ids) -> None:
    """:class:`KVServeError` unless the bundle ``meta`` is bound to ``model`` and exactly ``ids``."""
    bound = meta.get("bind") if isinstance(meta, dict) else None
    if not isinstance(bound, dict):
        raise KVServeError("bundle carries no binding (model, tokens)")
    if bound.get("model") != str(model):
        raise KVServeError(f"bundle is for model {bound.get('model')!r}, not {str(model)!r}")
    if bound.get("tokens") != token_digest(ids):
        raise KVServeError("bundle encodes other tokens than this request's")


class Store:
    """What every store offers: sealed bundles under string keys (see :func:`check_key`).

    ``get`` returns the bundle (None when the key is absent) and raises
    :class:`KVServeError` for an entry that does not verify; ``put`` seals and stores.
    Subclasses implement the raw ``_get`` / ``_put`` / ``exists`` / ``delete``."""

    def __init__(self, secret: bytes | str | None = None):
        self.secret = shared_secret(secret)

    def get(self, key: str) -> bytes | None:
        value = self._get(check_key(key))
        return None if value is None else unseal(self.secret, key, value)

    def put(self, key: str, bundle: bytes) -> None:
        self._put(check_key(key), seal(self.secret, key, bundle))

    def _get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def _put(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def private_dir(root: Path) -> Path:
    """Create ``root`` 0700, or check that the existing one is a directory owned by this user
    that nobody else may read or write (the default store directory lives in a shared /tmp)."""
    try:
        root.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise KVServeError(f"store directory {str(root)!r} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise KVServeError(f"store directory {str(root)!r} must be owned by this user with mode 0700 "
                           f"(it has owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); choose another "
                           "directory or fix it")
    return root


class FileStore(Store):
    """One file ``<root>/<key>.kvsv`` per value, written atomically, 0600. ``private``: the
    directory must be this user's own, mode 0700 (:func:`private_dir`; the default store
    directory always is); otherwise a missing directory is created 0700 and an existing one
    is used as it is (e.g. a group-shared directory). Anything in it that is not a regular
    file (a FIFO, a device, a link) is never read."""

    def __init__(self, root: str | os.PathLike, secret: bytes | str | None = None, *, private: bool = False):
        super().__init__(secret)
        self.root = Path(root)
        if private:
            private_dir(self.root)
        else:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{check_key(key)}{SUFFIX}"

    def exists(self, key: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.path(key)).st_mode)
        except FileNotFoundError:
            return False

    def _get(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a symlink (ELOOP) or otherwise unreadable entry
            raise KVServeError(f"store entry {key!r} cannot be read: {exc}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise KVServeError(f"store entry {key!r} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _put(self, key: str, value: bytes) -> None:
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

    def __init__(self, url: str, secret: bytes | str | None = None, namespace: str = "kvserve",
                 timeout: float = 60.0):
        super().__init__(secret)
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

    def _get(self, key: str) -> bytes | None:
        return self.r.get(self._name(key))

    def _put(self, key: str, value: bytes) -> None:
        self.r.set(self._name(key), value)

    def delete(self, key: str) -> None:
        self.r.delete(self._name(key))

    def close(self) -> None:
        self.r.close()


def default_store_dir() -> str:
    """``$TMPDIR/kvserve-kv-<uid>``: this user's own, created 0700."""
    return os.path.join(tempfile.gettempdir(), f"kvserve-kv-{os.geteuid()}")


def open_store(spec, secret: bytes | str | None = None) -> Store:
    """A :class:`FileStore` for a directory path, a :class:`RedisStore` for a ``redis://``,
    ``rediss://`` or ``unix://`` URL; ``None`` means :func:`default_store_dir` (checked
    private). ``secret``: the deployment secret (default ``KVSERVE_SECRET``)."""
    if spec is None:
        return FileStore(default_store_dir(), secret, private=True)
    if not isinstance(spec, (str, os.PathLike)):
        raise KVServeError(f"a store is a directory or a redis:// URL, got {spec!r}")
    if isinstance(spec, str) and "://" in spec:
        if spec.startswith(("redis://", "rediss://", "unix://")):
            return RedisStore(spec, secret)
        raise KVServeError(f"store {spec!r}: only a directory or a redis:// URL is supported")
    return FileStore(spec, secret)


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
        meta = {"seq_len": len(prefix_ids), "bind": binding(self.model_name, prefix_ids)}
        blob = self.pipe.encode(kv, meta=meta, threads=self.threads)
        self.store.put(self.key(prefix_ids), blob)
        return len(blob)

    def _usable(self, blob: bytes, prefix_ids: list[int]):
        """The decoded KV of a fetched bundle, or None when it is unusable: it must carry this
        cache's own profile, be bound to this model and exactly these tokens and have this
        model's geometry at the prefix's length, all checked before anything is decoded (so a
        stored decompression bomb costs nothing)."""
        def expect(shapes, meta):  # this prefix's KV for this model, checked before decoding
            if meta.get("seq_len") != len(prefix_ids):
                raise KVServeError("stored prefix has the wrong length")
            check_binding(meta, self.model_name, prefix_ids)
            check_kv_fits(self.model, shapes, len(prefix_ids))

        try:
            header, _ = parse_header(blob)
            if header.get("profile") != self.config:
                raise KVServeError("stored prefix was written with another profile")
            kv, _ = decode(blob, max_bytes=kv_nbytes(kv_shapes(self.model, len(prefix_ids))), expect=expect,
                           threads=self.threads)
            return kv
        except KVServeError:
            return None

    def first_token(self, prefix_ids: list[int], suffix_ids: list[int]) -> PrefixResult:
        """TTFT of ``prefix + suffix`` reusing the stored prefix (recompute if it is missing,
        does not verify (seal, profile, binding) or does not decode)."""
        t0 = time.monotonic()
        try:
            blob = self.store.get(self.key(prefix_ids))
        except KVServeError:
            blob = None
        t1 = time.monotonic()
        kv = self._usable(blob, prefix_ids) if blob is not None else None
        if kv is None:
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
