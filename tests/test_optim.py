"""Parameter groups (no decay on biases/norms, per-parameter settings) and the lr schedule."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from structlab.layers import set_optim
from structlab.optim import param_groups, warmup_cosine


def test_groups_split_decay_and_honour_optim_dicts():
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, depth=1, num_classes=10
    )
    special = set_optim(model.head.weight, lr=0.1, weight_decay=0.0, betas=(0.0, 0.999))
    groups = param_groups(model, weight_decay=0.05)
    by_decay = {g["weight_decay"]: g for g in groups if "lr" not in g}
    decayed = {id(p) for p in by_decay[0.05]["params"]}
    assert all(p.ndim >= 2 for p in by_decay[0.05]["params"])
    assert id(model.blocks[0].norm1.weight) not in decayed and id(model.cls_token) not in decayed
    [own] = [g for g in groups if g.get("lr") == 0.1]
    assert own["params"] == [special] and own["betas"] == (0.0, 0.999)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_warmup_cosine_cooldown_values():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1e-3}])
    sched = warmup_cosine(
        opt, total_steps=110, warmup_steps=10, cooldown_steps=10, warmup_lr=1e-6, min_lr=1e-5
    )
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[100] == pytest.approx(1e-5) and lrs[109] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101], strict=True))
