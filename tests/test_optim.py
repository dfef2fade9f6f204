"""Parameter groups (no decay on biases/norms, per-parameter settings) and the lr schedule."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

from structlab.layers import make_layer, set_optim
from structlab.optim import param_groups, warmup_cosine


def tiny_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, depth=1, num_classes=10
    )


def group_names(model: nn.Module, groups: list[dict]) -> list[tuple[dict, list[str]]]:
    """(settings without params, parameter names) per group, in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        ({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]]) for g in groups
    ]


def test_vit_groups_decay_and_no_decay() -> None:
    model = tiny_vit()
    no_decay = ["cls_token", "pos_embed", "patch_embed.proj.bias"]
    no_decay += [f"blocks.0.{n}" for n in ("norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias")]
    no_decay += [f"blocks.0.{n}" for n in ("norm2.weight", "norm2.bias", "mlp.fc1.bias", "mlp.fc2.bias")]
    no_decay += ["norm.weight", "norm.bias", "head.bias"]
    decay = ["patch_embed.proj.weight"]
    decay += [f"blocks.0.{n}.weight" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    decay += ["head.weight"]
    assert group_names(model, param_groups(model, weight_decay=0.05)) == [
        ({"weight_decay": 0.0}, no_decay),
        ({"weight_decay": 0.05}, decay),
    ]
    # pos_embed / cls_token are 3-d: only no_weight_decay() keeps them out of the decay group, also
    # when the ViT is wrapped in another module
    wrapped = nn.Sequential(model)
    [(_, nd), (_, d)] = group_names(wrapped, param_groups(wrapped, weight_decay=0.05))
    assert nd == ["0." + n for n in no_decay] and d == ["0." + n for n in decay]


def test_set_optim_settings_get_their_own_group() -> None:
    model = tiny_vit()
    set_optim(model.head, "weight", lr=0.1, weight_decay=0.0, betas=(0.0, 0.999))
    groups = group_names(model, param_groups(model, weight_decay=0.05))
    assert [s for s, _ in groups] == [
        {"weight_decay": 0.0},
        {"weight_decay": 0.05},
        {"lr": 0.1, "weight_decay": 0.0, "betas": (0.0, 0.999)},
    ]
    assert groups[2][1] == ["head.weight"] and "head.weight" not in groups[1][1]
    every = [n for _, names in groups for n in names]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    with pytest.raises(ValueError, match="no parameter 'kernel'"):
        set_optim(model.head, "kernel", lr=0.1)


def test_tied_and_frozen_parameters() -> None:
    lin, out = nn.Linear(4, 6), nn.Linear(6, 4)
    model = nn.Sequential(lin, out, nn.Linear(4, 6))
    model[2].weight = lin.weight  # tied: one tensor under two names, listed once
    set_optim(model[2], "weight", lr=0.5)  # settings given via either name apply to the tensor
    out.weight.requires_grad_(False)
    groups = group_names(model, param_groups(model, weight_decay=0.1))
    assert groups == [
        ({"weight_decay": 0.0}, ["0.bias", "1.bias", "2.bias"]),
        ({"lr": 0.5}, ["0.weight"]),
    ]


def gblr_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(make_layer("gblr", 16, 24, structure_lr=0.01), nn.GELU(), make_layer("gblr", 24, 16))


def test_gblr_structure_groups_survive_deepcopy() -> None:
    """An EMA copy or a compress-then-finetune copy keeps widths/locations out of weight decay."""
    model = gblr_model()
    ema = copy.deepcopy(model)
    groups = group_names(model, param_groups(model, weight_decay=0.05))
    assert groups == [
        ({"weight_decay": 0.0}, ["0.bias", "2.bias"]),
        ({"weight_decay": 0.05}, ["0.U", "0.V", "2.U", "2.V"]),
        ({"weight_decay": 0.0, "betas": (0.0, 0.999), "lr": 0.01}, ["0.widths", "0.locations"]),
        ({"weight_decay": 0.0, "betas": (0.0, 0.999)}, ["2.widths", "2.locations"]),
    ]
    assert group_names(ema, param_groups(ema, weight_decay=0.05)) == groups
    copied = param_groups(ema, weight_decay=0.05)
    assert copied[2]["params"][0] is ema[0].widths and copied[2]["params"][0] is not model[0].widths


def test_warmup_cosine_cooldown_values() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1e-3}])
    sched = warmup_cosine(
        opt, total_steps=110, warmup_steps=10, cooldown_steps=10, warmup_lr=1e-6, min_lr=1e-5, base_lr=1e-3
    )
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 5 / 10)
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[100] == pytest.approx(1e-5) and lrs[109] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101], strict=True))


def test_linear_decay_values() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1e-3}])
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10, min_lr=1e-5, base_lr=1e-3, decay="linear")
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[10] == pytest.approx(1e-3) and lrs[55] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    with pytest.raises(ValueError, match="'cosine' or 'linear'"):
        warmup_cosine(opt, total_steps=100, warmup_steps=10, base_lr=1e-3, decay="step")


def test_warmup_cosine_floors_scale_with_each_groups_lr() -> None:
    """Group i's floors are warmup_lr·lr_i/base_lr and min_lr·lr_i/base_lr: the ratio holds throughout."""
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-2}])
    sched = warmup_cosine(
        opt, total_steps=110, warmup_steps=10, cooldown_steps=10, warmup_lr=1e-6, min_lr=1e-5, base_lr=1e-3
    )
    lrs = []
    for _ in range(115):  # past total_steps: the floor holds
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()

    def closed_form(step: int, lr: float) -> float:
        w, lo = 1e-6 * lr / 1e-3, 1e-5 * lr / 1e-3
        if step < 10:
            return w + (lr - w) * step / 10
        if step < 100:
            return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * (step - 10) / 90))
        return lo

    for step in (0, 5, 10, 55, 99, 100, 109, 114):
        small, big = lrs[step]
        assert big / small == pytest.approx(10.0, rel=1e-12), step
        assert small == pytest.approx(closed_form(step, 1e-3), rel=1e-12), step
        assert big == pytest.approx(closed_form(step, 1e-2), rel=1e-12), step
    assert lrs[0][1] == pytest.approx(1e-5) and lrs[100][1] == pytest.approx(1e-4)  # 10× the floors
    with pytest.raises(ValueError, match="base_lr"):
        warmup_cosine(opt, total_steps=10, warmup_steps=1, base_lr=0.0)
