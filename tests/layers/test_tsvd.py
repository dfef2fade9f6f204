"""tsvd layer: ternary factors, the TSVD cost count, packed 2-bit export, state-dict round trips, QAT."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from structlab.compress.ternary import ternary_stats
from structlab.layers import make_layer
from structlab.layers.tsvd import PackedTernaryLinear, TernaryLinear, pack_ternary, unpack_ternary


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_defaults_decompose_a_dense_init() -> None:
    torch.manual_seed(0)
    layer = make_layer("tsvd", 48, 80)
    assert isinstance(layer, TernaryLinear) and layer.rank > 0
    assert layer.u.dtype == layer.v.dtype == torch.int8
    assert set(layer.u.unique().tolist()) <= {-1, 0, 1} and set(layer.v.unique().tolist()) <= {-1, 0, 1}
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"scale", "bias"}  # post-training mode: ternary factors fixed, scales tune


def test_from_dense_meets_tolerance_and_counts() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(64, 40)
    layer = TernaryLinear.from_dense(lin, tolerance=0.05)
    u, s, v = layer.factors()
    st = ternary_stats(lin.weight.detach(), u, s, v)
    assert st["spectral_rel_err"] <= 0.05
    mul, add = layer.mul_add_per_token()
    assert mul == layer.rank and add == st["nnz_u"] + st["nnz_v"]
    assert layer.macs_per_token() == (add + 1) // 2 + mul
    assert torch.equal(layer.bias, lin.bias)
    capped = TernaryLinear.from_dense(lin, max_rank=7)
    assert capped.rank == 7


@pytest.mark.parametrize("rank", [1, 5, 8, 13])
def test_pack_roundtrip(rank: int) -> None:
    t = torch.randint(-1, 2, (9, rank)).float()
    packed = pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.shape == (9, (rank + 3) // 4)
    assert torch.equal(unpack_ternary(packed, rank, torch.float32), t)


def test_export_is_packed_and_exact() -> None:
    torch.manual_seed(2)
    layer = make_layer("tsvd", 48, 80).eval()
    exported = layer.export()
    assert isinstance(exported, PackedTernaryLinear)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        ref = x @ layer.dense_weight().T + layer.bias
        assert rel(exported(x), ref) < 1e-4
        assert rel(layer(x), ref) < 1e-4
        big = torch.randn(5000, 48)  # many tokens: the other (skinny-GEMM) path
        assert rel(exported(big), big @ layer.dense_weight().T + layer.bias) < 1e-4
    r = layer.rank
    assert exported.u_packed.numel() == 80 * ((r + 3) // 4) and exported.vt_packed.numel() == 48 * (
        (r + 3) // 4
    )
    assert exported.nbytes() == exported.u_packed.numel() + exported.vt_packed.numel() + 4 * r + 4 * 80
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel(exported(x).float(), ref) < 2e-2


def test_state_dict_round_trip_and_other_rank() -> None:
    torch.manual_seed(3)
    layer = make_layer("tsvd", 32, 24, tolerance=0.1).eval()
    kw = json.loads(json.dumps(layer.structure()))
    fresh = make_layer("tsvd", 32, 24, **kw).eval()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    other = make_layer("tsvd", 32, 24, rank=3).eval()  # e.g. a resumed QAT run rebuilt at its first rank
    other.load_state_dict(layer.state_dict())
    assert other.rank == layer.rank
    with torch.no_grad():
        assert torch.equal(other(x), layer(x))


def test_qat_straight_through_and_redecompose() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(40, 32)
    layer = TernaryLinear.from_dense(lin, qat=True, tolerance=0.1)
    assert torch.equal(layer.weight, lin.weight)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"weight", "bias"}
    x = torch.randn(6, 40)
    y = layer(x)
    with torch.no_grad():
        assert rel(y, x @ layer.dense_weight().T + layer.bias) < 1e-5  # forward uses the ternary weight
    y.square().sum().backward()
    expected = (2 * y).T @ x  # straight-through: d/dW of the dense product
    assert rel(layer.weight.grad, expected) < 1e-5
    opt = torch.optim.SGD(layer.parameters(), lr=1e-4)
    opt.step()
    latent = layer.weight.detach().clone()
    old_u = layer.u.clone()
    layer.redecompose()
    assert torch.equal(layer.weight, latent)  # the latent weight carries the quantisation difference
    u, s, v = layer.factors()
    assert ternary_stats(latent, u, s, v)["spectral_rel_err"] <= 0.1
    kept = min(old_u.shape[1], layer.rank) // 2
    assert torch.equal(layer.u[:, :kept], old_u[:, :kept])  # surviving atoms are kept
    with pytest.raises(RuntimeError, match="qat"):
        make_layer("tsvd", 8, 8, rank=2).redecompose()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"tolerance": 0.0}, "layer.tolerance=0.0 is outside (0, 1)"),
        ({"tolerance": 1.0}, "layer.tolerance=1.0 is outside (0, 1)"),
        ({"tolerance": -0.05}, "layer.tolerance=-0.05 is outside (0, 1)"),
        ({"tolerance": float("nan")}, "layer.tolerance=nan is outside (0, 1)"),
        ({"max_rank": 0}, "layer.max_rank=0 must be ≥ 1"),
        ({"rank": 0}, "layer.rank=0 must be ≥ 1"),
    ],
)
def test_size_arguments_are_checked(kw: dict, message: str) -> None:
    """tsvd has no budget: its size arguments are checked instead, from scratch and from a dense layer."""
    with pytest.raises(ValueError, match=re.escape(message)):
        make_layer("tsvd", 16, 12, **kw)
    if "rank" not in kw:
        with pytest.raises(ValueError, match=re.escape(message)):
            TernaryLinear.from_dense(nn.Linear(16, 12), **kw)
    assert make_layer("tsvd", 16, 12, tolerance=0.99, max_rank=1).rank == 1


@pytest.mark.parametrize("budget", [0.1, 0.25])
def test_budget_caps_the_charged_cost(budget: float) -> None:
    """layer.budget bounds the TSVD paper's count ⌈adds/2⌉ + mults by budget·mn, from dense and after QAT."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 64)
    layer = TernaryLinear.from_dense(lin, tolerance=1e-3, budget=budget)
    assert layer.macs_per_token() <= budget * 96 * 64
    assert layer.macs_per_token() > 0.8 * budget * 96 * 64  # it spends the budget (the tolerance is far)
    free = TernaryLinear.from_dense(lin, tolerance=1e-3, max_rank=layer.rank)
    assert free.macs_per_token() >= layer.macs_per_token()
    qat = TernaryLinear.from_dense(lin, tolerance=1e-3, budget=budget, qat=True)
    with torch.no_grad():
        qat.weight.add_(0.01 * torch.randn_like(qat.weight))
    qat.redecompose()
    assert qat.macs_per_token() <= budget * 96 * 64
    with pytest.raises(ValueError, match="outside"):
        TernaryLinear(96, 64, budget=1.5)


def test_packing_round_trips_transposed_layouts() -> None:
    """Factors and buffers may arrive as transposed views (V.T, a loaded state dict): still exact."""
    t = torch.randint(-1, 2, (10, 6)).float().T
    packed = pack_ternary(t)
    assert packed.is_contiguous() and torch.equal(unpack_ternary(packed, 10, torch.float32), t)
    transposed_layout = packed.T.contiguous().T
    assert torch.equal(unpack_ternary(transposed_layout, 10, torch.float32), t)
