"""The enec command line: happy paths, summary output and one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from enec.cli import main


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(200, 300).to(torch.bfloat16), "b": torch.arange(7)}, str(path))
    return path


def test_compress_info_decompress(small_file, tmp_path, capsys):
    digest = hashlib.sha256(small_file.read_bytes()).hexdigest()
    assert main(["compress", str(small_file), "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert "ratio" in out and "w.enec" in out
    assert main(["info", str(tmp_path / "w.enec")]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" not in out and "BF16" in out and "w1=" in out
    assert main(["info", "--json", str(tmp_path / "w.enec")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["tensors"][0]["name"] in ("a", "b")
    small_file.unlink()
    assert main(["decompress", str(tmp_path / "w.enec"), "-q"]) == 0
    assert hashlib.sha256(small_file.read_bytes()).hexdigest() == digest


def test_folder(small_file, tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.move(small_file, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    assert main(["compress", str(folder), "-q"]) == 0
    assert (tmp_path / "m-enec" / "model.enec").is_file()
    assert main(["decompress", str(tmp_path / "m-enec"), "-o", str(tmp_path / "back"), "-q"]) == 0
    assert (tmp_path / "back" / "config.json").read_text() == "{}"


@pytest.mark.parametrize("argv,msg", [
    (["compress", "/nonexistent/x.safetensors"], "no such file"),
    (["decompress", "/nonexistent/x.enec"], "no such file"),
    (["info", "/nonexistent/x.enec"], "no such file"),
])
def test_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("enec: error:") and msg in err and err.count("\n") == 1


def test_refuses_overwrite_then_force(small_file, tmp_path, capsys):
    assert main(["compress", str(small_file), "-q"]) == 0
    assert main(["compress", str(small_file), "-q"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["compress", str(small_file), "-q", "--force"]) == 0


def test_corrupted_input(small_file, tmp_path, capsys):
    assert main(["compress", str(small_file), "-q"]) == 0
    packed = tmp_path / "w.enec"
    data = bytearray(packed.read_bytes())
    data[-100] ^= 0xFF
    packed.write_bytes(bytes(data))
    assert main(["decompress", str(packed), "-o", str(tmp_path / "o.safetensors"), "-q"]) == 1
    assert "corrupted" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
