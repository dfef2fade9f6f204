"""Shared fixtures: composed configs (Hydra compose API), tiny datasets in real on-disk formats,
and a helper that runs run.py in a subprocess the way a user does."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from support import ROOT  # noqa: F401  (sets STRUCTLAB_ROOT, registers resolvers)


def _idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """A small Fashion-MNIST in its IDX .gz format: class = a brightness pattern the model can learn."""
    root = tmp_path_factory.mktemp("fmnist_data")
    d = root / "fashion-mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 1200), ("t10k", 300)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):  # a bright band whose row encodes the class
            images[i, 2 + 2 * c : 4 + 2 * c, :] = 250
        _idx(d / f"{split}-images-idx3-ubyte.gz", images)
        _idx(d / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """Tiny CIFAR-10 and CIFAR-100 trees in torchvision's pickled-batch format."""
    root = tmp_path_factory.mktemp("cifar_data")
    rng = np.random.default_rng(0)

    def batch(n: int, key: str, classes: int) -> dict:
        return {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, n).tolist(),
        }

    ten = root / "cifar-10-batches-py"
    ten.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (ten / name).write_bytes(pickle.dumps(batch(8, "labels", 10)))
    hundred = root / "cifar-100-python"
    hundred.mkdir()
    for name in ("train", "test"):
        (hundred / name).write_bytes(pickle.dumps(batch(16, "fine_labels", 100)))
    return root


@pytest.fixture(scope="session")
def imagefolder_dir(tmp_path_factory) -> Path:
    """ImageNet-style train/ and val/ trees of small JPEGs in 3 class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet_data")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("n01440764", "n01443537", "n01484850"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{i}.JPEG")
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    """On a loaded 2-core machine small SVDs/matmuls run 5–80× slower with 2 threads than with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
