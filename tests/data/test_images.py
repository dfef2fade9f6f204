"""Datamodules read the real on-disk formats and say clearly where they looked when data is missing."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from structlab.data import (
    CIFARDataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    MissingDatasetError,
    SyntheticImageDataModule,
)
from structlab.data.base import TEST_SPLIT
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


def _fmnist(fmnist_dir, **kw) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(data_dir=str(fmnist_dir), system_dir=None, download=False, **kw)
    dm.setup()
    return dm


def test_fashion_mnist_hold_out_is_the_fixed_seed_permutation(fmnist_dir):
    """The shared hold-out keeps Fashion-MNIST's split as it was: the first val_size of a seed-0 permutation."""
    torch.manual_seed(123)  # the run's seed must not move the split
    dm = _fmnist(fmnist_dir, val_size=200)
    perm = torch.randperm(1200, generator=torch.Generator().manual_seed(0)).tolist()
    assert dm.val_set.indices == perm[:200] and dm.train_set.indices == perm[200:]
    assert dm.val_set.dataset is dm.train_set.dataset  # augmentation runs on the device, for training only
    assert dm.validation_split == "held out from train (200 images)" and dm.validates_on_test is False


def test_fashion_mnist_val_size_zero_validates_on_test(fmnist_dir):
    dm = _fmnist(fmnist_dir, val_size=0)
    assert len(dm.train_set) == 1200 and dm.val_set is dm.test_set and len(dm.val_set) == 300
    assert dm.validates_on_test is True and dm.validation_split == TEST_SPLIT == "test split"


CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _cifar10_raw(cifar_dir: Path, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pickled rows as (N, 3, 32, 32) uint8 and labels, read without the datamodule."""
    rows, labels = [], []
    for name in files:
        entry = pickle.loads((cifar_dir / "cifar-10-batches-py" / name).read_bytes())
        rows.append(np.asarray(entry["data"], dtype=np.uint8))
        labels += entry["labels"]
    return torch.from_numpy(np.concatenate(rows).reshape(-1, 3, 32, 32)), torch.tensor(labels)


def _cifar(cifar_dir, **kw) -> CIFARDataModule:
    dm = CIFARDataModule(data_dir=str(cifar_dir), download=False, batch_size=4, **kw)
    dm.setup()
    return dm


def test_cifar_holds_out_plain_training_images(cifar_dir):
    images, labels = _cifar10_raw(cifar_dir, CIFAR10_TRAIN)
    dm = _cifar(cifar_dir, val_size=10)
    assert (len(images), len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 30, 10, 8)
    train_idx, val_idx = dm.train_set.indices, dm.val_set.indices
    assert not set(train_idx) & set(val_idx) and sorted(train_idx + val_idx) == list(range(40))
    # training reads the rest of the same images, augmented
    assert torch.equal(torch.from_numpy(dm.train_set.dataset.images).permute(0, 3, 1, 2), images)
    assert "RandomCrop" in [type(t).__name__ for t in dm.train_set.dataset.transform.transforms]
    # held-out images come back byte for byte: no crop, flip or AutoAugment
    val_x, val_y = (torch.stack(t) for t in zip(*(dm.val_set[i] for i in range(10)), strict=True))
    assert torch.equal(val_x, images[val_idx]) and torch.equal(val_y, labels[val_idx])
    assert dm.validation_split == "held out from train (10 images)" and dm.validates_on_test is False
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8


def test_cifar_test_split_is_untouched_and_not_validation(cifar_dir):
    test_images, test_labels = _cifar10_raw(cifar_dir, ["test_batch"])
    dm = _cifar(cifar_dir, val_size=10)
    test_x, test_y = (torch.stack(t) for t in zip(*(dm.test_set[i] for i in range(8)), strict=True))
    assert len(dm.test_set) == 8 and torch.equal(test_x, test_images) and torch.equal(test_y, test_labels)
    val_x = [dm.val_set[i][0] for i in range(10)]
    assert dm.val_set is not dm.test_set
    assert not any(torch.equal(v, t) for v in val_x for t in test_images)


def test_cifar_split_is_fixed_whatever_the_run_seed(cifar_dir):
    torch.manual_seed(1)
    a = _cifar(cifar_dir, val_size=10)
    torch.manual_seed(2)
    b = _cifar(cifar_dir, val_size=10)
    assert a.val_set.indices == b.val_set.indices and a.train_set.indices == b.train_set.indices
    assert len(set(a.val_set.indices)) == 10


def test_cifar_batches_per_device_count_the_training_images_left(cifar_dir):
    dm = _cifar(cifar_dir, val_size=10)  # 30 of the 40 images train, 4 per batch
    assert (dm.train_batches_per_device(1), dm.train_batches_per_device(2)) == (7, 3)
    assert _cifar(cifar_dir, val_size=0).train_batches_per_device(1) == 10


def test_cifar_val_size_zero_validates_on_test(cifar_dir):
    assert CIFARDataModule(val_size=0).validates_on_test is True  # known before setup
    dm = _cifar(cifar_dir, val_size=0)
    assert len(dm.train_set) == 40 and dm.val_set is dm.test_set and len(dm.val_set) == 8
    assert dm.validates_on_test is True and dm.validation_split == "test split"


@pytest.mark.parametrize("val_size", [-1, 0.1, "5000"])
def test_val_size_must_be_a_count(val_size):
    with pytest.raises(ValueError, match=r"task\.data\.val_size=0 to validate on the test split"):
        CIFARDataModule(val_size=val_size)


def test_val_size_must_leave_a_training_batch(cifar_dir):
    expected = r"=37 must leave a batch \(4\) of the 40 training images .* to at most 36"
    with pytest.raises(ValueError, match=expected):
        _cifar(cifar_dir, val_size=37)
    assert len(_cifar(cifar_dir, val_size=36).train_set) == 4
    with pytest.raises(ValueError, match="val_size=1 .* or lower task.data.batch_size"):
        CIFARDataModule(data_dir=str(cifar_dir), download=False, batch_size=40, val_size=1).setup()


@pytest.mark.parametrize("classes, n_train, n_test", [(10, 40, 8), (100, 16, 16)])
def test_cifar_reads_torchvision_format(cifar_dir, classes, n_train, n_test):
    dm = CIFARDataModule(classes=classes, data_dir=str(cifar_dir), download=False, batch_size=4, val_size=4)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (n_train - 4, 4, n_test)
    assert dm.num_classes == classes
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and int(y.max()) < classes


def test_cifar_missing(tmp_path):
    with pytest.raises(MissingDatasetError, match="cifar-10-batches-py"):
        CIFARDataModule(data_dir=str(tmp_path), download=False).setup()


def _imagenet(imagefolder_dir, **kw) -> ImageNetDataModule:
    dm = ImageNetDataModule(data_dir=str(imagefolder_dir), num_classes=3, batch_size=2, img_size=64, **kw)
    dm.setup()
    return dm


def test_imagenet_folders(imagefolder_dir):
    dm = _imagenet(imagefolder_dir, val_size=3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 3, 9)


def _files(subset: Subset) -> list[str]:
    return [subset.dataset.samples[i][0] for i in subset.indices]


def test_imagenet_holds_out_training_images_under_the_eval_transform(imagefolder_dir):
    from PIL import Image

    torch.manual_seed(5)
    dm = _imagenet(imagefolder_dir, val_size=3)
    torch.manual_seed(6)
    again = _imagenet(imagefolder_dir, val_size=3)
    train_files, val_files = _files(dm.train_set), _files(dm.val_set)
    assert (_files(again.train_set), _files(again.val_set)) == (train_files, val_files)
    everything = sorted(str(p) for p in (imagefolder_dir / "train").rglob("*.JPEG"))
    assert len(everything) == 9 and len(val_files) == 3 and sorted(train_files + val_files) == everything
    assert dm.val_set.dataset.samples is dm.train_set.dataset.samples  # the folder was scanned once
    # held out: the evaluation transform (resize + centre crop, deterministic); training keeps RandAugment
    eval_tf = dm.test_set.transform
    assert dm.val_set.dataset.transform is eval_tf and dm.train_set.dataset.transform is not eval_tf
    for i, path in enumerate(val_files):
        x, y = dm.val_set[i]
        assert torch.equal(x, eval_tf(Image.open(path).convert("RGB")))
        assert dm.train_set.dataset.classes[y] == Path(path).parent.name
    # test: all of val/, none of it used for validation
    test_files = [p for p, _ in dm.test_set.samples]
    assert test_files == sorted(str(p) for p in (imagefolder_dir / "val").rglob("*.JPEG"))
    assert len(test_files) == 9
    assert not set(test_files) & set(val_files) and dm.validates_on_test is False


def test_imagenet_val_size_zero_validates_on_val_folder(imagefolder_dir):
    dm = _imagenet(imagefolder_dir, val_size=0)
    assert len(dm.train_set) == 9 and dm.val_set is dm.test_set and dm.test_set.root.endswith("val")
    assert dm.validates_on_test is True and dm.validation_split == "test split"
    with pytest.raises(ValueError, match="at most 7"):
        _imagenet(imagefolder_dir, val_size=8)


def test_imagenet_randaugment_survives_a_full_magnitude_posterize(imagefolder_dir):
    """m9 with magnitude noise reaches 10 for a few images in a thousand: 0 bits, which Pillow ≥ 13
    rejects mid-epoch. The op keeps one bit instead."""
    from PIL import Image

    dm = _imagenet(imagefolder_dir, val_size=3)
    train_tf = dm.train_set.dataset.transform
    rand_augment = next(t for t in train_tf.transforms if type(t).__name__ == "RandAugment")
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
    assert dm.validates_on_test is True  # it sets no validation_split: judged by val_set is test_set
