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


def _reader_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "enec-read-ahead"]


def test_reading_starts_at_call_and_stops_when_dropped(minilm_enec):
    import gc

    size = minilm_enec.stat().st_size
    reads = []

    class Counting(ThrottledReader):
        def readinto(self, b):
            n = super().readinto(b)
            reads.append(n)
            return n

    # the reader works before the first next(): the caller can build its model meanwhile
    stream = iter_streamed([minilm_enec], opener=lambda p: Counting(p, None))
    deadline = time.monotonic() + 30
    while sum(reads) < size and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(reads) == size
    assert len(dict(stream)) > 0
    # never iterated and dropped: a slow reader notices and ends without reading the file
    before = len(_reader_threads())
    stream = iter_streamed([minilm_enec], opener=lambda p: ThrottledReader(p, 20e6), chunk=1 << 20)
    assert len(_reader_threads()) == before + 1
    del stream
    gc.collect()
    deadline = time.monotonic() + 10
    while len(_reader_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_reader_threads()) == before


def test_decoded_tensors_are_separate_slices_that_save(minilm_enec, minilm_tensors, tmp_path):
    from safetensors.torch import load_file as st_load
    from safetensors.torch import save_file

    got = dict(iter_streamed([minilm_enec]))
    ptrs = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in got.values() if t.numel())
    assert all(a[1] <= b[0] for a, b in zip(ptrs, ptrs[1:]))  # disjoint
    assert all(p % 64 == 0 for p, _ in ptrs)
    # one tensor written to does not disturb its neighbours, and safetensors saves them
    name = next(iter(got))
    got[name].zero_()
    for k, v in minilm_tensors.items():
        if k != name:
            assert torch.equal(got[k], v), k
    save_file(got, tmp_path / "out.safetensors")
    back = st_load(tmp_path / "out.safetensors")
    assert all(torch.equal(back[k], got[k]) for k in got)


def test_decoder_threads(minilm_enec, minilm_tensors, monkeypatch):
    """While the file is still being read, tensors decode with one thread fewer than asked
    (the reader keeps a core) unless their output pages are not faulted in yet; once it is
    all in, with every thread asked for; tensors below PARALLEL_BYTES always on one thread."""
    import contextlib

    import numba

    import enec.streaming as es

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two numba threads")
    used = []
    real = es.threads_set

    @contextlib.contextmanager
    def recording(n):
        used.append(n)
        with real(n):
            yield

    def fully_read():
        deadline = time.monotonic() + 30
        while len(_reader_threads()) > before and time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(es, "threads_set", recording)
    before = len(_reader_threads())
    monkeypatch.setattr(es, "PARALLEL_BYTES", 0)
    stream = iter_streamed([minilm_enec], opener=lambda p: ThrottledReader(p, 100e6), threads=2, chunk=1 << 20)
    got = dict(stream)  # the encoder layers decode while later ones are still arriving
    assert set(used) == {1, 2} and used.count(1) > len(used) // 2, used
    assert all(torch.equal(got[k], v) for k, v in minilm_tensors.items())
    # everything in before the first tensor: every thread for every tensor
    used.clear()
    stream = iter_streamed([minilm_enec], threads=2)
    fully_read()
    got = dict(stream)
    assert set(used) == {2}, used

    monkeypatch.setattr(es, "PARALLEL_BYTES", 4 << 20)
    used.clear()
    stream = iter_streamed([minilm_enec], threads=2)
    fully_read()
    got = dict(stream)
    big = sum(t.numel() * t.element_size() >= 4 << 20 for t in minilm_tensors.values())
    assert big >= 1 and used.count(2) == big and used.count(1) == len(used) - big, used
    assert all(torch.equal(got[k], v) for k, v in minilm_tensors.items())


def test_inplace_plan_never_overwrites_a_pending_stream(minilm_enec):
    """Decoded tensors go to the front of the buffer that holds the file at its tail: no
    tensor's output reaches its own stream or a later one, and the buffer is smaller than
    the file plus a separate output buffer."""
    from enec.checkpoint import read_checkpoint
    from enec.streaming import _inplace_plan

    size = minilm_enec.stat().st_size
    head = minilm_enec.read_bytes()[: 1 << 20]
    plan = _inplace_plan(head, size)
    ck = read_checkpoint(head, size)
    raws = [st.end - st.start for st in ck.layout.entries]
    assert plan.base % 64 == 0 and all(o % 64 == 0 for o in plan.offsets)
    for o, n, e in zip(plan.offsets, raws, ck.entries):
        assert o + n <= plan.base + e.offset, e.name
    assert plan.nbytes < plan.total + size
    assert plan.total >= sum(raws)
    assert _inplace_plan(b"not an enec file" * 8, size) is None  # the consumer reports it


def test_slow_link_small_reads_exact(minilm_enec, minilm_tensors):
    """Many small reads through a slow link: the consumer faults pages in while it waits and
    decodes into the buffer the file is still arriving in; every tensor stays exact."""
    got = dict(iter_streamed([minilm_enec], opener=lambda p: ThrottledReader(p, 300e6), chunk=256 << 10))
    assert all(torch.equal(got[k], v) for k, v in minilm_tensors.items())


def test_damaged_table_is_reported(minilm_enec, tmp_path):
    data = bytearray(minilm_enec.read_bytes())
    data[40] ^= 0xFF  # inside the JSON table: its checksum no longer matches
    bad = tmp_path / "table.enec"
    bad.write_bytes(bytes(data))
    with pytest.raises(EnecError, match="checksum"):
        list(iter_streamed([bad]))
