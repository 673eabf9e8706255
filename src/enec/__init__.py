"""ENEC: lossless compression of bf16/fp16/fp32 (and fp8) weights with a block-based
fixed-length exponent code (arXiv 2604.03298), with escapes so every bit pattern round-trips.

>>> import enec, torch
>>> w = torch.randn(4096, 4096, dtype=torch.bfloat16)
>>> blob = enec.compress(w)
>>> torch.equal(enec.decompress(blob), w)
True
"""

from .errors import EnecError

__all__ = ["compress", "decompress", "stream_info", "EnecError", "save_file", "load_file", "from_pretrained",
           "load_streamed", "make_resident"]
__version__ = "0.1.0"


def __getattr__(name):  # lazily: `import enec` alone loads neither numba nor torch
    if name in ("compress", "decompress", "stream_info"):
        from . import codec

        return getattr(codec, name)
    if name in ("save_file", "load_file"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name in ("from_pretrained", "load_streamed"):
        from . import hf

        return getattr(hf, name)
    if name == "make_resident":
        from .resident import make_resident

        return make_resident
    raise AttributeError(f"module 'enec' has no attribute {name!r}")
