"""Model surgery: swap linear modules of any nn.Module for structured layers, by name pattern.

The one function that changes a model's layers. Patterns are regular expressions matched
against the *full* module name with `re.fullmatch`: `blocks.*.mlp.fc1` matches `blocks.3.mlp.fc1`
but not `blocks.3.mlp.fc1.lora`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    untie: bool = False,
    progress: bool = False,
    **kw: Any,
) -> dict[str, dict[str, Any]]:
    """Replace every targeted linear module of `model` with a `layer` layer, in place.

    init="dense": each new layer is built with `from_dense(old_module, **kw)` so that at full
    rank the model computes the same function; init="scratch": a fresh layer of the same shape.
    `per_layer` maps module names to extra keyword arguments (used when rebuilding from JSON).
    A target whose weight or bias is tied to another module (GPT-2's lm_head and wte) is refused,
    unless `untie=True`: then the other module keeps the tensor and the new layer approximates a copy.
    `progress` shows a progress bar (a conversion from dense can take minutes for a large model).
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
    _check_ties(model, names, untie)
    args = {name: {**kw, **(per_layer or {}).get(name, {})} for name in names}
    plans = _plan_all(model, cls, names, args, progress) if init == "dense" else {}
    replaced: dict[str, dict[str, Any]] = {}
    for name in _track(names, progress, f"converting to {layer}"):  # a snapshot: safe to replace in the loop
        old = model.get_submodule(name)
        weight, bias = dense_parts(old)
        if name in plans:
            new = cls.from_dense(old, plan=plans[name], **args[name])
        elif init == "dense":
            new = cls.from_dense(old, **args[name])
        else:
            new = cls(weight.shape[1], weight.shape[0], bias=bias is not None, **args[name])
            new.to(device=weight.device, dtype=weight.dtype)
        model.set_submodule(name, new)
        replaced[name] = {"layer": layer, **new.structure()}
    log.info("replaced %d modules with %s layers: %s", len(names), layer, ", ".join(names))
    return replaced


def _track(items: Iterable[Any], progress: bool, description: str, total: int | None = None) -> Iterable[Any]:
    if not progress:
        return items
    from rich.progress import track

    return track(items, description=description, total=total, transient=True)


def _plan_all(
    model: nn.Module,
    cls: type[StructuredLinear],
    names: list[str],
    args: dict[str, dict[str, Any]],
    progress: bool,
) -> dict[str, Any]:
    """`cls.plan_from_dense` for every target at once, in one host thread per core (its LAPACK calls
    release the GIL), each with one intra-op thread: nested thread teams would oversubscribe the
    cores. {} when the layer type plans nothing."""
    if cls.plan_from_dense.__func__ is StructuredLinear.plan_from_dense.__func__:
        return {}

    def plan(name: str) -> Any:
        torch.set_num_threads(1)  # this thread's OpenMP team (the process-wide settings are set below)
        weight = dense_parts(model.get_submodule(name))[0].detach()
        return cls.plan_from_dense(weight.float().cpu(), **args[name])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(len(names), len(os.sched_getaffinity(0)))) as pool:
            plans = list(_track(pool.map(plan, names), progress, f"planning {cls.layer_name}", len(names)))
    finally:
        torch.set_num_threads(threads)
    return dict(zip(names, plans, strict=True))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do two tensors share memory (the same Parameter, or views of one storage that overlap)?"""
    if a is b:
        return True
    if a.device != b.device or a.is_meta or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _check_ties(model: nn.Module, names: list[str], untie: bool) -> None:
    """Refuse (or, with `untie`, warn about) targets whose parameters are also another module's."""
    everything = list(model.named_parameters(remove_duplicate=False))
    untied = False
    for name in names:
        own = list(model.get_submodule(name).named_parameters(prefix=name))
        for other, q in everything:
            if other.startswith(name + "."):
                continue
            tied = next((n for n, p in own if _overlap(p, q)), None)
            if tied is None:
                continue
            holder = other.rpartition(".")[0]
            if not untie:
                raise ValueError(
                    f"{tied} is tied to {other} (they share memory): replacing {name} would silently untie "
                    f"it from {holder}. Leave it out (exclude=[{name!r}]) or pass untie=True "
                    f"({holder} keeps its weight, {name} becomes a structured copy)"
                )
            log.warning("untying %s from %s: %s keeps the tensor, %s gets a copy", tied, other, holder, name)
            untied = True
    if untied and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # else HF's tie_weights() would tie them again


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


WEIGHTS_FILE = "model.safetensors"
COMPRESSION_FILE = "compression.json"


def save_compressed(model: nn.Module, directory: str | Path, info: dict[str, Any] | None = None) -> Path:
    """structure.json + model.safetensors (+ compression.json with `info`, e.g. a compression report
    and {"quantize": "int8"}): everything that rebuilds the structured model from its architecture
    (`load_compressed`), without training code. Tied tensors are stored once. Each file is written
    to a temporary name first, so a failure leaves no half-written file."""
    from safetensors.torch import save_model

    if any(type(t) is not torch.Tensor and type(t) is not nn.Parameter for t in model.state_dict().values()):
        raise TypeError(
            "the model holds tensor subclasses (a quantised model?) that safetensors cannot store: save it "
            "before quantising and pass info={'quantize': scheme}; load_compressed quantises again"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {WEIGHTS_FILE: None, STRUCTURE_FILE: model_structure(model)}
    if info is not None:
        files[COMPRESSION_FILE] = info
    for name, content in files.items():
        tmp = directory / f".{name}.tmp"
        if content is None:
            save_model(model, str(tmp))
        else:
            tmp.write_text(json.dumps(content, indent=2, sort_keys=True))
    for name in files:
        (directory / f".{name}.tmp").replace(directory / name)
    return directory


def load_compressed(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild in place what `save_compressed` wrote, into a freshly built `model` of the same
    architecture: structure first (the layers' shapes), then the weights, strictly; then the
    quantisation compression.json names, if any."""
    from safetensors.torch import load_model

    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{directory / WEIGHTS_FILE} does not exist: is {directory} a save_compressed folder?"
        )
    apply_structure(model, directory)
    load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    info_file = directory / COMPRESSION_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info.get("quantize"):
        from structlab.compress.quantize import quantize_model

        names = info.get("quantized") or list(json.loads((directory / STRUCTURE_FILE).read_text()))
        quantize_model(model, info["quantize"], names)
    return model


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
        # untie: a saved structure that replaced a tied module was made with the tie broken explicitly
        replace_layers(model, layer, targets, init="scratch", per_layer=specs, untie=True)
    return model


@torch.no_grad()
def export_model(model: nn.Module) -> nn.Module:
    """Swap every structured layer for its inference form (`export()`), in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, StructuredLinear):
            model.set_submodule(name, m.export())
    return model
