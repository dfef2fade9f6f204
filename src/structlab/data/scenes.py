"""Procedural multi-view scenes for the depth task: exact geometry, no data on disk.

A scene is a room (an axis-aligned box of inward-facing planes: floor at z = 0, four walls and, in
some scenes, a ceiling) holding a few spheres and boxes (boxes turned about the vertical axis). Every
surface has a solid 3-D texture of the world position (checker, stripes or value noise) and Lambert
shading under a directional and a point light (no shadows). N cameras sit on an orbit around the
room's centre (random radius, height, azimuth step and jitter per scene) and look at a point near it.

Rendering is ray casting, vectorised over all pixels of all views at once: the depth is exact.

Conventions (OpenCV): a camera's frame has x right, y down, z forward; `intrinsics` K maps a point
of that frame to pixel coordinates in which pixel (row v, column u) has its centre at (u, v), so a
pixel's local point is depth · K⁻¹ (u, v, 1). `camera_poses` are camera-to-world 4×4 matrices: a
global point is pose · local point. The world frame has z up.

A sample (one scene, N views of H×W):
  imgs          N×3×H×W float32 in [0, 1]
  depth         N×H×W   float32, z in the camera frame (0 where not valid)
  valid         N×H×W   bool: the ray hit a surface (a room without ceiling shows "sky" above the walls)
                        and, with `max_depth`, the depth is below it
  intrinsics    N×3×3   float32
  camera_poses  N×4×4   float32, camera-to-world
  local_points  N×H×W×3 float32, camera frame (0 where not valid)
  points        N×H×W×3 float32, world frame (0 where not valid)
  normals       N×H×W×3 float32, unit surface normals in the camera frame, facing the camera (0 where not valid)

Seeds: scene `index` of a split is rendered from `scene_seed(split, index, seed)`; the splits' seed
ranges are disjoint, so a training scene never equals a validation or test scene. The train split
draws new scenes every epoch (`set_epoch`, called by the depth task at each epoch start) when
`resample=True`: epoch e uses train indices e·train_size … (e+1)·train_size − 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from structlab.data.base import SplitDataModule

PATCH = 14  # the π3 encoder's patch size: image sides must be multiples of it
SPLIT_OFFSET = {"train": 0, "val": 1 << 40, "test": 2 << 40}
SPLIT_SPAN = 1 << 40  # indices per split; a seed's splits are disjoint ranges inside one 2^42 block
TEXTURES = ("checker", "stripes", "noise")
EPS = 1e-4


def scene_seed(split: str, index: int, seed: int = 0) -> int:
    """The generator seed of scene `index` of `split`; the three splits use disjoint seed ranges."""
    if split not in SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLIT_OFFSET)}")
    if not 0 <= index < SPLIT_SPAN:
        raise ValueError(f"scene index {index} is outside [0, 2^40)")
    return seed * (4 << 40) + SPLIT_OFFSET[split] + index


# --- scene description ---------------------------------------------------------------------------------
@dataclass
class Material:
    """A solid texture: `kind` in TEXTURES mixes `color_a` and `color_b` (RGB in [0, 1]) by a pattern of
    the world position with period `scale` (stripes run along `direction`)."""

    kind: str = "checker"
    color_a: tuple[float, float, float] = (0.8, 0.8, 0.8)
    color_b: tuple[float, float, float] = (0.2, 0.2, 0.2)
    scale: float = 0.5
    direction: tuple[float, float, float] = (1.0, 0.0, 0.0)


@dataclass
class Scene:
    """A room [lo, hi] (world z up, floor at lo[2]) with spheres and boxes. `materials` lists one
    material per surface in the order: room faces x−, x+, y−, y+, floor, ceiling; spheres; boxes
    (shorter lists are padded with the default material)."""

    lo: Tensor
    hi: Tensor
    ceiling: bool = True
    sphere_centers: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    sphere_radii: Tensor = field(default_factory=lambda: torch.zeros(0))
    box_centers: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    box_halves: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    box_yaws: Tensor = field(default_factory=lambda: torch.zeros(0))
    materials: list[Material] = field(default_factory=list)
    light_dir: tuple[float, float, float] = (0.3, 0.2, 1.0)  # towards the light
    point_light: tuple[float, float, float] | None = None  # None: the room's centre below the top
    ambient: float = 0.25
    noise_seed: int = 0

    @property
    def num_surfaces(self) -> int:
        return 6 + len(self.sphere_radii) + len(self.box_yaws)


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """Camera-to-world poses (…×4×4, OpenCV: x right, y down, z forward) of cameras at `eye` looking
    at `target` (…×3), the image's up direction towards `up` (world +z by default)."""
    up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype) if up is None else up
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up.expand_as(forward)), dim=-1)
    down = torch.linalg.cross(forward, right)
    pose = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype)
    pose[..., :3, 0], pose[..., :3, 1], pose[..., :3, 2], pose[..., :3, 3] = right, down, forward, eye
    pose[..., 3, 3] = 1.0
    return pose


def intrinsics_from_fov(height: int, width: int, fov_x_deg: float) -> Tensor:
    """Square pixels, principal point at the image centre ((W−1)/2, (H−1)/2 in pixel-centre coordinates)."""
    f = (width / 2) / math.tan(math.radians(fov_x_deg) / 2)
    return torch.tensor([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])


# --- random scenes --------------------------------------------------------------------------------------
def _u(g: torch.Generator, lo: float, hi: float, *shape: int) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape or (1,), generator=g, dtype=torch.float64)


def _random_material(g: torch.Generator, dark_light: bool) -> Material:
    kind = TEXTURES[int(torch.randint(0, len(TEXTURES), (1,), generator=g))]
    a, b = torch.rand(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
    if dark_light:  # contrast: one brighter colour, one darker
        a, b = 0.45 + 0.55 * a, 0.35 * b
    direction = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
    return Material(
        kind=kind,
        color_a=tuple(a.tolist()),
        color_b=tuple(b.tolist()),
        scale=float(_u(g, 0.15, 0.6)),
        direction=tuple(direction.tolist()),
    )


def random_scene(g: torch.Generator, num_objects: int = 3, ceiling_prob: float = 0.5) -> Scene:
    """A room 7–11 m wide and 2.6–3.6 m high with `num_objects` spheres or boxes within 1.4 m of its
    centre axis (on the floor or floating), each no wider than 0.8 m from its centre: clear of the
    camera orbit (radius ≥ 2.6 m, see `orbit_cameras`)."""
    half = _u(g, 3.5, 5.5, 2)
    height = float(_u(g, 2.6, 3.6))
    lo = torch.tensor([-half[0], -half[1], 0.0], dtype=torch.float64)
    hi = torch.tensor([half[0], half[1], height], dtype=torch.float64)
    ceiling = bool(torch.rand(1, generator=g) < ceiling_prob)
    spheres, radii, boxes, halves, yaws = [], [], [], [], []
    for _ in range(num_objects):
        sphere = bool(torch.rand(1, generator=g) < 0.5)
        angle, dist = float(_u(g, 0, 2 * math.pi)), 1.4 * math.sqrt(float(_u(g, 0, 1)))
        floating = bool(torch.rand(1, generator=g) < 0.3)
        if sphere:
            r = float(_u(g, 0.25, 0.6))
            z = float(_u(g, r + 0.2, 1.8)) if floating else r
            spheres.append([dist * math.cos(angle), dist * math.sin(angle), z])
            radii.append(r)
        else:
            h = _u(g, 0.2, 0.55, 3)
            z = float(_u(g, float(h[2]) + 0.2, 1.8)) if floating else float(h[2])
            boxes.append([dist * math.cos(angle), dist * math.sin(angle), z])
            halves.append(h.tolist())
            yaws.append(float(_u(g, 0, math.pi)))
    materials = [_random_material(g, dark_light=True) for _ in range(6 + num_objects)]
    light = torch.nn.functional.normalize(
        torch.stack([_u(g, -0.6, 0.6)[0], _u(g, -0.6, 0.6)[0], _u(g, 0.6, 1.0)[0]]), dim=0
    )
    return Scene(
        lo=lo,
        hi=hi,
        ceiling=ceiling,
        sphere_centers=torch.tensor(spheres, dtype=torch.float64).reshape(-1, 3),
        sphere_radii=torch.tensor(radii, dtype=torch.float64),
        box_centers=torch.tensor(boxes, dtype=torch.float64).reshape(-1, 3),
        box_halves=torch.tensor(halves, dtype=torch.float64).reshape(-1, 3),
        box_yaws=torch.tensor(yaws, dtype=torch.float64),
        materials=materials,
        light_dir=tuple(light.tolist()),
        ambient=float(_u(g, 0.15, 0.35)),
        noise_seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)),
    )


def orbit_cameras(
    g: torch.Generator, scene: Scene, num_views: int, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """(intrinsics N×3×3, camera-to-world poses N×4×4) of `num_views` cameras on an orbit around the
    room's vertical axis: radius 2.6 m … 0.4 m inside the nearest wall, height 0.6–2.0 m, consecutive
    azimuths 15–35° apart, each position and target jittered; one horizontal field of view of 50–75°."""
    wall = float(torch.minimum(-scene.lo[:2], scene.hi[:2]).min())
    radius = float(_u(g, 2.6, max(2.7, wall - 0.4)))
    cam_height = float(_u(g, 0.6, min(2.0, float(scene.hi[2]) - 0.4)))
    target = torch.cat([0.2 * torch.randn(2, generator=g, dtype=torch.float64), _u(g, 0.3, 0.9)])
    start, step = float(_u(g, 0, 2 * math.pi)), math.radians(float(_u(g, 15, 35)))
    azimuth = start + step * torch.arange(num_views, dtype=torch.float64)
    azimuth = azimuth + math.radians(3) * (2 * torch.rand(num_views, generator=g, dtype=torch.float64) - 1)
    r = radius + 0.15 * (2 * torch.rand(num_views, generator=g, dtype=torch.float64) - 1)
    z = cam_height + 0.15 * (2 * torch.rand(num_views, generator=g, dtype=torch.float64) - 1)
    eye = torch.stack([r * torch.cos(azimuth), r * torch.sin(azimuth), z], dim=-1)
    targets = target + 0.1 * (2 * torch.rand(num_views, 3, generator=g, dtype=torch.float64) - 1)
    poses = look_at(eye, targets)
    K = intrinsics_from_fov(height, width, float(_u(g, 50, 75))).to(torch.float64)
    return K.expand(num_views, 3, 3).clone(), poses


# --- ray casting --------------------------------------------------------------------------------------
def _room_hits(scene: Scene, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Distances (6×P, inf where missed) to the room's faces from inside, and their inward normals (6×3)."""
    ts, normals = [], []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for side, bound in ((-1, scene.lo[axis]), (1, scene.hi[axis])):
            normal = torch.zeros(3, dtype=o.dtype)
            normal[axis] = -side  # inward
            t = (bound - o[:, axis]) / d[:, axis]
            p = o + t[:, None] * d
            inside = torch.ones_like(t, dtype=torch.bool)
            for a in others:
                inside &= (p[:, a] >= scene.lo[a] - EPS) & (p[:, a] <= scene.hi[a] + EPS)
            hit = inside & (t > EPS) & (d[:, axis] * side > 0)
            if axis == 2 and side == 1 and not scene.ceiling:
                hit = torch.zeros_like(hit)
            ts.append(torch.where(hit, t, torch.inf))
            normals.append(normal)
    return torch.stack(ts), torch.stack(normals)


def _sphere_hits(scene: Scene, o: Tensor, d: Tensor) -> Tensor:
    """Distances (S×P) to the spheres' near side (inf where missed or behind)."""
    c, r = scene.sphere_centers.to(o.dtype), scene.sphere_radii.to(o.dtype)
    oc = o[None] - c[:, None]  # S×P×3
    a = (d * d).sum(-1)[None]
    b = 2 * (oc * d[None]).sum(-1)
    cc = (oc * oc).sum(-1) - r[:, None] ** 2
    disc = b * b - 4 * a * cc
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    return torch.where((disc >= 0) & (t > EPS), t, torch.inf)


def _yaw(angles: Tensor) -> Tensor:
    c, s = torch.cos(angles), torch.sin(angles)
    z, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, one], dim=-1).reshape(*angles.shape, 3, 3)


def _box_hits(scene: Scene, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Distances (Bx×P) to the boxes' near side, and the hit face's outward normal (Bx×P×3, world)."""
    R = _yaw(scene.box_yaws.to(o.dtype))  # box-to-world rotations
    ol = torch.einsum("kji,kpj->kpi", R, o[None] - scene.box_centers.to(o.dtype)[:, None])  # Rᵀ(o − c)
    dl = torch.einsum("kji,pj->kpi", R, d)
    dl = torch.where(dl.abs() < 1e-12, torch.full_like(dl, 1e-12), dl)
    h = scene.box_halves.to(o.dtype)[:, None]
    t1, t2 = (-h - ol) / dl, (h - ol) / dl
    near, far = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = near.max(-1)
    t_far = far.min(-1).values
    t = torch.where((t_near <= t_far) & (t_near > EPS), t_near, torch.inf)
    normal_local = -torch.sign(dl) * torch.nn.functional.one_hot(axis, 3).to(o.dtype)
    return t, torch.einsum("kij,kpj->kpi", R, normal_local)


def _hash_noise(p: Tensor, seed: int) -> Tensor:
    """Value noise in [0, 1]: random values on the integer lattice (a seeded table, hashed by the
    cell's coordinates), trilinear with smoothstep weights."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(256, generator=g)
    values = torch.rand(256, generator=g, dtype=p.dtype)
    cell = torch.floor(p)
    frac = p - cell
    w = frac * frac * (3 - 2 * frac)
    i = cell.long()
    out = torch.zeros(p.shape[:-1], dtype=p.dtype)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                h = perm[(i[..., 0] + dx) & 255]
                h = perm[(h + i[..., 1] + dy) & 255]
                h = perm[(h + i[..., 2] + dz) & 255]
                wx = w[..., 0] if dx else 1 - w[..., 0]
                wy = w[..., 1] if dy else 1 - w[..., 1]
                wz = w[..., 2] if dz else 1 - w[..., 2]
                out = out + wx * wy * wz * values[h]
    return out


def texture(material: Material, p: Tensor, noise_seed: int = 0) -> Tensor:
    """Albedo (…×3) of `material` at world points `p` (…×3)."""
    q = p / material.scale
    if material.kind == "checker":
        mix = torch.floor(q).sum(-1).remainder(2)
    elif material.kind == "stripes":
        along = (q * torch.tensor(material.direction, dtype=p.dtype)).sum(-1)
        mix = (along - torch.floor(along) < 0.5).to(p.dtype)
    elif material.kind == "noise":
        mix = 0.65 * _hash_noise(q, noise_seed) + 0.35 * _hash_noise(2.03 * q + 17.0, noise_seed + 1)
        mix = ((mix - 0.5) * 2.5 + 0.5).clamp(0, 1)
    else:
        raise ValueError(f"unknown texture {material.kind!r}; valid textures: {', '.join(TEXTURES)}")
    a = torch.tensor(material.color_a, dtype=p.dtype)
    b = torch.tensor(material.color_b, dtype=p.dtype)
    return a + (b - a) * mix[..., None]


def render(
    scene: Scene,
    intrinsics: Tensor,
    camera_poses: Tensor,
    height: int,
    width: int,
    max_depth: float | None = None,
) -> dict[str, Tensor]:
    """Ray-cast `scene` from N cameras (intrinsics N×3×3, camera-to-world N×4×4): the sample dict
    described in the module docstring. Computed in float64, returned as float32."""
    K = intrinsics.to(torch.float64)
    poses = camera_poses.to(torch.float64)
    n = poses.shape[0]
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
    )
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # H×W×3
    rays = torch.einsum("nij,hwj->nhwi", torch.linalg.inv(K), pix)  # camera frame, z = 1
    R, eye = poses[:, :3, :3], poses[:, :3, 3]
    d = torch.einsum("nij,nhwj->nhwi", R, rays).reshape(-1, 3)  # world; t along d is the depth
    o = eye[:, None, None].expand(n, height, width, 3).reshape(-1, 3)

    t_room, n_room = _room_hits(scene, o, d)
    t_sph = _sphere_hits(scene, o, d)
    t_box, n_box = _box_hits(scene, o, d)
    t_all = torch.cat([t_room, t_sph, t_box])
    t, which = t_all.min(0)
    valid = torch.isfinite(t)
    if max_depth is not None:
        valid &= t < max_depth
    t = torch.where(valid, t, torch.zeros_like(t))
    p = o + t[:, None] * d

    materials = list(scene.materials) + [Material()] * (scene.num_surfaces - len(scene.materials))
    albedo = torch.zeros_like(p)
    normal = torch.zeros_like(p)
    s_count = len(scene.sphere_radii)
    for k in range(scene.num_surfaces):
        sel = valid & (which == k)
        if not bool(sel.any()):
            continue
        if k < 6:
            normal[sel] = n_room[k]
        elif k < 6 + s_count:
            c, r = scene.sphere_centers[k - 6].to(p.dtype), scene.sphere_radii[k - 6].to(p.dtype)
            normal[sel] = (p[sel] - c) / r
        else:
            normal[sel] = n_box[k - 6 - s_count][sel]
        albedo[sel] = texture(materials[k], p[sel], scene.noise_seed + 7 * k)

    # Lambert: ambient + directional + a point light near the top of the room
    light = torch.nn.functional.normalize(torch.tensor(scene.light_dir, dtype=p.dtype), dim=0)
    lamp = (
        torch.tensor(scene.point_light, dtype=p.dtype)
        if scene.point_light is not None
        else torch.tensor(
            [
                0.5 * float(scene.lo[0] + scene.hi[0]),
                0.5 * float(scene.lo[1] + scene.hi[1]),
                float(scene.hi[2]) - 0.3,
            ],
            dtype=p.dtype,
        )
    )
    to_lamp = lamp - p
    dist2 = (to_lamp * to_lamp).sum(-1, keepdim=True).clamp_min(1e-6)
    lamp_term = (normal * to_lamp).sum(-1, keepdim=True).clamp_min(0) / dist2.sqrt() * (4.0 / (1.0 + dist2))
    sun_term = (normal * light).sum(-1, keepdim=True).clamp_min(0)
    shade = scene.ambient + (1 - scene.ambient) * (0.6 * sun_term + 0.5 * lamp_term)
    color = (albedo * shade).clamp(0, 1)
    sky_t = torch.nn.functional.normalize(d, dim=-1)[:, 2:3].clamp(0, 1)
    sky = torch.tensor([0.75, 0.85, 1.0], dtype=p.dtype) * (0.6 + 0.4 * sky_t)
    color = torch.where(valid[:, None], color, sky)

    shape = (n, height, width)
    local = (t[:, None] * rays.reshape(-1, 3)).reshape(*shape, 3)
    normal_cam = torch.einsum("nji,nhwj->nhwi", R, normal.reshape(*shape, 3))  # Rᵀ n
    mask = valid.reshape(shape)
    return {
        "imgs": color.reshape(*shape, 3).permute(0, 3, 1, 2).float().contiguous(),
        "depth": t.reshape(shape).float(),
        "valid": mask,
        "intrinsics": K.float(),
        "camera_poses": poses.float(),
        "local_points": local.float(),
        "points": torch.where(mask[..., None], p.reshape(*shape, 3), 0.0).float(),
        "normals": normal_cam.float(),
    }


def generate_scene(
    seed: int,
    num_views: int = 4,
    height: int = 56,
    width: int = 56,
    num_objects: int = 3,
    ceiling_prob: float = 0.5,
    max_depth: float | None = None,
) -> dict[str, Tensor]:
    """The sample of the random scene and cameras drawn from generator seed `seed` (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    scene = random_scene(g, num_objects, ceiling_prob)
    K, poses = orbit_cameras(g, scene, num_views, height, width)
    return render(scene, K, poses, height, width, max_depth)


# --- datasets and the datamodule ------------------------------------------------------------------------
class SceneDataset(Dataset):
    """`size` procedural scenes of `split` (see `generate_scene` for the options). For the train split,
    `set_epoch(e)` with `resample=True` moves to the next `size` seeds."""

    def __init__(
        self,
        split: str,
        size: int,
        num_views: int = 4,
        height: int = 56,
        width: int = 56,
        num_objects: int = 3,
        seed: int = 0,
        resample: bool = False,
        ceiling_prob: float = 0.5,
        max_depth: float | None = None,
    ) -> None:
        scene_seed(split, 0, seed)  # checks the split
        self.split, self.size, self.seed, self.resample = split, size, seed, resample
        self.options = {
            "num_views": num_views,
            "height": height,
            "width": width,
            "num_objects": num_objects,
            "ceiling_prob": ceiling_prob,
            "max_depth": max_depth,
        }
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def seed_of(self, i: int) -> int:
        if not 0 <= i < self.size:
            raise IndexError(f"scene {i} of a split of {self.size}")
        index = self.epoch * self.size + i if self.resample else i
        return scene_seed(self.split, index, self.seed)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return generate_scene(self.seed_of(i), **self.options)


class SceneDataModule(SplitDataModule):
    """Train / val / test splits of procedural scenes (disjoint seeds); batches are dicts of the sample
    keys with a leading batch dimension. `batch_size` is per device."""

    validation_split = "its own scenes (disjoint seeds)"

    def __init__(
        self,
        num_views: int = 4,
        height: int = 56,
        width: int = 56,
        num_objects: int = 3,
        train_size: int = 1024,
        val_size: int = 64,
        test_size: int = 64,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        resample: bool = True,
        ceiling_prob: float = 0.5,
        max_depth: float | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if height % PATCH or width % PATCH or height <= 0 or width <= 0:
            raise ValueError(
                f"task.data.height={height} and width={width} must be positive multiples of {PATCH} "
                f"(the π3 patch size), e.g. 56 or 224"
            )
        if num_views < 2:
            raise ValueError(f"task.data.num_views={num_views}: the multi-view task needs at least 2 views")
        if num_objects < 0:
            raise ValueError(f"task.data.num_objects={num_objects} must be ≥ 0")
        self.seed, self.resample = seed, resample
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.options = {
            "num_views": num_views,
            "height": height,
            "width": width,
            "num_objects": num_objects,
            "ceiling_prob": ceiling_prob,
            "max_depth": max_depth,
        }

    def setup(self, stage: str | None = None) -> None:
        for split, size in self.sizes.items():
            resample = self.resample and split == "train"
            self.splits.setdefault(
                split, SceneDataset(split, size, seed=self.seed, resample=resample, **self.options)
            )

    def set_epoch(self, epoch: int) -> None:
        """Draw the train split's scenes of `epoch` (the depth task calls this at each epoch start)."""
        if "train" in self.splits:
            self.splits["train"].set_epoch(epoch)
