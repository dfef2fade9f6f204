"""svd: low-rank linear layer y = A(Bx) + b, two skinny GEMMs costing k(m+n) MACs per token."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from structlab.budget import DEFAULT_BUDGET, rank_from_budget
from structlab.compress.svd import asvd, falor, plain_svd, whitened_svd
from structlab.layers.base import StructuredLinear, dense_parts
from structlab.layers.registry import register_layer

METHODS = ("svd", "whitened_svd", "asvd", "falor")  # the data-aware ones need calibration statistics


def resolve_rank(m: int, n: int, rank: int | None, budget: float | None, rank_multiple: int) -> int:
    """The rank from exactly one of `rank` / `budget`; neither given means budget 0.5."""
    if rank is not None and budget is not None:
        raise ValueError(f"give rank or budget, not both (got rank={rank}, budget={budget})")
    if rank is None:
        return rank_from_budget(m, n, DEFAULT_BUDGET if budget is None else budget, rank_multiple)
    rank = int(rank)
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must lie in [1, {min(m, n)}] for a {m}×{n} layer, got {rank}")
    return rank


@register_layer("svd")
class LowRankLinear(StructuredLinear):
    """W = A B with A (out×k), B (k×in).

    The rank comes from `rank` or from `budget` β via `structlab.budget.rank_from_budget`; with
    neither, β = 0.5 (half the dense MACs). From scratch, A and B are the √Σ-split truncated SVD of
    a standard nn.Linear init, so activations have the usual scale at any rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int | None = None,
        budget: float | None = None,
        rank_multiple: int = 8,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        k = resolve_rank(out_features, in_features, rank, budget, rank_multiple)
        self.A = nn.Parameter(torch.empty(out_features, k))
        self.B = nn.Parameter(torch.empty(k, in_features))
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            w = torch.empty(self.out_features, self.in_features, device=self.A.device)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default
            self._init_from_dense(w)
        self.reset_bias()

    def _init_from_dense(self, weight: torch.Tensor, plan: None = None) -> None:
        a, b = plain_svd(weight, self.rank)
        self.A.copy_(a)
        self.B.copy_(b)

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        rank: int | None = None,
        budget: float | None = None,
        method: str = "svd",
        gram: torch.Tensor | None = None,
        abs_mean: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
        tokens: int = 0,
        alpha: float = 0.5,
        rank_multiple: int = 8,
    ) -> LowRankLinear:
        """Factor a dense layer (nn.Linear, HF Conv1D or any structured layer).

        method "svd": best weight approximation; "whitened_svd": best output approximation on the
        calibration inputs whose Gram matrix is `gram` (SVD-LLM); "asvd": columns scaled by
        `abs_mean`^alpha (ASVD); "falor": the top principal directions of the centred outputs (needs
        `gram`, `mean` and `tokens`; it also moves the bias). See structlab.compress.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
        weight, bias = dense_parts(module)
        weight = weight.detach()
        m, n = weight.shape
        k = resolve_rank(m, n, rank, budget, rank_multiple)
        w = weight if weight.dtype == torch.float64 else weight.float()
        if method in ("whitened_svd", "falor") and gram is None:
            raise ValueError(f"method={method!r} needs gram (see structlab.compress.CalibrationStats)")
        if method == "svd":
            a, b = plain_svd(w, k)
        elif method == "whitened_svd":
            a, b = whitened_svd(w, gram, k)
        elif method == "falor":
            if mean is None:
                raise ValueError(
                    "method='falor' needs mean and tokens (see structlab.compress.CalibrationStats)"
                )
            a, b, bias = falor(w, None if bias is None else bias.detach().float(), gram, mean, tokens, k)
        else:
            if abs_mean is None:
                raise ValueError("method='asvd' needs abs_mean (see structlab.compress.CalibrationStats)")
            a, b = asvd(w, abs_mean, k, alpha)
        with torch.device("meta"):  # skip the from-scratch SVD: every parameter is overwritten below
            layer = cls(n, m, bias=bias is not None, rank=k)
        layer = layer.to_empty(device=weight.device).to(dtype=weight.dtype)
        with torch.no_grad():
            layer.A.copy_(a)
            layer.B.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.A @ self.B

    def macs_per_token(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def structure(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def export(self) -> nn.Module:
        """Already the inference form (x Bᵀ, then Aᵀ); only makes the factors contiguous for fast GEMMs."""
        with torch.no_grad():
            for p in (self.A, self.B):
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
