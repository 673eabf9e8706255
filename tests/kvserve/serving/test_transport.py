"""KV channel: framing, HMAC, replay, oversize/malformed frames, server survival, pacing, retries."""
from __future__ import annotations

import socket
import struct
import time

import pytest

from kvserve import KVServeError
from kvserve.serving import transport as tp

SECRET = b"0123456789abcdef-test-secret"


def echo(ftype, payload, info):
    if ftype == 9:
        raise KVServeError("handler says no")
    return ftype, payload


@pytest.fixture
def server():
    with tp.FrameServer(echo, SECRET, max_frame=1 << 20, io_timeout=5) as s:
        yield s


def test_roundtrip_and_message(server):
    with tp.FrameClient(server.address, SECRET) as c:
        assert c.request(3, b"hello") == (3, b"hello")
        meta, blob = c.call(4, {"a": 1}, b"\x00\x01" * 1000)
        assert meta == {"a": 1} and bytes(blob) == b"\x00\x01" * 1000
        assert c.request(5, b"") == (5, b"")
    assert server.address[0] == "127.0.0.1"  # loopback by default


def test_handler_error_is_reported_and_connection_survives(server):
    with tp.FrameClient(server.address, SECRET) as c:
        with pytest.raises(tp.RemoteError, match="handler says no"):
            c.request(9, b"x")
        assert c.request(3, b"still here") == (3, b"still here")


def _raw(server):
    """An authenticated connection whose frames the test writes by hand (``ch.key``)."""
    return tp.connect(server.address, SECRET, timeout=5)


def _frame(key, ftype, seq, payload, direction=b"C", length=None):
    import hashlib
    import hmac

    hdr = tp._HDR.pack(tp.MAGIC, tp.VERSION, ftype, 0, seq, len(payload) if length is None else length)
    tag = hmac.new(key, direction + hdr + payload, hashlib.sha256).digest()
    return hdr + payload + tag


def _expect_rejected(server, data, match):
    ch = _raw(server)
    ch.sock.sendall(data(ch.key) if callable(data) else data)
    with pytest.raises(tp.RemoteError, match=match):
        ch.recv()
    ch.close()
    # the server keeps serving
    with tp.FrameClient(server.address, SECRET) as c:
        assert c.request(1, b"ok") == (1, b"ok")


def test_wrong_secret_rejected(server):
    _expect_rejected(server, lambda k: _frame(b"another-key-of-32-bytes-.......!", 1, 0, b"hi"), "authentication failed")
    assert any("AuthError" in r for r in server.rejected)


def test_client_with_wrong_secret_gets_clear_error(server):
    with tp.FrameClient(server.address, b"wrong-secret-but-long-enough", retries=0) as c:
        # the server's error frame does not authenticate under the wrong secret either
        with pytest.raises(tp.AuthError, match="authentication failed"):
            c.request(1, b"x")
    deadline = time.monotonic() + 2  # the server notes it on its own thread
    while not any("AuthError" in r for r in server.rejected) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any("AuthError" in r for r in server.rejected)


def test_tampered_payload_rejected(server):
    def data(k):
        f = bytearray(_frame(k, 1, 0, b"payload"))
        f[tp.HEADER_SIZE] ^= 1
        return bytes(f)
    _expect_rejected(server, data, "authentication failed")


def test_replay_on_new_connection_rejected(server):
    ch = _raw(server)
    f = _frame(ch.key, 1, 0, b"once")
    ch.sock.sendall(f)
    assert ch.recv() == (1, b"once")
    # same bytes again on the same connection: sequence check
    ch.sock.sendall(f)
    with pytest.raises(tp.RemoteError, match="out of sequence"):
        ch.recv()
    ch.close()
    # same bytes on a new connection: new nonces, new session key -> tag mismatch
    _expect_rejected(server, f, "authentication failed")


def test_oversize_rejected_before_payload(server):
    # declares 2 MiB against a 1 MiB limit and sends no payload at all: rejected at once
    t0 = time.perf_counter()
    _expect_rejected(server, lambda k: tp._HDR.pack(tp.MAGIC, tp.VERSION, 1, 0, 0, 2 << 20), "exceeds the limit")
    assert time.perf_counter() - t0 < 3
    assert any("FrameTooLarge" in r for r in server.rejected)


@pytest.mark.parametrize("data,match", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad frame magic"),
    (tp._HDR.pack(tp.MAGIC, 7, 1, 0, 0, 0), "unsupported frame version"),
    (tp._HDR.pack(tp.MAGIC, tp.VERSION, 1, 3, 0, 0), "flags"),
])
def test_malformed_rejected(server, data, match):
    _expect_rejected(server, data, match)


def test_truncated_frame_then_server_alive(server):
    ch = _raw(server)
    f = _frame(ch.key, 1, 0, b"x" * 5000)
    ch.sock.sendall(f[:3000])
    ch.close()
    time.sleep(0.1)
    with tp.FrameClient(server.address, SECRET) as c:
        assert c.request(1, b"ok") == (1, b"ok")
    assert any("mid-frame" in r for r in server.rejected)


def test_garbage_fuzz_does_not_stop_server(server):
    import random

    rng = random.Random(0)
    for i in range(30):
        s = socket.create_connection(server.address, timeout=5)
        n = rng.randint(1, 200)
        s.sendall(bytes(rng.getrandbits(8) for _ in range(n)))
        s.close()
    with tp.FrameClient(server.address, SECRET) as c:
        assert c.request(1, b"ok") == (1, b"ok")


def test_malformed_message_json():
    with pytest.raises(tp.MalformedFrame):
        tp.unpack_message(b"\xff\xff\x00\x00{}")
    with pytest.raises(tp.MalformedFrame):
        tp.unpack_message(struct.pack("<I", 2) + b"[]")
    assert issubclass(tp.MalformedFrame, KVServeError)


def test_secret_required():
    with pytest.raises(tp.TransportError, match="secret"):
        tp.FrameServer(echo, b"short")


def test_client_sees_oversize_reason(server):
    with tp.FrameClient(server.address, SECRET, retries=2) as c:
        with pytest.raises(tp.RemoteError, match="exceeds the limit"):
            c.request(1, b"z" * (4 << 20))


@pytest.mark.parametrize("mbps", [8, 40])
def test_pacing_accuracy(mbps):
    payload = b"\x00" * int(mbps * 1e6 / 8 * 0.5)  # 0.5 s worth
    with tp.FrameServer(echo, SECRET) as srv, tp.FrameClient(srv.address, SECRET) as c:
        c.request(1, b"warm")
        t0 = time.perf_counter()
        c.request(1, payload, tp.TokenBucket(mbps * 1e6 / 8))
        dt = time.perf_counter() - t0
    measured = len(payload) * 8 / dt / 1e6
    assert abs(measured - mbps) / mbps < 0.10, measured


def test_bandwidth_estimator():
    est = tp.BandwidthEstimator(alpha=0.5, initial_mbps=100)
    assert est.mbps == 100
    est.update(100, 1.0)  # too small to count
    assert est.samples == 0
    est.update(10_000_000, 1.0)  # 80 Mbps
    assert est.mbps == pytest.approx(80)
    est.update(10_000_000, 0.8)  # 100 -> ewma 90
    assert est.mbps == pytest.approx(90)
    est.update(10_000_000, 8.0)  # 10: a step change (> 2x) replaces the estimate
    assert est.mbps == pytest.approx(10)


def test_retry_after_dropped_connection():
    """A relay that kills the first connection mid-transfer: the client reconnects and succeeds."""
    from kvserve_servers import Relay

    with tp.FrameServer(echo, SECRET) as srv, Relay(srv.address, drop_after=20_000, drops=1) as relay:
        with tp.FrameClient(relay.address, SECRET, retries=2) as c:
            assert c.request(1, b"y" * 100_000) == (1, b"y" * 100_000)
            assert c.stats.attempts == 2 and c.stats.errors
        with tp.FrameClient(relay.address, SECRET, retries=1) as c:
            relay.drops = 10
            with pytest.raises(tp.ConnectionLost, match="gave up after 2"):
                c.request(1, b"y" * 100_000)


def test_abandoned_send_is_not_retried_and_server_survives(server):
    """A progress callback that gives up mid-frame stops the send at once (no retry: the
    caller wants to send something else); the server drops the truncated frame."""
    calls = []

    def progress(sent, seconds):
        calls.append((sent, seconds))
        if sent >= 128 << 10:
            raise tp.TransferAbandoned("enough", sent, seconds)

    blob = b"\x07" * (600 << 10)
    with tp.FrameClient(server.address, SECRET, retries=3) as c:
        with pytest.raises(tp.TransferAbandoned) as ei:
            c.request(3, blob, progress=progress)
        assert c.stats.attempts == 1 and c.ch is None  # closed, not retried
        assert ei.value.sent == 128 << 10 and ei.value.seconds >= 0
        assert [s for s, _ in calls] == [64 << 10, 128 << 10]  # reported per 64 KiB chunk
        assert c.request(3, b"after") == (3, b"after")  # a fresh connection works
    with tp.FrameClient(server.address, SECRET) as c:  # and the server still serves others
        meta, got = c.call(4, {"n": 1}, blob, progress=lambda s, t: None)
        assert meta == {"n": 1} and bytes(got) == blob
