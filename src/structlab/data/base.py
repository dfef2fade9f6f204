"""Shared datamodule plumbing for image classification."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class MissingDatasetError(FileNotFoundError):
    """A dataset is not on disk and could not be downloaded; the message says where we looked."""


def missing(name: str, looked: list[Path | str], how: str) -> MissingDatasetError:
    places = "\n".join(f"  - {p}" for p in looked)
    return MissingDatasetError(f"{name} not found. Looked in:\n{places}\nTo get it: {how}")


class ImageDataModule(L.LightningDataModule):
    """Owns train/val/test datasets and their loaders; subclasses fill the three datasets in `setup`.

    `batch_size` is per device (the training script derives it from the global batch size).
    Normalisation (and cheap augmentation for in-memory data) runs after the batch reached the
    device, in `on_after_batch_transfer`, so it costs no CPU worker time.
    """

    num_classes: int = 0
    in_chans: int = 3
    img_size: int = 224

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.mean, self.std = mean, std
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create this split")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def train_batches_per_device(self, world: int) -> int | None:
        """Full training batches each of `world` processes gets per epoch (DistributedSampler pads the
        dataset to a multiple of `world`; the loader drops the last partial batch)."""
        if self.train_set is None:
            return None
        return math.ceil(len(self.train_set) / world) // self.batch_size

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images → normalised floats; float input is assumed normalised already."""
        if x.dtype != torch.uint8 or self.mean is None:
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255 - mean) / std

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return self.normalize(x), y


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]
