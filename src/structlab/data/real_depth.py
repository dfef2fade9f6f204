"""`RealDepthDataModule`: the depth task (π3) on a real depth set on disk, MPI-Sintel or NYU-v2, for
`mode=eval` / `mode=compress` (and training, if wanted). Samples carry the keys `DepthModule` needs
(see `structlab.data.depth_sets`).

Splits (train and validation never share a sample with test):
  sintel  The training sequences (the only ones with depth and cameras) are ranked by the SHA-1 of
          their names; the first `train_sequences` (3) are the train split (calibration for
          mode=compress), the next `val_sequences` (2) validate and the rest are the test split. On
          the full set of 23 that is train: cave_4, ambush_2, alley_2; val: ambush_6, temple_2;
          test: the other 18. A list of names instead of a count fixes a split by hand (the other
          held-out split then takes the next sequences of the ranking not already chosen).
          `val_sequences=0` validates on the test split. Clips of `num_views` frames with the poses
          of the `.cam` files (world-to-camera, turned into camera-to-world), so pose metrics apply.
  nyu     Test: the 654 labelled test images (official_splits/test), one frame per sample, identity
          pose (no frame pairs: depth metrics only). Train: official_splits/train when it is on disk,
          less `val_size` images (a fixed-seed choice) that validate; otherwise the procedural scenes
          (`SceneDataset`'s train and val seeds, one view per scene, at the test images' size). A log
          line and `train_source` say which.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Subset

from structlab.data.base import HOLD_OUT_SEED, TEST_SPLIT, SplitDataModule, missing
from structlab.data.depth_sets import NYUv2Dataset, SintelDataset
from structlab.data.scenes import SceneDataset

log = logging.getLogger(__name__)

DATASETS = ("sintel", "nyu")
SINTEL_HOW = (
    "download MPI-Sintel-training_images.zip and MPI-Sintel-depth-training-20150305.zip from "
    "http://sintel.is.tue.mpg.de/downloads and unpack both into {root} (it then holds training/final, "
    "training/clean, training/depth and training/camdata_left), or set task.data.root"
)
NYU_HOW = (
    "get the BTS / AdaBins evaluation copy of NYU-v2's labelled set (official_splits/test/<scene>/"
    "rgb_XXXXX.jpg + sync_depth_XXXXX.png, 16-bit millimetres; BTS's utils/extract_official_train_test_"
    "set_from_mat.py writes it from nyu_depth_v2_labeled.mat and splits.mat) into {root}, or set task.data.root"
)


def sequence_rank(names: Sequence[str]) -> list[str]:
    """`names` ordered by the SHA-1 of each name: a fixed order that no seed or machine changes."""
    return sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())


def split_sequences(
    names: Sequence[str], train: int | Sequence[str], val: int | Sequence[str]
) -> dict[str, list[str]]:
    """{train, val, test} lists of sequence names (each sorted) from all `names`: `train` and `val`
    are counts (the next sequences of `sequence_rank`) or explicit lists; test is what is left."""
    ranked = sequence_rank(names)
    chosen: dict[str, list[str]] = {}
    for split, want in (("train", train), ("val", val)):
        if isinstance(want, int):
            continue
        unknown = sorted(set(want) - set(names))
        if unknown:
            raise ValueError(
                f"task.data.{split}_sequences: {unknown} not among the sequences {sorted(names)}"
            )
        chosen[split] = sorted(set(want))
    if set(chosen.get("train", [])) & set(chosen.get("val", [])):
        raise ValueError("task.data.train_sequences and val_sequences share a sequence")
    for split, want in (("train", train), ("val", val)):
        if isinstance(want, int):
            if want < 0:
                raise ValueError(f"task.data.{split}_sequences={want} must be ≥ 0")
            taken = {n for names_ in chosen.values() for n in names_}
            chosen[split] = sorted([n for n in ranked if n not in taken][:want])
    held = set(chosen["train"]) | set(chosen["val"])
    test = sorted(n for n in names if n not in held)
    if not test:
        raise ValueError(
            f"no Sintel sequence is left for the test split ({len(names)} on disk, "
            f"{len(chosen['train'])} train and {len(chosen['val'])} val): lower task.data.train_sequences "
            "or val_sequences"
        )
    if not chosen["train"]:
        raise ValueError("task.data.train_sequences selects no sequence: the train split would be empty")
    return {"train": chosen["train"], "val": chosen["val"], "test": test}


class RealDepthDataModule(SplitDataModule):
    """MPI-Sintel or NYU-v2 as train / val / test splits (module docstring for the split rules).

    dataset          sintel | nyu
    root             the dataset's folder (the layouts are in `structlab.data.depth_sets`)
    num_views        Sintel: frames per clip (`frame_step` apart); NYU: 1 (one frame per sample)
    size             [H, W] to resize to before the centred crop to multiples of 14; null: native size
    max_depth        valid depth below it (Sintel 70, NYU 10; null: the dataset's default)
    pass_name        Sintel: final | clean
    eigen_crop       NYU: only the Eigen crop's pixels are valid
    train_sequences, val_sequences   Sintel: counts or lists of names (module docstring)
    val_size         NYU: images of official_splits/train that validate (or validation scenes)
    train_size       NYU without its train split: procedural training scenes
    """

    def __init__(
        self,
        dataset: str = "sintel",
        root: str | Path = "data/sintel",
        num_views: int = 8,
        frame_step: int = 1,
        size: Sequence[int] | None = None,
        max_depth: float | None = None,
        pass_name: str = "final",
        eigen_crop: bool = True,
        train_sequences: int | Sequence[str] = 3,
        val_sequences: int | Sequence[str] = 2,
        val_size: int = 64,
        train_size: int = 256,
        batch_size: int = 1,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if dataset not in DATASETS:
            raise ValueError(f"task.data.dataset={dataset!r}; valid datasets: {', '.join(DATASETS)}")
        if dataset == "nyu" and num_views != 1:
            raise ValueError(f"task.data.num_views={num_views}: NYU-v2 has single images, set num_views=1")
        if num_views < 1:
            raise ValueError(f"task.data.num_views={num_views} must be ≥ 1")
        if size is not None and len(size) != 2:
            raise ValueError(f"task.data.size={list(size)} must be [height, width] or null")
        self.dataset, self.root = dataset, Path(root).expanduser()
        self.num_views, self.frame_step = num_views, frame_step
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.max_depth, self.pass_name, self.eigen_crop = max_depth, pass_name, eigen_crop
        self.train_sequences = train_sequences if isinstance(train_sequences, int) else list(train_sequences)
        self.val_sequences = val_sequences if isinstance(val_sequences, int) else list(val_sequences)
        self.val_size, self.train_size, self.seed = val_size, train_size, seed
        self.sequences: dict[str, list[str]] = {}  # Sintel: the sequences of each split
        self.train_source = ""  # what the train split holds, in words
        self.validation_split: str | None = None

    @property
    def validates_on_test(self) -> bool:
        return self.validation_split == TEST_SPLIT

    # --- setup ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.dataset == "sintel":
            self._setup_sintel()
        else:
            self._setup_nyu()
        log.info(
            "%s: test %d samples; train %d (%s); validation: %s",
            self.dataset,
            len(self.splits["test"]),
            len(self.splits["train"]),
            self.train_source,
            self.validation_split,
        )

    def _sintel(self, sequences: list[str]) -> SintelDataset:
        options = {} if self.max_depth is None else {"max_depth": self.max_depth}
        return SintelDataset(
            self.root,
            self.pass_name,
            self.num_views,
            self.frame_step,
            sequences=sequences,
            size=self.size,
            **options,
        )

    def _setup_sintel(self) -> None:
        base = self.root / "training"
        depth_dir = base / "depth"
        names = sorted(p.name for p in depth_dir.iterdir() if p.is_dir()) if depth_dir.is_dir() else []
        if not names:
            looked = [
                base / self.pass_name,
                depth_dir / "<sequence>" / "frame_XXXX.dpt",
                base / "camdata_left",
            ]
            raise missing("MPI-Sintel", looked, SINTEL_HOW.format(root=self.root))
        self.sequences = split_sequences(names, self.train_sequences, self.val_sequences)
        for split, seqs in self.sequences.items():
            if seqs:
                self.splits[split] = self._sintel(seqs)
        if len(self.splits["test"]) == 0:
            raise ValueError(
                f"the Sintel test sequences {self.sequences['test']} hold no clip of {self.num_views} frames "
                f"{self.frame_step} apart: lower task.data.num_views"
            )
        self.train_source = f"Sintel sequences {', '.join(self.sequences['train'])} (held out from test)"
        if self.sequences["val"]:
            self.validation_split = (
                f"Sintel sequences {', '.join(self.sequences['val'])} (held out from test)"
            )
        else:
            self.splits["val"], self.validation_split = self.splits["test"], TEST_SPLIT

    def _setup_nyu(self) -> None:
        options = {"size": self.size, "eigen_crop": self.eigen_crop}
        if self.max_depth is not None:
            options["max_depth"] = self.max_depth
        test_dir = self.root / "official_splits" / "test"
        if not any(test_dir.glob("*/rgb_*.jpg")):
            raise missing(
                "NYU-v2 (test)", [test_dir / "<scene>" / "rgb_XXXXX.jpg"], NYU_HOW.format(root=self.root)
            )
        self.splits["test"] = NYUv2Dataset(self.root, "test", **options)
        train_dir = self.root / "official_splits" / "train"
        if any(train_dir.glob("*/rgb_*.jpg")):
            full = NYUv2Dataset(self.root, "train", **options)
            k = min(self.val_size, len(full) - 1)
            perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(HOLD_OUT_SEED)).tolist()
            self.splits["train"] = Subset(full, perm[k:])
            self.train_source = f"NYU-v2 official train split ({train_dir}), less {k} validation images"
            if k > 0:
                self.splits["val"] = Subset(full, perm[:k])
                self.validation_split = f"held out from NYU-v2's train split ({k} images)"
            else:
                self.splits["val"], self.validation_split = self.splits["test"], TEST_SPLIT
        else:
            height, width = self.splits["test"][0]["imgs"].shape[-2:]
            scenes = {"num_views": 1, "height": int(height), "width": int(width), "seed": self.seed}
            self.splits["train"] = SceneDataset("train", self.train_size, resample=True, **scenes)
            self.splits["val"] = SceneDataset("val", self.val_size, **scenes)
            self.train_source = (
                f"procedural scenes at {height}×{width} (no NYU-v2 train split in {train_dir})"
            )
            self.validation_split = f"procedural scenes ({self.val_size}, seeds disjoint from train)"
            log.warning("NYU-v2: %s is not on disk; train and val use procedural scenes", train_dir)

    def set_epoch(self, epoch: int) -> None:
        """New procedural training scenes every epoch (NYU without its train split); else nothing."""
        train = self.splits.get("train")
        if isinstance(train, SceneDataset):
            train.set_epoch(epoch)
