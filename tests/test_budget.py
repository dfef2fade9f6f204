"""Budget rules and MACs accounting, checked against torch's FlopCounterMode."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from structlab.budget import (
    check_budget,
    layer_costs,
    macs_per_sample,
    model_cost,
    rank_from_budget,
    rank_from_ratio,
)
from structlab.layers import make_layer
from structlab.surgery import replace_layers

VIT_TARGETS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]


@pytest.mark.parametrize(
    ("m", "n", "budget", "multiple", "rank"),
    [
        (768, 768, 0.5, 8, 192),  # ⌊0.5·384⌋
        (768, 3072, 0.3, 8, 184),  # ⌊0.3·614.4⌋ = 184, already aligned
        (768, 3072, 0.3, 1, 184),
        (768, 768, 0.7, 8, 264),  # ⌊268.8⌋ = 268 → 264
        (768, 768, 0.7, 1, 268),
        (80, 48, 0.5, 8, 8),  # ⌊15⌋ → 8
        (10, 10, 0.5, 8, 2),  # below the multiple: not rounded
        (4, 4, 0.01, 8, 1),  # at least 1
        (64, 64, 1.0, 8, 32),  # β = 1: the dense cost, k = mn/(m+n)
        (64, 48, 1.0, 1, 27),  # ⌊27.43⌋, below min(m, n) = 48
    ],
)
def test_rank_from_budget(m: int, n: int, budget: float, multiple: int, rank: int) -> None:
    assert rank_from_budget(m, n, budget, multiple) == rank
    if rank >= multiple and rank < min(m, n):
        assert rank * (m + n) <= budget * m * n  # never over budget


def test_rank_from_budget_rejects_nonsense() -> None:
    for bad in (0.0, -0.1, 1.0001, 4.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=re.escape(f"layer.budget={bad} is outside (0, 1]")):
            rank_from_budget(8, 8, bad)
    assert check_budget(1) == 1.0 and isinstance(check_budget(1), float)
    with pytest.raises(ValueError, match=re.escape("callbacks.gblr_budget.budget=2 is outside (0, 1]")):
        check_budget(2, key="callbacks.gblr_budget.budget")
    assert rank_from_ratio(768, 768, 0.2, multiple=1) == rank_from_budget(768, 768, 0.8, multiple=1) == 307


def test_layer_costs_and_model_cost() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 80), make_layer("svd", 80, 64, rank=8), Conv1D(32, 64), nn.ReLU())
    rows = {r["name"]: r for r in layer_costs(model)}
    assert set(rows) == {"0", "1", "2"}
    assert rows["0"] == {
        "name": "0", "type": "Linear", "in_features": 48, "out_features": 80, "params": 48 * 80 + 80,
        "macs_per_token": 3840, "dense_macs": 3840, "mul": 3840, "add": 3840, "structured": False,
    }  # fmt: skip
    assert rows["1"]["type"] == "svd" and rows["1"]["macs_per_token"] == 8 * 144 == rows["1"]["mul"]
    assert rows["1"]["params"] == 8 * 144 + 64 and rows["1"]["dense_macs"] == 80 * 64
    assert (rows["2"]["type"], rows["2"]["in_features"], rows["2"]["out_features"]) == ("Conv1D", 64, 32)
    cost = model_cost(model, tokens_per_sample=10)
    assert cost["linear_macs_per_token"] == 3840 + 1152 + 2048
    assert cost["macs_per_sample"] == 10 * (3840 + 1152 + 2048)
    assert cost["dense_macs_per_sample"] == 10 * (3840 + 5120 + 2048)
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    assert cost["structured_layers"] == 1 and cost["budget"] == pytest.approx(1152 / 5120)
    assert model_cost(nn.Sequential(nn.Linear(2, 2)))["budget"] is None


def test_mul_add_split_is_read_from_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer("svd", 8, 4, rank=2)
    monkeypatch.setattr(type(layer), "mul_add_per_token", lambda self: {"mul": 3, "add": 20}, raising=False)
    (row,) = layer_costs(nn.Sequential(layer))
    assert (row["mul"], row["add"], row["macs_per_token"]) == (3, 20, 24)


def test_dense_layer_macs_match_flop_counter() -> None:
    layer = make_layer("dense", 48, 80)
    layer.train()
    x = torch.randn(4, 7, 48)
    assert macs_per_sample(layer, x) == layer.macs_per_token() * 7 == 48 * 80 * 7
    assert layer.training  # mode restored
    assert macs_per_sample(layer, (x,), batch_size=1) == 4 * 7 * 48 * 80


def vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2
    )


def vit_expected(model: nn.Module) -> int:
    """Patch conv + per-token linear layers of the blocks + attention matmuls + head on the pooled token."""
    tokens, dim = 16 + 1, 192
    conv = dim * 3 * 8 * 8 * 16
    blocks = sum(r["macs_per_token"] for r in layer_costs(model) if r["name"].startswith("blocks."))
    attention = 2 * 2 * tokens * tokens * dim  # QKᵀ and AV, per block
    return conv + blocks * tokens + attention + dim * 10


@pytest.mark.parametrize("fused", [True, False])
def test_vit_macs_match_flop_counter(fused: bool) -> None:
    torch.manual_seed(0)
    model = vit()
    for block in model.blocks:
        block.attn.fused_attn = fused  # SDPA kernel vs explicit matmuls: both must be counted
    model.train()
    model.blocks[0].eval()
    x = torch.randn(2, 3, 32, 32)
    expected = vit_expected(model)
    assert expected == 15_854_208
    assert macs_per_sample(model, x) == expected
    assert model.training and not model.blocks[0].training and model.blocks[1].training  # modes restored
    assert all(p.grad is None for p in model.parameters())
    # with svd layers the measured graph costs exactly what the layers report
    replace_layers(model, "svd", VIT_TARGETS, budget=0.25)
    assert macs_per_sample(model, x) == vit_expected(model) < expected
    cost = model_cost(model)
    dense_blocks = 2 * (192 * 576 + 192 * 192 + 2 * 192 * 768)
    assert cost["budget"] == pytest.approx(cost["structured_macs_per_token"] / dense_blocks)
    assert 0.2 < cost["budget"] <= 0.25
