"""The analytical latency model the controller and the profile library share.

For a KV payload of ``V`` bytes, a link of ``B`` Mbps (1 Mbps = 125 bytes/ms) and a profile
with compression ratio ``cr`` and codec speeds ``S_enc`` / ``S_dec`` (bf16 MB per second,
1 MB = 1e6 bytes)::

    T   = T_model + V/S_enc + V/(B*cr) + V/S_dec      (compressed)
    T_0 = T_model + V/B                              (uncompressed bf16)

Compression helps iff ``B < B* = (1 - 1/cr) / (1/S_enc + 1/S_dec)`` (in bytes/s; reported in
Mbps). Per MB of KV a profile costs ``a + 8000*x`` ms with ``a = 1000/S_enc + 1000/S_dec``
and ``x = 1/(B*cr)``-scaled transfer, i.e. a line in ``1/B``; the lower envelope of those
lines gives the bandwidth intervals in which each candidate is optimal
(:func:`kvserve.library.optimal_intervals`, independent of ``V`` and ``T_model``).
"""
from __future__ import annotations

import math

BYTES_PER_MS_PER_MBPS = 125.0  # 1 Mbps = 1e6 bit/s = 125 bytes per ms
#: SmolLM2-135M: 30 layers x (K, V) x 3 kv heads x 64 dims x 2 bytes = 23040 bytes per token
SMOLLM2_KV_BYTES_PER_TOKEN = 23040
DEFAULT_KV_BYTES = SMOLLM2_KV_BYTES_PER_TOKEN * 1024


def transfer_ms(kv_bytes: float, bandwidth_mbps: float, ratio: float = 1.0) -> float:
    """Time to send ``kv_bytes / ratio`` bytes over ``bandwidth_mbps``."""
    if bandwidth_mbps <= 0:
        return math.inf
    return kv_bytes / ratio / (bandwidth_mbps * BYTES_PER_MS_PER_MBPS)


def codec_ms(kv_bytes: float, encode_MBps: float, decode_MBps: float) -> float:
    """Encode at the sender plus decode at the receiver (speeds in bf16 MB/s)."""
    return kv_bytes / (encode_MBps * 1e3) + kv_bytes / (decode_MBps * 1e3)


def predict_ms(kv_bytes: float, bandwidth_mbps: float, ratio: float, encode_MBps: float,
               decode_MBps: float, t_model_ms: float = 0.0) -> float:
    """``T = T_model + V/S_enc + V/(B*cr) + V/S_dec`` in ms."""
    return t_model_ms + codec_ms(kv_bytes, encode_MBps, decode_MBps) + transfer_ms(kv_bytes, bandwidth_mbps, ratio)


def uncompressed_ms(kv_bytes: float, bandwidth_mbps: float, t_model_ms: float = 0.0) -> float:
    """``T_0 = T_model + V/B`` in ms."""
    return t_model_ms + transfer_ms(kv_bytes, bandwidth_mbps)


def breakeven_mbps(ratio: float, encode_MBps: float, decode_MBps: float) -> float:
    """Bandwidth below which the profile beats sending bf16 (0 if it never does)."""
    if ratio <= 1.0:
        return 0.0
    sec_per_byte = 1.0 / (encode_MBps * 1e6) + 1.0 / (decode_MBps * 1e6)
    return (1.0 - 1.0 / ratio) / sec_per_byte * 8 / 1e6
