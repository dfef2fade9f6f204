"""The one budget definition and the MACs/params accounting built on it.

Budget β: the fraction of the dense MACs per token of the *targeted* layers that the structured
layers may spend, summed over layers (big layers weigh more). Everything is computed from the real
shapes and the layers' own `macs_per_token()`, never from constants. The SVD-LLM "ratio" (fraction
of parameters removed) is translated into β once, here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEFAULT_BUDGET = 0.5  # a layer config's budget when it gives neither budget nor rank


def check_budget(budget: float, key: str = "layer.budget") -> float:
    """`budget` as a float, if it lies in (0, 1]; else a ValueError naming the config `key` to change.

    Above 1 a layer would cost more than the dense one it replaces (and a rank above mn/(m+n) adds
    cost without expressiveness), so it is a mistake, not a request.
    """
    if not 0 < budget <= 1:  # NaN fails this too
        raise ValueError(
            f"{key}={budget} is outside (0, 1]: it is the fraction of the dense MACs a layer may spend "
            f"(1 = the dense cost); set {key} to a value in (0, 1], e.g. {key}=0.5"
        )
    return float(budget)


@dataclass(frozen=True)
class BudgetSchedule:
    """The budget in force after `step` optimizer steps: `start` at step 0, moving to `budget` by
    step `steps` (linearly or on a half cosine), then `budget`. `start=None` (or steps=0) keeps
    `budget` throughout. The value changes only every `every` steps (a staircase), so a projection
    captured for one budget (a CUDA graph) is replayed between changes. The step is the optimizer
    step, which resume restores and every DDP rank shares: every rank is at the same budget."""

    budget: float
    start: float | None = None
    steps: int = 0
    shape: str = "linear"
    every: int = 1

    def __post_init__(self) -> None:
        check_budget(self.budget, "budget")
        if self.start is not None:
            check_budget(self.start, "start budget")
        if self.shape not in ("linear", "cosine"):
            raise ValueError(f"budget schedule shape must be 'linear' or 'cosine', got {self.shape!r}")
        if self.steps < 0 or self.every < 1:
            raise ValueError(f"schedule steps must be ≥ 0 and every ≥ 1, got {self.steps}, {self.every}")

    def at(self, step: int) -> float:
        if self.start is None or step >= self.steps:
            return self.budget
        t = (step // self.every * self.every) / self.steps
        done = t if self.shape == "linear" else 0.5 * (1 - math.cos(math.pi * t))
        return self.start + (self.budget - self.start) * done


def rank_from_budget(m: int, n: int, budget: float, multiple: int = 8) -> int:
    """Rank k of an m×n low-rank layer spending a fraction `budget` ∈ (0, 1] of the dense MACs:
    k(m+n) ≈ β·mn.

    k = ⌊β·mn/(m+n)⌋, rounded down to a multiple of `multiple` when k ≥ multiple (odd inner GEMM
    sizes ran at half speed on the H100), at least 1 (β ≤ 1 keeps it below min(m, n)).
    """
    check_budget(budget)
    if multiple < 1:
        raise ValueError(f"multiple must be ≥ 1, got {multiple}")
    k = math.floor(budget * m * n / (m + n) + 1e-9)  # tolerance: 0.5·384 must give 192, not 191
    if k >= multiple:
        k -= k % multiple
    return max(1, min(k, m, n))


def budget_from_ratio(ratio: float) -> float:
    """SVD-LLM's ratio (fraction of a layer's parameters removed) → structlab budget β = 1 − ratio.

    For a low-rank layer params and MACs per token are both k(m+n), so the two agree per layer.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio is the fraction of parameters removed and must lie in [0, 1), got {ratio}")
    return 1.0 - ratio


def ratio_from_budget(budget: float) -> float:
    """Inverse of `budget_from_ratio`, for logging both."""
    return 1.0 - budget


def rank_from_ratio(m: int, n: int, ratio: float, multiple: int = 8) -> int:
    """k = ⌊(1−ρ)·mn/(m+n)⌋ (then aligned like `rank_from_budget`; pass multiple=1 for SVD-LLM's ranks)."""
    return rank_from_budget(m, n, budget_from_ratio(ratio), multiple)


def allocate_ranks(
    shapes: Mapping[str, tuple[int, int]],
    energies: Mapping[str, torch.Tensor],
    budget: float,
    multiple: int = 8,
) -> dict[str, int | None]:
    """Ranks for low-rank layers under one global budget: Σ cost ≤ β·Σ mn over all layers, where a
    rank-k layer costs k(m+n) and a layer kept dense (None) costs mn.

    `energies[name]` are the squared singular values (descending) of what truncating that layer
    loses — σ²(W) for plain SVD, σ²(WS) with SSᵀ = XᵀX for whitened — so layer ℓ at rank k loses
    L_ℓ(k) = Σ_{i>k} e_i / Σ_i e_i, the fraction of its output energy (0 when dense). Each layer's
    options are steps of `multiple` ranks, the last one "dense" (it gains the whole tail for the cost
    up to mn); steps whose gain per parameter would rise are merged (the upper concave hull), so taking
    steps by the largest gain per parameter first is optimal for Σ_ℓ L_ℓ up to the last step taken.
    Every layer gets at least one step.
    """
    check_budget(budget, "budget")
    if multiple < 1:
        raise ValueError(f"multiple must be ≥ 1, got {multiple}")
    left = budget * sum(m * n for m, n in shapes.values())
    ranks: dict[str, int | None] = {}
    steps: list[tuple[float, int, str, int | None]] = []  # (gain per parameter, cost, layer, rank reached)
    for name, (m, n) in shapes.items():
        cap = max(1, min(m, n, m * n // (m + n)))  # from here on the dense layer is cheaper
        step = min(multiple, cap)
        e = energies[name].detach().double().cpu().clamp_min(0)
        total = float(e.sum()) or 1.0
        ranks[name] = step
        left -= step * (m + n)
        hull: list[list] = []  # [gain, cost, rank reached]
        for k in range(2 * step, cap // step * step + 1, step):
            hull.append([float(e[k - step : k].sum()) / total, step * (m + n), k])
        done = hull[-1][2] if hull else step
        hull.append([float(e[done:].sum()) / total, m * n - done * (m + n), None])  # dense
        merged: list[list] = []
        for item in hull:
            merged.append(item)
            while len(merged) > 1 and merged[-2][0] * merged[-1][1] <= merged[-1][0] * merged[-2][1]:
                last = merged.pop()
                merged[-1] = [merged[-1][0] + last[0], merged[-1][1] + last[1], last[2]]
        steps += [(g / max(c, 1), c, name, k) for g, c, k in merged if c > 0 or k is None]
    if left < 0:
        raise ValueError(f"budget {budget} is below one rank step per layer: raise it or lower multiple")
    taken: set[str] = set()  # a layer that skipped a step takes no later one (prefixes only)
    for _, cost, name, k in sorted(steps, key=lambda t: -t[0]):
        if name in taken:
            continue
        if cost <= left:
            left -= cost
            ranks[name] = k
        else:
            taken.add(name)
    return ranks


def stored_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, shared tensors once; a tensor subclass that holds
    its data in inner tensors (torchao's int8 weights) counts those (int8 data and scales)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        flatten = getattr(t, "__tensor_flatten__", None)
        inner = [getattr(t, name) for name in flatten()[0]] if flatten is not None else []
        total += sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()
    return total


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a module that computes a linear map per token, else None. Reads no weights."""
    from structlab.layers.base import StructuredLinear

    if isinstance(module, StructuredLinear | nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # HF GPT-2, weight in×out
        return module.weight.shape[0], module.nf
    return None


def _mul_add(module: nn.Module, macs: int) -> tuple[int, int]:
    """(multiplications, additions) per token: the layer's own split when it has one, else both = MACs."""
    fn = getattr(module, "mul_add_per_token", None)
    if fn is None:
        return macs, macs
    out = fn()
    if isinstance(out, Mapping):
        return int(out["mul"]), int(out["add"])
    mul, add = out
    return int(mul), int(add)


def layer_costs(model: nn.Module) -> list[dict[str, Any]]:
    """One row per linear layer (nn.Linear, HF Conv1D, structured layer) of `model`.

    Keys: name, type, in_features, out_features, params, macs_per_token, dense_macs, mul, add,
    structured. Modules nested inside a counted layer are not counted again.
    """
    from structlab.layers.base import StructuredLinear

    rows: list[dict[str, Any]] = []
    counted: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in counted):
            continue
        shape = _linear_shape(module)
        if shape is None:
            continue
        n_in, n_out = shape
        structured = isinstance(module, StructuredLinear)
        macs = int(module.macs_per_token()) if structured else n_in * n_out
        params = module.num_params() if structured else sum(p.numel() for p in module.parameters())
        mul, add = _mul_add(module, macs)
        rows.append(
            {
                "name": name,
                "type": module.layer_name if structured else type(module).__name__,
                "in_features": n_in,
                "out_features": n_out,
                "params": params,
                "macs_per_token": macs,
                "dense_macs": n_in * n_out,
                "mul": mul,
                "add": add,
                "structured": structured,
            }
        )
        counted.append(name)
    return rows


def model_cost(model: nn.Module, tokens_per_sample: int = 1) -> dict[str, Any]:
    """Totals over `layer_costs`: what the whole model costs and which budget its structured layers reach.

    MACs per sample count every linear layer as applied to `tokens_per_sample` tokens (a classifier
    head applied to one pooled token is over-counted; `macs_per_sample` measures the real graph).
    `budget` is the achieved β = Σ structured MACs / Σ their dense MACs (None without structured layers).
    """
    rows = layer_costs(model)
    st = [r for r in rows if r["structured"]]
    st_macs = sum(r["macs_per_token"] for r in st)
    st_dense = sum(r["dense_macs"] for r in st)
    linear = sum(r["macs_per_token"] for r in rows)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "linear_params": sum(r["params"] for r in rows),
        "linear_macs_per_token": linear,
        "macs_per_sample": linear * tokens_per_sample,
        "dense_macs_per_sample": sum(r["dense_macs"] for r in rows) * tokens_per_sample,
        "mul_per_sample": sum(r["mul"] for r in rows) * tokens_per_sample,
        "add_per_sample": sum(r["add"] for r in rows) * tokens_per_sample,
        "structured_layers": len(st),
        "structured_macs_per_token": st_macs,
        "structured_dense_macs_per_token": st_dense,
        "budget": st_macs / st_dense if st_dense else None,
    }


def _batch_size(x: Any) -> int | None:
    if isinstance(x, torch.Tensor):
        return x.shape[0] if x.dim() else None
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, list | tuple) else ()
    for v in values:
        b = _batch_size(v)
        if b is not None:
            return b
    return None


def _sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Flops of softmax(QKᵀ)V from the shapes (…, L, d): two matmuls, like torch's GPU SDPA formulas."""
    return 2 * math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _extra_flop_formulas() -> dict[Any, Any]:
    """Ops FlopCounterMode misses: the CPU flash-attention kernel (so CPU and GPU counts agree)."""
    from torch.utils.flop_counter import flop_registry

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None or op in flop_registry else {op: _sdpa_flops}


def macs_per_sample(model: nn.Module, example_input: Any, batch_size: int | None = None) -> int:
    """MACs of one forward pass per sample, measured by `FlopCounterMode` (its flops / 2).

    Works for any model: counts every matmul/conv/attention actually executed (the CPU attention
    kernel too, which FlopCounterMode alone skips). `example_input` is a tensor, a tuple (positional
    args) or a dict (keyword args); the batch size is read from its first tensor's leading dim unless
    given. Runs under no_grad in eval mode; each module's train/eval flag is restored afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    modes = [(m, m.training) for m in model.modules()]
    batch = batch_size if batch_size is not None else (_batch_size(example_input) or 1)
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    try:
        model.eval()
        with torch.no_grad(), counter:
            if isinstance(example_input, Mapping):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for m, training in modes:
            m.training = training
    return int(counter.get_total_flops()) // (2 * batch)
