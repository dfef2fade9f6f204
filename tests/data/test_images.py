"""Datamodules read the real on-disk formats and say clearly where they looked when data is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from structlab.data import (
    CIFARDataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    MissingDatasetError,
    SyntheticImageDataModule,
)
from structlab.data.fashion_mnist import read_idx


def test_fashion_mnist_from_project_dir(fmnist_dir):
    dm = FashionMNISTDataModule(data_dir=str(fmnist_dir), val_size=200, system_dir=None, download=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1000, 200, 300)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (128, 1, 28, 28) and y.dtype == torch.long
    z, _ = dm.on_after_batch_transfer((x, y), 0)
    assert z.dtype == torch.float32 and abs(z.mean().item()) < 2


def test_fashion_mnist_idx_header_is_checked(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad)


def test_fashion_mnist_missing_says_where_it_looked(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), system_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(MissingDatasetError) as err:
        dm.setup()
    text = str(err.value)
    assert str(tmp_path / "fashion-mnist") in text and "nowhere" in text and "apt-get install" in text


def test_fashion_mnist_val_size_out_of_range(fmnist_dir):
    dm = FashionMNISTDataModule(data_dir=str(fmnist_dir), val_size=5000, system_dir=None, download=False)
    with pytest.raises(ValueError, match="val_size"):
        dm.setup()


@pytest.mark.parametrize("classes, n_train, n_test", [(10, 40, 8), (100, 16, 16)])
def test_cifar_reads_torchvision_format(cifar_dir, classes, n_train, n_test):
    dm = CIFARDataModule(classes=classes, data_dir=str(cifar_dir), download=False, batch_size=4)
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set), dm.num_classes) == (n_train, n_test, classes)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and int(y.max()) < classes


def test_cifar_missing(tmp_path):
    with pytest.raises(MissingDatasetError, match="cifar-10-batches-py"):
        CIFARDataModule(data_dir=str(tmp_path), download=False).setup()


def test_imagenet_folders(imagefolder_dir):
    dm = ImageNetDataModule(data_dir=str(imagefolder_dir), num_classes=3, batch_size=2, img_size=64)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32 and len(dm.val_set) == 9


def test_imagenet_randaugment_survives_a_full_magnitude_posterize(imagefolder_dir):
    """m9 with magnitude noise reaches 10 for a few images in a thousand: 0 bits, which Pillow ≥ 13
    rejects mid-epoch. The op keeps one bit instead."""
    from PIL import Image

    dm = ImageNetDataModule(data_dir=str(imagefolder_dir), num_classes=3, batch_size=2, img_size=64)
    dm.setup()
    rand_augment = next(t for t in dm.train_set.transform.transforms if type(t).__name__ == "RandAugment")
    op = next(o for o in rand_augment.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    out = np.asarray(op(Image.new("RGB", (8, 8), (200, 100, 50))))
    assert sorted(np.unique(out).tolist()) == [0, 128]  # the top bit of 200, 100, 50


def test_imagenet_wrong_class_count_and_missing(imagefolder_dir, tmp_path):
    with pytest.raises(ValueError, match="task.num_classes=3"):
        ImageNetDataModule(data_dir=str(imagefolder_dir), num_classes=1000).setup()
    with pytest.raises(MissingDatasetError, match="ImageNet train split"):
        ImageNetDataModule(data_dir=str(tmp_path)).setup()


def test_synthetic_batches_repeat():
    dm = SyntheticImageDataModule(
        img_size=32, num_classes=7, batch_size=5, steps_per_epoch=3, on_device=False
    )
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and batches[0][0].shape == (5, 3, 32, 32) and batches[0][0] is batches[2][0]
    assert int(batches[0][1].max()) < 7
