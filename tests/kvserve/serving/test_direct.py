"""Direct transfer's pieces on a real loopback KV channel (kvserve.serving.direct, push.channel_sender):
the consumer's bounded inbox, the receiver's checks, and the producer's push (decide, encode,
send, observe, re-plan mid-transfer) into it. The vLLM connector on top of these is tested
in test_vllm_connector.py."""
from __future__ import annotations

import pytest

import kvserve
from kvserve import KVServeError
from kvserve.controller import Controller
from kvserve.library import load_library
from kvserve.serving import direct
from kvserve.serving import transport as tp
from kvserve.serving.push import Pusher, channel_sender
from kvserve_test_common import make_kv

SECRET = b"direct-test-secret-0123456789abcdef"
KV = make_kv(layers=4, heads=3, tokens=256, dim=64, seed=7)


def _accept_all(key, header):
    if header["meta"].get("refuse"):
        raise KVServeError("refused by the check")


@pytest.fixture
def receiver():
    inbox = direct.Inbox(64 << 20)
    with direct.BundleReceiver(inbox, _accept_all, SECRET) as rx:
        yield rx


def _send(rx, key, blob, secret=SECRET):
    with tp.FrameClient(rx.address, secret, retries=0, timeout=10) as c:
        return c.call(direct.T_BUNDLE, {"key": key}, blob)[0]


def test_inbox_bounds_and_order(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(direct.time, "monotonic", lambda: now[0])
    box = direct.Inbox(100, ttl_s=10, max_entries=3)
    box.put("a", b"x" * 40)
    box.put("b", b"y" * 40)
    box.put("c", b"z" * 30)  # 110 bytes: the oldest goes
    assert box.get("a") is None and box.get("b") == b"y" * 40 and box.nbytes == 70
    box.put("b", b"w" * 10)  # replaced, moves to the end
    box.put("d", b"1")
    box.put("e", b"2")  # four entries: over max_entries, the oldest ("c") goes
    assert [k for k in ("b", "c", "d", "e") if box.exists(k)] == ["b", "d", "e"]
    assert box.stats["evicted"] == 2 and box.stats["replaced"] == 1
    with pytest.raises(KVServeError, match="capacity"):
        box.put("big", b"x" * 101)
    assert box.pop("d") == b"1" and box.pop("d") is None and box.stats["taken"] == 1
    now[0] += 11  # every entry is older than the ttl
    assert box.get("b") is None and len(box) == 0 and box.nbytes == 0 and box.stats["expired"] == 2
    with pytest.raises(KVServeError):
        direct.Inbox(0)


def test_receiver_keeps_checked_bundles_only(receiver):
    blob = kvserve.encode(KV, "kivi-4", meta={"seq_len": 256})
    ack = _send(receiver, "u1.tp0-1.pp0-1", blob)
    assert ack["bytes"] == len(blob) and ack["recv_ms"] >= 0
    assert receiver.inbox.get("u1.tp0-1.pp0-1") == blob
    assert _send(receiver, "u2.tp0-1.pp0-1", blob)["bytes"] == len(blob)
    refusals = {
        "../x": blob,  # not a store key
        "u3.tp0-1.pp0-1": blob[:-1] + bytes([blob[-1] ^ 1]),  # CRC
        "u4.tp0-1.pp0-1": kvserve.encode(KV, "bf16", meta={"refuse": True}),  # the check says no
        "u5.tp0-1.pp0-1": b"not a bundle",
    }
    for key, bad in refusals.items():
        with pytest.raises(tp.RemoteError):
            _send(receiver, key, bad)
    assert receiver.refused == len(refusals)
    assert set(receiver.inbox._items) == {"u1.tp0-1.pp0-1", "u2.tp0-1.pp0-1"}
    with pytest.raises(tp.AuthError):  # no secret: not a byte of the frame is read
        _send(receiver, "u6.tp0-1.pp0-1", blob, secret=b"another-secret-0123456789abcdef")
    with tp.FrameClient(receiver.address, SECRET, retries=0) as c:
        assert c.call(direct.T_PING, {})[0] == {"role": "kvserve-direct", "entries": 2}
        with pytest.raises(tp.RemoteError, match="unexpected message type"):
            c.call(9, {})


def test_receiver_frame_limit():
    inbox = direct.Inbox(1 << 20)
    with direct.BundleReceiver(inbox, _accept_all, SECRET, max_frame=4096) as rx:
        with pytest.raises((tp.RemoteError, tp.ConnectionLost)):
            _send(rx, "u1.tp0-1.pp0-1", kvserve.encode(KV, "bf16"))
        assert len(inbox) == 0
    with pytest.raises(tp.TransportError, match="cannot listen"):
        with direct.BundleReceiver(inbox, _accept_all, SECRET) as rx:
            direct.BundleReceiver(inbox, _accept_all, SECRET, port=rx.address[1])


def test_push_over_the_channel_feeds_the_estimator(receiver):
    p = Pusher(threads=1)
    send = channel_sender(receiver.address, SECRET, direct.T_BUNDLE, {"key": "u7.tp0-1.pp0-1"}, retries=0)
    res = p.push(KV, "bf16", {"seq_len": 256}, send)
    assert res["ok"] and res["attempts"] == 1 and res["transfer_ms"] > 0
    kv2, meta = kvserve.decode(receiver.inbox.get("u7.tp0-1.pp0-1"))
    assert meta == {"seq_len": 256} and all(a.equal(b) for (k, v), (k2, v2) in zip(KV, kv2) for a, b in ((k, k2), (v, v2)))
    # a bundle of 256 KiB and more: the sample is the payload's arrival time at the receiver
    assert p.estimator.samples == 1 and res["bandwidth_sample_mbps"] == pytest.approx(p.estimator.mbps)
    # a refused bundle is a failed push, reported, never raised
    bad = channel_sender(receiver.address, SECRET, direct.T_BUNDLE, {"key": "u8.tp0-1.pp0-1"}, retries=0)
    res = p.push(KV, "bf16", {"refuse": True}, bad)
    assert not res["ok"] and "refused by the check" in res["error"]
    # nobody listening: a failed push too
    with tp.FrameServer(lambda *a: None, SECRET) as gone:
        addr = gone.address
    res = p.push(KV, "kivi-2", {}, channel_sender(addr, SECRET, direct.T_BUNDLE, {"key": "u9.tp0-1.pp0-1"},
                                                  retries=1, timeout=2))
    assert not res["ok"] and res["attempts"] == 2 and "ConnectionLost" in res["error"]


def test_push_replans_on_a_slow_link(receiver):
    """The controller assumed 10 Gbps; the paced link gives 2 Mbps: the first bundle is
    abandoned part-way (the receiver drops the truncated frame), a smaller one chosen at the
    observed rate arrives instead."""
    p = Pusher(Controller(load_library(), min_quality=97.0, epsilon=0.0), threads=1)
    send = channel_sender(receiver.address, SECRET, direct.T_BUNDLE, {"key": "u10.tp0-1.pp0-1"}, link_mbps=2.0,
                          retries=0)
    res = p.push(KV, None, {"seq_len": 256}, send, bandwidth_mbps=1e4)
    assert res["ok"] and res["replanned"]["from"] == "bf16" and res["profile"] != "bf16"
    assert 0.5 < res["replanned"]["observed_mbps"] < 2.5  # paced at 2 Mbps (less on a loaded machine)
    got = receiver.inbox.get("u10.tp0-1.pp0-1")
    assert len(got) == res["kv_bytes"] < res["replanned"]["abandoned_bytes"]
    assert kvserve.pipeline.parse_header(got)[0]["profile"]["name"] == res["profile"]
    assert any("closed mid-frame" in r for r in receiver.server.rejected)
