"""The global-batch rule's last piece: every optimizer step sees a whole global batch."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


def whole_step_limit(batches: int, accumulate: int, limit: int | float) -> int:
    """Micro-batches per device and epoch: the user's `limit_train_batches` (a count or a fraction of
    `batches`), cut down to a multiple of `accumulate`."""
    wanted = min(limit, batches) if isinstance(limit, int) else int(batches * limit)
    return wanted // accumulate * accumulate


class WholeGlobalBatches(L.Callback):
    """With gradient accumulation, end each epoch on a whole optimizer step.

    Lightning steps on a trailing partial accumulation (a fraction of the global batch), so 1 device
    × 2 accumulated would take one step more per epoch than 2 devices, with a different learning-rate
    schedule. Always on when accumulating (`train.py` adds it): it is part of the batch rule, not an
    option. Needs the datamodule's `train_batches_per_device`; does nothing where that is None.

    It also checks the global batch against the processes Lightning really started: under SLURM or
    torchrun the launch, not the config's `trainer.devices`, decides the world size, and a mismatch
    would silently multiply the global batch.
    """

    def __init__(self, global_batch_size: int | None = None) -> None:
        self.global_batch_size = global_batch_size

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        accumulate = trainer.accumulate_grad_batches
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if self.global_batch_size and per_device:
            actual = per_device * trainer.world_size * accumulate
            if actual != self.global_batch_size:
                raise ValueError(
                    f"global_batch_size={self.global_batch_size}, but {trainer.world_size} processes were "
                    f"started: {per_device} per device × {trainer.world_size} × {accumulate} accumulated = "
                    f"{actual}. Set trainer.devices and trainer.num_nodes to what the launcher starts "
                    "(under SLURM: --ntasks-per-node and --nodes)"
                )
        per_device_batches = getattr(trainer.datamodule, "train_batches_per_device", None)
        batches = per_device_batches(trainer.world_size) if stage == "fit" and per_device_batches else None
        if accumulate == 1 or not batches:
            return
        limit = whole_step_limit(batches, accumulate, trainer.limit_train_batches)
        if limit and limit != trainer.limit_train_batches:
            log.info(
                "training on %d of %d batches per device and epoch: %d whole steps of %d accumulated",
                limit,
                batches,
                limit // accumulate,
                accumulate,
            )
            trainer.limit_train_batches = limit
