"""gblr structure under a MAC budget: the exact cost, the projection onto the budget and the fit
of a layer to a dense weight (docs/methods.md §5).

Separate from the layer so that training-time budget control (structlab.callbacks.GBLRBudget) and
post-training compression share one definition of what a set of widths costs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from structlab.layers.gaudi import eager_terms

if TYPE_CHECKING:
    from structlab.layers.gblr import GaudiGBLRLinear


def _rounded_macs(widths: torch.Tensor, m: int, n: int, r: int) -> torch.Tensor:
    """MACs per token for widths (2, K) [out, in]: Σ over components with ≥ 1 row and ≥ 1 column of
    r·(rows + cols), on the 1/n grid the forward uses."""
    rows = torch.round(widths[0].clamp(0, 1) * m)
    cols = torch.round(widths[1].clamp(0, 1) * n)
    active = (rows >= 1) & (cols >= 1)
    return (r * (rows + cols) * active).sum()


# --- the budget projection, on the parameters' device ------------------------------------------
# All layers' widths are gathered into one (2, ΣK) float64 tensor. The λ search evaluates the exact
# rounded cost at P points of the bracket at once and keeps the two neighbours around the budget
# crossing, for a fixed number of rounds (P^rounds ≥ 2^64: as tight as 64 bisection steps). No
# value is read back to the host, so a training step pays a few hundred small kernels, no syncs.
_SEARCH_ELEMENTS = 2**21  # points × widths per round: bounds the temporaries (16 MB each in float64)


class _Columns(NamedTuple):
    """Per-column constants of the gathered widths (2, ΣK) of a list of layers."""

    slope: torch.Tensor  # (2, ΣK): the cost per unit of width, r·m and r·n
    sizes: torch.Tensor  # (2, ΣK): the rounding grids, m and n
    weights: torch.Tensor  # (2·ΣK,): r, the cost of one row or column of the component
    rounding: torch.Tensor | None  # (ΣK,): the layer rounds its widths; None when every layer does
    frac: torch.Tensor  # (P,): the search points' positions in the bracket, 0, 1/P, …, (P−1)/P
    rounds: int
    ks: tuple[int, ...]  # components per layer


def _specs(layers: Sequence[GaudiGBLRLinear]) -> tuple[tuple[int, int, int, int, bool], ...]:
    return tuple(
        (la.out_features, la.in_features, la.rank_per_component, la.widths.shape[1], la.rounding)
        for la in layers
    )


@functools.lru_cache(maxsize=16)
def _columns(specs: tuple[tuple[int, int, int, int, bool], ...], device: torch.device) -> _Columns:
    """The constants, built once per set of layer shapes: a per-step host-to-device copy would sync."""
    full = [torch.full((k,), float(v), dtype=torch.float64) for m, n, r, k, _ in specs for v in (m, n, r)]
    m, n, r = (torch.cat(full[i::3]) for i in range(3))
    # log2 of the search points per round: a GPU evaluates many at once for the cost of one (fewer
    # rounds, fewer launches); a CPU pays for each, so there 4 points (32 rounds) do the least work
    bits = (
        max(1, min(8, (_SEARCH_ELEMENTS // (2 * m.numel())).bit_length() - 1)) if device.type == "cuda" else 2
    )
    rounding = torch.cat([torch.full((k,), rnd) for *_, k, rnd in specs])
    with torch.inference_mode(False):  # cached: may be built inside inference mode, used outside

        def put(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)

        return _Columns(
            slope=put(torch.stack([r * m, r * n])),
            sizes=put(torch.stack([m, n])),
            weights=put(torch.cat([r, r])),
            rounding=None if bool(rounding.all()) else put(rounding),
            frac=put(torch.arange(2**bits, dtype=torch.float64) / 2**bits),
            rounds=-(-64 // bits),
            ks=tuple(k for *_, k, _ in specs),
        )


def _gather(layers: Sequence[GaudiGBLRLinear]) -> tuple[torch.Tensor, _Columns]:
    """All widths as one (2, ΣK) float64 tensor on their device, and the per-column constants."""
    dtype = layers[0].widths.dtype
    if any(la.widths.dtype != dtype for la in layers):
        raise ValueError("the gblr layers' widths must share one dtype")
    w = torch.cat([la.widths.detach() for la in layers], 1).double()
    return w, _columns(_specs(layers), w.device)


def _cost(
    lam: torch.Tensor, w: torch.Tensor, cols: _Columns, floor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact rounded cost Σ r·(rows + cols) over active components at each λ of `lam` (P,), with the
    projected widths clip(w − λc, floor, 1) in `dtype` (P, 2, ΣK) and their row/column counts."""
    p = torch.empty((lam.numel(), *w.shape), dtype=dtype, device=w.device)
    torch.sub(w, lam.view(-1, 1, 1) * cols.slope, out=p)  # w − λc in float64, then rounded to dtype once
    p.clamp_(floor, 1.0)  # = clip in float64, then cast: the cast is monotone and floor, 1 are exact in dtype
    counts = torch.mul(p, cols.sizes).round_()  # float64 (the product is exact), as _rounded_macs rounds
    active = counts.amin(1, keepdim=True) >= 1
    return (counts * active).view(lam.numel(), -1) @ cols.weights, p, counts


def _as_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` as a tensor of `dtype` holds it (host arithmetic)."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


@torch.no_grad()
def project_widths(layers: Sequence[GaudiGBLRLinear], budget: float, min_width: float = 0.0) -> torch.Tensor:
    """Project the widths of `layers` onto {w ∈ [min_width, 1] : Σ MACs(w) ≤ budget · Σ dense MACs}.

    MACs are linear in the widths (r·m per unit of out-width, r·n per unit of in-width), so the
    Euclidean projection is w ← clip(w − λc, min_width, 1) (in the widths' dtype) with the smallest
    λ ≥ 0 that meets the budget on the exact (rounded) MAC count. Runs in float64 on the parameters'
    device without reading anything back to the host (see `_columns`); deterministic, so every DDP
    rank computes the same λ. Refreshes the layers' live-component masks. Returns λ (a 0-dim float64
    tensor on that device: converting it to a number syncs).
    """
    layers = list(layers)
    if not layers:
        return torch.zeros((), dtype=torch.float64)
    if not 0.0 <= min_width <= 1.0:
        raise ValueError(f"min_width must be in [0, 1], got {min_width}")
    dtype = layers[0].widths.dtype
    w, cols = _gather(layers)
    floor = _as_dtype(min_width, dtype)
    target = budget * sum(la.in_features * la.out_features for la in layers)
    # bracket (lo, hi]: cost(lo) > target (or lo = 0), cost(hi) ≤ target unless the budget is out of reach;
    # at hi every width is at its floor. λ = 0 is the first point evaluated: hi = 0 when it meets the budget.
    lo = w.new_zeros(())
    hi = ((w - min_width) / cols.slope).amax().clamp_min(0.0) + 1e-12
    for _ in range(cols.rounds):
        lam = torch.lerp(lo, hi, cols.frac)
        ok = _cost(lam, w, cols, floor, dtype)[0] <= target
        lo, hi = torch.where(ok, lo, lam).amax(), torch.where(ok, lam, hi).amin()
    _, p, counts = _cost(hi.view(1), w, cols, floor, dtype)
    live = counts[0] >= 1
    if cols.rounding is not None:
        live = torch.where(cols.rounding, live, p[0] > 0)
    torch._foreach_copy_([la.widths for la in layers], list(p[0].split(cols.ks, 1)))
    for layer, mask in zip(layers, live.any(0).split(cols.ks), strict=True):
        layer._set_live(mask)
    return hi


class WidthProjection:
    """`project_widths(layers, budget, min_width)` for one fixed set of layers, as a callable.

    On CUDA the projection (a fixed sequence of ~100 small kernels, no host sync) is captured once as
    a CUDA graph and replayed: one launch per call instead of ~100, which is what made it cost a few
    percent of a ViT-B training step. Captured again if the budget, the floor or the widths' storage
    change (a rebuilt layer, say). On the CPU it simply calls `project_widths`.
    """

    def __init__(self, layers: Sequence[GaudiGBLRLinear]) -> None:
        self.layers = list(layers)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None
        self._masks: list[torch.Tensor | None] = []

    def __call__(self, budget: float, min_width: float = 0.0) -> None:
        if not self.layers:
            return
        device = self.layers[0].widths.device
        if device.type != "cuda":
            project_widths(self.layers, budget, min_width)
            return
        key = (budget, min_width, tuple(la.widths.data_ptr() for la in self.layers))
        if key != self._key:
            self._capture(budget, min_width, device)
            self._key = key
        self.graph.replay()
        for layer, mask in zip(self.layers, self._masks, strict=True):  # the replay refreshed the masks
            layer._live_mask, layer._live = mask, None

    def _capture(self, budget: float, min_width: float, device: torch.device) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture builds the cached constants
            project_widths(self.layers, budget, min_width)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            project_widths(self.layers, budget, min_width)
        self._masks = [la._live_mask for la in self.layers]


def floor_fraction(layers: Sequence[GaudiGBLRLinear], min_width: float) -> float:
    """Σ MACs / Σ dense MACs with every width at `min_width`: the least any projection reaches, so
    the budget is out of reach when it is below. Host arithmetic only (no device values)."""
    macs = 0
    for la in layers:
        floor = _as_dtype(min_width, la.widths.dtype)
        rows, cols = round(floor * la.out_features), round(floor * la.in_features)  # half to even, as torch
        if rows >= 1 and cols >= 1:
            macs += la.widths.shape[1] * la.rank_per_component * (rows + cols)
    return macs / sum(la.in_features * la.out_features for la in layers)


@torch.no_grad()
def budget_and_mean_width(layers: Sequence[GaudiGBLRLinear]) -> tuple[float, float]:
    """(Σ MACs / Σ dense MACs, mean width clamped to [0, 1]) of `layers`, read back in one transfer."""
    layers = list(layers)
    w, cols = _gather(layers)
    macs, p, _ = _cost(w.new_zeros(1), w, cols, 0.0, layers[0].widths.dtype)
    dense = sum(la.in_features * la.out_features for la in layers)
    frac, mean = torch.stack([macs[0] / dense, p.mean(dtype=torch.float64)]).tolist()
    return frac, mean


# --- the fit to a dense weight -------------------------------------------------------------------
def _bounds(size: int, parts: int) -> list[int]:
    return [round(i * size / parts) for i in range(parts + 1)]


def _tiles_by_shape(
    rb: list[int], cb: list[int], tiles: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], list[tuple[int, int]]]:
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, j in tiles:
        groups.setdefault((rb[i + 1] - rb[i], cb[j + 1] - cb[j]), []).append((i, j))
    return groups


def _tile_stack(w: torch.Tensor, rb: list[int], cb: list[int], tiles: list[tuple[int, int]]) -> torch.Tensor:
    return torch.stack([w[rb[i] : rb[i + 1], cb[j] : cb[j + 1]] for i, j in tiles])


def _tile_gains(w: torch.Tensor, rb: list[int], cb: list[int], r: int) -> dict[tuple[int, int], list[float]]:
    """Energy of each rank-r group of singular values of every tile of `w` on the grid rb × cb: one
    batched SVD and one read-back per tile shape, not one per tile."""
    grid = [(i, j) for i in range(len(rb) - 1) for j in range(len(cb) - 1)]
    gains: dict[tuple[int, int], list[float]] = {}
    for tiles in _tiles_by_shape(rb, cb, grid).values():
        t = _tile_stack(w, rb, cb, tiles)
        if t.shape[1] > t.shape[2]:
            t = t.mT
        # σ² are the eigenvalues of the smaller Gram matrix: 3× faster than svdvals on the CPU, and σ² is
        # what the energies need (float64 keeps the small ones meaningful)
        sv2 = torch.linalg.eigvalsh((t @ t.mT).double()).flip(-1).clamp_min(0.0).to(t.dtype)
        q = sv2.shape[1] // r * r
        gains.update(zip(tiles, sv2[:, :q].reshape(len(tiles), -1, r).sum(2).tolist(), strict=True))
    return gains


def _greedy(cost: np.ndarray, left: float, limit: int) -> list[int]:
    """Indices taken by: for each item in order, take it when spent + cost ≤ left, until `limit` are
    taken. Whole runs of fitting items at a time (vectorised), then a jump to the next that fits."""
    taken: list[int] = []
    spent, pos = 0.0, 0
    while len(taken) < limit and pos < len(cost):
        run = int(np.searchsorted(spent + np.cumsum(cost[pos:]), left, side="right"))
        run = min(run, limit - len(taken))
        taken.extend(range(pos, pos + run))
        spent += float(cost[pos : pos + run].sum())
        pos += run
        if len(taken) == limit:
            break
        fits = np.flatnonzero(spent + cost[pos:] <= left)
        if fits.size == 0:
            break
        pos += int(fits[0])
    return taken


def _best_for_share(
    w: torch.Tensor, svd: tuple, share: float, budget: float, r: int, k: int
) -> tuple[float, int, int, list]:
    """(relative error², full-width components, grid, block picks) of the best grid for one share."""
    u, s, vh = svd
    m, n = w.shape
    units = budget * m * n / (r * (m + n))
    total = float(w.square().sum()) or 1.0
    k1 = min(k, int(share * units + 1e-9), s.numel() // r)
    resid = w - (u[:, : k1 * r] * s[: k1 * r]) @ vh[: k1 * r]
    resid2 = float(resid.square().sum())
    if k1 == k:  # every component is full width: no blocks to place
        return resid2 / total, k1, 1, []
    left = budget * m * n - k1 * r * (m + n)
    best: tuple | None = None
    for grid in (2, 3, 4, 6, 8, 12, 16):
        if grid > min(m, n):
            continue
        rb, cb = _bounds(m, grid), _bounds(n, grid)
        gains = _tile_gains(resid, rb, cb, r)
        # candidates (tile i, tile j, singular group q), tiles row-major, ranked by energy per MAC
        cands = [(i, j, q) for i in range(grid) for j in range(grid) for q in range(len(gains[i, j]))]
        gain = np.array([g for i in range(grid) for j in range(grid) for g in gains[i, j]])
        cost = np.array([r * (rb[i + 1] - rb[i] + cb[j + 1] - cb[j]) for i, j, _ in cands])
        order = np.argsort(-(gain / cost), kind="stable")
        taken = order[_greedy(cost[order], left, k - k1)]
        gained = 0.0
        for g in gain[taken].tolist():  # summed in pick order, as one at a time
            gained += g
        err2 = max(0.0, resid2 - gained) / total
        if best is None or err2 < best[0]:
            best = (err2, k1, grid, [cands[t] for t in taken.tolist()])
    return best if best is not None else (resid2 / total, k1, 1, [])


SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)


class BlockPlan(NamedTuple):
    """The structure the block init chose for a weight: its relative error², the number of full-width
    components (the top singular directions), the tile grid and the (tile row, tile column, singular
    group) of each block component."""

    err2: float
    full: int
    grid: int
    picks: list[tuple[int, int, int]]


def _thin_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(w, full_matrices=False)


@torch.no_grad()
def plan_blocks(w: torch.Tensor, budget: float, r: int, k: int, svd: tuple | None = None) -> BlockPlan:
    """Deterministic structure for `w` (m×n, on the host) at `budget` with k components of rank r: a
    share of the budget to the top singular directions (full-width components), the rest greedily to
    the best rank-r blocks of the residual on a g×g tile grid (largest captured energy per MAC first).
    Tries shares 1, ¾, ½, ¼, 0 and several grids and returns the best; share 1 is the truncated SVD,
    so this never loses to plain low rank. A pure function of the weight: `replace_layers` plans
    many layers at once in threads (LAPACK releases the GIL)."""
    svd = _thin_svd(w) if svd is None else svd
    results = [_best_for_share(w, svd, share, budget, r, k) for share in SHARES]
    return BlockPlan(*min(results, key=lambda t: t[0]))  # the first of equals


@torch.no_grad()
def install_blocks(
    layer: GaudiGBLRLinear, w: torch.Tensor, plan: BlockPlan, svd: tuple | None = None
) -> float:
    """Set `layer`'s widths, locations and factors (on the host, like `w`) to `plan`: each full-width
    component takes r top singular pairs of `w`, each block component r singular pairs of its tile of
    the residual (√σ split), unused components tiny noise. Returns the relative Frobenius error."""
    m, n, r = layer.out_features, layer.in_features, layer.rank_per_component
    u, s, vh = _thin_svd(w) if svd is None else svd
    k1, grid, picks = plan.full, plan.grid, plan.picks
    layer.widths.zero_()
    layer.locations.zero_()
    layer._init_factors(w, match_norm=False, svd=(u, s, vh))
    layer.widths[:, :k1] = 1.0
    if picks:
        resid = w - (u[:, : k1 * r] * s[: k1 * r]) @ vh[: k1 * r]
        rb, cb = _bounds(m, grid), _bounds(n, grid)
        layer.U[:, k1 * r : (k1 + len(picks)) * r] = 0.0
        layer.V[:, k1 * r : (k1 + len(picks)) * r] = 0.0
        members: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for c, (i, j, q) in enumerate(picks):
            members.setdefault((i, j), []).append((c, q))
        for tiles in _tiles_by_shape(rb, cb, members).values():
            tu, ts, tvh = torch.linalg.svd(_tile_stack(resid, rb, cb, tiles), full_matrices=False)
            for t, (i, j) in enumerate(tiles):  # component c takes singular pairs qr…qr+r−1 of its tile
                cols = [(k1 + c) * r + e for c, _ in members[i, j] for e in range(r)]
                pairs = [q * r + e for _, q in members[i, j] for e in range(r)]
                root = ts[t, pairs].sqrt()
                layer.U[rb[i] : rb[i + 1], cols] = tu[t][:, pairs] * root
                layer.V[cb[j] : cb[j + 1], cols] = tvh[t][pairs].T * root
        shape = [
            [(rb[i + 1] - rb[i]) / m, (cb[j + 1] - cb[j]) / n, rb[i] / m, cb[j] / n] for i, j, _ in picks
        ]
        shape = torch.tensor(shape, dtype=torch.float64).T.to(layer.widths)
        layer.widths[:, k1 : k1 + len(picks)] = shape[:2]
        layer.locations[:, k1 : k1 + len(picks)] = shape[2:]
    return math.sqrt(plan.err2)


def _block_init(
    layer: GaudiGBLRLinear, w: torch.Tensor, budget: float, plan: BlockPlan | None = None
) -> float:
    """`plan_blocks` (unless given) then `install_blocks` on the host, one SVD of `w` for both."""
    svd = _thin_svd(w)
    if plan is None:
        plan = plan_blocks(w, budget, layer.rank_per_component, layer.components, svd)
    return install_blocks(layer, w, plan, svd)


def fit_to_dense(
    layer: GaudiGBLRLinear,
    weight: torch.Tensor,
    budget: float,
    steps: int = 300,
    lr_factors: float = 0.005,
    lr_structure: float = 0.005,
    plan: BlockPlan | None = None,
) -> float:
    """Fit structure and factors of `layer` to `weight` (Frobenius) under `budget`: the block init
    above (from `plan` when the caller planned it already), then `steps` Adam steps on factors,
    widths and locations with the widths projected onto the budget after every step; the best
    iterate is kept. Returns the relative error.

    The step loop never reads a value back to the host (the best iterate is tracked on the device,
    the projection runs there), so on a GPU it runs at the speed of its kernels."""
    w = weight.float()
    norm = w.norm().clamp_min(1e-30)
    # The block init runs on the host wherever the layer lives: its hundreds of small SVDs take LAPACK
    # 2.5 s per ViT-B layer on 2 cores, cuSOLVER (one matrix of a batch at a time) 5.4 s on an H100.
    device = layer.U.device
    best_err = _block_init(layer.cpu(), w.cpu(), budget, plan)
    layer.to(device)
    if steps <= 0:
        layer._set_live()
        return best_err
    params = [layer.U, layer.V, layer.widths, layer.locations]  # the bias is not fitted
    best = [p.detach().clone() for p in params]
    lowest = torch.full((), best_err, dtype=torch.float64, device=w.device)
    scale = float(torch.cat([layer.U.detach().flatten(), layer.V.detach().flatten()]).square().mean().sqrt())
    opt = torch.optim.Adam(
        [
            {"params": [layer.U, layer.V], "lr": lr_factors * scale},
            {"params": [layer.widths, layer.locations], "lr": lr_structure, "betas": (0.0, 0.999)},
        ]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps)))
    project = WidthProjection([layer])
    # eager mask gradient: compiling its kernel for each new layer shape costs more than 300 steps gain
    with torch.enable_grad(), eager_terms():
        for _ in range(steps):
            err = (w - layer.dense_weight()).norm() / norm
            with torch.no_grad():
                better = err.double() < lowest
                lowest = torch.where(better, err.double(), lowest)
                for b, p in zip(best, params, strict=True):
                    torch.where(better, p, b, out=b)
            opt.zero_grad(set_to_none=True)
            err.square().backward()
            opt.step()
            sched.step()
            project(budget, layer.min_width)
            with torch.no_grad():
                layer.locations.remainder_(1.0)
    with torch.no_grad():
        final, best_err = ((w - layer.dense_weight()).norm() / norm).item(), lowest.item()
        if final >= best_err:
            for p, b in zip(params, best, strict=True):
                p.copy_(b)
    layer._set_live()
    return min(best_err, final)
