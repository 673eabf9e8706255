#!/usr/bin/env bash
# Sets up a fresh machine, compresses a real checkpoint and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m enec.demo "$@"
# KVServe in prefill/decode-disaggregated serving: two worker processes, KV over a paced link
kvserve demo
