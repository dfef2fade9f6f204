"""Check that every DDP rank holds the same weights and structure parameters."""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class RankDivergenceError(RuntimeError):
    pass


def parameter_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """Per-tensor (sum, sum of squares, a position-weighted sum) in float64: equal iff equal, in practice."""
    rows = []
    for t in list(module.parameters()) + list(module.buffers()):
        x = t.detach().double().flatten()
        w = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64).remainder_(1009)
        rows.append(torch.stack([x.sum(), (x * x).sum(), (x * w).sum()]))
    return torch.stack(rows) if rows else torch.zeros(0, 3)


class CheckRankConsistency(L.Callback):
    """At the end of training (and every `every_n_steps` optimizer steps if > 0), gather a
    fingerprint of all parameters and buffers from every rank and fail loudly if any differs."""

    def __init__(self, every_n_steps: int = 0) -> None:
        self.every_n_steps = every_n_steps
        self.checks = 0

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        mine = parameter_fingerprint(pl_module)
        everyone = trainer.strategy.all_gather(mine)  # (world, tensors, 3)
        first = everyone[0:1]
        # equal, or the same non-finite value (a sharp-box gblr layer's σ buffer is inf; inf − inf is NaN)
        same = (everyone == first) | (everyone.isnan() & first.isnan())
        self.checks += 1
        if not bool(same.all()):
            differing = int((~same).any(-1).any(0).sum())
            raise RankDivergenceError(
                f"ranks hold different parameters at step {trainer.global_step} ({differing} of "
                f"{mine.shape[0]} tensors differ); structure decisions must be identical on every rank"
            )
        if trainer.is_global_zero:
            log.info(
                "parameters identical on all %d ranks at step %d (%d tensors)",
                trainer.world_size,
                trainer.global_step,
                mine.shape[0],
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)
