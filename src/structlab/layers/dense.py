"""Plain dense linear layer behind the structured-layer interface."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from structlab.layers.base import StructuredLinear
from structlab.layers.registry import register_layer


@register_layer("dense")
class DenseLinear(StructuredLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        self.reset_bias()

    def _init_from_dense(self, weight: torch.Tensor, plan: None = None) -> None:
        self.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def macs_per_token(self) -> int:
        return self.in_features * self.out_features
