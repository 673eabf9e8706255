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


def test_from_pretrained_encoder_model(minilm_folder, tmp_path):
    """Any Auto class works: the fp32 MiniLM encoder through AutoModel."""
    import enec

    dst = tmp_path / "minilm-enec"
    compress_folder(minilm_folder, dst)
    model = enec.from_pretrained(dst, model_class=transformers.AutoModel).eval()
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
