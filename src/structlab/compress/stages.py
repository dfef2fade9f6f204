"""Calibration streamed block by block (SVD-LLM's layer-wise profiling): the inputs of a model's
first block are captured once for every calibration batch; then each block runs on its inputs and
hands its outputs to the next, so only one block's activations are held at a time, however deep
the model.

A model's blocks are the children of the list-like module (nn.ModuleList / nn.Sequential: GPT-2's
`transformer.h`, BERT's `encoder.layer`, timm's `blocks`) that holds most of the targeted layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from structlab.inputs import call_model


@dataclass
class BlockLayout:
    container: str  # the list-like module, e.g. "transformer.h"
    blocks: list[str]  # its children in order, e.g. "transformer.h.0", …
    inside: dict[str, list[str]]  # block → targeted layers in it
    rest: list[str]  # targets outside every block (an untied LM head, a classifier)


def block_layout(model: nn.Module, names: list[str]) -> BlockLayout | None:
    """The list-like module holding most of `names` and where each name lies; None when none holds any."""
    held: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):  # the outermost list-like module on the path
            prefix = ".".join(parts[:i])
            if parts[i].isdigit() and isinstance(model.get_submodule(prefix), nn.ModuleList | nn.Sequential):
                held[prefix] = held.get(prefix, 0) + 1
                break
    if not held:
        return None
    container = max(held, key=lambda p: (held[p], -len(p)))
    blocks = [f"{container}.{i}" for i in range(len(model.get_submodule(container)))]
    inside = {b: [n for n in names if n.startswith(b + ".")] for b in blocks}
    placed = {n for ns in inside.values() for n in ns}
    return BlockLayout(container, blocks, inside, [n for n in names if n not in placed])


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


@dataclass
class BlockInput:
    args: tuple
    kwargs: dict[str, Any]


def model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@contextmanager
def calibrating(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, no KV cache (a cache object replayed into every block would grow)."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    training = model.training
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
        if use_cache is not None:
            config.use_cache = use_cache


def run_batches(model: nn.Module, calibration: Iterable[Any]) -> int:
    """Run the model on every calibration batch (on its device); returns the number of batches."""
    device, count = model_device(model), 0
    for batch in calibration:
        call_model(model, move_data_to_device(batch, device))
        count += 1
    if count == 0:
        raise ValueError("the calibration data is empty: give at least one batch")
    return count


def capture_inputs(model: nn.Module, first_block: nn.Module, calibration: Iterable[Any]) -> list[BlockInput]:
    """The positional and keyword arguments `first_block` receives for every calibration batch."""
    captured: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(BlockInput(args, kwargs))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = model_device(model)
    try:
        for batch in calibration:
            try:
                call_model(model, move_data_to_device(batch, device))
            except _Captured:
                continue
            raise RuntimeError("the model finished a calibration batch without running its first block")
    finally:
        handle.remove()
    if not captured:
        raise ValueError("the calibration data is empty: give at least one batch")
    return captured


def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """Run `block` on each input; the outputs, with the other arguments unchanged, are the next
    block's inputs (blocks of a stack share their signature)."""
    out: list[BlockInput] = []
    for x in inputs:
        y = block(*x.args, **x.kwargs)
        hidden = y[0] if isinstance(y, tuple | list) else y
        if not torch.isfinite(hidden).all():
            raise ValueError(
                "a calibration batch made a block's output non-finite: check the calibration data"
            )
        if x.args:
            out.append(BlockInput((hidden, *x.args[1:]), x.kwargs))
        else:
            key = "hidden_states" if "hidden_states" in x.kwargs else next(iter(x.kwargs))
            out.append(BlockInput((), {**x.kwargs, key: hidden}))
    return out
