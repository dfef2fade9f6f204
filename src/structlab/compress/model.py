"""Post-training compression of a whole model, in place: `compress_model`.

Every method turns each targeted linear layer into a structured layer through the layer registry's
`from_dense` (one conversion path with training's surgery): svd, asvd, whitened_svd and falor give
low-rank `svd` layers, tsvd gives ternary `tsvd` layers. `ratio` is SVD-LLM's: the fraction of the
targeted layers' parameters removed (β = 1 − ratio of their dense parameters, and of their MACs).

Calibration is streamed block by block (`structlab.compress.stages`) with float64 Gram matrices:

* update=False: every layer's statistics come from the dense model (SVD-LLM's whitening);
* update=True: the layers are compressed in the order they run, each on the inputs the already
  compressed layers before it produce, and its left factor and bias are refit in closed form to
  reproduce the dense layer's outputs (SVD-LLM's update; `structlab.compress.svd.refit_left`).

allocation="global" first measures every layer's truncation spectrum, then gives each its own rank
under the one parameter budget (`structlab.budget.allocate_ranks`). A failure restores the model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from structlab.budget import allocate_ranks, budget_from_ratio, rank_from_ratio
from structlab.compress.calibration import CalibrationStats
from structlab.compress.stages import (
    BlockInput,
    block_layout,
    calibrating,
    capture_inputs,
    run_batches,
    run_block,
)
from structlab.compress.svd import refit_left
from structlab.layers import StructuredLinear, dense_parts, layer_class
from structlab.surgery import _check_ties, find_targets

log = logging.getLogger(__name__)

METHODS = ("svd", "asvd", "whitened_svd", "falor", "tsvd")
NEEDS_CALIBRATION = ("asvd", "whitened_svd", "falor")
ALLOCATIONS = ("uniform", "global")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int | None  # None: kept dense (global allocation at the break-even rank)
    params_before: int
    params_after: int
    macs_before: int  # per token
    macs_after: int
    output_error: float | None  # ‖(W − W′)Xᵀ‖/‖WXᵀ‖ on the calibration inputs (None without them)


@dataclass
class CompressionReport:
    method: str
    ratio: float  # requested: fraction of the targets' parameters removed
    allocation: str
    update: bool
    layers: list[LayerReport]

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.params_after / self.params_before

    @property
    def budget(self) -> float:
        """The equivalent structlab budget: Σ MACs / Σ dense MACs of the targets."""
        return sum(r.macs_after for r in self.layers) / sum(r.macs_before for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "ratio": self.ratio,
            "achieved_ratio": self.achieved_ratio,
            "budget": self.budget,
            "allocation": self.allocation,
            "update": self.update,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [asdict(r) for r in self.layers],
        }


def _check_args(method: str, ratio: float, allocation: str, update: bool, calibration: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; valid methods: {', '.join(METHODS)}")
    budget_from_ratio(ratio)  # ratio in [0, 1)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; valid: {', '.join(ALLOCATIONS)}")
    if update and method == "tsvd":
        raise ValueError("update=True refits low-rank factors; tsvd's ternary factors cannot be refit")
    if calibration is None and (method in NEEDS_CALIBRATION or update):
        why = "update=True" if update and method not in NEEDS_CALIBRATION else f"method={method!r}"
        raise ValueError(
            f"{why} needs calibration data: pass calibration=<iterable of model inputs> "
            "(tensors or dicts of keyword arguments), e.g. a few hundred training sequences"
        )


class _Compressor:
    def __init__(self, model: nn.Module, names: list[str], method: str, ratio: float, **opts: Any) -> None:
        self.model, self.names, self.method, self.ratio = model, names, method, ratio
        self.alpha, self.multiple, self.tsvd_tolerance = (
            opts["alpha"],
            opts["rank_multiple"],
            opts["tsvd_tolerance"],
        )
        self.progress = opts["progress"]
        self.ranks: dict[str, int | None] = {}
        self.reports: dict[str, LayerReport] = {}

    # --- one layer -------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, int]:
        return tuple(dense_parts(self.model.get_submodule(name))[0].shape)

    def uniform_rank(self, name: str) -> int:
        m, n = self.shape(name)
        return rank_from_ratio(m, n, self.ratio, self.multiple)

    def spectrum(self, name: str, stats: CalibrationStats | None) -> torch.Tensor:
        """Squared singular values of what truncating this layer loses, descending (float64)."""
        w = dense_parts(self.model.get_submodule(name))[0].detach().double()
        if self.method in ("svd", "tsvd"):
            return torch.linalg.svdvals(w).square()
        if self.method == "asvd":
            s = stats.abs_mean(name).to(w).pow(self.alpha)
            return torch.linalg.svdvals(w * s.clamp_min(1e-6 * float(s.max()))).square()
        g = stats.gram(name).to(w)
        if self.method == "falor":
            mu = stats.mean(name).to(w)
            g = g / stats.tokens(name) - torch.outer(mu, mu)
        return torch.linalg.eigvalsh(w @ ((g + g.T) / 2) @ w.T).flip(0).clamp_min(0)

    def compress(self, name: str, stats: CalibrationStats | None) -> StructuredLinear | None:
        old = self.model.get_submodule(name)
        rank = self.ranks.get(name, self.uniform_rank(name)) if self.ranks else self.uniform_rank(name)
        weight = dense_parts(old)[0].detach()
        m, n = weight.shape
        if rank is None:
            new = None
        elif self.method == "tsvd":  # parameters counted as for low rank: r(m + n) ternary entries
            new = layer_class("tsvd").from_dense(old, max_rank=rank, tolerance=self.tsvd_tolerance)
        else:
            kw: dict[str, Any] = {}
            if stats is not None and self.method != "svd":
                kw = {"gram": stats.gram(name), "abs_mean": stats.abs_mean(name), "mean": stats.mean(name)}
                kw["tokens"] = stats.tokens(name)
            new = layer_class("svd").from_dense(old, rank=rank, method=self.method, alpha=self.alpha, **kw)
        error = None
        if stats is not None and new is not None:
            g = stats.gram(name).to(torch.float64)
            w = weight.double().to(g.device)
            d = w - new.dense_weight().detach().double().to(g.device)
            error = float(torch.einsum("ij,jk,ik->", d, g, d).clamp_min(0).sqrt()) / max(
                float(torch.einsum("ij,jk,ik->", w, g, w).clamp_min(0).sqrt()), 1e-300
            )
        self.reports[name] = LayerReport(
            name=name,
            shape=(m, n),
            rank=None if new is None else int(new.rank),
            params_before=m * n,
            params_after=m * n if new is None else sum(t.numel() for t in _factor_tensors(new)),
            macs_before=m * n,
            macs_after=m * n if new is None else new.macs_per_token(),
            output_error=error,
        )
        if new is not None:
            self.model.set_submodule(name, new)
        return new


def _factor_tensors(layer: StructuredLinear) -> list[torch.Tensor]:
    """The tensors that hold a layer's weight (not its bias): ternary factors count one per entry."""
    return [t for n, t in [*layer.named_parameters(), *layer.named_buffers()] if n in ("A", "B", "u", "v")]


def compress_model(
    model: nn.Module,
    method: str = "whitened_svd",
    ratio: float = 0.2,
    targets: str | Sequence[str] = r".*",
    exclude: str | Sequence[str] = (),
    calibration: Iterable[Any] | None = None,
    update: bool = False,
    allocation: str = "uniform",
    alpha: float = 0.5,
    rank_multiple: int = 8,
    tsvd_tolerance: float = 1e-3,
    untie: bool = False,
    progress: bool = False,
) -> CompressionReport:
    """Compress the targeted linear layers of `model` in place and report what each became.

    `targets` / `exclude`: regexes on full module names (as surgery's; by default every linear layer
    — GPT-2's tied LM head is refused unless excluded or `untie=True`). `calibration`: an iterable of
    model inputs (a tensor, a tuple of positional arguments or a dict of keyword arguments, on any
    device), iterated once per pass (twice with allocation="global"), so a list or a re-iterable
    loader. `rank_multiple` rounds ranks down to a multiple (8 suits tensor cores; 1 gives SVD-LLM's
    ranks). tsvd stops at the rank of the same parameter count or at `tsvd_tolerance`.
    """
    _check_args(method, ratio, allocation, update, calibration)
    names = find_targets(model, targets, exclude)
    if not names:
        raise ValueError(
            f"no linear module of {type(model).__name__} matches targets {targets} (exclude {exclude})"
        )
    _check_ties(model, names, untie)
    if calibration is not None and not isinstance(calibration, Sequence):
        calibration = list(calibration)  # iterated more than once
    job = _Compressor(
        model, names, method, ratio, alpha=alpha, rank_multiple=rank_multiple,
        tsvd_tolerance=tsvd_tolerance, progress=progress,
    )  # fmt: skip
    originals = {n: model.get_submodule(n) for n in names}
    try:
        with calibrating(model):
            if allocation == "global":
                spectra = _sweep(job, calibration, visit=job.spectrum)
                shapes = {n: job.shape(n) for n in names}
                job.ranks = allocate_ranks(shapes, spectra, budget_from_ratio(ratio), rank_multiple)
            _sweep(job, calibration, visit=job.compress, update=update)
    except BaseException:
        for name, module in originals.items():  # nothing half-way: the model is as it was
            model.set_submodule(name, module)
        raise
    report = CompressionReport(method, ratio, allocation, update, [job.reports[n] for n in names])
    log.info(
        "%s: %d layers, %s → %s parameters (%.1f%% removed, budget %.3f)",
        method, len(names), f"{report.params_before:,}", f"{report.params_after:,}",
        100 * report.achieved_ratio, report.budget,
    )  # fmt: skip
    return report


def _track(items: list[str], progress: bool, what: str) -> Iterable[str]:
    if not progress:
        return items
    from rich.progress import track

    return track(items, description=what, transient=True)


def _sweep(
    job: _Compressor, calibration: Sequence[Any] | None, visit, update: bool = False
) -> dict[str, Any]:
    """Call `visit(name, stats)` for every target, block by block, with the statistics of its inputs."""
    model, out = job.model, {}
    if calibration is None:  # plain svd / tsvd: no data needed
        for name in _track(job.names, job.progress, job.method):
            out[name] = visit(name, None)
        return out
    layout = block_layout(model, job.names)
    rest = job.names if layout is None else layout.rest
    if layout is not None and any(layout.inside.values()):
        inputs = capture_inputs(model, model.get_submodule(layout.blocks[0]), calibration)
        compressed_inputs = inputs  # update=True: the inputs of the compressed model, tracked apart
        for block_name in _track(layout.blocks, job.progress, f"{job.method}: blocks"):
            block, names = model.get_submodule(block_name), layout.inside[block_name]
            if update and names:
                inputs, compressed_inputs = _update_block(
                    job, block_name, names, inputs, compressed_inputs, visit, out
                )
                continue
            if names:
                with CalibrationStats(block, _relative(names, block_name)) as stats:
                    outputs = run_block(block, inputs)  # the dense block's: the next block's inputs
                for name in names:
                    out[name] = visit(name, _Renamed(stats, block_name))
            else:
                outputs = run_block(block, inputs)
            compressed_inputs = run_block(block, compressed_inputs) if update else outputs
            inputs = outputs
    if rest:  # targets outside the blocks: one pass of the whole model (compressed blocks included)
        with CalibrationStats(model, rest) as stats:
            run_batches(model, calibration)
        for name in rest:
            out[name] = visit(name, stats)
    return out


def _relative(names: list[str], prefix: str) -> list[str]:
    return [n[len(prefix) + 1 :] for n in names]


class _Renamed:
    """A block's CalibrationStats read by the model-level names of its layers."""

    def __init__(self, stats: CalibrationStats, prefix: str) -> None:
        self.stats, self.prefix = stats, prefix

    def __getattr__(self, attr: str):
        method = getattr(self.stats, attr)
        return lambda name, *a: method(name[len(self.prefix) + 1 :], *a)


def _update_block(
    job: _Compressor,
    block_name: str,
    names: list[str],
    dense_inputs: list[BlockInput],
    inputs: list[BlockInput],
    visit,
    out: dict[str, Any],
) -> tuple[list[BlockInput], list[BlockInput]]:
    """SVD-LLM's update inside one block: its layers in the order they run (layers that read the
    same tensor together), each compressed on the inputs of the block compressed so far, then its
    left factor and bias refit to the dense block's outputs. Returns the next (dense, compressed) inputs."""
    block = job.model.get_submodule(block_name)
    dense = copy.deepcopy(block)  # the reference: one block's weights
    with CalibrationStats(dense, _relative(names, block_name)) as order:
        run_block(dense, dense_inputs[:1])
    for group in order.groups().values():  # in the order the layers first ran
        paired = _PairedStats(dense, block, group[0])
        for d_in, c_in in zip(dense_inputs, inputs, strict=True):
            paired.step(d_in, c_in)
        for rel in group:
            name = f"{block_name}.{rel}"
            out[name] = new = visit(name, paired)
            if new is None or not hasattr(new, "A"):
                continue
            w, b = dense_parts(dense.get_submodule(rel))
            a, bias = refit_left(
                w.detach(), None if b is None else b.detach(), new.B.detach(), paired.cross, paired.gram_in,
                paired.sum_dense, paired.sum_in, paired.count,
            )  # fmt: skip
            with torch.no_grad():
                new.A.copy_(a)
                if bias is not None:
                    new.bias.copy_(bias)
    return run_block(dense, dense_inputs), run_block(block, inputs)


class _Stop(Exception):
    pass


class _PairedStats:
    """Statistics of one layer's input in the dense block (x) and in the compressed block (x′), for
    the same calibration tokens: Σ x′x′ᵀ, Σ x x′ᵀ, Σ x, Σ x′, Σ |x′|, N (float64). Read like
    CalibrationStats (of x′) by the methods, and by `refit_left`."""

    def __init__(self, dense: nn.Module, block: nn.Module, rel: str) -> None:
        self.dense, self.block, self.rel = dense, block, rel
        self.gram_in = self.cross = self.sum_dense = self.sum_in = self.abs_in = None
        self.count = 0

    def _input(self, block: nn.Module, x: BlockInput) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append((args[0] if args else next(iter(kwargs.values()))).detach())
            raise _Stop  # the rest of the block is not needed

        handle = block.get_submodule(self.rel).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            block(*x.args, **x.kwargs)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen[0].reshape(-1, seen[0].shape[-1]).double()

    def step(self, dense_in: BlockInput, compressed_in: BlockInput) -> None:
        x, xc = self._input(self.dense, dense_in), self._input(self.block, compressed_in)
        if not (torch.isfinite(x).all() and torch.isfinite(xc).all()):
            raise ValueError(f"non-finite inputs reached {self.rel}: calibration batches must be finite")
        if self.gram_in is None:
            n = x.shape[1]
            self.gram_in, self.cross = x.new_zeros(n, n), x.new_zeros(n, n)
            self.sum_dense, self.sum_in, self.abs_in = x.new_zeros(n), x.new_zeros(n), x.new_zeros(n)
        self.gram_in += xc.T @ xc
        self.cross += x.T @ xc
        self.sum_dense += x.sum(0)
        self.sum_in += xc.sum(0)
        self.abs_in += xc.abs().sum(0)
        self.count += x.shape[0]

    # the CalibrationStats interface, of the compressed model's inputs x′
    def gram(self, name: str) -> torch.Tensor:
        return self.gram_in

    def mean(self, name: str) -> torch.Tensor:
        return self.sum_in / max(self.count, 1)

    def abs_mean(self, name: str) -> torch.Tensor:
        return self.abs_in / max(self.count, 1)

    def tokens(self, name: str) -> int:
        return self.count
