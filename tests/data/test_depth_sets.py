"""Real depth sets: Sintel .dpt / .cam and 16-bit PNG depth round trips, and the datasets over tiny
trees in each set's on-disk layout (written by the writers in fixtures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

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
