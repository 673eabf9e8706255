"""Latency model, optimal intervals, decisions, learning, library files, simulation targets.

Hand-made library (per MB of KV: codec ms = 1000/enc + 1000/dec, transfer = 8000/(B*cr)):

| name | ratio | enc | dec | codec ms/MB | quality |
| A    | 4     | 100 | 200 | 15          | 99      |
| B    | 8     | 50  | 50  | 40          | 95      |
| C    | 2     | 1000| 1000| 2           | 100     |
"""
import json
import math
from pathlib import Path

import pytest

import kvserve
from kvserve import controller as C
from kvserve import latency as L
from kvserve import library as LB
from kvserve.controller import Controller, Decision
from kvserve.library import Entry, Library, load_library


def cfg(name, codec="rans"):
    return {"name": name, "transform": {"id": "hadamard", "seed": 0},
            "quantizer": {"id": "kvserve", "high_key_levels": 8, "high_value_levels": 6, "low_key_levels": 4,
                          "low_value_levels": 3, "low_fraction": 0.0, "split": "layer", "scores": None,
                          "key_axis": "channel", "value_axis": "token", "key_group": 0, "keep_sinks": 1, "keep_recent": 0},
            "codec": {"id": codec, "pair": True} if codec == "rans" else {"id": codec}}


@pytest.fixture
def lib():
    return Library([Entry("A", cfg("A"), 4.0, 99.0, 100.0, 200.0),
                    Entry("B", cfg("B"), 8.0, 95.0, 50.0, 50.0),
                    Entry("C", cfg("C", "bitpack"), 2.0, 100.0, 1000.0, 1000.0)], {"model": "test"})


MB = 1e6


# ----------------------------------------------------------------- latency model

def test_latency_model_hand_computed():
    assert L.transfer_ms(MB, 8.0) == pytest.approx(1000.0)          # 8 Mbps = 1 MB/s
    assert L.transfer_ms(MB, 8.0, ratio=4) == pytest.approx(250.0)
    assert L.codec_ms(MB, 100, 200) == pytest.approx(15.0)           # 10 ms encode + 5 ms decode
    assert L.predict_ms(MB, 8.0, 4, 100, 200, t_model_ms=7) == pytest.approx(7 + 15 + 250)
    assert L.uncompressed_ms(MB, 8.0, t_model_ms=7) == pytest.approx(1007.0)
    # both codec ends count: B* = (1 - 1/4) / (1/100e6 + 1/200e6) B/s = 5e7 B/s = 400 Mbps
    assert L.breakeven_mbps(4, 100, 200) == pytest.approx(400.0)
    assert L.predict_ms(MB, 400, 4, 100, 200) == pytest.approx(L.uncompressed_ms(MB, 400))
    assert L.breakeven_mbps(1.0, 100, 200) == 0.0


def test_optimal_intervals_hand_computed(lib):
    rows = LB.optimal_intervals(lib.entries, 0.0)
    # B|A at 40 Mbps, A|C at 2000/13 Mbps, C|bf16 at 2000 Mbps
    assert [r[0] for r in rows] == ["B", "A", "C", "bf16"]
    assert rows[0][1] == 0.0
    assert rows[0][2] == pytest.approx(40.0)
    assert rows[1][2] == pytest.approx(2000 / 13)
    assert rows[2][2] == pytest.approx(2000.0)
    assert math.isinf(rows[3][2])
    rows97 = LB.optimal_intervals(lib.entries, 97.0)  # B is below the quality budget
    assert [r[0] for r in rows97] == ["A", "C", "bf16"]
    # the intervals agree with brute force over the model
    for mbps in [5, 30, 60, 100, 500, 1500, 3000, 1e5]:
        best = min([LB.BF16_ENTRY] + lib.entries,
                   key=lambda e: L.uncompressed_ms(MB, mbps) if e.name == "bf16" else L.predict_ms(MB, mbps, e.ratio, e.encode_MBps, e.decode_MBps))
        hit = [n for n, lo, hi in rows if lo <= mbps < hi]
        assert hit == [best.name], mbps


# ----------------------------------------------------------------- decisions

def test_decide_hand_computed(lib):
    ctl = Controller(lib, min_quality=0.0, epsilon=0.0)
    d = ctl.decide(MB, 20.0)
    assert isinstance(d, Decision)
    assert d.profile == "B" and d.predicted_ms == pytest.approx(40 + 50) and d.uncompressed_ms == pytest.approx(400)
    assert d.ratio == 8.0 and d.quality == 95.0 and d.config == cfg("B")
    kvserve.profile_from_config(d.config)  # usable by kvserve.encode
    d = ctl.decide(MB, 100.0)
    assert d.profile == "A" and d.predicted_ms == pytest.approx(35.0) and d.reason == "fastest"
    d = ctl.decide(MB, 5000.0)
    assert d.profile == "bf16" and d.config["quantizer"]["id"] == "none" and d.reason.startswith("no_compression")
    assert d.predicted_ms == pytest.approx(1.6) and d.ratio == 1.0
    d = ctl.decide(MB, 100.0, t_model_ms=10.0)
    assert d.predicted_ms == pytest.approx(45.0) and d.uncompressed_ms == pytest.approx(90.0)


def test_replan_hand_computed(lib):
    """Mid-transfer: a bf16 bundle (1 MB) planned for 5000 Mbps meets a 16 Mbps link."""
    ctl = Controller(lib, min_quality=0.0, epsilon=0.0)
    d = ctl.decide(MB, 5000.0)
    assert d.profile == "bf16"
    step = ctl.step
    # 100 kB in 50 ms = 16 Mbps: 900 kB left = 450 ms; B at 16 Mbps = 40 + 62.5 ms < 0.7 * 450
    assert ctl.replan(d, MB, 100_000, 1_000_000, 0.05) == "B"
    assert ctl.step == step  # no side effects
    assert ctl.replan(d, MB, 500_000, 1_000_000, 0.001) is None        # 4000 Mbps: as planned
    assert ctl.replan(d, MB, 10_000, 1_000_000, 0.05) is None          # too few bytes to judge
    assert ctl.replan(d, MB, 100_000, 1_000_000, 0.01) is None         # too early to judge
    assert ctl.replan(d, MB, 990_000, 1_000_000, 0.495) is None        # 5 ms left: finish it
    assert ctl.replan(d, MB, 1_000_000, 1_000_000, 0.5) is None
    # already the best choice at the rate seen: B planned at 20 Mbps, link at 2 Mbps
    d = ctl.decide(MB, 20.0)
    assert d.profile == "B" and ctl.replan(d, MB, 100_000, 125_000, 0.4) is None
    # the quality budget still applies: at 97, B is not a candidate, A is
    d = Controller(lib, min_quality=97.0, epsilon=0.0).decide(MB, 5000.0)
    assert Controller(lib, min_quality=97.0, epsilon=0.0).replan(d, MB, 100_000, 1_000_000, 0.05) == "A"


def test_quality_budget_and_slo(lib):
    assert Controller(lib, min_quality=97.0, epsilon=0).decide(MB, 20.0).profile == "A"   # B excluded
    d = Controller(lib, min_quality=101.0, epsilon=0).decide(MB, 20.0)
    assert d.profile == "bf16" and d.reason.startswith("no_quality")
    # SLO 80 ms at 20 Mbps: B 90, A 115, C 202, bf16 400 -> nothing meets it; best effort
    d = Controller(lib, min_quality=0.0, slo_ms=80.0, epsilon=0).decide(MB, 20.0)
    assert d.profile == "B" and d.reason.startswith("slo_infeasible")
    # SLO 100: B (90) is the only feasible one
    assert Controller(lib, min_quality=0.0, slo_ms=100.0, epsilon=0).decide(MB, 20.0).profile == "B"


def test_bad_inputs(lib):
    ctl = Controller(lib, epsilon=0)
    with pytest.raises(kvserve.KVServeError):
        ctl.decide(0, 100.0)
    with pytest.raises(kvserve.KVServeError):
        ctl.decide(MB, -1.0)
    d = ctl.decide(MB, 100.0)
    with pytest.raises(kvserve.KVServeError):
        ctl.observe(d, float("nan"))
    with pytest.raises(kvserve.KVServeError):
        Controller(lib, epsilon=2.0)


# ----------------------------------------------------------------- learning

def test_residual_learning_exact_first_observation(lib):
    ctl = Controller(lib, min_quality=97.0, epsilon=0.0, alpha=0.3, codec_alpha=0.2)
    d = ctl.decide(MB, 100.0)
    assert d.profile == "A" and d.predicted_ms == pytest.approx(35.0)
    ctl.observe(d, 45.0)
    # codec factor: implied (45 - 20) / 15 = 5/3 -> 0.8 + 0.2 * 5/3; residual absorbs the rest
    assert ctl.codec_factor["rans"] == pytest.approx(0.8 + 0.2 * 5 / 3)
    assert ctl.predict(lib.by_name("A"), MB, 100.0) == pytest.approx(45.0)
    # residual is per MB: a 2 MB request scales it
    assert ctl.predict(lib.by_name("A"), 2 * MB, 100.0) == pytest.approx(90.0)


def test_observe_with_measured_size_and_codec_time(lib):
    """What the serving layer measures: the real bundle size (the transfer part uses it, so a
    worse ratio is not learnt as a residual) and the codec time (the factor is learnt from it
    directly, for payloads of at least LEARN_CODEC_BYTES)."""
    ctl = Controller(lib, min_quality=97.0, epsilon=0.0, alpha=0.3, codec_alpha=0.2)
    d = ctl.decide(MB, 100.0)  # A: 15 ms codec + 20 ms transfer (250 kB at 100 Mbps)
    # the bundle really was 300 kB (24 ms on the wire) and the codec took 30 ms: 54 ms in all
    ctl.observe(d, 54.0, sent_bytes=300_000, codec_ms=30.0)
    assert ctl.codec_factor["rans"] == pytest.approx(0.8 + 0.2 * 2.0)     # implied 30 / 15
    # residual = 54 - 24 - 15 * 1.2 = 12 ms for 1 MB (the extra 4 ms of transfer is not in it)
    assert ctl.predict(lib.by_name("A"), MB, 100.0) == pytest.approx(20 + 18 + 12)
    # a small payload teaches the factor nothing (fixed costs would dominate), only the residual
    d = ctl.decide(0.5 * MB, 100.0)
    before = ctl.codec_factor["rans"]
    assert 0.5 * MB < C.LEARN_CODEC_BYTES
    ctl.observe(d, 100.0, sent_bytes=125_000, codec_ms=90.0)
    assert ctl.codec_factor["rans"] == before
    with pytest.raises(kvserve.KVServeError, match="sent_bytes"):
        ctl.observe(d, 10.0, sent_bytes=-1)
    with pytest.raises(kvserve.KVServeError, match="codec_ms"):
        ctl.observe(d, 10.0, codec_ms=float("nan"))


def test_observe_judges_at_the_bandwidth_the_transfer_saw(lib):
    """``bandwidth_mbps=`` is the one place the rule lives: the same as observing the decision
    made at the bandwidth seen. A 50 Mbps estimate on a 200 Mbps link must not be learnt as a
    slow profile."""
    import dataclasses

    seen, told = Controller(lib, min_quality=97.0, epsilon=0.0), Controller(lib, min_quality=97.0, epsilon=0.0)
    d, d2 = seen.decide(MB, 50.0), told.decide(MB, 50.0)
    seen.observe(d, 60.0, bandwidth_mbps=200.0, sent_bytes=260_000)
    told.observe(dataclasses.replace(d2, bandwidth_mbps=200.0), 60.0, sent_bytes=260_000)
    assert seen.stats[d.profile] == told.stats[d.profile] and seen.codec_factor == told.codec_factor
    # at 200 Mbps A's 260 kB take 10.4 ms: 60 ms leaves a large residual; judged at the 50 Mbps
    # estimate (41.6 ms on the wire) the same observation would have looked on time
    naive = Controller(lib, min_quality=97.0, epsilon=0.0)
    naive.observe(naive.decide(MB, 50.0), 60.0, sent_bytes=260_000)
    assert seen.stats[d.profile].residual > naive.stats[d.profile].residual + 10.0
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(kvserve.KVServeError, match="bandwidth_mbps"):
            seen.observe(d, 10.0, bandwidth_mbps=bad)


def test_learns_a_slow_codec_and_switches(lib):
    """A's codec really runs 4x slower: the controller must move to C within a few requests."""
    ctl = Controller(lib, min_quality=97.0, epsilon=0.0)
    picks = []
    for _ in range(10):
        d = ctl.decide(MB, 100.0)
        picks.append(d.profile)
        e = lib.by_name(d.profile)
        true = L.codec_ms(MB, e.encode_MBps, e.decode_MBps) * (4 if e.codec_id == "rans" else 1) + L.transfer_ms(MB, 100, e.ratio)
        ctl.observe(d, true)
    assert picks[0] == "A"
    assert picks[-1] == "C"            # 2 + 40 = 42 < 4 * 15 + 20 = 80
    assert picks.index("C") <= 3


def test_epsilon_explores_only_near_candidates(lib):
    # at 100 Mbps: A 35, C 42 (20% worse), B 50, bf16 80
    ctl = Controller(lib, min_quality=0.0, epsilon=1.0, explore_margin=0.1)
    assert {ctl.decide(MB, 100.0).profile for _ in range(50)} == {"A"}
    ctl = Controller(lib, min_quality=0.0, epsilon=0.3, explore_margin=0.25, seed=1)
    picks = [ctl.decide(MB, 100.0) for _ in range(400)]
    explored = [d for d in picks if d.explored]
    assert {d.profile for d in explored} == {"C"}
    assert 0.2 < len(explored) / len(picks) < 0.4
    assert all(d.profile == "A" for d in picks if not d.explored)


def test_bandit_is_seeded():
    lib = Library([Entry("A", cfg("A"), 4.0, 99.0, 100.0, 200.0), Entry("C", cfg("C", "bitpack"), 2.0, 100.0, 1000.0, 1000.0)])
    a = [Controller(lib, epsilon=0.5, explore_margin=1.0, seed=3).decide(MB, 100.0).profile for _ in range(1)]
    s1 = Controller(lib, epsilon=0.5, explore_margin=1.0, seed=3)
    s2 = Controller(lib, epsilon=0.5, explore_margin=1.0, seed=3)
    assert [s1.decide(MB, 100.0).profile for _ in range(30)] == [s2.decide(MB, 100.0).profile for _ in range(30)]
    assert a


def test_cooldown_after_repeated_slo_violations(lib):
    # learning off, so only the cooldown can move the controller away from A
    ctl = Controller(lib, min_quality=97.0, slo_ms=50.0, epsilon=0.0, violations=3, cooldown=5, alpha=0.0, codec_alpha=0.0)
    for i in range(3):
        d = ctl.decide(MB, 100.0)
        assert d.profile == "A", i
        ctl.observe(d, 36.0 if i == 1 else 60.0)  # violation, ok (resets), violation
    assert "A" in [e.name for e in ctl.candidates()]
    for _ in range(3):
        d = ctl.decide(MB, 100.0)
        if d.profile != "A":
            break
        ctl.observe(d, 60.0)
    assert "A" not in [e.name for e in ctl.candidates()]           # cooling down
    d = ctl.decide(MB, 100.0)
    assert d.profile != "A"
    for _ in range(6):
        ctl.decide(MB, 100.0)
    assert "A" in [e.name for e in ctl.candidates()]               # back after the cooldown


# ----------------------------------------------------------------- library files

def test_library_round_trip(lib, tmp_path):
    p = tmp_path / "lib.json"
    lib.save(str(p))
    obj = json.loads(p.read_text())
    assert obj["format"] == "kvserve-profile-library" and obj["version"] == 1
    e = obj["entries"][0]
    for k in ("name", "config", "ratio", "quality", "encode_MBps", "decode_MBps", "codec_ms_per_MB", "optimal_mbps"):
        assert k in e
    assert obj["entries"][1]["optimal_mbps"]["90"] == [[0.0, pytest.approx(40.0)]]  # B below 40 Mbps at budget 90
    assert obj["intervals"]["97"][-1] == {"profile": "bf16", "lo_mbps": pytest.approx(2000.0), "hi_mbps": None}
    lib2 = load_library(str(p))
    assert [(e.name, e.config, e.ratio, e.quality, e.encode_MBps, e.decode_MBps) for e in lib2.entries] == \
        [(e.name, e.config, e.ratio, e.quality, e.encode_MBps, e.decode_MBps) for e in lib.entries]
    assert lib2.meta["model"] == "test"


@pytest.mark.parametrize("mutate, msg", [
    (lambda o: "not json", "not valid JSON"),
    (lambda o: [], "must be a JSON object"),
    (lambda o: {**o, "format": "x"}, "not a profile library"),
    (lambda o: {**o, "version": 9}, "unsupported library version"),
    (lambda o: {**o, "entries": []}, "non-empty list"),
    (lambda o: {**o, "entries": [{**o["entries"][0], "ratio": -1}]}, "'ratio' must be"),
    (lambda o: {**o, "entries": [{**o["entries"][0], "encode_MBps": "fast"}]}, "'encode_MBps' must be"),
    (lambda o: {**o, "entries": [{**o["entries"][0], "config": {"name": "x", "codec": {"id": "nope"}}}]}, "invalid profile config"),
    (lambda o: {**o, "entries": [o["entries"][0], o["entries"][0]]}, "reserved or duplicated"),
    (lambda o: {**o, "entries": [{**o["entries"][0], "name": "bf16"}]}, "reserved or duplicated"),
    (lambda o: {**o, "entries": [{k: v for k, v in o["entries"][0].items() if k != "quality"}]}, "'quality' must be"),
])
def test_bad_library_files(lib, tmp_path, mutate, msg):
    obj = lib.to_json()
    bad = mutate(json.loads(json.dumps(obj)))
    p = tmp_path / "bad.json"
    p.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(kvserve.KVServeError, match=msg):
        load_library(str(p))


def test_missing_library_file(tmp_path):
    with pytest.raises(kvserve.KVServeError, match="does not exist"):
        load_library(str(tmp_path / "nope.json"))


def test_packaged_library_and_cli(tmp_path, capsys):
    lib = load_library()
    assert len(lib.entries) >= 3
    assert all(e.ratio > 1 and e.quality >= 90 for e in lib.entries)
    for e in lib.entries:
        kvserve.profile_from_config(e.config)
    from kvserve.cli import main

    out = tmp_path / "d.json"
    assert main(["decide", "--bandwidth-mbps", "10", "--min-quality", "97", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert {"profile", "ratio", "quality", "predicted_ms", "uncompressed_ms"} <= set(d)
    assert d["profile"] != "bf16" and d["quality"] >= 97 and d["predicted_ms"] < d["uncompressed_ms"]
    assert d["quality_metric"] == lib.meta["quality_metric"] in ("rel_ppl", "task_rel_acc")
    if d["quality_metric"] == "task_rel_acc":  # a library measured on tasks stores each entry's CI
        lo, hi = d["quality_ci"]
        assert lo <= d["quality"] <= hi
    assert main(["decide", "--bandwidth-mbps", "1000000", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["profile"] == "bf16"
    assert "profile" in capsys.readouterr().out
    assert main(["decide", "--library", str(tmp_path / "missing.json"), "--bandwidth-mbps", "10"]) == 2
    assert "packaged library: smollm2, smollm2-ppl" in capsys.readouterr().err


def test_packaged_libraries_by_name(tmp_path, monkeypatch):
    """`--library NAME` picks a packaged library: smollm2 (task accuracy, the default) or
    smollm2-ppl (perplexity); a file of that name in the working folder wins."""
    from kvserve.library import packaged_libraries

    assert packaged_libraries() == ["smollm2", "smollm2-ppl"]
    task, ppl = load_library("smollm2"), load_library("smollm2-ppl")
    assert task.meta["quality_metric"] == load_library().meta["quality_metric"] == "task_rel_acc"
    assert ppl.meta["quality_metric"] == "rel_ppl" and max(e.ratio for e in ppl.entries) > 8
    assert all(e.extra["answer_agree"] >= task.meta["min_answer_agree"] for e in task.entries)
    monkeypatch.chdir(tmp_path)
    ppl.save("smollm2")
    assert load_library("smollm2").meta["quality_metric"] == "rel_ppl"


def test_decide_reports_the_metric_and_ci_of_a_task_library(tmp_path, capsys):
    """A library profiled on the task objective (the 60-item run recorded in benchmarks/results):
    `decide` names the metric and prints the chosen entry's CI and item count."""
    from kvserve.cli import main

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "kvserve_profile_tasks_tune60_library.json"
    lib = load_library(str(path))
    assert lib.meta["quality_metric"] == "task_rel_acc"
    out = tmp_path / "d.json"
    assert main(["decide", "--library", str(path), "--bandwidth-mbps", "10", "--min-quality", "97",
                 "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    entry = next(e for e in lib.entries if e.name == d["profile"])
    assert d["quality_metric"] == "task_rel_acc" and d["quality_ci"] == entry.extra["quality_ci"]
    assert d["answer_agree"] == entry.extra["answer_agree"]
    printed = capsys.readouterr().out
    assert f"(task_rel_acc, 95% CI {d['quality_ci'][0]:.1f}-" in printed
    assert f"answers identical to bf16's: {d['answer_agree']:.2f})" in printed


# ----------------------------------------------------------------- simulation

def test_simulation_targets_on_hand_made_library(lib):
    import kvserve_simulate as S  # benchmarks/ (tests/conftest.py puts it on sys.path)

    res = S.simulate(lib, n=200, seed=0, min_quality=90.0)
    by = {r["trace"]: r for r in res}
    assert set(by) == {"steady", "steps", "noisy", "slowdown", "fast", "fast-noisy"}
    for r in res:
        assert r["vs_oracle"] <= 1.05, r["trace"]
        assert r["oracle_ms"] <= min(r["fixed_ms"].values()) + 1e-9
    assert by["fast"]["vs_bf16"] <= 1.03 and by["fast-noisy"]["vs_bf16"] <= 1.03
    assert by["slowdown"]["recovery_requests"] is not None and by["slowdown"]["recovery_requests"] <= 20
    # compression helps at 100 Mbps on this library
    assert by["steady"]["controller_ms"] < 0.6 * by["steady"]["bf16_ms"]
