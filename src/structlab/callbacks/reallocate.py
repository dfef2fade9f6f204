"""Re-allocation of the svd layers' ranks under one global budget during training.

At chosen optimizer steps every svd layer's current product A·B is measured (its σ², float64) and
`structlab.budget.allocate_ranks` gives each layer its rank under the one budget in force
(`structlab.budget.BudgetSchedule`: a run may start wide and shrink to β at the chosen steps); each
layer whose rank drops is re-factored to the best approximation of that rank (`LowRankLinear.truncate`,
an active rank: the parameter shapes never change). Ranks only shrink or stay, see `reallocated_ranks`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch

from structlab.budget import DEFAULT_BUDGET, BudgetSchedule, check_budget
from structlab.callbacks.structure import _AfterOptimizerStep, _macs_fraction
from structlab.layers.svd import LowRankLinear, reallocated_ranks

log = logging.getLogger(__name__)
KEY = "callbacks.svd_reallocate"


def least_budget(layers: Iterable[LowRankLinear], multiple: int) -> float:
    """The least budget `allocate_ranks` can meet for these shapes: one rank step per layer."""
    cost = dense = 0
    for la in layers:
        m, n = la.out_features, la.in_features
        cost += min(multiple, max(1, min(m, n, m * n // (m + n)))) * (m + n)
        dense += m * n
    return cost / dense


def restart_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer], params: Iterable[torch.Tensor]
) -> int:
    """Start the optimizer state of `params` afresh, in place; returns how many states were reset.

    A re-factored layer's A and B are in a new basis (A ← U√S, B ← √S Vᵀ), so their moments describe
    coordinates that no longer exist. Rotating exp_avg would be possible, exp_avg_sq (elementwise)
    cannot be rotated; so every state tensor of a parameter's shape (Adam's exp_avg, exp_avg_sq,
    max_exp_avg_sq, SGD's momentum) is zeroed and its step set to 0, so that Adam's bias correction
    restarts too: with the step left at t, zeroed moments would make the next updates up to several
    times the learning rate ((1−β1^j)/√(1−β2^j) after j steps). The inactive entries then stay exactly
    zero: the forward slices them away (zero gradients), so their moments stay 0, their Adam update is
    0/(0 + ε) = 0 and AdamW's decay scales 0.
    """
    ids = {id(p) for p in params}
    reset = 0
    for optimizer in optimizers:
        for p, state in optimizer.state.items():
            if id(p) not in ids:
                continue
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and (value.shape == p.shape or key == "step"):
                    value.zero_()
                elif key == "step":
                    state[key] = 0
            reset += 1
    return reset


class SVDReallocate(_AfterOptimizerStep):
    """Re-allocate the svd layers' ranks under one global MAC budget at the optimizer steps `steps`.

    At step s (after s optimizer steps; 0: at train start) the budget in force is
    `BudgetSchedule(budget, start_budget, schedule_steps, schedule, schedule_every).at(s)`; ranks come
    from the σ² of every layer's current A·B by `structlab.budget.allocate_ranks` (plain energy: no
    calibration data is kept during training), in steps of `rank_multiple`, and each layer whose rank
    drops is truncated to its best approximation of the new rank. Ranks only shrink or stay (the
    factors hold no further directions), so start wide: build the layers at `layer.budget` ≥ the
    first budget in force, e.g. layer.budget=0.6 and budget=0.3 with steps=[1000]. The optimizer
    state of re-factored layers restarts (`restart_optimizer_state`).

    Every step's budget is met: Σ MACs ≤ budget · Σ dense MACs over the svd layers afterwards; and if
    training ends before the last step with the layers above the final `budget`, they are
    re-allocated at it then, so the final model never exceeds β. `budget=None` is
    structlab's default budget (0.5); the config passes `layer.budget`. `steps=[]` turns it off silently.

    DDP: with `broadcast` rank 0 computes the ranks and the new factors and sends them to the other
    ranks (pickled, at the chosen steps only), so ranks and parameters are identical by construction,
    whatever each device's SVD numerics; without it every rank computes the same from its replicated
    parameters. Either way the budget check runs on every rank first, from shapes alone, so a
    refusal cannot leave a rank waiting. Logs `structure/svd_budget` and `structure/svd_budget_target`
    at every re-allocation.
    """

    what = "svd"

    def __init__(
        self,
        steps: Sequence[int] = (),
        budget: float | None = None,
        start_budget: float | None = None,
        schedule_steps: int = 0,
        schedule: str = "linear",
        schedule_every: int = 1,
        rank_multiple: int = 8,
        broadcast: bool = True,
    ) -> None:
        super().__init__()
        steps = [int(s) for s in (steps or ())]
        if any(s < 0 for s in steps):
            raise ValueError(f"{KEY}.steps are optimizer steps (≥ 0), got {steps}")
        self.steps = sorted(set(steps))
        self.budget = check_budget(DEFAULT_BUDGET if budget is None else budget, f"{KEY}.budget")
        self.schedule = BudgetSchedule(
            self.budget, start=start_budget, steps=schedule_steps, shape=schedule, every=schedule_every
        )
        if rank_multiple < 1:
            raise ValueError(f"{KEY}.rank_multiple must be ≥ 1, got {rank_multiple}")
        if start_budget is not None and self.steps and self.steps[-1] < schedule_steps:
            raise ValueError(
                f"{KEY}: the last re-allocation step {self.steps[-1]} comes before the schedule reaches the "
                f"final budget {self.budget} at schedule_steps={schedule_steps}: add a step ≥ {schedule_steps}"
            )
        self.rank_multiple, self.broadcast = rank_multiple, broadcast
        self.names: list[str] = []
        self.reallocations: list[tuple[int, float, dict[str, int]]] = []  # (step, budget, ranks)

    def find_layers(self, pl_module: L.LightningModule) -> list[Any]:
        found = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, LowRankLinear)]
        self.names = [n for n, _ in found]
        return [m for _, m in found]

    def settled_step(self) -> int:
        return self.steps[-1] if self.steps and self.layers else 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.steps:  # off (the default): no layers looked up, nothing logged
            self.layers, self._last_step = [], trainer.global_step
            return
        super().on_train_start(trainer, pl_module)

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        least = least_budget(self.layers, self.rank_multiple)
        lowest = min([self.budget, *(self.schedule.at(s) for s in self.steps if s >= trainer.global_step)])
        if lowest < least:
            raise ValueError(
                f"{KEY}: budget {lowest:.4f} is below one rank step of {self.rank_multiple} per svd layer "
                f"({least:.4f} of their dense MACs): raise the budget or lower {KEY}.rank_multiple"
            )
        if trainer.is_global_zero:
            log.info(
                "SVDReallocate: %d svd layers at %.4f of their dense MACs; ranks re-allocated at steps %s "
                "(budget %s)",
                len(self.layers),
                _macs_fraction(self.layers),
                self.steps,
                ", ".join(f"{self.schedule.at(s):.4f}" for s in self.steps),
            )
        if trainer.global_step == 0 and 0 in self.steps:
            self.reallocate(trainer, self.schedule.at(0))

    def after_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step in self.steps:
            target = self.schedule.at(step)
            self.reallocate(trainer, target)
            pl_module.log("structure/svd_budget", _macs_fraction(self.layers), on_step=True, on_epoch=False)
            pl_module.log("structure/svd_budget_target", target, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.layers and _macs_fraction(self.layers) > self.budget * (1 + 1e-12):
            if trainer.is_global_zero:
                log.info(
                    "SVDReallocate: training ended at step %d before the layers reached the budget %.4f: "
                    "re-allocating now",
                    trainer.global_step,
                    self.budget,
                )
            self.reallocate(trainer, self.budget)

    def plan(self, budget: float) -> dict[str, int]:
        """The ranks `reallocated_ranks` gives the layers at `budget` (changes nothing)."""
        return reallocated_ranks(dict(zip(self.names, self.layers, strict=True)), budget, self.rank_multiple)

    def reallocate(self, trainer: L.Trainer, budget: float) -> dict[str, int]:
        """Re-allocate at `budget`: truncate the layers whose rank drops, restart their optimizer state."""
        before = {n: la.rank for n, la in zip(self.names, self.layers, strict=True)}
        layers = dict(zip(self.names, self.layers, strict=True))
        if trainer.world_size > 1 and self.broadcast:
            payload = None
            if trainer.is_global_zero:
                ranks = self.plan(budget)
                for name, k in ranks.items():
                    if k < before[name]:
                        layers[name].truncate(k)
                factors = {
                    n: (layers[n].A.detach().cpu(), layers[n].B.detach().cpu())
                    for n in ranks
                    if ranks[n] < before[n]
                }
                payload = (ranks, factors)
            ranks, factors = trainer.strategy.broadcast(payload, src=0)
            if not trainer.is_global_zero:
                for name, (a, b) in factors.items():
                    la = layers[name]
                    la.set_factors(a.to(la.A.device), b.to(la.B.device), ranks[name])
        else:
            ranks = self.plan(budget)
            for name, k in ranks.items():
                if k < before[name]:
                    layers[name].truncate(k)
        changed = [n for n in self.names if ranks[n] < before[n]]
        restart_optimizer_state(trainer.optimizers, [p for n in changed for p in (layers[n].A, layers[n].B)])
        self.reallocations.append((trainer.global_step, budget, dict(ranks)))
        if trainer.is_global_zero:
            dense = sum(la.dense_macs_per_token() for la in self.layers)
            log.info(
                "SVDReallocate: step %d, budget %.4f: %d of %d svd layers truncated, MACs %.4f → %.4f "
                "of dense",
                trainer.global_step,
                budget,
                len(changed),
                len(self.layers),
                sum(before[n] * (la.in_features + la.out_features) for n, la in layers.items()) / dense,
                _macs_fraction(self.layers),
            )
            log.debug("SVDReallocate ranks: %s", {n: f"{before[n]}→{ranks[n]}" for n in self.names})
        return ranks
