"""Direct KV transfer: bundles pushed from a producer straight to a consumer, no store between.

The producer sends each bundle as one frame over the authenticated KV channel
(:mod:`kvserve.serving.transport`, protocol version 2) with a
:func:`kvserve.serving.push.channel_sender`; the consumer runs a :class:`BundleReceiver`, a
small :class:`~kvserve.serving.transport.FrameServer` that checks each bundle and keeps it in
an :class:`Inbox` (a bounded in-memory table) under its key until the request that needs it
is scheduled. The vLLM connector's ``transfer: "direct"`` mode is built on these
(:mod:`kvserve.serving.vllm_connector`).

Frames (type, then message JSON + binary, see :func:`~kvserve.serving.transport.pack_message`)::

    T_BUNDLE  {"key": "<store-style key>"} + bundle   ->  {"recv_ms": payload arrival time, "bytes": n}
    T_PING    {}                                       ->  {"role": "kvserve-direct", "entries": n}

A bundle is accepted only when its key is a valid store key (:func:`~.store.check_key`), its
framing and CRC check (:func:`kvserve.pipeline.parse_header`), and the receiver's ``check(key,
header)`` accepts it (the connector checks the model binding, the profile and the geometry
there, without decoding); a refused bundle is answered with an error frame and never kept.
Nothing is decoded on arrival: the consumer decodes where the KV goes (on its device).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from ..errors import KVServeError
from ..pipeline import parse_header
from . import transport as tp
from .store import check_key

T_BUNDLE = 2
T_PING = 4


class Inbox:
    """Received bundles by key, in arrival order; thread-safe and bounded.

    At most ``capacity_bytes`` of bundles and ``max_entries`` entries: a new bundle evicts the
    oldest ones (a request whose bundle was evicted recomputes its prefill); entries older
    than ``ttl_s`` seconds are dropped (their request never came). A bundle larger than the
    whole capacity is refused (:class:`KVServeError`). ``stats``: received, replaced,
    evicted, expired, taken.
    """

    def __init__(self, capacity_bytes: int, ttl_s: float = 600.0, max_entries: int = 4096):
        if not capacity_bytes > 0 or not ttl_s > 0 or not max_entries > 0:
            raise KVServeError("inbox capacity, ttl and max_entries must be positive")
        self.capacity, self.ttl, self.max_entries = int(capacity_bytes), float(ttl_s), int(max_entries)
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = {"received": 0, "replaced": 0, "evicted": 0, "expired": 0, "taken": 0}

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def _drop(self, key: str, why: str) -> None:
        data, _ = self._items.pop(key)
        self._bytes -= len(data)
        self.stats[why] += 1

    def _expire(self, now: float) -> None:
        while self._items:
            key, (_, t) = next(iter(self._items.items()))
            if now - t <= self.ttl:
                break
            self._drop(key, "expired")

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.capacity:
            raise KVServeError(f"bundle of {len(data)} bytes exceeds the receiver's capacity of {self.capacity}")
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if key in self._items:
                self._drop(key, "replaced")
            while self._items and (self._bytes + len(data) > self.capacity or len(self._items) >= self.max_entries):
                self._drop(next(iter(self._items)), "evicted")
            self._items[key] = (data, now)
            self._bytes += len(data)
            self.stats["received"] += 1

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self._expire(time.monotonic())
            item = self._items.get(key)
            return None if item is None else item[0]

    def exists(self, key: str) -> bool:
        return self.get(key) is not None

    def pop(self, key: str) -> bytes | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._bytes -= len(item[0])
            self.stats["taken"] += 1
            return item[0]


Check = Callable[[str, dict], None]


class BundleReceiver:
    """The consumer's end of direct transfer: a :class:`~.transport.FrameServer` on
    ``host:port`` (port 0: a free one; :attr:`address` says which) that puts every accepted
    bundle into ``inbox`` (see the module docstring). ``check(key, header)`` raises
    :class:`KVServeError` to refuse a bundle; ``max_frame`` bounds a frame (the largest
    bundle the consumer can use). Only peers holding ``secret`` get a frame read at all.
    """

    def __init__(self, inbox: Inbox, check: Check, secret: bytes | str | None = None, host: str = "127.0.0.1",
                 port: int = 0, max_frame: int = tp.DEFAULT_MAX_FRAME, io_timeout: float = 60.0):
        self.inbox, self.check = inbox, check
        self.refused = 0
        self._lock = threading.Lock()
        try:
            self.server = tp.FrameServer(self.handle, secret, host=host, port=port, max_frame=max_frame,
                                         io_timeout=io_timeout)
        except OSError as exc:
            raise tp.TransportError(f"cannot listen on {host}:{port}: {exc}") from exc
        self.address = self.server.address

    def handle(self, ftype: int, payload: bytes, info: dict):
        if ftype == T_PING:
            return T_PING, tp.pack_message({"role": "kvserve-direct", "entries": len(self.inbox)})
        if ftype != T_BUNDLE:
            raise KVServeError(f"direct receiver: unexpected message type {ftype}")
        meta, blob = tp.unpack_message(payload)
        try:
            key = check_key(meta.get("key"))
            header, _ = parse_header(blob)  # framing and CRC
            self.check(key, header)
            self.inbox.put(key, bytes(blob))
        except KVServeError:
            with self._lock:
                self.refused += 1
            raise  # an error frame to the sender
        recv_s = info["channel"].last_recv_s
        return T_BUNDLE, tp.pack_message({"recv_ms": round(recv_s * 1e3, 3), "bytes": len(blob)})

    def start(self) -> "BundleReceiver":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
