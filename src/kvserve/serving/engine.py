"""Embedded prefill/decode (PD) disaggregated engine: two worker processes and a router.

::

    router ──PREFILL(rid, ids, profile, link)──▶ prefill worker
                                                   │ prefill (bf16), first token
                                                   │ controller / fixed profile -> kvserve.encode
                                                   └─KV frame (paced, HMAC)──▶ decode worker
                                                                               kvserve.decode, keep
    router ──DECODE(rid, ids, max_new)─────────────────────────────────────▶ decode worker
                                                   rebuild DynamicCache, greedy -> tokens

Every hop is a :mod:`kvserve.serving.transport` channel (loopback, HMAC-SHA256 per frame, a shared
secret). The prefill worker paces the KV frame with a token bucket at the request's
``link_mbps`` (the emulated P->D link), estimates the link's bandwidth online from its
transfers (EWMA) and, in ``adaptive`` mode, lets :class:`kvserve.controller.Controller` choose
the profile; the push (decide, encode, send, observe, re-plan mid-transfer when the link is
far slower than assumed) is :mod:`kvserve.serving.push`. If the KV push fails after
its retries, or the prefill worker is unreachable, the decode worker recomputes the prefill
itself (``fallback``), so no request is lost or answered wrongly.

``TTFT`` is measured from the router's send to the moment the decode worker holds a usable
cache and the first token (so it includes prefill, encode, transfer, decode and the cache
rebuild); ``JCT`` to the router's receipt of all tokens. Both clocks are CLOCK_MONOTONIC,
shared by all processes on the machine.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from ..controller import Controller
from ..errors import KVServeError
from ..library import load_library
from ..models import check_kv_fits, ensure_model_cache, greedy, kv_shapes, load_model_fast, prefill_first
from ..pipeline import decode, kv_nbytes
from . import transport as tp
from .push import Pusher, SendFailed, Sent

T_PREFILL, T_KV, T_DECODE, T_PING, T_SHUTDOWN, T_STATS = 1, 2, 3, 4, 5, 6
MODES = ("bf16", "bf16-enec", "kivi-2", "kivi-4", "cachegen", "kvserve", "kvserve-8x", "adaptive")


# ------------------------------------------------------------------ workers


def _ms(s: float) -> float:
    return round(s * 1e3, 3)


class PrefillWorker:
    """Handles PREFILL: prefill, then push the KV to the decode worker (:class:`Pusher`:
    a fixed profile, or ``adaptive``: the controller's choice at the estimated bandwidth)."""

    def __init__(self, model, secret: bytes, decode_addr=None, retries: int = 2, push_timeout: float = 60.0,
                 min_quality: float = 97.0, epsilon: float = 0.0, library: str | None = None,
                 threads: int | None = None):
        self.model, self.secret, self.decode_addr = model, secret, decode_addr
        self.retries, self.push_timeout = retries, push_timeout
        self.model_lock = threading.Lock()
        # codec_alpha 0.5: the codec time is measured directly (encode here, decode reported
        # by the decode worker), so the speed factor can follow this machine's load quickly
        self.pusher = Pusher(lambda: Controller(load_library(library), slo_ms=float("inf"), min_quality=min_quality,
                                                epsilon=epsilon, seed=0, codec_alpha=0.5),
                             tp.BandwidthEstimator(alpha=0.5, initial_mbps=1000.0), threads=threads)
        self.decisions: list[dict] = []

    def handle(self, ftype, payload, info):
        if ftype == T_PING:
            return T_PING, tp.pack_message({"role": "prefill", "pid": os.getpid()})
        if ftype == T_STATS:
            return T_STATS, tp.pack_message({**self.pusher.state(), "decisions": self.decisions[-50:]})
        if ftype == T_SHUTDOWN:
            threading.Timer(0.05, os._exit, args=(0,)).start()
            return T_SHUTDOWN, tp.pack_message({})
        if ftype != T_PREFILL:
            raise KVServeError(f"prefill worker: unexpected message type {ftype}")
        meta, _ = tp.unpack_message(payload)
        return T_PREFILL, tp.pack_message(self.prefill(meta))

    def _sender(self, addr, rid: str, link_mbps: float | None):
        """A push send function: one KV frame to the decode worker, paced at ``link_mbps``."""
        def send(blob: bytes, progress) -> Sent:
            pacer = tp.TokenBucket(link_mbps * 1e6 / 8) if link_mbps else None
            client = tp.FrameClient(addr, self.secret, retries=self.retries, timeout=self.push_timeout)
            try:
                ack, _ = client.call(T_KV, {"rid": rid}, blob, pacer, progress=progress)
            except tp.TransferAbandoned:
                raise
            except tp.TransportError as exc:
                raise SendFailed(f"{type(exc).__name__}: {exc}", attempts=client.stats.attempts,
                                 retry_errors=client.stats.errors) from exc
            finally:
                client.close()
            st = client.stats
            dec_s = ack["decode_ms"] / 1e3
            xfer = max(st.total_s - dec_s, 1e-6)
            # bandwidth sample: the payload's arrival time at the receiver when the frame is
            # big enough to span many chunks, else the sender's end-to-end transfer time
            recv_s = ack.get("recv_ms", 0.0) / 1e3
            sample_s = recv_s if len(blob) >= 256 << 10 and recv_s > 0 else xfer
            return Sent(transfer_ms=xfer * 1e3, sample_mbps=len(blob) * 8 / sample_s / 1e6, sample_s=sample_s,
                        remote_decode_ms=ack["decode_ms"],
                        extra={"attempts": st.attempts, "retry_errors": st.errors})

        return send

    def prefill(self, req: dict) -> dict:
        ids, rid, mode = req["ids"], req["rid"], req.get("profile", "bf16")
        addr = req.get("kv_addr") or self.decode_addr
        if addr is None:
            raise KVServeError("prefill worker: no decode worker address (start with --decode or send kv_addr)")
        t0 = time.monotonic()
        with self.model_lock:
            kv, first = prefill_first(self.model, ids)
        prefill_ms = _ms(time.monotonic() - t0)
        res = self.pusher.push(kv, None if mode == "adaptive" else mode,
                               {"rid": rid, "seq_len": len(ids), "first_token": first},
                               self._sender(tuple(addr), rid, req.get("link_mbps")))
        res.update(rid=rid, first_token=first, prefill_ms=prefill_ms)
        res.setdefault("attempts", 0)
        res["t_done"] = time.monotonic()
        self.decisions.append({k: res.get(k) for k in ("rid", "profile", "kv_bytes", "transfer_ms", "ok")})
        del self.decisions[:-200]
        return res


class DecodeWorker:
    """Handles KV (decode the bundle on arrival, keep it) and DECODE (continue generation;
    recompute the prefill if the KV never arrived)."""

    def __init__(self, model, capacity: int = 256, threads: int | None = None):
        self.model, self.capacity, self.threads = model, capacity, threads
        self.store: dict[str, tuple] = {}
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()
        self.fallbacks = 0
        cfg = model.config.get_text_config()
        self.max_tokens, self.vocab = int(cfg.max_position_embeddings), int(cfg.vocab_size)
        self.max_kv_bytes = kv_nbytes(kv_shapes(model, self.max_tokens))  # no bundle decodes to more

    def _expect(self, rid):
        """Checks a bundle's layer table and meta before anything is decoded: it must be the
        announced request's KV, for this model's geometry at its ``seq_len`` tokens."""

        def expect(shapes, meta):
            if not isinstance(rid, str) or meta.get("rid") != rid:
                raise KVServeError("KV bundle does not belong to the announced request")
            n, first = meta.get("seq_len"), meta.get("first_token")
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (n, first)) \
                    or not 1 <= n <= self.max_tokens or not 0 <= first < self.vocab:
                raise KVServeError("KV bundle: bad seq_len or first_token")
            check_kv_fits(self.model, shapes, n)

        return expect

    def handle(self, ftype, payload, info):
        if ftype == T_PING:
            return T_PING, tp.pack_message({"role": "decode", "pid": os.getpid()})
        if ftype == T_STATS:
            return T_STATS, tp.pack_message({"stored": len(self.store), "fallbacks": self.fallbacks})
        if ftype == T_SHUTDOWN:
            threading.Timer(0.05, os._exit, args=(0,)).start()
            return T_SHUTDOWN, tp.pack_message({})
        if ftype == T_KV:
            meta, blob = tp.unpack_message(payload)
            t0 = time.monotonic()
            # KVServeError on a bad or foreign bundle -> error frame to the sender (the request
            # then recomputes its prefill here)
            kv, bmeta = decode(blob, max_bytes=self.max_kv_bytes, expect=self._expect(meta.get("rid")),
                               threads=self.threads)
            dt = time.monotonic() - t0
            recv_s = info["channel"].last_recv_s
            with self.lock:
                self.store[meta["rid"]] = (kv, bmeta["seq_len"], bmeta["first_token"])
                while len(self.store) > self.capacity:
                    self.store.pop(next(iter(self.store)))
            return T_KV, tp.pack_message({"decode_ms": _ms(dt), "recv_ms": _ms(recv_s)})
        if ftype == T_DECODE:
            meta, _ = tp.unpack_message(payload)
            return T_DECODE, tp.pack_message(self.generate(meta))
        raise KVServeError(f"decode worker: unexpected message type {ftype}")

    def generate(self, req: dict) -> dict:
        ids, rid, max_new = req["ids"], req["rid"], int(req["max_new"])
        with self.lock:
            entry = self.store.pop(rid, None)
        fallback = entry is None or entry[1] != len(ids)
        t0 = time.monotonic()
        with self.model_lock:
            if fallback:
                self.fallbacks += 1
                kv, first = prefill_first(self.model, ids)
            else:
                kv, _, first = entry
            t_first = time.monotonic()
            try:
                rest = greedy(self.model, kv, len(ids), first, max_new - 1)
            except Exception:  # stored KV that passed the checks still unusable: recompute
                if fallback:
                    raise
                fallback = True
                self.fallbacks += 1
                kv, first = prefill_first(self.model, ids)
                t_first = time.monotonic()
                rest = greedy(self.model, kv, len(ids), first, max_new - 1)
        return {"rid": rid, "tokens": [first] + rest, "fallback": fallback, "t_first": t_first,
                "recompute_ms": _ms(t_first - t0) if fallback else 0.0, "gen_ms": _ms(time.monotonic() - t_first)}


def run_worker(role: str, secret: bytes, *, threads: int = 1, model: str = "smollm2", host: str = "127.0.0.1",
               port: int = 0, decode_addr=None, retries: int = 2, min_quality: float = 97.0, epsilon: float = 0.0,
               library: str | None = None, max_frame: int = tp.DEFAULT_MAX_FRAME) -> None:
    """Run one worker (``"prefill"`` or ``"decode"``) in the foreground: load the model, print
    ``{"role", "address"}`` as one JSON line on stdout, serve until shut down."""
    import warnings

    import torch

    if role not in ("prefill", "decode"):
        raise KVServeError(f"unknown worker role {role!r}")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(threads)
    m, _ = load_model_fast(model)
    if role == "prefill":
        w = PrefillWorker(m, secret, decode_addr, retries=retries, min_quality=min_quality, epsilon=epsilon,
                          library=library, threads=threads)
    else:
        w = DecodeWorker(m, threads=threads)
    srv = tp.FrameServer(w.handle, secret, host=host, port=port, max_frame=max_frame)
    print(json.dumps({"role": role, "address": list(srv.address)}), flush=True)
    srv.serve_forever()


# ------------------------------------------------------------------ router


@dataclass
class RequestResult:
    rid: str
    mode: str
    profile: str
    prompt_tokens: int
    tokens: list
    ttft_ms: float
    jct_ms: float
    kv_bytes: int = 0
    raw_bytes: int = 0
    link_mbps: float | None = None
    fallback: bool = False
    attempts: int = 0
    breakdown: dict = field(default_factory=dict)

    def row(self) -> dict:
        d = asdict(self)
        d.pop("tokens")
        d["new_tokens"] = len(self.tokens)
        return d


class PDCluster:
    """Starts a prefill and a decode worker (spawned processes) and routes requests.

    >>> with PDCluster() as pd:
    ...     r = pd.generate(ids, max_new=8, mode="kvserve", link_mbps=100)
    """

    _ids = itertools.count()

    def __init__(self, model: str = "smollm2", threads: int = 1, secret: bytes | None = None, host: str = "127.0.0.1",
                 retries: int = 2, epsilon: float = 0.0, min_quality: float = 97.0, library: str | None = None,
                 start_timeout: float = 300.0, request_timeout: float = 900.0):
        self.model_name, self.threads, self.host = model, threads, host
        self.secret = secret or tp.new_secret()
        self.opts = {"retries": retries, "epsilon": epsilon, "min_quality": min_quality, "library": library}
        self.start_timeout, self.request_timeout = start_timeout, request_timeout
        self.procs: list = []
        self.prefill_addr = self.decode_addr = None

    def _spawn(self, role, decode_addr=None):
        import subprocess
        import tempfile

        cmd = [sys.executable, "-m", "kvserve", "serve", role, "--host", self.host, "--threads", str(self.threads),
               "--model", self.model_name, "--retries", str(self.opts["retries"])]
        if role == "prefill":
            if decode_addr:
                cmd += ["--decode", f"{decode_addr[0]}:{decode_addr[1]}"]
            cmd += ["--min-quality", str(self.opts["min_quality"]),
                    "--epsilon", str(self.opts["epsilon"])]
            if self.opts["library"]:
                cmd += ["--library", self.opts["library"]]
        env = dict(os.environ, KVSERVE_SECRET=self.secret.decode() if isinstance(self.secret, bytes) else self.secret)
        log = tempfile.TemporaryFile(mode="w+")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        self.procs.append((p, log))
        return p, log

    def _await(self, p, log, role, timeout):
        import select

        ready, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if ready else ""
        if not line:
            log.seek(0)
            tail = log.read()[-2000:]
            raise KVServeError(f"{role} worker did not start (exit {p.poll()}): {tail}")
        return tuple(json.loads(line)["address"])

    def start(self) -> "PDCluster":
        ensure_model_cache(self.model_name)  # once per machine; workers then load in seconds
        try:
            # both load the model at once; the router tells the prefill worker where D is
            dp, dlog = self._spawn("decode")
            pp, plog = self._spawn("prefill")
            self.decode_addr = self._await(dp, dlog, "decode", self.start_timeout)
            self.prefill_addr = self._await(pp, plog, "prefill", self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        for addr in (self.prefill_addr, self.decode_addr):
            if addr is None:
                continue
            try:
                with tp.FrameClient(addr, self.secret, retries=0, timeout=2) as c:
                    c.request(T_SHUTDOWN, tp.pack_message({}))
            except (tp.TransportError, OSError):
                pass
        for p, log in self.procs:
            try:
                p.wait(timeout=5)
            except Exception:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except Exception:
                    p.kill()
                    p.wait()
            log.close()
            if p.stdout:
                p.stdout.close()
        self.procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def stats(self, role="prefill") -> dict:
        with tp.FrameClient(self.prefill_addr if role == "prefill" else self.decode_addr, self.secret) as c:
            meta, _ = c.call(T_STATS, {})
        return meta

    def generate(self, ids: list[int], max_new: int = 8, mode: str = "bf16", link_mbps: float | None = None,
                 kv_addr=None, prefill_addr=None, rid: str | None = None) -> RequestResult:
        """One request through P and D. ``link_mbps``: emulated P->D bandwidth (None: unpaced)."""
        if mode not in MODES and not mode.endswith(".json"):
            raise KVServeError(f"unknown mode {mode!r}; known: {MODES}")
        rid = rid or f"r{os.getpid()}-{next(self._ids)}"
        t0 = time.monotonic()
        req = {"rid": rid, "ids": list(map(int, ids)), "profile": mode, "link_mbps": link_mbps,
               "kv_addr": list(kv_addr or self.decode_addr)}
        try:
            # no retry here: a resent PREFILL would redo the work; the decode side recomputes instead
            with tp.FrameClient(prefill_addr or self.prefill_addr, self.secret, retries=0,
                                timeout=self.request_timeout) as c:
                pre, _ = c.call(T_PREFILL, req)
        except tp.TransportError as exc:  # prefill side unreachable: decode recomputes
            pre = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "profile": "none", "kv_bytes": 0,
                   "raw_bytes": 0, "attempts": 0}
        with tp.FrameClient(self.decode_addr, self.secret, retries=2, timeout=self.request_timeout) as c:
            dec, _ = c.call(T_DECODE, {"rid": rid, "ids": req["ids"], "max_new": max_new})
        t_end = time.monotonic()
        bd = {k: pre.get(k) for k in ("prefill_ms", "encode_ms", "transfer_ms", "remote_decode_ms", "error",
                                      "decision", "retry_errors", "replanned")
              if pre.get(k) is not None}
        bd.update(recompute_ms=dec["recompute_ms"], gen_ms=dec["gen_ms"])
        return RequestResult(rid, mode, pre.get("profile", "none"), len(ids), dec["tokens"],
                             ttft_ms=_ms(dec["t_first"] - t0), jct_ms=_ms(t_end - t0), kv_bytes=pre.get("kv_bytes", 0),
                             raw_bytes=pre.get("raw_bytes", 0), link_mbps=link_mbps, fallback=dec["fallback"],
                             attempts=pre.get("attempts", 0), breakdown=bd)
