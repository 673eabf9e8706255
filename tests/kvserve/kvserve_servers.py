"""Servers and links for the kvserve tests and benchmarks (not part of the library).

* :class:`Relay` - a loopback TCP relay in front of any service: it paces the server->client
  direction with the KV channel's token bucket (a remote store or link at a given
  bandwidth), and/or resets the next ``drops`` connections after ``drop_after``
  client->server bytes (a link dying mid-transfer).
* :class:`RedisServer` - a throwaway ``redis-server`` on a free loopback port, with a random
  password (``url`` carries it: ``redis://:<password>@127.0.0.1:<port>``).

Tests get this module as ``kvserve_servers`` (tests/kvserve/conftest.py puts this folder on
``sys.path``); benchmarks insert the folder themselves.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

from kvserve.errors import KVServeError
from kvserve.serving.transport import TokenBucket

_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends RST


class Relay:
    """TCP relay on loopback to ``target``.

    ``rate_bps``: bytes/s for the server->client direction (None: unpaced; may be changed
    while it runs). ``drop_after``/``drops``: the next ``drops`` connections are reset after
    ``drop_after`` client->server bytes; later ones pass (``drops`` may be changed while it
    runs; ``dropped`` counts the connections killed)."""

    def __init__(self, target, rate_bps: float | None = None, drop_after: int | None = None, drops: int = 0,
                 host: str = "127.0.0.1"):
        self.target, self.rate = tuple(target), rate_bps
        self.drop_after, self.drops, self.dropped = drop_after, drops, 0
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _loop(self):
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            try:
                s = socket.create_connection(self.target, timeout=10)
            except OSError:
                c.close()
                continue
            for sk in (c, s):
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                kill = self.drop_after is not None and self.dropped < self.drops
                if kill:
                    self.dropped += 1
            threading.Thread(target=self._pump, args=(c, s, self.drop_after if kill else None, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, None, True), daemon=True).start()

    def _pump(self, src, dst, limit, paced):
        bucket = TokenBucket(self.rate) if paced and self.rate else None
        sent = 0
        try:
            while not self._stop.is_set():
                if bucket is not None and bucket.rate != self.rate:
                    bucket.set_rate(self.rate)
                data = src.recv(bucket.chunk_size() if bucket else 1 << 16)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[:max(0, limit - sent)])
                    for sk in (src, dst):  # reset both ends, as a dying link or crashed peer would
                        sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                    break
                if bucket is not None:
                    bucket.consume(len(data))
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sk in (src, dst):
                try:
                    sk.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    sk.close()
                except OSError:
                    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port (no persistence, own temp dir,
    a random password)."""

    def __init__(self, binary: str | None = None):
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.password = os.urandom(16).hex()
        self.proc = None
        self.port = None
        self.dir = None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if not os.path.exists(self.binary):
            raise KVServeError("redis-server is not installed (apt-get install redis-server; see scripts/setup.sh)")
        self.dir = tempfile.mkdtemp(prefix="kvserve-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir, "--protected-mode", "yes",
                                      "--proto-max-bulk-len", "1gb", "--requirepass", self.password],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"AUTH " + self.password.encode() + b"\r\nPING\r\n")
                    reply = b""
                    while b"PONG" not in reply and len(reply) < 64:
                        chunk = s.recv(64)
                        if not chunk:
                            break
                        reply += chunk
                    if b"+OK" in reply and b"+PONG" in reply:
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

    @property
    def url(self) -> str:
        return self.url_at(self.address)

    def url_at(self, address) -> str:
        """The URL (with the password) of this server reached at ``address`` (e.g. a relay)."""
        return f"redis://:{self.password}@{address[0]}:{address[1]}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
