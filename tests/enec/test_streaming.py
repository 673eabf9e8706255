"""Pipelined reads: tensors arrive while the file is still being read."""

from __future__ import annotations

import time

import pytest

from enec import EnecError
from enec.checkpoint import compress_file, load_file
from enec.streaming import ThrottledReader, iter_streamed

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def minilm_enec(minilm_path, tmp_path_factory):
    dst = tmp_path_factory.mktemp("stream") / "model.enec"
    compress_file(minilm_path, dst)
    return dst


def test_streamed_tensors_equal_loaded(minilm_path, minilm_enec, minilm_tensors):
    got = dict(iter_streamed([minilm_enec]))
    assert got.keys() == minilm_tensors.keys()
    for k, v in minilm_tensors.items():
        assert torch.equal(got[k], v), k
    plain = dict(iter_streamed([minilm_path]))
    for k, v in minilm_tensors.items():
        assert torch.equal(plain[k], v), k
    # both files in one pass, as shards of one model
    both = list(iter_streamed([minilm_enec, minilm_path]))
    assert len(both) == 2 * len(minilm_tensors)


def test_throttled_reader_paces(minilm_enec):
    rate = 40e6
    t0 = time.perf_counter()
    with ThrottledReader(minilm_enec, rate) as f:
        n = len(f.read(4_000_000))
    assert n == 4_000_000
    assert time.perf_counter() - t0 >= n / rate * 0.99
    with pytest.raises(EnecError, match="positive"):
        ThrottledReader(minilm_enec, 0)


def test_stream_through_throttle_matches(minilm_enec):
    want = load_file(minilm_enec)
    got = dict(iter_streamed([minilm_enec], opener=lambda p: ThrottledReader(p, 2e9)))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_stream_errors(minilm_enec, tmp_path):
    bad = tmp_path / "cut.enec"
    bad.write_bytes(minilm_enec.read_bytes()[:5_000_000])
    with pytest.raises(EnecError):
        list(iter_streamed([bad]))
    with pytest.raises(EnecError, match="expected .enec or .safetensors"):
        (tmp_path / "x.json").write_text("{}")
        list(iter_streamed([tmp_path / "x.json"]))
    with pytest.raises(EnecError, match="no such file"):
        list(iter_streamed([tmp_path / "missing.enec"]))

    class Short:  # a reader that ends early (a dropped connection)
        def __init__(self, p):
            self.f = open(p, "rb")

        def readinto(self, b):
            return 0 if self.f.tell() > 1_000_000 else self.f.readinto(b)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    with pytest.raises(EnecError, match="ended after"):
        list(iter_streamed([minilm_enec], opener=Short))
