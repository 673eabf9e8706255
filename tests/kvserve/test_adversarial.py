"""Hostile peers, bundles and files (issue 16): one case per item, each failing on the code
before the hardening. The hostile files live in ``data/adversarial/`` (see its README.md;
``make_adversarial.py`` writes them); ``benchmarks/fuzz_kvserve.py`` is the long fuzzer.

Items: 1 pre-authentication cost of the KV channel, 2 replayed server replies (and the
channel's version check), 3 foreign or inconsistent KV at the decode worker, 7
decompression bombs, 8 deep nesting and non-regular files in a store, 13 KV that requires
grad.
"""
from __future__ import annotations

import hashlib
import json
import hmac
import os
import socket
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kvserve
from kvserve import KVServeError
from kvserve.serving import transport as tp
from kvserve_test_common import make_kv

ADV = Path(__file__).with_name("data") / "adversarial"
SECRET = b"0123456789abcdef-adversarial"


def hostile(name: str) -> bytes:
    return (ADV / name).read_bytes()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def echo(ftype, payload, info):
    return ftype, payload


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True if the peer closes ``sock`` within ``within`` seconds (whatever it sent first)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(1 << 16) == b"":
                return True
        except socket.timeout:
            return False
        except OSError:
            return True
    return False


# ------------------------------------------------------------------ item 1: pre-authentication cost


def test_unauthenticated_large_frame_headers_cost_nothing():
    """Six peers without the secret announce 256 MiB frames: the old channel allocated each
    length before checking any tag (+1.5 GB); now nothing past the 56-byte handshake is read."""
    with tp.FrameServer(echo, SECRET) as srv:
        socks = []
        before = rss_mb()
        for name in ["v1-huge-header.bin"] * 3 + ["v2-hello-then-huge-header.bin"] * 3:
            s = socket.create_connection(srv.address, timeout=5)
            s.sendall(hostile(name))
            socks.append(s)
        assert all(closed_by_peer(s, 3.0) for s in socks)
        grown = rss_mb() - before
        for s in socks:
            s.close()
        assert grown < 64, f"RSS grew by {grown:.0f} MB"
        # nobody got past the handshake
        assert srv.served == 0
        assert sum("VersionError" in r for r in srv.rejected) == 3
        assert sum("AuthError" in r for r in srv.rejected) == 3
        with tp.FrameClient(srv.address, SECRET) as c:
            assert c.request(1, b"still serving") == (1, b"still serving")


def test_silent_connections_are_capped():
    """Peers that connect and say nothing: at most MAX_PENDING of them wait in the handshake
    (the oldest is dropped for a new one), so threads and sockets stay bounded; a real client
    still gets through."""
    before = threading.active_count()
    with tp.FrameServer(echo, SECRET) as srv:
        socks = [socket.create_connection(srv.address, timeout=5) for _ in range(100)]
        time.sleep(0.3)
        held = threading.active_count() - before
        with tp.FrameClient(srv.address, SECRET, retries=3) as c:
            assert c.request(2, b"hello") == (2, b"hello")
        assert held <= 16 + 2, held  # MAX_PENDING handshakes + the accept thread (before: 100 threads)
        assert tp.MAX_PENDING == 16 and srv.evicted >= 100 - tp.MAX_PENDING
        for s in socks:
            s.close()


def test_connection_limit_refuses_extra_connections():
    with tp.FrameServer(echo, SECRET, max_connections=4, max_pending=4) as srv:
        chans = [tp.connect(srv.address, SECRET, timeout=5) for _ in range(4)]  # authenticated, idle
        extra = socket.create_connection(srv.address, timeout=5)
        assert closed_by_peer(extra, 3.0)
        assert srv.refused >= 1 and srv.connections == 4
        for ch in chans:
            ch.close()
        extra.close()
        time.sleep(0.2)
        with tp.FrameClient(srv.address, SECRET) as c:
            assert c.request(1, b"x") == (1, b"x")


def test_trickling_peer_cannot_hold_a_connection():
    """One byte every 0.3 s: the old channel's per-read timeout never fired; now the whole
    handshake (unauthenticated) and the whole frame (authenticated) have deadlines."""
    with tp.FrameServer(echo, SECRET, io_timeout=1.0) as srv:
        s = socket.create_connection(srv.address, timeout=5)
        data = hostile("v1-huge-header.bin")
        t0 = time.monotonic()
        closed = False
        for i in range(len(data)):
            try:
                s.sendall(data[i:i + 1])
            except OSError:
                closed = True
                break
            if closed_by_peer(s, 0.3):
                closed = True
                break
        assert closed and time.monotonic() - t0 < 3.0
        s.close()
        # an authenticated peer that announces 100 bytes and trickles them
        ch = tp.connect(srv.address, SECRET, timeout=5)
        ch.sock.sendall(tp._HDR.pack(tp.MAGIC, tp.VERSION, 1, 0, 0, 100))
        t0 = time.monotonic()
        closed = False
        while not closed and time.monotonic() - t0 < 6:
            try:
                ch.sock.sendall(b"x")
            except OSError:
                break
            closed = closed_by_peer(ch.sock, 0.3)
        assert time.monotonic() - t0 < 3.5
        ch.close()
        assert any("DeadlineExceeded" in r for r in srv.rejected)


# ------------------------------------------------------------------ item 2: replay, version


def test_replayed_server_reply_is_rejected():
    """A fake endpoint without the secret replays a recorded genuine session's server bytes
    to a new client: the client contributes its own nonce, so nothing authenticates."""
    recorded = bytearray()
    with tp.FrameServer(echo, SECRET) as srv:
        lst = socket.create_server(("127.0.0.1", 0))

        def relay():
            c, _ = lst.accept()
            u = socket.create_connection(srv.address)

            def pump(a, b, keep):
                while True:
                    d = a.recv(1 << 16)
                    if not d:
                        break
                    if keep:
                        recorded.extend(d)
                    b.sendall(d)
                b.close()

            threading.Thread(target=pump, args=(c, u, False), daemon=True).start()
            pump(u, c, True)

        threading.Thread(target=relay, daemon=True).start()
        with tp.FrameClient(lst.getsockname(), SECRET) as c:
            assert c.request(1, b"balance=100") == (1, b"balance=100")
        time.sleep(0.2)
        lst.close()
    assert len(recorded) > 24

    fake = socket.create_server(("127.0.0.1", 0))

    def fake_server():
        c, _ = fake.accept()
        c.sendall(bytes(recorded))
        time.sleep(1)
        c.close()

    threading.Thread(target=fake_server, daemon=True).start()
    with tp.FrameClient(fake.getsockname(), SECRET, retries=0, timeout=3) as c:
        with pytest.raises(tp.AuthError, match="authentication failed"):
            c.request(1, b"balance?")
    fake.close()


def _v1_frame(secret, nonce, ftype, seq, payload, direction):
    hdr = struct.pack("<4sBBHQQ", b"KVTF", 1, ftype, 0, seq, len(payload))
    return hdr + payload + hmac.new(secret, nonce + direction + hdr + payload, hashlib.sha256).digest()


def test_version_1_peers_are_refused_with_a_clear_error():
    # a version-1 client (reads a 16-byte nonce, sends a version-1 frame)
    with tp.FrameServer(echo, SECRET) as srv:
        s = socket.create_connection(srv.address, timeout=5)
        nonce = s.recv(16)
        s.sendall(_v1_frame(SECRET, nonce, 1, 0, b"hi", b"C"))
        assert closed_by_peer(s, 3.0)
        s.close()
        assert any("version 1" in r and "VersionError" in r for r in srv.rejected), list(srv.rejected)
    # a version-1 server (sends a nonce, answers our hello with a version-1 error frame)
    lst = socket.create_server(("127.0.0.1", 0))

    def v1_server():
        c, _ = lst.accept()
        nonce = os.urandom(16)
        c.sendall(nonce)
        c.recv(24)
        c.sendall(_v1_frame(SECRET, nonce, 255, 0, b"bad frame magic", b"S"))
        time.sleep(0.5)
        c.close()

    threading.Thread(target=v1_server, daemon=True).start()
    with tp.FrameClient(lst.getsockname(), SECRET, retries=2) as c:
        with pytest.raises(tp.VersionError, match="version 1"):
            c.request(1, b"x")
        assert c.stats.attempts == 1  # not retried
    lst.close()


# ------------------------------------------------------------------ item 3: the decode worker


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("transformers")
    from kvserve.models import load_model_fast

    torch.set_num_threads(1)
    try:
        return load_model_fast("smollm2")
    except Exception as exc:  # model package missing
        pytest.skip(f"SmolLM2 unavailable: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["foreign-gemma3.kvsv", "short-kv.kvsv", "heads-4.kvsv", "bad-first-token.kvsv"])
def test_decode_worker_refuses_unusable_kv_and_recomputes(smollm2, name):
    """Another model's geometry, fewer tokens than the bundle's seq_len, a wrong head count,
    an impossible first token: refused on arrival (before decoding), and the request is
    answered from a recomputed prefill, with the right tokens (before: 'internal error', a
    lost request, or silently wrong tokens)."""
    from kvserve import models
    from kvserve.serving import engine

    model, tok = smollm2
    ids = models.sotu_prompts(tok, [24])[0]
    worker = engine.DecodeWorker(model)
    info = {"peer": ("127.0.0.1", 0), "channel": SimpleNamespace(last_recv_s=0.0)}
    with pytest.raises(KVServeError):
        worker.handle(engine.T_KV, b"".join(tp.pack_message({"rid": "adv"}, hostile(name))), info)
    assert "adv" not in worker.store
    _, parts = worker.handle(engine.T_DECODE, b"".join(tp.pack_message({"rid": "adv", "ids": ids, "max_new": 4})), info)
    res, _ = tp.unpack_message(b"".join(parts))
    assert res["fallback"] and res["tokens"] == models.generate_local(model, ids, 4)
    # the worker's own prompt KV is still taken as it is
    kv, first = models.prefill_first(model, ids)
    blob = kvserve.encode(kv, "bf16", meta={"rid": "ok", "seq_len": len(ids), "first_token": first})
    worker.handle(engine.T_KV, b"".join(tp.pack_message({"rid": "ok"}, blob)), info)
    _, parts = worker.handle(engine.T_DECODE, b"".join(tp.pack_message({"rid": "ok", "ids": ids, "max_new": 4})), info)
    res, _ = tp.unpack_message(b"".join(parts))
    assert not res["fallback"] and res["tokens"] == models.generate_local(model, ids, 4)


# ------------------------------------------------------------------ item 7: decompression bombs


def test_bomb_is_refused_before_decoding():
    """55 KB whose layer table claims 3.6 GB of KV (before: 63 s and a 10 GB peak)."""
    blob = hostile("bomb-3.6GB.kvsv")
    assert len(blob) < 64 << 10
    before, t0 = rss_mb(), time.perf_counter()
    with pytest.raises(KVServeError, match="max_bytes"):
        kvserve.decode(blob)
    with pytest.raises(KVServeError, match="max_bytes"):
        kvserve.decode(blob, max_bytes=1 << 20)
    assert time.perf_counter() - t0 < 2 and rss_mb() - before < 64


def test_part_count_beyond_geometry_is_refused_before_decoding():
    """A 64-element layer table with 400 M symbols in its parts: the codec would allocate the
    symbol count before the quantizer noticed."""
    before, t0 = rss_mb(), time.perf_counter()
    with pytest.raises(KVServeError, match="more symbols"):
        kvserve.decode(hostile("bomb-part-count.kvsv"))
    assert time.perf_counter() - t0 < 2 and rss_mb() - before < 64


def test_max_bytes_is_exact_and_checked():
    kv = make_kv(layers=3, heads=2, tokens=40, dim=32)
    blob = kvserve.encode(kv, "kvserve")
    size = kvserve.pipeline.kv_nbytes([(tuple(k.shape), tuple(v.shape)) for k, v in kv])
    assert size == sum(k.numel() * 2 + v.numel() * 2 for k, v in kv)
    kvserve.decode(blob, max_bytes=size)
    with pytest.raises(KVServeError, match="max_bytes"):
        kvserve.decode(blob, max_bytes=size - 1)
    with pytest.raises(KVServeError, match="max_bytes"):
        kvserve.decode(blob, max_bytes=-1)
    seen = []
    kvserve.decode(blob, expect=lambda shapes, meta: seen.append((shapes, meta)))
    assert seen == [([(tuple(k.shape), tuple(v.shape)) for k, v in kv], {})]


@pytest.mark.slow
def test_prefix_cache_bounds_a_stored_bomb_by_its_geometry(smollm2, tmp_path):
    """A bomb (or another model's KV) planted under a prefix key: the PrefixCache recomputes,
    without decoding it."""
    from kvserve.serving.store import FileStore, PrefixCache

    model, _ = smollm2
    prefix, suffix = list(range(100, 124)), [7, 8, 9]
    pc = PrefixCache(model, FileStore(tmp_path, SECRET), "kvserve")
    want = pc.recompute(prefix + suffix).first_token
    for name in ("bomb-3.6GB.kvsv", "foreign-gemma3.kvsv", "short-kv.kvsv"):
        pc.store.put(pc.key(prefix), hostile(name))
        t0 = time.perf_counter()
        res = pc.first_token(prefix, suffix)
        assert res.source == "recompute" and res.first_token == want
        assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------ item 8: nesting, non-regular files


def test_deeply_nested_json_raises_the_package_error(tmp_path):
    from kvserve.library import load_library

    with pytest.raises(KVServeError, match="nested too deeply"):
        kvserve.decode(hostile("nested-meta.kvsv"))
    with pytest.raises(KVServeError):
        kvserve.pipeline.parse_header(hostile("nested-meta.kvsv"))
    with pytest.raises(KVServeError, match="RecursionError"):
        load_library(str(ADV / "nested-library.json"))
    with pytest.raises(KVServeError, match="nested too deeply"):
        kvserve.load_profile(str(ADV / "nested-profile.json"))
    # found by the fuzzer: a profile or library file that is not UTF-8 raised UnicodeDecodeError
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(KVServeError, match="not valid JSON"):
        kvserve.load_profile(str(bad))
    with pytest.raises(KVServeError, match="not valid JSON"):
        load_library(str(bad))
    deep = b"[" * 100_000
    with pytest.raises(tp.MalformedFrame, match="nested too deeply"):
        tp.unpack_message(struct.pack("<I", len(deep)) + deep)


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket"])
def test_store_skips_non_regular_files(kind):
    """A FIFO planted under a key blocked the reader forever; now any non-regular entry is an
    error at once (a miss for the reader), never read."""
    import tempfile

    from kvserve.serving.store import FileStore

    tmp_path = Path(tempfile.mkdtemp(prefix="kvs-"))  # short: an AF_UNIX path has ~100 bytes
    st = FileStore(tmp_path, SECRET)
    key = "ab" * 32
    path = tmp_path / f"{key}.kvsv"
    holder = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        holder = socket.socket(socket.AF_UNIX)
        holder.bind(str(path))
    got = []

    def read():
        try:
            got.append(st.get(key))
        except KVServeError as exc:
            got.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(3)
    assert not t.is_alive(), "FileStore.get blocked on a non-regular file"
    assert len(got) == 1 and isinstance(got[0], KVServeError) and not st.exists(key)
    if holder is not None:
        holder.close()
    path.unlink() if not path.is_dir() else path.rmdir()
    tmp_path.rmdir()


# ------------------------------------------------------------------ item 13: KV that requires grad


@pytest.mark.parametrize("profile", kvserve.profile_names())
def test_encode_kv_that_requires_grad(profile):
    """KV from a forward pass without torch.no_grad(): every profile encodes it, to the same
    bytes as the detached KV."""
    kv = make_kv(layers=4, heads=3, tokens=48, dim=64, seed=1)
    graded = [(k.float().requires_grad_().bfloat16() * 1, v.float().requires_grad_().bfloat16() * 1) for k, v in kv]
    assert graded[0][0].requires_grad
    blob = kvserve.encode(graded, profile, meta={"seq_len": 48})
    assert blob == kvserve.encode(kv, profile, meta={"seq_len": 48})
    out, _ = kvserve.decode(blob)
    assert out[0][0].shape == kv[0][0].shape and not out[0][0].requires_grad


@pytest.mark.parametrize("edit", [
    lambda d: d["entries"][0].update(quality_ci="ab"),
    lambda d: d["entries"][0].update(quality_ci=[5.0, 1.0]),
    lambda d: d["entries"][0].update(quality_ci=[1.0, float("nan")]),
    lambda d: d["entries"][0].update(answer_agree="x"),
    lambda d: d["entries"][0].update(answer_agree=1.5),
    lambda d: d["entries"][0].update(items=-1),
    lambda d: d.update(withheld=5),
    lambda d: d.update(withheld={"k": {"ratio": "big"}}),
    lambda d: d.update(min_answer_agree=[0.6]),
    lambda d: d.update(quality_metric="accuracy"),
])
def test_library_task_figures_are_validated(tmp_path, capsys, edit):
    """The task figures `decide` prints (CI, agreement, items, withheld keys) are checked when
    the library is loaded: a bad one is one line, exit 2, never a traceback."""
    from importlib import resources

    from kvserve.cli import main

    d = json.loads(resources.files("kvserve").joinpath("library", "smollm2.json").read_text())
    edit(d)
    bad = tmp_path / "lib.json"
    bad.write_text(json.dumps(d))
    assert main(["decide", "--library", str(bad), "--bandwidth-mbps", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvserve: error:") and err.count("\n") == 1
