"""Regenerate the golden bundles (only when the bundle format version changes on purpose).

    python tests/kvserve/make_golden.py            # all of them
    python tests/kvserve/make_golden.py NAME ...   # only these (add a new golden, keep the rest frozen)

Goldens are named after the profile they were made with; ``kvserve-tiers`` froze the
``kvserve`` profile of the calibrated-tiers era (pre-RoPE keys, precision tiers, compact
value stats, per-kind scores; on this 3-layer toy KV the tiers fall back to depth order).
"""
import hashlib
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from common import make_kv  # noqa: E402

import kvserve  # noqa: E402

DATA = pathlib.Path(__file__).with_name("data")
NAMED = ["bf16", "kivi-2", "kivi-4", "cachegen", "kvserve", "kvserve-tiers"]
PROFILE = {"kvserve-tiers": "kvserve"}  # golden name -> profile it was made with (default: same name)

if __name__ == "__main__":
    kv = make_kv(layers=3, heads=2, tokens=160, dim=32, seed=42)
    only = sys.argv[1:] or NAMED
    index = json.loads((DATA / "golden.json").read_text()) if sys.argv[1:] else {}
    for name in only:
        blob = kvserve.encode(kv, PROFILE.get(name, name), meta={"golden": name})
        (DATA / f"golden-{name}.kvsv").write_bytes(blob)
        out, _ = kvserve.decode(blob)
        digest = hashlib.sha256(b"".join(t.contiguous().view(torch.int16).numpy().tobytes() for p in out for t in p)).hexdigest()
        index[name] = {"bytes": len(blob), "sha256": digest}
    (DATA / "golden.json").write_text(json.dumps(index, indent=1) + "\n")
    print(json.dumps(index, indent=1))
