"""The vLLM KV connector (src/kvserve/serving/vllm_connector.py, with serving/paged.py,
serving/push.py and serving/store.py) on the real SmolLM2-135M.

vLLM lives in its own environment (``scripts/setup_vllm.sh`` builds ``.venv-vllm``), so the
vLLM part runs in a subprocess with that environment's python, or with this interpreter when
it has vLLM itself. This file is also that subprocess's script
(``python test_vllm_connector.py pd|units ...``); the engine runs in the subprocess's own
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the connector's counters are readable there.

``pd`` runs three engines one after the other on the community CPU build:
plain vLLM (the reference), a ``kv_producer`` that prefills every prompt (max_tokens=1) and
stores kvserve bundles, and a ``kv_consumer`` that loads them and decodes. Per request the
producer gets ``kv_transfer_params`` choosing the profile and the store key, as a router would
pass them; the consumer gets the same key. Cases: lossless ``bf16``, lossy ``kvserve``, the
default key (prompt hash, fixed profile), a bundle corrupted in the store (CRC -> the
scheduler reports no hit) and a well-formed bundle that does not fit the model (the worker
reports its blocks -> vLLM recomputes, ``kv_load_failure_policy="recompute"``).

``direct`` runs the direct transfer mode: the producer in this subprocess, the consumer in a
child process started at the same time (its scheduler listens on a loopback port), bundles
pushed over the KV channel; compared with ``pd``'s plain run. ``units`` drives the roles by
hand (no engine), including heterogeneous tensor parallelism in both modes; ``device`` runs
the connector's device path in Triton's interpreter.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("vllm_test_env", ROOT / "tests" / "vllm_env.py")
vllm_env = sys.modules.get("vllm_test_env") or importlib.util.module_from_spec(_spec)
if "vllm_test_env" not in sys.modules:
    sys.modules["vllm_test_env"] = vllm_env
    _spec.loader.exec_module(vllm_env)
MODULE = "kvserve.serving.vllm_connector"
TEXT = (
    "Mr. Speaker, Mr. Vice President, Members of Congress, my fellow Americans: tonight I "
    "report to you on the state of our Union. Our economy is growing, our schools are "
    "improving, and our people are working hard to build a better future for their children. "
    "We have faced hard challenges together, and we have met them with courage and resolve. "
)
PROMPTS = [
    TEXT + "The most important task before us this year is",
    TEXT + TEXT + "In the coming decade, our nation will",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
]
MAX_TOKENS = 12
BLOCK_SIZE = 32
SECRET = "kvserve-test-secret-0123456789abcdef"  # the deployment secret both instances share


# ------------------------------------------------------------------------- subprocess side


def _llm(model: str, kv: dict | None):
    from vllm import LLM

    kw = {}
    if kv is not None:
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(**kv)
    return LLM(model=model, dtype="bfloat16", max_model_len=512, max_num_seqs=16, block_size=BLOCK_SIZE,
               enforce_eager=True, seed=0, enable_prefix_caching=False, **kw)


def _close(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _outputs(outs) -> list[dict]:
    return [{"ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
             "logprobs": [s[t].logprob if s else None
                          for t, s in zip(o.outputs[0].token_ids, o.outputs[0].logprobs or [])],
             # the top candidates of the first generated token, {token id: log-probability}
             "first_top": {str(t): lp.logprob for t, lp in (o.outputs[0].logprobs or [{}])[0].items()},
             "prompt_len": len(o.prompt_token_ids), "num_cached_tokens": o.num_cached_tokens,
             "kv_transfer_params": o.kv_transfer_params} for o in outs]


def _groups(cases: list) -> list[list]:
    """The lossless cases first, alone: their batches then match the plain run's exactly (bf16
    matmul results on the CPU depend on the batch, so any other mix changes the last bits)."""
    first = [c for c in cases if c[0].startswith("bf16-")]
    return [first, [c for c in cases if c not in first]]


def _pd(out: str, model: str, work: str) -> None:
    import time

    import torch
    from vllm import SamplingParams

    import kvserve
    from kvserve.serving import push
    from kvserve.serving import vllm_connector as vc
    from kvserve.serving.store import FileStore

    work = Path(work)
    store = work / "store"
    res: dict = {"timing": {}}

    # the cases: (name, kv_transfer_params for producer and consumer)
    cases = []
    for i, prompt in enumerate(PROMPTS):
        cases.append((f"bf16-{i}", prompt, {"kvserve_key": f"bf16x{i}", "kvserve_compression": "bf16"}))
        cases.append((f"kvserve-{i}", prompt, {"kvserve_key": f"lossyx{i}", "kvserve_compression": "kvserve"}))
    cases.append(("default-0", PROMPTS[0], None))  # prompt-hash key, the instance's setting
    cases.append(("corrupt-1", PROMPTS[1], {"kvserve_key": "corruptx1", "kvserve_compression": "bf16"}))
    cases.append(("misfit-2", PROMPTS[2], {"kvserve_key": "misfitx2", "kvserve_compression": "bf16"}))
    cases.append(("missing-2", PROMPTS[2], {"kvserve_key": "missingx2"}))
    cases.append(("zeros-0", PROMPTS[0], {"kvserve_key": "zerosx0", "kvserve_compression": "bf16"}))

    greedy = dict(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5, seed=0)

    t0 = time.perf_counter()
    llm = _llm(model, None)
    res["plain"] = _outputs(llm.generate(PROMPTS, SamplingParams(**greedy), use_tqdm=False))
    _close(llm)
    res["timing"]["plain_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    base = {"kv_connector": "KVServeConnector", "kv_connector_module_path": MODULE,
            "kv_load_failure_policy": "recompute"}
    # the instance's own setting (used by requests that do not choose): the online controller
    # when kvserve.controller and its profile library are there, else a fixed profile
    default: object = {"mode": "controller", "bandwidth_mbps": 100, "min_quality": 97, "seed": 0}
    try:
        push.controller_from_settings(push.resolve_compression(default)[1])
    except Exception as exc:
        res["controller_unavailable"] = f"{type(exc).__name__}: {exc}"
        default = "cachegen"
    res["default_compression"] = default
    llm = _llm(model, {**base, "kv_role": "kv_producer",
                       "kv_connector_extra_config": {"store": str(store), "compression": default, "secret": SECRET}})
    before = dict(vc.STATS)
    prod = [(name, prompt, params) for name, prompt, params in cases if name != "missing-2"]
    res["producer"] = {}
    for group in _groups(prod):  # the bf16 cases alone, in the plain run's order (same batches)
        sps = [SamplingParams(temperature=0.0, max_tokens=1, extra_args={"kv_transfer_params": p} if p else None)
               for _, _, p in group]
        outs = _outputs(llm.generate([p for _, p, _ in group], sps, use_tqdm=False))
        res["producer"].update({name: o for (name, _, _), o in zip(group, outs)})
    res["producer_stats"] = {k: vc.STATS[k] - before.get(k, 0) for k in vc.STATS}
    _close(llm)
    res["timing"]["producer_s"] = time.perf_counter() - t0

    # store keys are "u<client key>.<rank>" and "p<prompt hash>.<rank>"; entries are sealed
    fs = FileStore(store, SECRET)
    files = {p.name.split(".")[0][1:]: p.name[:-len(".kvsv")] for p in store.glob("*.kvsv")}
    res["bundles"] = {}
    for key, skey in files.items():
        data = fs.get(skey)
        kv, meta = kvserve.decode(data)
        raw = sum(k.numel() * 2 + v.numel() * 2 for k, v in kv)
        header, _ = kvserve.pipeline.parse_header(data)
        res["bundles"][key] = {"bytes": len(data), "raw_bytes": raw, "profile": header["profile"]["name"],
                               "tokens": meta["seq_len"], "layers": len(kv), "shape": list(kv[0][0].shape)}
    # damage the stored bundles of two cases
    c = fs.path(files["corruptx1"])  # one flipped byte in the file: the seal fails
    data = bytearray(c.read_bytes())
    data[len(data) // 2] ^= 0x55
    c.write_bytes(bytes(data))
    m = files["misfitx2"]  # well-formed, sealed, right layer names and binding, wrong head count
    kv, meta = kvserve.decode(fs.get(m))
    bad = [(torch.zeros(1, k.shape[1] + 1, k.shape[2], k.shape[3], dtype=torch.bfloat16),) * 2 for k, _ in kv]
    fs.put(m, kvserve.encode(bad, "bf16", meta=meta))
    z = files["zerosx0"]  # fits the model but holds zeros: the consumer must get it wrong
    kv, meta = kvserve.decode(fs.get(z))
    fs.put(z, kvserve.encode([(torch.zeros_like(k), torch.zeros_like(v)) for k, v in kv], "bf16", meta=meta))

    t0 = time.perf_counter()
    llm = _llm(model, {**base, "kv_role": "kv_consumer", "kv_connector_extra_config": {"store": str(store), "secret": SECRET}})
    before = dict(vc.STATS)
    res["consumer"] = {}
    for group in _groups(cases):
        sps = [SamplingParams(**greedy, extra_args={"kv_transfer_params": {"kvserve_key": p["kvserve_key"]}} if p else None)
               for _, _, p in group]
        outs = _outputs(llm.generate([p for _, p, _ in group], sps, use_tqdm=False))
        res["consumer"].update({name: o for (name, _, _), o in zip(group, outs)})
    res["consumer_stats"] = {k: vc.STATS[k] - before.get(k, 0) for k in vc.STATS}
    res["case_prompt"] = {name: PROMPTS.index(prompt) for name, prompt, _ in cases}
    _close(llm)
    res["timing"]["consumer_s"] = time.perf_counter() - t0
    Path(out).write_text(json.dumps(res, indent=1))


def _wait_for(path: Path, timeout: float, proc=None) -> None:
    import time

    end = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the consumer process exited with {proc.returncode}")
        if time.monotonic() > end:
            raise TimeoutError(f"{path.name} did not appear in {timeout:.0f} s")
        time.sleep(0.2)


def _direct(out: str, model: str, work: str) -> None:
    """Direct mode: this process runs the producer; a child process (``direct-consumer``) runs
    the consumer, whose scheduler listens on a loopback port. Both engines start at once; the
    producer prefills every case (max_tokens=1), pushing each bundle as it completes, then
    pushes some bundles of its own as a party holding the secret would (zeros of the right
    shape, wrong layer names, a wrong head count) and one without the secret, and tells the
    consumer to decode. The consumer gets the producer's returned ``kv_transfer_params``, as a
    router would pass them."""
    import os
    import random
    import socket
    import time

    import torch
    from vllm import SamplingParams
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

    import kvserve
    from kvserve.serving import push
    from kvserve.serving import transport as tp
    from kvserve.serving import vllm_connector as vc
    from kvserve.serving.direct import T_BUNDLE
    from kvserve.serving.store import binding

    work = Path(work)
    # a free loopback port for the consumer's receiver, below Linux's ephemeral range: the two
    # engines start at once and bind ports of their own (port 0), which once took the one an
    # ephemeral pick had freed for the consumer ("Address already in use" in CI)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    log = open(work / "consumer.log", "w")
    child = subprocess.Popen([sys.executable, __file__, "direct-consumer", str(work / "consumer.json"), model,
                              str(work), str(port)], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    res: dict = {"timing": {}, "port": port}
    try:
        t0 = time.perf_counter()
        cases = [(f"bf16-{i}", p, {"kvserve_key": f"dbf16x{i}", "kvserve_compression": "bf16"})
                 for i, p in enumerate(PROMPTS)]
        cases += [("kvserve-1", PROMPTS[1], {"kvserve_key": "dlossyx1", "kvserve_compression": "kvserve"}),
                  ("default-2", PROMPTS[2], None)]  # prompt-hash key, the controller at the live estimate
        default = {"mode": "controller", "bandwidth_mbps": 100, "min_quality": 97, "seed": 0}
        try:
            push.controller_from_settings(push.resolve_compression(default)[1])
        except Exception as exc:
            res["controller_unavailable"] = f"{type(exc).__name__}: {exc}"
            default = "cachegen"
        res["default_compression"] = default
        llm = _llm(model, {"kv_connector": "KVServeConnector", "kv_connector_module_path": MODULE,
                           "kv_load_failure_policy": "recompute", "kv_role": "kv_producer",
                           "kv_connector_extra_config": {"transfer": "direct", "peer": f"127.0.0.1:{port}",
                                                         "compression": default, "secret": SECRET}})
        res["timing"]["producer_start_s"] = time.perf_counter() - t0
        _wait_for(work / "ready", 900, child)
        res["timing"]["consumer_ready_s"] = time.perf_counter() - t0
        before = dict(vc.STATS)
        res["producer"], ids = {}, {}
        t1 = time.perf_counter()
        for group in _groups(cases):
            sps = [SamplingParams(temperature=0.0, max_tokens=1, extra_args={"kv_transfer_params": p} if p else None)
                   for _, _, p in group]
            outs = llm.generate([p for _, p, _ in group], sps, use_tqdm=False)
            res["producer"].update({name: o for (name, _, _), o in zip(group, _outputs(outs))})
            ids.update({PROMPTS.index(p): list(o.prompt_token_ids) for (_, p, _), o in zip(group, outs)})
        res["timing"]["producer_generate_s"] = time.perf_counter() - t1
        res["producer_stats"] = {k: vc.STATS[k] - before.get(k, 0) for k in vc.STATS}
        worker = get_kv_transfer_group()
        res["pusher"] = worker._pusher.state()
        if worker._fixed is None:  # what the controller would choose for default-2 at the setting's 100 Mbps
            raw = 2 * 2 * len(worker._kv_caches) * worker._heads * worker._head_size * len(ids[2])
            res["decide_at_setting"] = worker._pusher.decide(raw, 100).profile
        names, model_id = list(worker._kv_caches), worker._model_id
        heads, d = worker._heads, worker._head_size

        # bundles of a party holding the secret: right shape but zeros; wrong layer names (the
        # receiver cannot tell, the worker can); a wrong head count (the receiver refuses it)
        def bundle(i: int, layer_names: list[str], h: int = heads) -> bytes:
            n = len(ids[i])
            kv = [(torch.zeros(1, h, n, d, dtype=torch.bfloat16),) * 2 for _ in layer_names]
            return kvserve.encode(kv, "bf16", meta={"seq_len": n, "layers": layer_names, "key": "x", "block_size": 32,
                                                    "bind": binding(model_id, ids[i])})

        own = [("udzerosx0", bundle(0, names), SECRET), ("udmisnamedx1", bundle(1, [f"x.{n}" for n in names]), SECRET),
               ("udrefusedx2", bundle(2, names, heads + 1), SECRET),
               ("udforgedx2", bundle(2, names), "not-the-deployment-secret-0123456789")]
        res["pushed"] = {}
        for key, blob, secret in own:
            try:
                with tp.FrameClient(("127.0.0.1", port), secret, retries=0, timeout=30) as c:
                    res["pushed"][key] = c.call(T_BUNDLE, {"key": f"{key}.tp0-1.pp0-1"}, blob)[0]
            except tp.TransportError as exc:
                res["pushed"][key] = f"{type(exc).__name__}: {exc}"
        _close(llm)
        consumer_params = {name: o["kv_transfer_params"] for name, o in res["producer"].items()}
        consumer_params.update({"missing-0": {"kvserve_key": "dmissingx0"}, "zeros-0": {"kvserve_key": "dzerosx0"},
                                "misnamed-1": {"kvserve_key": "dmisnamedx1"}, "refused-2": {"kvserve_key": "drefusedx2"},
                                "forged-2": {"kvserve_key": "dforgedx2"}})
        (work / "go.tmp").write_text(json.dumps(consumer_params))
        (work / "go.tmp").rename(work / "go")
        child.wait(timeout=900)
        if child.returncode != 0:
            raise RuntimeError(f"the consumer process exited with {child.returncode}")
        res["timing"]["total_s"] = time.perf_counter() - t0
        consumer = json.loads((work / "consumer.json").read_text())
        res["timing"].update(consumer.pop("timing"))
        res.update(consumer)
    except BaseException:
        log.flush()
        sys.stderr.write((work / "consumer.log").read_text()[-6000:])
        raise
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()
    Path(out).write_text(json.dumps(res, indent=1))


def _direct_consumer(out: str, model: str, work: str, port: str) -> None:
    import time

    from vllm import SamplingParams

    import kvserve
    from kvserve.serving import vllm_connector as vc

    work = Path(work)
    t0 = time.perf_counter()
    llm = _llm(model, {"kv_connector": "KVServeConnector", "kv_connector_module_path": MODULE,
                       "kv_load_failure_policy": "recompute", "kv_role": "kv_consumer",
                       "kv_connector_extra_config": {"transfer": "direct", "listen": f"127.0.0.1:{port}",
                                                     "secret": SECRET}})
    rx = vc.RECEIVERS[0]
    res: dict = {"timing": {"consumer_start_s": time.perf_counter() - t0}, "listening": list(rx.address)}
    (work / "ready").write_text("1")
    _wait_for(work / "go", 900)
    params = json.loads((work / "go").read_text())
    # what arrived: per key, its size, profile and raw KV size (nothing decoded here)
    res["inbox"] = {}
    for key, (data, _) in list(rx.inbox._items.items()):
        header, _ = kvserve.pipeline.parse_header(data)
        raw = kvserve.pipeline.kv_nbytes(kvserve.pipeline.header_shapes(header))
        res["inbox"][key] = {"bytes": len(data), "raw_bytes": raw, "profile": header["profile"]["name"],
                             "tokens": header["meta"]["seq_len"]}
    res["receiver"] = {"refused": rx.refused, "rejected": list(rx.server.rejected)}
    cases = [(name, PROMPTS[int(name[-1])], p) for name, p in params.items()]
    greedy = dict(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5, seed=0)
    before = dict(vc.STATS)
    res["consumer"] = {}
    t1 = time.perf_counter()
    for group in _groups(cases):
        sps = [SamplingParams(**greedy, extra_args={"kv_transfer_params": p} if p else None) for _, _, p in group]
        outs = _outputs(llm.generate([p for _, p, _ in group], sps, use_tqdm=False))
        res["consumer"].update({name: o for (name, _, _), o in zip(group, outs)})
    res["timing"]["consumer_generate_s"] = time.perf_counter() - t1
    res["consumer_stats"] = {k: vc.STATS[k] - before.get(k, 0) for k in vc.STATS}
    res["receive_stats"] = {k: vc.STATS[k] for k in ("received", "refused")}
    res["inbox_left"] = len(rx.inbox)
    res["case_prompt"] = {name: int(name[-1]) for name in params}
    _close(llm)
    Path(out).write_text(json.dumps(res, indent=1))


def _units(out: str, work: str) -> None:
    """The connector's pieces without an engine: the paged-layout gather/scatter against the
    CPU kernel's own writes (every ISA this CPU has) and against the K|V-on-content layout of
    the GPU backends, with virtual block splitting; the store; the compression settings."""
    import torch
    from vllm import _custom_ops as ops

    from kvserve.serving import paged as vc
    from kvserve.serving import push, store as st
    from kvserve.serving import vllm_connector as conn

    res: dict = {"cpu": [], "gpu_layout": [], "errors": {}}
    torch.manual_seed(0)
    isas = ["vec", "vec16"] + (["amx"] if torch.cpu._is_amx_tile_supported() else [])
    for isa in isas:
        for n, d, h in [(32, 64, 3), (128, 128, 2)]:
            pk, pv = vc.probe_cpu_tile_layout(isa, torch.bfloat16, h, n, d)
            cache = torch.zeros(6, h, n, 2 * d, dtype=torch.bfloat16)
            kc, vcache = vc.split_kv(cache, "CPU_ATTN")
            t = 2 * n + 5
            blocks = [4, 1, 5]
            k, v = torch.randn(1, h, t, d).bfloat16(), torch.randn(1, h, t, d).bfloat16()
            blk, off = vc.token_slots(blocks, n, n, 0, t)
            ops.cpu_attn_reshape_and_cache(k[0].permute(1, 0, 2).contiguous(), v[0].permute(1, 0, 2).contiguous(),
                                           kc, vcache, blk * n + off, isa)
            gathered = torch.equal(vc.gather_tokens(kc, blk, off, pk), k) and torch.equal(vc.gather_tokens(vcache, blk, off, pv), v)
            naive = torch.equal(vc.gather_tokens(kc, blk, off), k)
            other = torch.zeros_like(cache)
            k2, v2 = vc.split_kv(other, "CPU_ATTN")
            vc.scatter_tokens(k2, blk, off, k, pk)
            vc.scatter_tokens(v2, blk, off, v, pv)
            res["cpu"].append({"isa": isa, "block": n, "head": d, "gather_equals_written": gathered,
                               "scatter_equals_kernel": torch.equal(other, cache), "row_major_would_be_right": naive})
    # GPU backends: [blocks, heads, kernel_block, 2*head] with K then V along the last dim;
    # scheduler blocks of 64 tokens split into kernel blocks of 16
    h, d, bs, kbs = 2, 64, 64, 16
    cache = torch.zeros(12 * (bs // kbs), h, kbs, 2 * d, dtype=torch.float16)
    kc, vcache = vc.split_kv(cache, "FLASH_ATTN", d)
    k, v = torch.randn(1, h, 100, d).half(), torch.randn(1, h, 100, d).half()
    blk, off = vc.token_slots([7, 2], bs, kbs, 0, 100)
    vc.scatter_tokens(kc, blk, off, k)
    vc.scatter_tokens(vcache, blk, off, v)
    slots = (torch.tensor([7, 2]).repeat_interleave(bs)[:100] * bs + torch.arange(100) % bs)
    flat = cache.permute(0, 2, 1, 3).reshape(-1, h, 2 * d)  # [slot, head, content]
    res["gpu_layout"] = {"roundtrip": torch.equal(vc.gather_tokens(kc, blk, off), k) and torch.equal(vc.gather_tokens(vcache, blk, off), v),
                         "k_first_on_content": torch.equal(flat[slots, :, :d], k[0].permute(1, 0, 2)),
                         "v_second_on_content": torch.equal(flat[slots, :, d:], v[0].permute(1, 0, 2))}
    # the store and the keys
    store = st.FileStore(Path(work) / "store", SECRET)
    store.put(conn.bundle_key("abc123", "tp0-1.pp0-1"), b"x" * 10)
    import os
    import threading

    os.mkfifo(store.path("fifo1.tp0-1.pp0-1"))  # a FIFO planted under a key is never read (no blocking)
    fifo: list = []

    def read_fifo():
        try:
            fifo.append(store.get("fifo1.tp0-1.pp0-1"))
        except Exception as exc:
            fifo.append(type(exc).__name__)

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    reader.join(5)
    res["store"] = {"get": store.get("abc123.tp0-1.pp0-1") == b"x" * 10, "missing": store.get("nope.tp0-1.pp0-1") is None,
                    "fifo_skipped": fifo == ["KVServeError"],
                    "no_tmp_left": not list((Path(work) / "store").glob(".tmp-*")),
                    "key_stable": conn.prompt_key([1, 2, 3]) == conn.prompt_key((1, 2, 3)) != conn.prompt_key([1, 2, 3], "m")}
    for name, fn in {"bad_key": lambda: store.path("../etc.tp0-1.pp0-1"),
                     "url_store": lambda: st.open_store("http://localhost"),
                     "bad_profile": lambda: push.resolve_compression("no-such-profile"),
                     "bad_controller": lambda: push.resolve_compression({"mode": "controller"}),
                     "too_big": lambda: vc.token_slots([0], 32, 32, 0, 40)}.items():
        try:
            fn()
            res["errors"][name] = None
        except Exception as exc:
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
    # the connector's own settings, refused at start-up with a clear error
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    sdir = str(Path(work) / "cfg-store")
    for name, (role_name, extra, tp_size, heads) in {
        "bad_transfer": ("kv_producer", {"transfer": "p2p"}, 1, None),
        "direct_no_peer": ("kv_producer", {"transfer": "direct"}, 1, None),
        "direct_no_listen": ("kv_consumer", {"transfer": "direct"}, 1, None),
        "direct_with_store": ("kv_consumer", {"transfer": "direct", "listen": "127.0.0.1:0", "store": sdir}, 1, None),
        "store_with_peer": ("kv_producer", {"store": sdir, "peer": "127.0.0.1:1"}, 1, None),
        "bad_peer": ("kv_producer", {"transfer": "direct", "peer": "nohost"}, 1, None),
        "bad_inbox": ("kv_consumer", {"transfer": "direct", "listen": "127.0.0.1:0", "inbox_mb": -1}, 1, None),
        "bad_tp": ("kv_consumer", {"store": sdir}, 2, 3),
        "bad_producer_tp": ("kv_consumer", {"store": sdir, "producer_tp": 3}, 1, 4),
        "unknown_heads_other_tp": ("kv_consumer", {"store": sdir, "producer_tp": 2}, 1, None),
    }.items():
        try:
            _make(role_name, KVConnectorRole.SCHEDULER, extra, tp=tp_size, heads=heads)
            res["errors"][name] = None
        except Exception as exc:
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
    res["fixed"] = push.resolve_compression("bf16")[1]["name"]
    from kvserve.library import load_library, packaged_libraries

    accept = conn.accepted_profiles(None)
    res["accepts_packaged_libraries"] = {lib: all(conn.canonical_profile(e.config) in accept
                                                  for e in load_library(lib).entries) for lib in packaged_libraries()}
    # controller mode: a decision per request when kvserve.controller and its library exist
    try:
        mode, setting = push.resolve_compression({"mode": "controller", "bandwidth_mbps": 100, "seed": 0})
        pusher = push.Pusher(push.controller_from_settings(setting))
        kv = [(torch.randn(1, 3, 64, 64).bfloat16(),) * 2 for _ in range(4)]
        sent = []
        r = pusher.push(kv, None, {"seq_len": 64}, lambda blob, progress: sent.append(blob) or push.Sent(5.0),
                        bandwidth_mbps=setting["bandwidth_mbps"])
        # a request's own bandwidth estimate: a slow link compresses, a very fast one does not
        slow = pusher.decide(16 << 20, 10)
        fast = pusher.decide(16 << 20, 1e7)
        res["controller"] = {"profile": r["profile"], "pipeline": r["decision"]["profile"], "bytes": len(sent[0]),
                             "slow": [slow.profile, slow.ratio], "fast": [fast.profile, fast.ratio]}
    except Exception as exc:
        res["controller"] = {"error": f"{type(exc).__name__}: {exc}"}
    res["roles"] = _roles(str(Path(work) / "roles"))
    res["tp_store"] = _tp_roles("store", work)
    res["tp_direct"] = _tp_roles("direct", work)
    try:  # the same against a real Redis server (Debian's redis-server), when there is one
        import redis  # noqa: F401

        sys.path.insert(0, str(ROOT / "tests" / "kvserve"))
        from kvserve_servers import RedisServer

        with RedisServer() as server:
            res["roles_redis"] = _roles(server.url + "/0")
    except Exception as exc:
        res["roles_redis"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    Path(out).write_text(json.dumps(res, indent=1))


def _roles(store: str) -> dict:
    """Scheduler and worker roles driven by hand (no engine): a producer following a chunked
    prefill over two steps and three blocks, saving from a CPU-layout paged cache; a consumer
    finding the bundle, planning the load and scattering it into other blocks."""
    from types import SimpleNamespace as NS

    import torch
    from vllm import _custom_ops as ops
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvserve.serving import paged as vc
    from kvserve.serving import vllm_connector as conn

    bs, h, d, layers = 32, 3, 64, ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    fwd = {n: NS(attn_backend=NS(get_name=lambda: "CPU_ATTN"), head_size=d, isa="vec") for n in layers}

    def make(role_name, role):
        cfg = NS(kv_transfer_config=KVTransferConfig(
                     kv_connector="KVServeConnector", kv_connector_module_path=MODULE, kv_role=role_name,
                     kv_connector_extra_config={"store": store, "compression": "bf16", "secret": SECRET}),
                 cache_config=NS(block_size=bs, cache_dtype="auto"), model_config=NS(use_mla=False),
                 parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1),
                 compilation_config=NS(static_forward_context=fwd))
        return conn.KVServeConnector(cfg, role, NS(kv_cache_groups=[NS(layer_names=layers)]))

    def step(new=(), cached=(), sched=None):
        c = NS(req_ids=[x[0] for x in cached], new_block_ids=[x[1] for x in cached],
               num_computed_tokens=[x[2] for x in cached], resumed_req_ids=set())
        return NS(scheduled_new_reqs=list(new), scheduled_cached_reqs=c, num_scheduled_tokens=sched or {})

    out: dict = {}
    prompt = list(range(1000, 1070))  # 70 tokens: three blocks
    req = NS(request_id="r1", prompt_token_ids=prompt, kv_transfer_params=None)
    sched = make("kv_producer", KVConnectorRole.SCHEDULER)
    sched.on_new_request(req)
    m1 = sched.build_connector_meta(step(new=[NS(req_id="r1", prompt_token_ids=prompt, block_ids=([5, 2],),
                                                 num_computed_tokens=0)], sched={"r1": 64}))
    m2 = sched.build_connector_meta(step(cached=[("r1", ([7],), 64)], sched={"r1": 6}))
    out["chunked_save_step"] = [len(m1.transfers), len(m2.transfers)]
    tr = m2.transfers[0]
    out["save_plan"] = {"blocks": tr.block_ids[0], "end": tr.end, "is_store": tr.is_store}
    out["finished_params"] = sched.request_finished(req, [])[1]

    # worker: write real KV through the CPU kernel into blocks 5, 2, 7, save it
    torch.manual_seed(1)
    kv = {n: (torch.randn(1, h, 70, d).bfloat16(), torch.randn(1, h, 70, d).bfloat16()) for n in layers}
    caches = {}
    for n in layers:
        cache = torch.zeros(10, h, bs, 2 * d, dtype=torch.bfloat16)
        kc, vcache = vc.split_kv(cache, "CPU_ATTN")
        blk, off = vc.token_slots([5, 2, 7], bs, bs, 0, 70)
        ops.cpu_attn_reshape_and_cache(kv[n][0][0].permute(1, 0, 2).contiguous(), kv[n][1][0].permute(1, 0, 2).contiguous(),
                                       kc, vcache, blk * bs + off, "vec")
        caches[n] = cache
    worker = make("kv_producer", KVConnectorRole.WORKER)
    worker.register_kv_caches(caches)
    worker.bind_connector_metadata(m2)
    for n in layers:
        worker.save_kv_layer(n, caches[n], None)
    worker.wait_for_save()
    worker.clear_connector_metadata()
    import kvserve

    got, meta = kvserve.decode(worker._store.get(conn.bundle_key(tr.key, "tp0-1.pp0-1")))
    out["bundle_equals_written"] = meta["layers"] == layers and all(
        torch.equal(got[i][0], kv[n][0]) and torch.equal(got[i][1], kv[n][1]) for i, n in enumerate(layers))

    # consumer scheduler: 69 tokens to load; local hit of one block -> load the rest
    csched = make("kv_consumer", KVConnectorRole.SCHEDULER)
    creq = NS(request_id="c1", prompt_token_ids=prompt, kv_transfer_params=None)
    out["matched"] = [list(csched.get_num_new_matched_tokens(creq, 0)), list(csched.get_num_new_matched_tokens(creq, 32))]
    csched.update_state_after_alloc(creq, NS(get_block_ids=lambda: ([1, 8, 3],)), 37)
    m3 = csched.build_connector_meta(step(new=[NS(req_id="c1", prompt_token_ids=prompt, block_ids=([1, 8, 3],),
                                                  num_computed_tokens=32)], sched={"c1": 1}))
    lt = m3.transfers[0]
    out["load_plan"] = {"blocks": lt.block_ids[0], "start": lt.start, "end": lt.end, "is_store": lt.is_store}
    other = {n: torch.zeros(10, h, bs, 2 * d, dtype=torch.bfloat16) for n in layers}
    cworker = make("kv_consumer", KVConnectorRole.WORKER)
    cworker.register_kv_caches(other)
    cworker.bind_connector_metadata(m3)
    cworker.start_load_kv(None)
    pk, pv = vc.probe_cpu_tile_layout("vec", torch.bfloat16, h, bs, d)
    ok, untouched = True, True
    for n in layers:
        kc, vcache = vc.split_kv(other[n], "CPU_ATTN")
        blk, off = vc.token_slots([1, 8, 3], bs, bs, 32, 69)
        ok &= torch.equal(vc.gather_tokens(kc, blk, off, pk), kv[n][0][:, :, 32:69])
        ok &= torch.equal(vc.gather_tokens(vcache, blk, off, pv), kv[n][1][:, :, 32:69])
        tail_blk, tail_off = vc.token_slots([1, 8, 3], bs, bs, 69, 96)  # the last token, the free tail
        untouched &= not other[n][1].any().item()  # the locally computed block
        untouched &= not vc.gather_tokens(kc, tail_blk, tail_off, pk).any().item()
        untouched &= not vc.gather_tokens(vcache, tail_blk, tail_off, pv).any().item()
    out["loaded_equals_saved"] = bool(ok)
    out["outside_range_untouched"] = bool(untouched)
    out["load_errors"] = sorted(cworker.get_block_ids_with_load_errors())
    # KV belongs to the tokens it encodes: r1's genuine bundle under a client key ("ushared1")
    # is found by r1's tokens, never by another prompt naming the same key
    worker._store.put("ushared1.tp0-1.pp0-1", worker._store.get(conn.bundle_key(tr.key, "tp0-1.pp0-1")))
    shared = {"kvserve_key": "shared1"}
    same = NS(request_id="c3", prompt_token_ids=prompt, kv_transfer_params=shared)
    foreign = NS(request_id="c4", prompt_token_ids=list(range(2000, 2070)), kv_transfer_params=shared)
    # a client key equal to r1's prompt hash is a different store key: it cannot reach r1's entry
    # from another prompt either
    spoof = NS(request_id="c5", prompt_token_ids=list(range(2000, 2070)),
               kv_transfer_params={"kvserve_key": out["finished_params"]["kvserve_key"]})
    s2 = make("kv_consumer", KVConnectorRole.SCHEDULER)
    out["matched_same_tokens"] = list(s2.get_num_new_matched_tokens(same, 0))
    out["matched_foreign_tokens"] = list(s2.get_num_new_matched_tokens(foreign, 0))
    out["matched_spoofed_key"] = list(s2.get_num_new_matched_tokens(spoof, 0))
    # the same load against a corrupted bundle: no hit in the scheduler
    data = bytearray(worker._store.get(conn.bundle_key(tr.key, "tp0-1.pp0-1")))
    data[100] ^= 1
    worker._store.put(conn.bundle_key(tr.key, "tp0-1.pp0-1"), bytes(data))
    out["matched_corrupt"] = list(make("kv_consumer", KVConnectorRole.SCHEDULER).get_num_new_matched_tokens(creq, 0))
    # ... and a worker handed a plan for it reports the planned blocks
    cworker.bind_connector_metadata(m3)
    cworker.start_load_kv(None)
    out["load_errors_corrupt"] = sorted(cworker.get_block_ids_with_load_errors())
    # hostile bundles under the key (issue 16), even sealed with the right secret: the scheduler
    # reports no hit (no RecursionError escapes its hook), the worker refuses them before decoding
    import time

    adv = Path(__file__).parents[1] / "data" / "adversarial"
    out["hostile"] = {}
    for name in ("nested-meta.kvsv", "bomb-3.6GB.kvsv"):
        worker._store.put(conn.bundle_key(tr.key, "tp0-1.pp0-1"), (adv / name).read_bytes())
        matched = list(make("kv_consumer", KVConnectorRole.SCHEDULER).get_num_new_matched_tokens(creq, 0))
        cworker.bind_connector_metadata(m3)
        t0 = time.perf_counter()
        cworker.start_load_kv(None)
        out["hostile"][name] = {"matched": matched, "load_errors": sorted(cworker.get_block_ids_with_load_errors()),
                                "fast": time.perf_counter() - t0 < 5}
    return out


def _make(role_name: str, role, extra: dict, *, tp: int = 1, heads: int | None = None, layers=None,
          block_size: int = BLOCK_SIZE, head_size: int = 64, backend: str = "CPU_ATTN", isa: str | None = "vec"):
    """A connector of one role built from a hand-made vLLM config (no engine): ``tp``
    tensor-parallel ranks of a model with ``heads`` KV heads (None: a config that does not say)."""
    from types import SimpleNamespace as NS

    from vllm.config import KVTransferConfig

    from kvserve.serving import vllm_connector as conn

    layers = layers or ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    fwd = {n: NS(attn_backend=NS(get_name=lambda: backend), head_size=head_size, isa=isa) for n in layers}
    model = NS(use_mla=False, model="test-model")
    if heads is not None:
        model = NS(use_mla=False, model="test-model", max_model_len=256, get_total_num_kv_heads=lambda: heads,
                   get_head_size=lambda: head_size, get_total_num_hidden_layers=lambda: len(layers))
    cfg = NS(kv_transfer_config=KVTransferConfig(
                 kv_connector="KVServeConnector", kv_connector_module_path=MODULE, kv_role=role_name,
                 kv_connector_extra_config={"secret": SECRET, **extra}),
             cache_config=NS(block_size=block_size, cache_dtype="auto"), model_config=model,
             parallel_config=NS(tensor_parallel_size=tp, pipeline_parallel_size=1),
             compilation_config=NS(static_forward_context=fwd))
    return conn.KVServeConnector(cfg, role, NS(kv_cache_groups=[NS(layer_names=layers)]))


def _step(new=(), cached=(), sched=None):
    """A SchedulerOutput with what the connector reads."""
    from types import SimpleNamespace as NS

    c = NS(req_ids=[x[0] for x in cached], new_block_ids=[x[1] for x in cached],
           num_computed_tokens=[x[2] for x in cached], resumed_req_ids=set())
    return NS(scheduled_new_reqs=list(new), scheduled_cached_reqs=c, num_scheduled_tokens=sched or {})


def _tp_roles(transfer: str, work: str) -> dict:
    """Heterogeneous tensor parallelism with the roles driven by hand: a producer of TP=a saves
    (store) or pushes (direct) one bundle per source rank from per-rank paged caches holding
    that rank's KV heads; a consumer of TP=b finds them, and each of its ranks loads exactly
    its own heads (replicated where TP > KV heads). Ranks come from the monkeypatched
    ``parallel_ranks`` hook; the caches use the GPU backends' K|V layout."""
    import pickle
    from types import SimpleNamespace as NS

    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvserve.serving import paged as pg
    from kvserve.serving import vllm_connector as conn

    heads, d, bs, n = 4, 16, 16, 45
    layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    prompt = list(range(3000, 3000 + n))
    blocks = [5, 2, 7]
    torch.manual_seed(2)
    kv = {name: (torch.randn(1, heads, n, d).bfloat16(), torch.randn(1, heads, n, d).bfloat16()) for name in layers}
    kw = dict(heads=heads, layers=layers, block_size=bs, head_size=d, backend="FLASH_ATTN", isa=None)
    real_ranks = conn.parallel_ranks
    out: dict = {}
    try:
        for i, (a, b) in enumerate([(2, 1), (1, 2), (2, 4), (4, 8), (8, 2), (1, 8)]):
            case: dict = {}
            key_extra = {"kvserve_key": f"tp{i}x{a}x{b}"}
            if transfer == "direct":
                csched = _make("kv_consumer", KVConnectorRole.SCHEDULER, {"transfer": "direct", "listen": "127.0.0.1:0"},
                               tp=b, **kw)
                host, port = csched._receiver.address
                pextra = {"transfer": "direct", "peer": f"{host}:{port}", "compression": "bf16"}
                cextra = {"transfer": "direct", "listen": "127.0.0.1:0"}
            else:
                pextra = cextra = {"store": str(Path(work) / "tp-store"), "compression": "bf16"}
                csched = _make("kv_consumer", KVConnectorRole.SCHEDULER, cextra, tp=b, **kw)
            psched = _make("kv_producer", KVConnectorRole.SCHEDULER, pextra, tp=a, **kw)
            req = NS(request_id=f"p{i}", prompt_token_ids=prompt, kv_transfer_params=key_extra)
            psched.on_new_request(req)
            meta = psched.build_connector_meta(_step(new=[NS(req_id=f"p{i}", prompt_token_ids=prompt,
                                                             block_ids=(blocks,), num_computed_tokens=0)],
                                                     sched={f"p{i}": n}))
            params = psched.request_finished(req, [])[1]
            case["finished_params"] = params
            written = []
            for r in range(a):
                conn.parallel_ranks = lambda r=r: (r, 0)
                w = _make("kv_producer", KVConnectorRole.WORKER, pextra, tp=a, **kw)
                mine = list(pg.kv_heads_of_rank(r, a, heads))
                caches = {}
                for name in layers:
                    cache = torch.zeros(10, len(mine), bs, 2 * d, dtype=torch.bfloat16)
                    kc, vc_ = pg.split_kv(cache, "FLASH_ATTN", d)
                    blk, off = pg.token_slots(blocks, bs, bs, 0, n)
                    pg.scatter_tokens(kc, blk, off, kv[name][0][:, mine])
                    pg.scatter_tokens(vc_, blk, off, kv[name][1][:, mine])
                    caches[name] = cache
                w.register_kv_caches(caches)
                before = conn.STATS["saves"]
                w.bind_connector_metadata(meta)
                for name in layers:
                    w.save_kv_layer(name, caches[name], None)
                w.wait_for_save()
                w.clear_connector_metadata()
                if conn.STATS["saves"] > before:
                    written.append(r)
            case["written_ranks"] = written
            if transfer == "direct":
                case["inbox"] = sorted(csched._inbox._items)
            # the consumer: the producer's returned params name the key and its TP size
            creq = NS(request_id=f"c{i}", prompt_token_ids=prompt, kv_transfer_params=params)
            case["matched"] = list(csched.get_num_new_matched_tokens(creq, 0))
            csched.update_state_after_alloc(creq, NS(get_block_ids=lambda: ([1, 8, 3],)), n - 1)
            lmeta = csched.build_connector_meta(_step(new=[NS(req_id=f"c{i}", prompt_token_ids=prompt,
                                                              block_ids=([1, 8, 3],), num_computed_tokens=0)],
                                                      sched={f"c{i}": n}))
            lmeta = pickle.loads(pickle.dumps(lmeta))  # as it reaches workers in other processes
            ok, errors = [], []
            for q in range(b):
                conn.parallel_ranks = lambda q=q: (q, 0)
                w = _make("kv_consumer", KVConnectorRole.WORKER, cextra, tp=b, **kw)
                mine = list(pg.kv_heads_of_rank(q, b, heads))
                caches = {name: torch.zeros(10, len(mine), bs, 2 * d, dtype=torch.bfloat16) for name in layers}
                w.register_kv_caches(caches)
                w.bind_connector_metadata(lmeta)
                w.start_load_kv(None)
                errors += sorted(w.get_block_ids_with_load_errors())
                good = True
                for name in layers:
                    kc, vc_ = pg.split_kv(caches[name], "FLASH_ATTN", d)
                    blk, off = pg.token_slots([1, 8, 3], bs, bs, 0, n - 1)
                    good &= torch.equal(pg.gather_tokens(kc, blk, off), kv[name][0][:, mine, :n - 1])
                    good &= torch.equal(pg.gather_tokens(vc_, blk, off), kv[name][1][:, mine, :n - 1])
                ok.append(bool(good))
            case["ranks_loaded_own_heads"] = ok
            case["load_errors"] = errors
            # a consumer told the wrong producer TP size finds nothing (no hit), never wrong heads
            wrong = NS(request_id=f"w{i}", prompt_token_ids=prompt, kv_transfer_params={**params, "kvserve_tp": 3})
            case["matched_bad_tp"] = list(csched.get_num_new_matched_tokens(wrong, 0))
            if transfer == "direct":  # used bundles leave the inbox when no live request names them
                csched.request_finished(creq, [])
                case["inbox_while_other_pending"] = len(csched._inbox)
                csched.request_finished(wrong, [])
                case["inbox_after_finish"] = len(csched._inbox)
            csched.shutdown()
            out[f"{a}->{b}"] = case
    finally:
        conn.parallel_ranks = real_ranks
    return out


def _device(out: str, work: str) -> None:
    """The connector's device path in Triton's interpreter: TRITON_INTERPRET=1 is set before
    triton is imported and kvserve.stages.gpu treats CPU tensors as device tensors
    (FORCE_INTERPRETER), so the producer encodes the gathered KV with the device stages (no
    host copy of the KV) and the consumer decodes onto its cache's device. Checked against the
    host path: the same bundle bytes, the same loaded KV."""
    from types import SimpleNamespace as NS

    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    import kvserve
    from kvserve.serving import paged as pg
    from kvserve.serving import vllm_connector as conn
    from kvserve.stages import gpu, irans

    irans.DEFAULT_BLOCK_LOG2 = 8  # several rANS blocks on a small input
    heads, d, bs = 2, 16, 16
    layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    kw = dict(heads=heads, layers=layers, block_size=bs, head_size=d, backend="FLASH_ATTN", isa=None)
    res: dict = {}
    # kivi-4 keeps the last 128 tokens in bf16 and quantizes groups of 32 before them
    for profile, n in (("kivi-4", 200), ("kvserve", 40)):
        prompt = list(range(5000, 5000 + n))
        torch.manual_seed(3)
        kv = {name: (torch.randn(1, heads, n, d).bfloat16(), torch.randn(1, heads, n, d).bfloat16()) for name in layers}
        nb = -(-n // bs)
        pblocks, cblocks = list(range(nb))[::-1], list(range(2, nb + 2))
        extra = {"store": str(Path(work) / "dev-store"), "compression": profile}
        gpu.FORCE_INTERPRETER = True
        try:
            psched = _make("kv_producer", KVConnectorRole.SCHEDULER, extra, **kw)
            req = NS(request_id=profile, prompt_token_ids=prompt, kv_transfer_params={"kvserve_key": f"dev{profile[-1]}"})
            psched.on_new_request(req)
            meta = psched.build_connector_meta(_step(new=[NS(req_id=profile, prompt_token_ids=prompt, block_ids=(pblocks,),
                                                             num_computed_tokens=0)], sched={profile: n}))
            w = _make("kv_producer", KVConnectorRole.WORKER, extra, **kw)
            caches = {}
            for name in layers:
                cache = torch.zeros(nb + 2, heads, bs, 2 * d, dtype=torch.bfloat16)
                kc, vc_ = pg.split_kv(cache, "FLASH_ATTN", d)
                blk, off = pg.token_slots(pblocks, bs, bs, 0, n)
                pg.scatter_tokens(kc, blk, off, kv[name][0])
                pg.scatter_tokens(vc_, blk, off, kv[name][1])
                caches[name] = cache
            w.register_kv_caches(caches)
            before = dict(conn.STATS)
            w.bind_connector_metadata(meta)
            for name in layers:
                w.save_kv_layer(name, caches[name], None)
            w.wait_for_save()
            params = psched.request_finished(req, [])[1]
            csched = _make("kv_consumer", KVConnectorRole.SCHEDULER, extra, **kw)
            creq = NS(request_id="c" + profile, prompt_token_ids=prompt, kv_transfer_params=params)
            matched = list(csched.get_num_new_matched_tokens(creq, 0))
            csched.update_state_after_alloc(creq, NS(get_block_ids=lambda: (cblocks,)), n - 1)
            lmeta = csched.build_connector_meta(_step(new=[NS(req_id="c" + profile, prompt_token_ids=prompt,
                                                              block_ids=(cblocks,), num_computed_tokens=0)]))
            cw = _make("kv_consumer", KVConnectorRole.WORKER, extra, **kw)
            loaded = {name: torch.zeros(nb + 2, heads, bs, 2 * d, dtype=torch.bfloat16) for name in layers}
            cw.register_kv_caches(loaded)
            cw.bind_connector_metadata(lmeta)
            cw.start_load_kv(None)
            errors = sorted(cw.get_block_ids_with_load_errors())
            counts = {k: conn.STATS[k] - before.get(k, 0) for k in ("device_encodes", "device_decodes", "saves", "loads")}
        finally:
            gpu.FORCE_INTERPRETER = False
        # the host path on the same KV: the same bytes; the bundle decoded on the host, scattered
        blob = w._store.get(conn.bundle_key("udev" + profile[-1], "tp0-1.pp0-1"))
        header = kvserve.pipeline.parse_header(blob)[0]
        host_blob = kvserve.encode([kv[name] for name in layers], profile, meta=header["meta"])
        want, _ = kvserve.decode(blob)
        same = True
        for i, name in enumerate(layers):
            kc, vc_ = pg.split_kv(loaded[name], "FLASH_ATTN", d)
            blk, off = pg.token_slots(cblocks, bs, bs, 0, n - 1)
            same &= torch.equal(pg.gather_tokens(kc, blk, off), want[i][0][:, :, :n - 1])
            same &= torch.equal(pg.gather_tokens(vc_, blk, off), want[i][1][:, :, :n - 1])
        res[profile] = {"tokens": n, "matched": matched, "load_errors": errors, "counts": counts, "same_bytes_as_host": blob == host_blob,
                        "loaded_equals_host_decode": bool(same), "codec": header["profile"]["codec"]["id"],
                        "lossy": not torch.equal(want[0][0], kv[layers[0]][0])}
    Path(out).write_text(json.dumps(res, indent=1))


def main(argv: list[str]) -> None:
    if argv[0] == "device":  # before anything imports triton
        import os

        os.environ["TRITON_INTERPRET"] = "1"
    vllm_env.apply_env()
    if argv[0] == "pd":
        _pd(*argv[1:4])
    elif argv[0] == "units":
        _units(*argv[1:3])
    elif argv[0] == "device":
        _device(*argv[1:3])
    elif argv[0] == "direct":
        _direct(*argv[1:4])
    elif argv[0] == "direct-consumer":
        _direct_consumer(*argv[1:5])
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)


# ------------------------------------------------------------------------------ pytest side

import pytest

PYTHON = vllm_env.vllm_python()
needs_vllm = pytest.mark.skipif(
    PYTHON is None, reason="vLLM is not importable here and .venv-vllm is absent (scripts/setup_vllm.sh)")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return vllm_env.run_script(__file__, args, timeout)


def test_import_serving_does_not_import_vllm():
    code = ("import sys, kvserve.serving; "
            "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_vllm
def test_connector_pieces(tmp_path):
    """Gather/scatter on real paged layouts, the store, the settings (no engine)."""
    out = tmp_path / "units.json"
    _run(["units", str(out), str(tmp_path)], timeout=300)
    res = json.loads(out.read_text())
    assert {r["isa"] for r in res["cpu"]} >= {"vec", "vec16"}
    for r in res["cpu"]:
        assert r["gather_equals_written"] and r["scatter_equals_kernel"], r
        assert not r["row_major_would_be_right"], r  # the kernel packs keys: the probe matters
    assert all(res["gpu_layout"].values()), res["gpu_layout"]
    assert all(res["store"].values()), res["store"]
    err = res["errors"]
    assert "bad store key" in err["bad_key"]
    assert "only a directory or a redis:// URL" in err["url_store"]
    assert "unknown profile 'no-such-profile'" in err["bad_profile"]
    assert "positive 'bandwidth_mbps'" in err["bad_controller"]
    assert "need more than the 1 blocks" in err["too_big"]
    assert "transfer must be 'store' or 'direct'" in err["bad_transfer"]
    assert "needs 'peer'" in err["direct_no_peer"] and "needs 'listen'" in err["direct_no_listen"]
    assert "['store'] do not apply to transfer='direct'" in err["direct_with_store"]
    assert "['peer'] do not apply to transfer='store'" in err["store_with_peer"]
    assert "is not HOST:PORT" in err["bad_peer"] and "inbox_mb must be a positive number" in err["bad_inbox"]
    assert "3 KV heads cannot be split over 2" in err["bad_tp"]
    assert "4 KV heads cannot be split over 3" in err["bad_producer_tp"]
    assert "must equal the consumer's" in err["unknown_heads_other_tp"]
    assert res["fixed"] == "bf16"
    assert res["accepts_packaged_libraries"] == {"smollm2": True, "smollm2-ppl": True}  # by default
    roles_redis = res["roles_redis"]
    if "skipped" in roles_redis:
        assert "redis" in roles_redis["skipped"].lower(), roles_redis
    else:
        assert roles_redis == res["roles"] | {"finished_params": roles_redis["finished_params"]}
    roles = res["roles"]
    assert roles["chunked_save_step"] == [0, 1]  # saved in the step that completes the prompt
    assert roles["save_plan"] == {"blocks": [5, 2, 7], "end": 70, "is_store": True}
    assert roles["finished_params"]["kvserve_key"]
    assert roles["bundle_equals_written"]
    assert roles["matched"] == [[69, False], [37, False]]
    assert roles["load_plan"] == {"blocks": [1, 8, 3], "start": 32, "end": 69, "is_store": False}
    assert roles["loaded_equals_saved"] and roles["outside_range_untouched"]
    assert roles["load_errors"] == []
    assert roles["matched_corrupt"] == [0, False]
    assert roles["matched_same_tokens"] == [69, False]
    assert roles["matched_foreign_tokens"] == [0, False] and roles["matched_spoofed_key"] == [0, False]
    assert roles["load_errors_corrupt"] == [3, 8]
    for name, got in roles["hostile"].items():
        assert got == {"matched": [0, False], "load_errors": [3, 8], "fast": True}, (name, got)
    for mode in ("tp_store", "tp_direct"):
        for layout, case in res[mode].items():
            a, b = map(int, layout.split("->"))
            assert case["finished_params"]["kvserve_tp"] == a, (mode, layout, case)
            # KV heads replicated on the producer (TP 8 > 4 heads): only the first of each pair writes
            assert case["written_ranks"] == list(range(0, a, max(1, a // 4))), (mode, layout, case)
            assert case["matched"] == [44, False], (mode, layout, case)
            assert case["ranks_loaded_own_heads"] == [True] * b and case["load_errors"] == [], (mode, layout, case)
            assert case["matched_bad_tp"] == [0, False], (mode, layout, case)
            if mode == "tp_direct":  # pushed straight into the consumer's inbox, dropped once used
                key = case["finished_params"]["kvserve_key"]
                assert case["inbox"] == sorted(f"u{key}.tp{r}-{a}.pp0-1" for r in case["written_ranks"])
                assert case["inbox_while_other_pending"] == len(case["written_ranks"])
                assert case["inbox_after_finish"] == 0
    ctl = res["controller"]
    if "error" in ctl:  # the controller or its library is not there: a clear error, not a crash
        assert "kvserve.controller" in ctl["error"] or "library" in ctl["error"], ctl
    else:
        assert ctl["pipeline"] and ctl["bytes"] > 0, ctl
        assert ctl["slow"][1] > 2 and ctl["fast"][1] == 1.0, ctl


@needs_vllm
def test_connector_device_path_in_interpreter(tmp_path):
    """The device path of the connector (gathered KV encoded by the device stages, bundles
    decoded onto the cache's device) through Triton's interpreter: the host path's bytes and
    KV. On a GPU machine the same code runs on CUDA caches."""
    out = tmp_path / "device.json"
    _run(["device", str(out), str(tmp_path)], timeout=600)
    res = json.loads(out.read_text())
    for profile, got in res.items():
        assert got["matched"] == [got["tokens"] - 1, False] and got["load_errors"] == [], (profile, got)
        assert got["counts"] == {"device_encodes": 1, "device_decodes": 1, "saves": 1, "loads": 1}, (profile, got)
        assert got["same_bytes_as_host"] and got["loaded_equals_host_decode"] and got["lossy"], (profile, got)
    assert res["kvserve"]["codec"] == "irans" and res["kivi-4"]["codec"] == "bitpack"


@pytest.fixture(scope="module")
def pd_run(smollm2_folder, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-pd")
    out = work / "pd.json"
    _run(["pd", str(out), str(smollm2_folder), str(work)], timeout=900)
    return json.loads(out.read_text())


def _case(res, name):
    got = res["consumer"][name]
    return got, res["plain"][res["case_prompt"][name]]


@needs_vllm
@pytest.mark.slow
def test_pd_lossless_equals_plain_and_skips_prefill(pd_run):
    res = pd_run
    loaded = 0
    for i in range(len(PROMPTS)):
        got, ref = _case(res, f"bf16-{i}")
        assert len(ref["ids"]) == MAX_TOKENS
        assert got["ids"] == ref["ids"], (got["text"], ref["text"])
        # vLLM's own accounting: all prompt tokens but the last came from the connector
        assert got["num_cached_tokens"] == got["prompt_len"] - 1
        assert ref["num_cached_tokens"] == 0
        loaded += got["prompt_len"] - 1
        b = res["bundles"][f"bf16x{i}"]
        assert b["profile"] == "bf16" and b["tokens"] == got["prompt_len"] and b["layers"] == 30
        assert b["raw_bytes"] <= b["bytes"] < b["raw_bytes"] * 1.01
        # the producer's output names the key it stored under, for a router to pass on
        assert res["producer"][f"bf16-{i}"]["kv_transfer_params"] == {"kvserve_key": f"bf16x{i}", "kvserve_tp": 1}
    st = res["consumer_stats"]
    assert st["loaded_tokens"] >= loaded and st["saves"] == 0
    assert res["producer_stats"]["saves"] == len(res["producer"])
    # a bundle that fits but holds zeros changes the output: the loaded KV is what is used
    got, ref = _case(res, "zeros-0")
    assert got["num_cached_tokens"] == got["prompt_len"] - 1 and got["ids"] != ref["ids"]


@needs_vllm
@pytest.mark.slow
def test_pd_lossy_profile(pd_run):
    res = pd_run
    for i in range(len(PROMPTS)):
        got, ref = _case(res, f"kvserve-{i}")
        assert got["num_cached_tokens"] == got["prompt_len"] - 1
        # A lossy cache may flip a near-tie, and greedy decoding then follows another (still
        # fluent) path: on prompt 1 the uncompressed run's top token has p = 0.18 and the
        # lossy one picks the runner-up, in vLLM and in transformers alike. So the check is
        # on the first token, which reads only the restored cache: it must be one of the
        # uncompressed run's top 5, within 1 nat of its best, and as confident as that
        # (a cache restored wrongly gives unrelated, low-probability tokens).
        assert len(got["ids"]) == MAX_TOKENS
        top = ref["first_top"]
        best = max(top.values())
        first = str(got["ids"][0])
        assert first in top and top[first] > best - 1.0, (got["text"], ref["text"], top)
        assert abs(got["logprobs"][0] - best) < 1.0, (got["logprobs"], ref["logprobs"])
        b = res["bundles"][f"lossyx{i}"]
        assert b["profile"] == "kvserve"
        assert b["raw_bytes"] / b["bytes"] > (5.0 if b["tokens"] >= 64 else 3.0), b
    # the prompt-hash key and the instance's own setting: the controller's choice (at 100 Mbps
    # a compressed profile pays) or, without a controller, cachegen
    got, ref = _case(res, "default-0")
    assert got["num_cached_tokens"] == got["prompt_len"] - 1 and len(got["ids"]) == MAX_TOKENS
    key = res["producer"]["default-0"]["kv_transfer_params"]["kvserve_key"]
    bundle = res["bundles"][key]
    assert len(key) == 40
    if res["default_compression"] == "cachegen":
        assert bundle["profile"] == "cachegen" and got["ids"][:3] == ref["ids"][:3]
    else:
        assert bundle["raw_bytes"] / bundle["bytes"] > 2.0, bundle


@needs_vllm
@pytest.mark.slow
def test_pd_bad_bundles_fall_back_to_prefill(pd_run):
    res = pd_run
    st = res["consumer_stats"]
    # flipped byte: the CRC check in the scheduler reports no hit, vLLM prefills itself
    got, ref = _case(res, "corrupt-1")
    assert got["num_cached_tokens"] == 0 and got["ids"] == ref["ids"]
    assert st["corrupt"] == 1
    # no bundle at all
    got, ref = _case(res, "missing-2")
    assert got["num_cached_tokens"] == 0 and got["ids"] == ref["ids"]
    # well-formed but the wrong shape for this model: the worker reports the blocks and
    # vLLM recomputes them (kv_load_failure_policy="recompute")
    got, ref = _case(res, "misfit-2")
    assert got["ids"] == ref["ids"]
    assert st["load_errors"] == 1


# ------------------------------------------------------------------------------ direct mode


@pytest.fixture(scope="module")
def direct_run(smollm2_folder, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm-direct")
    out = work / "direct.json"
    _run(["direct", str(out), str(smollm2_folder), str(work)], timeout=900)
    return json.loads(out.read_text())


@needs_vllm
@pytest.mark.slow
def test_direct_lossless_equals_plain_and_skips_prefill(direct_run, pd_run):
    """Producer and consumer engines at once, the bundles pushed over the KV channel: with the
    lossless profile the consumer's greedy tokens are plain vLLM's (the plain run of
    ``pd_run``, same batches), and vLLM counts the loaded prompt tokens as cached."""
    res = direct_run
    assert res["listening"] == ["127.0.0.1", res["port"]]
    for i in range(len(PROMPTS)):
        got, ref = res["consumer"][f"bf16-{i}"], pd_run["plain"][i]
        assert got["ids"] == ref["ids"], (got["text"], ref["text"])
        assert got["num_cached_tokens"] == got["prompt_len"] - 1
        params = res["producer"][f"bf16-{i}"]["kv_transfer_params"]
        assert params == {"kvserve_key": f"dbf16x{i}", "kvserve_tp": 1}
        b = res["inbox"][f"udbf16x{i}.tp0-1.pp0-1"]
        assert b["profile"] == "bf16" and b["tokens"] == got["prompt_len"]
        assert b["raw_bytes"] <= b["bytes"] < b["raw_bytes"] * 1.01
    st = res["producer_stats"]
    assert st["saves"] == len(res["producer"]) and st["save_errors"] == 0
    assert res["pusher"]["samples"] == len(res["producer"])  # every push fed the live estimate
    # a bundle pushed by a secret holder that fits but holds zeros is what the consumer uses
    got, ref = res["consumer"]["zeros-0"], pd_run["plain"][0]
    assert res["pushed"]["udzerosx0"]["bytes"] > 0
    assert got["num_cached_tokens"] == got["prompt_len"] - 1 and got["ids"] != ref["ids"]
    # every bundle that was used is dropped from the inbox once its request finished
    assert res["inbox_left"] == 0


@needs_vllm
@pytest.mark.slow
def test_direct_lossy_and_controller(direct_run, pd_run):
    res = direct_run
    got, ref = res["consumer"]["kvserve-1"], pd_run["plain"][1]
    assert got["num_cached_tokens"] == got["prompt_len"] - 1 and len(got["ids"]) == MAX_TOKENS
    top = ref["first_top"]  # see test_pd_lossy_profile: the first token reads only the restored cache
    assert str(got["ids"][0]) in top and top[str(got["ids"][0])] > max(top.values()) - 1.0
    b = res["inbox"]["udlossyx1.tp0-1.pp0-1"]
    assert b["profile"] == "kvserve" and b["raw_bytes"] / b["bytes"] > 5.0
    # the prompt-hash key and the instance's setting: the controller decides from the live estimate
    key = res["producer"]["default-2"]["kv_transfer_params"]["kvserve_key"]
    got, ref = res["consumer"]["default-2"], pd_run["plain"][2]
    assert got["num_cached_tokens"] == got["prompt_len"] - 1 and len(got["ids"]) == MAX_TOKENS
    bundle = res["inbox"][f"p{key}.tp0-1.pp0-1"]
    if res["default_compression"] == "cachegen":
        assert bundle["profile"] == "cachegen"
    else:
        # the setting's 100 Mbps is only the first estimate: the earlier pushes measured the
        # loopback link (Gbps on a quiet machine: sending this short prompt's KV uncompressed is
        # fastest; a few hundred Mbps on a loaded one: a lighter profile), so the push does not
        # use the profile the controller picks at 100 Mbps
        assert res["pusher"]["samples"] == len(res["producer"]) and res["pusher"]["bandwidth_mbps"] > 300
        assert bundle["profile"] != res["decide_at_setting"], (bundle, res["pusher"], res["decide_at_setting"])


@needs_vllm
@pytest.mark.slow
def test_direct_failures_fall_back_to_prefill(direct_run, pd_run):
    res = direct_run
    st = res["consumer_stats"]
    # nothing pushed under the key: no hit
    got, ref = res["consumer"]["missing-0"], pd_run["plain"][0]
    assert got["num_cached_tokens"] == 0 and got["ids"] == ref["ids"]
    # the receiver refuses a bundle of the wrong geometry (an error frame to the sender)...
    assert "RemoteError" in res["pushed"]["udrefusedx2"] and "does not fit this model" in res["pushed"]["udrefusedx2"]
    assert res["receiver"]["refused"] == 1 and res["receive_stats"]["refused"] == 1
    # ... and never reads a frame from a peer without the secret
    assert "AuthError" in res["pushed"]["udforgedx2"]
    for name in ("refused-2", "forged-2"):
        got, ref = res["consumer"][name], pd_run["plain"][2]
        assert got["num_cached_tokens"] == 0 and got["ids"] == ref["ids"], name
    assert "udrefusedx2.tp0-1.pp0-1" not in res["inbox"] and "udforgedx2.tp0-1.pp0-1" not in res["inbox"]
    # accepted (the receiver does not know the layer names), but the worker cannot place it:
    # the load error makes vLLM recompute (kv_load_failure_policy="recompute")
    got, ref = res["consumer"]["misnamed-1"], pd_run["plain"][1]
    assert got["ids"] == ref["ids"] and st["load_errors"] == 1
