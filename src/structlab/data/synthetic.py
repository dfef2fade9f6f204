"""Random ImageNet-shaped data for benchmarks: no disk, no decoding, optionally already on the GPU."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from structlab.data.base import TEST_SPLIT, ImageDataModule


class _RepeatBatch(Dataset):
    """Yields the same pre-built batch `steps` times (the loader's batch_size is None)."""

    def __init__(self, make_batch, steps: int) -> None:
        self.make_batch, self.steps, self.batch = make_batch, steps, None

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        if self.batch is None:
            self.batch = self.make_batch()
        return self.batch


class SyntheticImageDataModule(ImageDataModule):
    """`steps_per_epoch` batches of fixed random images (float, already normalised) and labels.

    With `on_device=True` the batch is created once on the trainer's device, like a plain
    benchmark loop that keeps its batch on the GPU: the measurement is then of the model step alone.
    """

    def __init__(
        self,
        img_size: int = 224,
        num_classes: int = 1000,
        in_chans: int = 3,
        steps_per_epoch: int = 50,
        eval_steps: int = 2,
        on_device: bool = True,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self.validation_split = TEST_SPLIT  # one random batch serves both: nothing to select on
        self.img_size, self.num_classes, self.in_chans = img_size, num_classes, in_chans
        self.steps_per_epoch, self.eval_steps, self.on_device = steps_per_epoch, eval_steps, on_device

    def _make(self, batch_size: int):
        def make():
            device = self.trainer.strategy.root_device if (self.on_device and self.trainer) else "cpu"
            g = torch.Generator(device=device).manual_seed(0)
            shape = (batch_size, self.in_chans, self.img_size, self.img_size)
            x = torch.randn(shape, generator=g, device=device)
            y = torch.randint(0, self.num_classes, (batch_size,), generator=g, device=device)
            return x, y

        return make

    def setup(self, stage: str | None = None) -> None:
        self.train_set = _RepeatBatch(self._make(self.batch_size), self.steps_per_epoch)
        self.val_set = self.test_set = _RepeatBatch(self._make(self.eval_batch_size), self.eval_steps)

    def _loader(self, dataset, train: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0)

    def train_batches_per_device(self, world: int) -> int | None:
        return None if self.train_set is None else math.ceil(len(self.train_set) / world)  # items are batches
