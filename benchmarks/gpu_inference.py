"""Compressed-resident inference on the GPU (enec.gpu_resident) against the uncompressed
model, and the memory-capped offload case: tokens/s and device weight memory.

Modes, each on the same model in one process:
  uncompressed       weights in device memory
  enec-resident      ENEC streams in device memory, each weight decoded (Triton) just before
                     its module runs, the next ones decoded ahead on a side stream
  offload-bf16       weights in pinned host memory, copied to the device before each module
                     (the baseline when the model does not fit)
  offload-enec       ENEC streams in pinned host memory: the compressed bytes are copied and
                     decoded on the device before each module

Model: a Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, tied
embeddings), and optionally a bigger one (--big: 1.2B-class, hidden 2048, 16 layers), filled
with real MiniLM weights (bf16) tiled end to end (no model hub is reachable from the device
machine, and the SmolLM2 checkpoint is larger than what travels there). Every mode's greedy
tokens are checked against the uncompressed model's.

Timing: prefill = one forward over --prefill tokens, decode = generate --decode new tokens
after a 16-token prompt; CUDA-synchronised wall clock, median of --repeats after a warm-up.

    PYTHONPATH=src python benchmarks/gpu_inference.py            # on the device: $OUT/gpu_inference.json
    python benchmarks/gpu_inference.py --dry-run                 # no GPU: tiny model, interpreted kernels
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
            max_position_embeddings=8192, rms_norm_eps=1e-5)
BIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
           max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256)


def build(shape: dict, src, device):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**shape)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    pos = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = p.numel()
            if p.dim() == 1:
                p.fill_(1.0)  # norms
                continue
            idx = (torch.arange(n, device=src.device) + pos) % src.numel()
            p.copy_(src[idx].view(p.shape))
            pos += n
    return model


class OffloadBf16:
    """Baseline: weights in pinned host memory, copied to the device before each module."""

    def __init__(self, model, min_numel: int):
        import torch

        self.handles = []
        self.host = {}
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and m.weight.numel() >= min_numel:
                p = m.weight
                if id(p) not in self.host:
                    host = p.detach().cpu()
                    self.host[id(p)] = (host.pin_memory() if p.device.type == "cuda" else host.clone(), torch.zeros((), dtype=p.dtype,
                                        device=p.device).expand(p.shape))
                host, ph = self.host[id(p)]
                m._parameters["weight"] = torch.nn.Parameter(ph, requires_grad=False)
                dev = p.device
                self.handles.append(m.register_forward_pre_hook(
                    lambda mod, args, host=host, dev=dev: mod._parameters.__setitem__("weight", host.to(dev, non_blocking=True))))
                keep = m._parameters["weight"]
                self.handles.append(m.register_forward_hook(
                    lambda mod, args, out, keep=keep: mod._parameters.__setitem__("weight", keep)))
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(model, vocab: int, device, prefill: int, decode: int, repeats: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    long_ids = torch.randint(0, vocab, (1, prefill), generator=g).to(device)
    prompt = torch.randint(0, vocab, (1, 16), generator=g).to(device)
    pre, dec = [], []
    tokens = None
    with torch.inference_mode():
        for i in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            model(long_ids)
            sync()
            t1 = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
            sync()
            t2 = time.perf_counter()
            if i:
                pre.append(prefill / (t1 - t0))
                dec.append(decode / (t2 - t1))
            tokens = out[0, 16:].tolist()
    return {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "prefill_runs": pre, "decode_runs": dec, "tokens": tokens}


def device_bytes() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def run_model(label: str, shape: dict, src, device, args) -> list[dict]:
    import torch

    from enec.gpu_resident import make_resident_gpu

    rows = []
    base = None
    for mode in ("uncompressed", "enec-resident", "offload-bf16", "offload-enec"):
        torch.manual_seed(0)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build(shape, src, device)
        weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        stats = None
        if mode == "enec-resident":
            stats = make_resident_gpu(model, min_numel=args.min_numel, ahead=args.ahead).stats()
        elif mode == "offload-enec":
            stats = make_resident_gpu(model, min_numel=args.min_numel, ahead=args.ahead, offload=True).stats()
        elif mode == "offload-bf16":
            OffloadBf16(model, args.min_numel)
        held = device_bytes()
        r = measure(model, shape["vocab_size"], device, args.prefill, args.decode, args.repeats)
        r.update(model=label, mode=mode, weight_bytes=weights, device_bytes_between_layers=held,
                 peak_device_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)
        if stats is not None:
            r["enec"] = {"compressed_bytes": stats.compressed_bytes, "original_bytes": stats.original_bytes,
                         "device_bytes": stats.device_bytes, "other_bytes": stats.other_bytes,
                         "ratio": stats.original_bytes / stats.compressed_bytes, "prefetch_hits": stats.prefetch_hits}
        if base is None:
            base = r
        r["same_tokens"] = r["tokens"] == base["tokens"]
        r["decode_vs_uncompressed"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_vs_uncompressed"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        print(f"{label:8s} {mode:14s} prefill {r['prefill_tok_s']:9.1f} tok/s  decode {r['decode_tok_s']:8.2f} tok/s "
              f"({r['decode_vs_uncompressed']:.2f}x)  device {held / 2**20:8.1f} MiB  same tokens {r['same_tokens']}",
              flush=True)
        rows.append(r)
        del model
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for gpu_inference.json (default $OUT or .)")
    ap.add_argument("--weights", default=None, help="real weights: .enec or safetensors (see gpu_bench.py)")
    ap.add_argument("--big", action="store_true", help="also the 1.2B-class shape")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ahead", type=int, default=2)
    ap.add_argument("--min-numel", type=int, default=1 << 16)
    ap.add_argument("--dry-run", action="store_true", help="no GPU: a tiny model, kernels interpreted")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from gpu_bench import load_weights

    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device (use --dry-run to run the code paths in the interpreter)")
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    src, desc = load_weights(args.weights)
    src = src.to(device)
    shapes = [("tiny", TINY)] if args.dry_run else [("smollm2", SMOL)] + ([("big", BIG)] if args.big else [])
    if args.dry_run:
        args.prefill, args.decode, args.repeats, args.min_numel = 8, 2, 1, 2048
    rows = []
    for label, shape in shapes:
        rows += run_model(label, shape, src, device, args)
    out = Path(args.out or os.environ.get("OUT") or ".")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"weights": desc, "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
            "prefill": args.prefill, "decode": args.decode, "repeats": args.repeats, "dry_run": args.dry_run}
    (out / "gpu_inference.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    bad = [r for r in rows if not r["same_tokens"]]
    if bad:
        print("tokens differ:", [(r["model"], r["mode"]) for r in bad])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
