"""Prefix-cache (KV-disaggregated) scenario: FileStore and a real redis-server."""
from __future__ import annotations

import os
import shutil

import pytest

from kvserve import KVServeError
from kvserve.serving.store import FileStore, PrefixCache, RedisStore, prefix_key
from kvserve_servers import RedisServer, Relay

KEY = prefix_key("smollm2", [1, 2, 3], "kvserve")


@pytest.fixture(scope="module")
def redis_server():
    pytest.importorskip("redis")
    if not (shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")):
        pytest.skip("redis-server not installed (scripts/setup.sh installs Debian's redis-server)")
    with RedisServer() as srv:
        yield srv


def test_keys_do_not_alias():
    assert prefix_key("smollm2", [1, 2, 3], "kvserve") != prefix_key("smollm2", [1, 2, 3], "bf16")
    assert prefix_key("smollm2", [1, 2, 3], "kvserve") != prefix_key("smollm2", [1, 2, 4], "kvserve")
    assert prefix_key("smollm2", [12, 3], "kvserve") != prefix_key("smollm2", [1, 23], "kvserve")


def test_file_store_round_trip(tmp_path):
    st = FileStore(tmp_path)
    assert st.get(KEY) is None
    st.put(KEY, b"abc" * 1000)
    assert st.get(KEY) == b"abc" * 1000
    st.delete(KEY)
    assert st.get(KEY) is None
    with pytest.raises(KVServeError):
        st.get("../../etc/passwd")


def test_redis_store_round_trip(redis_server):
    st = RedisStore(redis_server.url)
    blob = os.urandom(3 << 20)
    st.put(KEY, blob)
    assert st.get(KEY) == blob
    st.delete(KEY)
    assert st.get(KEY) is None
    st.close()


def test_redis_through_paced_relay(redis_server):
    import time

    st = RedisStore(redis_server.url)
    blob = os.urandom(1 << 20)
    st.put(KEY, blob)
    with Relay(redis_server.address, rate_bps=40e6 / 8) as relay:
        slow = RedisStore("redis://%s:%d" % relay.address)
        t0 = time.perf_counter()
        assert slow.get(KEY) == blob
        mbps = len(blob) * 8 / (time.perf_counter() - t0) / 1e6
        slow.close()
    assert 30 < mbps < 44, mbps
    st.close()


@pytest.mark.slow
def test_prefix_reuse_real_model(redis_server, tmp_path, serving_model):
    from kvserve import models

    model, tok = serving_model
    prefix, suffix = models.sotu_prompts(tok, [96, 8])
    full_first = PrefixCache(model, FileStore(tmp_path), "bf16").recompute(prefix + suffix).first_token
    for store, profile in ((FileStore(tmp_path), "bf16"), (RedisStore(redis_server.url), "kvserve")):
        pc = PrefixCache(model, store, profile)
        miss = pc.first_token(prefix, suffix)  # not stored yet: recompute
        assert miss.source == "recompute" and miss.first_token == full_first
        size = pc.put_prefix(prefix)
        hit = pc.first_token(prefix, suffix)
        assert hit.source == "store" and hit.bundle_bytes == size
        assert hit.first_token == full_first
    # a corrupted stored value is detected and recomputed
    st = FileStore(tmp_path)
    pc = PrefixCache(model, st, "kvserve")
    st.put(pc.key(prefix), b"KVSV" + b"\0" * 100)
    assert pc.first_token(prefix, suffix).source == "recompute"
