"""svd (low-rank) layer: rank rules, exactness at full rank, scratch init scale, export, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from structlab.layers import make_layer
from structlab.layers.svd import LowRankLinear


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_rank_from_defaults_budget_and_rank() -> None:
    layer = make_layer("svd", 48, 80)  # default β = 0.5: ⌊0.5·3840/128⌋ = 15 → aligned to 8
    assert layer.rank == 8 and layer.macs_per_token() == 8 * (48 + 80)
    assert make_layer("svd", 256, 256, budget=0.25).rank == 32  # ⌊0.25·128⌋ = 32
    assert make_layer("svd", 256, 256, budget=0.25, rank_multiple=1).rank == 32
    assert make_layer("svd", 256, 256, budget=0.3, rank_multiple=1).rank == 38  # ⌊38.4⌋
    assert make_layer("svd", 256, 256, budget=0.3).rank == 32
    assert make_layer("svd", 48, 80, rank=5).structure() == {"rank": 5}
    assert make_layer("svd", 48, 80, rank=5).num_params() == 5 * 128 + 80
    with pytest.raises(ValueError, match="not both"):
        make_layer("svd", 48, 80, rank=4, budget=0.5)
    with pytest.raises(ValueError, match=r"rank must lie in \[1, 48\]"):
        make_layer("svd", 48, 80, rank=49)
    assert make_layer("svd", 48, 80, budget=1.0).rank == 24  # 48·80/128 = 30 → 24: never above dense
    for bad in (1.5, 0.0):  # β > 1 used to give a rank costing more than the dense layer
        with pytest.raises(ValueError, match=rf"layer\.budget={bad} is outside \(0, 1\]"):
            make_layer("svd", 48, 80, budget=bad)
        with pytest.raises(ValueError, match=rf"layer\.budget={bad} is outside"):
            LowRankLinear.from_dense(nn.Linear(48, 80), budget=bad)


def test_full_rank_reproduces_dense() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    layer = LowRankLinear.from_dense(lin, rank=64)
    x = torch.randn(10, 64)
    with torch.no_grad():
        assert rel(layer.dense_weight(), lin.weight) < 1e-5
        assert rel(layer(x), lin(x)) < 1e-5
    assert layer.A.dtype == torch.float32 and layer.rank == 64


def test_truncation_is_eckart_young_and_splits_sqrt_sigma() -> None:
    torch.manual_seed(1)
    w = torch.randn(96, 64, dtype=torch.float64)
    lin = nn.Linear(64, 96, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = LowRankLinear.from_dense(lin, rank=10)
    s = torch.linalg.svdvals(w)
    with torch.no_grad():
        err = float((layer.dense_weight() - w).norm())
        assert err == pytest.approx(float(s[10:].square().sum().sqrt()), rel=1e-10)
        # √Σ split: A and B have the same column/row norms, √σ_i each
        assert torch.allclose(layer.A.norm(dim=0), s[:10].sqrt(), rtol=1e-10)
        assert torch.allclose(layer.B.norm(dim=1), s[:10].sqrt(), rtol=1e-10)
    assert layer.A.dtype == torch.float64  # keeps the dense layer's dtype


def test_scratch_init_has_nn_linear_scale() -> None:
    """At full rank the scratch init is a standard nn.Linear init: entries uniform with std 1/√(3n)."""
    torch.manual_seed(2)
    n = 256
    layer = LowRankLinear(n, 192, rank=192)
    std = float(layer.dense_weight().std())
    assert std == pytest.approx((3 * n) ** -0.5, rel=0.05)
    assert float(layer.dense_weight().abs().max()) <= n**-0.5 * (1 + 1e-4)
    truncated = LowRankLinear(n, 192)  # default β: the top singular directions of such an init
    assert 0.3 * std < float(truncated.dense_weight().std()) < std


def test_export_and_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    layer = LowRankLinear.from_dense(nn.Linear(80, 48), budget=0.5)
    with torch.no_grad():
        w = layer.dense_weight().clone()
        exported = layer.export()
        eye = torch.eye(80)
        # applying the inference form to the identity recovers Wᵀ (+ bias in every row)
        assert rel(exported(eye) - layer.bias, w.T) < 1e-4
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    (tmp_path / "structure.json").write_text(json.dumps(layer.structure()))
    fresh = LowRankLinear(80, 48, **json.loads((tmp_path / "structure.json").read_text()))
    fresh.load_state_dict(torch.load(tmp_path / "layer.pt"))
    x = torch.randn(6, 80)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_from_dense_methods_need_their_statistics() -> None:
    lin = nn.Linear(32, 32)
    with pytest.raises(ValueError, match="needs gram"):
        LowRankLinear.from_dense(lin, rank=4, method="whitened_svd")
    with pytest.raises(ValueError, match="needs abs_mean"):
        LowRankLinear.from_dense(lin, rank=4, method="asvd")
    with pytest.raises(ValueError, match="valid methods"):
        LowRankLinear.from_dense(lin, rank=4, method="svd-llm")
    x = torch.randn(100, 32)
    layer = LowRankLinear.from_dense(lin, rank=32, method="whitened_svd", gram=(x.T @ x).double())
    with torch.no_grad():
        assert rel(layer.dense_weight(), lin.weight) < 1e-5  # full rank, non-singular G: exact
    layer = LowRankLinear.from_dense(lin, rank=32, method="asvd", abs_mean=x.abs().mean(0))
    with torch.no_grad():
        assert rel(layer.dense_weight(), lin.weight) < 1e-5


def test_bf16_dense_layer_stays_bf16() -> None:
    lin = nn.Linear(32, 48).to(torch.bfloat16)
    layer = LowRankLinear.from_dense(lin, rank=16)
    assert layer.A.dtype == layer.B.dtype == layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
