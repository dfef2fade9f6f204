"""ImageNet as train/ and val/ ImageFolder trees, with timm's training transforms."""

from __future__ import annotations

import copy
from pathlib import Path

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import posterize
from torchvision.datasets import ImageFolder
from torchvision.datasets.vision import StandardTransform

from structlab.data.base import ImageDataModule, missing


class ImageNetDataModule(ImageDataModule):
    """`data_dir/{train,val}/<class>/<image>`. ImageNet's test labels are private, so its val/ folder is the
    test split; `val_size` training images (a fixed draw, under the evaluation transform) validate and the
    rest train. `val_size=0` validates on val/ as well, the usual but optimistic practice.

    Augmentation (RandAugment, random erasing) runs in the workers on float tensors, so
    normalisation happens there too (timm's transforms) rather than on the device.
    """

    in_chans = 3

    def __init__(
        self,
        img_size: int = 224,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        num_classes: int = 1000,
        val_size: int = 10000,
        **kw,
    ) -> None:
        kw.setdefault("mean", IMAGENET_DEFAULT_MEAN)
        kw.setdefault("std", IMAGENET_DEFAULT_STD)
        super().__init__(**kw)
        self.set_val_size(val_size)
        self.img_size = img_size
        self.aug = dict(auto_augment=auto_augment, re_prob=re_prob, interpolation=interpolation)
        self.crop_pct = crop_pct
        self.num_classes = num_classes

    def split_dir(self, split: str) -> Path:
        d = self.data_dir / split
        if not d.is_dir() or not any(d.iterdir()):
            raise missing(
                f"ImageNet {split} split",
                [d],
                f"place the ILSVRC-2012 images as {self.data_dir}/{{train,val}}/<wnid>/*.JPEG "
                "(val sorted into class folders) and set task.data.data_dir",
            )
        return d

    def prepare_data(self) -> None:
        self.split_dir("train"), self.split_dir("val")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        common = dict(input_size=self.img_size, mean=self.mean, std=self.std)
        train_tf = create_transform(is_training=True, **common, **self.aug)
        keep_a_posterize_bit(train_tf)
        eval_tf = create_transform(
            is_training=False, crop_pct=self.crop_pct, interpolation="bicubic", **common
        )
        train = ImageFolder(str(self.split_dir("train")), transform=train_tf)
        self.test_set = ImageFolder(str(self.split_dir("val")), transform=eval_tf)
        if self.test_set.classes != train.classes:
            raise ValueError("train/ and val/ hold different class folders")
        if len(train.classes) != self.num_classes:
            raise ValueError(
                f"{self.data_dir}/train has {len(train.classes)} class folders but the task expects "
                f"{self.num_classes}: set task.num_classes={len(train.classes)}"
            )
        self.hold_out(train, with_transform(train, eval_tf))


def with_transform(folder: ImageFolder, transform) -> ImageFolder:  # noqa: ANN001
    """The same ImageFolder under another transform, sharing its file list (scanning 1.28M files twice
    takes minutes)."""
    other = copy.copy(folder)
    other.transform, other.transforms = transform, StandardTransform(transform, folder.target_transform)
    return other


def keep_a_posterize_bit(transform) -> None:  # noqa: ANN001
    """timm's RandAugment with magnitude noise (`mstd`) asks PosterizeIncreasing for 0 bits whenever the
    sampled magnitude reaches 10 (a few images in a thousand at m9), and Pillow ≥ 13 raises on 0 bits,
    which would stop an ImageNet epoch. Those ops keep 1 bit instead (before Pillow 13: a black image)."""
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize_at_least_one_bit


def _posterize_at_least_one_bit(img, bits_to_keep, **kw):  # noqa: ANN001, ANN202
    return posterize(img, max(1, bits_to_keep), **kw)
