import numpy as np
import pytest
import torch

from kvserve import KVServeError, get_stage, registered
from kvserve.stages.codecs import bitpack, bitunpack
from kvserve.stages.quantizers import bits_for

from kvserve_test_common import check_codec_roundtrip, check_config, check_quantizer_roundtrip, check_transform_inverse

# One list of every stage with easy and hard settings drives the conformance tests.
STAGES = [
    ("transform", {"id": "identity"}),
    ("transform", {"id": "hadamard", "seed": 0}),
    ("transform", {"id": "hadamard", "seed": 12345}),
    ("transform", {"id": "hadamard", "seed": 3, "key_rope_theta": 10000.0}),
    ("transform", {"id": "hadamard", "seed": 0, "key_rope_theta": [1e4, 1e6, 1e4, 1e6, 10.0, 500000]}),
    ("transform", {"id": "hadamard", "seed": 5, "portable": True}),
    ("transform", {"id": "hadamard", "seed": 0, "key_rope_theta": [1e4, 1e6, 1e4, 1e6, 10.0, 500000], "portable": True}),
    ("quantizer", {"id": "none"}),
    ("quantizer", {"id": "kvserve"}),
    ("quantizer", {"id": "kvserve", "low_fraction": 0.5, "split": "layer", "key_group": 8, "keep_sinks": 2, "keep_recent": 5}),
    ("quantizer", {"id": "kvserve", "low_fraction": 0.34, "split": "head", "scores": [[1, 2, 3], [0, 5, 1], [2, 2, 2], [9, 0, 1]],
                   "value_axis": "token_head", "high_key_levels": 16, "low_key_levels": 3}),
    ("quantizer", {"id": "kvserve", "tiers": [[0.25, 4, 3], [0.75, 8, 5], [1.0, 16, 6]], "split": "head",
                   "scores": [[1, 2, 3], [0, 5, 1], [2, 2, 2], [9, 0, 1]], "keep_sinks": 1}),
    ("quantizer", {"id": "kvserve", "tiers": [[0.5, 5, 4], [1.0, 9, 7]], "split": "layer", "key_group": 8}),
    ("quantizer", {"id": "kvserve", "tiers": [[1.0, 7, 5]], "value_axis": "token_head"}),
    ("quantizer", {"id": "kvserve", "tiers": [[0.5, 5, 3], [1.0, 9, 6]], "scores": [[1, 2, 3], [0, 5, 1], [2, 2, 2], [9, 0, 1]],
                   "compact_value_stats": True, "keep_sinks": 1}),
    ("quantizer", {"id": "kvserve", "high_value_levels": 6, "compact_value_stats": True, "value_axis": "token_head"}),
    ("quantizer", {"id": "kvserve", "high_key_levels": 16, "key_group": 16, "keep_sinks": 1, "keep_recent": 5,
                   "recent_key_levels": 64, "recent_value_levels": 32, "compact_key_stats": True,
                   "compact_value_stats": True}),
    ("quantizer", {"id": "kvserve", "tiers": [[0.5, 5, 4], [1.0, 9, 7]], "split": "layer", "key_group": 32,
                   "recent_key_levels": 16, "recent_value_levels": 12, "value_axis": "token_head"}),
    ("quantizer", {"id": "kivi", "bits": 2}),
    ("quantizer", {"id": "kivi", "bits": 4, "group_size": 16, "keep_recent": 7, "keep_sinks": 1}),
    ("quantizer", {"id": "cachegen"}),
    ("quantizer", {"id": "cachegen", "key_bands": [[0.5, 8], [1.0, 4]], "value_bands": [[1.0, 64]]}),
    ("codec", {"id": "none"}),
    ("codec", {"id": "bitpack"}),
    ("codec", {"id": "zstd", "level": 1}),
    ("codec", {"id": "zstd", "level": 3, "pack": True}),
    ("codec", {"id": "lz4"}),
    ("codec", {"id": "lz4", "pack": True}),
    ("codec", {"id": "ans", "pair": True}),
    ("codec", {"id": "ans", "pair": False}),
    ("codec", {"id": "rans", "pair": True}),
    ("codec", {"id": "rans", "pair": False}),
    ("codec", {"id": "irans", "pair": True}),
    ("codec", {"id": "irans", "pair": False}),
]
IDS = [f"{k}-{c['id']}-{i}" for i, (k, c) in enumerate(STAGES)]


def test_every_registered_stage_is_covered():
    covered = {(k, c["id"]) for k, c in STAGES} | {("codec", "enec"), ("codec", "nvcomp")}  # nvcomp: test_kv_gpu
    assert {(c.kind, c.stage_id) for c in registered()} == covered


@pytest.mark.parametrize("kind,cfg", STAGES, ids=IDS)
def test_config_roundtrip(kind, cfg):
    check_config(get_stage(kind, cfg))


@pytest.mark.parametrize("kind,cfg", [s for s in STAGES if s[0] == "codec"], ids=[i for i, s in zip(IDS, STAGES) if s[0] == "codec"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 1001, 3 << 19])
def test_codec_exact_roundtrip(kind, cfg, bits, n):
    codec = get_stage(kind, cfg)
    if not codec.accepts(bits):
        pytest.skip("codec does not take this width")
    rng = np.random.default_rng(bits * 1000 + n)
    if bits == 16:
        arr = torch.randn(n).bfloat16().view(torch.int16).numpy().view(np.uint16)
    else:  # skewed like quantizer output
        arr = np.clip(np.round(rng.normal((1 << bits) / 2, (1 << bits) / 6, n)), 0, (1 << bits) - 1).astype(np.uint8)
    check_codec_roundtrip(codec, arr, bits)


def test_enec_codec_roundtrip():
    enec = pytest.importorskip("enec")
    if not hasattr(enec, "compress"):
        pytest.skip("enec.compress not available yet")
    arr = torch.randn(5000).bfloat16().view(torch.int16).numpy().view(np.uint16)
    check_codec_roundtrip(get_stage("codec", {"id": "enec"}), arr, 16)


def test_ans_compresses_skewed_symbols_near_entropy():
    rng = np.random.default_rng(0)
    arr = np.clip(np.round(rng.normal(3.5, 1.0, 200_000)), 0, 7).astype(np.uint8)
    p = np.bincount(arr) / arr.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    for cid in ("ans", "rans"):
        buf = check_codec_roundtrip(get_stage("codec", cid), arr, 3)
        assert len(buf) * 8 / arr.size < entropy + 0.05
        assert len(buf) * 8 / arr.size < 3  # beats plain packing


def test_bitpack_is_dense():
    arr = np.arange(64, dtype=np.uint8) % 8
    assert bitpack(arr, 3).size == 24
    np.testing.assert_array_equal(bitunpack(bitpack(arr, 3), 64, 3), arr)


@pytest.mark.parametrize("codec", ["bitpack", "zstd", "lz4", "ans", "rans", "none"])
def test_codec_rejects_garbage(codec):
    c = get_stage("codec", codec)
    good = c.encode(np.arange(1000, dtype=np.uint8) % 16, 4)
    for bad in (good[: len(good) // 2], good + b"\0" * 3, b""):
        with pytest.raises(KVServeError):
            out = c.decode(bad, 1000, 4)
            # a stream that still decodes must at least have the right size
            assert out.size == 1000
            raise KVServeError("decoded")


@pytest.mark.parametrize("dim", [1, 3, 8, 64, 96, 100, 256])
def test_hadamard_inverse_any_head_dim(dim):
    x = torch.randn(2, 1, 3, 17, dim) * 10
    h = get_stage("transform", {"id": "hadamard", "seed": 7})
    y = check_transform_inverse(h, x, [0, 5], atol=1e-3)
    # orthogonal: norms are preserved; signs depend on (layer, head)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4, atol=1e-3)
    y2 = h.forward(x, [1, 5])
    assert not torch.allclose(y2[0], y[0])
    torch.testing.assert_close(y2[1], y[1])


def test_hadamard_spreads_outlier_channel():
    x = torch.randn(1, 1, 2, 256, 64)
    x[..., 5] = 100
    y = get_stage("transform", "hadamard").forward(x, [0])
    assert y.abs().amax(dim=(3,)).max() < 0.5 * x.abs().amax(dim=(3,)).max()


GEOM = (4, 3)


@pytest.mark.parametrize("kind,cfg", [s for s in STAGES if s[0] == "quantizer"], ids=[i for i, s in zip(IDS, STAGES) if s[0] == "quantizer"])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("tokens", [0, 1, 5, 64, 131])
def test_quantizer_roundtrip_and_error_bound(kind, cfg, which, tokens):
    q = get_stage(kind, cfg)
    x = torch.randn(4, 1, 3, tokens, 64) * torch.linspace(0.5, 4, 64)
    ids = [0, 1, 2, 3]
    out = check_quantizer_roundtrip(q, x, ids, which, GEOM)
    err = (out - x).abs()
    if cfg["id"] == "none":
        torch.testing.assert_close(out, x.bfloat16().float())
        return
    if tokens == 0:
        return
    if cfg["id"] == "cachegen":
        amax = x.abs().amax(dim=(2, 4), keepdim=True)
        c = torch.tensor([q.bins(i, GEOM[0], which) // 2 - 1 for i in ids], dtype=torch.float32).reshape(4, 1, 1, 1, 1)
        bound = amax / c / 2
    else:
        # asymmetric min-max: half a step of the coarsest level count over the widest range
        lv = min(2 ** cfg.get("bits", 8), *(v for k, v in q.get_config().items() if k.endswith("_levels")),
                 *(lvl for row in (q.tiers or []) for lvl in row[1:])) \
            if cfg["id"] == "kvserve" else 2 ** q.bits
        rng = x.amax() - x.amin()
        bound = rng / (lv - 1) / 2
    assert bool((err <= bound * 1.01 + 1e-2).all()), float((err - bound).max())


def test_quantizer_levels_reduce_error():
    x = torch.randn(2, 1, 3, 128, 64)
    errs = []
    for levels in (4, 8, 16, 64):
        q = get_stage("quantizer", {"id": "kvserve", "high_key_levels": levels})
        out = check_quantizer_roundtrip(q, x, [0, 1], "k", (2, 3))
        errs.append(float((out - x).pow(2).mean()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 50


def test_kvserve_low_mask_head_and_layer():
    scores = [[5, 1, 9], [0, 7, 3]]
    q = get_stage("quantizer", {"id": "kvserve", "low_fraction": 0.5, "split": "head", "scores": scores})
    np.testing.assert_array_equal(q.low_mask(2, 3), [[False, True, False], [True, False, True]])
    q = get_stage("quantizer", {"id": "kvserve", "low_fraction": 0.5, "split": "layer"})
    np.testing.assert_array_equal(q.low_mask(4, 2), [[False] * 2] * 2 + [[True] * 2] * 2)
    with pytest.raises(KVServeError):
        get_stage("quantizer", {"id": "kvserve", "low_fraction": 0.5, "split": "head"}).low_mask(2, 3)
    with pytest.raises(KVServeError):
        q = get_stage("quantizer", {"id": "kvserve", "low_fraction": 0.5, "scores": scores})
        q.low_mask(3, 3)


def test_kivi_keeps_recent_window_exact():
    x = torch.randn(1, 1, 2, 100, 64).bfloat16().float()
    q = get_stage("quantizer", {"id": "kivi", "bits": 2, "group_size": 32, "keep_recent": 20})
    out = check_quantizer_roundtrip(q, x, [0], "k", (1, 2))
    # 100 - 20 = 80 -> 64 quantized tokens (two groups), the last 36 kept exactly
    torch.testing.assert_close(out[..., 64:, :], x[..., 64:, :], rtol=0, atol=0)
    assert (out[..., :64, :] - x[..., :64, :]).abs().max() > 0


def test_kvserve_tiers_rank_pairs_by_score():
    scores = [[5, 1, 9], [0, 7, 3]]  # ranks: (1,0) < (0,1) < (1,2) < (0,0) < (1,1) < (0,2)
    q = get_stage("quantizer", {"id": "kvserve", "tiers": [[1 / 3, 4, 3], [5 / 6, 6, 4], [1.0, 10, 6]], "scores": scores})
    np.testing.assert_array_equal(q.tier_index(2, 3), [[1, 0, 2], [0, 1, 1]])
    q = get_stage("quantizer", {"id": "kvserve", "tiers": [[0.5, 4, 3], [1.0, 10, 6]], "split": "layer"})
    np.testing.assert_array_equal(q.tier_index(4, 2), [[1, 1], [1, 1], [0, 0], [0, 0]])
    # more precision for a tier means less error on the pairs in it
    x = torch.randn(2, 1, 3, 64, 64)
    out = check_quantizer_roundtrip(get_stage("quantizer", {"id": "kvserve", "tiers": [[0.5, 3, 3], [1.0, 64, 64]],
                                                            "scores": scores}), x, [0, 1], "k", (2, 3))
    err = (out - x).pow(2).mean(dim=(1, 3, 4))  # (layer, head)
    lo = err[torch.tensor([[False, True, False], [True, False, True]])]
    hi = err[torch.tensor([[True, False, True], [False, True, False]])]
    assert float(lo.min()) > 20 * float(hi.max())


def test_compact_value_stats_are_smaller_and_close():
    x = torch.randn(3, 1, 3, 200, 64) * torch.linspace(0.1, 5, 200)[:, None]
    plain = get_stage("quantizer", {"id": "kvserve", "high_value_levels": 6})
    comp = get_stage("quantizer", {"id": "kvserve", "high_value_levels": 6, "compact_value_stats": True})
    side = {}
    errs = {}
    for name, q in (("plain", plain), ("compact", comp)):
        parts = q.encode(x, [0, 1, 2], "v", (3, 3))
        side[name] = sum(p.array.nbytes for p in parts if p.bits is None)
        out = check_quantizer_roundtrip(q, x, [0, 1, 2], "v", (3, 3))
        errs[name] = float((out - x).pow(2).mean())
    assert side["compact"] < 0.55 * side["plain"]
    assert errs["compact"] < 1.05 * errs["plain"]
    # keys are unaffected; a min far from zero (offset values) falls back to fp16 stats
    assert {p.name for p in comp.encode(x, [0, 1, 2], "k", (3, 3))} == {p.name for p in plain.encode(x, [0, 1, 2], "k", (3, 3))}
    names = {p.name for p in comp.encode(x + 100, [0, 1, 2], "v", (3, 3))}
    assert "min" in names and "rcode" not in names
    out = check_quantizer_roundtrip(comp, x + 100, [0, 1, 2], "v", (3, 3))
    assert float((out - x - 100).abs().max()) < 10


def test_recent_window_quantized_instead_of_bf16():
    """recent_*_levels: the recent window and the partial last key group are quantized
    (parts rq/rmin/rrange, no bf16 "recent" part), to within half a step of their own
    range, at a fraction of the bf16 window's bytes."""
    x = torch.randn(2, 1, 3, 100, 64) * torch.linspace(0.5, 4, 64)
    base = {"id": "kvserve", "high_key_levels": 16, "key_group": 32, "keep_sinks": 1, "keep_recent": 20}
    bf = get_stage("quantizer", base)
    rq = get_stage("quantizer", {**base, "recent_key_levels": 256, "recent_value_levels": 128})
    for which, lv in (("k", 256), ("v", 128)):
        parts = {p.name: p for p in rq.encode(x, [0, 1], which, (2, 3))}
        assert "recent" not in parts and "rq" in parts and parts["rq"].bits == bits_for(lv) and "sink" in parts
        s, e = (int(v) for v in parts["split"].array)
        assert (s, e) == ((1, 65) if which == "k" else (1, 80))  # keys: 99 - 20 tokens hold 2 whole groups
        out = check_quantizer_roundtrip(rq, x, [0, 1], which, (2, 3))
        win, got = x[..., e:, :], out[..., e:, :]
        dims = (3,) if which == "k" else (2, 4)
        half_step = (win.amax(dim=dims, keepdim=True) - win.amin(dim=dims, keepdim=True)) / (lv - 1) / 2
        assert bool(((got - win).abs() <= half_step * 1.01 + 1e-3).all())
        assert (got - win).abs().max() > 0  # quantized, not kept
        torch.testing.assert_close(out[..., :s, :], x[..., :s, :].bfloat16().float(), rtol=0, atol=0)  # the sink
        bytes_q = parts["rq"].array.nbytes + parts["rmin"].array.nbytes + parts["rrange"].array.nbytes
        bytes_bf = {p.name: p for p in bf.encode(x, [0, 1], which, (2, 3))}["recent"].array.nbytes
        assert bytes_q < 0.6 * bytes_bf
    # no recent window: the 3 tokens after the last whole key group are quantized too
    tail = get_stage("quantizer", {**base, "keep_recent": 0, "recent_key_levels": 16, "recent_value_levels": 16})
    parts = {p.name: p for p in tail.encode(x, [0, 1], "k", (2, 3))}
    assert "recent" not in parts and parts["rq"].array.size == 2 * 3 * 3 * 64


def test_compact_key_stats_halve_the_side_info_and_never_fall_back():
    """compact_key_stats: 2 bytes per key group and channel (+ a centre per channel) instead of
    4, error close to float16 statistics; channels with a large offset and a group far from
    its channel's centre (a drift) still decode within two steps of the widest group (a wider range
    code for those groups, no fallback)."""
    torch.manual_seed(0)
    x = torch.randn(3, 1, 3, 256, 64) + 20 * torch.randn(1, 1, 3, 1, 64)  # per-channel offsets
    x[..., 5] += torch.linspace(0, 40, 256)  # one drifting channel
    cfg = {"id": "kvserve", "high_key_levels": 16, "key_group": 32}
    plain, comp = get_stage("quantizer", cfg), get_stage("quantizer", {**cfg, "compact_key_stats": True})
    side, errs = {}, {}
    for name, q in (("plain", plain), ("compact", comp)):
        parts = q.encode(x, [0, 1, 2], "k", (3, 3))
        side[name] = sum(p.array.nbytes for p in parts if p.bits is None)
        out = check_quantizer_roundtrip(q, x, [0, 1, 2], "k", (3, 3))
        errs[name] = (out - x).pow(2).mean(dim=(0, 1, 2, 3))  # per channel
    assert side["compact"] < 0.6 * side["plain"]  # 8 groups here: the centres cost 1/16 of the stats
    other = torch.arange(64) != 5
    assert float(errs["compact"][other].mean()) < 1.1 * float(errs["plain"][other].mean())
    names = {p.name for p in comp.encode(x, [0, 1, 2], "k", (3, 3))}
    assert {"centre", "rcode", "mcode", "rmax"} <= names and "min" not in names
    step = (x.reshape(3, 1, 3, 8, 32, 64).amax(4) - x.reshape(3, 1, 3, 8, 32, 64).amin(4)).amax() / 15
    out = check_quantizer_roundtrip(comp, x, [0, 1, 2], "k", (3, 3))
    assert float((out - x)[..., 5].abs().max()) < 2 * float(step)
    # values are unaffected by the key option
    assert {p.name for p in comp.encode(x, [0, 1, 2], "v", (3, 3))} == {p.name for p in plain.encode(x, [0, 1, 2], "v", (3, 3))}


def test_new_kvserve_options_keep_old_configs_identity():
    """Options added later are left out of the config at their defaults, so every older
    profile (and its bundles' headers) keeps its exact config."""
    from kvserve.pipeline import Pipeline, load_profile, profile_names

    new = {"recent_key_levels", "recent_value_levels", "compact_key_stats"}
    for name in profile_names():
        cfg = load_profile(name)
        got = Pipeline.from_config(cfg).get_config()
        assert set(got["quantizer"]) & new == set(cfg["quantizer"]) & new
        assert Pipeline.from_config(got).get_config() == got
    q = get_stage("quantizer", {"id": "kvserve", "key_group": 32})
    assert not {"recent_key_levels", "recent_value_levels", "compact_key_stats"} & set(q.get_config())
    q = get_stage("quantizer", {"id": "kvserve", "key_group": 32, "compact_key_stats": True, "keep_recent": 4,
                                "recent_key_levels": 64, "recent_value_levels": 64})
    assert get_stage("quantizer", q.get_config()) == q and q.get_config()["compact_key_stats"] is True


def test_scores_list_picks_the_matching_geometry():
    q = get_stage("quantizer", {"id": "kvserve", "tiers": [[0.5, 4, 3], [1.0, 8, 5]], "scores": ["smollm2", "gemma3"]})
    assert q.tier_index(18, 1).sum() == 9 and q.tier_index(30, 3).sum() == 45
    # no packaged model fits: ranked by depth, the last layers get the low tier
    np.testing.assert_array_equal(q.tier_index(4, 2), [[1, 1], [1, 1], [0, 0], [0, 0]])
    with pytest.raises(KVServeError):
        get_stage("quantizer", {"id": "kvserve", "tiers": [[0.5, 4, 3], [1.0, 8, 5]], "scores": "smollm2"}).tier_index(4, 2)


def test_hadamard_key_rope_undoes_rotary_embedding():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n, t, d, theta = 2, 37, 64, 100000.0
    k_pre = torch.randn(n, 1, 3, t, d)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().float()[None], emb.sin().float()[None]
    k_post = torch.stack([apply_rotary_pos_emb(k_pre[i], k_pre[i], cos, sin)[0] for i in range(n)])
    plain = get_stage("transform", {"id": "hadamard", "seed": 1})
    rope = get_stage("transform", {"id": "hadamard", "seed": 1, "key_rope_theta": theta})
    # keys: the transform sees the pre-RoPE keys; values are left alone
    torch.testing.assert_close(rope.forward(k_post, [0, 1], "k"), plain.forward(k_pre, [0, 1], "k"), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rope.forward(k_post, [0, 1], "v"), plain.forward(k_post, [0, 1], "v"))
    back = rope.inverse(rope.forward(k_post, [0, 1], "k"), [0, 1], "k")
    torch.testing.assert_close(back, k_post, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,cfg", [
    ("transform", {"id": "hadamard", "seed": -1}),
    ("transform", {"id": "hadamard", "key_rope_theta": 0.5}),
    ("transform", {"id": "hadamard", "key_rope_theta": [1e4, "x"]}),
    ("quantizer", {"id": "kvserve", "tiers": [[0.5, 4, 3]]}),
    ("quantizer", {"id": "kvserve", "tiers": [[0.5, 4, 3], [0.4, 6, 4], [1.0, 8, 5]], "split": "layer"}),
    ("quantizer", {"id": "kvserve", "tiers": [[1.0, 1, 3]]}),
    ("quantizer", {"id": "kvserve", "tiers": [[0.5, 4, 3], [1.0, 8, 5]]}),  # split=head needs scores
    ("quantizer", {"id": "kvserve", "tiers": [[1.0, 8, 5]], "low_fraction": 0.5, "split": "layer"}),
    ("transform", {"id": "nope"}),
    ("quantizer", {"id": "kivi", "bits": 5}),
    ("quantizer", {"id": "kvserve", "high_key_levels": 1}),
    ("quantizer", {"id": "kvserve", "low_fraction": 2}),
    ("quantizer", {"id": "kvserve", "unknown": 1}),
    ("quantizer", {"id": "kvserve", "keep_recent": 8, "recent_key_levels": 64}),
    ("quantizer", {"id": "kvserve", "recent_key_levels": 1, "recent_value_levels": 16}),
    ("quantizer", {"id": "kvserve", "recent_key_levels": True, "recent_value_levels": 16}),
    ("quantizer", {"id": "kvserve", "compact_key_stats": True}),
    ("quantizer", {"id": "kvserve", "key_group": 32, "key_axis": "token", "compact_key_stats": True}),
    ("quantizer", {"id": "kvserve", "key_group": 32, "compact_key_stats": 1}),
    ("quantizer", {"id": "cachegen", "key_bands": [[0.5, 8]]}),
    ("codec", {"id": "zstd", "level": 99}),
    ("codec", {"id": "ans", "pair": "yes"}),
    ("codec", {"nope": 1}),
])
def test_invalid_configs_raise(kind, cfg):
    with pytest.raises(KVServeError):
        get_stage(kind, cfg)


def test_bits_for():
    assert [bits_for(n) for n in (2, 3, 4, 5, 8, 9, 16, 17, 256)] == [1, 2, 2, 3, 3, 4, 4, 5, 8]


def test_kind_scores_rank_keys_and_values_separately():
    from kvserve.stages.quantizers import load_scores

    cfg = {"id": "kvserve", "tiers": [[0.5, 4, 3], [1.0, 8, 5]], "scores": ["smollm2", "gemma3"], "kind_scores": True}
    q = get_stage("quantizer", cfg)
    ks, vs = load_scores("smollm2", "key_scores"), load_scores("smollm2", "value_scores")
    tk, tv = q.tier_index(30, 3, "k"), q.tier_index(30, 3, "v")
    assert ks[tk == 0].max() <= ks[tk == 1].min() and vs[tv == 0].max() <= vs[tv == 1].min()
    assert (tk != tv).any()
    # gemma3's file has joint scores only: both kinds use them
    np.testing.assert_array_equal(q.tier_index(18, 1, "k"), q.tier_index(18, 1, "v"))
    with pytest.raises(KVServeError):
        get_stage("quantizer", {"id": "kvserve", "low_fraction": 0.5, "scores": "smollm2", "kind_scores": True})
