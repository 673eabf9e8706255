"""``nvcomp``: NVIDIA nvCOMP's GPU compressors (ANS, Bitcomp, ...) as a codec stage, device only.

KVServe's reference pairs its quantizers with nvCOMP ANS. This stage stores the symbol bytes
(uint8 symbols, or bf16 words for the passthrough) as nvCOMP's native bitstream
(``nvidia-nvcomp-cu13``, imported only when a GPU encodes or decodes). There is no CPU
implementation: a CPU reader refuses such a bundle with a :class:`KVServeError` that says
so, before it touches the payload. The portable entropy stage is ``irans``.
"""
from __future__ import annotations

import numpy as np

from ..errors import KVServeError
from .base import register
from .codecs import Codec

ALGORITHMS = ("ANS", "Bitcomp", "Cascaded", "LZ4", "Snappy", "GDeflate", "Deflate", "Zstd")


def _nvcomp():
    try:
        from nvidia import nvcomp
    except ImportError as exc:
        raise KVServeError(f"codec 'nvcomp' needs the nvidia-nvcomp-cu13 package: {exc}") from exc
    return nvcomp


def _to_torch(arr, device):
    """An nvCOMP array as a flat uint8 torch tensor (DLPack, else the CUDA array interface)."""
    import torch

    try:
        t = torch.from_dlpack(arr)
    except Exception:  # noqa: BLE001 - older nvCOMP arrays: the CUDA array interface
        t = torch.as_tensor(arr, device=device)
    return t.reshape(-1).view(torch.uint8)


@register
class NVCOMP(Codec):
    """nvCOMP ``algorithm`` on the symbol bytes (GPU only; ``kvserve.decode(..., device="cuda")``)."""

    stage_id = "nvcomp"
    params = {"algorithm": "ANS"}
    device_only = True

    def validate(self):
        if self.algorithm not in ALGORITHMS:
            raise KVServeError(f"nvcomp: algorithm must be one of {list(ALGORITHMS)}")

    def _refuse(self):
        raise KVServeError("codec 'nvcomp' runs only on a CUDA device: encode a KV held on the GPU, "
                           "decode with kvserve.decode(data, device='cuda')")

    def encode(self, arr, bits, threads=1):
        self._refuse()

    def decode(self, buf, count, bits, threads=1):
        self._refuse()

    # device side (kvserve.stages.gpu calls these with CUDA tensors)

    def encode_device(self, sym, bits):
        import torch

        nv = _nvcomp()
        data = sym.contiguous().reshape(-1).view(torch.uint8)
        enc = nv.Codec(algorithm=self.algorithm).encode(nv.as_array(data))
        return _to_torch(enc, sym.device)[:int(enc.buffer_size)].clone()

    def decode_device(self, buf, count, bits, device):
        import torch

        nv = _nvcomp()
        src = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy()).to(device)
        try:
            dec = nv.Codec(algorithm=self.algorithm).decode(nv.as_array(src))
            out = _to_torch(dec, device)[:int(dec.buffer_size)].clone()
        except Exception as exc:  # nvCOMP reports bad streams as its own exceptions
            raise KVServeError(f"nvcomp: corrupt stream ({exc})") from exc
        item = 2 if bits == 16 else 1
        if out.numel() != count * item:
            raise KVServeError("nvcomp: decoded size mismatch")
        return out.view(torch.int16) if bits == 16 else out
