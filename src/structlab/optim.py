"""Optimizer parameter groups and the warmup → cosine → cooldown learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn


def structure_settings(model: nn.Module) -> dict[int, dict[str, Any]]:
    """{id(parameter): settings} for every trainable parameter given its own settings by `set_optim`."""
    out: dict[int, dict[str, Any]] = {}
    for _, module in model.named_modules():
        for name, settings in getattr(module, "_param_optim", {}).items():
            p = module._parameters.get(name)
            if p is not None and p.requires_grad:
                out.setdefault(id(p), settings)
    return out


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names listed by every submodule's `no_weight_decay()` (timm ViTs: pos_embed, cls_token, ...),
    so a model wrapped in another module keeps its list."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's groups (no decay on 1-d parameters, biases and `no_weight_decay()` names; decay on the
    rest) without the structure parameters, then one group per distinct `set_optim` settings dict.

    Order and membership follow `named_modules` / `named_parameters`, so they are the same on every
    rank and after a resume; a tied parameter is listed once.
    """
    special = structure_settings(model)
    groups = []
    for g in param_groups_weight_decay(
        model, weight_decay, no_weight_decay_list=no_weight_decay_names(model)
    ):
        g["params"] = [p for p in g["params"] if id(p) not in special]
        if g["params"]:
            groups.append(g)
    own: dict[tuple, dict[str, Any]] = {}
    for p in model.parameters():  # named_parameters' order, each tensor once
        if id(p) in special:
            settings = special[id(p)]
            key = tuple(sorted((k, str(v)) for k, v in settings.items()))
            own.setdefault(key, {"params": [], **settings})["params"].append(p)
    return groups + list(own.values())


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    cooldown_steps: int = 0,
    warmup_lr: float = 1e-6,
    min_lr: float = 1e-5,
    *,
    base_lr: float,
    decay: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from `warmup_lr` to each group's lr, cosine (or, with decay="linear", linear)
    down to `min_lr`, then hold `min_lr` for `cooldown_steps` (the timm/DeiT recipe).

    `warmup_lr` and `min_lr` are the floors of a group whose lr is `base_lr` (the optimizer config's
    lr); group i's floors are scaled by lr_i / base_lr, so a structure group with 10× the lr stays
    10× above the others throughout. Every group thus follows the same multiplicative factor.
    """
    if not base_lr > 0:
        raise ValueError(f"base_lr must be positive, got {base_lr}")
    if decay not in ("cosine", "linear"):
        raise ValueError(f"scheduler decay must be 'cosine' or 'linear', got {decay!r}")
    w, floor = warmup_lr / base_lr, min_lr / base_lr
    cosine_steps = max(1, total_steps - warmup_steps - cooldown_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return w + (1 - w) * step / max(1, warmup_steps)
        if step < warmup_steps + cosine_steps:
            t = (step - warmup_steps) / cosine_steps
            left = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1 - t
            return floor + (1 - floor) * left
        return floor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def count_params(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
