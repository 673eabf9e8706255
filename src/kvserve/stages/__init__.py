"""Stages of a KVServe pipeline: transforms, quantizers, codecs (see base.py for the contract)."""
from . import codecs, irans, nvcomp, quantizers, transforms  # noqa: F401  (register)
from .base import Stage, get_stage, register, registered

__all__ = ["Stage", "get_stage", "register", "registered"]
