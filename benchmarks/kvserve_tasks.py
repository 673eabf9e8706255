"""Task-level quality of KV-compression profiles: RULER-style HotpotQA and multi-key needles.

    python benchmarks/kvserve_tasks.py run --split tune --qa 500 --needle 96 \
        --profiles baselines,levers --out /work/tmp-kvq/tune.jsonl [--shard 0/2]
    python benchmarks/kvserve_tasks.py summary /work/tmp-kvq/tune*.jsonl --json OUT.json [--png OUT.png]
    python benchmarks/kvserve_tasks.py kl --split tune --qa 40 --profiles kivi-4,k16v16-g32   # cheap screen
    python benchmarks/kvserve_tasks.py speed --profiles kvserve,k16v8-g32 --threads 2

Method (kvserve.tasks builds the items; fixed seeds): per item, prefill the whole prompt
but its last token in bf16 once (via kvserve.models.load_model) and decode a guess answer
greedily, step by step (max 12 tokens, stop at a newline or end of turn). Every answer, bf16's
and each lossy profile's from its encoded-and-decoded KV, is then that guess checked in one
teacher-forced pass with decoding resumed where it diverges (:func:`kvserve.tasks.greedy_answer`),
so bf16 and a profile are scored by the same procedure (``Reference.reply``; rows made before
it are corrected by ``reref``). A lossless profile decodes to the reference KV bit for bit, so
its answer is the reference's. Profiles are run with their codec replaced by
``none`` for quality (codecs are lossless, so decoded KV is identical); the ratio is
measured with the real codec on every ``--ratio-every``-th item (lengths interleave, so every
length is sampled). Rows are appended per item to a JSONL checkpoint; a rerun skips items
already done for all profiles (so a run can resume, and shards can run side by side).

Summary per profile: ``ratio`` (sum bf16 KV bytes / sum bundle bytes), ``task_rel_acc``
(100 x QA F1(profile) / F1(bf16), paired bootstrap 95% CI over items, 2000 resamples),
``answer_agree`` (QA answers equal to bf16's after SQuAD normalisation), ``needle_acc``
(fraction of needle items whose number is in the answer), per context length as well, and
``answer_kl``: mean KL(bf16 || profile) in nats of the next-token distributions along the bf16
answer, teacher-forced (the steadier tuning signal).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from kvserve import tasks
from kvserve.errors import KVServeError
from kvserve.pipeline import Pipeline, load_profile, profile_names
from kvserve.profiler import ROPE_THETA as ROPE  # per model: SmolLM2's base, Gemma-3's per-layer bases

BASELINES = ["bf16", "kivi-2", "kivi-4", "cachegen", "kvserve"]
RANS = {"id": "rans", "pair": True}
IRANS = {"id": "irans", "pair": True}


def kvq(name, model, key_levels, value_levels, *, key_group=32, sinks=1, recent=0, rope=True, tiers=None,
        value_axis="token", compact=True, codec=RANS, transform=True, scores=None, kind_scores=False, **extra):
    """A KVServe-quantizer profile (one tier unless ``tiers``) on Hadamard (pre-RoPE keys)."""
    q = {"id": "kvserve", "high_key_levels": key_levels, "high_value_levels": value_levels, "split": "head",
         "scores": scores, "key_axis": "channel", "value_axis": value_axis, "key_group": key_group,
         "keep_sinks": sinks, "keep_recent": recent, "compact_value_stats": compact}
    if tiers:
        q.update({"tiers": tiers, "scores": scores or [model], "kind_scores": kind_scores})
    q.update(extra)
    tr = {"id": "hadamard", "seed": 0, "key_rope_theta": ROPE[model] if rope else None} if transform else {"id": "identity"}
    return {"name": name, "transform": tr, "quantizer": q, "codec": codec}


T3A = [[0.3, 5, 3], [0.75, 7, 5], [1.0, 10, 6]]


def ppl_candidates(model: str) -> list[dict]:
    """Variants of the packaged `kvserve` (ratio first), tuned on perplexity (kvserve_ppl_levers.py)."""
    return [
        kvq("kvs-t3a", model, 8, 8, key_group=0, tiers=T3A, kind_scores=True),  # = packaged kvserve
        kvq("kvs-t3a-joint", model, 8, 8, key_group=0, tiers=T3A),
        kvq("kvs-t3a-g128", model, 8, 8, key_group=128, tiers=T3A, kind_scores=True),
        kvq("kvs-t3a-r16", model, 8, 8, key_group=0, tiers=T3A, kind_scores=True, recent=16),
        kvq("kvs-k6v4", model, 6, 4, key_group=0),
        kvq("kvs-k8v4", model, 8, 4, key_group=0),
        kvq("kvs-k7v4-th", model, 7, 4, key_group=0, value_axis="token_head"),
        kvq("kvs-t3-k6", model, 8, 8, key_group=0, tiers=[[0.3, 6, 3], [0.75, 7, 4], [1.0, 10, 6]], kind_scores=True),
        kvq("kvs-t3-v4", model, 8, 8, key_group=0, tiers=[[0.2, 5, 3], [0.7, 7, 4], [1.0, 9, 6]], kind_scores=True),
        # second round, around the best of the first (kvs-t3-v4)
        kvq("kvs-t3-v4-joint", model, 8, 8, key_group=0, tiers=[[0.2, 5, 3], [0.7, 7, 4], [1.0, 9, 6]]),
        kvq("kvs-t3-v4b", model, 8, 8, key_group=0, tiers=[[0.2, 5, 3], [0.7, 7, 4], [1.0, 10, 6]], kind_scores=True),
        kvq("kvs-t3-v4c", model, 8, 8, key_group=0, tiers=[[0.25, 5, 3], [0.7, 7, 4], [1.0, 10, 7]], kind_scores=True),
        kvq("kvs-t4", model, 8, 8, key_group=0, tiers=[[0.15, 4, 3], [0.5, 6, 4], [0.85, 8, 5], [1.0, 12, 8]],
            kind_scores=True),
    ]


def candidate_sets(model: str) -> dict[str, list[dict]]:
    """Named lists of profiles (``--profiles`` takes set names, packaged names or JSON files)."""
    lv = [  # first round (tune split): key groups, levels, recent window, pre-RoPE, tiers
        kvq("kvs-g32", model, 8, 8, tiers=[[0.3, 5, 3], [0.75, 7, 5], [1.0, 10, 6]], kind_scores=True),
        kvq("k16v8-g32", model, 16, 8),
        kvq("k12v8-g32", model, 12, 8),
        kvq("k16v6-g32", model, 16, 6),
        kvq("k10v6-g32", model, 10, 6),
        kvq("k16v8-g32-r64", model, 16, 8, recent=64),
        kvq("k16v8-g32-norope", model, 16, 8, rope=False),
        kvq("k16v8-all", model, 16, 8, key_group=0),
        kvq("k12v6-g32", model, 12, 6),
        kvq("k16v8-g64", model, 16, 8, key_group=64),
    ]
    kivi = {"id": "kivi", "group_size": 32, "keep_recent": 0, "keep_sinks": 1}
    had = {"id": "hadamard", "seed": 0, "key_rope_theta": ROPE[model]}
    lv += [  # second round (answer-KL screen): value precision, recent window, KIVI statistics + rANS
        kvq("k16v16-g32", model, 16, 16),
        kvq("k12v12-g32", model, 12, 12),
        kvq("k16v12-g32", model, 16, 12),
        kvq("k16v8-g32-r32", model, 16, 8, recent=32),
        {"name": "kivi3-rans", "transform": {"id": "identity"}, "quantizer": {**kivi, "bits": 3}, "codec": RANS},
        {"name": "kivi4-g64-rans", "transform": {"id": "identity"}, "quantizer": {**kivi, "bits": 4, "group_size": 64},
         "codec": RANS},
        {"name": "H-kivi4-g64-rans", "transform": had, "quantizer": {**kivi, "bits": 4, "group_size": 64}, "codec": RANS},
        {"name": "H-kivi3-rans", "transform": had, "quantizer": {**kivi, "bits": 3}, "codec": RANS},
    ]
    return {"baselines": [load_profile(p) for p in BASELINES], "levers": lv, "ppl": ppl_candidates(model),
            "q97": q97_candidates(model)}


def q97_candidates(model: str) -> list[dict]:
    """Third round (this session): compact key statistics (``-ck``), a quantized recent window
    (``-rNqL``: N tokens at L levels; ``-rt``: only the partial last key group, at the middle's
    levels), more value levels, per-token-and-head value ranges (``-th``), sinks, head tiers."""
    def c(name, kl, vl, g=32, r=0, rl=0, **kw):
        if rl:
            kw.update(recent_key_levels=rl if rl > 0 else kl, recent_value_levels=rl if rl > 0 else vl)
        return kvq(name, model, kl, vl, key_group=g, recent=r, compact_key_stats=True, codec=IRANS, **kw)

    return [
        c("k16v8-g32-ck", 16, 8), c("k16v12-g32-ck", 16, 12), c("k16v16-g32-ck", 16, 16),
        c("k12v12-g32-ck", 12, 12), c("k12v16-g32-ck", 12, 16), c("k16v12-g32-ck-th", 16, 12, value_axis="token_head"),
        c("k16v12-g64-ck-rt", 16, 12, g=64, rl=-1), c("k16v16-g64-ck-rt", 16, 16, g=64, rl=-1),
        c("k12v16-g64-ck-rt", 12, 16, g=64, rl=-1), c("k24v12-g64-ck-rt", 24, 12, g=64, rl=-1),
        c("k16v12-g32-ck-r32q64", 16, 12, r=32, rl=64), c("k16v12-g32-ck-r64q64", 16, 12, r=64, rl=64),
        c("k16v12-g32-ck-r64q256", 16, 12, r=64, rl=256), c("k16v12-g32-ck-r128q64", 16, 12, r=128, rl=64),
        c("k16v8-g32-ck-r64q64", 16, 8, r=64, rl=64), c("k16v8-g32-ck-r64q256", 16, 8, r=64, rl=256),
        c("k16v12-g32-ck-s4", 16, 12, sinks=4), c("k16v12-g32-ck-r64", 16, 12, r=64),
        c("k16v16-g64-ck-r64q64", 16, 16, g=64, r=64, rl=64), c("k16v12-g64-ck-r64q64", 16, 12, g=64, r=64, rl=64),
        c("k12v12-g32-ck-r64q64", 12, 12, r=64, rl=64),
        c("k12v8-g32-ck-r64q64", 12, 8, r=64, rl=64), c("k16v8-g64-ck-r64q64", 16, 8, g=64, r=64, rl=64),
        c("k16v6-g32-ck-r64q64", 16, 6, r=64, rl=64), c("k16v8-g32-ck-r128q64", 16, 8, r=128, rl=64),
        c("t2a-g32-ck", 8, 8, tiers=[[0.3, 12, 8], [1.0, 16, 16]], kind_scores=True),
        c("t2b-g32-ck", 8, 8, tiers=[[0.5, 12, 8], [1.0, 16, 16]], kind_scores=True),
        c("t2c-g64-ck-rt", 8, 8, g=64, tiers=[[0.3, 12, 12], [1.0, 24, 16]], kind_scores=True, recent_key_levels=24,
          recent_value_levels=16),
    ]


def resolve(specs: list[str], model: str) -> list[dict]:
    sets = candidate_sets(model)
    single = {c["name"]: c for cs in sets.values() for c in cs}
    out = []
    for s in specs:
        out += sets[s] if s in sets else [single[s]] if s in single else [load_profile(s)]
    names = [c["name"] for c in out]
    if len(set(names)) != len(names):
        sys.exit(f"duplicate profile names in {names}")
    return out


def _done(path: str) -> dict[str, set]:
    done: dict[str, set] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interrupted run
                done.setdefault(row["uid"], set()).update(row["profiles"])
    return done


def _cached(refs: str | None, i: int, item):
    """The saved :class:`kvserve.tasks.Reference` of item ``i`` when ``refs`` has it, else the item."""
    if not refs or not os.path.exists(tasks.reference_path(refs, i)):
        return item
    try:
        return tasks.load_reference(tasks.reference_path(refs, i), item)
    except KVServeError as e:
        sys.exit(str(e))


def _items(a, tok):
    return tasks.task_items(tok, a.split, a.qa, a.needle, [int(x) for x in a.qa_lengths.split(",")],
                            [int(x) for x in a.needle_lengths.split(",")], a.seed, chat=not a.no_chat)


def prepare(a) -> int:
    """Prefill and decode the bf16 reference of every item of the shard once and save it
    (``--refs DIR/NNNNN.pt``: KV, answer, logits); ``run --refs DIR`` then costs only the
    profiles' encode/decode and answers (a screen of many candidates on the same items)."""
    from kvserve.models import load_model
    from tqdm import tqdm

    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    items = _items(a, tok)
    k, n = (int(x) for x in a.shard.split("/"))
    os.makedirs(a.refs, exist_ok=True)
    stop = tasks.stop_token_ids(tok)
    todo = [(i, it) for i, it in enumerate(items) if i % n == k and not os.path.exists(tasks.reference_path(a.refs, i))]
    print(f"{len(items)} items ({a.split}), shard {k}/{n}: {len(todo)} references to make", file=sys.stderr)
    for i, it in tqdm(todo, desc="references", unit="item", disable=not a.progress, mininterval=30):
        with torch.inference_mode():
            tasks.save_reference(tasks.reference(model, tok, it, stop, a.max_new), tasks.reference_path(a.refs, i))
    return 0


def run(a) -> int:
    from kvserve.models import load_model
    from tqdm import tqdm

    # torch threads only, no CPU affinity: quality.pin_threads pins to the first cores, which
    # puts every shard of a run (and every other pinned job) on core 0
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    profiles = resolve([p for s in a.profiles for p in s.split(",") if p], a.model)
    pipes = {c["name"]: Pipeline.from_config(c) for c in profiles}
    items = _items(a, tok)
    k, n = (int(x) for x in a.shard.split("/"))
    stop = tasks.stop_token_ids(tok)
    done = _done(a.out)
    want = {c["name"] for c in profiles}
    among = None
    if a.items_of:  # exactly the items of earlier runs (a new profile on the same items)
        among = {r["uid"] for r in tasks.load_rows(a.items_of)}
    todo = [(i, it) for i, it in enumerate(items[:a.first]) if i % n == k and not want <= done.get(it.uid, set())
            and (a.only is None or it.task == a.only) and (among is None or it.uid in among)]
    print(f"{len(items)} items ({a.split}), shard {k}/{n}: {len(todo)} to do, {len(profiles)} profiles", file=sys.stderr)
    with open(a.out, "a", encoding="utf-8") as f:
        for i, it in tqdm(todo, desc=f"{a.split} items", unit="item", disable=not sys.stderr.isatty() and not a.progress,
                          mininterval=30):
            t0 = time.perf_counter()
            src = _cached(a.refs, i, it)
            row = tasks.run_item(model, tok, src, pipes, stop, max_new=a.max_new, threads=a.threads,
                                 measure=i % a.ratio_every == 0)
            row["index"] = i
            row["seconds"] = round(time.perf_counter() - t0, 2)
            f.write(json.dumps(row) + "\n")
            f.flush()
    return 0


def reref(a) -> int:
    """Rows written before :attr:`kvserve.tasks.Reference.reply` existed scored bf16 by its
    step-by-step greedy answer while every profile's answer came from the batched check
    (:func:`kvserve.tasks.greedy_answer`), so a near-tie rounded differently counted as a
    disagreement even for identical KV. This recomputes each row's bf16 side (``ref``) with
    the fixed procedure (saved references where ``--refs`` has them, a bf16 prefill otherwise)
    and writes the rows to ``--out``; the profiles' answers are unchanged (they never depended
    on it). Per-uid results go to ``--out``.part as they are made, so a stopped run resumes."""
    from kvserve.models import load_model
    from tqdm import tqdm

    torch.set_num_threads(a.threads)
    lines = [json.loads(x) for p in a.paths for x in open(p, encoding="utf-8") if x.strip()]
    part = a.out + ".part"

    def finished() -> dict:  # uid -> recomputed ref, from every shard so far
        out = {}
        if os.path.exists(part):
            for x in open(part, encoding="utf-8"):
                try:
                    d = json.loads(x)
                except ValueError:
                    continue
                out[d["uid"]] = d["ref"]
        return out

    done = finished()
    model, tok = load_model(a.model)
    items = _items(a, tok)
    pos = {it.uid: i for i, it in enumerate(items)}
    missing = sorted({r["uid"] for r in lines} - set(pos))
    if missing:
        sys.exit(f"{len(missing)} rows' items are not among these options' items (e.g. {missing[0]}); "
                 "give the options of the runs that wrote them")
    want = {r["uid"]: pos[r["uid"]] for r in lines}
    stop = tasks.stop_token_ids(tok)
    k, n = (int(x) for x in a.shard.split("/"))
    todo = [(u, i) for u, i in want.items() if u not in done and i % n == k]
    print(f"{len(want)} items in the rows, {len(todo)} to recompute", file=sys.stderr)
    with open(part, "a", encoding="utf-8") as f:
        for uid, i in tqdm(todo, desc="references", unit="item", disable=not a.progress, mininterval=30):
            src = _cached(a.refs, i, items[i])
            with torch.inference_mode():
                ref = tasks.complete_reference(model, tok, src, stop, a.max_new) if isinstance(src, tasks.Reference) \
                    else tasks.reference(model, tok, src, stop, a.max_new)
            done[uid] = {"answer": ref.text, "score": ref.score, "stepwise": tasks.answer_text(tok, ref.answer, stop)}
            f.write(json.dumps({"uid": uid, "ref": done[uid]}) + "\n")
            f.flush()
    done = finished()
    if len(set(want) - set(done)):
        print(f"{len(set(want) & set(done))} of {len(want)} items re-scored; --out is written once the other "
              "shards (or a rerun) have done the rest", file=sys.stderr)
        return 0
    changed = sum(1 for u, i in want.items() if done[u]["answer"] != done[u]["stepwise"])
    names = {n for r in lines for n in r["profiles"]} & set(profile_names())
    lossless = {n for n in names if not Pipeline.from_config(load_profile(n)).quantizer.lossy}
    with open(a.out + ".tmp", "w", encoding="utf-8") as f:
        for r in lines:
            ref = done[r["uid"]]
            # a lossless profile's answer is the reference's (run_item): it moves with it
            prof = {n: {**v, "answer": ref["answer"], "score": ref["score"]} if n in lossless else v
                    for n, v in r["profiles"].items()}
            f.write(json.dumps({**r, "ref": ref, "profiles": prof}) + "\n")
    os.replace(a.out + ".tmp", a.out)
    print(f"{len(want)} items: bf16's answer by the profiles' procedure differs from the step-by-step one "
          f"on {changed} ({100 * changed / max(1, len(want)):.1f}%) -> {a.out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ summary


def table(results: list[dict]) -> str:
    lines = ["| profile | ratio | task_rel_acc [95% CI] | answer_agree | QA F1 | answer KL | needle_acc | QA items | needle items |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ci = r.get("task_rel_acc_ci")
        lines.append(f"| {r['profile']} | {r['ratio']:.2f} | " if r["ratio"] else f"| {r['profile']} | - | ")
        lines[-1] += (f"{r['task_rel_acc']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}] | {r['answer_agree']:.3f} | {r['f1']:.3f} | "
                      if ci else "- | - | - | ")
        lines[-1] += f"{r['answer_kl']:.4f} | " if r.get("answer_kl") is not None else "- | "
        lines[-1] += (f"{r['needle_acc']:.3f} | " if "needle_acc" in r else "- | ") + f"{r['qa_items']} | {r['needle_items']} |"
    return "\n".join(lines)


def plot(results: list[dict], path: str, title: str) -> None:
    """Ratio vs relative task accuracy (95% CI bars) and vs answer agreement; baselines marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results if r.get("ratio") and "task_rel_acc" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key in zip(axes, ("task_rel_acc", "answer_agree")):
        for r in rs:
            base = r["profile"].split("-")[0] in ("kivi", "cachegen", "bf16") or r["profile"] == "kvserve"
            y = r[key] if key == "task_rel_acc" else 100 * r[key]
            err = None
            if key == "task_rel_acc":
                lo, hi = r["task_rel_acc_ci"]
                err = [[y - lo], [hi - y]]
            ax.errorbar([r["ratio"]], [y], yerr=err, fmt="s" if base else "o", ms=6 if base else 5,
                        color="tab:red" if base else "tab:blue", ecolor="0.7", capsize=2)
            ax.annotate(r["profile"], (r["ratio"], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if key == "task_rel_acc":
            ax.axhline(97, color="k", lw=0.6, ls="--")
            ax.axvline(4, color="k", lw=0.4, ls=":")
        ax.set_xlabel("compression ratio (bf16 KV bytes / bundle bytes)")
        ax.set_ylabel("relative QA accuracy, % of bf16 F1 (95% CI)" if key == "task_rel_acc"
                      else "QA answers identical to bf16's (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title + "  (red squares: packaged baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(a) -> int:
    rows = tasks.load_rows(a.paths)
    res = tasks.summarize(rows, a.profiles.split(",") if a.profiles else None)
    res.sort(key=lambda r: -(r["ratio"] or 0))
    print(table(res))
    if a.png:
        plot(res, a.png, a.title)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"method": __doc__.split("Method")[1].strip() if a.method is None else a.method,
                       "date": time.strftime("%Y-%m-%d"), "rows": len(rows), "results": res}, f, indent=1)
    return 0


def kl_screen(a) -> int:
    """Cheap screen (no generation): per item, the bf16 answer is decoded once; every profile
    only gets the teacher-forced pass along it: ``answer_kl`` and ``exact`` (the profile's
    answer is bf16's ``reply``: the same procedure on the uncompressed KV)."""
    from kvserve.models import load_model
    from kvserve.pipeline import decode

    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    profiles = resolve([p for s in a.profiles for p in s.split(",") if p], a.model)
    pipes = {c["name"]: Pipeline.from_config(c) for c in profiles}
    items = tasks.qa_items(tok, a.split, a.qa, [int(x) for x in a.qa_lengths.split(",")], seed=a.seed)
    stop = tasks.stop_token_ids(tok)
    acc = {n: {"kl": 0.0, "exact": 0, "raw": 0, "comp": 0} for n in pipes}
    for it in items:
        ref = tasks.reference(model, tok, it, stop, a.max_new)
        n, first = ref.seq_len, it.ids[-1]
        for name, p in pipes.items():
            blob = p.encode(ref.kv, meta={"seq_len": n}, threads=a.threads)
            lg: list = []
            ans = tasks.greedy_answer(model, decode(blob, threads=a.threads)[0], n, first, len(ref.answer), stop,
                                      guess=ref.answer, logits_out=lg)
            r = acc[name]
            r["kl"] += tasks.answer_kl(ref.logits, lg[0])
            r["exact"] += int(ans == ref.reply)
            r["raw"] += ref.raw_bytes
            r["comp"] += len(blob)
        done = items.index(it) + 1
        res = [{"profile": k, "ratio": v["raw"] / v["comp"], "answer_kl": v["kl"] / done, "exact": v["exact"] / done,
                "items": done} for k, v in acc.items()]
        if a.json:  # rewritten after every item: a stopped screen keeps what it measured
            with open(a.json + ".part", "w", encoding="utf-8") as f:
                json.dump({"method": kl_screen.__doc__, "split": a.split, "lengths": a.qa_lengths, "results": res}, f, indent=1)
            os.replace(a.json + ".part", a.json)
        print(f"item {done}/{len(items)} {it.uid}: done", file=sys.stderr, flush=True)
    print("| profile | ratio | answer KL | exact answer |\n|---|---|---|---|")
    for r in sorted(res, key=lambda r: -r["ratio"]):
        print(f"| {r['profile']} | {r['ratio']:.2f} | {r['answer_kl']:.4f} | {r['exact']:.3f} |")
    return 0


def speed(a) -> int:
    """Encode / decode MB/s (bf16 KV bytes per second) of profiles on the KV of one real
    prompt, best of ``--repeats`` after a warm-up, ``--threads`` codec and torch threads,
    the profiles interleaved per repeat."""
    from kvserve.models import load_model, prefill
    from kvserve.pipeline import decode

    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    item = tasks.qa_items(tok, "test", 1, (a.tokens,))[0]
    kv = prefill(model, item.ids[:-1])
    raw = sum(k.numel() * 2 + v.numel() * 2 for k, v in kv)
    pipes = {c["name"]: Pipeline.from_config(c) for c in resolve(a.profiles.split(","), a.model)}
    best = {n: [0.0, 0.0, 0.0] for n in pipes}
    for n, p in pipes.items():
        decode(p.encode(kv, threads=a.threads), threads=a.threads)
    for _ in range(a.repeats):
        for n, p in pipes.items():
            t0 = time.perf_counter()
            blob = p.encode(kv, threads=a.threads)
            t1 = time.perf_counter()
            decode(blob, threads=a.threads)
            t2 = time.perf_counter()
            b = best[n]
            best[n] = [raw / len(blob), max(b[1], raw / (t1 - t0) / 1e6), max(b[2], raw / (t2 - t1) / 1e6)]
    load = os.getloadavg()
    print(f"KV of a {len(item.ids)}-token prompt ({raw / 1e6:.1f} MB bf16), {a.threads} threads, best of {a.repeats}, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("| profile | ratio | encode MB/s | decode MB/s |\n|---|---|---|---|")
    for n, (r, e, d) in best.items():
        print(f"| {n} | {r:.2f} | {e:.0f} | {d:.0f} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, fn in (("run", run), ("prepare", prepare), ("reref", reref)):
        r = sub.add_parser(cmd)
        r.add_argument("--model", default="smollm2", choices=sorted(ROPE))
        r.add_argument("--split", default="tune", choices=["tune", "test"])
        r.add_argument("--qa", type=int, default=500)
        r.add_argument("--needle", type=int, default=96)
        r.add_argument("--qa-lengths", default="1024,2048,4096")
        r.add_argument("--needle-lengths", default="2048,3072,4096")
        r.add_argument("--shard", default="0/1")
        r.add_argument("--threads", type=int, default=1)
        r.add_argument("--seed", type=int, default=0)
        r.add_argument("--max-new", type=int, default=12)
        r.add_argument("--no-chat", action="store_true")
        r.add_argument("--progress", action="store_true")
        r.add_argument("--refs", default=None, required=cmd == "prepare",
                       help="folder of saved references (prepare writes them, run reads those present)")
        if cmd == "reref":
            r.add_argument("paths", nargs="+", help="rows (JSONL) of earlier runs made with these item options")
            r.add_argument("--out", required=True, help="the rows with their bf16 side recomputed (JSONL)")
        if cmd == "run":
            r.add_argument("--profiles", action="append", default=[])
            r.add_argument("--out", required=True)
            r.add_argument("--ratio-every", type=int, default=4)
            r.add_argument("--first", type=int, default=None, help="only the first N items of the list")
            r.add_argument("--only", default=None, choices=["qa", "needle"], help="only the items of this task")
            r.add_argument("--items-of", action="append", default=None, metavar="JSONL",
                           help="only the items that have rows in these earlier outputs")
        r.set_defaults(fn=fn)
    s = sub.add_parser("summary")
    s.add_argument("paths", nargs="+")
    s.add_argument("--profiles", default=None)
    s.add_argument("--json", default=None)
    s.add_argument("--method", default=None)
    s.add_argument("--png", default=None)
    s.add_argument("--title", default="SmolLM2-135M, HotpotQA (RULER-style)")
    s.set_defaults(fn=summary)
    k = sub.add_parser("kl")
    k.add_argument("--model", default="smollm2", choices=sorted(ROPE))
    k.add_argument("--split", default="tune", choices=["tune", "test"])
    k.add_argument("--qa", type=int, default=40)
    k.add_argument("--qa-lengths", default="1024")
    k.add_argument("--profiles", action="append", default=[])
    k.add_argument("--threads", type=int, default=1)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--max-new", type=int, default=12)
    k.add_argument("--json", default=None)
    k.set_defaults(fn=kl_screen)
    sp = sub.add_parser("speed")
    sp.add_argument("--model", default="smollm2", choices=sorted(ROPE))
    sp.add_argument("--profiles", default="kivi-4,cachegen,kvserve,k12v8-g32")
    sp.add_argument("--tokens", type=int, default=1024)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--repeats", type=int, default=5)
    sp.set_defaults(fn=speed)
    a = ap.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
