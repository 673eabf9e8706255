"""Loading compressed Hugging Face folders back into transformers models, bit-exactly."""

from __future__ import annotations

import json
import shutil

import pytest

from enec import EnecError
from enec.checkpoint import compress_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def _ids(n=24, seed=0, vocab=49152):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.bfloat16)
    return model.eval()


def test_sharded_folder_has_three_shards_and_tied_weights(smollm2_folder, smollm2_enec):
    assert len(list(smollm2_folder.glob("*.safetensors"))) == 3
    assert len(list(smollm2_enec.glob("*.enec"))) == 3
    assert (smollm2_enec / "model.safetensors.index.json").is_file()
    assert json.loads((smollm2_folder / "config.json").read_text())["tie_word_embeddings"] is True


def test_from_pretrained_is_bit_identical(smollm2_enec, smollm2_ref):
    import enec

    model = enec.from_pretrained(smollm2_enec, dtype=torch.bfloat16)
    ref = smollm2_ref.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie survives
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2_ref(ids).logits)
    assert model.generation_config.eos_token_id == smollm2_ref.generation_config.eos_token_id


def test_from_pretrained_encoder_model(minilm_folder, minilm_enec_folder):
    """Any Auto class works: the fp32 MiniLM encoder through AutoModel."""
    import enec

    model = enec.from_pretrained(minilm_enec_folder, model_class=transformers.AutoModel).eval()
    ref = transformers.AutoModel.from_pretrained(str(minilm_folder)).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_from_pretrained_errors(tmp_path, smollm2_folder):
    import enec

    with pytest.raises(EnecError, match="no such folder"):
        enec.from_pretrained(tmp_path / "missing")
    with pytest.raises(EnecError, match="compress it first"):
        enec.from_pretrained(smollm2_folder)
    # a truncated shard is reported, not half-loaded
    bad = tmp_path / "bad"
    shutil.copytree(smollm2_folder.with_name(smollm2_folder.name + "-enec"), bad)
    shard = sorted(bad.glob("*.enec"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(EnecError):
        enec.from_pretrained(bad)


# ------------------------------------------------------------------------------ load_streamed


@pytest.fixture(scope="module")
def minilm_enec_folder(minilm_folder, tmp_path_factory):
    dst = tmp_path_factory.mktemp("minilm") / "minilm-enec"
    compress_folder(minilm_folder, dst)
    return dst


def _reader_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "enec-read-ahead" and t.is_alive()]


def _no_reader_left(before):
    import time

    deadline = time.monotonic() + 10
    while len(_reader_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(_reader_threads()) == before


@pytest.mark.parametrize("which", ["enec", "safetensors"])
def test_load_streamed_sharded_tied(which, smollm2_folder, smollm2_enec, smollm2_ref):
    """The cold-start path on the three-shard SmolLM2 folder, compressed or plain, through a
    throttled reader: every weight bit-identical, the tie kept, logits equal."""
    import enec
    from enec.streaming import ThrottledReader

    folder = smollm2_enec if which == "enec" else smollm2_folder
    model = enec.load_streamed(folder, opener=lambda p: ThrottledReader(p, 2e9))
    ref = smollm2_ref.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2_ref(ids).logits)
    assert model.generation_config.eos_token_id == smollm2_ref.generation_config.eos_token_id
    assert [p.rsplit("/", 1)[1] for p in model.enec_source] == sorted(p.name for p in folder.glob(f"*.{which}"))


def test_load_streamed_encoder_dtype_and_prefix(minilm_folder, minilm_enec_folder):
    import enec

    ref = transformers.AutoModel.from_pretrained(str(minilm_folder)).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    model = enec.load_streamed(minilm_enec_folder, model_class=transformers.AutoModel)
    assert model.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)
    # a dtype casts every floating tensor, as transformers' loader would
    half = enec.load_streamed(minilm_enec_folder, model_class=transformers.AutoModel, dtype="bfloat16")
    want = ref.to(torch.bfloat16).state_dict()
    got = half.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # checkpoint names without the base model prefix still find their parameters ("bert." is
    # added); the MLM head the checkpoint lacks is refused, not left on the meta device
    with pytest.raises(EnecError, match=r"does not fill BertForMaskedLM.*cls\.predictions"):
        enec.load_streamed(minilm_enec_folder, model_class=transformers.BertForMaskedLM)


def test_load_streamed_errors(tmp_path, minilm_enec_folder):
    import enec

    before = len(_reader_threads())
    with pytest.raises(EnecError, match="no such folder"):
        enec.load_streamed(tmp_path / "missing")
    with pytest.raises(EnecError, match="dtype must be"):
        enec.load_streamed(minilm_enec_folder, dtype="int8")
    with pytest.raises(EnecError, match="no model for"):  # BERT has no seq2seq class
        enec.load_streamed(minilm_enec_folder, model_class=transformers.AutoModelForSeq2SeqLM)
    bad = tmp_path / "bad"
    shutil.copytree(minilm_enec_folder, bad)
    shard = next(bad.glob("*.enec"))
    shard.write_bytes(shard.read_bytes()[:10_000_000])
    with pytest.raises(EnecError):
        enec.load_streamed(bad, model_class=transformers.AutoModel)
    assert _no_reader_left(before)  # every failed load stopped its reader thread
