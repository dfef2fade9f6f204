"""Real depth sets: Sintel .dpt / .cam and 16-bit PNG depth round trips, and the datasets over tiny
trees in each set's on-disk layout (written by the writers in fixtures)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from support import compose_train

from structlab.data import MissingDatasetError
from structlab.data.depth_sets import (
    BONN_DEPTH_SCALE,
    KITTI_DEPTH_SCALE,
    NYU_DEPTH_SCALE,
    NYU_INTRINSICS,
    TUM_DEPTH_SCALE,
    DepthPairs,
    NYUv2Dataset,
    SintelDataset,
    extrinsics_to_pose,
    kitti_pairs,
    read_cam,
    read_dpt,
    read_kitti_depth,
    read_png_depth,
    read_tum_depth,
    tum_pairs,
    write_cam,
    write_dpt,
    write_png_depth,
)
from structlab.data.real_depth import RealDepthDataModule, sequence_rank, split_sequences
from structlab.data.scenes import SceneDataset
from structlab.tasks.depth import DepthPoseMetrics


def rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def save_rgb(path, h: int, w: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_dpt_round_trip_and_layout(tmp_path):
    depth = np.random.default_rng(0).uniform(0.5, 80, (5, 7)).astype(np.float32)
    write_dpt(tmp_path / "a.dpt", depth)
    raw = (tmp_path / "a.dpt").read_bytes()
    assert raw[:4] == b"PIEH" and len(raw) == 12 + 4 * 35  # tag, width, height, data
    assert np.frombuffer(raw[4:12], "<i4").tolist() == [7, 5]  # width first
    assert np.array_equal(read_dpt(tmp_path / "a.dpt"), depth)
    (tmp_path / "bad.dpt").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a Sintel file"):
        read_dpt(tmp_path / "bad.dpt")
    (tmp_path / "short.dpt").write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="7×5 but holds 34"):
        read_dpt(tmp_path / "short.dpt")


def test_cam_round_trip_and_pose(tmp_path):
    K = np.array([[620.0, 0, 511.5], [0, 620.0, 217.5], [0, 0, 1]])
    R, t = rotation(1), np.array([0.3, -1.2, 2.5])
    E = np.concatenate([R, t[:, None]], 1)  # world-to-camera
    write_cam(tmp_path / "a.cam", K, E)
    raw = (tmp_path / "a.cam").read_bytes()
    assert raw[:4] == b"PIEH" and len(raw) == 4 + 8 * 21
    K2, E2 = read_cam(tmp_path / "a.cam")
    assert np.array_equal(K2, K) and np.array_equal(E2, E) and K2.dtype == np.float64
    pose = extrinsics_to_pose(E).double()  # camera-to-world: maps camera points back to the world
    world = np.array([1.0, 2.0, 3.0])
    cam = R @ world + t
    assert np.allclose((pose[:3, :3] @ torch.tensor(cam) + pose[:3, 3]).numpy(), world, atol=1e-5)
    with pytest.raises(ValueError, match="3×3 and extrinsics 3×4"):
        write_cam(tmp_path / "b.cam", K, R)


@pytest.mark.parametrize(
    "scale, reader",
    [(KITTI_DEPTH_SCALE, read_kitti_depth), (TUM_DEPTH_SCALE, read_tum_depth), (NYU_DEPTH_SCALE, None)],
)
def test_png_depth_round_trip(tmp_path, scale, reader):
    depth = np.random.default_rng(0).uniform(0.2, 12, (6, 9)).astype(np.float32)
    depth[0, 0], depth[1, 1] = 0, np.nan  # not measured
    write_png_depth(tmp_path / "d.png", depth, scale)
    with Image.open(tmp_path / "d.png") as im:
        assert np.asarray(im).dtype == np.uint16
    back = reader(tmp_path / "d.png") if reader else read_png_depth(tmp_path / "d.png", scale)
    assert back.dtype == np.float32 and back[0, 0] == 0 and back[1, 1] == 0
    ok = np.isfinite(depth) & (depth > 0)
    assert np.abs(back[ok] - depth[ok]).max() <= 0.5 / scale + 1e-6
    assert BONN_DEPTH_SCALE == TUM_DEPTH_SCALE == 5000 and KITTI_DEPTH_SCALE == 256


@pytest.fixture
def sintel_dir(tmp_path):
    """Two sequences of three 30×44 frames (cropped to 28×42 by the dataset); one far pixel per frame."""
    root = tmp_path / "sintel"
    rng = np.random.default_rng(0)
    for s, seq in enumerate(("alley_1", "market_2")):
        for kind in ("final", "depth", "camdata_left"):
            (root / "training" / kind / seq).mkdir(parents=True)
        for f in range(1, 4):
            stem = f"frame_{f:04d}"
            save_rgb(root / "training" / "final" / seq / f"{stem}.png", 30, 44, 10 * s + f)
            depth = rng.uniform(1, 30, (30, 44)).astype(np.float32)
            depth[15, 22] = 1e5  # sky: beyond max_depth
            write_dpt(root / "training" / "depth" / seq / f"{stem}.dpt", depth)
            K = np.array([[50.0, 0, 21.5], [0, 50.0, 14.5], [0, 0, 1]])
            E = np.concatenate([rotation(10 * s + f), rng.normal(size=(3, 1))], 1)
            write_cam(root / "training" / "camdata_left" / seq / f"{stem}.cam", K, E)
    return root


def test_sintel_frames_and_clips(sintel_dir):
    mono = SintelDataset(sintel_dir)
    assert len(mono) == 6
    s = mono[0]
    assert s["imgs"].shape == (1, 3, 28, 42) and s["depth"].shape == (1, 28, 42)  # centred crop to 14·k
    seq = sintel_dir / "training"
    depth = read_dpt(seq / "depth" / "alley_1" / "frame_0001.dpt")[1:29, 1:43]
    assert torch.equal(s["depth"][0], torch.from_numpy(np.where(depth < 70, depth, 0)))  # 0 where not valid
    assert not s["valid"][0, 14, 21] and s["valid"].sum() == 28 * 42 - 1  # the 1e5 pixel is sky
    assert torch.allclose(s["intrinsics"][0], torch.tensor([[50.0, 0, 20.5], [0, 50, 13.5], [0, 0, 1]]))
    _, E = read_cam(seq / "camdata_left" / "alley_1" / "frame_0001.cam")
    assert torch.allclose(s["camera_poses"][0], extrinsics_to_pose(E), atol=1e-6)
    assert torch.allclose(s["local_points"][..., 2], s["depth"])
    img = np.asarray(Image.open(seq / "final" / "alley_1" / "frame_0001.png"))[1:29, 1:43]
    assert torch.allclose(s["imgs"][0], torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    clips = SintelDataset(sintel_dir, num_views=2, sequences=["market_2"], size=(28, 28))
    assert len(clips) == 1 and clips[0]["imgs"].shape == (2, 3, 28, 28)  # frames 1–2; frame 3 left over
    assert clips[0]["intrinsics"][0, 0, 0] == pytest.approx(50 * 28 / 44)
    with pytest.raises(ValueError, match=r"\['cave_9'\] not in"):
        SintelDataset(sintel_dir, sequences=["cave_9"])
    with pytest.raises(MissingDatasetError, match="MPI-Sintel"):
        SintelDataset(sintel_dir / "nowhere")


def test_nyu_layout_millimetres_and_eigen_crop(tmp_path):
    folder = tmp_path / "nyu" / "official_splits" / "test" / "kitchen"
    folder.mkdir(parents=True)
    h, w = 48, 64  # a tenth of 480×640
    for i in (45, 46):
        Image.fromarray(np.full((h, w, 3), 100 + i, np.uint8)).save(folder / f"rgb_{i:05d}.jpg")
        depth = np.full((h, w), 2.5, np.float32)
        depth[:, :3] = 0  # Kinect holes
        write_png_depth(folder / f"sync_depth_{i:05d}.png", depth, NYU_DEPTH_SCALE)
    with Image.open(folder / "sync_depth_00045.png") as im:
        assert int(np.asarray(im)[10, 10]) == 2500  # millimetres
    ds = NYUv2Dataset(tmp_path / "nyu", size=(42, 56))
    assert len(ds) == 2
    s = ds[0]
    assert s["imgs"].shape == (1, 3, 42, 56) and torch.allclose(s["depth"][s["valid"]], torch.tensor(2.5))
    full = NYUv2Dataset(tmp_path / "nyu", eigen_crop=False, size=(42, 56))[0]
    assert s["valid"].sum() < full["valid"].sum()  # the crop removes the border
    assert not full["valid"][0, :, 0].any()  # the holes
    assert torch.equal(s["camera_poses"][0], torch.eye(4))
    fx = NYU_INTRINSICS[0][0] * (w / 640) * (56 / w)
    assert s["intrinsics"][0, 0, 0] == pytest.approx(fx, rel=1e-5)
    with pytest.raises(MissingDatasetError, match="NYU-v2"):
        NYUv2Dataset(tmp_path / "nyu", split="train")


def test_tum_association_and_png_pairs(tmp_path):
    seq = tmp_path / "rgbd_bonn_balloon"
    (seq / "rgb").mkdir(parents=True)
    (seq / "depth").mkdir()
    rgb_t, depth_t = [1.000, 1.033, 1.066, 1.500], [1.004, 1.030, 1.070, 1.300]
    (seq / "rgb.txt").write_text(
        "# timestamp filename\n" + "".join(f"{t:.3f} rgb/{t:.3f}.png\n" for t in rgb_t)
    )
    (seq / "depth.txt").write_text("# depth\n" + "".join(f"{t:.3f} depth/{t:.3f}.png\n" for t in depth_t))
    for t in rgb_t:
        save_rgb(seq / "rgb" / f"{t:.3f}.png", 20, 30, int(t * 1000))
    for t in depth_t:
        write_png_depth(seq / "depth" / f"{t:.3f}.png", np.full((20, 30), t, np.float32), TUM_DEPTH_SCALE)
    pairs = tum_pairs(seq)
    assert [(a.name, b.name) for a, b in pairs] == [
        ("1.000.png", "1.004.png"),
        ("1.033.png", "1.030.png"),
        ("1.066.png", "1.070.png"),
    ]  # 1.500 has no depth within 20 ms
    ds = DepthPairs(pairs, TUM_DEPTH_SCALE, max_depth=1.05)
    s = ds[1]
    assert s["imgs"].shape == (1, 3, 14, 28) and s["valid"].all()
    assert torch.allclose(s["depth"], torch.tensor(1.03))
    assert not ds[2]["valid"].any()  # 1.07 m is beyond max_depth
    with pytest.raises(MissingDatasetError):
        tum_pairs(tmp_path / "none")


def test_kitti_layout(tmp_path):
    drive = "2011_09_26_drive_0002_sync"
    gt = tmp_path / "depth" / "val" / drive / "proj_depth" / "groundtruth" / "image_02"
    raw = tmp_path / "raw" / "2011_09_26" / drive / "image_02" / "data"
    gt.mkdir(parents=True)
    raw.mkdir(parents=True)
    for name in ("0000000005.png", "0000000006.png"):
        write_png_depth(gt / name, np.full((14, 28), 20.0, np.float32), KITTI_DEPTH_SCALE)
    save_rgb(raw / "0000000005.png", 14, 28, 0)  # frame 6 has no image: skipped
    pairs = kitti_pairs(tmp_path / "depth", tmp_path / "raw")
    assert [b.name for _, b in pairs] == ["0000000005.png"]
    s = DepthPairs(pairs, KITTI_DEPTH_SCALE, intrinsics=[[20, 0, 13.5], [0, 20, 6.5], [0, 0, 1]])[0]
    assert torch.allclose(s["depth"], torch.tensor(20.0)) and s["intrinsics"][0, 0, 0] == 20


# --- RealDepthDataModule ---------------------------------------------------------------------------------
SEQUENCES = ("alley_1", "bamboo_2", "cave_4", "market_2")


def write_sintel(root, sequences=SEQUENCES, frames: int = 4, h: int = 30, w: int = 44) -> None:
    """A Sintel training tree: `frames` frames of h×w per sequence, random depth in 1–30 and poses."""
    rng = np.random.default_rng(1)
    for s, seq in enumerate(sequences):
        for kind in ("final", "depth", "camdata_left"):
            (root / "training" / kind / seq).mkdir(parents=True, exist_ok=True)
        for f in range(1, frames + 1):
            stem = f"frame_{f:04d}"
            save_rgb(root / "training" / "final" / seq / f"{stem}.png", h, w, 100 * s + f)
            write_dpt(root / "training" / "depth" / seq / f"{stem}.dpt", rng.uniform(1, 30, (h, w)))
            K = np.array([[40.0, 0, (w - 1) / 2], [0, 40.0, (h - 1) / 2], [0, 0, 1]])
            E = np.concatenate([rotation(100 * s + f), rng.normal(size=(3, 1))], 1)
            write_cam(root / "training" / "camdata_left" / seq / f"{stem}.cam", K, E)


def write_nyu(root, split: str, count: int, first: int = 1, h: int = 48, w: int = 64) -> None:
    """`count` NYU-v2 images of h×w (JPEG + millimetre PNG) under official_splits/<split>/<scene>."""
    rng = np.random.default_rng(first)
    for i in range(first, first + count):
        folder = root / "official_splits" / split / ("kitchen" if i % 2 else "office")
        folder.mkdir(parents=True, exist_ok=True)
        save_rgb(folder / f"rgb_{i:05d}.jpg", h, w, i)
        write_png_depth(folder / f"sync_depth_{i:05d}.png", rng.uniform(0.5, 8, (h, w)), NYU_DEPTH_SCALE)


def clips_of(dataset) -> set[str]:
    return {seq for seq, _ in dataset.clips}


def test_sequence_split_rule():
    ranked = sequence_rank(SEQUENCES)
    assert sorted(ranked) == sorted(SEQUENCES) and ranked == sequence_rank(list(reversed(SEQUENCES)))
    split = split_sequences(SEQUENCES, 1, 1)
    assert split["train"] == [ranked[0]] and split["val"] == [ranked[1]]
    assert split["test"] == sorted(ranked[2:])
    by_hand = split_sequences(SEQUENCES, ["market_2"], 1)  # val: the first ranked one not in train
    assert by_hand["train"] == ["market_2"] and by_hand["val"] == [next(n for n in ranked if n != "market_2")]
    # the documented split of the full 23 training sequences
    full = split_sequences(
        "alley_1 alley_2 ambush_2 ambush_4 ambush_5 ambush_6 ambush_7 bamboo_1 bamboo_2 bandage_1 bandage_2 "
        "cave_2 cave_4 market_2 market_5 market_6 mountain_1 shaman_2 shaman_3 sleeping_1 sleeping_2 temple_2 "
        "temple_3".split(),
        3,
        2,
    )
    assert full["train"] == ["alley_2", "ambush_2", "cave_4"] and full["val"] == ["ambush_6", "temple_2"]
    assert len(full["test"]) == 18
    with pytest.raises(ValueError, match="no Sintel sequence is left"):
        split_sequences(SEQUENCES, 3, 1)
    with pytest.raises(ValueError, match="share a sequence"):
        split_sequences(SEQUENCES, ["cave_4"], ["cave_4"])
    with pytest.raises(ValueError, match=r"\['cave_9'\] not among"):
        split_sequences(SEQUENCES, ["cave_9"], 1)


def test_sintel_datamodule_splits_hold_out_whole_sequences(tmp_path):
    write_sintel(tmp_path / "sintel")
    dm = RealDepthDataModule("sintel", tmp_path / "sintel", num_views=2, train_sequences=1, val_sequences=1)
    dm.setup("fit")
    train, val, test = (clips_of(dm.splits[k]) for k in ("train", "val", "test"))
    assert len(train) == len(val) == 1 and len(test) == 2
    assert not (train & test) and not (val & test) and not (train & val)
    assert train | val | test == set(SEQUENCES)
    assert len(dm.splits["test"]) == 4 and not dm.validates_on_test  # 2 clips of 2 frames per sequence
    batch = next(iter(dm.test_dataloader()))
    assert batch["imgs"].shape == (1, 2, 3, 28, 42) and batch["depth"].shape == (1, 2, 28, 42)
    for key in ("valid", "intrinsics", "camera_poses", "local_points", "points"):
        assert key in batch
    assert not torch.allclose(batch["camera_poses"][0, 0], batch["camera_poses"][0, 1])  # real poses
    metrics = DepthPoseMetrics(max_depth=70)  # the poses are scored: the truth is exact
    metrics.update(
        batch["depth"], batch["depth"], batch["valid"], batch["camera_poses"], batch["camera_poses"]
    )
    values = metrics.compute()
    assert float(values["abs_rel"]) < 1e-6 and float(values["rra30"]) == float(values["auc30"]) == 1
    same = RealDepthDataModule("sintel", tmp_path / "sintel", num_views=2, train_sequences=1, val_sequences=0)
    same.setup()
    assert same.validates_on_test and same.splits["val"] is same.splits["test"]
    with pytest.raises(MissingDatasetError, match=r"MPI-Sintel not found(.|\n)*training(.|\n)*sintel.is.tue"):
        RealDepthDataModule("sintel", tmp_path / "nowhere").setup()


def test_nyu_datamodule_official_train_split_or_scenes(tmp_path, caplog):
    root = tmp_path / "nyu_v2"
    write_nyu(root, "test", 3)
    dm = RealDepthDataModule("nyu", root, num_views=1, size=(42, 56), val_size=2, train_size=4)
    with caplog.at_level("INFO"):
        dm.setup()
    assert isinstance(dm.splits["train"], SceneDataset) and "procedural scenes" in dm.train_source
    assert "procedural scenes" in caplog.text
    test = next(iter(dm.test_dataloader()))
    assert test["imgs"].shape == (1, 1, 3, 42, 56) and torch.equal(test["camera_poses"][0, 0], torch.eye(4))
    scene = dm.splits["train"][0]
    assert scene["imgs"].shape == (1, 3, 42, 56)  # one view at the test images' size
    assert len(dm.splits["val"]) == 2 and dm.splits["val"].split == "val"

    write_nyu(root, "train", 5, first=101)
    official = RealDepthDataModule("nyu", root, num_views=1, size=(42, 56), val_size=2)
    official.setup()
    assert "official train split" in official.train_source
    names = {
        k: {official.splits[k].dataset.pairs[i][0].name for i in official.splits[k].indices}
        for k in ("train", "val")
    }
    tests = {p.name for p, _ in official.splits["test"].pairs}
    assert len(names["train"]) == 3 and len(names["val"]) == 2 and not names["train"] & names["val"]
    assert not (names["train"] | names["val"]) & tests
    with pytest.raises(ValueError, match="num_views=1"):
        RealDepthDataModule("nyu", root, num_views=2)
    with pytest.raises(MissingDatasetError, match=r"NYU-v2 \(test\) not found(.|\n)*official_splits"):
        RealDepthDataModule("nyu", tmp_path / "nowhere", num_views=1).setup()


@pytest.fixture
def pi3_tiny_weights(tmp_path):
    torch.manual_seed(0)
    from structlab.models import build_model

    weights = tmp_path / "pi3_tiny.safetensors"  # stands in for the official model.safetensors
    save_file(build_model("pi3_tiny").state_dict(), str(weights))
    return weights


QUIET = ("model=pi3_tiny", "print_config=false", "trainer.enable_progress_bar=false", "trainer=cpu")


def test_sintel_through_mode_compress(tmp_path, pi3_tiny_weights):
    from structlab.train import run

    write_sintel(tmp_path / "data" / "sintel")
    summary = run(compose_train(
        "task=depth_sintel", *QUIET, "mode=compress", f"model.ckpt_path={pi3_tiny_weights}",
        "compress.method=svd", "compress.ratio=0.5", "compress.rank_multiple=1", f"paths.data_dir={tmp_path / 'data'}",
        "task.data.num_views=2", "task.data.train_sequences=1", "task.data.val_sequences=1",
        "task.data.num_workers=0", "task.data.batch_size=2", "calib.samples=2", output_dir=tmp_path / "run",
    ))  # fmt: skip
    test = summary["test"]
    dense, small = test["test/abs_rel dense"], test["test/abs_rel compressed"]
    assert math.isfinite(dense) and math.isfinite(small) and dense > 0 and small > 0
    assert all(math.isfinite(v) for v in test.values())


def test_nyu_single_frames_through_mode_compress(tmp_path, pi3_tiny_weights):
    from structlab.train import run

    write_nyu(tmp_path / "data" / "nyu_v2", "test", 3)
    summary = run(compose_train(
        "task=depth_nyu", *QUIET, "mode=compress", f"model.ckpt_path={pi3_tiny_weights}",
        "compress.method=whitened_svd", "compress.ratio=0.5", "compress.rank_multiple=1",
        f"paths.data_dir={tmp_path / 'data'}", "task.data.size=[28,42]", "task.data.train_size=2",
        "task.data.val_size=1", "task.data.num_workers=0", "task.data.batch_size=2", "calib.samples=2",
        output_dir=tmp_path / "run",
    ))  # fmt: skip
    test = summary["test"]
    assert math.isfinite(test["test/abs_rel dense"]) and math.isfinite(test["test/abs_rel compressed"])
    assert all(math.isfinite(v) for v in test.values())
    assert not any("rra" in k or "auc" in k for k in test)  # one frame: no pose metrics
    assert summary["compression"]["calibration"] == "2 samples from the train split"
