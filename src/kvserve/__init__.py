"""KVServe: modular KV-cache compression (transform -> quantizer -> codec), arXiv 2605.13734.

>>> bundle = kvserve.encode(kv, "kvserve")      # kv: [(k, v), ...] bf16 (B, H, T, D)
>>> kv2, meta = kvserve.decode(bundle)          # KVServeError on any bad bundle
>>> kv2, meta = kvserve.decode(bundle, max_bytes=n)  # refuse (before decoding) more than n bytes of KV
"""
from .errors import KVServeError
from .pipeline import Pipeline, decode, encode, kv_from_cache, load_profile, profile_from_config, profile_names
from .stages.base import get_stage, registered

__all__ = ["KVServeError", "Pipeline", "decode", "encode", "get_stage", "kv_from_cache",
           "load_profile", "profile_from_config", "profile_names", "registered"]
