"""CIFAR-10/100 in torchvision's on-disk format (`cifar-10-batches-py/`, `cifar-100-python/`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from structlab.data.base import ImageDataModule, missing

LAYOUT = {  # folder, train files, test files, label key
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}
MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}


def read_cifar(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Pickled batches → (N, 32, 32, 3) uint8 images and int64 labels."""
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


class ArrayImages(Dataset):
    """HWC uint8 images in memory with a per-sample torchvision transform (PIL in, uint8 tensor out)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, torch.as_tensor(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


class CIFARDataModule(ImageDataModule):
    """CIFAR has no validation split: `val_size` training images (a fixed draw, shown without
    augmentation) validate, the rest train; `val_size=0` validates on the test split."""

    in_chans, img_size = 3, 32

    def __init__(
        self, classes: int = 10, val_size: int = 5000, download: bool = True, auto_augment: bool = True, **kw
    ) -> None:
        if classes not in LAYOUT:
            raise ValueError(f"classes must be 10 or 100, got {classes}")
        kw.setdefault("mean", MEAN[classes])
        kw.setdefault("std", STD[classes])
        super().__init__(**kw)
        self.set_val_size(val_size)
        self.classes, self.download, self.auto_augment = classes, download, auto_augment
        self.num_classes = classes

    def folder(self) -> Path:
        return self.data_dir / LAYOUT[self.classes][0]

    def prepare_data(self) -> None:
        folder, train, test, _ = LAYOUT[self.classes]
        if all((self.folder() / f).is_file() for f in train + test):
            return
        reason = "download=false"
        if self.download:
            try:
                from torchvision import datasets

                getattr(datasets, f"CIFAR{self.classes}")(str(self.data_dir), download=True)
                return
            except Exception as err:
                reason = f"download failed: {type(err).__name__}: {err}"
        raise missing(
            f"CIFAR-{self.classes} ({reason})",
            [self.folder()],
            f"put torchvision's extracted {folder}/ folder under task.data.data_dir={self.data_dir}, "
            "or run once with internet and task.data.download=true",
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()
        _, train, test, key = LAYOUT[self.classes]
        # uint8 tensors out: normalisation happens on the device (ImageDataModule.normalize)
        to_uint8 = T.PILToTensor()
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        if self.auto_augment:
            aug.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
        self.test_set = ArrayImages(*read_cifar(self.folder(), test, key), to_uint8)
        images, labels = read_cifar(self.folder(), train, key)
        # two views of the same arrays: augmented for training, plain for the held-out images
        augmented = ArrayImages(images, labels, T.Compose([*aug, to_uint8]))
        self.hold_out(augmented, ArrayImages(images, labels, to_uint8))
