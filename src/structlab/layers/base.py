"""The one base class every structured linear layer derives from."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def dense_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as out×in, bias) of an `nn.Linear`, a structured layer or an HF GPT-2 `Conv1D`.

    HF's Conv1D stores its weight transposed (in×out); we detect it by class name so that
    transformers stays an optional import here.
    """
    if isinstance(module, StructuredLinear):
        return module.dense_weight(), module.bias
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t(), module.bias
    raise TypeError(
        f"cannot read a dense weight from {type(module).__name__}: expected nn.Linear, "
        "a structlab layer or transformers' Conv1D"
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on `x` runs in here: autocast's when it is on for x's device, else x's own."""
    kind = x.device.type
    # meta tensors (cost counting) have no autocast
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class StructuredLinear(nn.Module):
    """y = x Wᵀ + b where W is kept in some structured form.

    Subclasses implement `dense_weight`, `macs_per_token`, `forward`, and `_init_from_dense`
    (fill the structure from a dense matrix).  `structure()` returns the JSON-able keyword
    arguments that rebuild the same shapes, so a compressed model can be re-created from
    the original architecture, that JSON and a state dict.
    """

    layer_name: str = "?"

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def plan_from_dense(cls, weight: torch.Tensor, **kw: Any) -> Any:
        """The part of `from_dense` that needs only the (host, float32) weight and the layer's keyword
        arguments, such as a structure search, or None when there is none. `replace_layers` runs it for
        every target at once in host threads and hands each result to `from_dense(module, plan=...)`."""
        return None

    @classmethod
    def from_dense(cls, module: nn.Module, plan: Any = None, **kw: Any) -> StructuredLinear:
        """Build a layer of this type that approximates `module` (nn.Linear or HF Conv1D); `plan` is
        what `plan_from_dense` returned for its weight and `kw` (computed here when None)."""
        weight, bias = dense_parts(module)
        weight = weight.detach()
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, **kw)
        layer.to(device=weight.device)
        with torch.no_grad():
            layer._init_from_dense(weight.float(), plan)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer.to(dtype=weight.dtype)

    def _init_from_dense(self, weight: torch.Tensor, plan: Any = None) -> None:
        raise NotImplementedError

    def reset_bias(self) -> None:
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # --- what every layer reports -----------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense matrix, out_features × in_features."""
        raise NotImplementedError

    def macs_per_token(self) -> int:
        """Multiply-accumulates for one input vector, from the current structure."""
        raise NotImplementedError

    def dense_macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def structure(self) -> dict[str, Any]:
        """Keyword arguments (JSON-able) that rebuild a layer with the same parameter shapes."""
        return {}

    def export(self) -> nn.Module:
        """An inference form computing the same function at the cost the structure promises."""
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def set_optim(module: nn.Module, name: str, **settings: Any) -> None:
    """Optimizer settings (lr, weight_decay, betas) for `module`'s own parameter `name`; read by
    `structlab.optim.param_groups`. Kept in the module's `_param_optim` dict, not on the Parameter:
    `Parameter.__deepcopy__` drops attributes (an EMA copy would lose them), a module's dict is copied."""
    if name not in module._parameters:
        raise ValueError(f"{type(module).__name__} has no parameter {name!r} of its own")
    module.__dict__.setdefault("_param_optim", {})[name] = dict(settings)
