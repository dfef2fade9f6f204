"""Shared datamodule plumbing for image classification."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

# `ImageDataModule.validation_split` when validation runs on the test split: a checkpoint chosen on
# validation metrics is then chosen on test, so the training script tests the last one instead.
TEST_SPLIT = "test split"
# Seed of the hold-out permutation: fixed, so every rank, resume and run seed holds out the same images.
HOLD_OUT_SEED = 0


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

    Validation picks the best checkpoint, so it must not run on the test split. Subclasses with no
    validation split of their own call `set_val_size` in `__init__` and `hold_out` in `setup`: `val_size`
    training images become the validation split; `val_size=0` validates on the test split instead.
    """

    num_classes: int = 0
    in_chans: int = 3
    img_size: int = 224
    # Where validation runs, for the run summary: "held out from train (N images)", TEST_SPLIT, or a
    # subclass's own words for a dataset's own validation split. None: the subclass did not say.
    validation_split: str | None = None
    val_size: int = 0

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

    @property
    def validates_on_test(self) -> bool:
        """Whether validation (so checkpoint selection) runs on the test split. A subclass that does not
        set `validation_split` is judged by its datasets, which needs `setup` first."""
        if self.validation_split is None:
            return self.val_set is not None and self.val_set is self.test_set
        return self.validation_split == TEST_SPLIT

    def set_val_size(self, val_size: int) -> None:
        """Hold out `val_size` training images for validation (0: validate on the test split)."""
        if not isinstance(val_size, int) or val_size < 0:
            raise ValueError(
                f"task.data.val_size={val_size!r}: give a number of training images to hold out for "
                "validation, e.g. task.data.val_size=5000, or task.data.val_size=0 to validate on the test split"
            )
        self.val_size = val_size
        self.validation_split = f"held out from train ({val_size} images)" if val_size else TEST_SPLIT

    def hold_out(self, full: Dataset, plain: Dataset | None = None, seed: int = HOLD_OUT_SEED) -> None:
        """Set `train_set` and `val_set` from the full training set `full`: `val_size` items chosen by a
        fixed-seed permutation validate, the rest train. `plain` holds the same items as `full` under the
        evaluation transform (no augmentation) and serves the held-out ones; default `full`.
        With `val_size=0`, `val_set` is `test_set` (set it first)."""
        n, k = len(full), self.val_size
        if k == 0:
            self.train_set, self.val_set = full, self.test_set
            return
        if k > n - self.batch_size:
            most = n - self.batch_size
            fix = f"at most {most}" if most > 0 else "0 (validate on test) or lower task.data.batch_size"
            raise ValueError(
                f"task.data.val_size={k} must leave a batch ({self.batch_size}) of the {n} training images "
                f"to train on: set task.data.val_size to {fix}"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        self.train_set = Subset(full, perm[k:])
        self.val_set = Subset(full if plain is None else plain, perm[:k])

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
        dataset to a multiple of `world`; the loader drops the last partial batch). `train_set` no longer
        holds the images held out for validation."""
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


class SplitDataModule(L.LightningDataModule):
    """Loaders over `self.splits` ({"train", "val", "test"} → dataset of dict samples), filled by a
    subclass's `setup`; `batch_size` is per device. The train loader shuffles and drops its last
    partial batch; the evaluation loaders keep every sample."""

    validation_split = "its own split"

    def __init__(self, batch_size: int, eval_batch_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str) -> DataLoader:
        if split not in self.splits:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        train = split == "train"
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,  # a dataset that changes per epoch is re-sent to the workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def train_batches_per_device(self, world: int) -> int | None:
        """Full batches per process and epoch (DistributedSampler pads to a multiple of `world`)."""
        if "train" not in self.splits:
            return None
        return math.ceil(len(self.splits["train"]) / world) // self.batch_size
