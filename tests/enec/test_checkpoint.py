"""Checkpoint container, save_file/load_file and the file/folder tools on real weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as st_save

import enec
from enec import checkpoint as ck


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_file(minilm_path, tmp_path_factory) -> Path:
    """The real MiniLM checkpoint in bf16 (most users ship bf16), with non-float tensors kept."""
    from safetensors.torch import load_file

    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in load_file(str(minilm_path)).items()}
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    st_save(sd, str(path), metadata={"format": "pt"})
    return path


def test_real_checkpoint_roundtrip_is_byte_identical(model_file, tmp_path):
    src = tmp_path / "model.safetensors"
    shutil.copy(model_file, src)
    stats = ck.compress_file(src, threads=2)
    packed = tmp_path / "model.enec"
    assert packed.is_file() and stats["output"] == str(packed)
    assert src.stat().st_size / packed.stat().st_size > 1.40  # bf16 weights + a raw int64 tensor
    out = tmp_path / "restored.safetensors"
    ck.decompress_file(packed, out)
    assert sha(out) == sha(src)


def test_real_fp32_checkpoint_roundtrip(minilm_path, tmp_path):
    packed = tmp_path / "minilm.enec"
    ck.compress_file(minilm_path, packed)
    ck.decompress_file(packed, tmp_path / "back.safetensors")
    assert sha(tmp_path / "back.safetensors") == sha(minilm_path)


def test_load_file_matches_safetensors(model_file, tmp_path):
    from safetensors.torch import load_file

    packed = tmp_path / "m.enec"
    ck.compress_file(model_file, packed)
    want = load_file(str(model_file))
    got = enec.load_file(packed)
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and want[k].shape == got[k].shape
        assert torch.equal(want[k].view(torch.uint8) if want[k].dtype != torch.int64 else want[k],
                           got[k].view(torch.uint8) if got[k].dtype != torch.int64 else got[k])


def test_save_file_load_file(tmp_path):
    tensors = {
        "w": torch.randn(300, 70).to(torch.bfloat16),
        "h": torch.randn(5, 3).to(torch.float16),
        "f": torch.randn(1000),
        "i": torch.arange(10, dtype=torch.int64),
        "b": torch.tensor([True, False, True]),
        "s": torch.tensor(3.5, dtype=torch.bfloat16),
        "e": torch.empty(0, 4),
        "f8": torch.randn(64).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "t.enec"
    enec.save_file(tensors, path, metadata={"who": "test"})
    got = enec.load_file(path)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    # and it decompresses to a standard safetensors file
    ck.decompress_file(path, tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"who": "test"}
        assert torch.equal(f.get_tensor("i"), tensors["i"])


def test_save_file_rejects_non_tensors(tmp_path):
    with pytest.raises(enec.EnecError):
        enec.save_file({"x": [1, 2]}, tmp_path / "x.enec")
    assert not (tmp_path / "x.enec").exists()


@pytest.fixture(scope="module")
def sharded_folder(model_file, tmp_path_factory) -> Path:
    """A Hugging Face style folder: two shards, an index, a config and a tokenizer file."""
    from safetensors.torch import load_file

    sd = load_file(str(model_file))
    names = sorted(sd)
    half = len(names) // 2
    root = tmp_path_factory.mktemp("hf") / "minilm"
    root.mkdir()
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        st_save({k: sd[k] for k in part}, str(root / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text('{"model_type": "bert"}')
    (root / "sub").mkdir()
    (root / "sub" / "tokenizer.txt").write_text("hello\n")
    return root


def test_sharded_folder_roundtrip(sharded_folder, tmp_path):
    src = tmp_path / "minilm"
    shutil.copytree(sharded_folder, src)
    ck.compress_folder(src)
    packed = tmp_path / "minilm-enec"
    assert sorted(p.name for p in packed.glob("*.enec")) == ["model-00001-of-00002.enec", "model-00002-of-00002.enec"]
    assert (packed / "config.json").read_text() == '{"model_type": "bert"}'
    shutil.move(src, tmp_path / "original")
    ck.decompress_folder(packed)
    for p in (tmp_path / "original").rglob("*"):
        if p.is_file():
            assert sha(p) == sha(src / p.relative_to(tmp_path / "original")), p


def test_edge_tensors_in_a_checkpoint(tmp_path):
    """Scalars and empty tensors keep their shapes through compress / decompress / load."""
    src = tmp_path / "edge.safetensors"
    tensors = {"e": torch.empty(0, 3, dtype=torch.bfloat16), "s": torch.tensor(1.5),
               "w": torch.randn(10, 10).to(torch.float16)}
    st_save(tensors, str(src))
    ck.compress_file(src)
    ck.decompress_file(tmp_path / "edge.enec", tmp_path / "back.safetensors")
    assert sha(tmp_path / "back.safetensors") == sha(src)
    got = enec.load_file(tmp_path / "edge.enec")
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in tensors.items()}


def test_refuses_to_overwrite(model_file, tmp_path):
    src = tmp_path / "model.safetensors"
    shutil.copy(model_file, src)
    (tmp_path / "model.enec").write_bytes(b"keep me")
    with pytest.raises(enec.EnecError, match="exists"):
        ck.compress_file(src)
    assert (tmp_path / "model.enec").read_bytes() == b"keep me"
    ck.compress_file(src, force=True)
    assert enec.load_file(tmp_path / "model.enec")


def test_interrupted_compress_leaves_nothing(model_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ck.Encoder.write

    def failing(*a, **kw):  # the fifth tensor (or block range) coded
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ck.Encoder, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        ck.compress_file(model_file, tmp_path / "out.enec")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def packed(model_file, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("packed") / "m.enec"
    ck.compress_file(model_file, path)
    return path.read_bytes()


@pytest.mark.parametrize("where", ["magic", "table", "header", "payload", "tail", "truncate"])
def test_corrupted_checkpoint_raises(packed, tmp_path, where):
    bad = bytearray(packed)
    if where == "magic":
        bad[0] ^= 1
    elif where == "table":
        bad[40] ^= 1
    elif where == "header":
        meta = json.loads(bytes(bad[24 : 24 + int.from_bytes(bad[16:24], "little")]))
        bad[meta["source"]["safetensors_header"][0] + 20] ^= 1
    elif where == "payload":
        bad[len(bad) // 2] ^= 0x10
    elif where == "tail":
        bad[-3] ^= 0x01
    else:
        bad = bad[: len(bad) - 1000]
    path = tmp_path / "bad.enec"
    path.write_bytes(bytes(bad))
    with pytest.raises(enec.EnecError):
        enec.load_file(path)
    with pytest.raises(enec.EnecError):
        ck.decompress_file(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
                                     b"\x08\x00\x00\x00\x00\x00\x00\x00[1,2,3] "])
def test_not_safetensors(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(enec.EnecError):
        ck.compress_file(path)
    assert not (tmp_path / "x.enec").exists()
