"""The Triton kernels (enec.gpu) against the CPU codec: same streams, both directions.

On a machine with CUDA these run the compiled kernels on the GPU. Without one they run the
same kernels in Triton's interpreter on CPU tensors: a module fixture sets
TRITON_INTERPRET=1 before enec.gpu first imports triton (the interpret switch is read when
the kernels are decorated) and undoes both afterwards, so no other test file sees it.
Inputs are small (a few blocks of 64..1024 elements, plus a slice of real weights) to keep
the interpreter fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import enec
from enec.format import BY_NAME, parse_header

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

DATA = Path(__file__).parent / "data"
INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32}
DTYPES = ["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2"]
CUDA = torch.cuda.is_available()


def _triton_python_modules() -> list[str]:
    """triton's Python modules (not its compiled extension, which cannot be loaded twice)."""
    return [k for k in sys.modules if (k == "triton" or k.startswith("triton.")) and not k.startswith("triton._C")]


@pytest.fixture(scope="module", autouse=True)
def device():
    """'cuda' with a GPU; else 'cpu' with the kernels in Triton's interpreter.

    triton decides "interpret or compile" when a function is decorated, its own library
    functions (tl.sum, tl.cumsum, ...) included, so the interpreter needs TRITON_INTERPRET=1
    before triton's Python modules load. If another test imported triton already, its
    modules are set aside for this file and put back afterwards; the kernel module made
    here is dropped afterwards either way.
    """
    if CUDA:
        yield torch.device("cuda")
        return
    old = os.environ.get("TRITON_INTERPRET")
    saved = {k: sys.modules.pop(k) for k in _triton_python_modules()}
    saved_kernels = sys.modules.pop("enec._gpu_kernels", None)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield torch.device("cpu")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        if saved:  # give the other tests their triton back (else keep ours: unloading it is noisy)
            for k in _triton_python_modules():
                del sys.modules[k]
            sys.modules.update(saved)
        sys.modules.pop("enec._gpu_kernels", None)
        if saved_kernels is not None:
            sys.modules["enec._gpu_kernels"] = saved_kernels
        if hasattr(enec, "_gpu_kernels"):
            delattr(enec, "_gpu_kernels")


@pytest.fixture(scope="module")
def gpu(device):
    import enec.gpu

    assert enec.gpu.available()
    return enec.gpu


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(INT_OF[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def weights(n: int, dtype: str, seed: int = 0, specials: bool = True) -> torch.Tensor:
    """Weight-like values with zeros, NaN, infinities and denormals forcing escapes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.02
    if specials and n > 40:
        x[::97] = 0.0
        x[5] = float("nan")
        x[7] = float("-inf")
        x[11] = float("inf")
        x[13] = 1e-40  # an fp32 denormal (0 in the narrow types)
        x[17] = -3e4
        x[19] = 1e30 if dtype == "float32" else 200.0
    return x.to(getattr(torch, dtype))


def random_bits(n: int, dtype: str, seed: int = 0) -> torch.Tensor:
    size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    return raw.view(INT_OF[size]).view(getattr(torch, dtype))


def block_headers(blob: bytes) -> list[bytes]:
    info = parse_header(blob)
    return [blob[info.payload_start + int(o): info.payload_start + int(o) + 16] for o in info.offsets[:-1]]


def check_both_ways(gpu, x: torch.Tensor, device, **kw) -> bytes:
    """CPU stream -> GPU decode, GPU stream -> CPU decode, and the two streams are equal."""
    cpu_blob = enec.compress(x, **kw)
    y = gpu.decompress(cpu_blob, device=device)
    assert y.device.type == device.type and same(y, x)
    gpu_blob = gpu.compress(x.to(device), **kw)
    assert gpu_blob == cpu_blob
    assert same(enec.decompress(gpu_blob), x)
    return cpu_blob


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_last_block_with_escapes(gpu, device, dtype):
    x = weights(2500, dtype, seed=1)  # 1024 + 1024 + 452
    blob = check_both_ways(gpu, x, device, block_size=1024)
    assert any(h[0] == 0 and int.from_bytes(h[8:12], "little") for h in block_headers(blob))


def far_exponents(dtype: str) -> torch.Tensor:
    """Weights plus many values of a few far exponents and a handful of rarer ones: the
    level-2 window cannot hold every escape, so some reach level 3 (w2 = 3 for float16,
    6 for the 8-bit exponents)."""
    x = weights(3000, dtype, seed=2, specials=False)
    if dtype == "float16":
        vals = torch.tensor([2.0**k for k in range(-3, 4)])
        rare = torch.tensor([float("inf"), 6e4, -float("inf")])
    else:
        vals = torch.tensor([2.0**k for k in range(0, 40, 3)])
        rare = torch.tensor([1e-38, float("inf"), 0.0, float("nan"), 1e-30, 1e30])
    x[100::9] = vals.repeat(400)[: x[100::9].numel()].to(x.dtype)
    x[101::300] = rare.repeat(10)[: x[101::300].numel()].to(x.dtype)
    return x


def lone_escapes(dtype: str) -> torch.Tensor:
    """One exponent everywhere but 21 escapes with distinct, far-apart exponents: w1 = 1
    and w2 = 0 (every escape goes straight to level 3)."""
    x = torch.full((3000,), 0.75)
    x[7::143] = torch.tensor([2.0**k for k in range(-120, 121, 12)])
    return x.to(getattr(torch, dtype))


def two_exponents(dtype: str) -> torch.Tensor:
    """Three values and four outliers: w1 = 1 and w2 = 1 (widths triton may specialise)."""
    x = torch.full((3000,), 0.75)
    x[::3] = 1.5
    x[1::3] = -1.25
    x[5], x[500], x[1500], x[2999] = 1e4, 1e-3, -3.0e2, float("nan")
    return x.to(getattr(torch, dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("make", [far_exponents, lone_escapes, two_exponents])
def test_level2_and_level3_escapes(gpu, device, dtype, make):
    if make is lone_escapes and dtype == "float16":
        pytest.skip("float16 has no exponents 12 octaves apart")
    x = make(dtype)
    for penalty in (0, 2):
        blob = check_both_ways(gpu, x, device, block_size=1024, escape_penalty=penalty)
        heads = [h for h in block_headers(blob) if h[0] == 0]
        assert heads and all(int.from_bytes(h[8:12], "little") > 0 for h in heads)
        if make is not two_exponents:
            assert any(int.from_bytes(h[12:16], "little") > 0 for h in heads)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_raw_blocks_among_coded_ones(gpu, device, dtype):
    x = torch.cat([weights(2048, dtype, seed=3), random_bits(1024, dtype, seed=4),
                   weights(700, dtype, seed=5, specials=False)])
    blob = check_both_ways(gpu, x, device, block_size=1024)
    assert [h[0] for h in block_headers(blob)] == [0, 0, 1, 0]


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_smallest_blocks(gpu, device, n):
    check_both_ways(gpu, weights(n, "bfloat16", seed=n), device, block_size=64)
    check_both_ways(gpu, random_bits(n, "float16", seed=n), device, block_size=64)


def test_all_equal_and_shapes(gpu, device):
    check_both_ways(gpu, torch.full((3, 700), -3.5, dtype=torch.bfloat16), device, block_size=1024)
    check_both_ways(gpu, torch.zeros((5, 0, 2), dtype=torch.float32), device)
    check_both_ways(gpu, torch.tensor(1.5, dtype=torch.float16), device)


def test_real_weights_default_blocks(gpu, device, minilm_bf16):
    """A slice of the real MiniLM weights (bf16), default 16384-element blocks."""
    x = torch.from_numpy(minilm_bf16[1_000_000:1_040_000].copy()).view(torch.bfloat16).reshape(200, 200)
    check_both_ways(gpu, x, device)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_launch_knobs_and_torch_histogram(gpu, device, dtype, monkeypatch):
    """Several tiles per block (TILE_K 32 with 1024-element blocks), alignment hints, more
    warps, and the torch.bincount histogram: the same bytes every way."""
    x = far_exponents(dtype)
    monkeypatch.setattr(gpu, "TILE_K", 32)
    monkeypatch.setattr(gpu, "ALIGN_HINTS", True)
    monkeypatch.setattr(gpu, "NUM_WARPS", 8)
    check_both_ways(gpu, x, device, block_size=1024)
    monkeypatch.setattr(gpu, "HISTOGRAM", "torch")
    assert gpu.compress(x.to(device), block_size=1024) == enec.compress(x, block_size=1024)


@pytest.mark.parametrize("dtype", DTYPES)
def test_golden_streams_decode(gpu, device, dtype):
    """The frozen streams of tests/enec/data (made from numpy, block 1024) decode on the GPU."""
    meta = json.loads((DATA / "golden.json").read_text())[dtype]
    blob = (DATA / f"golden-{dtype}.enec").read_bytes()
    want = np.frombuffer((DATA / f"golden-{dtype}.bin").read_bytes(), BY_NAME[dtype].uint_dtype)
    y = gpu.decompress(blob, device=device)
    assert y.numel() == meta["n"]
    got = bits(y).reshape(-1).numpy().view(want.dtype)
    assert np.array_equal(got, want)


def test_device_stream_out_and_as_tensor(gpu, device):
    x = weights(3000, "float16", seed=6).reshape(30, 100)
    t = gpu.compress(x.to(device), block_size=1024, as_tensor=True)
    assert t.dtype == torch.uint8 and t.device.type == device.type
    assert t.cpu().numpy().tobytes() == enec.compress(x, block_size=1024)
    out = torch.empty_like(x, device=device)
    assert gpu.decompress(t, out=out) is out and same(out, x)
    prep = gpu.prepare(t)  # parsed once, decoded twice
    assert same(prep.decode(), x) and same(prep.decode(verify=False), x)
    with pytest.raises(enec.EnecError):
        gpu.decompress(t, out=torch.empty(2999, dtype=torch.float16, device=device))
    with pytest.raises(enec.EnecError):
        gpu.decompress(t, out=torch.empty(3000, dtype=torch.bfloat16, device=device))


def test_import_is_lazy_and_errors_are_enec_errors():
    """`import enec, enec.gpu` loads no triton; without CUDA (and no interpreter) or with a
    CPU tensor the GPU functions raise EnecError."""
    code = (
        "import sys, torch, enec, enec.gpu\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "try:\n"
        "    enec.gpu.compress(torch.zeros(3, dtype=torch.bfloat16))\n"
        "except enec.EnecError as e:\n"
        "    print('EnecError', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "EnecError" in run.stdout


# --------------------------------------------------------------------------- bad streams


@pytest.fixture(scope="module")
def stream() -> bytes:
    """Three blocks (the last partial), with level-2 and level-3 escapes."""
    return enec.compress(weights(600, "bfloat16", seed=7), block_size=256)


def test_corrupted_payload_raises(gpu, device, stream):
    info = parse_header(stream)
    rng = np.random.default_rng(0)
    for pos in rng.choice(np.arange(info.payload_start, len(stream)), 8, replace=False):
        bad = bytearray(stream)
        bad[pos] ^= 0x5A
        with pytest.raises(enec.EnecError, match="corrupted"):
            gpu.decompress(bytes(bad), device=device)


def test_structural_checks_without_checksums(gpu, device, stream):
    """verify=False skips the checksums; broken block headers and escapes still raise."""
    info = parse_header(stream)
    o = info.payload_start + int(info.offsets[1])
    for at, value in [(o + 1, 9), (o + 0, 2), (o + 5, 1), (o + 8, 0), (o + 12, 0)]:
        bad = bytearray(stream)
        bad[at] = value
        with pytest.raises(enec.EnecError, match="corrupted ENEC stream: block 1"):
            gpu.decompress(bytes(bad), device=device, verify=False)


def test_header_errors(gpu, device, stream):
    bad = bytearray(stream)
    bad[40] ^= 1  # inside the block table: the header CRC
    with pytest.raises(enec.EnecError):
        gpu.decompress(bytes(bad), device=device)
    t = torch.frombuffer(bytearray(stream), dtype=torch.uint8).to(device)
    for cut in (0, 10, 60, len(stream) - 8):
        with pytest.raises(enec.EnecError):
            gpu.decompress(t[:cut].clone())
    with pytest.raises(enec.EnecError):
        gpu.decompress(b"NOPE" + bytes(60), device=device)
    with pytest.raises(enec.EnecError):
        gpu.compress(torch.zeros(10, dtype=torch.int32, device=device))


# ------------------------------------------------------------------------------ resident on the GPU


def _tiny_llama(device, minilm_bf16, tied: bool):
    """A 1-layer Llama whose weights are real MiniLM values (bf16), on ``device`` (small: the
    interpreter runs each kernel program in numpy)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                                   tie_word_embeddings=tied, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    src = torch.from_numpy(minilm_bf16.copy()).view(torch.bfloat16)
    pos = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(src[pos:pos + p.numel()].view(p.shape))
                pos += p.numel()
    return model.to(device)


@pytest.mark.parametrize("offload,tied", [(False, True), (True, False)])
def test_resident_gpu_outputs_identical(gpu, device, minilm_bf16, offload, tied):
    """Weights held as ENEC streams on the device (or offloaded to host memory), decoded by
    the Triton kernels per module: logits equal the uncompressed model's, bit for bit."""
    from enec.gpu_resident import make_resident_gpu

    model = _tiny_llama(device, minilm_bf16, tied)
    ids = torch.tensor([[1, 17, 300, 42, 42, 7, 255, 3]], device=device)
    with torch.no_grad():
        want = model(ids).logits
        before = {n: bits(p).clone() for n, p in model.named_parameters()}
        handle = make_resident_gpu(model, min_numel=2048, offload=offload)
        st = handle.stats()
        assert st.weights == 7 + 1 + (0 if tied else 1)  # 7 linears, the embedding (and the head)
        assert st.compressed_bytes < st.original_bytes
        if offload:
            assert st.device_bytes < st.compressed_bytes / 10  # only block tables stay on the device
        for n, p in model.named_parameters():
            if id(p) in handle.weights:
                assert p.stride() == (0, 0), n
        for _ in range(2):  # the second pass runs on the learnt schedule (prefetch on CUDA)
            assert torch.equal(model(ids).logits, want)
        handle.check()
        assert handle.stats().decodes > 0
        handle.restore()
    for n, p in model.named_parameters():
        assert torch.equal(bits(p), before[n]), n


def test_resident_gpu_detects_corruption_and_bad_input(gpu, device, minilm_bf16):
    from enec.gpu_resident import make_resident_gpu

    model = _tiny_llama(device, minilm_bf16, tied=True)
    with pytest.raises(enec.EnecError, match="no float Linear"):
        make_resident_gpu(model, min_numel=1 << 30)
    handle = make_resident_gpu(model, min_numel=2048)
    w = next(iter(handle.weights.values()))
    payload = w.prep.base[w.prep.pstart:]
    payload[int(w.prep.offsets[0])] = 7  # block 0's mode byte: neither coded (0) nor raw (1)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]], device=device))
    with pytest.raises(enec.EnecError, match="invalid block header"):
        handle.check()
