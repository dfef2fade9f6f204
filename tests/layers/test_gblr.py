"""gblr layer: Gaudi masks against the reference implementation, the analytic mask gradient, budget
init and projection, fitting to a dense weight, and the compact export."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from support import fused_vs_composed_gblr

from structlab.layers import make_layer
from structlab.layers.gblr import (
    GaudiGBLRLinear,
    GBLRInference,
    _GaudiMasks,
    fit_to_dense,
    gaudi_mask,
    project_widths,
)
from structlab.layers.gblr_fit import _rounded_macs, budget_and_mean_width, floor_fraction

MASKS = Path(__file__).resolve().parents[1] / "fixtures" / "gaudi_masks_seed0.pt"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def randomise(layer: GaudiGBLRLinear, seed: int, max_width: float = 0.6) -> GaudiGBLRLinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.widths.copy_(torch.rand(layer.widths.shape, generator=g) * max_width)
        layer.locations.copy_(torch.rand(layer.locations.shape, generator=g))
    return layer


def test_masks_equal_reference() -> None:
    if not MASKS.exists():
        pytest.skip(f"reference masks missing: {MASKS}")
    cases = torch.load(MASKS, weights_only=True)["cases"]
    assert len(cases) == 16
    for c in cases:
        got = gaudi_mask(c["widths"], c["locations"], c["n"], c["sigma"])
        assert got.dtype == torch.float64 and got.shape == c["mask"].shape
        assert (got - c["mask"]).abs().max() < 1e-6, (c["n"], c["sigma"])


def test_box_is_the_gaudi_mask_on_the_grid() -> None:
    n = 37
    w = torch.tensor([0, 1, 5, 36, 37, 20], dtype=torch.float64) / n
    loc = torch.tensor([3, 0, 34, 10, 5, 30], dtype=torch.float64) / n
    (box,) = _GaudiMasks.apply(w[None], loc[None], (n,), None, True)
    assert torch.allclose(box, gaudi_mask(w, loc, n), atol=1e-12)
    assert box.sum(1).tolist() == [0, 1, 5, 36, 37, 20]


@pytest.mark.parametrize("n", [8, 9, 37])
@pytest.mark.parametrize("sigma", [None, 1.0, 10.0])
def test_analytic_gradient_passes_gradcheck(n: int, sigma: float | None) -> None:
    g = torch.Generator().manual_seed(n)
    w = torch.rand(4, dtype=torch.float64, generator=g).requires_grad_()
    loc = torch.rand(4, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gaudi_mask(a, b, n, sigma), (w, loc))


@pytest.mark.parametrize("sigma", [None, 3.0])
def test_two_axes_in_one_node_pass_gradcheck(sigma: float | None) -> None:
    """The layer computes both axes (different lengths) in one autograd node on a shared frequency grid."""
    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 3, dtype=torch.float64, generator=g).requires_grad_()
    loc = torch.rand(2, 3, dtype=torch.float64, generator=g).requires_grad_()
    out, inp = _GaudiMasks.apply(w, loc, (12, 5), sigma, False)
    assert torch.allclose(out, gaudi_mask(w[0], loc[0], 12, sigma)) and torch.allclose(
        inp, gaudi_mask(w[1], loc[1], 5, sigma)
    )
    assert torch.autograd.gradcheck(lambda a, b: _GaudiMasks.apply(a, b, (12, 5), sigma, False), (w, loc))


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 1.0])
def test_init_at_budget(budget: float) -> None:
    torch.manual_seed(0)
    layer = make_layer("gblr", 96, 64, budget=budget)
    assert 0.85 * budget * 96 * 64 <= layer.macs_per_token() <= budget * 96 * 64
    w = layer.dense_weight()
    dense_scale = torch.nn.Linear(96, 64).weight.norm()
    assert 0.7 < float(w.norm() / dense_scale) < 1.3  # the usual output scale of a dense init


def test_forward_paths_agree_and_train_everything() -> None:
    """Few tokens take the skinny-GEMM path, many the materialised one; both compute x Wᵀ + b."""
    torch.manual_seed(1)
    layer = randomise(make_layer("gblr", 64, 48, components=8, rank=2, sigma=20.0), 1)
    w = layer.dense_weight().detach()
    for tokens in (3, 4000):
        x = torch.randn(tokens, 64)
        y = layer(x)
        assert rel(y, x @ w.T + layer.bias) < 1e-5
        layer.zero_grad()
        y.square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize(("rank", "bias"), [(1, True), (2, False)])
def test_fused_box_path_equals_the_composed_one(rank: int, bias: bool) -> None:
    """The default (sharp box, rounding) materialised path runs as one autograd node; outputs and the
    gradients of x, U, V, widths, locations and bias equal the op-by-op composition in float64,
    including wrapped intervals and widths outside [0, 1] (clamped: no gradient)."""
    torch.manual_seed(3)
    comps = 24 // rank  # K·r·(in + out) > in·out: the materialised path
    layer = randomise(make_layer("gblr", 24, 40, components=comps, rank=rank, bias=bias), 3).double()
    with torch.no_grad():
        layer.widths[0, :3] = torch.tensor([1.2, -0.1, 0.5])
        layer.locations[:, 3] = torch.tensor([0.9, 0.95])  # wraps around both axes
        layer.widths[:, 3] = 0.3
    x = torch.randn(500, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(500, 40, dtype=torch.float64)
    for name, (a, b) in fused_vs_composed_gblr(layer, x, g).items():
        assert rel(a, b) < 1e-12, name
    assert layer.widths.grad[0, :2].abs().max() == 0  # widths 1.2 and -0.1 are clamped
    assert layer.widths.grad.abs().sum() > 0 and layer.locations.grad.abs().sum() > 0


def test_fused_box_path_under_autocast() -> None:
    """Under bf16 autocast the fused node runs its GEMMs in bf16, like the composed path."""
    torch.manual_seed(4)
    layer = randomise(make_layer("gblr", 32, 48), 4)
    x = torch.randn(400, 32, requires_grad=True)
    outs = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x) if fused else torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
        assert y.dtype == torch.bfloat16
        layer.zero_grad()
        x.grad = None
        y.float().square().mean().backward()
        outs.append([y.float(), x.grad.clone(), layer.U.grad.clone(), layer.locations.grad.clone()])
    for a, b in zip(*outs, strict=True):
        assert rel(a, b) < 2e-2


def test_sigma_and_structure_round_trip() -> None:
    torch.manual_seed(2)
    layer = randomise(make_layer("gblr", 40, 56, sigma=5.0), 2).eval()
    assert layer.sigma == 5.0
    layer.sigma = 50.0  # what an annealing callback does
    assert layer.sigma == 50.0
    fresh = make_layer("gblr", 40, 56, **json.loads(json.dumps(layer.structure()))).eval()
    assert fresh.sigma is None
    fresh.load_state_dict(layer.state_dict())
    assert fresh.sigma == 50.0
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    for name in ("widths", "locations"):
        settings = layer._param_optim[name]
        assert settings["weight_decay"] == 0.0 and settings["betas"] == (0.0, 0.999)


def test_projection_meets_a_global_budget() -> None:
    torch.manual_seed(3)
    layers = [
        make_layer("gblr", 64, 96, budget=1.0),
        make_layer("gblr", 32, 32, budget=1.0, rank=2, components=8),
    ]
    dense = sum(la.in_features * la.out_features for la in layers)
    before = [la.widths.detach().clone() for la in layers]
    assert float(project_widths(layers, 2.0)) == 0.0  # feasible: nothing moves
    assert all(torch.equal(b, la.widths) for b, la in zip(before, layers, strict=True))
    lam = float(project_widths(layers, 0.3, min_width=0.01))
    assert lam > 0
    assert sum(la.macs_per_token() for la in layers) <= 0.3 * dense
    assert sum(la.macs_per_token() for la in layers) >= 0.27 * dense  # a projection, not a collapse
    for b, la in zip(before, layers, strict=True):  # w = clip(w0 − λc, w_min, 1)
        c = torch.tensor([[la.out_features], [la.in_features]]) * la.rank_per_component
        assert torch.allclose(la.widths, (b - lam * c).clamp(0.01, 1.0), atol=1e-6)
    again = [la.widths.detach().clone() for la in layers]
    assert float(project_widths(layers, 0.3, min_width=0.01)) == 0.0  # idempotent
    assert all(torch.equal(a, la.widths) for a, la in zip(again, layers, strict=True))


def reference_projection(layers: list, budget: float, min_width: float) -> tuple[float, list, float]:
    """The projection as a plain bisection: float64 on the CPU, 64 steps on the exact rounded cost.
    Returns λ, the projected widths (in the layers' dtype) and their cost."""
    ws = [la.widths.detach().to("cpu", torch.float64) for la in layers]
    cs = [
        torch.tensor([[la.out_features], [la.in_features]], dtype=torch.float64) * la.rank_per_component
        for la in layers
    ]
    target = budget * sum(la.in_features * la.out_features for la in layers)

    def projected(lam: float) -> list:
        return [
            (w - lam * c).clamp(min_width, 1.0).to(la.widths.dtype)
            for w, c, la in zip(ws, cs, layers, strict=True)
        ]

    def cost(lam: float) -> float:
        return sum(
            float(_rounded_macs(p.double(), la.out_features, la.in_features, la.rank_per_component))
            for p, la in zip(projected(lam), layers, strict=True)
        )

    lam = 0.0
    if cost(0.0) > target:
        lo, hi = 0.0, max(float(((w - min_width) / c).max()) for w, c in zip(ws, cs, strict=True)) + 1e-12
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if cost(mid) <= target else (mid, hi)
        lam = hi
    return lam, projected(lam), cost(lam)


def check_against_reference(layers: list, budget: float, min_width: float) -> float:
    lam_ref, widths_ref, cost_ref = reference_projection(layers, budget, min_width)
    lam = project_widths(layers, budget, min_width)
    assert lam.dtype == torch.float64 and lam.ndim == 0
    assert float(lam) == pytest.approx(lam_ref, rel=1e-9, abs=0.0)
    assert all(torch.equal(la.widths, w) for la, w in zip(layers, widths_ref, strict=True))
    macs = sum(la.macs_per_token() for la in layers)
    dense = sum(la.in_features * la.out_features for la in layers)
    assert macs == cost_ref
    if floor_fraction(layers, min_width) <= budget:
        assert macs <= budget * dense  # never above the budget
    else:  # out of reach: every width at the floor
        assert macs == floor_fraction(layers, min_width) * dense
        assert all(torch.equal(la.widths, torch.full_like(la.widths, min_width)) for la in layers)
    return lam_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("budget", "min_width"), [(2.0, 0.0), (0.6, 0.0), (0.3, 0.0), (0.2, 0.05), (0.1, 0.01), (0.05, 0.3)]
)
def test_projection_equals_reference_bisection(dtype: torch.dtype, budget: float, min_width: float) -> None:
    """The vectorised search on the device gives the bisection's λ, widths and cost: several shapes
    and ranks, a layer without rounding, widths outside [0, 1]; a budget already met (λ = 0), active
    budgets and one out of reach (every width at the floor)."""
    g = torch.Generator().manual_seed(int(budget * 100))
    layers = [
        make_layer("gblr", 96, 64),
        make_layer("gblr", 32, 32, rank=2, components=8),
        make_layer("gblr", 50, 17, rank=3, components=5, rounding=False),
    ]
    with torch.no_grad():
        for la in layers:
            la.widths.copy_(torch.rand(la.widths.shape, generator=g) * 1.3 - 0.1)
    lam = check_against_reference([la.to(dtype) for la in layers], budget, min_width)
    assert (lam == 0.0) == (budget == 2.0)


@pytest.mark.parametrize("seed", range(4))
def test_projection_equals_reference_on_random_layers(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(12):
        m, n = torch.randint(1, 150, (2,), generator=g).tolist()
        r = int(torch.randint(1, 4, (), generator=g))
        k = int(torch.randint(1, min(m, n) + 2, (), generator=g))
        layers.append(randomise(make_layer("gblr", n, m, rank=r, components=k), seed, max_width=1.1))
    budget = float(torch.rand((), generator=g)) * 0.6 + 0.02
    assert check_against_reference(layers, budget, float(torch.rand((), generator=g)) * 0.1) > 0


def test_budget_and_mean_width_match_the_layers() -> None:
    torch.manual_seed(9)
    layers = [
        randomise(make_layer("gblr", 64, 96), 9, 1.2),
        randomise(make_layer("gblr", 32, 16, rank=2), 10),
    ]
    frac, mean = budget_and_mean_width(layers)
    dense = sum(la.in_features * la.out_features for la in layers)
    assert frac == sum(la.macs_per_token() for la in layers) / dense
    widths = torch.cat([la.widths.detach().clamp(0, 1).flatten() for la in layers]).double()
    assert mean == pytest.approx(float(widths.mean()), rel=1e-12)


@pytest.mark.gpu
def test_projection_replayed_as_a_cuda_graph_equals_the_eager_one() -> None:
    """WidthProjection captures the projection once and replays it: after every replay the widths and
    live masks equal an eager projection of the same (moved) widths, also when the budget changes."""
    from structlab.layers.gblr_fit import WidthProjection

    torch.manual_seed(0)
    eager = [
        randomise(make_layer("gblr", 768, 3072), 0, 0.9).cuda(),
        randomise(make_layer("gblr", 768, 768, rank=2, components=100), 1, 0.9).cuda(),
    ]
    graphed = copy.deepcopy(eager)
    projection = WidthProjection(graphed)
    for step, budget in enumerate((0.3, 0.3, 0.2, 0.2)):
        with torch.no_grad():  # an optimizer step moves the widths in place
            for a, b in zip(eager, graphed, strict=True):
                noise = torch.rand_like(a.widths) * 0.2 * step
                a.widths.add_(noise)
                b.widths.add_(noise)
        project_widths(eager, budget, 0.01)
        projection(budget, 0.01)
        for a, b in zip(eager, graphed, strict=True):
            live_a, live_b = a._live_columns(), b._live_columns()
            assert torch.equal(a.widths, b.widths)
            assert (live_a is None and live_b is None) or torch.equal(live_a, live_b)
    assert projection.graph is not None


@pytest.mark.gpu
def test_projection_does_not_sync_on_cuda() -> None:
    """The budget projection (what GBLRBudget runs after every optimizer step) and the live masks
    launch kernels only: under CUDA's sync debug mode "error" a host synchronisation raises. Same
    result as on the CPU."""
    torch.manual_seed(0)
    cpu = [
        randomise(make_layer("gblr", 768, 3072), 0, 0.9),
        randomise(make_layer("gblr", 768, 768, rank=2, components=100), 1, 0.9),
    ]
    layers = [copy.deepcopy(la).cuda() for la in cpu]
    project_widths(layers, 0.3, 0.01)  # the first call builds (and caches) the per-column constants
    layers[0]._set_live()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for budget in (0.25, 0.2):
            lam = project_widths(layers, budget, 0.01)
        layers[0]._set_live()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for budget in (0.3, 0.25, 0.2):
        lam_cpu = project_widths(cpu, budget, 0.01)
    assert float(lam) == pytest.approx(float(lam_cpu), rel=1e-12)
    assert sum(la.macs_per_token() for la in layers) == sum(la.macs_per_token() for la in cpu)
    assert all(torch.allclose(a.widths.cpu(), b.widths, atol=1e-6) for a, b in zip(layers, cpu, strict=True))


def blocky(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Four diagonal rank-2 blocks plus a weak global rank-3 part: GBLR's home ground."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(m, n)
    bm, bn = m // 4, n // 4
    for i in range(4):
        w[i * bm : (i + 1) * bm, i * bn : (i + 1) * bn] = torch.randn(bm, 2, generator=g) @ torch.randn(
            2, bn, generator=g
        )
    return w + 0.1 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)


@pytest.mark.parametrize("kind", ["blocky", "gaussian"])
def test_fit_to_dense_beats_low_rank(kind: str) -> None:
    w = (
        blocky(64, 96)
        if kind == "blocky"
        else torch.randn(64, 96, generator=torch.Generator().manual_seed(4))
    )
    budget = 0.25
    k = int(budget * 64 * 96 / (64 + 96))
    sv = torch.linalg.svdvals(w)
    svd_err = float(sv[k:].norm() / sv.norm())
    torch.manual_seed(5)
    layer = GaudiGBLRLinear(96, 64, budget=budget, fit_steps=100)
    err = fit_to_dense(layer, w, budget, steps=100)
    assert abs(err - rel(layer.dense_weight().detach(), w)) < 1e-5
    assert layer.macs_per_token() <= budget * 64 * 96
    assert err < (0.5 if kind == "blocky" else 1.0) * svd_err, (err, svd_err)


@pytest.mark.gpu
def test_fit_steps_do_not_sync_on_cuda() -> None:
    """fit_to_dense's Adam steps read nothing back to the host: the syncs of a fit (block init, the
    final error) are as many with 8 steps as with 3."""
    w = blocky(64, 96).cuda()
    torch.manual_seed(0)
    fit_to_dense(GaudiGBLRLinear(96, 64).cuda(), w, 0.25, steps=1)  # warm: cached constants, handles
    syncs = []
    for steps in (3, 8):
        torch.manual_seed(0)
        layer = GaudiGBLRLinear(96, 64).cuda()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit_to_dense(layer, w, 0.25, steps=steps)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs.append(sum("synchroniz" in str(x.message) for x in caught))
    assert syncs[0] == syncs[1] > 0, syncs


@pytest.mark.parametrize(
    "kw", [{}, {"rank": 2, "components": 20}, {"budget": 0.25, "sigma": 30.0}, {"rounding": False}]
)
def test_export_equals_dense_weight(kw: dict) -> None:
    torch.manual_seed(6)
    layer = randomise(make_layer("gblr", 80, 48, **kw), 6).eval()
    x = torch.randn(2, 9, 80)
    with torch.no_grad():
        ref = x @ layer.dense_weight().T + layer.bias
        for block, tile in ((16, 16), (8, 32), (64, 128)):
            exported = layer.export(block=block, tile=tile, max_cost=float("inf"))  # never dense
            assert isinstance(exported, GBLRInference) and not exported.dense
            assert rel(exported(x), ref) < 1e-4
        assert rel(layer.export()(x), ref) < 1e-4  # the defaults (may fall back to dense)
        sharp = layer.export(block=8, tile=8, max_cost=float("inf"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert rel(sharp(x).float(), ref) < 2e-2


def test_export_wraps_around_and_drops_dead_components() -> None:
    torch.manual_seed(7)
    layer = make_layer("gblr", 32, 24, components=6)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[0.5, 0.25, 0.0, 1.0, 0.5, 0.125], [0.5, 0.5, 0.5, 0.25, 0.0, 1.0]]))
        layer.locations.copy_(
            torch.tensor([[0.75, 0.0, 0.5, 0.0, 0.1, 0.9], [0.875, 0.6, 0.2, 0.9, 0.0, 0.0]])
        )
    x = torch.randn(4, 32)
    with torch.no_grad():
        exported = layer.export(block=8, tile=8, max_cost=1.0)
        assert not exported.dense
        assert rel(exported(x), x @ layer.dense_weight().T + layer.bias) < 1e-5
    # 4 live components → one z tile of 8 columns. Stage in: input blocks of component 0 ([28, 32) ∪
    # [0, 12), wrapped), 1 ([19, 32)), 3 ([29, 32) ∪ [0, 5)) and 5 (all) → all 4 blocks. Stage out: z
    # columns reaching output blocks 0/1/2 → 4/3/4 components → one 8-row chunk each.
    assert exported.plan_macs == (4 + 3) * 8 * 8
    assert exported.ptr_in.tolist() == [0, 4] and exported.ptr_out.tolist() == [0, 1, 2, 3]
    assert layer.macs_per_token() == (12 + 16) + (6 + 16) + (24 + 8) + (3 + 32)  # 2 and 4 are inactive
    no_bias = make_layer("gblr", 16, 8, bias=False)
    with torch.no_grad():
        assert rel(no_bias.export(block=8, tile=8)(x[:, :16]), x[:, :16] @ no_bias.dense_weight().T) < 1e-5


def test_export_tiles_follow_the_intervals() -> None:
    """z tiles are cut where the input intervals change, not every `tile` components: 5 components
    reading input block 0 and 5 reading block 4 make two tiles of one block each (cutting after 8
    components would cost three blocks)."""
    layer = make_layer("gblr", 64, 16, components=10)
    with torch.no_grad():
        layer.widths.copy_(torch.tensor([[1.0] * 10, [0.125] * 10]))
        layer.locations.copy_(torch.tensor([[0.0] * 10, [0.0] * 5 + [0.5] * 5]))
        exported = layer.export(block=8, tile=8, max_cost=1.0)
        x = torch.randn(3, 64)
        assert rel(exported(x), x @ layer.dense_weight().T + layer.bias) < 1e-5
    assert exported.ptr_in.tolist() == [0, 1, 2] and exported.idx_in.tolist() == [0, 4]


def test_export_triton_kernels_match_torch_path() -> None:
    """Both Triton kernels, run by Triton's interpreter on the CPU, equal the torch path on plans with
    wrapped intervals, rank 2, padded tiles, output tiles no component reaches, and token counts that
    are not tile multiples."""
    pytest.importorskip("triton")
    script = """
import torch
from structlab.layers import block_gemm as bg, make_layer
torch.manual_seed(0)
layer = make_layer("gblr", 80, 48, budget=0.25, rank=2, components=20).eval()
narrow = make_layer("gblr", 80, 48, components=4).eval()  # output rows 32…47: the bias alone
with torch.no_grad():
    layer.locations.add_(0.3)
    narrow.widths.fill_(0.25)
    narrow.locations.zero_()
    for layer, block, tile, tokens in ((layer, 16, 16, 150), (layer, 16, 32, 37), (layer, 32, 16, 64), (narrow, 16, 16, 70)):
        e = layer.export(block=block, tile=tile, max_cost=float("inf"))
        x = torch.randn(tokens, 80)
        zt = bg.blocks_in(x, e.blocks_in, e.ptr_in, e.idx_in)
        zr = bg.blocks_in_torch(x, e.blocks_in, e.ptr_in, e.idx_in)
        y = bg.blocks_out(zt, e.blocks_out, e.ptr_out, e.idx_out, e.bias)
        yr = bg.blocks_out_torch(zr, e.blocks_out, e.ptr_out, e.idx_out, e.bias)
        ref = x @ layer.dense_weight().T + layer.bias
        assert (zt - zr).abs().max() < 1e-5 and (y - yr).abs().max() < 1e-5, (block, tile)
        assert (y - ref).norm() / ref.norm() < 1e-5
        plan = (e.blocks_in, e.ptr_in, e.idx_in, e.blocks_out, e.ptr_out, e.idx_out, e.bias)
        assert torch.equal(bg.block_sparse_linear(x, *plan, kernels=True), y)
assert not bg._KERNELS_FAILED  # the kernels ran, not the fallback
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_export_falls_back_only_when_triton_cannot_launch(monkeypatch) -> None:
    """A kernel launch that Triton cannot build (no C compiler, say) selects the torch path with a
    warning; an error of our own code around the launches is raised, not turned into the slow path."""
    pytest.importorskip("triton")
    from structlab.layers import block_gemm as bg

    torch.manual_seed(10)
    e = make_layer("gblr", 32, 24).eval().export(block=8, tile=8, max_cost=float("inf"))
    plan = (e.blocks_in, e.ptr_in, e.idx_in, e.blocks_out, e.ptr_out, e.idx_out, e.bias)
    x = torch.randn(5, 32)
    ref = bg.block_sparse_linear(x, *plan, kernels=False)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(bg, "_KERNELS_FAILED", [])
    monkeypatch.setattr(bg, "_blocks_in_kernel", {(e.ptr_in.numel() - 1, 1): no_compiler})  # kernel[grid]
    with pytest.warns(UserWarning, match="without its Triton kernels"):
        assert torch.equal(bg.block_sparse_linear(x, *plan, kernels=True), ref)
    assert len(bg._KERNELS_FAILED) == 1

    def bug(*args):
        raise IndexError("a bug in the glue code")

    monkeypatch.setattr(bg, "_KERNELS_FAILED", [])
    monkeypatch.setattr(bg, "blocks_in", bug)
    with pytest.raises(IndexError):
        bg.block_sparse_linear(x, *plan, kernels=True)
    assert not bg._KERNELS_FAILED


def test_dead_components_are_skipped_after_projection() -> None:
    """Components with no rows and no columns produce nothing and get no gradient; once a projection
    has seen them the forward leaves them out (cheaper), with the same result."""
    torch.manual_seed(8)
    layer = randomise(make_layer("gblr", 64, 48), 8)
    with torch.no_grad():
        layer.widths[:, 10:] = 0.0
    x = torch.randn(3, 64)
    ref = x @ layer.dense_weight().detach().T + layer.bias.detach()
    project_widths([layer], 10.0)
    assert layer._live_mask.sum() == 10 and layer._live is None  # columns derived when first needed
    y = layer(x)
    assert layer._live.numel() == 10 and layer._live_mask is None
    assert rel(y, ref) < 1e-5
    y.square().sum().backward()
    assert layer.widths.grad[:, 10:].abs().max() == 0 and layer.U.grad[:, 10:].abs().max() == 0
    fresh = make_layer("gblr", 64, 48)
    project_widths([fresh], 0.01)
    fresh.load_state_dict(layer.state_dict())
    assert fresh._live_columns() is None  # loading may revive components: back to computing all of them


def test_compiles_in_one_graph_and_matches_eager() -> None:
    """torch.compile traces the fused node, forward and backward, with no graph break (a break per
    layer made compiled ViTs slower than eager), and computes what eager computes, before and after."""
    torch.manual_seed(8)
    layer = randomise(make_layer("gblr", 48, 80, budget=0.5), 8)
    x = torch.randn(512, 48, requires_grad=True)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        return layer(inp).square().mean()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (loss, compiled, loss):
        layer.zero_grad()
        x.grad = None
        out = fn(x)
        out.backward()
        grads.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    assert layer.widths.grad.abs().sum() > 0
    for eager, traced, again in zip(*grads, strict=True):
        assert torch.allclose(traced, eager, rtol=1e-5, atol=1e-7)
        assert torch.equal(again, eager)
