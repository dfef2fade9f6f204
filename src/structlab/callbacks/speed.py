"""Training throughput (samples/s and, where the task has tokens, tokens/s) without slowing training down.

Lightning's ThroughputMonitor does the same counting but calls torch.cuda.synchronize() after every
batch, which stalls the host's run-ahead of the GPU each step; this monitor syncs only where a timing
window opens or closes. (Two such per-step syncs cost ViT-B/16 training 8% on an H100,
docs/benchmarks.md; ThroughputMonitor itself was not measured against this one.)
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class SpeedMonitor(L.Callback):
    """Samples (and tokens) per second over the training steps after the first `warmup_steps` (compilation,
    allocator warm-up) of the run, excluding validation.

    The GPU is synchronised only where a timing window opens or closes (first timed step, end of
    each epoch), never per step, so Lightning's host-side work overlaps with GPU execution as it
    does in real training. The figure is total samples / total time over the windows: the mean
    step time, which counts every slow step that a median would hide.
    """

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = warmup_steps
        self.timed_seconds = 0.0
        self.timed_samples = 0
        self.timed_tokens = 0
        self.fit_seconds = 0.0
        self._fit_start = 0.0
        self._window_start: float | None = None
        self._window_samples = 0
        self._window_tokens = 0
        self._seen = 0

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_start

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._seen += 1
        if self._seen < self.warmup_steps:
            return
        if self._window_start is None:  # the window opens at the end of a step
            self._window_start, self._window_samples, self._window_tokens = self._now(pl_module), 0, 0
            return
        # the task knows what its batches hold (a tuple of images and labels, a dict of token ids, …)
        self._window_samples += pl_module.samples_in(batch) * trainer.world_size
        self._window_tokens += (pl_module.tokens_in(batch) or 0) * trainer.world_size

    def _close_window(self, pl_module: L.LightningModule) -> None:
        if self._window_start is not None:
            self.timed_seconds += self._now(pl_module) - self._window_start
            self.timed_samples += self._window_samples
            self.timed_tokens += self._window_tokens
            self._window_start = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_window(pl_module)
        if self.timed_samples:
            pl_module.log("train/samples_per_sec", self.samples_per_sec(), rank_zero_only=True)
            if self.timed_tokens:
                pl_module.log("train/tokens_per_sec", self.tokens_per_sec(), rank_zero_only=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_window(pl_module)  # mid-epoch validation is not training time

    def samples_per_sec(self) -> float:
        """Global training samples per second over the timed windows (0 before any)."""
        return self.timed_samples / self.timed_seconds if self.timed_seconds > 0 else 0.0

    def tokens_per_sec(self) -> float:
        """Global training tokens per second over the timed windows (0 for a task without tokens)."""
        return self.timed_tokens / self.timed_seconds if self.timed_seconds > 0 else 0.0
