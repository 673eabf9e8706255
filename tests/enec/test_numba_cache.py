"""numba's disk cache across processes (issue 16, item 12).

The codec's hot kernels are built by factories, one specialisation per (dtype, code width).
With the factory's shared function name, two specialisations compiled and cached by
*different* processes had the same mangled symbol, and a process loading both from the cache
could fail (``NRT_adapt_ndarray_to_python: 'descr' is NULL``). Each specialisation now has its
own name. Checked on a fresh cache directory: one process per dtype, then one using both.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, torch, enec
x = torch.randn(70000, generator=torch.Generator().manual_seed(0))
for name in sys.argv[1:]:
    t = x.to(getattr(torch, name))
    blob = enec.compress(t, threads=1)
    assert torch.equal(enec.decompress(blob, threads=1), t), name
print("ok", *sys.argv[1:])
"""


def _run(cache: Path, *dtypes: str) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *dtypes], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_specialisations_cached_by_different_processes_load_together(tmp_path):
    cache = tmp_path / "numba-cache"
    _run(cache, "bfloat16")
    _run(cache, "float16")
    assert _run(cache, "bfloat16", "float16").split() == ["ok", "bfloat16", "float16"]
    assert _run(cache, "float16", "bfloat16").split() == ["ok", "float16", "bfloat16"]
    # every cached specialisation has its own index file and its own mangled symbols
    nbi = sorted(p.name for p in cache.rglob("*.nbi") if "blocks" in p.name)
    assert any("bfloat16" in n for n in nbi) and any("float16" in n and "bfloat16" not in n for n in nbi), nbi
    symbols: dict[bytes, Path] = {}
    for nbc in cache.rglob("*.nbc"):
        if "blocks" not in nbc.name:
            continue
        # the kernel's own symbols (shared helpers it calls, e.g. hash_words, may repeat)
        for sym in set(re.findall(rb"_ZN4enec3cpu[0-9A-Za-z_]{8,400}", nbc.read_bytes())):
            if b"blocks" in sym or b"histograms" in sym:
                assert symbols.setdefault(sym, nbc) == nbc, f"{sym[:80]!r} in {symbols[sym].name} and {nbc.name}"
    assert symbols
