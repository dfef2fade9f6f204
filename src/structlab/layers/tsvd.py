"""tsvd: ternary SVD layer W = U diag(s) V with U, V ∈ {−1, 0, +1} (docs/methods.md §4).

Two modes. Post-training (default): the ternary factors are fixed int8 buffers, only the scales s
(and the bias) train. Quantisation-aware (`qat=True`): a latent dense `weight` trains; the forward
uses its ternary reconstruction with a straight-through estimator, and `redecompose()` (call it
after every optimizer step) re-decomposes the latent weight, warm-started from the surviving atoms.
The latent weight is never overwritten, so updates too small to change the ternary factors
accumulate in it until they do.

Cost (the TSVD paper's count): a ternary factor costs 0 multiplications and 1 addition per non-zero,
diag(s) costs r multiplications. For structlab's single MAC budget a tsvd layer is charged
additions/2 + multiplications (an addition is about half a multiply-accumulate).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from structlab.budget import check_budget
from structlab.compress.ternary import COS_THRESH, ternary_decompose
from structlab.layers.base import StructuredLinear, dense_parts
from structlab.layers.registry import register_layer


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack a ternary matrix (rows × r) along its last axis, 4 entries per byte (0→0, +1→1, −1→2)."""
    rows, r = t.shape
    codes = (t > 0).to(torch.uint8) | ((t < 0).to(torch.uint8) << 1)
    codes = F.pad(codes, (0, (-r) % 4)).reshape(rows, -1, 4)  # reshape: t may be a transposed view
    return (codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)).contiguous()


def unpack_ternary(packed: torch.Tensor, r: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `pack_ternary`: (rows × ⌈r/4⌉) uint8 → (rows × r) values in `dtype`."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    codes = codes.reshape(packed.shape[0], -1)[:, :r]  # reshape: elementwise ops keep a transposed layout
    return (codes & 1).to(dtype) - (codes >> 1).to(dtype)


def _compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The dtype the GEMMs will run in: autocast's when it is on, else the input's."""
    kind = x.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError):  # torch < 2.5 spells these per device
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype if x.is_floating_point() else fallback


def _ternary_linear(
    x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (u diag(s) v)ᵀ + b by whichever is cheaper for this call: two skinny GEMMs through the rank,
    or materialising the m×n matrix once (a rank above the break-even makes the skinny path dearer)."""
    m, r = u.shape
    n = v.shape[1]
    tokens = x.numel() // n
    if tokens * r * (m + n) <= r * m * n + tokens * m * n:
        return F.linear(F.linear(x, v) * s, u, bias)
    return F.linear(x, (u * s) @ v, bias)


class PackedTernaryLinear(nn.Module):
    """Inference form of a tsvd layer: ternary factors stored 2 bits per entry, unpacked per call."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.rank = u.shape
        self.in_features = v.shape[1]
        self.register_buffer("u_packed", pack_ternary(u))
        self.register_buffer("vt_packed", pack_ternary(v.T))
        self.register_buffer("scale", s.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(U as out×r, V as r×in) in `dtype`."""
        u = unpack_ternary(self.u_packed, self.rank, dtype)
        v = unpack_ternary(self.vt_packed, self.rank, dtype).T
        return u, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, self.scale.dtype)
        u, v = self.factors(dtype)
        return _ternary_linear(x, u, self.scale.to(dtype), v, self.bias)

    def nbytes(self) -> int:
        """Bytes of the stored form: packed factors, scales and bias."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@register_layer("tsvd")
class TernaryLinear(StructuredLinear):
    """W = U diag(s) V, U ∈ {−1,0,1}^{out×r}, V ∈ {−1,0,1}^{r×in}, rank set by `tolerance` or `max_rank`.

    From scratch it decomposes a standard nn.Linear init. Given `rank` (what `structure()` saves) it
    only allocates factors of that rank (random ternary, dense-init variance) for a state dict to fill.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        tolerance: float = 0.05,
        max_rank: int | None = None,
        rank: int | None = None,
        qat: bool = False,
        cos_thresh: float = COS_THRESH,
        steps: int = 20,
        refine: int = 3,
        prune_rate: float = 5.0,
        budget: float | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if budget is not None:
            check_budget(budget)
        self.budget = budget  # cap on the charged cost (macs_per_token) as a fraction of the dense MACs
        # No budget here: the size follows the tolerance (≥ 1 accepts W ≈ 0, i.e. rank 0 or 1) or the caps.
        if not 0 < tolerance < 1:
            raise ValueError(
                f"layer.tolerance={tolerance} is outside (0, 1): it is the spectral relative error the "
                "decomposition stops at; set e.g. layer.tolerance=0.05 (smaller: larger rank)"
            )
        for key, value in (("max_rank", max_rank), ("rank", rank)):
            if value is not None and int(value) < 1:
                raise ValueError(f"layer.{key}={value} must be ≥ 1 (or null)")
        self.tolerance, self.max_rank, self.qat = float(tolerance), max_rank, bool(qat)
        self.cos_thresh, self.steps, self.refine, self.prune_rate = cos_thresh, steps, refine, prune_rate
        w0 = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(w0, a=math.sqrt(5))  # nn.Linear's default
        if qat:
            self.weight = nn.Parameter(w0.clone())
        if rank is None:
            self._set_factors(*self._decompose(w0))
        else:
            self._set_factors(*self._random_factors(int(rank), w0.var()))
        self.reset_bias()

    # --- factors ------------------------------------------------------------------------------
    def _decompose(
        self, w: torch.Tensor, init: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ternary_decompose(
            w.float(),
            tolerance=self.tolerance,
            steps=self.steps,
            cos_thresh=self.cos_thresh,
            max_rank=self.max_rank,
            refine=self.refine,
            init=init,
            prune_rate=self.prune_rate if init is not None else None,
            max_cost=None if self.budget is None else self.budget * self.in_features * self.out_features,
        )

    def _random_factors(self, r: int, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u = torch.randint(-1, 2, (self.out_features, r)).float()
        v = torch.randint(-1, 2, (r, self.in_features)).float()
        s = torch.full((r,), float(var.sqrt()) / math.sqrt(max(r, 1) * 4 / 9))
        return u, s, v

    def _set_factors(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
        """Install factors of any rank (buffers and scale are replaced, not copied into)."""
        self.register_buffer("u", u.to(torch.int8).contiguous())
        self.register_buffer("v", v.to(torch.int8).contiguous())
        s = s.detach().float()
        if self.qat:  # the scales are refit by every re-decomposition, not trained
            self.register_buffer("scale", s)
        else:
            self.scale = nn.Parameter(s)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Accept factors of another rank (QAT changes the rank; a resumed run rebuilds at the initial one)."""
        u, s, v = (state_dict.get(prefix + k) for k in ("u", "scale", "v"))
        if u is not None and s is not None and v is not None and u.shape[1] != self.rank:
            dev = self.u.device
            self._set_factors(
                torch.zeros_like(u, device=dev),
                torch.zeros_like(s, device=dev),
                torch.zeros_like(v, device=dev),
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_dense(cls, module: nn.Module, **kw: Any) -> TernaryLinear:
        """Decompose a dense layer (nn.Linear, HF Conv1D, structured layer); `rank` acts as `max_rank`."""
        weight, bias = dense_parts(module)
        weight = weight.detach()
        rank = kw.pop("rank", None)
        if rank is not None and kw.get("max_rank") is None:
            kw["max_rank"] = rank
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, rank=1, **kw)
        layer.to(device=weight.device)
        with torch.no_grad():
            layer._init_from_dense(weight.float().contiguous())
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer.to(dtype=weight.dtype)

    def _init_from_dense(self, weight: torch.Tensor, plan: None = None) -> None:
        if self.qat:
            self.weight.copy_(weight)
        self._set_factors(*self._decompose(weight))

    @torch.no_grad()
    def redecompose(self) -> None:
        """QAT: re-decompose the latent weight, keeping surviving atoms (call after optimizer.step())."""
        if not self.qat:
            raise RuntimeError("redecompose() needs a quantisation-aware layer (qat=True)")
        u, s, v = self._decompose(self.weight, init=(self.u, self.v))
        self._set_factors(u.to(self.weight.device), s.to(self.weight.device), v.to(self.weight.device))

    # --- compute ------------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, s, V) as float tensors in the scale's dtype."""
        return self.u.to(self.scale.dtype), self.scale, self.v.to(self.scale.dtype)

    def dense_weight(self) -> torch.Tensor:
        u, s, v = self.factors()
        return (u * s) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qat:  # forward with the ternary weight, gradient to the latent one
            w = self.weight + (self.dense_weight().to(self.weight.dtype) - self.weight).detach()
            return F.linear(x, w, self.bias)
        u, s, v = self.factors()
        return _ternary_linear(x, u, s, v, self.bias)

    # --- reporting ----------------------------------------------------------------------------
    def mul_add_per_token(self) -> tuple[int, int]:
        """(multiplications, additions) per token, counted as the TSVD paper: r and nnz(U) + nnz(V)."""
        return self.rank, int((self.u != 0).sum()) + int((self.v != 0).sum())

    def macs_per_token(self) -> int:
        """Budget charge: ⌈additions/2⌉ + multiplications (an addition counts as half a MAC)."""
        mul, add = self.mul_add_per_token()
        return (add + 1) // 2 + mul

    def structure(self) -> dict[str, Any]:
        return {"rank": self.rank, "qat": self.qat, "tolerance": self.tolerance}

    def export(self) -> PackedTernaryLinear:
        u, s, v = self.factors()
        return PackedTernaryLinear(u.detach(), s.detach(), v.detach(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, tolerance={self.tolerance}, qat={self.qat}"
