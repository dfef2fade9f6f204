"""Stop a run when the loss stops being a number, before a bad checkpoint is written."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(L.Callback):
    """Raise with a clear message the first time the training loss is NaN or ±inf.

    Checked every `every_n_steps` batches (each check waits for the GPU). Raising inside the
    batch means no checkpoint of the broken weights is saved; the last good one stays as it was.
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % self.every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at epoch {trainer.current_epoch}, global step "
                f"{trainer.global_step}. The last good checkpoint is untouched. Try a lower learning rate "
                "(task.module.optimizer.lr), gradient clipping (trainer.gradient_clip_val=1.0), a longer warmup "
                "(task.module.scheduler.warmup_epochs) or trainer.precision=32-true."
            )
