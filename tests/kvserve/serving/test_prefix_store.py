"""Bundle stores (FileStore and a real redis-server, both sealed with the deployment secret)
and the prefix-cache (KV-disaggregated) scenario."""
from __future__ import annotations

import os
import shutil
import stat

import pytest

from kvserve import KVServeError
from kvserve.serving.store import (FileStore, PrefixCache, RedisStore, binding, check_binding, open_store,
                                   prefix_key, seal)
from kvserve_servers import RedisServer, Relay

KEY = prefix_key("smollm2", [1, 2, 3], "kvserve")
SECRET = "prefix-store-test-secret-0123456789"


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
    st = FileStore(tmp_path, SECRET)
    assert st.get(KEY) is None
    st.put(KEY, b"abc" * 1000)
    assert st.get(KEY) == b"abc" * 1000
    st.delete(KEY)
    assert st.get(KEY) is None
    with pytest.raises(KVServeError):
        st.get("../../etc/passwd")


def test_entries_are_sealed_with_the_secret(tmp_path):
    """A party that can write the directory but holds no secret can neither forge an entry nor
    move a real one to another key; a reader with another secret sees nothing usable."""
    st = FileStore(tmp_path, SECRET)
    st.put(KEY, b"genuine bundle")
    other = prefix_key("smollm2", [9], "kvserve")
    # forged: a plain value, and a value sealed with the wrong secret
    st.path(other).write_bytes(b"KVSV" + b"\0" * 100)
    with pytest.raises(KVServeError, match="not a sealed"):
        st.get(other)
    st.path(other).write_bytes(seal(b"x" * 32, other, b"forged bundle"))
    with pytest.raises(KVServeError, match="fails authentication"):
        st.get(other)
    # moved: a genuine entry copied under another key
    st.path(other).write_bytes(st.path(KEY).read_bytes())
    with pytest.raises(KVServeError, match="fails authentication"):
        st.get(other)
    with pytest.raises(KVServeError, match="fails authentication"):
        FileStore(tmp_path, "another-secret-0123456789").get(KEY)
    assert st.get(KEY) == b"genuine bundle"
    # files are private, and a store needs a secret
    assert stat.S_IMODE(os.stat(st.path(KEY)).st_mode) == 0o600
    with pytest.raises(KVServeError, match="secret"):
        FileStore(tmp_path, "short")


def test_non_regular_entries_are_never_read(tmp_path):
    """A FIFO would block a reader forever and a symlink could point anywhere: both are errors
    (a miss for the reader), at once."""
    st = FileStore(tmp_path, SECRET)
    os.mkfifo(st.path(KEY))
    with pytest.raises(KVServeError, match="not a regular file"):
        st.get(KEY)
    assert not st.exists(KEY)
    os.unlink(st.path(KEY))
    (tmp_path / "target").write_bytes(seal(st.secret, KEY, b"x"))
    os.symlink(tmp_path / "target", st.path(KEY))
    with pytest.raises(KVServeError, match="cannot be read"):
        st.get(KEY)


def test_default_store_directory_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    st = open_store(None, SECRET)
    assert st.root.parent == tmp_path and stat.S_IMODE(os.stat(st.root).st_mode) == 0o700
    os.chmod(st.root, 0o777)  # someone widened it (or made it first): refused
    with pytest.raises(KVServeError, match="mode 0700"):
        open_store(None, SECRET)
    os.chmod(st.root, 0o700)
    if os.geteuid() == 0:  # another owner: refused
        os.chown(st.root, 12345, 12345)
        with pytest.raises(KVServeError, match="owned by this user"):
            open_store(None, SECRET)


def test_binding_names_model_and_exact_tokens():
    meta = {"seq_len": 3, "bind": binding("smollm2", [1, 2, 3])}
    check_binding(meta, "smollm2", [1, 2, 3])
    for model, ids in (("gemma3", [1, 2, 3]), ("smollm2", [1, 2, 4]), ("smollm2", [1, 2]), ("smollm2", [12, 3])):
        with pytest.raises(KVServeError):
            check_binding(meta, model, ids)
    with pytest.raises(KVServeError, match="no binding"):
        check_binding({"seq_len": 3}, "smollm2", [1, 2, 3])


def test_redis_needs_its_password(redis_server):
    import redis

    anon = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}")
    with pytest.raises(redis.exceptions.AuthenticationError):
        anon.get("kvserve:" + KEY)
    anon.close()


def test_redis_store_round_trip(redis_server):
    st = RedisStore(redis_server.url, SECRET)
    blob = os.urandom(3 << 20)
    st.put(KEY, blob)
    assert st.get(KEY) == blob
    st.delete(KEY)
    assert st.get(KEY) is None
    st.close()


def test_redis_through_paced_relay(redis_server):
    import time

    st = RedisStore(redis_server.url, SECRET)
    blob = os.urandom(1 << 20)
    st.put(KEY, blob)
    with Relay(redis_server.address, rate_bps=40e6 / 8) as relay:
        slow = RedisStore(redis_server.url_at(relay.address), SECRET)
        t0 = time.perf_counter()
        assert slow.get(KEY) == blob
        mbps = len(blob) * 8 / (time.perf_counter() - t0) / 1e6
        slow.close()
    # paced: never above the rate; below it only by what a loaded 2-core machine costs the relay
    assert 10 < mbps < 44, mbps
    st.close()


@pytest.mark.slow
def test_prefix_reuse_real_model(redis_server, tmp_path, serving_model):
    from kvserve import models

    model, tok = serving_model
    prefix, suffix = models.sotu_prompts(tok, [96, 8])
    full_first = PrefixCache(model, FileStore(tmp_path, SECRET), "bf16").recompute(prefix + suffix).first_token
    for store, profile in ((FileStore(tmp_path, SECRET), "bf16"), (RedisStore(redis_server.url, SECRET), "kvserve")):
        pc = PrefixCache(model, store, profile)
        miss = pc.first_token(prefix, suffix)  # not stored yet: recompute
        assert miss.source == "recompute" and miss.first_token == full_first
        size = pc.put_prefix(prefix)
        hit = pc.first_token(prefix, suffix)
        assert hit.source == "store" and hit.bundle_bytes == size
        assert hit.first_token == full_first
    # a corrupted stored value is detected and recomputed
    st = FileStore(tmp_path, SECRET)
    pc = PrefixCache(model, st, "kvserve")
    st.put(pc.key(prefix), b"KVSV" + b"\0" * 100)
    assert pc.first_token(prefix, suffix).source == "recompute"
    # a genuine, sealed bundle of another prefix placed under this prefix's key: recomputed
    other = models.sotu_prompts(tok, [96], seed=5)[0]
    assert other != prefix
    pc_bf16 = PrefixCache(model, st, "bf16")
    pc_bf16.put_prefix(other)
    st.put(pc_bf16.key(prefix), st.get(pc_bf16.key(other)))
    assert pc_bf16.first_token(prefix, suffix).source == "recompute"
    # a bundle written with another profile under this cache's key is not accepted either
    pc_bf16.put_prefix(prefix)
    st.put(pc.key(prefix), st.get(pc_bf16.key(prefix)))
    assert pc.first_token(prefix, suffix).source == "recompute"
