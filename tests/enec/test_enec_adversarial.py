"""Hostile ``.enec`` files (issue 16). Item 8: a table or an embedded safetensors header
nested far beyond Python's recursion limit raises :class:`enec.EnecError` from every reader
(before: ``RecursionError``). The files are in ``data/adversarial/`` (see its README.md)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

import enec
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
