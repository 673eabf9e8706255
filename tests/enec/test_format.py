"""The stream format: reference equality, golden vectors, corruption, truncation, fuzzing."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import enec
from enec import reference
from enec.format import BY_NAME, FORMATS, HEADER, block_checksum_reference, parse_header

DATA = Path(__file__).parent / "data"
INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def sample(dtype: str, n: int, seed: int) -> np.ndarray:
    """Weight-like values with a few specials, as unsigned bit patterns."""
    fmt = BY_NAME[dtype]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 0.02).to(torch.float32)
    if n > 10:
        x[::97] = 0.0
        x[5] = float("nan")
        x[7] = float("-inf")
    t = x.to(getattr(torch, fmt.torch_name))
    return t.view(INT_OF[fmt.itemsize]).numpy().view(fmt.uint_dtype).copy()


@pytest.mark.parametrize("dtype", [f.name for f in FORMATS.values()])
@pytest.mark.parametrize("n", [0, 1, 100, 5000])
def test_kernels_match_reference_bytes(dtype, n):
    fmt = BY_NAME[dtype]
    x = sample(dtype, n, seed=n)
    fast = enec.compress(x, dtype=dtype, block_size=1024)
    ref = reference.encode(x, fmt, block_log2=10, flags=1)
    assert fast == ref
    assert np.array_equal(reference.decode(fast), x)


@pytest.mark.parametrize("penalty", [0, 2, 5])
def test_parameter_search_matches_reference(penalty):
    from enec import cpu

    rng = np.random.default_rng(penalty)
    for trial in range(60):
        ebits = (4, 5, 8)[trial % 3]
        k = 1 << ebits
        kind = trial % 4
        if kind == 0:
            h = rng.integers(0, 50, k)
        elif kind == 1:
            h = np.zeros(k, np.int64)
            h[rng.integers(0, k, 3)] = rng.integers(1, 100, 3)
        elif kind == 2:
            h = (1000 * np.exp(-np.abs(np.arange(k) - rng.integers(0, k)) / 2)).astype(np.int64)
        else:
            h = np.zeros(k, np.int64)
            h[rng.integers(0, k)] = 7
        h = h.astype(np.int64)
        assert tuple(cpu.choose_params(h, ebits, penalty)) == reference.choose_params(h, ebits, penalty)


def test_escape_penalty_trades_size_for_fewer_escapes():
    x = sample("bfloat16", 60_000, seed=9)
    small = enec.compress(x, dtype="bfloat16", escape_penalty=0)
    fast = enec.compress(x, dtype="bfloat16", escape_penalty=8)
    assert len(small) <= len(fast)
    esc = lambda blob: sum(int.from_bytes(blob[o + 8 : o + 12], "little") for o in block_starts(blob))  # noqa: E731
    assert esc(fast) <= esc(small)
    assert np.array_equal(enec.decompress(fast).reshape(-1), x)


def block_starts(blob: bytes) -> list[int]:
    info = parse_header(blob)
    return [info.payload_start + int(o) for o in info.offsets[:-1]]


def test_checksum_reference_matches_kernel():
    from enec import cpu

    rng = np.random.default_rng(0)
    for nbytes in (0, 8, 64, 72, 1000 * 8):
        buf = rng.integers(0, 256, nbytes, dtype=np.uint8)
        w32 = buf.view(np.uint32)
        assert int(cpu.hash_words(w32, 0, w32.size)) == block_checksum_reference(buf.tobytes())


def test_single_bit_flips_change_the_checksum():
    rng = np.random.default_rng(1)
    buf = bytearray(rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
    base = block_checksum_reference(bytes(buf))
    for bit in range(0, len(buf) * 8, 7):
        buf[bit // 8] ^= 1 << (bit % 8)
        assert block_checksum_reference(bytes(buf)) != base
        buf[bit // 8] ^= 1 << (bit % 8)


# --------------------------------------------------------------------------- golden vectors

GOLDEN = [("bfloat16", 3000), ("float16", 3000), ("float32", 1500), ("float8_e4m3fn", 2000), ("float8_e5m2", 2000)]


def golden_input(dtype: str, n: int) -> np.ndarray:
    """Frozen inputs (raw little-endian bit patterns), so no RNG version can move them."""
    path = DATA / f"golden-{dtype}.bin"
    if not path.exists():  # only when (re)creating the vectors
        return sample(dtype, n, seed=12345)
    return np.frombuffer(path.read_bytes(), dtype=BY_NAME[dtype].uint_dtype)


@pytest.mark.parametrize("dtype,n", GOLDEN)
def test_golden_vectors(dtype, n):
    """The frozen streams in tests/enec/data must keep decoding and keep being produced."""
    frozen = json.loads((DATA / "golden.json").read_text())[dtype]
    blob = (DATA / f"golden-{dtype}.enec").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == frozen["stream_sha256"]
    x = golden_input(dtype, n)
    assert hashlib.sha256(x.tobytes()).hexdigest() == frozen["input_sha256"]
    assert np.array_equal(enec.decompress(blob).view(x.dtype).reshape(-1), x)
    assert enec.compress(x, dtype=dtype, block_size=1024) == blob


def write_golden() -> None:  # pragma: no cover - run by hand when the format version changes
    DATA.mkdir(exist_ok=True)
    meta = {}
    for dtype, n in GOLDEN:
        x = golden_input(dtype, n)
        blob = reference.encode(x, BY_NAME[dtype], block_log2=10, flags=1)
        (DATA / f"golden-{dtype}.bin").write_bytes(x.tobytes())
        (DATA / f"golden-{dtype}.enec").write_bytes(blob)
        meta[dtype] = {"n": n, "input_sha256": hashlib.sha256(x.tobytes()).hexdigest(),
                       "stream_sha256": hashlib.sha256(blob).hexdigest()}
    (DATA / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")


# --------------------------------------------------------------------------- bad streams


@pytest.fixture(scope="module")
def stream() -> bytes:
    """A small stream of three blocks (the last one partial) with level-2 and level-3 escapes."""
    return enec.compress(sample("bfloat16", 600, seed=3), dtype="bfloat16", block_size=256)


def test_every_truncation_raises(stream):
    for n in range(len(stream)):
        with pytest.raises(enec.EnecError):
            enec.decompress(stream[:n])


def test_trailing_garbage_raises(stream):
    with pytest.raises(enec.EnecError):
        enec.decompress(stream + b"\0")


def test_every_byte_corruption_raises(stream):
    """Flip each byte (header, table and payload): always the public error, never a wrong tensor."""
    for pos in range(len(stream)):
        bad = bytearray(stream)
        bad[pos] ^= 0x5A
        with pytest.raises(enec.EnecError):
            enec.decompress(bytes(bad))


def test_hostile_header_does_not_allocate():
    """A header that claims 2**60 elements must be rejected before any allocation."""
    head = HEADER.pack(b"ENEC", 1, 1, 1, 0, 14, 0, 0, 1, 1 << 60, 64)
    blob = head + struct.pack("<Q", 1 << 60) + bytes(64)
    with pytest.raises(enec.EnecError):
        enec.decompress(blob)
    with pytest.raises(enec.EnecError):
        parse_header(b"ENEC" + bytes(100))


@pytest.mark.parametrize("junk", [b"", b"ENEC", b"\0" * 31, b"NOPE" + bytes(60), "text", None, 3.5])
def test_not_a_stream(junk):
    with pytest.raises(enec.EnecError):
        enec.decompress(junk)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mutations(stream, data):
    """Random edits of a valid stream: EnecError or (if the edit was a no-op) the right values."""
    bad = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(bad) - 1, 0)))
        if op == "flip" and bad:
            bad[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del bad[pos : pos + data.draw(st.integers(1, 64))]
        else:
            bad[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    if bytes(bad) == stream:
        return
    with pytest.raises(enec.EnecError):
        enec.decompress(bytes(bad))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(blob):
    with pytest.raises(enec.EnecError):
        enec.decompress(b"ENEC\x01" + blob)
