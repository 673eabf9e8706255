"""Embedded prefill/decode (PD) disaggregated engine: two worker processes and a router.

::

    router ──PREFILL(rid, ids, profile, link)──▶ prefill worker
                                                   │ prefill (bf16), first token
                                                   │ controller / fixed profile -> kvserve.encode
                                                   └─KV frame (paced, HMAC)──▶ decode worker
                                                                               kvserve.decode, keep
    router ──DECODE(rid, ids, max_new)─────────────────────────────────────▶ decode worker
                                                   rebuild DynamicCache, greedy -> tokens

Every hop is a :mod:`kvserve.transport` channel (loopback, HMAC-SHA256 per frame, a shared
secret). The prefill worker paces the KV frame with a token bucket at the request's
``link_mbps`` (the emulated P->D link), estimates the link's bandwidth online from its
transfers (EWMA) and, in ``adaptive`` mode, asks :class:`kvserve.controller.Controller` for
the profile, then feeds the observed codec+transfer latency back. While an adaptive bundle is
on the wire the worker watches its progress: if the link turns out far slower than assumed
and another profile, started over, would finish sooner (:meth:`Controller.replan`), it drops
the transfer (the decode worker discards the truncated frame), decides again at the rate it
saw and sends the new bundle. If the KV push fails after
its retries, or the prefill worker is unreachable, the decode worker recomputes the prefill
itself (``fallback``), so no request is lost or answered wrongly.

``TTFT`` is measured from the router's send to the moment the decode worker holds a usable
cache and the first token (so it includes prefill, encode, transfer, decode and the cache
rebuild); ``JCT`` to the router's receipt of all tokens. Both clocks are CLOCK_MONOTONIC,
shared by all processes on the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import transport as tp
from ..errors import KVServeError

T_PREFILL, T_KV, T_DECODE, T_PING, T_SHUTDOWN, T_STATS = 1, 2, 3, 4, 5, 6
MODES = ("bf16", "bf16-enec", "kivi-2", "kivi-4", "cachegen", "kvserve", "kvserve-8x", "adaptive")


# ------------------------------------------------------------------ model loading


def model_cache_dir(name: str) -> Path:
    from ..models import model_file

    src = model_file(name)
    st = src.stat()
    root = Path(os.environ.get("KVSERVE_CACHE_DIR", Path.home() / ".cache" / "kvserve"))
    return root / f"{name}-bf16-{st.st_size}-{int(st.st_mtime)}"


def ensure_model_cache(name: str = "smollm2") -> Path:
    """Export the GGUF-loaded bf16 model once to a plain folder (config, tokenizer, state
    dict) so worker processes start in seconds instead of re-dequantizing the GGUF. The
    exported weights are the loaded ones bit for bit (logits identical)."""
    d = model_cache_dir(name)
    if (d / "model.pt").exists():
        return d
    import torch

    from ..models import load_model

    model, tok = load_model(name)
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save(model.state_dict(), tmp / "model.pt")
    try:
        os.rename(tmp, d)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return d


def load_model_fast(name: str = "smollm2"):
    """``(model, tokenizer)`` in bf16 from the exported cache (built on first use)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = ensure_model_cache(name)
    cfg = AutoConfig.from_pretrained(d)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(torch.load(d / "model.pt", weights_only=True), strict=True)
    model.eval()
    return model, AutoTokenizer.from_pretrained(d)


def load_tokenizer(name: str = "smollm2"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_model_cache(name))


# ------------------------------------------------------------------ generation


def prefill_first(model, ids: list[int]):
    """Prefill ``ids``: (per-layer KV, first generated token)."""
    import torch

    from ..pipeline import kv_from_cache

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    return kv_from_cache(out.past_key_values), int(out.logits[0, -1].argmax())


def continue_greedy(model, kv, seq_len: int, first: int, steps: int) -> list[int]:
    from ..quality import greedy

    return greedy(model, kv, seq_len, first, steps) if steps > 0 else []


def generate_local(model, ids: list[int], max_new: int) -> list[int]:
    """Single-process greedy generation (the reference PD output must equal)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        cache = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        toks = [tok]
        for _ in range(max_new - 1):
            logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
            tok = int(logits.argmax())
            toks.append(tok)
    return toks


# ------------------------------------------------------------------ workers


def _ms(s: float) -> float:
    return round(s * 1e3, 3)


class PrefillWorker:
    """Handles PREFILL: prefill, choose a profile, encode, push the KV to the decode worker."""

    def __init__(self, model, secret: bytes, decode_addr=None, retries: int = 2, push_timeout: float = 60.0,
                 min_quality: float = 97.0, epsilon: float = 0.0, library: str | None = None):
        self.model, self.secret, self.decode_addr = model, secret, decode_addr
        self.retries, self.push_timeout = retries, push_timeout
        self.min_quality, self.epsilon, self.library = min_quality, epsilon, library
        self.model_lock = threading.Lock()
        self.ctl_lock = threading.Lock()
        self._ctl = None
        self.estimator = tp.BandwidthEstimator(alpha=0.5, initial_mbps=1000.0)
        self.decisions: list[dict] = []

    def controller(self):
        if self._ctl is None:
            from ..controller import Controller, load_library

            # codec_alpha 0.5: the codec time is measured directly (encode here, decode reported
            # by the decode worker), so the speed factor can follow this machine's load quickly
            self._ctl = Controller(load_library(self.library), slo_ms=float("inf"), min_quality=self.min_quality,
                                   epsilon=self.epsilon, seed=0, codec_alpha=0.5)
        return self._ctl

    def handle(self, ftype, payload, info):
        if ftype == T_PING:
            return T_PING, tp.pack_message({"role": "prefill", "pid": os.getpid()})
        if ftype == T_STATS:
            with self.ctl_lock:
                ctl = self._ctl
                learnt = None if ctl is None else {
                    "codec_factor": dict(ctl.codec_factor),
                    "residual_ms_per_MB": {n: round(ctl._residual(n), 3) for n, st in ctl.stats.items() if st.n}}
            return T_STATS, tp.pack_message({"bandwidth_mbps": self.estimator.mbps, "samples": self.estimator.samples,
                                             "decisions": self.decisions[-50:], "controller": learnt})
        if ftype == T_SHUTDOWN:
            threading.Timer(0.05, os._exit, args=(0,)).start()
            return T_SHUTDOWN, tp.pack_message({})
        if ftype != T_PREFILL:
            raise KVServeError(f"prefill worker: unexpected message type {ftype}")
        meta, _ = tp.unpack_message(payload)
        return T_PREFILL, tp.pack_message(self.prefill(meta))

    def _watch(self, decision, raw: int, total: int):
        """A send-progress callback that abandons the transfer when the controller would
        rather start over with another profile (see :meth:`Controller.replan`); checked
        every 50 ms."""
        ctl = self.controller()
        due = [0.0]

        def watch(sent: int, seconds: float) -> None:
            if seconds < due[0]:
                return
            due[0] = seconds + 0.05
            with self.ctl_lock:
                alt = ctl.replan(decision, raw, sent, total, seconds)
            if alt is not None:
                raise tp.TransferAbandoned(f"link at {sent * 8 / seconds / 1e6:.2f} Mbps, far below the "
                                           f"{decision.bandwidth_mbps:.1f} Mbps assumed; switching to {alt}",
                                           sent, seconds)

        return watch

    def prefill(self, req: dict) -> dict:
        from ..pipeline import encode

        ids, rid, mode = req["ids"], req["rid"], req.get("profile", "bf16")
        t0 = time.monotonic()
        with self.model_lock:
            kv, first = prefill_first(self.model, ids)
        t1 = time.monotonic()
        raw = sum(k.numel() * 2 + v.numel() * 2 for k, v in kv)
        decision = None
        if mode == "adaptive":
            with self.ctl_lock:
                est = self.estimator.mbps
                decision = self.controller().decide(raw, est)
            config, profile = decision.config, decision.profile
        else:
            config, profile = mode, mode
        blob = encode(kv, config, meta={"rid": rid, "seq_len": len(ids), "first_token": first})
        t2 = time.monotonic()
        res = {"rid": rid, "first_token": first, "profile": profile, "raw_bytes": raw, "kv_bytes": len(blob),
               "prefill_ms": _ms(t1 - t0), "encode_ms": _ms(t2 - t1), "ok": False, "attempts": 0}
        if decision is not None:
            res["decision"] = {"profile": decision.profile, "reason": decision.reason,
                               "predicted_ms": decision.predicted_ms, "bandwidth_est_mbps": decision.bandwidth_mbps,
                               "explored": decision.explored}
        addr = req.get("kv_addr") or self.decode_addr
        if addr is None:
            raise KVServeError("prefill worker: no decode worker address (start with --decode or send kv_addr)")
        link = req.get("link_mbps")
        pacer = tp.TokenBucket(link * 1e6 / 8) if link else None
        watch = self._watch(decision, raw, len(blob)) if decision is not None else None
        while True:
            client = tp.FrameClient(addr, self.secret, retries=self.retries, timeout=self.push_timeout)
            try:
                ack, _ = client.call(T_KV, {"rid": rid}, blob, pacer, progress=watch)
                st = client.stats
                dec_s = ack["decode_ms"] / 1e3
                xfer = max(st.total_s - dec_s, 1e-6)
                res.update(ok=True, attempts=st.attempts, transfer_ms=_ms(xfer), remote_decode_ms=ack["decode_ms"],
                           retry_errors=st.errors)
                # bandwidth sample: the payload's arrival time at the receiver when the frame is
                # big enough to span many chunks, else the sender's end-to-end transfer time
                recv_s = ack.get("recv_ms", 0.0) / 1e3
                sample_s = recv_s if len(blob) >= 256 << 10 and recv_s > 0 else xfer
                res["bandwidth_sample_mbps"] = round(len(blob) * 8 / sample_s / 1e6, 3)
                with self.ctl_lock:
                    self.estimator.update(len(blob), sample_s)
                    if decision is not None:
                        # judge the candidate at the bandwidth this transfer actually saw: a wrong
                        # bandwidth estimate is the estimator's error, not the profile's residual
                        # (with the bundle's real size and the measured codec time, so neither a
                        # short prompt's lower ratio nor a slow link is learnt as codec speed)
                        seen = dataclasses.replace(decision, bandwidth_mbps=res["bandwidth_sample_mbps"])
                        codec = (t2 - t1) * 1e3 + ack["decode_ms"]
                        self.controller().observe(seen, codec + xfer * 1e3, sent_bytes=len(blob), codec_ms=codec)
            except tp.TransferAbandoned as ab:
                # the link is far slower than the decision assumed: decide again at the rate
                # just seen, encode again and send the new bundle (once; no second watch)
                with self.ctl_lock:
                    self.estimator.update(ab.sent, ab.seconds)
                    decision = self.controller().decide(raw, self.estimator.mbps)
                res["replanned"] = {"from": profile, "to": decision.profile, "after_ms": _ms(ab.seconds),
                                    "sent_bytes": ab.sent, "abandoned_bytes": len(blob),
                                    "observed_mbps": round(ab.sent * 8 / ab.seconds / 1e6, 3)}
                config, profile = decision.config, decision.profile
                t1 = time.monotonic()
                blob = encode(kv, config, meta={"rid": rid, "seq_len": len(ids), "first_token": first})
                t2 = time.monotonic()
                res.update(profile=profile, kv_bytes=len(blob), encode_ms=res["encode_ms"] + _ms(t2 - t1))
                res["decision"] = {"profile": decision.profile, "reason": "replanned: " + decision.reason,
                                   "predicted_ms": decision.predicted_ms,
                                   "bandwidth_est_mbps": decision.bandwidth_mbps, "explored": decision.explored}
                watch = None
                continue
            except tp.TransportError as exc:
                res.update(error=f"{type(exc).__name__}: {exc}", attempts=client.stats.attempts,
                           retry_errors=client.stats.errors)
            finally:
                client.close()
            break
        res["t_done"] = time.monotonic()
        self.decisions.append({k: res.get(k) for k in ("rid", "profile", "kv_bytes", "transfer_ms", "ok")})
        del self.decisions[:-200]
        return res


class DecodeWorker:
    """Handles KV (decode the bundle on arrival, keep it) and DECODE (continue generation;
    recompute the prefill if the KV never arrived)."""

    def __init__(self, model, capacity: int = 256):
        from ..models import kv_shapes
        from ..pipeline import kv_nbytes

        self.model, self.capacity = model, capacity
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
        from ..models import check_kv_fits

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
        from ..pipeline import decode

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
            kv, bmeta = decode(blob, max_bytes=self.max_kv_bytes, expect=self._expect(meta.get("rid")))
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
                rest = continue_greedy(self.model, kv, len(ids), first, max_new - 1)
            except Exception:  # stored KV that passed the checks still unusable: recompute
                if fallback:
                    raise
                fallback = True
                self.fallbacks += 1
                kv, first = prefill_first(self.model, ids)
                t_first = time.monotonic()
                rest = continue_greedy(self.model, kv, len(ids), first, max_new - 1)
        return {"rid": rid, "tokens": [first] + rest, "fallback": fallback, "t_first": t_first,
                "recompute_ms": _ms(t_first - t0) if fallback else 0.0, "gen_ms": _ms(time.monotonic() - t_first)}


def _worker_main(role: str, secret: bytes, conn, threads: int, model_name: str, host: str, port: int,
                 decode_addr, opts: dict):
    import warnings

    import torch

    from ..stages import codecs

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(threads)

    codecs.set_threads(threads)
    try:
        model, _ = load_model_fast(model_name)
        if role == "prefill":
            w = PrefillWorker(model, secret, decode_addr, retries=opts.get("retries", 2),
                              min_quality=opts.get("min_quality", 97.0), epsilon=opts.get("epsilon", 0.0),
                              library=opts.get("library"))
        else:
            w = DecodeWorker(model)
        srv = tp.FrameServer(w.handle, secret, host=host, port=port, max_frame=opts.get("max_frame", tp.DEFAULT_MAX_FRAME))
    except Exception as exc:  # report start-up failures to the parent
        if conn is not None:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    if conn is not None:
        conn.send(("ok", srv.address))
        conn.close()
    else:
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

        cmd = [sys.executable, "-m", "kvserve.serving.engine", role, "--host", self.host, "--threads", str(self.threads),
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


# ------------------------------------------------------------------ stand-alone workers / router


def main(argv=None) -> int:
    """``python -m kvserve.serving.engine {prefill,decode,route}``: run one worker in the
    foreground (prints its address as JSON), or route prompts to running workers.
    The shared secret comes from ``KVSERVE_SECRET`` (at least 16 bytes)."""
    p = argparse.ArgumentParser(prog="python -m kvserve.serving.engine")
    sub = p.add_subparsers(dest="cmd", required=True)
    for role in ("prefill", "decode"):
        w = sub.add_parser(role)
        w.add_argument("--host", default="127.0.0.1")
        w.add_argument("--port", type=int, default=0)
        w.add_argument("--threads", type=int, default=1)
        w.add_argument("--model", default="smollm2")
        w.add_argument("--retries", type=int, default=2)
        if role == "prefill":
            w.add_argument("--decode", default=None, help="HOST:PORT of the decode worker (default: per request)")
            w.add_argument("--min-quality", type=float, default=97.0)
            w.add_argument("--epsilon", type=float, default=0.0, help="controller exploration probability")
            w.add_argument("--library", default=None, help="profile library JSON (default: the packaged one)")
    r = sub.add_parser("route")
    r.add_argument("--prefill", required=True)
    r.add_argument("--decode", required=True)
    r.add_argument("--mode", default="adaptive", choices=MODES)
    r.add_argument("--link-mbps", type=float, default=None)
    r.add_argument("--max-new", type=int, default=16)
    r.add_argument("--tokens", default="128,512", help="prompt lengths (sotu test text)")
    args = p.parse_args(argv)
    secret = tp._secret(None)

    def addr(s):
        h, _, port = s.rpartition(":")
        return (h, int(port))

    if args.cmd in ("prefill", "decode"):
        _worker_main(args.cmd, secret, None, args.threads, args.model, args.host, args.port,
                     addr(args.decode) if getattr(args, "decode", None) else None,
                     {"min_quality": getattr(args, "min_quality", 97.0), "retries": args.retries,
                      "epsilon": getattr(args, "epsilon", 0.0), "library": getattr(args, "library", None)})
        return 0
    pd = PDCluster(secret=secret)
    pd.prefill_addr, pd.decode_addr = addr(args.prefill), addr(args.decode)
    tok = load_tokenizer()
    for n, ids in zip(map(int, args.tokens.split(",")), sotu_prompts(tok, [int(x) for x in args.tokens.split(",")])):
        res = pd.generate(ids, args.max_new, args.mode, args.link_mbps)
        print(json.dumps({**res.row(), "text": tok.decode(res.tokens)}))
    return 0


def sotu_prompts(tok, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Real prompts: windows of the given token lengths from the sotu test split."""
    from ..quality import sotu_texts, token_windows

    texts = sotu_texts("test")
    return [token_windows(tok, texts, 1, n, seed + i)[0] for i, n in enumerate(lengths)]


if __name__ == "__main__":
    sys.exit(main())
