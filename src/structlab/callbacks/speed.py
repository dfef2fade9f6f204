"""Training throughput measured the way a benchmark loop measures it: samples / median step time."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import torch


class SpeedMonitor(L.Callback):
    """Times each optimizer-step interval (batch end → next batch end: data, forward, backward,
    optimizer and Lightning's own work included) after `warmup_steps`, and reports samples/s.

    With `sync_cuda` the GPU is synchronised at every batch end, so the intervals are true
    step times, exactly like a CUDA-event loop; the extra sync costs one launch latency.
    """

    def __init__(self, warmup_steps: int = 5, sync_cuda: bool = True) -> None:
        self.warmup_steps, self.sync_cuda = warmup_steps, sync_cuda
        self.intervals: list[float] = []
        self.samples_per_step = 0
        self._last: float | None = None
        self._seen = 0
        self.fit_seconds = 0.0
        self._fit_start = 0.0

    def _now(self, pl_module: L.LightningModule) -> float:
        if self.sync_cuda and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # validation between epochs is not training time

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = self._now(pl_module)
        self._seen += 1
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.samples_per_step = len(x) * trainer.world_size
        if self._last is not None and self._seen > self.warmup_steps:
            self.intervals.append(now - self._last)
        self._last = now

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.intervals:
            pl_module.log("train/samples_per_sec", self.samples_per_sec(), rank_zero_only=True)

    def samples_per_sec(self) -> float:
        """Global samples per second from the median step interval (0 before any was timed)."""
        if not self.intervals:
            return 0.0
        return self.samples_per_step / statistics.median(self.intervals)
