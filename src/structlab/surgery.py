"""Model surgery: swap linear modules of any nn.Module for structured layers, by name pattern.

The one function that changes a model's layers. Patterns are regular expressions matched
against the *full* module name with `re.fullmatch`: `blocks.*.mlp.fc1` matches `blocks.3.mlp.fc1`
but not `blocks.3.mlp.fc1.lora`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from structlab.layers import StructuredLinear, dense_parts, layer_class

log = logging.getLogger(__name__)
STRUCTURE_FILE = "structure.json"


def _compile(patterns: str | Iterable[str]) -> list[re.Pattern[str]]:
    return [re.compile(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]


def _is_linear(module: nn.Module) -> bool:
    try:
        dense_parts(module)
        return True
    except TypeError:
        return False


def find_targets(
    model: nn.Module, targets: str | Iterable[str], exclude: str | Iterable[str] = ()
) -> list[str]:
    """Names of the linear modules whose full name matches a target and no exclude pattern."""
    inc, exc = _compile(targets), _compile(exclude)
    return [
        name
        for name, module in model.named_modules()
        if name
        and any(p.fullmatch(name) for p in inc)
        and not any(p.fullmatch(name) for p in exc)
        and _is_linear(module)
    ]


def replace_layers(
    model: nn.Module,
    layer: str,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] = (),
    init: str = "dense",
    per_layer: dict[str, dict[str, Any]] | None = None,
    **kw: Any,
) -> dict[str, dict[str, Any]]:
    """Replace every targeted linear module of `model` with a `layer` layer, in place.

    init="dense": each new layer is built with `from_dense(old_module, **kw)` so that at full
    rank the model computes the same function; init="scratch": a fresh layer of the same shape.
    `per_layer` maps module names to extra keyword arguments (used when rebuilding from JSON).
    Returns {name: {"layer": ..., **structure}} of what was replaced; fails when nothing matched.
    """
    if init not in ("dense", "scratch"):
        raise ValueError(f"init must be 'dense' or 'scratch', got {init!r}")
    cls = layer_class(layer)
    names = find_targets(model, targets, exclude)
    if not names:
        linear = [n for n, m in model.named_modules() if n and _is_linear(m)]
        raise ValueError(
            f"no module of {type(model).__name__} matched targets {list(_as_list(targets))} "
            f"(exclude {list(_as_list(exclude))}); linear modules are e.g. {linear[:6]}"
        )
    replaced: dict[str, dict[str, Any]] = {}
    for name in names:  # names were snapshotted above, so replacing while iterating is safe
        old = model.get_submodule(name)
        args = {**kw, **(per_layer or {}).get(name, {})}
        weight, bias = dense_parts(old)
        if init == "dense":
            new = cls.from_dense(old, **args)
        else:
            new = cls(weight.shape[1], weight.shape[0], bias=bias is not None, **args)
            new.to(device=weight.device, dtype=weight.dtype)
        model.set_submodule(name, new)
        replaced[name] = {"layer": layer, **new.structure()}
    log.info("replaced %d modules with %s layers: %s", len(names), layer, ", ".join(names))
    return replaced


def _as_list(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def model_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: {"layer": type, **structure kwargs}} for every structured layer in `model`."""
    return {
        name: {"layer": m.layer_name, **m.structure()}
        for name, m in model.named_modules()
        if isinstance(m, StructuredLinear)
    }


def save_structure(model: nn.Module, directory: str | Path) -> Path:
    """Write structure.json next to a state dict, so the model can be rebuilt without training code."""
    path = Path(directory) / STRUCTURE_FILE
    path.write_text(json.dumps(model_structure(model), indent=2, sort_keys=True))
    return path


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]] | str | Path) -> nn.Module:
    """Rebuild the structured layers named in `structure` (a dict or a structure.json path) in place.

    Layers are created from scratch with the saved shapes; load the state dict afterwards.
    """
    if not isinstance(structure, dict):
        p = Path(structure)
        structure = json.loads((p / STRUCTURE_FILE if p.is_dir() else p).read_text())
    by_type: dict[str, dict[str, dict[str, Any]]] = {}
    for name, spec in structure.items():
        spec = dict(spec)
        by_type.setdefault(spec.pop("layer"), {})[name] = spec
    for layer, specs in by_type.items():
        targets = [re.escape(n) for n in specs]
        replace_layers(model, layer, targets, init="scratch", per_layer=specs)
    return model


@torch.no_grad()
def export_model(model: nn.Module) -> nn.Module:
    """Swap every structured layer for its inference form (`export()`), in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, StructuredLinear):
            model.set_submodule(name, m.export())
    return model
