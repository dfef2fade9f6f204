"""gblr: Gaudi-GBLR layer W = Σ_k diag(m_k^out) U_k V_kᵀ diag(m_k^in) (methods.md §5).

Each of K components is a rank-r block whose rows and columns are soft boxes (Gaudi masks) with a
learnable width and location per axis. Training forward: the masked factors Ũ = U ⊙ M_out (m×Kr),
Ṽ = V ⊙ M_in (n×Kr) are cheap to form; per call we either materialise W = ŨṼᵀ (costs mnKr, then a
dense GEMM) or run the two skinny GEMMs x Ṽ Ũᵀ (T·Kr(m+n)), whichever is cheaper — never the K
per-component m×n products of the reference. Inference (`export()`) skips every zero block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from structlab.layers.base import StructuredLinear, set_optim
from structlab.layers.registry import register_layer

# --- Gaudi mask ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _grid(sizes: tuple[int, ...], sigma: float | None, device: torch.device, dtype: torch.dtype):
    """Constants of a mask computation, built once per (sizes, σ, device, dtype): positions t, frequencies
    f = 0…max(n)/2, lengths n (A×1×1), 1/sinc(f/n)·Gaussian (A×1×F) and the irfft weights c_f (1 at
    DC and Nyquist, 2 between, 0 beyond an axis's own Nyquist)."""
    with torch.inference_mode(False), torch.no_grad():
        t = torch.arange(max(sizes), device=device, dtype=dtype)
        f = t[: max(sizes) // 2 + 1].clone() if max(sizes) > 1 else torch.zeros(1, device=device, dtype=dtype)
        n = torch.tensor(sizes, dtype=dtype, device=device).view(-1, 1, 1)
        inside = f <= torch.div(n, 2, rounding_mode="floor")
        base = 1.0 / torch.sinc(torch.where(inside, f / n, 0.0))
        if sigma is not None:
            base = base * torch.exp(-f.square() / (2.0 * sigma**2))
        c = torch.where((f == 0) | (2 * f == n), 1.0, 2.0) * inside
        return t, f, n, base, c


def _spectrum(w: torch.Tensor, loc: torch.Tensor, sizes: tuple[int, ...], sigma: float | None):
    """Spectra of A axes at once (w, loc: A×K; axis a has length sizes[a]) on one frequency grid:
    amplitude A_f, ∂A_f/∂w and phase φ_f (all A×K×F), plus f and c_f from `_grid`."""
    _, f, n, base, c = _grid(sizes, sigma, w.device, w.dtype)
    w, loc = w.unsqueeze(-1), loc.unsqueeze(-1)
    fw = f * w
    amp = w * torch.sinc(fw) * base
    damp = torch.cos(math.pi * fw) * base  # d/dw [w sinc(fw)] = cos(πfw)
    phase = math.pi * (f / n - fw - 2.0 * f * loc)
    return f, amp, damp, phase, c


def _box(w: torch.Tensor, loc: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """The exact 0/1 cyclic interval masks the Gaudi formula gives at σ = ∞ on the 1/n grid (A×K×max n)."""
    t, _, n, _, _ = _grid(sizes, None, w.device, w.dtype)
    length = torch.minimum(torch.round(w * n[:, 0]).clamp_min(0), n[:, 0]).unsqueeze(-1)
    start = torch.round(loc * n[:, 0]).unsqueeze(-1)
    return (torch.remainder(t - start, n) < length).to(w.dtype)


class _GaudiMasks(torch.autograd.Function):
    """Masks of A axes (one K-vector of widths and locations each) in one autograd node.

    Forward by irfft (or the exact box), backward by the analytic derivative of the spectrum:
    ∂m_t/∂w = Σ_f c_f [A'_f cos θ + πf A_f sin θ], ∂m_t/∂ℓ = Σ_f c_f 2πf A_f sin θ, θ = φ_f + 2πft/n,
    evaluated for every t at once through one rfft of the incoming gradient per axis.
    """

    @staticmethod
    def forward(
        ctx, w: torch.Tensor, loc: torch.Tensor, sizes: tuple[int, ...], sigma: float | None, box: bool
    ):
        ctx.save_for_backward(w, loc)
        ctx.sizes, ctx.sigma = sizes, sigma
        if box:
            masks = _box(w, loc, sizes)
            return tuple(masks[a, :, :n] for a, n in enumerate(sizes))
        _, amp, _, phase, _ = _spectrum(w, loc, sizes, sigma)
        spec = torch.polar(torch.ones_like(phase), phase) * amp
        return tuple(
            torch.fft.irfft(spec[a, :, : n // 2 + 1], n, norm="forward") for a, n in enumerate(sizes)
        )

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        w, loc = ctx.saved_tensors
        sizes = ctx.sizes
        f, amp, damp, phase, c = _spectrum(w, loc, sizes, ctx.sigma)
        spec = phase.new_zeros(
            phase.shape, dtype=torch.complex128 if w.dtype == torch.float64 else torch.complex64
        )
        for a, (n, g) in enumerate(zip(sizes, grads, strict=True)):
            if g is not None:
                spec[a, :, : n // 2 + 1] = torch.fft.rfft(g.to(w.dtype), n=n)  # G_f = Σ_t g_t e^{−2πift/n}
        p = torch.polar(torch.ones_like(phase), phase) * spec.conj()  # Σ_t g_t e^{iθ}: cos and sin sums
        weighted = c * amp * (math.pi * f) * p.imag
        grad_w = (c * damp * p.real + weighted).sum(-1)
        grad_loc = 2.0 * weighted.sum(-1)
        return grad_w, grad_loc, None, None, None


def gaudi_mask(
    widths: torch.Tensor, locations: torch.Tensor, n: int, sigma: float | None = None
) -> torch.Tensor:
    """Gaudi masks (…, K) → (…, K, n): irfft of w·sinc(fw)/sinc(f/n)·e^{−f²/2σ²}·e^{iπf(1/n−w) − 2πifℓ}.

    No rounding here (the layer rounds to the 1/n grid first). σ=None drops the Gaussian factor; then
    integer w·n, ℓ·n give the exact 0/1 indicator of the cyclic interval [ℓn, ℓn + wn).
    """
    (mask,) = _GaudiMasks.apply(widths.reshape(1, -1), locations.reshape(1, -1), (n,), sigma, False)
    return mask.reshape(*widths.shape, n)


def _ste_round(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Round to the 1/n grid in the forward, identity in the backward."""
    return x + (torch.round(x * n) / n - x).detach()


# --- cost and budget projection ----------------------------------------------------------------


def _rounded_macs(widths: torch.Tensor, m: int, n: int, r: int) -> torch.Tensor:
    """MACs per token for widths (2, K) [out, in]: Σ over components with ≥ 1 row and ≥ 1 column of
    r·(rows + cols), on the 1/n grid the forward uses."""
    rows = torch.round(widths[0].clamp(0, 1) * m)
    cols = torch.round(widths[1].clamp(0, 1) * n)
    active = (rows >= 1) & (cols >= 1)
    return (r * (rows + cols) * active).sum()


@torch.no_grad()
def project_widths(layers: Sequence[GaudiGBLRLinear], budget: float, min_width: float = 0.0) -> float:
    """Project the widths of `layers` onto {w ∈ [min_width, 1] : Σ MACs(w) ≤ budget · Σ dense MACs}.

    MACs are linear in the widths (r·m per unit of out-width, r·n per unit of in-width), so the
    Euclidean projection is w ← clip(w − λc, min_width, 1) with the smallest λ ≥ 0 that meets the
    budget, found by bisection on the exact (rounded) MAC count. Runs in float64 on the CPU from the
    parameters' values, so every DDP rank computes the same λ. Returns λ.
    """
    layers = list(layers)
    if not layers:
        return 0.0
    ws = [layer.widths.detach().to("cpu", torch.float64) for layer in layers]
    cs = [
        torch.tensor(
            [[layer.rank_per_component * layer.out_features], [layer.rank_per_component * layer.in_features]],
            dtype=torch.float64,
        )
        for layer in layers
    ]
    target = budget * sum(layer.in_features * layer.out_features for layer in layers)

    def projected(lam: float) -> list[torch.Tensor]:  # in the parameters' dtype: that is what gets rounded
        return [
            (w - lam * c).clamp(min_width, 1.0).to(la.widths.dtype).double()
            for w, c, la in zip(ws, cs, layers, strict=True)
        ]

    def cost(lam: float) -> float:
        return sum(
            float(_rounded_macs(w, la.out_features, la.in_features, la.rank_per_component))
            for w, la in zip(projected(lam), layers, strict=True)
        )

    lam = 0.0
    if cost(0.0) > target:
        lo, hi = 0.0, max(float(((w - min_width) / c).max()) for w, c in zip(ws, cs, strict=True)) + 1e-12
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if cost(mid) <= target else (mid, hi)
        lam = hi
    for layer, w in zip(layers, projected(lam), strict=True):
        layer.widths.copy_(w.to(layer.widths))
        layer._set_live(w)
    return lam


# --- the layer ----------------------------------------------------------------------------------


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
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if not budget > 0:
            raise ValueError(f"budget must be positive, got {budget}")
        self.components = int(components or min(in_features, out_features))
        self.rank_per_component = int(rank)
        self.budget, self.rounding, self.full_share = float(budget), bool(rounding), float(full_share)
        self.fit_steps, self.min_width = int(fit_steps), float(min_width)
        kr = self.components * self.rank_per_component
        self.U = nn.Parameter(torch.empty(out_features, kr))
        self.V = nn.Parameter(torch.empty(in_features, kr))
        self.widths = nn.Parameter(torch.empty(2, self.components))  # [out, in]
        self.locations = nn.Parameter(torch.empty(2, self.components))
        extra = {} if structure_lr is None else {"lr": structure_lr}
        for p in (self.widths, self.locations):
            set_optim(p, weight_decay=0.0, betas=(0.0, 0.999), **extra)
        self.register_buffer("gaudi_sigma", torch.tensor(math.inf))
        self.sigma = sigma
        self._live: torch.Tensor | None = None
        w0 = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(w0, a=math.sqrt(5))  # nn.Linear's default
        with torch.no_grad():
            self._init_structure(self.budget)
            self._init_factors(w0, match_norm=True)
        self.reset_bias()

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
        self._live = None
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

    def _init_factors(self, weight: torch.Tensor, match_norm: bool) -> None:
        """Component k takes singular pairs kr…kr+r−1 of `weight` (√σ split); with `match_norm` the
        partial-width components are rescaled so that ‖W‖_F equals ‖weight‖_F (keeps a standard
        init's output scale)."""
        m, n, kr = self.out_features, self.in_features, self.U.shape[1]
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
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

    def _init_from_dense(self, weight: torch.Tensor) -> None:
        fit_to_dense(self, weight.contiguous(), self.budget, steps=self.fit_steps)

    # --- compute ------------------------------------------------------------------------------
    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_out (K×out), M_in (K×in)) in float32, after rounding when it is on."""
        sigma = self.sigma
        sizes = (self.out_features, self.in_features)
        with torch.autocast(self.widths.device.type, enabled=False):
            w = self.widths.float().clamp(0.0, 1.0)
            loc = self.locations.float()
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
    def _set_live(self, widths: torch.Tensor | None = None) -> None:
        """Cache which components can matter. A component with zero rows and zero columns gets no
        gradient (both masked factors vanish), so it stays dead until something other than a gradient
        step (a projection with min_width > 0, a state-dict load) moves its widths: `project_widths`
        refreshes this cache, loading clears it. Without a cache every component is computed."""
        w = (self.widths.detach() if widths is None else widths).to("cpu", torch.float64).clamp(0, 1)
        sizes = torch.tensor([[self.out_features], [self.in_features]], dtype=torch.float64)
        live = ((torch.round(w * sizes) >= 1) if self.rounding else (w > 0)).any(0)
        if bool(live.all()):
            self._live = None
        else:
            cols = (
                live.nonzero().flatten()[:, None] * self.rank_per_component
                + torch.arange(self.rank_per_component)
            ).flatten()
            self._live = cols.to(self.U.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.masked_factors()
        live = getattr(self, "_live", None)
        if live is not None:
            if live.device != u.device:
                live = self._live = live.to(u.device)
            u, v = u.index_select(1, live), v.index_select(1, live)
        m, n, kr = self.out_features, self.in_features, u.shape[1]
        tokens = x.numel() // n
        if tokens * kr * (m + n) < kr * m * n + tokens * m * n:
            return F.linear(F.linear(x, v.T), u, self.bias)
        return F.linear(x, u @ v.T, self.bias)

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
    def export(self, group_overhead: int = 16384, gather_cost: int = 256) -> nn.Module:
        """Compact inference form: zero blocks skipped, components grouped into few GEMMs."""
        u, v = self.masked_factors()
        m_out, m_in = self.masks()
        return GBLRInference(
            u.float(),
            v.float(),
            m_out,
            m_in,
            self.rank_per_component,
            self.bias,
            group_overhead=group_overhead,
            gather_cost=gather_cost,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, components={self.components}, rank={self.rank_per_component}, "
            f"sigma={self.sigma}, rounding={self.rounding}"
        )


# --- fitting to a dense weight ------------------------------------------------------------------


def _bounds(size: int, parts: int) -> list[int]:
    return [round(i * size / parts) for i in range(parts + 1)]


@torch.no_grad()
def _block_init(layer: GaudiGBLRLinear, w: torch.Tensor, budget: float) -> float:
    """Deterministic structure for `w` at `budget`: a share of the budget to the top singular
    directions (full-width components), the rest greedily to the best rank-r blocks of the residual on
    a g×g tile grid (largest captured energy per MAC first). Tries shares 1, ¾, ½, ¼, 0 and several
    grids, installs the best; share 1 is the truncated SVD, so this never loses to plain low rank.
    Returns the relative Frobenius error."""
    m, n, r, k = layer.out_features, layer.in_features, layer.rank_per_component, layer.components
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    units = budget * m * n / (r * (m + n))
    total = float(w.square().sum()) or 1.0
    best: tuple | None = None
    for share in (1.0, 0.75, 0.5, 0.25, 0.0):
        k1 = min(k, int(share * units + 1e-9), s.numel() // r)
        resid = w - (u[:, : k1 * r] * s[: k1 * r]) @ vh[: k1 * r]
        left = budget * m * n - k1 * r * (m + n)
        for grid in (2, 3, 4, 6, 8, 12, 16):
            if grid > min(m, n) or k1 == k:
                continue
            rb, cb = _bounds(m, grid), _bounds(n, grid)
            cands = []
            for i in range(grid):
                for j in range(grid):
                    sv = torch.linalg.svdvals(resid[rb[i] : rb[i + 1], cb[j] : cb[j + 1]])
                    gain = sv.square()[: (sv.numel() // r) * r].view(-1, r).sum(1).tolist()
                    cost = r * (rb[i + 1] - rb[i] + cb[j + 1] - cb[j])
                    cands += [(g / cost, g, cost, i, j, q) for q, g in enumerate(gain)]
            cands.sort(key=lambda c: -c[0])
            spent, gained, picks = 0.0, 0.0, []
            for _, g, cost, i, j, q in cands:
                if len(picks) == k - k1:
                    break
                if spent + cost <= left:
                    spent, gained = spent + cost, gained + g
                    picks.append((i, j, q))
            err2 = max(0.0, float(resid.square().sum()) - gained) / total
            if best is None or err2 < best[0]:
                best = (err2, k1, grid, picks)
        if best is None or k1 == k:  # every component is full width: no blocks to place
            err2 = float(resid.square().sum()) / total
            if best is None or err2 < best[0]:
                best = (err2, k1, 1, [])
    err2, k1, grid, picks = best
    layer.widths.zero_()
    layer.locations.zero_()
    layer._init_factors(w, match_norm=False)  # top pairs for the first k1 components, tiny noise after
    layer.widths[:, :k1] = 1.0
    resid = w - (u[:, : k1 * r] * s[: k1 * r]) @ vh[: k1 * r]
    rb, cb = _bounds(m, max(grid, 1)), _bounds(n, max(grid, 1))
    tiles: dict[tuple[int, int], tuple] = {}
    for c, (i, j, q) in enumerate(picks):
        if (i, j) not in tiles:
            tiles[(i, j)] = torch.linalg.svd(resid[rb[i] : rb[i + 1], cb[j] : cb[j + 1]], full_matrices=False)
        tu, ts, tvh = tiles[(i, j)]
        cols = slice((k1 + c) * r, (k1 + c + 1) * r)
        pairs = slice(q * r, (q + 1) * r)
        layer.U[:, cols] = 0.0
        layer.V[:, cols] = 0.0
        layer.U[rb[i] : rb[i + 1], cols] = tu[:, pairs] * ts[pairs].sqrt()
        layer.V[cb[j] : cb[j + 1], cols] = tvh[pairs].T * ts[pairs].sqrt()
        layer.widths[0, k1 + c], layer.widths[1, k1 + c] = (rb[i + 1] - rb[i]) / m, (cb[j + 1] - cb[j]) / n
        layer.locations[0, k1 + c], layer.locations[1, k1 + c] = rb[i] / m, cb[j] / n
    return math.sqrt(err2)


def fit_to_dense(
    layer: GaudiGBLRLinear,
    weight: torch.Tensor,
    budget: float,
    steps: int = 300,
    lr_factors: float = 0.005,
    lr_structure: float = 0.005,
) -> float:
    """Fit structure and factors of `layer` to `weight` (Frobenius) under `budget`: the block init
    above, then `steps` Adam steps on factors, widths and locations with the widths projected onto
    the budget after every step; the best iterate is kept. Returns the relative error."""
    w = weight.float()
    norm = w.norm().clamp_min(1e-30)
    best_err = _block_init(layer, w, budget)
    if steps <= 0:
        layer._set_live()
        return best_err
    best = {k_: p.detach().clone() for k_, p in layer.named_parameters()}
    scale = float(torch.cat([layer.U.detach().flatten(), layer.V.detach().flatten()]).square().mean().sqrt())
    opt = torch.optim.Adam(
        [
            {"params": [layer.U, layer.V], "lr": lr_factors * scale},
            {"params": [layer.widths, layer.locations], "lr": lr_structure, "betas": (0.0, 0.999)},
        ]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
    with torch.enable_grad():
        for _ in range(steps):
            err = (w - layer.dense_weight()).norm() / norm
            if err.item() < best_err:
                best_err = err.item()
                best = {k_: p.detach().clone() for k_, p in layer.named_parameters()}
            opt.zero_grad(set_to_none=True)
            err.square().backward()
            opt.step()
            sched.step()
            project_widths([layer], budget, layer.min_width)
            with torch.no_grad():
                layer.locations.remainder_(1.0)
    with torch.no_grad():
        final = ((w - layer.dense_weight()).norm() / norm).item()
        if final >= best_err:
            for k_, p in layer.named_parameters():
                p.copy_(best[k_])
    layer._set_live()
    return min(best_err, final)


# --- inference form -----------------------------------------------------------------------------


def _cyclic_support(mask: torch.Tensor) -> tuple[int, int]:
    """(start, length) of the shortest cyclic interval holding every non-zero of a 1-D mask."""
    idx = torch.nonzero(mask).flatten().tolist()
    n = mask.numel()
    if not idx:
        return 0, 0
    if len(idx) == n:
        return 0, n
    gaps = np.diff(np.asarray(idx + [idx[0] + n]))
    j = int(np.argmax(gaps))
    return idx[(j + 1) % len(idx)], n - int(gaps[j]) + 1


def _pieces(start: int, length: int, n: int) -> list[tuple[int, int]]:
    if start + length <= n:
        return [(start, start + length)]
    return [(start, n), (0, start + length - n)]


def _group_hulls(starts: np.ndarray, ends: np.ndarray, cols: int, overhead: int) -> list[tuple[int, int]]:
    """Split pieces sorted by start into consecutive groups minimising Σ hull·columns + overhead."""
    p = len(starts)
    best = np.zeros(p + 1)
    cut = np.zeros(p + 1, dtype=int)
    for j in range(1, p + 1):
        hull = np.maximum.accumulate(ends[:j][::-1])[::-1] - starts[:j]
        count = (j - np.arange(j)) * cols
        total = best[:j] + hull * np.maximum(count, 8) + overhead
        cut[j] = int(np.argmin(total))
        best[j] = total[cut[j]]
    groups, j = [], p
    while j > 0:
        groups.append((int(cut[j]), j))
        j = int(cut[j])
    return groups[::-1]


def _segments(starts: np.ndarray, ends: np.ndarray, size: int, cols: int, overhead: int, gather: int):
    """Partition [0, size) into output segments minimising Σ len·(overlapping columns + 1) + costs."""
    points = np.unique(np.concatenate([[0, size], starts, ends]))
    s_sorted, e_sorted = np.sort(starts), np.sort(ends)
    q = len(points)
    best = np.full(q, np.inf)
    best[0] = 0.0
    cut = np.zeros(q, dtype=int)
    for j in range(1, q):
        a = points[:j]
        b = points[j]
        overlap = np.searchsorted(s_sorted, b, "left") - np.searchsorted(e_sorted, a, "right")
        width = overlap * cols + 1
        total = best[:j] + (b - a) * width + overhead + gather * width
        cut[j] = int(np.argmin(total))
        best[j] = total[cut[j]]
    segs, j = [], q - 1
    while j > 0:
        segs.append((int(points[cut[j]]), int(points[j])))
        j = int(cut[j])
    return segs[::-1]


class GBLRInference(nn.Module):
    """Exported Gaudi-GBLR: y = x Ṽ Ũᵀ + b computed block by block, skipping the masks' zeros.

    Stage 1 groups the components' input intervals (sorted, split by dynamic programming to balance
    wasted MACs against GEMM launches) and writes z = x Ṽ into one buffer, a GEMM per group over the
    group's input slice. Stage 2 partitions the output axis into segments; each segment gathers the
    z columns of the components that reach it and writes its slice of y with one GEMM whose extra
    ones-column adds the bias, so y is written once. When this plan costs more than the dense matrix
    (wide blocks, soft masks), the module stores W and runs one dense GEMM instead.
    """

    def __init__(
        self,
        u: torch.Tensor,
        v: torch.Tensor,
        m_out: torch.Tensor,
        m_in: torch.Tensor,
        rank: int,
        bias: torch.Tensor | None,
        group_overhead: int = 16384,
        gather_cost: int = 256,
    ) -> None:
        super().__init__()
        m, n = u.shape[0], v.shape[0]
        self.in_features, self.out_features = n, m
        bias = torch.zeros(m, device=u.device) if bias is None else bias.detach().float()
        comps = []
        for k in range(m_out.shape[0]):
            so, lo = _cyclic_support(m_out[k])
            si, li = _cyclic_support(m_in[k])
            if lo and li:
                comps.append((k, _pieces(si, li, n), _pieces(so, lo, m)))
        in_pieces = sorted(((a, b, k) for k, pin, _ in comps for a, b in pin), key=lambda t: t[0])
        out_pieces = [(a, b, k) for k, _, pout in comps for a, b in pout]
        plan_cost, stage1, stage2 = 0.0, [], []
        col_of: dict[int, list[int]] = {}
        offset = 0
        if in_pieces:
            st = np.array([p[0] for p in in_pieces])
            en = np.array([p[1] for p in in_pieces])
            for i, j in _group_hulls(st, en, rank, group_overhead):
                lo_, hi_ = int(st[i:j].min()), int(en[i:j].max())
                block = v.new_zeros(hi_ - lo_, (j - i) * rank)
                for c, (a, b, k) in enumerate(in_pieces[i:j]):
                    block[a - lo_ : b - lo_, c * rank : (c + 1) * rank] = v[a:b, k * rank : (k + 1) * rank]
                    col_of.setdefault(k, []).append(offset + c * rank)
                stage1.append((lo_, hi_, offset, offset + (j - i) * rank, block))
                plan_cost += (hi_ - lo_) * (j - i) * rank + group_overhead
                offset += (j - i) * rank
        ones = offset
        gather, extra_dst, extra_src = [], [], []
        so = np.array([p[0] for p in out_pieces], dtype=int)
        eo = np.array([p[1] for p in out_pieces], dtype=int)
        for a, b in _segments(so, eo, m, rank, group_overhead, gather_cost):
            ks = sorted({k for (s, e, k) in out_pieces if s < b and e > a})
            start = len(gather)
            block = u.new_zeros(len(ks) * rank + 1, b - a)
            for c, k in enumerate(ks):
                block[c * rank : (c + 1) * rank] = u[a:b, k * rank : (k + 1) * rank].T
                first, *rest = col_of[k]
                for q in range(rank):
                    gather.append(first + q)
                    for other in rest:
                        extra_dst.append(start + c * rank + q)
                        extra_src.append(other + q)
            gather.append(ones)
            block[-1] = bias[a:b]
            stage2.append((a, b, start, len(gather), block))
            plan_cost += (b - a) * (len(ks) * rank + 1) + group_overhead + gather_cost * (len(ks) * rank + 1)
        self.dense = plan_cost >= m * n
        self._stage1 = [(a, b, c0, c1) for a, b, c0, c1, _ in stage1]
        self._stage2 = [(a, b, c0, c1) for a, b, c0, c1, _ in stage2]
        self.width = offset + 1
        if self.dense:
            self.register_buffer("weight", u @ v.T)
            self.register_buffer("bias", bias)
            self.blocks_in, self.blocks_out = nn.ParameterList(), nn.ParameterList()
        else:
            self.blocks_in = nn.ParameterList([nn.Parameter(blk, requires_grad=False) for *_, blk in stage1])
            self.blocks_out = nn.ParameterList([nn.Parameter(blk, requires_grad=False) for *_, blk in stage2])
        self.register_buffer("gather_idx", torch.tensor(gather, dtype=torch.long, device=u.device))
        self.register_buffer("extra_dst", torch.tensor(extra_dst, dtype=torch.long, device=u.device))
        self.register_buffer("extra_src", torch.tensor(extra_src, dtype=torch.long, device=u.device))
        self.plan_macs = int(plan_cost)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        dtype = _gemm_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, self.in_features).to(dtype)
            if self.dense:
                return F.linear(x2, self.weight.to(dtype), self.bias.to(dtype)).view(*lead, self.out_features)
            z = x2.new_empty(x2.shape[0], self.width)
            z[:, -1] = 1.0
            for (a, b, c0, c1), blk in zip(self._stage1, self.blocks_in, strict=True):
                torch.mm(x2[:, a:b], blk.to(dtype), out=z[:, c0:c1])
            z2 = z.index_select(1, self.gather_idx)
            if self.extra_dst.numel():
                z2.index_add_(1, self.extra_dst, z.index_select(1, self.extra_src))
            y = x2.new_empty(x2.shape[0], self.out_features)
            for (a, b, c0, c1), blk in zip(self._stage2, self.blocks_out, strict=True):
                torch.mm(z2[:, c0:c1], blk.to(dtype), out=y[:, a:b])
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, dense={self.dense}, "
            f"gemms={len(self._stage1) + len(self._stage2)}, plan_macs={self.plan_macs}"
        )


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError):
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype
