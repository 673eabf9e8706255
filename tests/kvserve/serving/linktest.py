"""Paced vs kernel-shaped links: does the sender's token bucket match a real ``tc`` link?

``compare(rate_mbps)`` builds two network namespaces joined by a veth pair whose sending side
is shaped by ``tc tbf`` at ``rate_mbps``, runs a KV-channel receiver in one namespace and an
unpaced sender in the other (kernel-shaped throughput), then sends the same frames over
loopback paced by :class:`kvserve.serving.transport.TokenBucket` at the same rate, and returns both
throughputs. Needs root (``ip netns add``); the namespaces get unique names and are deleted
in ``finally``. Addresses exist only inside them (10.77.0.1/24 and 10.77.0.2/24).

``python tests/kvserve/serving/linktest.py {serve,send,compare}``; the secret comes from
``KVSERVE_SECRET``. Test scaffolding (tests/kvserve/serving/test_shaped_link.py), not library code.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from kvserve.serving import transport as tp

T_DATA, T_BYE = 1, 2


def _handler(ftype, payload, info):
    if ftype == T_BYE:
        import threading

        threading.Timer(0.05, os._exit, args=(0,)).start()
    return ftype, b"ok"


def serve(host: str, port: int) -> None:
    srv = tp.FrameServer(_handler, None, host=host, port=port)
    print(json.dumps({"address": list(srv.address)}), flush=True)
    srv.serve_forever()


def send(address, nbytes: int, repeats: int = 2, pace_mbps: float | None = None, secret=None) -> dict:
    """Send ``repeats`` frames of ``nbytes``; throughput = payload bits / (send -> ack)."""
    payload = os.urandom(nbytes)
    out = []
    with tp.FrameClient(address, secret, retries=0, timeout=60) as c:
        c.request(T_DATA, b"warm")
        for _ in range(repeats):
            pacer = tp.TokenBucket(pace_mbps * 1e6 / 8) if pace_mbps else None
            t0 = time.perf_counter()
            c.request(T_DATA, payload, pacer)
            out.append(nbytes * 8 / (time.perf_counter() - t0) / 1e6)
    return {"mbps": sorted(out)[len(out) // 2], "samples": out}


def _run(cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def netns_available() -> tuple[bool, str]:
    name = f"kvsprobe{os.getpid()}"
    try:
        r = _run(["ip", "netns", "add", name], check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return False, f"iproute2 not usable: {exc}"
    if r.returncode != 0:
        return False, f"`ip netns add` not permitted: {r.stderr.strip()}"
    _run(["ip", "netns", "del", name], check=False)
    try:
        r = _run(["tc", "-V"], check=False)
    except FileNotFoundError:
        return False, "tc (iproute2) not installed"
    return True, ""


def compare(rate_mbps: float = 40.0, nbytes: int = 4_000_000, repeats: int = 2) -> dict:
    """Kernel-shaped (tc tbf on a veth between two namespaces) vs token-bucket paced throughput."""
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"kvsA{tag}", f"kvsB{tag}"
    va, vb = f"kvsa{tag}", f"kvsb{tag}"
    secret = tp.new_secret().decode()
    env = dict(os.environ, KVSERVE_SECRET=secret)
    py = [sys.executable, os.path.abspath(__file__)]
    server = None
    try:
        _run(["ip", "netns", "add", ns_a])
        _run(["ip", "netns", "add", ns_b])
        _run(["ip", "link", "add", va, "netns", ns_a, "type", "veth", "peer", "name", vb, "netns", ns_b])
        _run(["ip", "-n", ns_a, "addr", "add", "10.77.0.1/24", "dev", va])
        _run(["ip", "-n", ns_b, "addr", "add", "10.77.0.2/24", "dev", vb])
        for ns, dev in ((ns_a, va), (ns_b, vb)):
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # shape A -> B (the direction the KV travels)
        _run(["ip", "netns", "exec", ns_a, "tc", "qdisc", "add", "dev", va, "root", "tbf", "rate", f"{rate_mbps}mbit",
              "burst", "32kb", "latency", "200ms"])
        server = subprocess.Popen(["ip", "netns", "exec", ns_b] + py + ["serve", "--host", "10.77.0.2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = server.stdout.readline()
        if not line:
            raise tp.TransportError(f"link-test server did not start: {server.stderr.read()[-1000:]}")
        port = json.loads(line)["address"][1]
        r = subprocess.run(["ip", "netns", "exec", ns_a] + py + ["send", "--to", f"10.77.0.2:{port}", "--bytes",
                                                                 str(nbytes), "--repeats", str(repeats)],
                           capture_output=True, text=True, env=env, timeout=120, check=True)
        shaped = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in (ns_a, ns_b):
            _run(["ip", "netns", "del", ns], check=False)
    with tp.FrameServer(_handler, secret) as srv:
        paced = send(srv.address, nbytes, repeats, pace_mbps=rate_mbps, secret=secret)
    return {"rate_mbps": rate_mbps, "bytes": nbytes, "kernel_shaped_mbps": shaped["mbps"],
            "paced_mbps": paced["mbps"], "rel_diff": abs(shaped["mbps"] - paced["mbps"]) / paced["mbps"],
            "shaped_samples": shaped["samples"], "paced_samples": paced["samples"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="linktest.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("send")
    c.add_argument("--to", required=True)
    c.add_argument("--bytes", type=int, default=4_000_000)
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("--pace-mbps", type=float, default=None)
    m = sub.add_parser("compare")
    m.add_argument("--rates-mbps", default="20,40,100")
    m.add_argument("--bytes", type=int, default=4_000_000)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.host, args.port)
    elif args.cmd == "send":
        h, _, port = args.to.rpartition(":")
        print(json.dumps(send((h, int(port)), args.bytes, args.repeats, args.pace_mbps)))
    else:
        ok, why = netns_available()
        if not ok:
            print(f"skipped: {why}", file=sys.stderr)
            return 1
        for r in args.rates_mbps.split(","):
            print(json.dumps(compare(float(r), args.bytes)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
