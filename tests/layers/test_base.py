"""Contract every registered layer type must meet, parametrised over the registry."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import nn

from structlab.layers import LAYERS, StructuredLinear, dense_parts, layer_class, make_layer

N_IN, N_OUT = 48, 80
# layer types sized by a budget (a fraction of the dense MACs); tsvd is sized by a tolerance instead
BUDGETED = sorted(n for n in LAYERS if "budget" in inspect.signature(LAYERS[n].__init__).parameters)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(params=sorted(LAYERS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_registry_has_the_core_layers() -> None:
    assert {"dense", "svd"} <= set(LAYERS)
    with pytest.raises(ValueError, match="valid layer types: .*dense.*svd"):
        layer_class("monarchy")


def test_defaults_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    layer = make_layer(name, N_IN, N_OUT)
    assert isinstance(layer, StructuredLinear) and layer.layer_name == name
    x = torch.randn(3, 5, N_IN, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, N_OUT) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert trainable
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)


def test_forward_matches_dense_weight(name: str) -> None:
    """The forward computes x Wᵀ + b with W = dense_weight(), and the costs are sane."""
    torch.manual_seed(1)
    layer = make_layer(name, N_IN, N_OUT).eval()
    x = torch.randn(7, N_IN)
    with torch.no_grad():
        w = layer.dense_weight()
        assert w.shape == (N_OUT, N_IN)
        assert rel(layer(x), x @ w.T + layer.bias) < 1e-4
        assert rel(layer.export()(x), x @ w.T + layer.bias) < 1e-4
    macs = layer.macs_per_token()
    assert isinstance(macs, int) and 0 < macs
    assert layer.dense_macs_per_token() == N_IN * N_OUT
    assert layer.num_params() == sum(p.numel() for p in layer.parameters())


def test_structure_rebuilds_same_shapes(name: str) -> None:
    """structure() is JSON-able and enough to rebuild a layer that loads the state dict."""
    import json

    torch.manual_seed(2)
    layer = make_layer(name, N_IN, N_OUT).eval()
    kw = json.loads(json.dumps(layer.structure()))
    fresh = make_layer(name, N_IN, N_OUT, **kw).eval()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, N_IN)
    with torch.no_grad():
        assert torch.allclose(fresh(x), layer(x), rtol=0, atol=1e-6)


def test_from_dense_linear_and_conv1d(name: str) -> None:
    """from_dense reads nn.Linear and HF Conv1D (transposed weight) alike, keeps the bias."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    lin = nn.Linear(N_IN, N_OUT)
    conv = Conv1D(N_OUT, N_IN)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias)
    torch.manual_seed(4)  # same seed: a layer whose fit is randomised must give the same result
    a = layer_class(name).from_dense(lin)
    torch.manual_seed(4)
    b = layer_class(name).from_dense(conv)
    assert (a.in_features, a.out_features) == (N_IN, N_OUT) == (b.in_features, b.out_features)
    with torch.no_grad():
        assert torch.allclose(a.bias, lin.bias) and torch.allclose(b.bias, lin.bias)
        assert rel(b.dense_weight(), a.dense_weight()) < 1e-5
        w, _ = dense_parts(conv)
        assert torch.equal(w, lin.weight)


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        make_layer("dense", 0, 4)


def test_the_budgeted_layers() -> None:
    assert set(BUDGETED) == {"svd", "gblr", "tsvd"}  # every structured layer takes a budget; dense does not


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf")])
@pytest.mark.parametrize("name", BUDGETED)
def test_budget_outside_unit_interval_is_rejected(name: str, bad: float) -> None:
    """Every layer type reads `budget` as a fraction of the dense MACs in (0, 1]; the error names the key."""
    with pytest.raises(ValueError, match=re.escape(f"layer.budget={bad} is outside (0, 1]")):
        make_layer(name, N_IN, N_OUT, budget=bad)


@pytest.mark.parametrize("name", BUDGETED)
def test_budget_one_is_at_most_the_dense_cost(name: str) -> None:
    torch.manual_seed(5)
    macs = make_layer(name, N_IN, N_OUT, budget=1.0).macs_per_token()
    assert N_IN * N_OUT * 0.75 <= macs <= N_IN * N_OUT  # svd: 24·128 = 3072; gblr: 3801 of 3840
