"""Authenticated, paced, length-prefixed frames over TCP (the KV channel of kvserve.serving).

Wire format version 2 (all integers little-endian); see docs/KVSERVE.md for the byte-level
spec and the security model. A connection starts with a mutual handshake in which both ends
contribute freshness::

    client -> server   hello_c = b"KVTH" | u8 version=2 | u8 role b"C" | u16 flags=0 | 16-byte nonce
    server -> client   hello_s = b"KVTH" | u8 version=2 | u8 role b"S" | u16 flags=0 | 16-byte nonce
    client -> server   HMAC-SHA256(secret, b"kvserve-kv-channel/2 client" || hello_c || hello_s)
    server -> client   HMAC-SHA256(secret, b"kvserve-kv-channel/2 server" || hello_c || hello_s)

Both hellos go out at once (one round trip); each end verifies the other's proof before it
accepts anything else, so a peer without the secret costs the server 56 bytes of reads and
one short-lived thread, never a frame. The session key is
``K = HMAC-SHA256(secret, b"kvserve-kv-channel/2 key" || hello_c || hello_s)``. Then both
directions carry frames::

    offset size  field
    0      4     magic b"KVTF"
    4      1     version = 2
    5      1     type (application defined, 1..255)
    6      2     flags = 0
    8      8     seq: 0, 1, 2, ... per direction and connection
    16     8     payload length (at most the receiver's ``max_frame``)
    24     len   payload
    24+len 32    tag = HMAC-SHA256(K, dir || header || payload)

``dir`` is ``b"C"`` for client->server frames and ``b"S"`` for replies. The key depends on
both nonces, so a frame recorded on one connection authenticates on no other, in either
direction (a fake server replaying a recorded reply to a client fails, as does a client
replaying requests); the sequence number stops repeats and reordering within a connection.
The tag is a trailer so a large payload can be streamed (and paced) without buffering
twice; the receiver checks the length against ``max_frame`` before reading the payload,
buffers only what has arrived (never the announced length up front) and checks the tag
before handing the payload over. A whole frame has a deadline (``frame_timeout + length /
min_rate_bps`` from its first byte), a handshake has ``handshake_timeout``: a peer sending
one byte a second cannot hold a connection. A :class:`FrameServer` caps its connections
(``max_connections``) and its connections still in the handshake (``max_pending``; the
oldest is dropped for a new one). A version-1 peer is refused with :class:`VersionError`.

Every protocol failure raises a :class:`TransportError` subclass (a
:class:`kvserve.KVServeError`): :class:`FrameTooLarge`, :class:`MalformedFrame`,
:class:`VersionError`, :class:`AuthError`, :class:`ConnectionLost`,
:class:`DeadlineExceeded`. A :class:`FrameServer` answers a bad frame with an error frame
when it can, closes that connection, counts it in ``server.rejected`` and keeps serving
everybody else.

Pacing: :class:`TokenBucket` (any rate, ``inf`` = unpaced) gates the sender's writes in
small chunks. :class:`BandwidthEstimator` keeps an EWMA of observed transfer throughput,
which the controller reads as its bandwidth input.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..errors import KVServeError

MAGIC = b"KVTF"
VERSION = 2
_HDR = struct.Struct("<4sBBHQQ")
HEADER_SIZE = _HDR.size  # 24
TAG_SIZE = 32
NONCE_SIZE = 16
HELLO_MAGIC = b"KVTH"
_HELLO = struct.Struct("<4sBcH16s")  # magic, version, role (b"C" / b"S"), flags, nonce
HELLO_SIZE = _HELLO.size  # 24
_LABEL = b"kvserve-kv-channel/2 "
DEFAULT_MAX_FRAME = 256 << 20
CHUNK = 64 << 10
RECV_STEP = 1 << 20  # the receive buffer grows by at most this much per read

# limits of a server (all overridable per FrameServer)
HANDSHAKE_TIMEOUT = 5.0  # seconds for the whole handshake
MAX_PENDING = 16  # connections still in the handshake (unauthenticated)
MAX_CONNECTIONS = 64  # all connections
MIN_RATE_BPS = 16 << 10  # a frame may take frame_timeout + length / MIN_RATE_BPS seconds

# frame types used by the serving layer (the transport itself only reserves ERROR)
T_ERROR = 255


class TransportError(KVServeError):
    """Any failure of the KV channel."""


class MalformedFrame(TransportError):
    """Bad magic, version, flags, sequence number or truncated frame."""


class VersionError(MalformedFrame):
    """The peer speaks another version of the KV channel (e.g. version 1, before the
    mutual handshake): upgrade it."""


class FrameTooLarge(MalformedFrame):
    """Declared payload length above the receiver's ``max_frame``."""


class AuthError(TransportError):
    """HMAC tag mismatch: wrong secret, tampering, or a replayed/reordered frame."""


class ConnectionLost(TransportError):
    """The peer closed or reset the connection, or an I/O timeout expired."""


class DeadlineExceeded(ConnectionLost):
    """A handshake or a whole frame took longer than its deadline (a peer trickling bytes)."""


class RemoteError(TransportError):
    """The peer answered with an error frame."""


class TransferAbandoned(TransportError):
    """The sender gave up on a frame part-way: its ``progress`` callback raised this
    (e.g. the link is far slower than planned and another encoding would finish sooner).
    The connection is closed, so the receiver sees a truncated frame and drops it."""

    def __init__(self, message: str, sent: int = 0, seconds: float = 0.0):
        super().__init__(message)
        self.sent, self.seconds = sent, seconds


def shared_secret(secret: bytes | str | None = None) -> bytes:
    """The deployment's shared secret: ``secret``, else ``KVSERVE_SECRET``; at least 16 bytes."""
    if secret is None:
        secret = os.environ.get("KVSERVE_SECRET", "")
    if isinstance(secret, str):
        secret = secret.encode()
    if len(secret) < 16:
        raise TransportError("the KV channel needs a shared secret of at least 16 bytes "
                             "(argument or KVSERVE_SECRET)")
    return secret


def new_secret() -> bytes:
    """A fresh random 32-byte secret (hex text, so it can travel in an environment variable)."""
    return os.urandom(16).hex().encode()


# ------------------------------------------------------------------ pacing


class TokenBucket:
    """Token bucket of ``rate_bps`` bytes/s with ``burst`` bytes of depth; ``inf`` = unpaced.

    ``consume(n)`` blocks until ``n`` bytes may go. The bucket starts empty-ish (one burst) so a
    short transfer cannot run far ahead of the rate; sleeping is done on the monotonic clock
    against the ideal schedule, so per-sleep overshoot does not accumulate.
    """

    def __init__(self, rate_bps: float, burst: int | None = None):
        self.set_rate(rate_bps, burst)

    def set_rate(self, rate_bps: float, burst: int | None = None) -> None:
        if not rate_bps > 0:
            raise TransportError("pacing rate must be > 0 bytes/s")
        self.rate = float(rate_bps)
        if math.isinf(self.rate):
            self.burst = float("inf")
        else:
            # ~2 ms of traffic, at least one TCP segment, at most one chunk
            self.burst = float(burst if burst is not None else min(CHUNK, max(1500, self.rate * 0.002)))
        self.tokens = self.burst if not math.isinf(self.rate) else 0.0
        self.last = time.perf_counter()

    def chunk_size(self) -> int:
        if math.isinf(self.rate):
            return 1 << 20
        return int(max(1024, min(CHUNK, self.burst)))

    def consume(self, n: int) -> None:
        if math.isinf(self.rate):
            return
        now = time.perf_counter()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            deadline = now + wait
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                time.sleep(left)
            now = time.perf_counter()
            self.tokens += (now - self.last) * self.rate
            self.last = now


class BandwidthEstimator:
    """EWMA of observed throughput (Mbit/s, 10^6 bits) from completed transfers.

    Transfers below ``min_bytes`` are ignored (they measure latency, not bandwidth).
    ``mbps`` is ``initial_mbps`` until the first observation. A sample more than ``jump``
    times away from the estimate (either way) is taken as a change of link and replaces the
    estimate outright, so a step change is tracked after one transfer instead of the several
    an EWMA needs; smaller deviations are smoothed with weight ``alpha``.
    """

    def __init__(self, alpha: float = 0.5, initial_mbps: float = 1000.0, min_bytes: int = 32 << 10,
                 jump: float = 2.0):
        self.alpha, self.mbps, self.min_bytes, self.jump = alpha, float(initial_mbps), min_bytes, jump
        self.samples = 0

    def update(self, nbytes: int, seconds: float) -> float:
        if nbytes >= self.min_bytes and seconds > 0:
            sample = nbytes * 8 / seconds / 1e6
            if self.samples == 0 or not 1 / self.jump <= sample / self.mbps <= self.jump:
                self.mbps = sample
            else:
                self.mbps = self.alpha * sample + (1 - self.alpha) * self.mbps
            self.samples += 1
        return self.mbps


# ------------------------------------------------------------------ framing


def _recv_exact(sock: socket.socket, n: int, what: str, deadline: float | None = None) -> bytes:
    """Read exactly ``n`` bytes. The buffer grows with the bytes that arrive (at most
    :data:`RECV_STEP` ahead of them), never to an announced length up front. With a
    ``deadline`` (``time.monotonic()``), all ``n`` bytes must be in by then."""
    parts: list[bytearray] = []
    got = 0
    while got < n:
        step = min(n - got, RECV_STEP)
        buf = bytearray(step)
        view = memoryview(buf)
        filled = 0
        while filled < step:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"deadline exceeded reading {what} ({got + filled}/{n} bytes)")
                sock.settimeout(left)
            try:
                k = sock.recv_into(view[filled:], step - filled)
            except socket.timeout as exc:
                if deadline is not None and deadline <= time.monotonic():
                    raise DeadlineExceeded(f"deadline exceeded reading {what} ({got + filled}/{n} bytes)") from exc
                raise ConnectionLost(f"timed out reading {what}") from exc
            except OSError as exc:
                raise ConnectionLost(f"connection error reading {what}: {exc}") from exc
            if k == 0:
                if got + filled == 0 and what in ("frame header", "handshake"):
                    raise ConnectionLost("connection closed by peer")
                raise MalformedFrame(f"connection closed mid-frame ({what}: {got + filled}/{n} bytes)")
            filled += k
        parts.append(buf)
        got += step
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


def pack_message(meta: dict, blob: bytes | memoryview = b"") -> list:
    """Payload = u32 JSON length | JSON object | binary blob (returned as parts, no copy)."""
    j = json.dumps(meta, separators=(",", ":")).encode()
    return [struct.pack("<I", len(j)), j, blob]


def unpack_message(payload: bytes) -> tuple[dict, memoryview]:
    mv = memoryview(payload)
    if len(mv) < 4:
        raise MalformedFrame("message shorter than its JSON length field")
    (n,) = struct.unpack_from("<I", mv, 0)
    if 4 + n > len(mv):
        raise MalformedFrame("message JSON length exceeds the payload")
    try:
        meta = json.loads(bytes(mv[4:4 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedFrame("message metadata is not valid JSON (or nested too deeply)") from exc
    if not isinstance(meta, dict):
        raise MalformedFrame("message metadata must be a JSON object")
    return meta, mv[4 + n:]


# ------------------------------------------------------------------ handshake


def _hello(role: bytes) -> bytes:
    return _HELLO.pack(HELLO_MAGIC, VERSION, role, 0, os.urandom(NONCE_SIZE))


def _check_hello(data: bytes, role: bytes) -> None:
    """Validate the peer's hello (``role``: what the peer must be)."""
    if data[:4] == MAGIC and data[4] == 1:  # a version-1 client: it sent a frame header
        raise VersionError(f"peer speaks KV channel version 1; this end speaks version {VERSION} "
                           "(mutual handshake): upgrade the peer")
    if data[:4] != HELLO_MAGIC and data[16:21] == MAGIC + b"\x01":
        # a version-1 server: its 16-byte nonce, then an error frame about our hello
        raise VersionError(f"peer is a KV channel version 1 server; this end speaks version {VERSION} "
                           "(mutual handshake): upgrade the peer")
    magic, version, got_role, flags, _ = _HELLO.unpack(data)
    if magic != HELLO_MAGIC:
        raise MalformedFrame("bad handshake magic (not a kvserve KV channel peer)")
    if version != VERSION:
        raise VersionError(f"peer speaks KV channel version {version}; this end speaks version {VERSION}")
    if got_role != role or flags:
        raise MalformedFrame("bad handshake (role or flags)")


def _session(secret: bytes, hello_c: bytes, hello_s: bytes) -> tuple[bytes, bytes, bytes]:
    """(client proof, server proof, session key) of a handshake transcript."""
    t = hello_c + hello_s

    def prf(label: bytes) -> bytes:
        return hmac.new(secret, _LABEL + label + t, hashlib.sha256).digest()

    return prf(b"client"), prf(b"server"), prf(b"key")


def handshake(sock: socket.socket, secret: bytes, deadline: float, is_client: bool) -> bytes:
    """One end of the handshake on a fresh connection; returns the session key once the peer
    proved it holds the secret for this connection's two nonces. Reads at most
    ``HELLO_SIZE + TAG_SIZE`` bytes before that."""
    me, peer = (b"C", b"S") if is_client else (b"S", b"C")
    mine = _hello(me)
    try:
        sock.sendall(mine)
        theirs = _recv_exact(sock, HELLO_SIZE, "handshake", deadline)
        _check_hello(theirs, peer)
        client_proof, server_proof, key = _session(secret, *((mine, theirs) if is_client else (theirs, mine)))
        sock.sendall(client_proof if is_client else server_proof)
    except OSError as exc:
        raise ConnectionLost(f"connection error in the handshake: {exc}") from exc
    got = _recv_exact(sock, TAG_SIZE, "handshake proof", deadline)
    if not hmac.compare_digest(got, server_proof if is_client else client_proof):
        who = "server's handshake proof does not verify (wrong secret, or not a server holding it)" if is_client \
            else "client's handshake proof does not verify (wrong secret)"
        raise AuthError(f"KV channel authentication failed: the {who}")
    return key


class Channel:
    """One authenticated connection (either end), after the handshake. Not thread-safe.

    ``key`` is the session key from the handshake. The socket's timeout is the idle limit
    while waiting for a frame to begin; from a frame's first byte the whole frame must be in
    within ``frame_timeout + length / min_rate_bps`` seconds."""

    def __init__(self, sock: socket.socket, key: bytes, is_client: bool, max_frame: int = DEFAULT_MAX_FRAME,
                 frame_timeout: float = 60.0, min_rate_bps: float = MIN_RATE_BPS):
        self.sock, self.key, self.max_frame = sock, key, max_frame
        self.frame_timeout, self.min_rate_bps = frame_timeout, min_rate_bps
        self.idle_timeout = sock.gettimeout()
        self.out_dir, self.in_dir = (b"C", b"S") if is_client else (b"S", b"C")
        self.send_seq = 0
        self.recv_seq = 0
        self.bytes_sent = 0
        self.last_recv_s = 0.0

    def _mac(self, direction: bytes):
        return hmac.new(self.key, direction, hashlib.sha256)

    def send(self, ftype: int, parts, pacer: TokenBucket | None = None,
             progress: Callable[[int, float], None] | None = None) -> int:
        """Send one frame made of ``parts`` (bytes-likes); returns the bytes on the wire.

        ``progress(bytes_sent, seconds)`` is called after every chunk; raising
        :class:`TransferAbandoned` from it stops the send (the frame is then unusable: close
        the channel)."""
        if isinstance(parts, (bytes, bytearray, memoryview)):
            parts = [parts]
        views = [memoryview(p).cast("B") for p in parts]
        length = sum(len(v) for v in views)
        header = _HDR.pack(MAGIC, VERSION, ftype, 0, self.send_seq, length)
        mac = self._mac(self.out_dir)
        mac.update(header)
        step = pacer.chunk_size() if pacer else 1 << 20
        if progress is not None:
            step = min(step, CHUNK)  # report often enough to act on
        t0 = time.perf_counter()
        sent = 0
        try:
            self._write(header, pacer)
            for v in views:
                for off in range(0, len(v), step):
                    piece = v[off:off + step]
                    mac.update(piece)
                    self._write(piece, pacer)
                    sent += len(piece)
                    if progress is not None:
                        progress(sent, time.perf_counter() - t0)
            self._write(mac.digest(), pacer)
        except OSError as exc:
            raise ConnectionLost(f"connection error while sending: {exc}") from exc
        self.send_seq += 1
        total = HEADER_SIZE + length + TAG_SIZE
        self.bytes_sent += total
        return total

    def _write(self, data, pacer):
        if pacer is not None:
            pacer.consume(len(data))
        self.sock.sendall(data)

    def recv(self) -> tuple[int, bytes]:
        """Receive one frame; returns ``(type, payload)``. Raises TransportError subclasses."""
        self.sock.settimeout(self.idle_timeout)
        first = _recv_exact(self.sock, 1, "frame header")  # idle wait: the socket's timeout
        deadline = time.monotonic() + self.frame_timeout
        try:
            header = first + _recv_exact(self.sock, HEADER_SIZE - 1, "frame header", deadline)
            magic, version, ftype, flags, seq, length = _HDR.unpack(header)
            if magic != MAGIC:
                raise MalformedFrame("bad frame magic (not a kvserve KV channel peer)")
            if version != VERSION:
                raise VersionError(f"unsupported frame version {version} (this end speaks {VERSION})")
            if flags:
                raise MalformedFrame("unsupported frame flags")
            if length > self.max_frame:
                raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
            deadline += length / self.min_rate_bps
            t0 = time.perf_counter()
            payload = _recv_exact(self.sock, length, "frame payload", deadline)
            tag = _recv_exact(self.sock, TAG_SIZE, "frame tag", deadline)
        finally:
            self.sock.settimeout(self.idle_timeout)
        # header complete -> tag complete: how fast the payload arrived (the link rate for
        # a frame larger than a few chunks, without connect, ack or processing overheads)
        self.last_recv_s = time.perf_counter() - t0
        mac = self._mac(self.in_dir)
        mac.update(header)
        mac.update(payload)
        if not hmac.compare_digest(mac.digest(), tag):
            raise AuthError("frame authentication failed (wrong secret, tampered or replayed frame)")
        if seq != self.recv_seq:
            # the tag was valid, so this is a replay/reorder within the connection
            raise AuthError(f"frame out of sequence (got {seq}, expected {self.recv_seq}): replay rejected")
        self.recv_seq += 1
        if ftype == T_ERROR:
            raise RemoteError(payload.decode("utf-8", "replace"))
        return ftype, payload

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------ server


Handler = Callable[[int, bytes, dict], tuple[int, object]]


class FrameServer:
    """Threaded TCP server: each connection does the handshake, then request frames -> ``handler``.

    ``handler(ftype, payload, info) -> (reply_type, reply_parts)``; an exception that is a
    :class:`KVServeError` is answered with an error frame and the connection stays open; a
    protocol error (bad frame) closes that connection only. ``info`` carries the peer address
    and the ``Channel`` (so a handler can time its receive). Listens on loopback by default.

    Limits: ``max_connections`` connections at once (more are closed at accept,
    ``refused`` counts them); ``max_pending`` of them still in the handshake (a new one
    drops the oldest); ``handshake_timeout`` seconds for a whole handshake (at most
    ``io_timeout``); ``io_timeout``
    idle seconds between frames and, from a frame's first byte, ``io_timeout + length /
    min_rate_bps`` for the whole frame. ``rejected`` keeps the last 1000 rejections.
    """

    def __init__(self, handler: Handler, secret: bytes | str | None = None, host: str = "127.0.0.1",
                 port: int = 0, max_frame: int = DEFAULT_MAX_FRAME, io_timeout: float = 60.0,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                 max_pending: int = MAX_PENDING, min_rate_bps: float = MIN_RATE_BPS):
        self.handler, self.secret, self.max_frame, self.io_timeout = handler, shared_secret(secret), max_frame, io_timeout
        self.handshake_timeout, self.min_rate_bps = handshake_timeout, min_rate_bps
        self.max_connections, self.max_pending = max_connections, max(1, min(max_pending, max_connections))
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self.rejected: deque[str] = deque(maxlen=1000)  # one line per rejected frame / connection
        self.served = 0
        self.refused = 0  # connections closed at accept (connection limit)
        self.evicted = 0  # handshakes dropped for newer connections (pending limit)
        self._active = 0
        self._pending: dict[int, socket.socket] = {}  # insertion order = age
        self._ids = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def connections(self) -> int:
        """Connections being served now (handshaking or authenticated)."""
        with self._lock:
            return self._active

    def start(self) -> "FrameServer":
        self._thread = threading.Thread(target=self._accept_loop, name="kvserve-frame-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._accept_loop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with self._lock:
                full = self._active >= self.max_connections
                if full:
                    self.refused += 1
                else:
                    self._active += 1
                    self._ids += 1
                    cid = self._ids
                    if len(self._pending) >= self.max_pending:  # drop the oldest handshake
                        old = self._pending.pop(next(iter(self._pending)))
                        self.evicted += 1
                        _shutdown(old)
                    self._pending[cid] = conn
            if full:
                self._reject(addr, TransportError(f"connection limit ({self.max_connections}) reached"))
                _shutdown(conn)
                conn.close()
                continue
            threading.Thread(target=self._serve_conn, args=(conn, addr, cid), daemon=True).start()

    def _reject(self, addr, exc):
        with self._lock:
            self.rejected.append(f"{addr[0]}:{addr[1]}: {type(exc).__name__}: {exc}")

    def _serve_conn(self, conn: socket.socket, addr, cid: int):
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            limit = min(self.handshake_timeout, self.io_timeout)
            conn.settimeout(limit)
            key = handshake(conn, self.secret, time.monotonic() + limit, is_client=False)
        except (TransportError, OSError) as exc:
            with self._lock:
                evicted = self._pending.pop(cid, None) is None
                self._active -= 1
            if not (isinstance(exc, ConnectionLost) and not isinstance(exc, DeadlineExceeded)):
                self._reject(addr, exc)
            elif evicted:
                self._reject(addr, DeadlineExceeded("handshake dropped for a newer connection (pending limit)"))
            conn.close()
            return
        with self._lock:
            self._pending.pop(cid, None)
        conn.settimeout(self.io_timeout)
        ch = Channel(conn, key, is_client=False, max_frame=self.max_frame, frame_timeout=self.io_timeout,
                     min_rate_bps=self.min_rate_bps)
        try:
            while not self._stop.is_set():
                try:
                    ftype, payload = ch.recv()
                except DeadlineExceeded as exc:
                    self._reject(addr, exc)
                    break
                except ConnectionLost:
                    break
                except TransportError as exc:  # bad frame: tell the peer if possible, drop the connection
                    self._reject(addr, exc)
                    try:
                        ch.send(T_ERROR, str(exc).encode())
                    except TransportError:
                        pass
                    break
                try:
                    rtype, parts = self.handler(ftype, payload, {"peer": addr, "channel": ch})
                except KVServeError as exc:
                    ch.send(T_ERROR, f"{type(exc).__name__}: {exc}".encode())
                    continue
                except Exception as exc:  # handler bug: report, keep the server alive
                    self._reject(addr, exc)
                    ch.send(T_ERROR, f"internal error: {type(exc).__name__}: {exc}".encode())
                    continue
                ch.send(rtype, parts)
                with self._lock:
                    self.served += 1
        except TransportError:
            pass
        except OSError:
            pass
        finally:
            ch.close()
            with self._lock:
                self._active -= 1


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ------------------------------------------------------------------ client


@dataclass
class TransferStats:
    attempts: int = 0
    bytes_sent: int = 0
    send_s: float = 0.0  # first header byte to last tag byte handed to the kernel
    total_s: float = 0.0  # request sent .. reply received (last attempt)
    errors: list = field(default_factory=list)


def connect(address, secret: bytes | str | None = None, timeout: float = 30.0,
            max_frame: int = DEFAULT_MAX_FRAME, min_rate_bps: float = MIN_RATE_BPS) -> Channel:
    """Connect and run the handshake (within ``timeout``); returns the client's Channel."""
    secret = shared_secret(secret)
    try:
        sock = socket.create_connection(tuple(address), timeout=timeout)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {address[0]}:{address[1]}: {exc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = handshake(sock, secret, time.monotonic() + timeout, is_client=True)
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return Channel(sock, key, is_client=True, max_frame=max_frame, frame_timeout=timeout, min_rate_bps=min_rate_bps)


class FrameClient:
    """Request/reply client with reconnects and bounded retries.

    ``request(type, parts, pacer)`` sends one frame and waits for the reply frame. On a
    dropped connection or I/O timeout it reconnects and resends, up to ``retries`` more
    times with exponential backoff, then raises :class:`ConnectionLost`. A
    :class:`RemoteError` (the server rejected the request), an :class:`AuthError` (the
    handshake or the reply does not authenticate: wrong secret) or a :class:`VersionError`
    is not retried.
    """

    def __init__(self, address, secret: bytes | str | None = None, retries: int = 2, timeout: float = 30.0,
                 backoff: float = 0.05, max_frame: int = DEFAULT_MAX_FRAME):
        self.address, self.secret = tuple(address), shared_secret(secret)
        self.retries, self.timeout, self.backoff, self.max_frame = retries, timeout, backoff, max_frame
        self.ch: Channel | None = None
        self.stats = TransferStats()

    def close(self):
        if self.ch is not None:
            self.ch.close()
            self.ch = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, ftype: int, parts, pacer: TokenBucket | None = None,
                progress: Callable[[int, float], None] | None = None) -> tuple[int, bytes]:
        """Send a frame, retrying on connection errors, and return the reply frame.
        ``progress``: see :meth:`Channel.send`; :class:`TransferAbandoned` is not retried."""
        st = self.stats = TransferStats()
        for attempt in range(self.retries + 1):
            st.attempts = attempt + 1
            try:
                if self.ch is None:
                    self.ch = connect(self.address, self.secret, self.timeout, self.max_frame)
                t0 = time.perf_counter()
                try:
                    st.bytes_sent = self.ch.send(ftype, parts, pacer, progress)
                except ConnectionLost:
                    self._raise_pending_error()
                    raise
                t1 = time.perf_counter()
                reply = self.ch.recv()
                st.send_s, st.total_s = t1 - t0, time.perf_counter() - t0
                return reply
            except (RemoteError, AuthError, VersionError, TransferAbandoned):
                self.close()
                raise
            except (TransportError, OSError) as exc:
                st.errors.append(f"{type(exc).__name__}: {exc}")
                self.close()
                if attempt == self.retries:
                    raise ConnectionLost(f"{self.address[0]}:{self.address[1]}: gave up after "
                                         f"{attempt + 1} attempt(s): {st.errors[-1]}") from exc
                time.sleep(self.backoff * (2 ** attempt))
        raise AssertionError("unreachable")

    def _raise_pending_error(self):
        """After a failed send: if the server explained why (an error frame, e.g. the frame
        was too large), raise that instead of a bare broken pipe."""
        try:
            self.ch.sock.settimeout(0.5)
            self.ch.idle_timeout = 0.5
            self.ch.recv()
        except RemoteError:
            self.close()
            raise
        except (TransportError, OSError):
            pass

    def call(self, ftype: int, meta: dict, blob=b"", pacer: TokenBucket | None = None,
             progress: Callable[[int, float], None] | None = None) -> tuple[dict, memoryview]:
        """``request`` with a JSON+blob message each way (see :func:`pack_message`)."""
        _, payload = self.request(ftype, pack_message(meta, blob), pacer, progress)
        return unpack_message(payload)
