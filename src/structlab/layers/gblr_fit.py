"""gblr structure under a MAC budget: the exact cost, the projection onto the budget and the fit
of a layer to a dense weight (methods.md §5).

Separate from the layer so that training-time budget control (structlab.callbacks.GBLRBudget) and
post-training compression share one definition of what a set of widths costs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from structlab.layers.gblr import GaudiGBLRLinear


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
