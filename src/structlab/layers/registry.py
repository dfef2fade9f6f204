"""Short names → layer classes. Configs say `layer=<name>`; this is the only lookup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from structlab.layers.base import StructuredLinear

LAYERS: dict[str, type[StructuredLinear]] = {}


def register_layer(name: str) -> Callable[[type[StructuredLinear]], type[StructuredLinear]]:
    def add(cls: type[StructuredLinear]) -> type[StructuredLinear]:
        if name in LAYERS:
            raise ValueError(f"layer type {name!r} is registered twice")
        cls.layer_name = name
        LAYERS[name] = cls
        return cls

    return add


def layer_class(name: str) -> type[StructuredLinear]:
    try:
        return LAYERS[name]
    except KeyError:
        raise ValueError(
            f"unknown layer type {name!r}; valid layer types: {', '.join(sorted(LAYERS))}"
        ) from None


def make_layer(name: str, in_features: int, out_features: int, **kw: Any) -> StructuredLinear:
    """Public entry point: a working layer of type `name` from defaults alone."""
    return layer_class(name)(in_features, out_features, **kw)
