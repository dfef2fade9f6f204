"""Optimizer parameter groups and the warmup → cosine → cooldown learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Group parameters: decayed weights; biases, norms and tokens without decay; and one group
    per distinct `_optim` dict (structure parameters carry their own lr / decay / betas)."""
    groups: dict[tuple, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        special = getattr(p, "_optim", None)
        if special is not None:
            settings = dict(special)
        elif p.ndim <= 1 or name.endswith((".bias", "cls_token", "pos_embed", "reg_token")):
            settings = {"weight_decay": 0.0}
        else:
            settings = {"weight_decay": weight_decay}
        key = tuple(sorted((k, str(v)) for k, v in settings.items()))
        groups.setdefault(key, {"params": [], **settings})["params"].append(p)
    return list(groups.values())


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    cooldown_steps: int = 0,
    warmup_lr: float = 1e-6,
    min_lr: float = 1e-5,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from `warmup_lr` to each group's lr, cosine down to `min_lr`, then hold `min_lr`
    for `cooldown_steps` (the timm/DeiT recipe). Per-group: absolute floors scale with each group's lr."""
    base = [g["lr"] for g in optimizer.param_groups]
    cosine_steps = max(1, total_steps - warmup_steps - cooldown_steps)

    def factor(i: int):
        lr0 = base[i]

        def f(step: int) -> float:
            if step < warmup_steps:
                lr = warmup_lr + (lr0 - warmup_lr) * step / max(1, warmup_steps)
            elif step < warmup_steps + cosine_steps:
                t = (step - warmup_steps) / cosine_steps
                lr = min_lr + 0.5 * (lr0 - min_lr) * (1 + math.cos(math.pi * t))
            else:
                lr = min_lr
            return lr / lr0 if lr0 > 0 else 0.0

        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(i) for i in range(len(base))])


def count_params(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
