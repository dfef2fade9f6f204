"""Real depth sets on disk, for evaluating the depth task: file readers (and writers, which the tests
use to build tiny fixtures) and datasets whose samples carry the scene generator's keys.

File formats
  Sintel `.dpt` (MPI-Sintel depth): float32 tag 202021.25 (the bytes "PIEH"), int32 width, int32 height,
      then width·height float32 depths, row-major, little-endian.
  Sintel `.cam`: the same float32 tag, then the 3×3 intrinsic matrix K and the 3×4 extrinsic matrix
      [R | t] (world-to-camera), both float64 row-major.
  16-bit PNG depth: depth = value / scale, 0 = no measurement. KITTI (depth completion / annotated
      depth): scale 256 (metres); TUM RGB-D and Bonn RGB-D Dynamic: scale 5000; NYU-v2 exports in
      millimetres: scale 1000.

Layouts (under a dataset's `root`)
  Sintel:  training/{final,clean}/<sequence>/frame_0001.png   (MPI-Sintel-training_images)
           training/depth/<sequence>/frame_0001.dpt           (MPI-Sintel-depth-training)
           training/camdata_left/<sequence>/frame_0001.cam
  NYU-v2:  the 654 labelled test images as the BTS / AdaBins / ZoeDepth evaluation copy lays them out:
           official_splits/test/<scene class>/rgb_00045.jpg and sync_depth_00045.png (16-bit, millimetres,
           480×640, aligned to the RGB image); the same names under official_splits/train for the
           labelled training images. Kinect intrinsics of the NYU toolbox (fx 518.86, fy 519.47,
           cx 325.58, cy 253.74). `eigen_crop` keeps rows 45–470 and columns 41–600 valid (Eigen et al.).
  TUM / Bonn: <sequence>/rgb.txt and depth.txt ("timestamp path" lines, '#' comments), the images
           under rgb/ and depth/; RGB and depth are paired by nearest timestamp (`tum_pairs`).
  KITTI:   annotated depth <depth_root>/<split>/<drive>/proj_depth/groundtruth/image_02/<frame>.png with
           the raw images <raw_root>/<date>/<drive>/image_02/data/<frame>.png (`kitti_pairs`).

Every dataset yields {imgs N×3×H×W in [0, 1], depth N×H×W, valid N×H×W, intrinsics N×3×3,
camera_poses N×4×4 (camera-to-world, OpenCV; the identity where a set has no poses), local_points,
points N×H×W×3}. Sides are made multiples of 14 (π3's patch) by a centred crop, or resized to `size`
first (bilinear image, nearest depth); the intrinsics follow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from structlab.data.base import missing

SINTEL_TAG = 202021.25
KITTI_DEPTH_SCALE = 256.0
TUM_DEPTH_SCALE = 5000.0  # TUM RGB-D and Bonn RGB-D Dynamic
BONN_DEPTH_SCALE = TUM_DEPTH_SCALE
NYU_DEPTH_SCALE = 1000.0  # millimetres
NYU_INTRINSICS = ((518.8579, 0.0, 325.5824), (0.0, 519.4696, 253.7362), (0.0, 0.0, 1.0))
EIGEN_CROP = (45, 471, 41, 601)  # rows [45, 471), columns [41, 601) of NYU's 480×640 images
PATCH = 14


# --- files ----------------------------------------------------------------------------------------------
def _check_tag(f, path: Path) -> None:
    tag = np.fromfile(f, dtype="<f4", count=1)
    if tag.size != 1 or tag[0] != np.float32(SINTEL_TAG):
        raise ValueError(f"{path}: not a Sintel file (tag {tag[:1].tolist()}, expected {SINTEL_TAG})")


def read_dpt(path: str | Path) -> np.ndarray:
    """A Sintel `.dpt` depth map → float32 H×W."""
    path = Path(path)
    with open(path, "rb") as f:
        _check_tag(f, path)
        width, height = (int(v) for v in np.fromfile(f, dtype="<i4", count=2))
        data = np.fromfile(f, dtype="<f4", count=width * height)
    if width <= 0 or height <= 0 or data.size != width * height:
        raise ValueError(f"{path}: header says {width}×{height} but holds {data.size} values")
    return data.reshape(height, width).astype(np.float32)


def write_dpt(path: str | Path, depth: np.ndarray) -> None:
    """Write a float32 H×W depth map as a Sintel `.dpt` file."""
    depth = np.asarray(depth, dtype="<f4")
    if depth.ndim != 2:
        raise ValueError(f"a depth map is H×W, got shape {depth.shape}")
    height, width = depth.shape
    with open(path, "wb") as f:
        np.array([SINTEL_TAG], dtype="<f4").tofile(f)
        np.array([width, height], dtype="<i4").tofile(f)
        depth.tofile(f)


def read_cam(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A Sintel `.cam` file → (intrinsics K 3×3, extrinsics [R | t] 3×4 world-to-camera), float64."""
    path = Path(path)
    with open(path, "rb") as f:
        _check_tag(f, path)
        K = np.fromfile(f, dtype="<f8", count=9)
        E = np.fromfile(f, dtype="<f8", count=12)
    if K.size != 9 or E.size != 12:
        raise ValueError(f"{path}: a .cam file holds 9 + 12 float64 values after its tag")
    return K.reshape(3, 3).astype(np.float64), E.reshape(3, 4).astype(np.float64)


def write_cam(path: str | Path, intrinsics: np.ndarray, extrinsics: np.ndarray) -> None:
    """Write K (3×3) and a world-to-camera [R | t] (3×4) as a Sintel `.cam` file."""
    K, E = np.asarray(intrinsics, dtype="<f8"), np.asarray(extrinsics, dtype="<f8")
    if K.shape != (3, 3) or E.shape != (3, 4):
        raise ValueError(f"intrinsics are 3×3 and extrinsics 3×4, got {K.shape} and {E.shape}")
    with open(path, "wb") as f:
        np.array([SINTEL_TAG], dtype="<f4").tofile(f)
        K.tofile(f)
        E.tofile(f)


def read_png_depth(path: str | Path, scale: float) -> np.ndarray:
    """A 16-bit PNG depth map → float32 H×W depth = value / scale (0 where no measurement)."""
    from PIL import Image

    with Image.open(path) as im:
        values = np.asarray(im)
    if values.ndim != 2 or values.dtype not in (np.uint16, np.int32, np.uint8):
        raise ValueError(f"{path}: expected a single-channel 16-bit PNG, got {values.dtype} {values.shape}")
    return (values.astype(np.float32) / scale).astype(np.float32)


def write_png_depth(path: str | Path, depth: np.ndarray, scale: float) -> None:
    """Write depth (H×W, 0 / non-finite = no measurement) as a 16-bit PNG of round(depth · scale)."""
    from PIL import Image

    depth = np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    values = np.clip(np.round(depth * scale), 0, 65535).astype(np.uint16)
    Image.fromarray(values).save(path)


def read_kitti_depth(path: str | Path) -> np.ndarray:
    return read_png_depth(path, KITTI_DEPTH_SCALE)


def read_tum_depth(path: str | Path) -> np.ndarray:
    """TUM RGB-D or Bonn depth PNG (scale 5000) → metres."""
    return read_png_depth(path, TUM_DEPTH_SCALE)


def read_rgb(path: str | Path) -> Tensor:
    """An image file → 3×H×W float32 in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255


def extrinsics_to_pose(extrinsics: np.ndarray | Tensor) -> Tensor:
    """World-to-camera [R | t] (3×4) → camera-to-world 4×4 (float32)."""
    E = torch.as_tensor(np.asarray(extrinsics), dtype=torch.float64)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = E[:3, :3].T
    pose[:3, 3] = -E[:3, :3].T @ E[:3, 3]
    return pose.float()


# --- geometry and sizes ---------------------------------------------------------------------------------
def unproject(depth: Tensor, intrinsics: Tensor, camera_poses: Tensor) -> tuple[Tensor, Tensor]:
    """(local points, world points), N×H×W×3, of depth maps N×H×W (pixel (v, u) centred at (u, v))."""
    n, h, w = depth.shape
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    pix = torch.stack([u, v, torch.ones_like(u)], -1)
    rays = torch.einsum("nij,hwj->nhwi", torch.linalg.inv(intrinsics.float()), pix)
    local = rays * depth[..., None]
    R, t = camera_poses[:, None, None, :3, :3].float(), camera_poses[:, None, None, :3, 3].float()
    return local, (R @ local[..., None]).squeeze(-1) + t


def scale_intrinsics(K: Tensor, sh: float, sw: float) -> Tensor:
    """K of an image resized by sh (rows) and sw (columns); pixel centres at integer coordinates."""
    K = K.clone().float()
    K[0, 0], K[1, 1] = K[0, 0] * sw, K[1, 1] * sh
    K[0, 2], K[1, 2] = (K[0, 2] + 0.5) * sw - 0.5, (K[1, 2] + 0.5) * sh - 0.5
    return K


def fit_to_patches(
    img: Tensor,
    depth: Tensor,
    valid: Tensor,
    K: Tensor,
    size: tuple[int, int] | None = None,
    patch: int = PATCH,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Resize one frame (img 3×H×W, depth and valid H×W, K 3×3) to `size` when given (bilinear image,
    nearest depth and mask), then crop it, centred, to sides that are multiples of `patch`."""
    K = K.clone().float()
    if size is not None and tuple(size) != tuple(depth.shape):
        h, w = depth.shape
        sh, sw = size[0] / h, size[1] / w
        img = F.interpolate(
            img[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        img = img.clamp(0, 1)
        depth = F.interpolate(depth[None, None], size=tuple(size), mode="nearest")[0, 0]
        valid = F.interpolate(valid[None, None].float(), size=tuple(size), mode="nearest")[0, 0] > 0.5
        K = scale_intrinsics(K, sh, sw)
    h, w = depth.shape
    if patch > 1:
        ch, cw = h - h % patch, w - w % patch
        if ch == 0 or cw == 0:
            raise ValueError(f"an image of {h}×{w} is smaller than one {patch}×{patch} patch")
        top, left = (h - ch) // 2, (w - cw) // 2
        img, depth = img[:, top : top + ch, left : left + cw], depth[top : top + ch, left : left + cw]
        valid = valid[top : top + ch, left : left + cw]
        K[0, 2], K[1, 2] = K[0, 2] - left, K[1, 2] - top
    return img.contiguous(), depth.contiguous(), valid.contiguous(), K


def make_sample(
    imgs: list[Tensor],
    depths: list[np.ndarray | Tensor],
    intrinsics: list[np.ndarray | Tensor],
    poses: list[Tensor] | None = None,
    max_depth: float | None = None,
    size: tuple[int, int] | None = None,
    masks: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """A sample dict from per-frame images, depths (0 / non-finite = not measured), intrinsics and
    camera-to-world poses (identity when None); `masks` restrict the valid pixels further."""
    frames = []
    for k, (img, depth, K) in enumerate(zip(imgs, depths, intrinsics, strict=True)):
        d = torch.as_tensor(np.asarray(depth), dtype=torch.float32)
        if d.shape != img.shape[1:]:
            raise ValueError(f"frame {k}: image {tuple(img.shape[1:])} but depth {tuple(d.shape)}")
        ok = torch.isfinite(d) & (d > 0)
        if max_depth is not None:
            ok &= d < max_depth
        if masks is not None:
            ok &= masks[k]
        d = torch.where(ok, d, torch.zeros_like(d))
        frames.append(fit_to_patches(img, d, ok, torch.as_tensor(np.asarray(K), dtype=torch.float32), size))
    imgs_t, depth_t, valid_t, K_t = (torch.stack(x) for x in zip(*frames, strict=True))
    poses_t = (
        torch.stack(poses).float() if poses is not None else torch.eye(4).expand(len(frames), 4, 4).clone()
    )
    local, points = unproject(depth_t, K_t, poses_t)
    return {
        "imgs": imgs_t,
        "depth": depth_t,
        "valid": valid_t,
        "intrinsics": K_t,
        "camera_poses": poses_t,
        "local_points": local,
        "points": points,
    }


# --- datasets -------------------------------------------------------------------------------------------
class SintelDataset(Dataset):
    """MPI-Sintel (training set: depth and cameras exist only there) as clips of `num_views` frames
    `frame_step` apart, consecutive clips of a sequence not overlapping (num_views=1: every frame,
    monocular). Depth is valid where finite, > 0 and < max_depth (70, the usual protocol)."""

    def __init__(
        self,
        root: str | Path,
        pass_name: str = "final",
        num_views: int = 1,
        frame_step: int = 1,
        sequences: Sequence[str] | None = None,
        size: tuple[int, int] | None = None,
        max_depth: float | None = 70.0,
    ) -> None:
        if pass_name not in ("final", "clean"):
            raise ValueError(f"unknown Sintel pass {pass_name!r}; valid passes: final, clean")
        self.root = Path(root).expanduser()
        base = self.root / "training"
        self.image_dir, self.depth_dir, self.cam_dir = base / pass_name, base / "depth", base / "camdata_left"
        absent = [p for p in (self.image_dir, self.depth_dir, self.cam_dir) if not p.is_dir()]
        if absent:
            raise missing(
                "MPI-Sintel",
                absent,
                "unpack MPI-Sintel-training_images.zip and MPI-Sintel-depth-training-*.zip into one folder "
                f"(it then holds training/{pass_name}, training/depth and training/camdata_left)",
            )
        names = sorted(p.name for p in self.depth_dir.iterdir() if p.is_dir())
        if sequences is not None:
            unknown = sorted(set(sequences) - set(names))
            if unknown:
                raise ValueError(f"Sintel sequences {unknown} not in {self.depth_dir}; there are {names}")
            names = [n for n in names if n in set(sequences)]
        self.size, self.max_depth = size, max_depth
        span = (num_views - 1) * frame_step + 1
        self.clips: list[tuple[str, list[str]]] = []
        for seq in names:
            stems = sorted(p.stem for p in (self.depth_dir / seq).glob("*.dpt"))
            for start in range(0, len(stems) - span + 1, num_views * frame_step):
                self.clips.append((seq, stems[start : start + span : frame_step]))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        seq, stems = self.clips[i]
        imgs, depths, Ks, poses = [], [], [], []
        for stem in stems:
            imgs.append(read_rgb(self.image_dir / seq / f"{stem}.png"))
            depths.append(read_dpt(self.depth_dir / seq / f"{stem}.dpt"))
            K, E = read_cam(self.cam_dir / seq / f"{stem}.cam")
            Ks.append(K)
            poses.append(extrinsics_to_pose(E))
        return make_sample(imgs, depths, Ks, poses, self.max_depth, self.size)


class NYUv2Dataset(Dataset):
    """NYU-v2's labelled images in the BTS-style layout (module docstring), one frame per sample
    (identity pose). Depth valid where > 0 and < max_depth (10 m), inside the Eigen crop when set."""

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        size: tuple[int, int] | None = None,
        eigen_crop: bool = True,
        max_depth: float | None = 10.0,
    ) -> None:
        self.root = Path(root).expanduser()
        folder = self.root / "official_splits" / split
        self.pairs = sorted(
            (p, p.with_name(p.name.replace("rgb_", "sync_depth_", 1)).with_suffix(".png"))
            for p in folder.glob("*/rgb_*.jpg")
        )
        self.pairs = [(rgb, depth) for rgb, depth in self.pairs if depth.is_file()]
        if not self.pairs:
            raise missing(
                f"NYU-v2 ({split})",
                [folder / "<scene>" / "rgb_XXXXX.jpg + sync_depth_XXXXX.png"],
                "export the labelled set (nyu_depth_v2_labeled.mat) to this layout, as the BTS / AdaBins "
                "evaluation scripts do: 16-bit PNG depth in millimetres",
            )
        self.size, self.eigen_crop, self.max_depth = size, eigen_crop, max_depth

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        rgb, depth_path = self.pairs[i]
        img = read_rgb(rgb)
        depth = read_png_depth(depth_path, NYU_DEPTH_SCALE)
        masks = None
        if self.eigen_crop:
            top, bottom, left, right = EIGEN_CROP
            h, w = depth.shape
            mask = torch.zeros(h, w, dtype=torch.bool)
            mask[
                round(top * h / 480) : round(bottom * h / 480), round(left * w / 640) : round(right * w / 640)
            ] = True
            masks = [mask]
        h, w = depth.shape  # a resized export: the intrinsics follow
        K = scale_intrinsics(torch.tensor(NYU_INTRINSICS, dtype=torch.float32), h / 480, w / 640)
        return make_sample([img], [depth], [K], None, self.max_depth, self.size, masks)


class DepthPairs(Dataset):
    """Single frames from (RGB path, 16-bit PNG depth path) pairs with a depth `scale` (KITTI 256,
    TUM / Bonn 5000, NYU 1000) and one pinhole `intrinsics` (3×3; None: a guess of 60° horizontal field
    of view, for depth metrics only). Identity poses."""

    def __init__(
        self,
        pairs: Sequence[tuple[str | Path, str | Path]],
        scale: float,
        intrinsics: Sequence[Sequence[float]] | None = None,
        max_depth: float | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.pairs = [(Path(a), Path(b)) for a, b in pairs]
        self.scale, self.max_depth, self.size = scale, max_depth, size
        self.intrinsics = None if intrinsics is None else torch.tensor(intrinsics, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        rgb, depth_path = self.pairs[i]
        img, depth = read_rgb(rgb), read_png_depth(depth_path, self.scale)
        K = self.intrinsics
        if K is None:
            h, w = depth.shape
            f = (w / 2) / math.tan(math.radians(30))
            K = torch.tensor([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], dtype=torch.float32)
        return make_sample([img], [depth], [K], None, self.max_depth, self.size)


def _stamped(path: Path) -> list[tuple[float, str]]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            stamp, name = line.split()[:2]
            rows.append((float(stamp), name))
    return rows


def tum_pairs(sequence: str | Path, max_dt: float = 0.02) -> list[tuple[Path, Path]]:
    """(RGB, depth) paths of a TUM RGB-D / Bonn sequence, each RGB frame with the depth frame nearest
    in time (within `max_dt` seconds), each depth frame used once, in time order."""
    seq = Path(sequence).expanduser()
    if not (seq / "rgb.txt").is_file() or not (seq / "depth.txt").is_file():
        raise missing(
            "a TUM / Bonn sequence", [seq / "rgb.txt", seq / "depth.txt"], "unpack the sequence's archive"
        )
    rgb, depth = _stamped(seq / "rgb.txt"), _stamped(seq / "depth.txt")
    if not depth:
        return []
    stamps = np.array([s for s, _ in depth])
    used: set[int] = set()
    out = []
    for s, name in rgb:
        j = int(np.abs(stamps - s).argmin())
        if abs(stamps[j] - s) <= max_dt and j not in used:
            used.add(j)
            out.append((seq / name, seq / depth[j][1]))
    return out


def kitti_pairs(depth_root: str | Path, raw_root: str | Path, split: str = "val") -> list[tuple[Path, Path]]:
    """(RGB, annotated depth) paths of KITTI's depth benchmark split (left colour camera, image_02)."""
    depth_root, raw_root = Path(depth_root).expanduser(), Path(raw_root).expanduser()
    out = []
    for depth in sorted((depth_root / split).glob("*/proj_depth/groundtruth/image_02/*.png")):
        drive = depth.parents[3].name
        rgb = raw_root / drive[:10] / drive / "image_02" / "data" / depth.name
        if rgb.is_file():
            out.append((rgb, depth))
    return out
