"""Compressed-resident inference: outputs bit-identical, weights held compressed."""

from __future__ import annotations

import pytest

import enec
from enec import EnecError
from enec.resident import CompressedWeight, make_resident

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _ids(n=24, seed=0, vocab=49152):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def _placeholders(model, handle):
    return [n for n, p in model.named_parameters() if id(p) in handle.weights]


@pytest.fixture(scope="module")
def minilm_model(minilm_folder):
    return transformers.AutoModel.from_pretrained(str(minilm_folder)).eval()


@pytest.mark.parametrize("prefetch", [True, False])
def test_encoder_outputs_identical_and_restore(minilm_folder, minilm_model, prefetch):
    """A real fp32 encoder (MiniLM) with every large weight compressed."""
    model = transformers.AutoModel.from_pretrained(str(minilm_folder)).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 1997, 1996, 3793, 102]])
    with torch.no_grad():
        want = minilm_model(ids).last_hidden_state
        handle = make_resident(model, prefetch=prefetch, buffer_bytes=1 << 20, chunk_bytes=1 << 20)
        names = _placeholders(model, handle)
        assert "embeddings.word_embeddings.weight" in names
        assert any("attention.self.query" in n for n in names)
        for n in names:
            assert model.get_parameter(n).stride() == (0, 0)  # nothing decoded is kept
        for _ in range(2):  # the second pass runs on the learnt prefetch schedule
            assert torch.equal(model(ids).last_hidden_state, want)
        st = handle.stats()
        assert st.compressed_bytes < st.original_bytes
        assert st.decodes > 0 and (st.prefetch_hits > 0) == prefetch
        handle.restore()
    ref = minilm_model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_memory_budget_keeps_least_compressible_weights_decoded(minilm_folder, minilm_model):
    """A memory budget between the all-compressed footprint and the original size: the
    weights that compress least stay decoded, the rest stay streams, outputs are unchanged
    and the footprint stays within the budget."""
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 1997, 1996, 3793, 102]])
    with torch.no_grad():
        want = minilm_model(ids).last_hidden_state
    model = transformers.AutoModel.from_pretrained(str(minilm_folder)).eval()
    full = make_resident(model, prefetch=False, buffer_bytes=1 << 20, chunk_bytes=1 << 20)
    base = full.stats()
    need = base.compressed_bytes + base.other_bytes + base.buffer_budget
    ratios = sorted({id(w): w.nbytes / w.original_bytes for w in full.weights.values()}.values())
    full.restore()
    budget = need + (base.original_bytes - base.compressed_bytes) // 4
    with torch.no_grad():
        handle = make_resident(model, prefetch=False, buffer_bytes=1 << 20, chunk_bytes=1 << 20,
                               memory_budget=budget)
        assert torch.equal(model(ids).last_hidden_state, want)
    st = handle.stats()
    assert 0 < st.kept_decoded < base.weights and st.weights == base.weights - st.kept_decoded
    assert st.compressed_bytes + st.other_bytes + st.buffer_budget <= budget
    assert st.other_bytes > base.other_bytes  # the kept weights are ordinary parameters now
    managed = [w.nbytes / w.original_bytes for w in {id(w): w for w in handle.weights.values()}.values()]
    assert max(managed) <= ratios[-st.kept_decoded]  # the least compressible went first
    kept = [n for n, p in model.named_parameters() if id(p) not in handle.weights and p.dim() == 2]
    assert kept and all(model.get_parameter(n).stride() != (0, 0) for n in kept)
    handle.restore()
    with pytest.raises(EnecError, match="below what the compressed weights need"):
        make_resident(model, memory_budget=need - 1, buffer_bytes=1 << 20, chunk_bytes=1 << 20)
    for n, p in model.named_parameters():  # a refused budget changed nothing
        assert p.stride() != (0, 0) or p.numel() == 1, n
    for bad in (0, -5, 1.5, True):
        with pytest.raises(EnecError, match="memory_budget must be"):
            make_resident(model, memory_budget=bad)


def test_embedding_gather_and_errors(minilm_folder):
    model = transformers.AutoModel.from_pretrained(str(minilm_folder)).eval()
    emb = model.embeddings.word_embeddings
    full = emb.weight.detach().clone()
    with make_resident(emb, min_numel=1, chunk_bytes=1 << 16) as handle:
        ids = torch.tensor([[0, 5, 5, 30521, 17, 4000, 4001, 4002]])  # repeats, both ends, neighbours
        assert torch.equal(emb(ids), full[ids])
        assert torch.equal(emb(input=ids), full[ids])
        assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, full.shape[1])
        with pytest.raises(IndexError):
            emb(torch.tensor([30522]))
        assert handle.stats().weights == 1
    assert torch.equal(emb.weight, full)  # the context manager restored the weight
    with pytest.raises(EnecError, match="no float Linear/Embedding"):
        make_resident(torch.nn.LayerNorm(8))


def test_compressed_weight_rows_match_slices(minilm_tensors):
    w = minilm_tensors["embeddings.word_embeddings.weight"].to(torch.bfloat16)
    cw = CompressedWeight.from_tensor(w)
    assert torch.equal(cw.decode(), w)
    buf = torch.empty(cw.original_bytes, dtype=torch.uint8)
    for r0, r1 in [(0, 1), (27, 29), (1000, 1003), (w.shape[0] - 2, w.shape[0]), (0, w.shape[0])]:
        assert torch.equal(cw.decode_rows(r0, r1, buf), w[r0:r1])


def test_compressed_weight_verifies_once_on_load(minilm_tensors):
    """A stream loaded for residency is checked when it arrives (decodes then skip the
    checksums), so a corrupted one fails at load, naming the weight."""
    w = minilm_tensors["embeddings.word_embeddings.weight"].to(torch.bfloat16)
    blob = bytearray(enec.compress(w))
    assert torch.equal(CompressedWeight(bytes(blob), "emb").decode(), w)
    blob[len(blob) // 2] ^= 0x20
    with pytest.raises(EnecError, match="emb: corrupted ENEC stream: block .*checksum"):
        CompressedWeight(bytes(blob), "emb")


@pytest.mark.slow
def test_causal_lm_resident_matches(smollm2_enec, smollm2_folder):
    """SmolLM2 (tied embeddings, chunked LM head) loaded resident from the compressed folder."""
    import enec

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.bfloat16).eval()
    model = enec.from_pretrained(smollm2_enec, resident=True, resident_options={"prefetch": True})
    handle = model.enec_resident
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids(32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
        want = ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    st = handle.stats()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in ref.modules())
    assert st.weights == n_linear  # every Linear, and the tied embedding stored once with the head
    assert st.resident_bytes < 0.75 * st.uncompressed_bytes
    assert st.prefetch_hits > 0
    # a memory budget of 0.75x the original: some weights stay decoded, logits unchanged
    budget = int(0.75 * st.uncompressed_bytes)
    fast = enec.from_pretrained(smollm2_enec, resident=True, resident_options={"memory_budget": budget})
    fst = fast.enec_resident.stats()
    assert fst.kept_decoded > 0 and fst.compressed_bytes + fst.other_bytes + fst.buffer_budget <= budget
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, ref(ids).logits)
    with pytest.raises(EnecError, match="stored dtype"):
        enec.from_pretrained(smollm2_enec, resident=True, dtype=torch.float32)
    with pytest.raises(EnecError, match="unknown resident_options"):
        enec.from_pretrained(smollm2_enec, resident=True, resident_options={"buffer": 1})


@pytest.mark.slow
def test_gemma3_resident_in_memory():
    """Another architecture with no special case: Gemma-3 (scaled-embedding subclass, tied
    262k-row vocabulary, sliding-window layers), made resident in memory."""
    pytest.importorskip("gguf")
    from kvserve.models import load_model

    try:
        model, tok = load_model("gemma3")
    except Exception as exc:  # model package missing
        pytest.skip(str(exc))
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
        # every weight decoded whole: bit-identical logits
        handle = make_resident(model, chunk_bytes=0)
        try:
            assert torch.equal(model(ids).logits, want)
        finally:
            handle.restore()
        # default: the 262k-row LM head computed in row chunks. On this machine's CPU the BLAS
        # sums Gemma's chunked head in another order than the full product (differences of a
        # few bf16 ulps, at most 0.375 seen), so the chunked logits are compared within 0.5.
        handle = make_resident(model)
        try:
            got = model(ids).logits
            torch.testing.assert_close(got, want, rtol=0, atol=0.5)
            st = handle.stats()
            assert st.resident_bytes < 0.75 * st.uncompressed_bytes
        finally:
            handle.restore()
        assert torch.equal(model(ids).logits, want)
