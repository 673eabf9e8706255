"""The kvserve GPU path (kvserve.stages.gpu, Triton kernels) against the CPU stages.

On a machine with CUDA these run the compiled kernels on the GPU. Without one they run the
same kernels in Triton's interpreter on CPU tensors: a module fixture sets TRITON_INTERPRET=1
before kvserve.stages.gpu first imports triton and sets gpu.FORCE_INTERPRETER, then undoes
both, so no other test file sees them (the same scheme as tests/enec/test_gpu.py). Inputs are
small (the interpreter runs the rANS kernels one 32-lane step at a time).

What is asserted: a bundle encoded on the device has the CPU's bytes, and any bundle decodes
on the device to the CPU's bits (the legacy matrix-product Hadamard is the documented
exception on a real GPU: within one bf16 unit there); corrupt rANS streams raise
KVServeError on both sides; a device-only codec is refused by a CPU reader.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import kvserve
from kvserve import KVServeError, get_stage
from kvserve.pipeline import parse_header
from kvserve.stages import irans, quantizers

from kvserve_test_common import make_kv

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

DATA = Path(__file__).parent / "data"
CUDA = torch.cuda.is_available()


def _triton_python_modules() -> list[str]:
    return [k for k in sys.modules if (k == "triton" or k.startswith("triton.")) and not k.startswith("triton._C")]


@pytest.fixture(scope="module", autouse=True)
def device():
    """'cuda' with a GPU; else 'cpu' with the kernels in Triton's interpreter."""
    from kvserve.stages import gpu

    if CUDA:
        yield torch.device("cuda")
        return
    old = os.environ.get("TRITON_INTERPRET")
    saved = {k: sys.modules.pop(k) for k in _triton_python_modules()}
    saved_kernels = sys.modules.pop("kvserve.stages._triton_kernels", None)
    os.environ["TRITON_INTERPRET"] = "1"
    gpu.FORCE_INTERPRETER = True
    try:
        yield torch.device("cpu")
    finally:
        gpu.FORCE_INTERPRETER = False
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        if saved:
            for k in _triton_python_modules():
                del sys.modules[k]
            sys.modules.update(saved)
        sys.modules.pop("kvserve.stages._triton_kernels", None)
        if saved_kernels is not None:
            sys.modules["kvserve.stages._triton_kernels"] = saved_kernels


@pytest.fixture
def small_blocks(monkeypatch):
    """irans blocks of 256 symbols, so small inputs span several blocks and a partial one."""
    monkeypatch.setattr(irans, "DEFAULT_BLOCK_LOG2", 8)


def bits16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int16)


def same_kv(a, b) -> bool:
    return all(torch.equal(bits16(x), bits16(y)) for p, q in zip(a, b) for x, y in zip(p, q))


def on(kv, device):
    return [(k.to(device), v.to(device)) for k, v in kv]


def check_both_ways(profile, kv, device, exact_decode=True):
    """Device bytes == CPU bytes; both decoders give the same bits for that bundle."""
    blob = kvserve.encode(kv, profile, meta={"n": 1})
    dev_blob = kvserve.encode(on(kv, device), profile, meta={"n": 1})
    assert dev_blob == blob
    want, meta = kvserve.decode(blob)
    got, meta2 = kvserve.decode(blob, device=device)
    assert meta2 == meta == {"n": 1}
    assert all(t.device.type == device.type for p in got for t in p)
    if exact_decode:
        assert same_kv(got, want)
    else:  # legacy Hadamard on a real GPU: a float32 matrix product, within one bf16 unit
        for p, q in zip(got, want):
            for x, y in zip(p, q):
                assert (bits16(x).int() - bits16(y).int()).abs().max() <= 1
    return blob


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("name", ["bf16", "kivi-2", "kivi-4"])
def test_gpu_bitpack_profiles_same_bytes(device, name):
    kv = make_kv(layers=2, heads=2, tokens=200, dim=32, seed=3)  # 128 recent + 64 quantized + 8
    blob = check_both_ways(name, kv, device)
    assert len(blob) < sum(k.numel() + v.numel() for k, v in kv) * 2 or name == "bf16"


@pytest.mark.parametrize("name", ["cachegen", "kvserve"])
def test_gpu_entropy_profiles_same_bytes(device, name, small_blocks):
    """The packaged cachegen and kvserve profiles (irans codec; kvserve: portable Hadamard
    with pre-RoPE keys, tiers, compact value stats, an attention sink)."""
    kv = make_kv(layers=3, heads=2, tokens=24 if name == "cachegen" else 40, dim=16, seed=4)
    blob = check_both_ways(name, kv, device)
    header, _ = parse_header(blob)
    assert header["profile"]["codec"]["id"] == "irans"
    assert any(len(r) == 5 and r[3] is not None and r[4] > 128 for r in header["parts"])


QUANTIZERS = [  # every code path of the device quantizers, with the fast bitpack codec
    {"id": "kvserve", "low_fraction": 0.5, "split": "layer", "key_group": 8, "keep_sinks": 2, "keep_recent": 5},
    {"id": "kvserve", "low_fraction": 0.34, "split": "head", "scores": [[1, 2], [0, 5], [2, 2]],
     "value_axis": "token_head", "high_key_levels": 16, "low_key_levels": 3},
    {"id": "kvserve", "tiers": [[0.5, 5, 4], [1.0, 9, 7]], "split": "layer", "key_group": 8},
    {"id": "kvserve", "tiers": [[0.5, 5, 3], [1.0, 9, 6]], "scores": [[1, 2], [0, 5], [2, 2]],
     "compact_value_stats": True, "keep_sinks": 1, "key_axis": "token"},
    {"id": "kvserve", "high_value_levels": 6, "compact_value_stats": True, "value_axis": "token_head"},
    {"id": "kvserve", "high_key_levels": 16, "key_group": 8, "keep_sinks": 1, "keep_recent": 5, "recent_key_levels": 64,
     "recent_value_levels": 32, "compact_key_stats": True, "compact_value_stats": True},
    {"id": "kvserve", "tiers": [[0.5, 5, 4], [1.0, 9, 7]], "split": "layer", "key_group": 16, "recent_key_levels": 16,
     "recent_value_levels": 12, "value_axis": "token_head", "compact_key_stats": True},
    {"id": "kivi", "bits": 4, "group_size": 8, "keep_recent": 7, "keep_sinks": 1},
    {"id": "kivi", "bits": 2, "group_size": 16, "keep_recent": 0},
    {"id": "cachegen", "key_bands": [[0.5, 8], [1.0, 4]], "value_bands": [[1.0, 64]]},
]


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda q: json.dumps(q, separators=(",", ":"))[:60])
@pytest.mark.parametrize("portable", [True, False])
def test_gpu_quantizers_same_bytes(device, quantizer, portable):
    transform = {"id": "hadamard", "seed": 7, "key_rope_theta": 10000.0, "portable": portable}
    profile = {"name": "t", "transform": transform, "quantizer": quantizer, "codec": {"id": "bitpack"}}
    kv = make_kv(layers=3, heads=2, tokens=45, dim=16, seed=5)
    if not portable and CUDA:
        pytest.skip("the legacy Hadamard's matrix product rounds differently on a GPU (see test below)")
    check_both_ways(profile, kv, device)


def test_gpu_legacy_hadamard_decodes_close(device):
    profile = {"name": "t", "transform": {"id": "hadamard", "seed": 1, "key_rope_theta": 5e5},
               "quantizer": {"id": "kvserve"}, "codec": {"id": "bitpack"}}
    kv = make_kv(layers=2, heads=2, tokens=30, dim=32, seed=6)
    blob = kvserve.encode(kv, profile)
    want, _ = kvserve.decode(blob)
    got, _ = kvserve.decode(blob, device=device)
    for p, q in zip(got, want):
        for x, y in zip(p, q):
            assert (bits16(x).int() - bits16(y).int()).abs().max() <= (1 if CUDA else 0)


def test_gpu_fp16_overflow_falls_back_to_fp32_stats(device):
    """Values beyond fp16's range: the statistics go float32 on both sides, same bytes."""
    kv = make_kv(layers=2, heads=2, tokens=20, dim=16, seed=8)
    kv[1] = (kv[1][0] * 4e4, kv[1][1])  # bf16 holds it, fp16 does not
    profile = {"name": "t", "transform": {"id": "identity"}, "quantizer": {"id": "kvserve", "high_key_levels": 12},
               "codec": {"id": "none"}}
    blob = check_both_ways(profile, kv, device)
    assert any(r[0].endswith(".min") and r[1] == "float32" for r in parse_header(blob)[0]["parts"])


@pytest.mark.parametrize("name", ["bf16", "kivi-2", "kivi-4", "cachegen", "kvserve", "kvserve-tiers"])
def test_gpu_golden_bundles_decode(device, name):
    """The frozen bundles (rans/ans codecs run on the host) decode on the device path to the
    frozen digest, except the legacy-Hadamard ones on a real GPU (within one bf16 unit)."""
    blob = (DATA / f"golden-{name}.kvsv").read_bytes()
    if parse_header(blob)[0]["profile"]["codec"]["id"] == "ans":
        pytest.importorskip("constriction")  # not on every GPU image
    out, meta = kvserve.decode(blob, device=device)
    assert meta == {"golden": name}
    digest = hashlib.sha256(b"".join(bits16(t).numpy().tobytes() for p in out for t in p)).hexdigest()
    legacy = parse_header(blob)[0]["profile"]["transform"]["id"] == "hadamard"
    if CUDA and legacy:
        want, _ = kvserve.decode(blob)
        assert all((bits16(x).int() - bits16(y).int()).abs().max() <= 1 for p, q in zip(out, want) for x, y in zip(p, q))
    else:
        assert digest == json.loads((DATA / "golden.json").read_text())[name]["sha256"]


# --------------------------------------------------------------------------- codecs


def skewed(n: int, bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.normal((1 << bits) / 2, (1 << bits) / 6, n)), 0, (1 << bits) - 1).astype(np.uint8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [0, 1, 33, 700])
def test_triton_irans_same_stream_as_numba(device, small_blocks, bits, n):
    from kvserve.stages import gpu

    arr = skewed(n, bits, seed=bits * 10 + n)
    for pair in (True, False):
        codec = get_stage("codec", {"id": "irans", "pair": pair})
        cpu = codec.encode(arr, bits)
        dev = gpu.codec_encode(codec, torch.from_numpy(arr).to(device), bits)
        assert dev.cpu().numpy().tobytes() == cpu
        out = gpu.codec_decode(codec, memoryview(cpu), n, bits, device)
        assert out.device.type == device.type and np.array_equal(out.cpu().numpy(), arr)
        assert np.array_equal(codec.decode(cpu, n, bits), arr)


def test_triton_irans_single_symbol_and_full_alphabet(device, small_blocks):
    """A one-symbol histogram (frequency 4096: the encoder's renormalisation bound must not
    overflow 32 bits) and all 256 byte values (8-bit symbols, unpaired)."""
    from kvserve.stages import gpu

    for arr, bits in ((np.full(300, 2, np.uint8), 2), ((np.arange(600) % 256).astype(np.uint8), 8)):
        codec = get_stage("codec", {"id": "irans", "pair": True})
        cpu = codec.encode(arr, bits)
        assert gpu.codec_encode(codec, torch.from_numpy(arr).to(device), bits).cpu().numpy().tobytes() == cpu
        assert np.array_equal(gpu.codec_decode(codec, memoryview(cpu), arr.size, bits, device).cpu().numpy(), arr)


def test_triton_irans_corrupt_streams_raise(device, small_blocks):
    from kvserve.stages import gpu

    arr = skewed(900, 3, seed=1)
    codec = get_stage("codec", {"id": "irans", "pair": True})
    blob = bytearray(codec.encode(arr, 3))
    _, _, _, _, _, offsets, hlen = irans.parse_header(blob, arr.size, 3)
    rng = np.random.default_rng(0)
    caught = 0
    for pos in rng.choice(np.arange(hlen, len(blob)), 12, replace=False):
        bad = bytearray(blob)
        bad[pos] ^= 0x5A
        try:
            gpu_out = gpu.codec_decode(codec, memoryview(bytes(bad)), arr.size, 3, device).cpu().numpy()
        except KVServeError:
            with pytest.raises(KVServeError):
                codec.decode(bytes(bad), arr.size, 3)
            caught += 1
            continue
        assert np.array_equal(gpu_out, codec.decode(bytes(bad), arr.size, 3))  # same bits both sides
    assert caught >= 10  # a flipped state or word almost always breaks the final-state check
    for cut in (hlen - 1, len(blob) - 2):  # table and stream truncations: header checks
        with pytest.raises(KVServeError):
            gpu.codec_decode(codec, memoryview(bytes(blob[:cut])), arr.size, 3, device)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_triton_bitpack_same_bytes(device, bits):
    from kvserve.stages import gpu
    from kvserve.stages.codecs import bitpack, bitunpack

    for n in (0, 1, 7, 8, 9, 1001):
        arr = skewed(n, bits, seed=n + bits)
        packed = gpu.bitpack(torch.from_numpy(arr).to(device), bits)
        assert np.array_equal(packed.cpu().numpy(), bitpack(arr, bits))
        back = gpu.bitunpack(packed, n, bits)
        assert np.array_equal(back.cpu().numpy(), bitunpack(bitpack(arr, bits), n, bits))


def test_triton_minmax_rounds_like_the_cpu(device):
    """Exact .5 ties (round half to even), huge offsets, zero ranges, int and tensor levels."""
    from kvserve.stages import gpu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 3, 40, 8, generator=g)
    x[0, 0, 0, :, 0] = torch.arange(40) * 0.5  # ties after scaling by 14 / 19.5
    x[1, 0, 1] = 7.0  # zero range: clamped to 1e-8
    x[1, 0, 2] += 3e4  # far from zero: fp16 min rounds, values leave [0, lv] before clamping
    for levels in (15, 4, torch.tensor([[5.0, 9.0, 16.0], [3.0, 7.0, 256.0]])[:, None, :, None, None]):
        for dims in ((3,), (2, 4), (4,)):
            cpu_parts, dev_parts = [], []
            want = quantizers._minmax(x.clone(), dims, levels, cpu_parts, "")
            lv = levels.to(device) if isinstance(levels, torch.Tensor) else levels
            got = gpu._minmax(x.to(device), dims, lv, dev_parts)
            assert torch.equal(got.cpu(), want)
            for a, b in zip(cpu_parts, dev_parts):
                assert a.name == b.name and a.dtype == b.dtype and np.array_equal(a.array, b.array.cpu().numpy())


def test_gpu_stat_map_covers_the_layouts():
    from kvserve.stages.gpu import _stat_map

    shape = (3, 2, 4, 5, 6)
    for sshape in [(3, 2, 4, 1, 6), (3, 2, 1, 5, 1), (3, 2, 4, 5, 1), (3, 1, 4, 1, 1), (3, 1, 1, 1, 1), (1, 1, 1, 1, 1)]:
        idx = torch.arange(int(np.prod(sshape))).reshape(sshape).expand(shape).reshape(-1)
        p, q, r, s = _stat_map(shape, sshape)
        i = torch.arange(idx.numel())
        assert torch.equal((i // p) * q + (i // r) % s, idx), sshape
    with pytest.raises(KVServeError):
        _stat_map(shape, (1, 2, 1, 5, 1))  # a layout no quantizer uses


# --------------------------------------------------------------------------- boundaries


def _reframe(blob: bytes, header: dict) -> bytes:
    """The bundle with another header (valid framing and CRC)."""
    _, payload = parse_header(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    out = bytearray(struct.pack("<4sBBHIQ", b"KVSV", 1, 0, 0, len(h), len(payload))) + h + bytes(payload)
    return bytes(out + struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF))


def test_gpu_device_only_codec_refused_on_cpu(monkeypatch):
    from kvserve.stages import gpu

    monkeypatch.setattr(gpu, "FORCE_INTERPRETER", False)  # the plain CPU reader and writer
    kv = make_kv(layers=2, heads=1, tokens=10, dim=8)
    blob = kvserve.encode(kv, {"name": "t", "quantizer": {"id": "kivi", "keep_recent": 0, "group_size": 2},
                               "codec": {"id": "none"}})
    header, _ = parse_header(blob)
    header["profile"]["codec"] = {"id": "nvcomp", "algorithm": "ANS"}
    with pytest.raises(KVServeError, match="only on a CUDA device"):
        kvserve.decode(_reframe(blob, header))
    with pytest.raises(KVServeError, match="CUDA"):
        kvserve.encode(kv, {"name": "t", "codec": {"id": "nvcomp", "algorithm": "Bitcomp"}})


def test_gpu_mixed_devices_and_missing_cuda_raise():
    """`import kvserve` loads no triton; a CUDA decode without CUDA is a KVServeError."""
    code = (
        "import sys, kvserve\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "blob = kvserve.encode([(__import__('torch').zeros(1, 1, 2, 4, dtype=__import__('torch').bfloat16),) * 2], 'bf16')\n"
        "try:\n"
        "    kvserve.decode(blob, device='cuda')\n"
        "except kvserve.KVServeError as e:\n"
        "    print('KVServeError', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(kvserve.__file__).parents[1]), env.get("PYTHONPATH")) if p)
    if not CUDA:
        run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert "KVServeError" in run.stdout and "CUDA" in run.stdout
    kv = make_kv(layers=2, heads=1, tokens=4, dim=8)
    kv[1] = (kv[1][0].to("meta"), kv[1][1].to("meta"))
    with pytest.raises(KVServeError, match="several devices"):
        kvserve.encode(kv, "bf16")


@pytest.mark.parametrize("d", [16, 64, 24])
def test_triton_portable_hadamard_same_bits(device, d):
    """The Triton kernel (power-of-two head_dim; 24 = 16 + 8 takes torch operations) against the
    CPU's numba pass, forward and inverse, keys with per-layer RoPE bases and values without."""
    from kvserve.stages import gpu

    tr = get_stage("transform", {"id": "hadamard", "seed": 3, "key_rope_theta": [1e4, 1e6, 1e4], "portable": True})
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 2, 2, 9, d, generator=g) * 4
    x[..., 1] *= 60
    for which in "kv":
        want = tr.forward(x, [0, 1, 2], which)
        got = gpu.transform_forward(tr, x.to(device), [0, 1, 2], which)
        assert torch.equal(got.cpu(), want)
        back = gpu.transform_inverse(tr, got, [0, 1, 2], which)
        assert torch.equal(back.cpu(), tr.inverse(want, [0, 1, 2], which))


def test_gpu_uneven_layers_batch_and_odd_head_dims(device, small_blocks):
    """Sliding-window layers (several groups, an empty one), batch 2, a value head_dim of 96
    (portable Hadamard as 64 + 32 through torch operations) and 16 (Triton), through every
    stage kind: same bytes, same bits."""
    kv = make_kv(layers=4, tokens_per_layer=[12, 5, 12, 0], dim=16, heads=2, batch=2, seed=9)
    g = torch.Generator().manual_seed(10)
    kv[0] = (kv[0][0], (torch.randn(2, 2, 12, 96, generator=g) * 3).bfloat16())
    for profile in ("kvserve", "kivi-4", "cachegen", "bf16"):
        check_both_ways(profile, kv, device)
