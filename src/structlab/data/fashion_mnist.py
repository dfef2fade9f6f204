"""Fashion-MNIST from its IDX files: project data dir → Debian's package → torchvision download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from structlab.data.base import ImageDataModule, TensorImages, missing

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (gzipped or not): magic 0x0000 | dtype 0x08 (uint8) | ndim, big-endian dims."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return torch.from_numpy(data.reshape(dims).copy())


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


class FashionMNISTDataModule(ImageDataModule):
    num_classes, in_chans, img_size = 10, 1, 28

    def __init__(
        self,
        val_size: int = 5000,
        download: bool = True,
        flip: bool = True,
        seed: int = 0,
        system_dir: str | None = str(DEBIAN_DIR),
        **kw,
    ) -> None:
        kw.setdefault("mean", (0.2860,))
        kw.setdefault("std", (0.3530,))
        super().__init__(**kw)
        self.set_val_size(val_size)  # 0: validate on the test split
        self.download, self.flip, self.seed = download, flip, seed  # seed: of the hold-out only
        self.system_dir = Path(system_dir) if system_dir else None

    def candidate_dirs(self) -> list[Path]:
        dirs = [self.data_dir / "fashion-mnist", self.data_dir / "FashionMNIST" / "raw"]
        return dirs + ([self.system_dir] if self.system_dir else [])

    def locate(self) -> Path:
        for d in self.candidate_dirs():
            if all(_find(d, stem) for pair in FILES.values() for stem in pair):
                return d
        if self.download:
            try:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(str(self.data_dir), train=True, download=True)
                FashionMNIST(str(self.data_dir), train=False, download=True)
                return self.data_dir / "FashionMNIST" / "raw"
            except Exception as err:  # offline: fall through to the clear error below
                reason = f" (download failed: {type(err).__name__}: {err})"
        else:
            reason = " (download=false)"
        raise missing(
            "Fashion-MNIST" + reason,
            self.candidate_dirs(),
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four *-ubyte.gz files in "
            f"{self.data_dir / 'fashion-mnist'}, or run once with internet and task.data.download=true",
        )

    def split(self, name: str) -> TensorImages:
        d = self.locate()
        images, labels = (read_idx(_find(d, stem)) for stem in FILES[name])
        return TensorImages(images, labels)

    def prepare_data(self) -> None:
        self.locate()  # downloads once, on rank 0, when needed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.test_set = self.split("test")
        # augmentation runs on the device for training batches only, so one dataset serves both parts
        self.hold_out(self.split("train"), seed=self.seed)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        if self.flip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return self.normalize(x), y
