"""Profiler: search space, Pareto/hypervolume (hand-computed), grid and Bayesian engine on a
small space with a cheap synthetic quality function, library output."""
import json
import math

import numpy as np
import pytest

import kvserve
from kvserve import profiler as P
from kvserve.controller import load_library


def test_search_space_is_large_valid_and_unique():
    cfgs = P.search_space("default")
    assert len(cfgs) >= 1000
    keys = {P.quality_key(c) for c in cfgs}
    assert len(keys) >= 500
    assert len({c["name"] for c in cfgs}) == len(cfgs)
    ids = {(c["transform"]["id"], c["quantizer"]["id"], c["codec"]["id"]) for c in cfgs}
    assert {q for _, q, _ in ids} == {"kvserve", "kivi", "cachegen", "none"}
    assert {t for t, _, _ in ids} == {"hadamard", "identity"}
    assert {"rans", "zstd", "bitpack", "enec"} <= {c for _, _, c in ids}
    for c in cfgs[::97]:
        kvserve.profile_from_config(c)


def test_family_levels_monotone_structure():
    a = {"transform": {"id": "hadamard", "seed": 0}, "quantizer": P._kvq(8, 6, 0.33, "token")}
    b = {"transform": {"id": "hadamard", "seed": 0}, "quantizer": P._kvq(6, 6, 0.33, "token")}
    c = {"transform": {"id": "identity"}, "quantizer": P._kvq(6, 6, 0.33, "token")}
    fa, la = P.family_levels(a)
    fb, lb = P.family_levels(b)
    assert fa == fb and all(x >= y for x, y in zip(la, lb)) and la != lb
    assert P.family_levels(c)[0] != fa


def test_pareto_and_hypervolume_hand_computed():
    ref = (1.0, 90.0, 20.0)
    assert P.hypervolume(np.array([[3.0, 95.0, 10.0]]), ref) == pytest.approx(2 * 5 * 10)
    two = np.array([[3.0, 95.0, 10.0], [2.0, 99.0, 5.0]])
    # boxes 100 + 135 minus their overlap [1,2]x[90,95]x[10,20] = 50
    assert P.hypervolume(two, ref) == pytest.approx(185.0)
    # a dominated point and points outside the reference add nothing
    more = np.vstack([two, [[1.5, 94.0, 12.0], [5.0, 85.0, 1.0], [0.9, 99.0, 1.0], [9.0, 99.0, 25.0]]])
    assert P.hypervolume(more, ref) == pytest.approx(185.0)
    m = P.pareto_mask(more)
    assert m.tolist() == [True, True, False, True, True, True]
    assert P.pareto_mask(np.array([[2.0, 95.0, 5.0], [2.0, 95.0, 5.0]])).tolist() == [True, False]
    # relative perplexity above 100 is noise: capped, so it neither dominates nor adds volume
    capped = P.objectives([2.0, 2.0], [102.0, 100.0], [5.0, 5.0])
    assert capped[:, 1].tolist() == [100.0, 100.0]
    assert P.pareto_mask(capped).tolist() == [True, False]
    assert P.hypervolume(P.objectives([3.0], [104.0], [10.0]), ref) == pytest.approx(2 * 10 * 10)


def _synthetic(seed=0, subset=None):
    """A subset of the real space with a deterministic synthetic ratio/speed/quality model:
    quality rises with log2 levels (Hadamard helps), ratio falls with bits."""
    cfgs = P.search_space("default")
    if subset:
        cfgs = [c for c in cfgs if subset(c)]
    noise = np.random.default_rng(seed)
    qnoise = {}

    def cheap(c):
        f = P.key_features(json.loads(P.quality_key(c)))
        bits = (f[5] + f[6]) / 2
        cid = c["codec"]["id"]
        r = 16 / (bits * 0.8 if cid == "rans" else math.ceil(bits) if cid == "bitpack" else bits * 0.9)
        enc = {"rans": 80.0, "bitpack": 400.0, "zstd": 150.0, "enec": 300.0, "lz4": 500.0}[cid]
        return r, enc, enc * 1.5

    def quality(key):
        k = json.dumps(key, sort_keys=True)
        if k not in qnoise:
            qnoise[k] = noise.normal(0, 0.1)
        f = P.key_features(key)
        return 100 - 80 * math.exp(-0.9 * (f[7] + f[8])) - (2.5 if f[0] == 0 else 0) + qnoise[k]

    return cfgs, cheap, quality


def test_grid_and_bayes_on_a_small_space():
    cfgs, cheap, quality = _synthetic(subset=lambda c: c["quantizer"]["id"] in ("kvserve", "none")
                                      and c["quantizer"].get("value_axis", "token") == "token"
                                      and c["quantizer"].get("low_fraction", 0) in (0, 0.33))
    grid_recs = P.measure_space(cfgs, cheap, progress=False)
    g = P.grid_search(grid_recs, quality, progress=False)
    sp = P.Space(grid_recs)
    lossy = int((~sp.lossless).sum())
    assert g.evaluations == lossy and lossy >= 150
    truth = {r.key: r.quality for r in grid_recs}
    hv_grid = sp.hv(truth)
    calls = []

    def lookup(key):
        calls.append(key)
        return truth[json.dumps(key, sort_keys=True)]

    recs = P.measure_space(cfgs, cheap, progress=False)
    budget = math.ceil(lossy / 10)
    b = P.bayes_search(recs, lookup, budget=budget, seed=0, progress=False)
    assert len(calls) == b.evaluations <= budget
    assert len(set(b.evaluated)) == b.evaluations                      # never evaluates twice
    hv = sp.hv({r.key: r.quality for r in recs if r.quality is not None})
    assert hv >= 0.9 * hv_grid, hv / hv_grid
    # trace is the HV after each evaluation and never decreases
    assert len(b.hv_trace) == b.evaluations and all(x <= y + 1e-9 for x, y in zip(b.hv_trace, b.hv_trace[1:]))
    # lossless keys are 100 by construction, never evaluated
    assert all(r.quality == 100.0 for r in recs if r.config["quantizer"]["id"] == "none")
    assert not any(json.loads(k)["quantizer"]["id"] == "none" for k in b.evaluated)
    # a random search with the same budget does clearly worse than the engine
    rng = np.random.default_rng(0)
    lossy_keys = [k for k, l in zip(sp.keys, sp.lossless) if not l]
    rand = [sp.hv({**{k: 100.0 for k, l in zip(sp.keys, sp.lossless) if l},
                   **{k: truth[k] for k in rng.choice(lossy_keys, b.evaluations, replace=False)}}) for _ in range(5)]
    assert hv > max(rand)
    # the reference ("paper") acquisition runs too
    recs2 = P.measure_space(cfgs, cheap, progress=False)
    b2 = P.bayes_search(recs2, lookup, budget=budget, acquisition="paper", seed=0, progress=False)
    assert 0 < b2.evaluations <= budget
    with pytest.raises(kvserve.KVServeError):
        P.bayes_search(recs2, lookup, acquisition="nope", progress=False)


def test_monotonicity_bounds_and_pruning():
    cfgs, cheap, quality = _synthetic(subset=lambda c: c["transform"]["id"] == "hadamard"
                                      and c["quantizer"]["id"] == "kvserve" and c["quantizer"]["value_axis"] == "token"
                                      and c["quantizer"]["low_fraction"] == 0)
    recs = P.measure_space(cfgs, cheap, progress=False)
    sp = P.Space(recs)
    hi_key = next(k for k in sp.keys if '"high_key_levels": 16' in k and '"high_value_levels": 12' in k)
    lo_key = next(k for k in sp.keys if '"high_key_levels": 4' in k and '"high_value_levels": 3' in k)
    lo, hi = P._bounds(sp, {hi_key: 99.0, lo_key: 80.0}, tol=0.5)
    j = sp.keys.index(next(k for k in sp.keys if '"high_key_levels": 8' in k and '"high_value_levels": 6' in k))
    assert lo[j] == pytest.approx(79.5) and hi[j] == pytest.approx(99.5)
    # early stopping / pruning end the search well before an unreachable budget
    b = P.bayes_search(recs, quality, budget=len(sp.keys), seed=0, progress=False)
    assert b.evaluations < len(sp.keys) // 2
    assert b.stopped.startswith(("early stop", "space exhausted"))


def test_library_from_search(tmp_path):
    cfgs, cheap, quality = _synthetic(subset=lambda c: c["transform"]["id"] == "hadamard"
                                      and c["quantizer"]["id"] in ("kvserve", "none")
                                      and c["quantizer"].get("value_axis", "token") == "token"
                                      and c["quantizer"].get("low_fraction", 0) == 0)
    recs = P.measure_space(cfgs, cheap, progress=False)
    P.grid_search(recs, quality, progress=False)
    lib = P.build_library(recs, {"model": "synthetic"})
    front = P.pareto_records(recs)
    assert [e.name for e in lib.entries] == [r.name for r in front]
    assert all(e.quality >= P.QUALITY_FLOOR for e in lib.entries)
    pts = P.objectives([e.ratio for e in lib.entries], [e.quality for e in lib.entries],
                       [e.codec_ms_per_MB for e in lib.entries])
    assert P.pareto_mask(pts).all()                     # the library is exactly a Pareto set
    path = tmp_path / "lib.json"
    lib.save(str(path))
    lib2 = load_library(str(path))
    assert len(lib2.entries) == len(lib.entries) and lib2.meta["model"] == "synthetic"
    png = tmp_path / "front.png"
    P.plot_front(str(png), recs, "test")
    assert png.stat().st_size > 1000
    with pytest.raises(kvserve.KVServeError, match="empty library"):
        P.build_library([P.Record("x", cfgs[0], P.quality_key(cfgs[0]), 2.0, 1.0, 1.0, 50.0)], {})


def test_refresh_speeds_with_real_codecs(tmp_path):
    """Re-timing a library's entries with the real pipelines: ratios re-measured (equal to
    the first measurement), speeds replaced, qualities kept; a changed encoding is refused."""
    import dataclasses

    from kvserve.pipeline import Pipeline, decode

    from kvserve_test_common import make_kv

    kv = make_kv(layers=4, heads=3, tokens=64, dim=64, seed=2)
    raw = sum(k.numel() * 2 + v.numel() * 2 for k, v in kv)

    def cheap(config):
        import time

        pipe = Pipeline.from_config(config)
        t0 = time.perf_counter()
        blob = pipe.encode(kv, meta={"seq_len": 64})
        t1 = time.perf_counter()
        decode(blob)
        t2 = time.perf_counter()
        return raw / len(blob), raw / (t1 - t0) / 1e6, raw / (t2 - t1) / 1e6

    lib = load_library("smollm2-ppl")
    picked = [e for e in lib.entries if e.config["quantizer"]["id"] == "kvserve"
              and e.config["quantizer"].get("scores") is None][:3]
    assert len(picked) == 3
    entries = [dataclasses.replace(e, ratio=cheap(e.config)[0], encode_MBps=1.0, decode_MBps=2.0) for e in picked]
    small = type(lib)(entries, {"model": "synthetic-kv"})
    new = P.refresh_speeds(small, cheap, repeats=2)
    for old, e in zip(entries, new.entries):
        assert e.name == old.name and e.quality == old.quality and e.ratio == pytest.approx(old.ratio, rel=1e-9)
        # re-measured (not a timing target: the placeholders 1.0 / 2.0 are replaced by measurements)
        assert e.encode_MBps != 1.0 and e.decode_MBps != 2.0 and e.encode_MBps > 0 and e.decode_MBps > 0
    ch = new.meta["speeds_refreshed"]
    assert ch["repeats"] == 2 and [c["name"] for c in ch["changes"]] == [e.name for e in entries]
    path = tmp_path / "lib.json"
    new.save(str(path))
    assert load_library(str(path)).entries[0].encode_MBps == new.entries[0].encode_MBps
    bad = type(lib)([dataclasses.replace(entries[0], ratio=entries[0].ratio * 1.2)], {})
    with pytest.raises(kvserve.KVServeError, match="encoding changed"):
        P.refresh_speeds(bad, cheap, repeats=1)
    with pytest.raises(kvserve.KVServeError, match="repeats"):
        P.refresh_speeds(small, cheap, repeats=0)


def _tune_ids(n, split="tune"):
    from kvserve.tasks import split_of

    return [i for i in (f"id{j}" for j in range(200)) if split_of(i) == split][:n]


def test_confirm_replaces_the_search_figures_with_many_items(tmp_path, capsys):
    """Second fidelity of a task profile: candidates are the evaluated lossy keys whose CI
    reaches the floor (highest-ratio codec variant); confirmation rows replace their
    qualities (same items for all), other keys lose theirs, lossless keys stay 100."""
    from kvserve.cli import main

    keep = {f"{k}-{c}" for k in ("H-k16v8-g32-r64q64", "H-k8v4-g64", "H-k24v16-g64") for c in ("bp", "irans")}
    cfgs = [c for c in P.search_space("tasks") if c["name"] in keep or c["quantizer"]["id"] == "none"]
    assert len(cfgs) == 9
    recs = [P.Record(c["name"], c, P.quality_key(c), 1.5 if c["quantizer"]["id"] == "none" else
                     (4.5 if "k16v8" in c["name"] else 7.0 if "k8v4" in c["name"] else 3.5) * (1.1 if "irans" in c["name"] else 1.0),
                     300.0, 400.0) for c in cfgs]
    q = {"k16v8": 70.0, "k8v4": 60.0}
    for r in recs:
        r.quality = 100.0 if r.config["quantizer"]["id"] == "none" else next((v for k, v in q.items() if k in r.name), None)
    key = {k: next(r.key for r in recs if k in r.name) for k in q}
    details = {key["k16v8"]: {"quality_ci": [41.8, 103.6], "items": 60}, key["k8v4"]: {"quality_ci": [20.0, 85.0], "items": 60}}
    cand = P.confirm_candidates(recs, details)
    assert [c["name"] for c in cand] == ["H-k16v8-g32-r64q64-irans"]  # k8v4's CI is below the floor
    path = tmp_path / "records.json"
    path.write_text(json.dumps({"method": {"model": "smollm2", "qa_items": 60, "metric": "task_rel_acc (...)"},
                                "records": [r.to_json() for r in recs], "details": details}))
    assert main(["profile", "--from-records", str(path), "--candidates", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "c" / "H-k16v8-g32-r64q64-irans.json")

    name = cand[0]["name"]
    ids = _tune_ids(5)
    ref_s, new_s = [1.0, 0.5, 0.0, 1.0, 0.4], [1.0, 0.4, 0.0, 1.0, 0.4]
    rows = [{"uid": f"qa-{i}-1024", "task": "qa", "length": 1024, "ref": {"answer": f"a{j}", "score": rs},
             "raw": 100, "profiles": {name: {"answer": f"a{j}" if ns == rs else "x", "score": ns, "comp": None,
                                              "answer_kl": 0.01}}}
            for j, (i, rs, ns) in enumerate(zip(ids, ref_s, new_s))]
    rows.append({**rows[0], "uid": f"qa-{ids[0]}-2048", "profiles": {}})  # lacks the candidate: not counted
    out, det, n = P.confirm(recs, details, rows)
    assert n == 5
    got = {r.name: r.quality for r in out}
    assert got[name] == pytest.approx(100 * sum(new_s) / sum(ref_s)) == got["H-k16v8-g32-r64q64-bp"]
    assert all(got[r.name] is None for r in out if "k8v4" in r.name or "k24v16" in r.name)
    assert all(got[r.name] == 100.0 for r in out if r.config["quantizer"]["id"] == "none")
    d = det[key["k16v8"]]
    assert d["items"] == 5 and d["answer_agree"] == 0.8 and d["search"] == details[key["k16v8"]]
    assert d["quality_ci"][0] <= got[name] <= d["quality_ci"][1]
    assert recs[0].quality is not None or recs[0].config["quantizer"]["id"] != "none"  # inputs untouched

    rpath = tmp_path / "rows.jsonl"
    rpath.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut sh')
    lib_path = tmp_path / "lib.json"
    assert main(["profile", "--from-records", str(path), "--confirm", str(rpath), "--out", str(lib_path)]) == 0
    lib = load_library(str(lib_path))
    assert lib.meta["quality_metric"] == "task_rel_acc" and lib.meta["method"]["qa_items"] == 5
    e = next(e for e in lib.entries if e.name == name)
    assert e.extra["items"] == 5 and e.extra["quality_ci"] == d["quality_ci"]

    bad = [{**rows[0], "uid": f"qa-{_tune_ids(1, 'test')[0]}-1024"}]
    with pytest.raises(kvserve.KVServeError, match="test-split"):
        P.confirm(recs, details, bad)
    with pytest.raises(kvserve.KVServeError, match="nothing to confirm"):
        P.confirm(recs, details, [{**rows[0], "profiles": {"other": rows[0]["profiles"][name]}}])
    capsys.readouterr()
    assert main(["profile", "--confirm", str(rpath)]) == 2
    assert "need --from-records" in capsys.readouterr().err
    path.write_text(json.dumps({"method": {"metric": "rel_ppl"}, "records": [], "details": {}}))
    assert main(["profile", "--from-records", str(path), "--confirm", str(rpath)]) == 2
    assert "not a task-objective search" in capsys.readouterr().err
    path.write_text("{")
    assert main(["profile", "--from-records", str(path), "--confirm", str(rpath)]) == 2
    assert "not a records file" in capsys.readouterr().err


def test_task_library_withholds_keys_that_change_many_answers(tmp_path, capsys):
    """A lossy key whose answers agree with bf16's on fewer than ``min_agree`` of the items is
    withheld (its figures in meta ``withheld``), before the Pareto selection: the trusted key it
    would have dominated stays, and `decide --min-quality 97` can only pick trusted keys."""
    from kvserve.cli import main

    names = ("H-k16v8-g32-r64q64-irans", "H-k8v16-g64-irans", "H-k8v4-r64q64-irans")
    cfgs = {c["name"]: c for c in P.search_space("tasks") if c["name"] in names or c["name"] == "bf16-enec"}
    figures = {"H-k16v8-g32-r64q64-irans": (4.5, 99.7, 0.754), "H-k8v16-g64-irans": (4.8, 113.4, 0.523),
               "H-k8v4-r64q64-irans": (8.0, 89.8, 0.483)}
    recs = [P.Record("bf16-enec", cfgs["bf16-enec"], P.quality_key(cfgs["bf16-enec"]), 1.4, 900.0, 900.0, 100.0)]
    details = {}
    for n, (ratio, q, agree) in figures.items():
        recs.append(P.Record(n, cfgs[n], P.quality_key(cfgs[n]), ratio, 300.0, 400.0, q))
        details[recs[-1].key] = {"quality_ci": [q - 10, q + 10], "items": 325, "answer_agree": agree, "answer_kl": 0.01}
    lib = P.build_library(recs, {"model": "smollm2"}, details=details)
    assert [e.name for e in lib.entries] == ["H-k16v8-g32-r64q64-irans", "bf16-enec"]  # k8v16 would dominate k16v8
    assert lib.meta["min_answer_agree"] == P.MIN_ANSWER_AGREE
    assert list(lib.meta["withheld"]) == ["H-k8v16-g64"]  # k8v4 is below the floor anyway
    assert lib.meta["withheld"]["H-k8v16-g64"] == {"ratio": 4.8, "quality": 113.4, "quality_ci": [103.4, 123.4],
                                                   "answer_agree": 0.523, "items": 325}
    loose = P.build_library(recs, {"model": "smollm2"}, details=details, min_agree=0.5)
    assert [e.name for e in loose.entries][0] == "H-k8v16-g64-irans" and loose.meta["withheld"] == {}
    path = tmp_path / "lib.json"
    lib.save(str(path))
    out = tmp_path / "d.json"
    assert main(["decide", "--library", str(path), "--bandwidth-mbps", "10", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["profile"] == "H-k16v8-g32-r64q64-irans"
    assert load_library(str(path)).meta["withheld"] == lib.meta["withheld"]
    capsys.readouterr()
    assert main(["profile", "--from-records", str(path), "--confirm", str(path), "--min-agree", "1.5"]) == 2
    assert "--min-agree 1.5" in capsys.readouterr().err
