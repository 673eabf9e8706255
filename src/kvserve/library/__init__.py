"""Profile libraries: the Pareto set of profiled candidates the controller decides from.

A library is a JSON file (``format: "kvserve-profile-library"``, ``version: 1``; fields in
docs/KVSERVE.md) written by ``kvserve profile`` and read by :func:`load_library`; the
packaged SmolLM2 libraries are ``kvserve/library/smollm2.json`` (relative task accuracy, the
default) and ``smollm2-ppl.json`` (relative perplexity). Each :class:`Entry` holds a
full profile config and its measured ratio, quality and codec speeds.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import KVServeError
from ..latency import breakeven_mbps
from ..pipeline import Pipeline

BF16 = "bf16"
BF16_CONFIG = {"name": "bf16", "transform": {"id": "identity"}, "quantizer": {"id": "none"}, "codec": {"id": "none"}}
LIBRARY_FORMAT = "kvserve-profile-library"
LIBRARY_VERSION = 1
QUALITY_BUDGETS = (90.0, 95.0, 97.0, 98.0, 99.0)

@dataclass
class Entry:
    """One profiled candidate: its full profile config and the measured figures."""

    name: str
    config: dict
    ratio: float
    quality: float
    encode_MBps: float
    decode_MBps: float
    extra: dict = field(default_factory=dict)

    @property
    def codec_ms_per_MB(self) -> float:
        return 1e3 / self.encode_MBps + 1e3 / self.decode_MBps

    @property
    def codec_id(self) -> str:
        return str(self.config.get("codec", {}).get("id", "?"))

    @property
    def lossless(self) -> bool:
        """No quantizer: the decoded KV is the original's, bit for bit."""
        return self.config.get("quantizer", {}).get("id") == "none"


BF16_ENTRY = Entry(BF16, BF16_CONFIG, 1.0, 100.0, math.inf, math.inf)


@dataclass
class Library:
    entries: list[Entry]
    meta: dict = field(default_factory=dict)

    def by_name(self, name: str) -> Entry:
        if name == BF16:
            return BF16_ENTRY
        for e in self.entries:
            if e.name == name:
                return e
        raise KVServeError(f"library has no profile {name!r}")

    def to_json(self) -> dict:
        out = {"format": LIBRARY_FORMAT, "version": LIBRARY_VERSION, **{k: v for k, v in self.meta.items()
                                                                       if k not in ("format", "version", "entries", "intervals")}}
        budgets = sorted(set(QUALITY_BUDGETS) | set(self.meta.get("quality_budgets", [])))
        intervals = {f"{q:g}": [{"profile": n, "lo_mbps": lo, "hi_mbps": None if math.isinf(hi) else hi}
                                for n, lo, hi in optimal_intervals(self.entries, q)] for q in budgets}
        entries = []
        for e in self.entries:
            d = {"name": e.name, "config": e.config, "ratio": e.ratio, "quality": e.quality,
                 "encode_MBps": e.encode_MBps, "decode_MBps": e.decode_MBps,
                 "codec_ms_per_MB": e.codec_ms_per_MB,
                 "breakeven_mbps": breakeven_mbps(e.ratio, e.encode_MBps, e.decode_MBps),
                 "optimal_mbps": {q: [[r["lo_mbps"], r["hi_mbps"]] for r in rows if r["profile"] == e.name]
                                  for q, rows in intervals.items()}}
            d.update({k: v for k, v in e.extra.items() if k not in d})
            entries.append(d)
        out["entries"] = entries
        out["intervals"] = intervals
        return out

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")


def _num(d: dict, key: str, where: str, lo: float = 0.0, strict: bool = True) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (v <= lo if strict else v < lo):
        raise KVServeError(f"{where}: {key!r} must be a finite number {'>' if strict else '>='} {lo:g}, got {v!r}")
    return float(v)


def library_from_json(obj: Any, source: str = "library") -> Library:
    """Validate a parsed library file; every problem raises :class:`KVServeError`."""
    if not isinstance(obj, dict):
        raise KVServeError(f"{source}: a profile library must be a JSON object")
    if obj.get("format") != LIBRARY_FORMAT:
        raise KVServeError(f"{source}: not a profile library (format must be {LIBRARY_FORMAT!r})")
    if obj.get("version") != LIBRARY_VERSION:
        raise KVServeError(f"{source}: unsupported library version {obj.get('version')!r}")
    raw = obj.get("entries")
    if not isinstance(raw, list) or not raw:
        raise KVServeError(f"{source}: 'entries' must be a non-empty list")
    entries, seen = [], set()
    known = {"name", "config", "ratio", "quality", "encode_MBps", "decode_MBps", "codec_ms_per_MB",
             "breakeven_mbps", "optimal_mbps"}
    for i, d in enumerate(raw):
        where = f"{source}: entry {i}"
        if not isinstance(d, dict):
            raise KVServeError(f"{where} must be an object")
        name = d.get("name")
        if not isinstance(name, str) or not name or len(name) > 200:
            raise KVServeError(f"{where}: 'name' must be a non-empty string")
        if name == BF16 or name in seen:
            raise KVServeError(f"{where}: name {name!r} is reserved or duplicated")
        seen.add(name)
        where = f"{source}: entry {name!r}"
        cfg = d.get("config")
        if not isinstance(cfg, dict):
            raise KVServeError(f"{where}: 'config' must be a profile config object")
        try:
            Pipeline.from_config(cfg)
        except KVServeError as exc:
            raise KVServeError(f"{where}: invalid profile config ({exc})") from exc
        ratio = _num(d, "ratio", where)
        quality = _num(d, "quality", where, strict=False)
        if quality > 1000:
            raise KVServeError(f"{where}: 'quality' {quality} is not a relative score (0..~100)")
        _check_task_figures(d, where)
        entries.append(Entry(name, cfg, ratio, quality, _num(d, "encode_MBps", where), _num(d, "decode_MBps", where),
                             {k: v for k, v in d.items() if k not in known}))
    meta = {k: v for k, v in obj.items() if k not in ("entries", "intervals")}
    if meta.get("quality_metric", "rel_ppl") not in ("rel_ppl", "task_rel_acc"):
        raise KVServeError(f"{source}: 'quality_metric' must be 'rel_ppl' or 'task_rel_acc'")
    if "min_answer_agree" in meta:
        _fraction(meta, "min_answer_agree", source)
    withheld = meta.get("withheld", {})
    if not isinstance(withheld, dict) or len(withheld) > 10000:
        raise KVServeError(f"{source}: 'withheld' must be an object of key name -> figures")
    for k, w in withheld.items():
        if not isinstance(w, dict):
            raise KVServeError(f"{source}: withheld {k[:80]!r} must be an object")
        _num(w, "ratio", f"{source}: withheld {k[:80]!r}")
        _check_task_figures(w, f"{source}: withheld {k[:80]!r}")
    return Library(entries, meta)


def _fraction(d: dict, key: str, where: str) -> float:
    v = _num(d, key, where, strict=False)
    if v > 1:
        raise KVServeError(f"{where}: {key!r} must be a fraction 0..1, got {v!r}")
    return v


def _check_task_figures(d: dict, where: str) -> None:
    """The optional task-accuracy figures of an entry (or a withheld key): types and ranges,
    so that printing them cannot fail."""
    ci = d.get("quality_ci")
    if ci is not None:
        if (not isinstance(ci, list) or len(ci) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                            or not math.isfinite(x) for x in ci) or ci[0] > ci[1]):
            raise KVServeError(f"{where}: 'quality_ci' must be [lo, hi] with finite lo <= hi")
    if d.get("answer_agree") is not None:
        _fraction(d, "answer_agree", where)
    for key in ("answer_kl", "quality", "task_rel_acc", "f1", "f1_bf16"):
        if d.get(key) is not None:
            _num(d, key, where, strict=False)
    n = d.get("items")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise KVServeError(f"{where}: 'items' must be a count >= 0, got {n!r}")


def packaged_libraries() -> list[str]:
    """Names of the packaged libraries (``smollm2``: relative task accuracy, the default;
    ``smollm2-ppl``: relative perplexity, the former default)."""
    return sorted(p.name[:-5] for p in resources.files("kvserve").joinpath("library").iterdir()
                  if p.name.endswith(".json"))


def load_library(path: str | None = None) -> Library:
    """A packaged library by name (``path=None``: ``smollm2``; see :func:`packaged_libraries`)
    or a library JSON file."""
    name = "smollm2" if path is None else path
    if name in packaged_libraries() and not os.path.isfile(name):
        source = f"kvserve/library/{name}.json"
        try:
            text = resources.files("kvserve").joinpath("library", name + ".json").read_text(encoding="utf-8")
        except OSError as exc:
            raise KVServeError(f"the packaged profile library {source} cannot be read ({exc})") from None
    elif path is None:
        raise KVServeError("the packaged profile library kvserve/library/smollm2.json is missing")
    else:
        if not os.path.isfile(path):
            raise KVServeError(f"profile library {path!r} does not exist (a JSON file, or a packaged library: "
                               f"{', '.join(packaged_libraries())})")
        with open(path, "rb") as f:  # bytes: bad UTF-8 is a JSON error below
            text = f.read()
        source = path
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise KVServeError(f"{source}: not valid JSON ({type(exc).__name__}: {exc})") from None
    return library_from_json(obj, source)


def optimal_intervals(entries: list[Entry], min_quality: float = 0.0) -> list[tuple[str, float, float]]:
    """``[(name, lo_mbps, hi_mbps), ...]`` ascending in bandwidth: which candidate (bf16
    included) has the lowest modelled latency in each bandwidth interval, among entries with
    ``quality >= min_quality``. ``hi`` is ``inf`` for the top interval (bf16 there when any
    codec costs time). Ties go to the cheaper codec."""
    cands = [BF16_ENTRY] + [e for e in entries if e.quality >= min_quality]
    # cost per MB: a + x / cr with x = 8000 / B (ms of bf16 transfer per MB)
    lines = [(0.0 if e is BF16_ENTRY else e.codec_ms_per_MB, 1.0 / e.ratio, e.name) for e in cands]
    xs = set()
    for i, (a1, b1, _) in enumerate(lines):
        for a2, b2, _ in lines[i + 1:]:
            if b1 != b2:
                x = (a2 - a1) / (b1 - b2)
                if x > 0 and math.isfinite(x):
                    xs.add(x)
    pts = sorted(xs)

    def best(x):
        return min(lines, key=lambda ln: (ln[0] + ln[1] * x, ln[0]))[2]

    probes = ([pts[0] / 2] if pts else [1.0]) + [(p + q) / 2 for p, q in zip(pts, pts[1:])] + ([pts[-1] * 2] if pts else [])
    bounds = [0.0] + pts + [math.inf]
    segs: list[list] = []  # in x, ascending: [name, x_lo, x_hi]
    for j, x in enumerate(probes):
        name = best(x)
        lo, hi = bounds[j], bounds[j + 1]
        if segs and segs[-1][0] == name:
            segs[-1][2] = hi
        else:
            segs.append([name, lo, hi])
    out = []
    for name, xlo, xhi in reversed(segs):  # x = 8000/B: high x = low bandwidth
        lo = 0.0 if math.isinf(xhi) else 8000.0 / xhi
        hi = math.inf if xlo == 0 else 8000.0 / xlo
        out.append((name, lo, hi))
    return out
