"""Fault injection for the KV channel: a loopback relay that drops connections mid-transfer."""
from __future__ import annotations

import socket
import threading


class DroppingRelay:
    """TCP relay to ``target`` that resets the next ``drops`` connections after
    ``drop_after`` client->server bytes (a link dying mid-transfer); later connections pass.
    ``drops`` may be changed while it runs; ``dropped`` counts the connections killed."""

    def __init__(self, target, drop_after: int, drops: int = 1, host: str = "127.0.0.1"):
        self.target, self.drop_after, self.drops = tuple(target), drop_after, drops
        self.dropped = 0
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
            with self._lock:
                kill = self.dropped < self.drops
                if kill:
                    self.dropped += 1
            threading.Thread(target=self._pump, args=(c, s, self.drop_after if kill else None), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, None), daemon=True).start()

    @staticmethod
    def _pump(src, dst, limit):
        sent = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[:max(0, limit - sent)])
                    # reset both ends, as a dying link or crashed peer would
                    for sk in (src, dst):
                        sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sk in (src, dst):
                try:
                    sk.close()
                except OSError:
                    pass
