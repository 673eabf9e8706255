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


# ------------------------------------------------------------------------------ forged containers


def forge(src: bytes, *, header=None, header_crc: bool = True) -> bytes:
    """``src`` (an ``.enec`` file) laid out anew with its safetensors header edited by
    ``header(dict)``, every offset, size and checksum recomputed as a deliberate forger would
    (with ``header_crc=False`` the header's CRC is left as it was: an edit by a tool that
    does not know about it). Streams and raw bytes are copied unchanged."""
    jlen = struct.unpack_from("<Q", src, 16)[0]
    meta = json.loads(src[24 : 24 + jlen])
    hoff, hlen = meta["source"]["safetensors_header"]
    st = src[hoff : hoff + hlen]
    old_crc = meta["source"].get("safetensors_header_crc32", zlib.crc32(st))
    if header is not None:
        h = json.loads(st[8:])
        header(h)
        js = json.dumps(h, separators=(",", ":")).encode()
        js += b" " * (-len(js) % 8)
        st = struct.pack("<Q", len(js)) + js
        try:
            meta["source"]["size"] = len(st) + max([0] + [v["data_offsets"][1] for k, v in h.items()
                                                          if k != "__metadata__"])
        except (IndexError, KeyError, TypeError):
            pass  # an entry without offsets: the source size stays
    meta["source"]["safetensors_header_crc32"] = zlib.crc32(st) if header_crc else old_crc
    blobs = [src[t["offset"] : t["offset"] + t["length"]] for t in meta["tensors"]]
    reserve = len(json.dumps(meta)) + 512
    pos = 24 + reserve
    body = bytearray()

    def put(data: bytes) -> int:
        nonlocal pos
        pos += -pos % 64
        body.extend(bytes(pos - 24 - reserve - len(body)) + data)
        start, pos = pos, pos + len(data)
        return start

    meta["source"]["safetensors_header"] = [put(st), len(st)]
    for t, blob in zip(meta["tensors"], blobs):
        t["offset"] = put(blob)
    js = json.dumps(meta, separators=(",", ":")).encode()
    js += b" " * (reserve - len(js))
    return PREFIX.pack(MAGIC, VERSION, zlib.crc32(js), len(js)) + js + bytes(body)


def _saved(tensors: dict) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        enec.save_file(tensors, Path(d) / "t.enec")
        return (Path(d) / "t.enec").read_bytes()


def _claim(name: str, dtype: str, shape: list[int], itemsize: int):
    def edit(h):
        h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [0, itemsize * math.prod(shape)]}
    return edit


def lying_raw() -> bytes:
    """A raw uint8 tensor of 16 bytes whose header claims 4 GiB (table and CRCs consistent)."""
    import torch

    return forge(_saved({"x": torch.arange(16, dtype=torch.uint8)}), header=_claim("x", "U8", [1 << 32], 1))


def lying_stream() -> bytes:
    """A 64-element bf16 stream whose header claims 2**31 elements (4 GiB)."""
    import torch

    w = torch.linspace(-1, 1, 64).to(torch.bfloat16)
    return forge(_saved({"w": w}), header=_claim("w", "BF16", [1 << 31], 2))


def relabelled(header_crc: bool) -> bytes:
    """A bf16 (64, 8) stream and a raw int64 (4,) tensor whose header says (8, 64) and int32
    (8,); with ``header_crc`` its checksum is recomputed, without it is the original's."""
    import torch

    src = _saved({"w": torch.linspace(-1, 1, 512).to(torch.bfloat16).reshape(64, 8),
                  "ids": torch.arange(4, dtype=torch.int64)})

    def edit(h):
        h["w"]["shape"] = [8, 64]
        h["ids"].update(dtype="I32", shape=[8])
    return forge(src, header=edit, header_crc=header_crc)


FORGED = {"lying-raw-4gib.enec": lying_raw, "lying-stream-4gib.enec": lying_stream,
          "relabelled-header.enec": lambda: relabelled(False),
          "relabelled-header-rechecksummed.enec": lambda: relabelled(True)}


def write_adversarial() -> None:  # pragma: no cover - run by hand when a forgery changes
    for name, make in FORGED.items():
        (ADV / name).write_bytes(make())


READERS = {
    "load_file": lambda p: enec.load_file(p),
    "decompress_file": lambda p: enec.checkpoint.decompress_file(p, p.with_name("out.safetensors"), force=True),
    "iter_streamed": lambda p: list(__import__("enec.streaming").streaming.iter_streamed([p])),
    "iter_streamed_keep": lambda p: list(__import__("enec.streaming").streaming.iter_streamed(
        [p], keep=lambda *a: True)),
    "checkpoint_info": lambda p: enec.checkpoint.checkpoint_info(p),
}

RSS_PROBE = """
import resource, sys, pathlib, enec, enec.checkpoint, enec.streaming
sys.path.insert(0, {here!r})
from test_enec_adversarial import READERS
path = pathlib.Path(sys.argv[1])
READERS["load_file"](pathlib.Path({warm!r}))  # imports and kernels loaded before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = []
for name, read in READERS.items():
    try:
        read(path)
        out.append(name + ":accepted")
    except enec.EnecError:
        out.append(name + ":EnecError")
    except BaseException as exc:
        out.append(name + ":" + type(exc).__name__)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(" ".join(out), grew)
"""


@pytest.mark.parametrize("name", ["lying-raw-4gib.enec", "lying-stream-4gib.enec"])
def test_lying_sizes_cannot_drive_allocation(name, tmp_path):
    """Item 10: a ~5 KB file whose header claims a 4 GiB tensor is rejected by every reader
    before memory is committed (before: 4.3 GB resident through ``iter_streamed(keep=...)``)."""
    import subprocess
    import sys

    import torch

    path = tmp_path / name
    path.write_bytes((ADV / name).read_bytes())
    assert path.stat().st_size < 10_000
    warm = tmp_path / "warm.enec"
    enec.save_file({"w": torch.ones(64, dtype=torch.bfloat16), "i": torch.arange(3)}, warm)
    code = RSS_PROBE.format(here=str(Path(__file__).parent), warm=str(warm))
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    verdicts, grew_kb = run.stdout.split()[:-1], int(run.stdout.split()[-1])
    assert verdicts == [f"{r}:EnecError" for r in READERS], verdicts
    assert grew_kb < 100 << 10, f"peak RSS grew {grew_kb / 1024:.0f} MB"


def test_edited_header_is_detected(tmp_path):
    """Item 10: an embedded safetensors header edited without its checksum fails its CRC; one
    whose checksum was recomputed still cannot change a stream's shape (each stream's own
    dtype and shape are checked on every path, kept streams included)."""
    for name, match in [("relabelled-header.enec", "header checksum"),
                        ("relabelled-header-rechecksummed.enec", "does not match its header")]:
        path = tmp_path / name
        path.write_bytes((ADV / name).read_bytes())
        for reader, read in READERS.items():
            if reader == "checkpoint_info" and "rechecksummed" in name:
                continue  # reports the table, decodes nothing
            with pytest.raises(enec.EnecError, match=match):
                read(path)


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


# ------------------------------------------------------------------------------ only EnecError escapes (item 11)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A small valid .safetensors / .enec pair, a FIFO, garbage files, the hostile fixtures."""
    import os

    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad-input")
    save_file({"w": torch.linspace(-2, 2, 4096).to(torch.bfloat16), "i": torch.arange(5)}, str(d / "ok.safetensors"))
    enec.checkpoint.compress_file(d / "ok.safetensors", d / "ok.enec")
    os.mkfifo(d / "fifo")
    (d / "garbage.safetensors").write_bytes(bytes(range(256)) * 8)
    (d / "garbage.enec").write_bytes(b"ENECCKPT" + bytes(range(256)) * 8)
    (d / "empty").mkdir()
    for name in ("lying-raw-4gib.enec", "nested-table.enec"):
        (d / name).write_bytes((ADV / name).read_bytes())
    return {"dir": d, "ok": d / "ok.safetensors", "enec": d / "ok.enec", "fifo": d / "fifo"}


def _stream() -> bytes:
    import torch

    return enec.compress(torch.linspace(-1, 1, 300).to(torch.bfloat16))


def _api_cases(f: dict) -> dict:
    import numpy as np
    import torch

    from enec.streaming import iter_streamed

    s = _stream()
    ok, packed, d = f["ok"], f["enec"], f["dir"]
    return {
        "compress block_size=0": lambda: enec.compress(torch.randn(8), block_size=0),
        "compress block_size='x'": lambda: enec.compress(torch.randn(8), block_size="x"),
        "compress block_size=None": lambda: enec.compress(torch.randn(8), block_size=None),
        "compress block_size=2**70": lambda: enec.compress(torch.randn(8), block_size=1 << 70),
        "compress block_size=1.5": lambda: enec.compress(torch.randn(8), block_size=1.5),
        "compress threads=True": lambda: enec.compress(torch.randn(8), threads=True),
        "compress threads=0": lambda: enec.compress(torch.randn(8), threads=0),
        "compress sparse tensor": lambda: enec.compress(torch.zeros(4).to_sparse()),
        "compress numpy int32": lambda: enec.compress(np.zeros(3, np.int32)),
        "compress numpy object": lambda: enec.compress(np.array([1, "a"], dtype=object)),
        "compress list": lambda: enec.compress([1.0, 2.0]),
        "decompress None": lambda: enec.decompress(None),
        "decompress strided memoryview": lambda: enec.decompress(memoryview(s * 2)[::2]),
        "decompress strided numpy": lambda: enec.decompress(np.frombuffer(s * 2, np.uint8)[::2]),
        "decompress threads=0": lambda: enec.decompress(s, threads=0),
        "decompress threads='x'": lambda: enec.decompress(s, threads="x"),
        "decompress verify='yes'": lambda: enec.decompress(s, verify="yes"),
        "decompress out float64": lambda: enec.decompress(s, out=np.zeros(300, np.float64)),
        "decompress out strided": lambda: enec.decompress(s, out=torch.zeros(600, dtype=torch.bfloat16)[::2]),
        "decompress out list": lambda: enec.decompress(s, out=[0] * 300),
        "stream_info strided": lambda: enec.stream_info(memoryview(s * 2)[::2]),
        "load_file None": lambda: enec.load_file(None),
        "load_file 3": lambda: enec.load_file(3),
        "load_file directory": lambda: enec.load_file(d),
        "load_file FIFO": lambda: enec.load_file(f["fifo"]),
        "load_file device='nope'": lambda: enec.load_file(packed, device="nope"),
        "load_file buffer_bytes='x'": lambda: enec.load_file(packed, buffer_bytes="x"),
        "load_file buffer_bytes=-5": lambda: enec.load_file(packed, buffer_bytes=-5),
        "load_file threads=0": lambda: enec.load_file(packed, threads=0),
        "save_file list": lambda: enec.save_file([1], d / "x.enec"),
        "save_file int name": lambda: enec.save_file({1: torch.zeros(3)}, d / "x.enec"),
        "save_file metadata list": lambda: enec.save_file({"a": torch.zeros(3)}, d / "x.enec", metadata=[1]),
        "save_file meta tensor": lambda: enec.save_file({"a": torch.zeros(3, device="meta")}, d / "x.enec"),
        "save_file to a directory": lambda: enec.save_file({"a": torch.zeros(3)}, d),
        "save_file to '.'": lambda: enec.save_file({"a": torch.zeros(3)}, "."),
        "compress_file -o .": lambda: enec.checkpoint.compress_file(ok, "."),
        "compress_file -o ..": lambda: enec.checkpoint.compress_file(ok, d / ".."),
        "compress_file block_size=0": lambda: enec.checkpoint.compress_file(ok, d / "y.enec", block_size=0),
        "compress_file FIFO": lambda: enec.checkpoint.compress_file(f["fifo"], d / "y.enec"),
        "compress_file /dev/null": lambda: enec.checkpoint.compress_file("/dev/null", d / "y.enec"),
        "compress_file onto a FIFO": lambda: enec.checkpoint.compress_file(ok, f["fifo"], force=True),
        "decompress_file -o .": lambda: enec.checkpoint.decompress_file(packed, "."),
        "decompress_file buffer_bytes=0": lambda: enec.checkpoint.decompress_file(packed, d / "z", buffer_bytes=0),
        "compress_folder of a file": lambda: enec.checkpoint.compress_folder(ok),
        "iter_streamed None": lambda: list(iter_streamed(None)),
        "iter_streamed a path": lambda: list(iter_streamed(str(packed))),
        "iter_streamed chunk=-1": lambda: list(iter_streamed([packed], chunk=-1)),
        "iter_streamed threads=0": lambda: list(iter_streamed([packed], threads=0)),
        "iter_streamed FIFO": lambda: list(iter_streamed([f["fifo"]])),
        "from_pretrained None": lambda: enec.from_pretrained(None),
        "load_streamed None": lambda: enec.load_streamed(None),
        "make_resident None": lambda: enec.make_resident(None),
    }


def test_bad_arguments_raise_only_enec_error(files):
    """Item 11: every bad argument, buffer or path raises EnecError (before: ValueError,
    TypeError, BufferError, AttributeError, RuntimeError, or a hang opening a FIFO), and
    nothing is left behind."""
    import os

    import signal

    def hang(signum, frame):
        raise TimeoutError("hung for 60 s")

    before = sorted(os.listdir(files["dir"]))
    escaped = {}
    old = signal.signal(signal.SIGALRM, hang)
    try:
        for name, call in _api_cases(files).items():
            signal.alarm(60)  # (opening a FIFO used to block forever)
            try:
                call()
                escaped[name] = "accepted"
            except enec.EnecError:
                pass
            except Exception as exc:  # noqa: BLE001 - what this test looks for
                escaped[name] = f"{type(exc).__name__}: {exc}"
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert escaped == {}
    assert sorted(os.listdir(files["dir"])) == before
    assert files["fifo"].is_fifo()


def _cli_cases(f: dict) -> list[list[str]]:
    d, ok, packed = f["dir"], str(f["ok"]), str(f["enec"])
    return [
        [], ["frobnicate"], ["compress"], ["compress", str(d / "missing.safetensors")],
        ["compress", ok, "-o", "."], ["compress", ok, "-o", str(d / "empty")],
        ["compress", ok, "-o", str(d / "n.enec"), "--block-size", "0"],
        ["compress", ok, "-o", str(d / "n.enec"), "--block-size", "3"],
        ["compress", ok, "-o", str(d / "n.enec"), "--block-size", "x"],
        ["compress", ok, "-o", str(d / "n.enec"), "-t", "0"],
        ["compress", ok, "-o", str(d / "n.enec"), "-t", "many"],
        ["compress", ok, "-o", str(d / "n.enec"), "--buffer", "0"],
        ["compress", ok, "-o", str(d / "n.enec"), "--buffer", "1e400"],
        ["compress", ok, "-o", str(d / "n.enec"), "--buffer", "nan"],
        ["compress", str(f["fifo"]), "-o", str(d / "n.enec")],
        ["compress", "/dev/null", "-o", str(d / "n.enec")],
        ["compress", ok, "-o", str(f["fifo"]), "-f"],
        ["compress", str(d / "garbage.safetensors"), "-o", str(d / "n.enec")],
        ["compress", str(d / "empty")],
        ["decompress", str(d / "garbage.enec"), "-o", str(d / "n.safetensors")],
        ["decompress", str(d / "lying-raw-4gib.enec"), "-o", str(d / "n.safetensors")],
        ["decompress", str(d / "nested-table.enec"), "-o", str(d / "n.safetensors")],
        ["decompress", packed, "-o", "."], ["decompress", packed, "-o", str(d)],
        ["decompress", str(d / "empty")],
        ["info", str(d / "garbage.enec")], ["info", str(d / "lying-raw-4gib.enec")],
        ["info", str(d / "nested-table.enec")], ["info", str(d / "empty")], ["info", str(f["fifo"])],
        ["bench", "--threads", "0"], ["bench", "--repeat", "x"],
    ]


CLI_DRIVER = """
import io, sys, json, contextlib
from enec.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    out.append([argv, rc, err.getvalue()])
print(json.dumps(out))
"""


def test_cli_bad_input_is_one_line(files):
    """Item 11: each bad invocation of ``enec`` exits non-zero with exactly one line on stderr
    and no traceback (argparse usage errors included); nothing is written."""
    import os
    import subprocess
    import sys

    before = sorted(os.listdir(files["dir"]))
    cases = _cli_cases(files)
    run = subprocess.run([sys.executable, "-c", CLI_DRIVER, json.dumps(cases)], capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    results = json.loads(run.stdout)
    bad = [(argv, rc, err) for argv, rc, err in results
           if rc in (0, None) or "Traceback" in err or err.count("\n") != 1 or not err.startswith("enec")]
    assert bad == []
    assert sorted(os.listdir(files["dir"])) == before and files["fifo"].is_fifo()
    # the programs themselves, as a user runs them
    for argv in ([], ["compress", str(files["fifo"])], ["decompress", str(files["dir"] / "garbage.enec")]):
        run = subprocess.run([sys.executable, "-m", "enec.cli", *argv], capture_output=True, text=True, timeout=300,
                             stdin=subprocess.DEVNULL)
        assert run.returncode != 0 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr


# ------------------------------------------------------------------------------ found by benchmarks/fuzz_enec.py


def huge_dimension_stream() -> bytes:
    """A bf16 stream of shape (0, 2**64-1) with a right CRC: numel 0 is the product."""
    import torch

    from enec.format import HEADER

    blob = bytearray(enec.compress(torch.zeros(0, 5, dtype=torch.bfloat16)))
    struct.pack_into("<Q", blob, HEADER.size + 8, (1 << 64) - 1)
    crc_pos = HEADER.size + 8 * 2 + 8  # two dimensions, no blocks: one offset, no checksums
    struct.pack_into("<I", blob, crc_pos, zlib.crc32(bytes(blob[:crc_pos])))
    return bytes(blob)


FORGED["stream-dimension-2-64.enec"] = huge_dimension_stream


def test_stream_dimension_of_2_63_or_more_is_rejected():
    """fuzz_enec: a stream of shape (0, 2**64-1) has numel 0 = the product, so it passed
    parse_header and torch.empty raised TypeError (overflow)."""
    with pytest.raises(enec.EnecError, match="dimension"):
        enec.decompress((ADV / "stream-dimension-2-64.enec").read_bytes())


def one_offset_header() -> bytes:
    """A raw uint8 tensor whose embedded header entry has one data offset (CRCs right)."""
    import torch

    entry = {"dtype": "U8", "shape": [3], "data_offsets": [0]}
    return forge(_saved({"x": torch.arange(3, dtype=torch.uint8)}), header=lambda h: h.update(x=entry))


FORGED["header-one-offset.enec"] = one_offset_header


@pytest.mark.parametrize("entry", [{"dtype": "U8", "shape": [3], "data_offsets": [0]},
                                   {"dtype": "U8", "shape": [1e400], "data_offsets": [0, 3]},
                                   {"dtype": "U8", "shape": [3.0], "data_offsets": [0, 3]},
                                   {"dtype": "U8", "shape": [0, 1 << 64], "data_offsets": [0, 0]},
                                   {"dtype": ["U8"], "shape": [3], "data_offsets": [0, 3]}])
def test_odd_safetensors_header_entries_are_rejected(entry, tmp_path):
    """fuzz_enec: an embedded header entry with one data offset raised IndexError from every
    reader; dimensions that are floats, infinite or 2**64 and unhashable dtypes are rejected too."""
    import torch

    src = _saved({"x": torch.arange(3, dtype=torch.uint8)})
    path = tmp_path / "odd.enec"
    path.write_bytes(forge(src, header=lambda h: h.update(x=entry)))
    for reader, read in READERS.items():
        with pytest.raises(enec.EnecError):
            read(path)


@pytest.mark.parametrize("name", sorted(FORGED))
def test_committed_forgeries_are_the_documented_ones(name):
    assert (ADV / name).read_bytes() == FORGED[name](), f"regenerate {name} with write_adversarial()"
