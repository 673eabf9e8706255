"""Hostile ``.enec`` files (issue 16). Item 8: a table or an embedded safetensors header
nested far beyond Python's recursion limit raises :class:`enec.EnecError` from every reader
(before: ``RecursionError``). The files are in ``data/adversarial/`` (see its README.md)."""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest

import enec
import enec.checkpoint
import enec.streaming
from enec.checkpoint import MAGIC, PREFIX, VERSION, parse_safetensors_header

ADV = Path(__file__).with_name("data") / "adversarial"
DEPTH = 100_000


def nested_table() -> bytes:
    """An ``.enec`` prefix with a correct CRC over a table nested ``DEPTH`` deep."""
    js = b'{"source":' + b"[" * DEPTH + b"]" * DEPTH + b"}"
    return PREFIX.pack(MAGIC, VERSION, zlib.crc32(js), len(js)) + js


def test_committed_file_is_the_documented_one():
    assert (ADV / "nested-table.enec").read_bytes() == nested_table()


def test_nested_enec_table_raises_enec_error(tmp_path):
    path = ADV / "nested-table.enec"
    with pytest.raises(enec.EnecError, match="bad table"):
        enec.load_file(path)
    with pytest.raises(enec.EnecError):
        enec.checkpoint.decompress_file(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    from enec.streaming import iter_streamed

    with pytest.raises(enec.EnecError):
        list(iter_streamed([path]))


def test_nested_safetensors_header_raises_enec_error():
    header = b'{"a":' + b"[" * DEPTH + b"]" * DEPTH + b"}"
    buf = struct.pack("<Q", len(header)) + header
    with pytest.raises(enec.EnecError, match="not JSON"):
        parse_safetensors_header(buf, len(buf))


# ------------------------------------------------------------------------------ missing shards (item 9)


@pytest.fixture(scope="module")
def two_shards(minilm_folder, tmp_path_factory) -> Path:
    """MiniLM as a Hugging Face folder of two shards with an index, and its ENEC twin
    (``<folder>-enec``)."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("shards")
    folder = root / "minilm"
    folder.mkdir()
    for p in minilm_folder.iterdir():
        if p.is_file() and p.suffix == ".json" or p.name == "vocab.txt":
            shutil.copy(p, folder / p.name)
    tensors = load_file(str(minilm_folder / "model.safetensors"))
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    enec.checkpoint.compress_folder(folder)
    return folder


def _copy(folder: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(folder, dst)
    return dst


def test_absent_shard_is_an_error_on_every_loader(two_shards, tmp_path):
    """Item 9: a compressed folder whose index lists an absent shard raises EnecError from
    every loader (plain, resident, streamed, vLLM's shard list, decompress), never random
    weights."""
    import transformers

    from enec.vllm_loader import enec_shards

    bad = _copy(two_shards.with_name("minilm-enec"), tmp_path / "bad-enec")
    (bad / "model-00002-of-00002.enec").unlink()
    calls = {"from_pretrained": lambda: enec.from_pretrained(bad, model_class=transformers.AutoModel),
             "resident": lambda: enec.from_pretrained(bad, model_class=transformers.AutoModel, resident=True),
             "load_streamed": lambda: enec.load_streamed(bad, model_class=transformers.AutoModel),
             "enec_shards": lambda: enec_shards(bad),
             "decompress_folder": lambda: enec.checkpoint.decompress_folder(bad, tmp_path / "back")}
    for name, call in calls.items():
        with pytest.raises(enec.EnecError, match="missing 1 of the 2 shards"):
            call()
    assert not (tmp_path / "back").exists()


def test_shard_lacking_a_tensor_is_an_error(two_shards, tmp_path):
    """Item 9: a shard that is there but lacks a tensor the model needs: ``from_pretrained``
    raises EnecError (before: transformers initialised the parameter at random and only
    printed its load report)."""
    import torch
    import transformers

    bad = _copy(two_shards.with_name("minilm-enec"), tmp_path / "lacking-enec")
    shard = bad / "model-00002-of-00002.enec"
    tensors = enec.load_file(shard)
    dropped = next(n for n in tensors if n.endswith(".bias"))
    del tensors[dropped]
    enec.save_file(tensors, shard)
    with pytest.raises(enec.EnecError, match=f"does not fill.*{dropped}"):
        enec.from_pretrained(bad, model_class=transformers.AutoModel)
    with pytest.raises(enec.EnecError, match="does not fill"):
        enec.load_streamed(bad, model_class=transformers.AutoModel)
    good = enec.from_pretrained(two_shards.with_name("minilm-enec"), model_class=transformers.AutoModel)
    assert isinstance(good, torch.nn.Module)


def test_cli_compress_of_a_folder_missing_a_shard(two_shards, tmp_path):
    """Item 9: ``enec compress`` of a folder whose index lists an absent shard fails with one
    line naming it, and writes nothing."""
    import subprocess
    import sys

    bad = _copy(two_shards, tmp_path / "gappy")
    (bad / "model-00002-of-00002.safetensors").unlink()
    run = subprocess.run([sys.executable, "-m", "enec.cli", "compress", str(bad), "-q"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "missing 1 of the 2 shards" in run.stderr and "model-00002-of-00002.safetensors" in run.stderr
    assert not (tmp_path / "gappy-enec").exists()
