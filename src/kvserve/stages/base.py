"""Stage contract and registry.

A KV-compression pipeline (KVServe, arXiv 2605.13734) is an ordered list of stages:

``transform`` -> ``quantizer`` -> ``codec``

Every stage is a small class with

* ``kind``: one of ``"transform"``, ``"quantizer"``, ``"codec"``;
* ``stage_id``: the unique name under which the registry finds it;
* ``get_config()``: a JSON-serialisable dict ``{"id": stage_id, **params}`` that *is* the
  stage's identity (two stages with equal configs behave identically);
* ``from_config(config)``: the inverse, validating every parameter and raising
  :class:`kvserve.KVServeError` on anything it does not understand.

Tensor conventions used by transforms and quantizers: a *group* is a stack of layers that
share one shape, ``x`` of shape ``(n, B, H, T, D)`` in float32 (n layers, batch, kv heads,
tokens, head_dim), with ``layer_ids`` (n ints) naming the model layers in the stack.
"""
from __future__ import annotations

from typing import Any, ClassVar

from ..errors import KVServeError

_REGISTRY: dict[tuple[str, str], type["Stage"]] = {}


class Stage:
    """Base of all stages. Subclasses declare ``kind``, ``stage_id`` and ``params``.

    ``params`` maps each parameter name to its default; the constructor accepts exactly
    those keyword arguments and ``validate()`` checks them.
    """

    kind: ClassVar[str] = ""
    stage_id: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.params)
        if unknown:
            raise KVServeError(f"{self.kind} {self.stage_id!r}: unknown parameter(s) {sorted(unknown)}")
        for name, default in self.params.items():
            value = kwargs.get(name, default)
            if isinstance(value, list):
                value = list(value)
            setattr(self, name, value)
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden where needed
        """Raise :class:`KVServeError` if the parameters are invalid."""

    def get_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"id": self.stage_id}
        for name in self.params:
            cfg[name] = getattr(self, name)
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Stage":
        if not isinstance(config, dict):
            raise KVServeError(f"{cls.kind} config must be a dict, got {type(config).__name__}")
        cfg = dict(config)
        sid = cfg.pop("id", cls.stage_id)
        if sid != cls.stage_id:
            raise KVServeError(f"config id {sid!r} does not match {cls.stage_id!r}")
        return cls(**cfg)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((self.kind, repr(sorted(self.get_config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "id")
        return f"{type(self).__name__}({args})"


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator adding a stage to the registry under ``(kind, stage_id)``."""
    key = (cls.kind, cls.stage_id)
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise KVServeError(f"duplicate stage {key}")
    _REGISTRY[key] = cls
    return cls


def get_stage(kind: str, config: dict[str, Any] | str | None) -> Stage:
    """Build a stage of ``kind`` from its config dict (or a bare id string; None = the no-op stage)."""
    if config is None:
        config = {"id": "none" if kind != "transform" else "identity"}
    if isinstance(config, str):
        config = {"id": config}
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise KVServeError(f"{kind} config must be a dict with a string 'id'")
    cls = _REGISTRY.get((kind, config["id"]))
    if cls is None:
        known = sorted(sid for k, sid in _REGISTRY if k == kind)
        raise KVServeError(f"unknown {kind} {config['id']!r}; known: {known}")
    return cls.from_config(config)


def registered(kind: str | None = None) -> list[type[Stage]]:
    """All registered stage classes (of one kind if given)."""
    return [c for (k, _), c in sorted(_REGISTRY.items()) if kind is None or k == kind]
