"""svd: low-rank linear layer y = A(Bx) + b, two skinny GEMMs costing k(m+n) MACs per token."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from structlab.budget import DEFAULT_BUDGET, allocate_ranks, rank_from_budget
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

    Active rank. `truncate` (the svd re-allocation of `structlab.callbacks.SVDReallocate`) lowers a
    layer's rank during training without changing its parameter shapes (DDP buckets, compiled graphs
    and optimizer state depend on them): the parameters keep room for `capacity` = k columns, only the
    first `rank` of them are in use and the rest are zero. The active rank is then a buffer
    `active_rank` (in the state dict, so a resume or a plain `load_state_dict` restores it) and a
    structure key, so a rebuild from a checkpoint or structure.json has the same shapes and ranks.
    The forward, `macs_per_token`, `num_params` and `dense_weight` use the active columns only; the
    inactive entries get exactly zero gradients, `export` slices them away. A layer whose columns
    are all active (the default) has no such buffer and runs exactly the code it always did.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int | None = None,
        budget: float | None = None,
        rank_multiple: int = 8,
        active_rank: int | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        k = resolve_rank(out_features, in_features, rank, budget, rank_multiple)
        self.A = nn.Parameter(torch.empty(out_features, k))
        self.B = nn.Parameter(torch.empty(k, in_features))
        self._active: int | None = None  # None: all k columns in use (no buffer)
        self.reset_parameters()
        if active_rank is not None:
            with torch.no_grad():  # the init is an SVD ordered by σ: its first columns are its truncation
                self._set_active(int(active_rank))

    @property
    def rank(self) -> int:
        """The rank in use (the active rank); `capacity` is the rank the parameters have room for."""
        return self.A.shape[1] if self._active is None else self._active

    @property
    def capacity(self) -> int:
        return self.A.shape[1]

    def _set_active(self, rank: int | None) -> None:
        """Mark columns ≥ `rank` of A (rows of B) inactive and zero them; None or the capacity: all active."""
        k = self.capacity if rank is None else int(rank)
        if not 1 <= k <= self.capacity:
            raise ValueError(f"active rank must lie in [1, {self.capacity}] for this layer, got {rank}")
        self.A.data[:, k:].zero_()
        self.B.data[k:].zero_()
        if k == self.capacity:
            self._active = None
            self._buffers.pop("active_rank", None)
            return
        self._active = k
        if "active_rank" in self._buffers:
            self.active_rank.fill_(k)
        else:
            self.register_buffer("active_rank", torch.tensor(k, device=self.A.device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # the active rank comes with the factors: registered (or dropped) before the copy, so a state
        # dict of a truncated layer loads into a layer built at full rank, and the other way round
        if prefix + "A" in state_dict:
            saved = state_dict.get(prefix + "active_rank")
            self._active = None if saved is None else int(saved)
            if saved is None:
                self._buffers.pop("active_rank", None)
            elif "active_rank" not in self._buffers:
                self.register_buffer("active_rank", torch.tensor(int(saved), device=self.A.device))
            if self._active is not None and not 1 <= self._active < self.capacity:
                errors.append(f"{prefix}active_rank={self._active} is outside [1, {self.capacity})")
                self._active = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            w = torch.empty(self.out_features, self.in_features, device=self.A.device)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default
            self._init_from_dense(w)
        self.reset_bias()

    def _init_from_dense(self, weight: torch.Tensor, plan: None = None) -> None:
        k = self.rank  # the active columns; any others stay zero
        a, b = plain_svd(weight, k)
        self.A[:, :k] = a
        self.B[:k] = b
        self.A[:, k:] = 0
        self.B[k:] = 0

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
        k = self._active
        if k is None:
            return F.linear(F.linear(x, self.B), self.A, self.bias)
        return F.linear(F.linear(x, self.B[:k]), self.A[:, :k], self.bias)

    def dense_weight(self) -> torch.Tensor:
        if self._active is None:
            return self.A @ self.B
        return self.A[:, : self._active] @ self.B[: self._active]

    def macs_per_token(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def num_params(self) -> int:
        """Parameters in use: the active factors and the bias (the inactive zero columns are not counted)."""
        return self.rank * (self.in_features + self.out_features) + (
            0 if self.bias is None else self.bias.numel()
        )

    def structure(self) -> dict[str, Any]:
        if self._active is None:
            return {"rank": self.rank}
        return {"rank": self.capacity, "active_rank": self._active}

    # --- re-allocation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _factored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q_a, Q_b, U, S, Vᵀ) in float64 with A_k B_k = (Q_a U) diag(S) (Q_b V)ᵀ, from the QR
        factors of A_k and B_kᵀ and the SVD of the small k×k R_a R_bᵀ: exact, O((m+n)k²)."""
        k = self.rank
        qa, ra = torch.linalg.qr(self.A[:, :k].detach().double())
        qb, rb = torch.linalg.qr(self.B[:k].detach().double().T)
        u, s, vh = torch.linalg.svd(ra @ rb.T)
        return qa, qb, u, s, vh

    @torch.no_grad()
    def spectrum(self) -> torch.Tensor:
        """σ² of the current product A·B (float64, descending, one per active rank): the energy each
        truncation loses, as `structlab.budget.allocate_ranks` takes it."""
        k = self.rank
        ra = torch.linalg.qr(self.A[:, :k].detach().double(), mode="r")[1]
        rb = torch.linalg.qr(self.B[:k].detach().double().T, mode="r")[1]
        return torch.linalg.svdvals(ra @ rb.T).square()

    @torch.no_grad()
    def truncate(self, rank: int) -> None:
        """Re-factor the current product A·B to its best rank-`rank` approximation (Eckart–Young):
        A = U_r √S_r, B = √S_r V_rᵀ in the first `rank` columns / rows, zeros after them, active
        rank `rank`. The parameter shapes do not change. Only shrinks (or keeps) the rank: the factors
        hold no direction beyond their current rank to grow into."""
        if not 1 <= rank <= self.rank:
            raise ValueError(
                f"truncate can only keep or lower the rank: got {rank} for a layer at rank {self.rank}"
            )
        qa, qb, u, s, vh = self._factored()
        root = s[:rank].sqrt()
        a = (qa @ u[:, :rank]) * root
        b = root[:, None] * (vh[:rank] @ qb.T)
        self.A[:, :rank] = a.to(self.A.dtype)
        self.B[:rank] = b.to(self.B.dtype)
        self._set_active(rank)

    def set_factors(self, a: torch.Tensor, b: torch.Tensor, rank: int) -> None:
        """Install factors of this layer's full shapes at active rank `rank` (what another DDP rank's
        `truncate` produced); columns of `a` / rows of `b` beyond `rank` are zeroed."""
        with torch.no_grad():
            self.A.copy_(a)
            self.B.copy_(b)
            self._set_active(rank)

    def export(self) -> nn.Module:
        """The inference form (x Bᵀ, then Aᵀ) at the active rank: a truncated layer becomes a layer of
        that rank (the inactive columns sliced away); the factors made contiguous for fast GEMMs."""
        if self._active is not None:
            k = self._active
            with torch.device("meta"):  # no init: every parameter is replaced below
                layer = type(self)(self.in_features, self.out_features, bias=self.bias is not None, rank=k)
            layer.A = nn.Parameter(self.A.detach()[:, :k].clone(), self.A.requires_grad)
            layer.B = nn.Parameter(self.B.detach()[:k].clone(), self.B.requires_grad)
            if self.bias is not None:
                layer.bias = nn.Parameter(self.bias.detach().clone(), self.bias.requires_grad)
            layer.train(self.training)
            return layer
        with torch.no_grad():
            for p in (self.A, self.B):
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
        return self

    def extra_repr(self) -> str:
        of = "" if self._active is None else f" of {self.capacity}"
        return f"{super().extra_repr()}, rank={self.rank}{of}"


def reallocated_ranks(
    layers: Mapping[str, LowRankLinear], budget: float, multiple: int = 8
) -> dict[str, int]:
    """New ranks for low-rank layers under one global budget β (Σ k(m+n) ≤ β·Σ mn over `layers`),
    from the σ² of each layer's current product A·B, by `structlab.budget.allocate_ranks`.

    Plain energy only: the training module keeps no calibration inputs, so there is no Gram matrix to
    whiten with. A layer's rank can only shrink or stay: A·B has no energy beyond its current rank,
    so `allocate_ranks` gains nothing by a step past it (such steps sort last) and any rank it still
    gives above the current one (a step's rounding up to `multiple`, or "dense" when budget is left)
    becomes the current rank, at most the break-even rank ⌊mn/(m+n)⌋. Each layer costs at most what
    `allocate_ranks` charged it, so the result stays within β. Deterministic (float64, in name order).
    """
    shapes = {name: (la.out_features, la.in_features) for name, la in layers.items()}
    energies = {name: la.spectrum() for name, la in layers.items()}
    ranks = allocate_ranks(shapes, energies, budget, multiple)
    out = {}
    for name, la in layers.items():
        m, n = shapes[name]
        even = max(1, min(m, n, m * n // (m + n)))  # allocate_ranks' last rank before "dense"
        given = ranks[name]
        out[name] = min(la.rank, even if given is None else given)
    return out
