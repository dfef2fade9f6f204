"""Model registry: `build_model(name, **kw)` for every architecture structlab knows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = fn
        return fn

    return add


def build_model(name: str, **kw: Any) -> nn.Module:
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}") from None
    return factory(**kw)
