"""The push sequence (decide, encode, send, observe, re-plan) with send functions that
record what they were given; the real channel behind it is covered by test_pd_engine.py."""
from __future__ import annotations

import pytest

import kvserve
from kvserve.controller import Controller
from kvserve.library import load_library
from kvserve.serving import transport as tp
from kvserve.serving.push import Pusher, SendFailed, Sent, resolve_compression
from kvserve_test_common import make_kv

KV = make_kv(layers=4, heads=3, tokens=256, dim=64, seed=5)


def test_fixed_profile_is_encoded_sent_and_reported():
    sent = []
    p = Pusher(threads=1)
    res = p.push(KV, "bf16", {"seq_len": 256}, lambda blob, progress: sent.append(blob) or
                 Sent(12.5, sample_mbps=800.0, sample_s=len(blob) * 8 / 800e6, remote_decode_ms=1.0,
                      extra={"attempts": 1}))
    kv2, meta = kvserve.decode(sent[0])
    assert meta == {"seq_len": 256} and all(a.equal(b) for (k, v), (k2, v2) in zip(KV, kv2) for a, b in ((k, k2), (v, v2)))
    assert res["ok"] and res["profile"] == "bf16" and res["kv_bytes"] == len(sent[0]) and res["attempts"] == 1
    assert res["transfer_ms"] == 12.5 and res["remote_decode_ms"] == 1.0 and "decision" not in res
    assert p.estimator.samples == 1 and p.estimator.mbps == pytest.approx(800.0)


def test_controller_decides_and_learns_once_per_push():
    ctl = Controller(load_library(), min_quality=97.0, epsilon=0.0)
    p = Pusher(ctl, threads=1)
    res = p.push(KV, None, {}, lambda blob, progress: Sent(50.0, sample_mbps=10.0, remote_decode_ms=5.0),
                 bandwidth_mbps=10.0)
    assert res["ok"] and res["decision"]["bandwidth_est_mbps"] == 10.0
    assert res["profile"] != "bf16" and res["raw_bytes"] / res["kv_bytes"] > 2  # 10 Mbps: compress
    assert ctl.stats[res["profile"]].n == 1 and sum(st.n for st in ctl.stats.values()) == 1
    # a very fast link: bf16 (a controller that has not learnt from the fake timings above)
    fresh = Pusher(Controller(load_library(), min_quality=97.0, epsilon=0.0))
    assert fresh.decide(res["raw_bytes"], 1e7).profile == "bf16"


def test_a_slow_transfer_is_abandoned_and_replanned():
    """The decision assumed 10 Gbps; the first bundle crawls at ~1 Mbps: the watch abandons it
    and the push sends a smaller bundle chosen at the observed rate."""
    ctl = Controller(load_library(), min_quality=97.0, epsilon=0.0)
    p = Pusher(ctl, threads=1)
    sizes = []

    def send(blob, progress):
        sizes.append(len(blob))
        if progress is not None:
            for k in range(1, 50):  # 64 KiB chunks at 1 Mbps
                progress(k * 65536, k * 65536 * 8 / 1e6)
        return Sent(10.0)

    res = p.push(KV, None, {}, send, bandwidth_mbps=1e4)
    assert res["ok"] and len(sizes) == 2 and sizes[1] < sizes[0]
    assert res["replanned"]["from"] == "bf16" and res["replanned"]["to"] == res["profile"] != "bf16"
    assert res["replanned"]["observed_mbps"] == pytest.approx(1.0, rel=0.01)
    assert res["decision"]["reason"].startswith("replanned: ")


def test_transport_failure_is_reported_not_raised():
    def send(blob, progress):
        raise SendFailed("ConnectionLost: peer went away", attempts=3, retry_errors=["a", "b"])

    res = Pusher(threads=1).push(KV, "kivi-2", {}, send)
    assert not res["ok"] and "peer went away" in res["error"] and res["attempts"] == 3
    with pytest.raises(ValueError):  # only transport errors are turned into results
        Pusher(threads=1).push(KV, "bf16", {}, lambda b, p: (_ for _ in ()).throw(ValueError("bug")))


def test_compression_settings():
    assert resolve_compression(None)[0] == "fixed" and resolve_compression(None)[1]["name"] == "kvserve"
    mode, s = resolve_compression({"mode": "controller", "bandwidth_mbps": 100})
    assert mode == "controller" and s["bandwidth_mbps"] == 100
    for bad in ({"mode": "controller"}, {"mode": "controller", "bandwidth_mbps": True},
                {"mode": "controller", "bandwidth_mbps": 1, "nope": 1}, 42, "no-such-profile"):
        with pytest.raises(kvserve.KVServeError):
            resolve_compression(bad)
    with pytest.raises(kvserve.KVServeError, match="no controller"):
        Pusher().push(KV, None, {}, lambda b, p: Sent(1.0))
    assert isinstance(SendFailed("x"), tp.TransportError)
