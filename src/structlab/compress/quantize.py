"""int8 weights for compressed (or dense) models with torchao, ViTyaQua's SVD + int8.

torchao quantises `nn.Linear` modules, so each low-rank layer first becomes its two factor GEMMs as
`nn.Linear`s (x ↦ Bx ↦ A(Bx) + b, the same arithmetic) and each targeted dense layer (GPT-2's Conv1D
included) an `nn.Linear`. The int8 tensors are torchao subclasses that safetensors cannot store:
`save_compressed` keeps the floating-point factors and records the scheme; `load_compressed`
quantises again (deterministic, so the reloaded model is the same).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from structlab.layers import dense_parts
from structlab.layers.svd import LowRankLinear

SCHEMES = ("int8", "int8_dynamic")  # weight-only int8 | int8 weights and per-token int8 activations


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out, inp = weight.shape
    layer = nn.Linear(inp, out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def as_linears(module: nn.Module) -> nn.Module | None:
    """The same map as plain nn.Linear modules (a Sequential of two for a low-rank layer), or None."""
    if isinstance(module, LowRankLinear):  # at its active rank (a re-allocated layer's zero columns dropped)
        k = module.rank
        return nn.Sequential(
            _linear(module.B.detach()[:k], None), _linear(module.A.detach()[:, :k], module.bias)
        )
    if isinstance(module, nn.Linear):
        return module
    if type(module).__name__ == "Conv1D":
        w, b = dense_parts(module)
        return _linear(w.detach(), None if b is None else b.detach())
    return None


def quantize_model(model: nn.Module, scheme: str, names: Iterable[str]) -> list[str]:
    """Quantise the linear maps of the modules `names` (low-rank, nn.Linear or Conv1D) in place with
    torchao; other layer types are left as they are. Returns the names quantised."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation {scheme!r}; valid: {', '.join(SCHEMES)}")
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as e:
        raise ImportError("quantize needs torchao: pip install torchao") from e
    config = Int8WeightOnlyConfig() if scheme == "int8" else Int8DynamicActivationInt8WeightConfig()
    done = []
    for name in list(names):
        plain = as_linears(model.get_submodule(name))
        if plain is None:
            continue
        quantize_(plain, config, filter_fn=lambda m, _: isinstance(m, nn.Linear))
        model.set_submodule(name, plain)
        done.append(name)
    return done
