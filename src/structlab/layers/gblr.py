"""gblr: Gaudi-GBLR layer W = Σ_k diag(m_k^out) U_k V_kᵀ diag(m_k^in) (docs/methods.md §5).

Each of K components is a rank-r block whose rows and columns are soft boxes (Gaudi masks) with a
learnable width and location per axis. Training forward: the masked factors Ũ = U ⊙ M_out (m×Kr),
Ṽ = V ⊙ M_in (n×Kr) are cheap to form; per call we either materialise W = ŨṼᵀ (costs mnKr, then a
dense GEMM) or run the two skinny GEMMs x Ṽ Ũᵀ (T·Kr(m+n)), whichever is cheaper — never the K
per-component m×n products of the reference. The default materialised case (sharp boxes, rounding)
runs as one autograd node (gblr_box.py). Inference (`export()`) skips every zero block.

The mask math lives in gaudi.py, the cost/budget projection/dense fit in gblr_fit.py and the
inference form in gblr_export.py; this module re-exports their public names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from structlab.budget import check_budget
from structlab.layers.base import StructuredLinear, compute_dtype, set_optim
from structlab.layers.gaudi import _GaudiMasks, _grid, _ste_round, gaudi_mask
from structlab.layers.gblr_box import BoxGBLRLinear
from structlab.layers.gblr_export import GBLRInference
from structlab.layers.gblr_fit import BlockPlan, _rounded_macs, fit_to_dense, plan_blocks, project_widths
from structlab.layers.registry import register_layer

__all__ = ["GBLRInference", "GaudiGBLRLinear", "fit_to_dense", "gaudi_mask", "project_widths"]


@register_layer("gblr")
class GaudiGBLRLinear(StructuredLinear):
    """K components of rank r (defaults r = 1, K = min(in, out)), widths/locations per axis.

    `budget` (fraction of dense MACs, default 0.5; 1.0 = dense cost) sets the initial structure: a
    `full_share` of it goes to full-width components (the top singular directions), the rest to
    equal small blocks tiled over the matrix. `sigma=None` is the sharp box (exact zeros, what
    `export()` exploits); a float adds the Gaussian smoothing, and a callback may anneal
    `layer.sigma`. `rounding` snaps widths/locations to the 1/n grid with a straight-through
    estimator. `structure_lr` sets the learning rate of widths and locations (no weight decay,
    betas (0, 0.999) in any case). From a dense weight the structure and factors are fitted to it
    with `fit_steps` Adam steps under the budget.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        components: int | None = None,
        rank: int = 1,
        budget: float = 0.5,
        sigma: float | None = None,
        rounding: bool = True,
        structure_lr: float | None = None,
        full_share: float = 0.5,
        fit_steps: int = 300,
        min_width: float = 0.0,
        _scratch: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias)
        budget = check_budget(budget)
        self.components = int(components or min(in_features, out_features))
        self.rank_per_component = int(rank)
        self.budget, self.rounding, self.full_share = float(budget), bool(rounding), float(full_share)
        self.fit_steps, self.min_width = int(fit_steps), float(min_width)
        kr = self.components * self.rank_per_component
        self.U = nn.Parameter(torch.zeros(out_features, kr))
        self.V = nn.Parameter(torch.zeros(in_features, kr))
        self.widths = nn.Parameter(torch.zeros(2, self.components))  # [out, in]
        self.locations = nn.Parameter(torch.zeros(2, self.components))
        extra = {} if structure_lr is None else {"lr": structure_lr}
        for name in ("widths", "locations"):
            set_optim(self, name, weight_decay=0.0, betas=(0.0, 0.999), **extra)
        self.register_buffer("gaudi_sigma", torch.tensor(math.inf))
        self.sigma = sigma
        self._live_mask: torch.Tensor | None = None
        self._live: torch.Tensor | None = None
        if _scratch:  # from_dense passes False: its fit replaces all of this
            w0 = torch.empty(out_features, in_features)
            nn.init.kaiming_uniform_(w0, a=math.sqrt(5))  # nn.Linear's default
            with torch.no_grad():
                self._init_structure(self.budget)
                self._init_factors(w0, match_norm=True)
        self.reset_bias()

    @classmethod
    def from_dense(cls, module: nn.Module, **kw: Any) -> GaudiGBLRLinear:
        """Fitted to `module`'s weight (see `fit_to_dense`). The from-scratch init is skipped: its SVD of
        a random matrix runs on the CPU before the layer moves to the weight's device, and the fit
        overwrites every factor, width and location anyway."""
        return super().from_dense(module, _scratch=False, **kw)

    # --- σ as a plain attribute, stored in the state dict -------------------------------------
    @property
    def sigma(self) -> float | None:
        """Gaussian width of the masks (None: sharp box). Mirrored in Python so reading it never syncs."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float | None) -> None:
        self._sigma = None if value is None or math.isinf(value) else float(value)
        self.gaudi_sigma.fill_(math.inf if value is None else float(value))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._live_mask = self._live = None
        s = float(self.gaudi_sigma)
        self._sigma = None if math.isinf(s) else s

    # --- initialisation -----------------------------------------------------------------------
    def _init_structure(self, budget: float) -> None:
        """Widths/locations at `budget`: full-width components first, then equal tiled blocks."""
        m, n, r, k = self.out_features, self.in_features, self.rank_per_component, self.components
        units = budget * m * n / (r * (m + n))  # budget in full-width components
        n_full = min(k, int(units)) if units >= k else min(k, int(units * self.full_share))
        small = k - n_full
        widths = torch.zeros(2, k)
        locations = torch.zeros(2, k)
        widths[:, :n_full] = 1.0
        rest = units - n_full
        if small > 0 and rest > 0:
            frac = min(1.0, max(rest / small, 1.0 / min(m, n)))
            live = min(small, int(rest / frac + 1e-9))
            rows, cols = max(1, math.floor(frac * m)), max(1, math.floor(frac * n))
            tiles = max(1, math.floor(1.0 / frac))
            j = torch.arange(live)
            widths[0, n_full : n_full + live] = rows / m
            widths[1, n_full : n_full + live] = cols / n
            locations[0, n_full : n_full + live] = torch.round((j // tiles % tiles) * m / tiles) / m
            locations[1, n_full : n_full + live] = torch.round((j % tiles) * n / tiles) / n
        self.widths.copy_(widths)
        self.locations.copy_(locations)

    def _init_factors(
        self, weight: torch.Tensor, match_norm: bool, svd: tuple[torch.Tensor, ...] | None = None
    ) -> None:
        """Component k takes singular pairs kr…kr+r−1 of `weight` (√σ split; `svd`: its thin SVD when
        the caller has it); with `match_norm` the partial-width components are rescaled so that ‖W‖_F
        equals ‖weight‖_F (keeps a standard init's output scale)."""
        m, n, kr = self.out_features, self.in_features, self.U.shape[1]
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False) if svd is None else svd
        q = min(kr, s.numel())
        a = torch.randn(m, kr, device=weight.device) * 1e-3 * float(s[0].sqrt()) / math.sqrt(m)
        b = torch.randn(n, kr, device=weight.device) * 1e-3 * float(s[0].sqrt()) / math.sqrt(n)
        a[:, :q] = u[:, :q] * s[:q].sqrt()
        b[:, :q] = vh[:q].T * s[:q].sqrt()
        self.U.copy_(a)
        self.V.copy_(b)
        if not match_norm:
            return
        full = (self.widths >= 1).all(0).repeat_interleave(self.rank_per_component)
        mo, mi = self.masked_factors()
        w_full = mo[:, full] @ mi[:, full].T
        w_part = mo[:, ~full] @ mi[:, ~full].T
        aa, bb = float(w_part.square().sum()), float((w_full * w_part).sum())
        cc = float(w_full.square().sum() - weight.square().sum())
        if aa > 0 and bb * bb - aa * cc >= 0:
            alpha = (-bb + math.sqrt(bb * bb - aa * cc)) / aa
            if alpha > 0:
                self.U[:, ~full] *= math.sqrt(alpha)
                self.V[:, ~full] *= math.sqrt(alpha)

    @classmethod
    def plan_from_dense(cls, weight: torch.Tensor, **kw: Any) -> BlockPlan:
        """The block structure `from_dense` starts its fit from (`plan_blocks`): host work only."""
        with torch.device("meta"):  # only the resolved settings are needed, not the parameters
            shell = cls(weight.shape[1], weight.shape[0], _scratch=False, **kw)
        return plan_blocks(weight, shell.budget, shell.rank_per_component, shell.components)

    def _init_from_dense(self, weight: torch.Tensor, plan: BlockPlan | None = None) -> None:
        fit_to_dense(self, weight.contiguous(), self.budget, steps=self.fit_steps, plan=plan)

    # --- compute ------------------------------------------------------------------------------
    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_out (K×out), M_in (K×in)) in float32, after rounding when it is on."""
        sigma = self.sigma
        sizes = (self.out_features, self.in_features)
        with torch.autocast(self.widths.device.type, enabled=False):
            dtype = torch.promote_types(self.widths.dtype, torch.float32)
            w = self.widths.to(dtype).clamp(0.0, 1.0)
            loc = self.locations.to(dtype)
            if self.rounding:
                n = _grid(sizes, None, w.device, w.dtype)[2][:, 0]
                w, loc = _ste_round(w, n), _ste_round(loc, n)
            m_out, m_in = _GaudiMasks.apply(w, loc, sizes, sigma, self.rounding and sigma is None)
        return m_out, m_in

    def masked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ũ = U ⊙ M_out (out×Kr) and Ṽ = V ⊙ M_in (in×Kr): W = Ũ Ṽᵀ."""
        m_out, m_in = self.masks()
        r = self.rank_per_component
        if r > 1:
            m_out, m_in = m_out.repeat_interleave(r, 0), m_in.repeat_interleave(r, 0)
        return self.U * m_out.T.to(self.U.dtype), self.V * m_in.T.to(self.V.dtype)

    def dense_weight(self) -> torch.Tensor:
        u, v = self.masked_factors()
        return u @ v.T

    # --- components whose two masks are both empty (no output, no gradient: skipped) ------------
    def _set_live(self, mask: torch.Tensor | None = None) -> None:
        """Record which components can matter: `mask` (bool, K, on the widths' device) from the budget
        projection, else computed from the current widths; on the device, no host sync. A component
        with zero rows and zero columns gets no gradient (both masked factors vanish), so it stays dead
        until something other than a gradient step (a projection with min_width > 0, a state-dict
        load) moves its widths: `project_widths` refreshes the mask, loading clears it. Without a mask
        every component is computed."""
        if mask is None:
            w = self.widths.detach().double().clamp(0, 1)
            if self.rounding:
                sizes = _grid((self.out_features, self.in_features), None, w.device, w.dtype)[2][:, 0]
                mask = (torch.round(w * sizes) >= 1).any(0)
            else:
                mask = (w > 0).any(0)
        self._live_mask, self._live = mask, None

    def _live_columns(self) -> torch.Tensor | None:
        """Columns of U and V of the live components (None: all of them). Derived from the mask on first
        use after each projection: reading it back is one host sync, paid only by the skinny-GEMM path
        (few tokens per call), never by the materialised training path."""
        mask = getattr(self, "_live_mask", None)  # getattr: modules pickled before the mask existed
        if mask is not None:
            self._live_mask = None
            live = mask.nonzero().flatten()
            r = self.rank_per_component
            cols = (live[:, None] * r + torch.arange(r, device=live.device)).flatten()
            self._live = None if live.numel() == mask.numel() else cols.to(self.U.device)
        return getattr(self, "_live", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, n, kr = self.out_features, self.in_features, self.U.shape[1]
        tokens = x.numel() // n
        # decided on shapes alone (not on the live count, which needs a sync and changes every projection)
        if tokens * kr * (m + n) < kr * m * n + tokens * m * n:  # two skinny GEMMs beat W
            u, v = self.masked_factors()
            live = self._live_columns()
            if live is not None:
                if live.device != u.device:
                    live = self._live = live.to(u.device)
                u, v = u.index_select(1, live), v.index_select(1, live)
            return F.linear(F.linear(x, v.T), u, self.bias)
        if self.sigma is None and self.rounding:  # the default: one fused autograd node
            dtype = compute_dtype(x)
            wdt = torch.promote_types(self.widths.dtype, torch.float32)
            return BoxGBLRLinear.apply(
                x.to(dtype),
                self.U,
                self.V,
                self.widths.to(wdt),
                self.locations.to(wdt),
                None if self.bias is None else self.bias.to(dtype),
                self.rank_per_component,
            )
        return F.linear(x, self.dense_weight(), self.bias)

    # --- reporting ----------------------------------------------------------------------------
    def macs_per_token(self) -> int:
        """Σ over active components of r·(rows + cols) of its block (rounded widths; a component is
        active when it covers at least one row and one column)."""
        return int(
            _rounded_macs(
                self.widths.detach().cpu().double(),
                self.out_features,
                self.in_features,
                self.rank_per_component,
            )
        )

    def structure(self) -> dict[str, Any]:
        return {
            "components": self.components,
            "rank": self.rank_per_component,
            "budget": self.budget,
            "rounding": self.rounding,
        }

    @torch.no_grad()
    def export(self, block: int = 64, tile: int = 128, max_cost: float = 0.4) -> nn.Module:
        """Compact inference form: only the weight blocks holding non-zeros are stored and multiplied
        (dense W when they cost ≥ `max_cost` of it); see gblr_export.py."""
        u, v = self.masked_factors()
        m_out, m_in = self.masks()
        return GBLRInference(u, v, m_out, m_in, self.rank_per_component, self.bias, block, tile, max_cost)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, components={self.components}, rank={self.rank_per_component}, "
            f"sigma={self.sigma}, rounding={self.rounding}"
        )
