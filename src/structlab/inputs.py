"""How a model is called with one batch of inputs, whatever form the task gives them in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def call_model(model: nn.Module, inputs: Any) -> Any:
    """model(**inputs) for a dict, model(*inputs) for a tuple, model(inputs) otherwise."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)
