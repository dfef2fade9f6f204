"""Training-time control of the layers' structure: the gblr MAC budget, the Gaudi σ schedule and
the re-decomposition of quantisation-aware tsvd layers (docs/methods.md §4–5).

All three act right after an optimizer step. Lightning has no callback hook for that moment, so
they watch `trainer.global_step` in `on_train_batch_end`: it advances exactly once per optimizer
step, whatever `accumulate_grad_batches` is, and is restored on resume. Every decision is a pure
function of the (rank-identical) parameters and the step, or is broadcast from rank 0, so DDP
ranks never diverge.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from torch import nn

from structlab.budget import BudgetSchedule
from structlab.layers.gblr import GaudiGBLRLinear
from structlab.layers.gblr_fit import WidthProjection, budget_and_mean_width, floor_fraction
from structlab.layers.tsvd import TernaryLinear

log = logging.getLogger(__name__)


def _layers_of(module: nn.Module, cls: type[nn.Module]) -> list[Any]:
    return [m for m in module.modules() if isinstance(m, cls)]


def _macs_fraction(layers: list[Any]) -> float:
    """Σ MACs / Σ dense MACs over `layers` (the budget definition of structlab.budget)."""
    dense = sum(la.dense_macs_per_token() for la in layers)
    return sum(la.macs_per_token() for la in layers) / dense if dense else 0.0


class _AfterOptimizerStep(L.Callback):
    """Calls `after_step` once per real optimizer step (so once per `accumulate_grad_batches` batches).

    Subclasses find their layers in `find_layers`; when there are none they stay idle (a debug message
    says so: every default run has these callbacks, most without the layers).
    """

    what = "structured"

    def __init__(self) -> None:
        self.layers: list[Any] = []
        self._last_step = 0

    def find_layers(self, pl_module: L.LightningModule) -> list[Any]:
        raise NotImplementedError

    def after_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hook for the subclasses, run at train start when there are layers to act on."""

    def settled_step(self) -> int:
        """The optimizer step from which the structure holds its final budget: a checkpoint saved
        before it may cost more than β, so the run does not test it (see train.tested_checkpoint)."""
        return 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After checkpoint restore: surgery on load may have replaced modules, global_step is restored.
        self.layers = self.find_layers(pl_module)
        self._last_step = trainer.global_step
        if not self.layers:
            if trainer.is_global_zero:
                log.debug("%s: the model has no %s layer; doing nothing", type(self).__name__, self.what)
            return
        self.start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:  # accumulating, or the step was skipped
            return
        self._last_step = trainer.global_step
        if self.layers:
            self.after_step(trainer, pl_module)


class GBLRBudget(_AfterOptimizerStep):
    """Keep every gblr layer of the model inside one global MAC budget during training.

    After every `every_n_steps`-th optimizer step (and once at train start and at train end) all
    widths are projected exactly onto {w ∈ [min_width, 1] : Σ MACs ≤ budget · Σ dense MACs} with
    `project_widths` (float64 on the parameters' device, deterministic: the same λ on every rank, and
    no host sync per step; replayed as one CUDA graph on a GPU). `budget=None` takes the layers' own budgets (their dense-MAC-weighted
    mean); `min_width=None` the largest of the layers' own `min_width`. Logs the achieved budget and
    the mean width once per epoch (one device-to-host transfer).
    """

    what = "gblr"

    def __init__(
        self,
        budget: float | None = None,
        min_width: float | None = None,
        every_n_steps: int = 1,
        start_budget: float | None = None,
        schedule_steps: int = 0,
        schedule: str = "linear",
        schedule_every: int = 1,
    ) -> None:
        super().__init__()
        if budget is not None and not budget > 0:
            raise ValueError(f"budget must be a positive fraction of the dense MACs, got {budget}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be ≥ 1, got {every_n_steps}")
        self.budget, self.min_width, self.every_n_steps = budget, min_width, every_n_steps
        # start wide and shrink (Gaudi-GBLR's `shrink`): checked now, built on the final budget later
        self._schedule_args = {
            "start": start_budget,
            "steps": schedule_steps,
            "shape": schedule,
            "every": schedule_every,
        }
        BudgetSchedule(1.0, **self._schedule_args)
        self._step = 0
        self.projections = 0
        self._projected_at: int | None = None
        self._checked: tuple[float, float] | None = None  # (floor, target) last checked for reachability
        self._projection: WidthProjection | None = None

    def find_layers(self, pl_module: L.LightningModule) -> list[Any]:
        return _layers_of(pl_module, GaudiGBLRLinear)

    def final_budget(self) -> float:
        """The given budget, else the layers' own (dense-MAC weighted)."""
        if self.budget is not None:
            return float(self.budget)
        dense = [la.dense_macs_per_token() for la in self.layers]
        return sum(la.budget * d for la, d in zip(self.layers, dense, strict=True)) / sum(dense)

    def settled_step(self) -> int:
        scheduled = self.layers and self._schedule_args["start"] is not None
        return self._schedule_args["steps"] if scheduled else 0

    def target(self) -> float:
        """The global budget in force at the current optimizer step (see BudgetSchedule)."""
        return BudgetSchedule(self.final_budget(), **self._schedule_args).at(self._step)

    def floor(self) -> float:
        """The lower bound of every width: the given one, else the largest of the layers' own."""
        return self.min_width if self.min_width is not None else max(la.min_width for la in self.layers)

    def project(self, trainer: L.Trainer) -> None:
        self._step = trainer.global_step
        floor, target = self.floor(), self.target()
        if self._projection is None or self._projection.layers != self.layers:
            self._projection = WidthProjection(self.layers)
        self._projection(target, floor)
        self.projections += 1
        self._projected_at = trainer.global_step
        if (floor, target) == self._checked:
            return
        # the least reachable cost (every width at the floor) depends on the floor and the shapes alone:
        # checked on the host when they change, not by reading the projected widths back every step
        self._checked = (floor, target)
        least = floor_fraction(self.layers, floor)
        if least > target * (1 + 1e-9) and trainer.is_global_zero:
            log.warning(
                "GBLRBudget: budget %.4f is unreachable with min_width %.4f (every width at its floor "
                "costs %.4f of the dense MACs); lower min_width or raise the budget",
                target,
                floor,
                least,
            )

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        before = budget_and_mean_width(self.layers)[0]
        self.project(trainer)
        if trainer.is_global_zero:
            log.info(
                "GBLRBudget: %d gblr layers, budget %.4f of their dense MACs (%.4f before the first "
                "projection), min_width %g, every %d optimizer steps",
                len(self.layers),
                self.target(),
                before,
                self.floor(),
                self.every_n_steps,
            )

    def after_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.project(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            self.layers and self._projected_at != trainer.global_step
        ):  # every_n_steps > 1: leave within budget
            self.project(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.layers:
            return
        budget, mean_width = budget_and_mean_width(self.layers)
        pl_module.log("structure/budget", budget, on_step=False, on_epoch=True)
        pl_module.log("structure/budget_target", self.target(), on_step=False, on_epoch=True)
        pl_module.log("structure/mean_width", mean_width, on_step=False, on_epoch=True)


class SigmaAnneal(_AfterOptimizerStep):
    """Anneal the Gaudi masks' Gaussian width σ of every gblr layer built with a numeric σ
    (`layer.sigma=1.0`, say) from `start` to `end`; sharp-box layers (σ = None) are left alone.

    Small σ gives smooth masks (useful gradients for widths and locations early), large σ nearly
    sharp boxes. σ is a function of the optimizer step t: progress p = t / T with T = `steps` or,
    by default, `trainer.estimated_stepping_batches`, held at `end` after T; "exp" interpolates
    log σ linearly (start·(end/start)^p), "linear" σ itself. Set at train start and after every
    optimizer step, so validation and the final model see σ(T) = end. Logs `structure/sigma`.
    """

    what = "gblr (with a numeric layer.sigma)"
    SCHEDULES = ("exp", "linear")

    def __init__(
        self, start: float = 1.0, end: float = 100.0, schedule: str = "exp", steps: int | None = None
    ) -> None:
        super().__init__()
        if schedule not in self.SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(self.SCHEDULES)}")
        if not (start > 0 and end > 0 and math.isfinite(start) and math.isfinite(end)):
            raise ValueError(f"start and end must be positive and finite, got {start}, {end}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        self.start_sigma, self.end_sigma, self.schedule, self.steps = (
            float(start),
            float(end),
            schedule,
            steps,
        )
        self.total: float = 1.0

    def find_layers(self, pl_module: L.LightningModule) -> list[Any]:
        # sigma=None asks for sharp boxes (what export() exploits): those layers are left alone
        return [g for g in _layers_of(pl_module, GaudiGBLRLinear) if g.sigma is not None]

    def value(self, step: int) -> float:
        """σ after `step` optimizer steps."""
        p = min(1.0, step / self.total)
        if self.schedule == "exp":
            return self.start_sigma * (self.end_sigma / self.start_sigma) ** p
        return self.start_sigma + (self.end_sigma - self.start_sigma) * p

    def _apply(self, step: int) -> float:
        sigma = self.value(step)
        for layer in self.layers:
            layer.sigma = sigma
        return sigma

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = self.steps if self.steps is not None else trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("SigmaAnneal needs a finite run (trainer.max_steps or max_epochs) or steps=...")
        self.total = max(1.0, float(total))
        sigma = self._apply(trainer.global_step)
        if trainer.is_global_zero:
            log.info(
                "SigmaAnneal: σ %s from %g to %g over %d optimizer steps (now %g) on %d gblr layers",
                self.schedule,
                self.start_sigma,
                self.end_sigma,
                self.total,
                sigma,
                len(self.layers),
            )

    def after_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sigma = self._apply(trainer.global_step)
        pl_module.log("structure/sigma", sigma, on_step=True, on_epoch=False)


class TernaryRequantize(_AfterOptimizerStep):
    """Re-decompose the latent weight of every quantisation-aware tsvd layer (`qat=True`) after every
    `every_n_steps`-th optimizer step, as QAT needs (docs/methods.md §4); post-training tsvd layers are
    left alone. Under DDP with `broadcast` rank 0 decomposes and sends the factors to the other
    ranks, so their ranks and patterns cannot diverge whatever the decomposition's numerics. Logs
    the mean rank (`structure/tsvd_rank`) and the achieved budget (`structure/tsvd_budget`).
    """

    what = "quantisation-aware tsvd"

    def __init__(self, every_n_steps: int = 1, broadcast: bool = True) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be ≥ 1, got {every_n_steps}")
        self.every_n_steps, self.broadcast = every_n_steps, broadcast
        self.redecompositions = 0

    def find_layers(self, pl_module: L.LightningModule) -> list[Any]:
        return [la for la in _layers_of(pl_module, TernaryLinear) if la.qat]

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info(
                "TernaryRequantize: %d QAT tsvd layers, every %d optimizer steps",
                len(self.layers),
                self.every_n_steps,
            )

    def requantize(self, trainer: L.Trainer) -> None:
        if trainer.world_size > 1 and self.broadcast:
            factors = None
            if trainer.is_global_zero:
                for layer in self.layers:
                    layer.redecompose()
                factors = [(la.u.cpu(), la.scale.cpu(), la.v.cpu()) for la in self.layers]
            factors = trainer.strategy.broadcast(factors, src=0)
            if not trainer.is_global_zero:
                for layer, (u, s, v) in zip(self.layers, factors, strict=True):
                    dev = layer.weight.device
                    layer._set_factors(u.to(dev), s.to(dev), v.to(dev))
        else:
            for layer in self.layers:
                layer.redecompose()
        self.redecompositions += 1

    def after_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        self.requantize(trainer)
        pl_module.log("structure/tsvd_rank", sum(la.rank for la in self.layers) / len(self.layers))
        pl_module.log("structure/tsvd_budget", _macs_fraction(self.layers))
