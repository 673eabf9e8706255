#!/usr/bin/env bash
# The prepared GPU run (issue 19), one command of at most 8 minutes: the environment, the GPU
# tests compiled (not interpreted), ENEC's Triton codec against nvCOMP and a device copy
# (gpu_bench.py), GPU-resident and offloaded inference (gpu_inference.py) and the KV codec
# on the GPU (kvserve_gpu_bench.py). Results land in OUT: env.json, gpu_bench.json,
# gpu_inference.json, kvserve_gpu_bench.json (+ .png) and suite.log (every step's output).
#
#   bash benchmarks/gpu_suite.sh OUT            # the GPU machine; carry ["wheels", ".benchdata"]
#   bash benchmarks/gpu_suite.sh OUT --dry-run  # here, no GPU: the same steps, tiny, interpreted
#
# Before a GPU session, here (both folders are git-ignored; about 50 MB together):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d wheels nvidia-nvcomp-cu13==6.0.0.12 nvidia-libnvcomp-cu13==6.0.0.12
#   PYTHONPATH=src python benchmarks/gpu_bench.py --prepare .benchdata
#   PYTHONPATH=src python benchmarks/kvserve_gpu_bench.py --prepare .benchdata
# Each step has its own time limit; a step that fails or runs out is recorded and the next one
# runs (steps.jsonl in suite.log's last lines).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUT [--dry-run]}
DRY=${2:-}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
export PYTHONPATH=src
if compgen -G "wheels/*.whl" > /dev/null; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl \
            >> "$LOG" 2>&1; then
        export PYTHONPATH=/tmp/site:src
    else
        echo "wheels/ did not install: nvCOMP rows will be missing" | tee -a "$LOG"
    fi
fi
START=$(date +%s)
STATUS=""

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s, at $(( $(date +%s) - START )) s)" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "   $name: exit $rc" | tee -a "$LOG"
    STATUS="$STATUS{\"step\": \"$name\", \"exit\": $rc, \"limit_s\": $limit}, "
}

step env 60 $PY - "$OUT" <<'EOF'
import json, platform, sys
out = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
               device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               capability=list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None)
except Exception as exc:
    out["torch_error"] = repr(exc)
for mod in ("triton", "numba", "nvidia.nvcomp", "enec", "kvserve"):
    try:
        m = __import__(mod, fromlist=["x"])
        out[mod] = getattr(m, "__version__", "imported")
    except Exception as exc:
        out[mod] = f"missing: {exc!r}"[:200]
json.dump(out, open(sys.argv[1] + "/env.json", "w"), indent=1)
print(json.dumps(out, indent=1))
EOF

if [ "$DRY" = "--dry-run" ]; then
    # no GPU here: the GPU tests run in Triton's interpreter (their files set it), the
    # benchmarks on tiny sizes through every code path
    step tests 240 $PY -m pytest -q -x -p no:cacheprovider tests/enec/test_gpu.py tests/kvserve/test_kv_gpu.py
    step gpu_bench 300 $PY benchmarks/gpu_bench.py --dry-run --out "$OUT"
    step gpu_inference 300 $PY benchmarks/gpu_inference.py --dry-run --out "$OUT"
    step kvserve_gpu_bench 300 $PY benchmarks/kvserve_gpu_bench.py "$OUT" --dry-run
else
    # compiled: with CUDA present the test files do not set TRITON_INTERPRET
    step tests 100 env -u TRITON_INTERPRET $PY -m pytest -q -x -p no:cacheprovider \
        tests/enec/test_gpu.py tests/kvserve/test_kv_gpu.py
    step gpu_bench 110 $PY benchmarks/gpu_bench.py --out "$OUT" --iters 5 --warmup 2
    step gpu_inference 90 $PY benchmarks/gpu_inference.py --out "$OUT" --big --repeats 2
    step kvserve_gpu_bench 130 $PY benchmarks/kvserve_gpu_bench.py "$OUT" --budget-s 100
fi
echo "steps: [${STATUS%, }]" | tee -a "$LOG"
echo "total $(( $(date +%s) - START )) s" | tee -a "$LOG"
