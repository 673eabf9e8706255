"""End to end: prefill and decode workers as separate processes running SmolLM2 (bf16).

One cluster and one reference model per test module (start-up is the expensive part)."""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("transformers")
from kvserve import models  # noqa: E402
from kvserve.serving import engine  # noqa: E402
from kvserve.serving import transport as tp  # noqa: E402
from kvserve_servers import Relay  # noqa: E402

pytestmark = pytest.mark.slow
MAX_NEW = 5


@pytest.fixture(scope="module")
def ref_model(serving_model):
    return serving_model


@pytest.fixture(scope="module")
def cluster(ref_model):
    with engine.PDCluster(threads=1, retries=2) as pd:
        yield pd


@pytest.fixture(scope="module")
def prompts(ref_model):
    model, tok = ref_model
    ps = models.sotu_prompts(tok, [40, 150])
    return [(ids, models.generate_local(model, ids, MAX_NEW)) for ids in ps]


@pytest.mark.parametrize("mode", ["bf16", "bf16-enec"])
def test_lossless_pd_matches_single_process(cluster, prompts, mode):
    for ids, ref in prompts:
        r = cluster.generate(ids, MAX_NEW, mode, link_mbps=500)
        assert not r.fallback, r.breakdown
        assert r.tokens == ref
        assert r.profile == mode and r.attempts == 1
        assert r.raw_bytes == len(ids) * 30 * 2 * 3 * 64 * 2
        assert 0 < r.ttft_ms <= r.jct_ms
        if mode == "bf16-enec":
            assert r.kv_bytes < 0.8 * r.raw_bytes


def test_lossy_profile_runs_and_is_smaller(cluster, prompts):
    ids, ref = prompts[1]
    r = cluster.generate(ids, MAX_NEW, "kvserve", link_mbps=100)
    assert not r.fallback and len(r.tokens) == MAX_NEW
    assert r.tokens[0] == ref[0]  # the first token comes from the (exact) prefill
    assert r.raw_bytes / r.kv_bytes > 5


def test_adaptive_mode(cluster, prompts):
    ids, _ = prompts[1]
    r = cluster.generate(ids, MAX_NEW, "adaptive", link_mbps=50)
    if "library" in r.breakdown.get("error", ""):
        pytest.skip("controller's profile library not installed yet: " + r.breakdown["error"])
    assert not r.fallback, r.breakdown
    assert r.breakdown["decision"]["profile"] == r.profile
    st = cluster.stats("prefill")
    assert st["samples"] >= 1 and st["bandwidth_mbps"] > 0


def test_adaptive_replans_when_the_link_is_slower_than_estimated(cluster, prompts):
    """The worker's estimate says fast (a request at 10 Gbps), then the link drops to 2 Mbps:
    the adaptive transfer is abandoned part-way and a smaller bundle sent instead, far sooner
    than the first bundle would have arrived; the decode worker drops the truncated frame."""
    ids, _ = prompts[1]
    first = cluster.generate(ids, MAX_NEW, "adaptive", link_mbps=10_000)
    if "library" in first.breakdown.get("error", ""):
        pytest.skip("controller's profile library not installed yet: " + first.breakdown["error"])
    assert cluster.stats("prefill")["bandwidth_mbps"] > 100
    r = cluster.generate(ids, MAX_NEW, "adaptive", link_mbps=2)
    rp = r.breakdown.get("replanned")
    assert rp is not None, r.breakdown
    assert rp["to"] == r.profile != rp["from"] and 1.0 < rp["observed_mbps"] < 3.0
    assert not r.fallback and len(r.tokens) == MAX_NEW and r.attempts == 1
    # the packaged task library tops out at 4.5x at 1k tokens; on this 150-token prompt its
    # 64-token recent window (64 levels) weighs more
    assert r.raw_bytes / r.kv_bytes > 3
    assert r.breakdown["decision"]["reason"].startswith("replanned")
    assert r.kv_bytes < 0.7 * rp["abandoned_bytes"]
    # the whole request took less than the abandoned bundle alone needed on this link
    assert r.jct_ms / 1e3 < rp["abandoned_bytes"] * 8 / 2e6, (r.jct_ms, rp)
    # the estimate now follows the slow link, so the next request plans for it from the start
    r2 = cluster.generate(ids, MAX_NEW, "adaptive", link_mbps=2)
    assert r2.breakdown.get("replanned") is None and r2.profile == r.profile


def test_bench_tiers_rotate_every_mode_and_repeat_rounds(cluster, prompts):
    import kvserve_serving as bench  # benchmarks/ (tests/conftest.py puts it on sys.path)

    ids = [p[0] for p in prompts]
    quiet = lambda s: None  # noqa: E731
    rows = bench.run_tiers(cluster, ids, [10_000], 1, bench.MODES, ids[0][:32], quiet, tier_seconds=1e9, max_rounds=2)
    assert len(rows) == 2 * len(ids) * len(bench.MODES)
    assert {r["round"] for r in rows} == {0, 1}
    firsts = [r["mode"] for r in rows if r["position"] == 0]
    assert len(firsts) == 2 * len(ids) and len(set(firsts)) == len(firsts)  # a different mode first each time
    for m in bench.MODES:
        assert sorted(r["position"] for r in rows if r["mode"] == m) == sorted(set(r["position"] for r in rows if r["mode"] == m))
    assert all(r["same_tokens_as_bf16"] for r in rows if r["mode"] in ("bf16", "bf16-enec"))
    s = bench.summarize(rows)
    assert len(s) == 1 and set(s[0]["modes"]) == set(bench.MODES) and s[0]["adaptive_vs_best_fixed"] > 0
    assert bench.targets(s)["top_tier_mbps"] == 10_000
    jct = {(r["mode"], r["round"], r["request"]): r["jct_ms"] for r in rows}
    pairs = sorted(jct[("adaptive", k, i)] / jct[("bf16", k, i)] for k in (0, 1) for i in range(len(ids)))
    assert s[0]["adaptive_vs_bf16_paired_median"] == pytest.approx((pairs[1] + pairs[2]) / 2)
    assert "paired median" in bench.format_table(s)
    # a time budget already spent stops after the first round
    rows = bench.run_tiers(cluster, ids[:1], [10_000], 1, bench.MODES, ids[0][:32], quiet, tier_seconds=1e-3)
    assert len(rows) == len(bench.MODES)


def test_dropped_transfer_is_retried(cluster, prompts):
    ids, ref = prompts[1]
    with Relay(cluster.decode_addr, drop_after=200_000, drops=1) as relay:
        r = cluster.generate(ids, MAX_NEW, "bf16", kv_addr=relay.address)
    assert relay.dropped == 1
    assert r.attempts == 2 and r.breakdown["retry_errors"]
    assert not r.fallback and r.tokens == ref


def test_transfer_failure_falls_back_to_recompute(cluster, prompts):
    ids, ref = prompts[1]
    with Relay(cluster.decode_addr, drop_after=100_000, drops=100) as relay:
        r = cluster.generate(ids, MAX_NEW, "bf16-enec", kv_addr=relay.address)
    assert relay.dropped == 3  # 1 try + 2 retries
    assert "gave up after 3" in r.breakdown["error"]
    assert r.fallback and r.breakdown["recompute_ms"] > 0
    assert r.tokens == ref


def test_prefill_worker_unreachable_falls_back(cluster, prompts):
    ids, ref = prompts[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    r = cluster.generate(ids, MAX_NEW, "bf16", prefill_addr=dead)
    assert r.fallback and r.tokens == ref


def test_workers_survive_bad_input(cluster, prompts, ref_model):
    for addr in (cluster.prefill_addr, cluster.decode_addr):
        s = socket.create_connection(addr, timeout=5)
        s.sendall(b"\x00" * 64)
        s.close()
        with tp.FrameClient(addr, b"not-the-cluster-secret!!", retries=0) as c:
            with pytest.raises(tp.TransportError):
                c.request(engine.T_PING, tp.pack_message({}))
    # an authenticated frame with a corrupted bundle: clear error, worker keeps going
    import kvserve

    ids, ref = prompts[0]
    model, _ = ref_model
    kv, first = models.prefill_first(model, ids)
    blob = bytearray(kvserve.encode(kv, "bf16", meta={"rid": "bad", "seq_len": len(ids), "first_token": first}))
    blob[100] ^= 0xFF
    with tp.FrameClient(cluster.decode_addr, cluster.secret) as c:
        with pytest.raises(tp.RemoteError, match="checksum"):
            c.call(engine.T_KV, {"rid": "bad"}, bytes(blob))
    r = cluster.generate(ids, MAX_NEW, "bf16")
    assert r.tokens == ref and not r.fallback


def test_bounded_concurrent_load_loses_nothing(cluster, ref_model):
    model, tok = ref_model
    n, deadline_s = 8, 120
    ps = models.sotu_prompts(tok, [24 + 4 * i for i in range(n)], seed=7)
    refs = [models.generate_local(model, ids, 3) for ids in ps]
    modes = ["bf16", "bf16-enec"]
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=n) as ex:
        futs = [ex.submit(cluster.generate, ids, 3, modes[i % 2], 1000) for i, ids in enumerate(ps)]
        results = [f.result(timeout=deadline_s) for f in futs]
    assert time.monotonic() - t0 < deadline_s
    assert [r.tokens for r in results] == refs
    assert len({r.rid for r in results}) == n
    assert not any(r.fallback for r in results)
