"""Procedural multi-view scenes: exact geometry (depth, points, poses, normals), known configurations,
determinism, disjoint splits, the datamodule and its config."""

from __future__ import annotations

import math
import time

import pytest
import torch

from structlab.data.scenes import (
    Material,
    Scene,
    SceneDataModule,
    SceneDataset,
    generate_scene,
    intrinsics_from_fov,
    look_at,
    render,
    scene_seed,
)

KEYS = {"imgs", "depth", "valid", "intrinsics", "camera_poses", "local_points", "points", "normals"}


def pixel_rays(K: torch.Tensor, h: int, w: int) -> torch.Tensor:
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    return torch.einsum(
        "ij,hwj->hwi", torch.linalg.inv(K.double()), torch.stack([u, v, torch.ones_like(u)], -1)
    )


def test_sample_keys_shapes_and_ranges():
    s = generate_scene(scene_seed("train", 3), num_views=3, height=28, width=42, num_objects=4)
    assert set(s) == KEYS
    n, h, w = 3, 28, 42
    shapes = {
        "imgs": (n, 3, h, w), "depth": (n, h, w), "valid": (n, h, w), "intrinsics": (n, 3, 3),
        "camera_poses": (n, 4, 4), "local_points": (n, h, w, 3), "points": (n, h, w, 3), "normals": (n, h, w, 3),
    }  # fmt: skip
    for k, shape in shapes.items():
        assert tuple(s[k].shape) == shape, k
        assert s[k].dtype == (torch.bool if k == "valid" else torch.float32), k
    assert s["imgs"].min() >= 0 and s["imgs"].max() <= 1
    assert all(float(s["imgs"][i].std()) > 0.03 for i in range(n))  # textured, not constant
    assert s["valid"].float().mean() > 0.5
    assert (s["depth"][s["valid"]] > 0).all() and (s["depth"][~s["valid"]] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_points_depth_poses_and_normals_are_consistent(seed):
    s = generate_scene(seed, num_views=4, height=28, width=28)
    valid, depth = s["valid"], s["depth"]
    local, points, poses = s["local_points"].double(), s["points"].double(), s["camera_poses"].double()
    # depth is z in the camera frame, and a local point is depth · K⁻¹ (u, v, 1)
    assert torch.allclose(local[..., 2], depth.double(), atol=1e-5)
    for i in range(4):
        expected = depth[i, ..., None].double() * pixel_rays(s["intrinsics"][i], 28, 28)
        assert torch.allclose(local[i], expected, atol=1e-4)
    # global points = camera-to-world pose · local points
    R, t = poses[:, None, None, :3, :3], poses[:, None, None, :3, 3]
    world = (R @ local[..., None]).squeeze(-1) + t
    assert torch.allclose(world[valid], points[valid], atol=1e-4)
    # the poses are rigid and the cameras look at the room's centre region
    rot = poses[:, :3, :3]
    assert torch.allclose(
        rot.transpose(1, 2) @ rot, torch.eye(3, dtype=torch.float64).expand(4, 3, 3), atol=1e-5
    )
    assert torch.allclose(torch.linalg.det(rot), torch.ones(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(poses[:, 3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64).expand(4, 4))
    to_centre = torch.nn.functional.normalize(-poses[:, :2, 3], dim=-1)
    assert ((rot[:, :2, 2] * to_centre).sum(-1) > 0.7).all()  # forward axis points inwards
    # unit normals facing the camera where valid, 0 elsewhere
    n = s["normals"].double()
    assert torch.allclose(n[valid].norm(dim=-1), torch.ones(int(valid.sum()), dtype=torch.float64), atol=1e-4)
    assert ((n[valid] * local[valid]).sum(-1) < 1e-6).all()
    assert (n[~valid] == 0).all() and (local[~valid] == 0).all()


def test_a_camera_facing_a_wall_sees_its_distance_everywhere():
    room = Scene(lo=torch.tensor([-100.0, -100, -100]), hi=torch.tensor([2.0, 100, 100]))
    K = intrinsics_from_fov(14, 28, 60.0)
    pose = look_at(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 0, 0]], dtype=torch.float64))
    out = render(room, K[None], pose, 14, 28)
    assert out["valid"].all()
    assert torch.allclose(out["depth"], torch.full((1, 14, 28), 2.0), atol=1e-5)
    assert torch.allclose(out["normals"], torch.tensor([0.0, 0, -1]).expand(1, 14, 28, 3), atol=1e-6)
    assert torch.allclose(out["points"][..., 0], torch.full((1, 14, 28), 2.0), atol=1e-5)
    # the camera's x axis (right) is world −y when looking along +x with z up; y (down) is −z
    assert torch.allclose(
        pose[0, :3, :3], torch.tensor([[0, 0, 1.0], [-1, 0, 0], [0, -1, 0]], dtype=torch.float64)
    )
    near = render(room, K[None], pose, 14, 28, max_depth=1.5)  # a max_depth below the wall: nothing valid
    assert not near["valid"].any() and (near["depth"] == 0).all()


def test_a_sphere_and_a_box_in_front_of_the_camera():
    h = w = 15  # odd: the centre pixel is on the optical axis
    K = intrinsics_from_fov(h, w, 40.0)
    eye = torch.zeros(1, 3, dtype=torch.float64)
    pose = look_at(eye, torch.tensor([[1.0, 0, 0]], dtype=torch.float64))
    room = dict(lo=torch.tensor([-50.0, -50, -50]), hi=torch.tensor([50.0, 50, 50]))
    sphere = Scene(**room, sphere_centers=torch.tensor([[5.0, 0, 0]]), sphere_radii=torch.tensor([1.0]))
    out = render(sphere, K[None], pose, h, w)
    assert abs(float(out["depth"][0, 7, 7]) - 4.0) < 1e-5
    on = out["depth"][0] < 10  # pixels that hit the sphere (the wall is 50 away)
    assert 5 < int(on.sum()) < h * w
    dist = (out["points"][0][on].double() - torch.tensor([5.0, 0, 0], dtype=torch.float64)).norm(dim=-1)
    assert torch.allclose(dist, torch.ones_like(dist), atol=1e-5)
    # a box turned by 30° about z: its hit points lie on its surface
    c, half, yaw = torch.tensor([4.0, 0.2, 0.1]), torch.tensor([0.5, 0.7, 0.6]), math.radians(30)
    box = Scene(**room, box_centers=c[None], box_halves=half[None], box_yaws=torch.tensor([yaw]))
    out = render(box, K[None], pose, h, w)
    on = out["depth"][0] < 10
    assert int(on.sum()) > 5
    rz = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    q = (out["points"][0][on] - c) @ rz  # Rᵀ(p − c), box coordinates
    excess = (q.abs() / half).max(-1).values
    assert torch.allclose(excess, torch.ones_like(excess), atol=1e-4)


def test_textures_and_a_missing_ceiling():
    p = torch.tensor([[0.1, 0.1, 0.1], [0.6, 0.1, 0.1]], dtype=torch.float64)
    from structlab.data.scenes import texture

    checker = texture(Material("checker", (1, 1, 1), (0, 0, 0), 0.5), p)
    assert torch.equal(checker, torch.tensor([[1.0, 1, 1], [0, 0, 0]], dtype=torch.float64))
    noise = texture(Material("noise", (1, 1, 1), (0, 0, 0), 0.3), torch.rand(500, 3, dtype=torch.float64) * 5)
    assert 0 <= float(noise.min()) and float(noise.max()) <= 1 and float(noise.std()) > 0.05
    with pytest.raises(ValueError, match="unknown texture 'plaid'"):
        texture(Material("plaid"), p)
    room = Scene(lo=torch.tensor([-3.0, -3, 0]), hi=torch.tensor([3.0, 3, 2]), ceiling=False)
    up = look_at(
        torch.tensor([[0.0, 0, 1]], dtype=torch.float64), torch.tensor([[0.01, 0, 5]], dtype=torch.float64)
    )
    out = render(room, intrinsics_from_fov(14, 14, 60)[None], up, 14, 14)
    assert not out["valid"].any() and (out["depth"] == 0).all()  # only sky above
    assert out["imgs"].min() > 0.3  # the sky's colour


def test_scenes_are_deterministic_per_seed():
    a, b, c = generate_scene(11, 2, 28, 28), generate_scene(11, 2, 28, 28), generate_scene(12, 2, 28, 28)
    assert all(torch.equal(a[k], b[k]) for k in KEYS)
    assert not torch.equal(a["imgs"], c["imgs"]) and not torch.equal(a["camera_poses"], c["camera_poses"])


def test_splits_never_share_a_scene():
    train = SceneDataset("train", 50, resample=True)
    seen = set()
    for epoch in range(3):
        train.set_epoch(epoch)
        seeds = {train.seed_of(i) for i in range(50)}
        assert not seeds & seen  # every epoch new training scenes
        seen |= seeds
    val = {SceneDataset("val", 50).seed_of(i) for i in range(50)}
    test = {SceneDataset("test", 50).seed_of(i) for i in range(50)}
    assert len(val) == len(test) == 50 and not (val & test) and not (seen & (val | test))
    # by construction: the splits are disjoint seed ranges, and a run seed moves all of them
    assert scene_seed("train", (1 << 40) - 1) < scene_seed("val", 0) < scene_seed("test", 0)
    assert scene_seed("test", (1 << 40) - 1) < scene_seed("train", 0, seed=1)
    fixed = SceneDataset("train", 5, resample=False)
    fixed.set_epoch(4)
    assert fixed.seed_of(2) == scene_seed("train", 2)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        SceneDataset("dev", 5)
    item = SceneDataset("val", 3, height=28, width=28)[1]
    assert torch.equal(item["imgs"], generate_scene(scene_seed("val", 1), height=28, width=28)["imgs"])


def test_datamodule_batches_and_checks():
    dm = SceneDataModule(
        num_views=2, height=28, width=28, train_size=6, val_size=3, test_size=3, batch_size=2
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["imgs"].shape == (2, 2, 3, 28, 28) and batch["points"].shape == (2, 2, 28, 28, 3)
    # training drops a last partial batch, evaluation keeps it
    assert len(dm.train_dataloader()) == 3 and len(dm.val_dataloader()) == 2
    assert dm.train_batches_per_device(2) == 1
    first = [dm.splits["train"].seed_of(i) for i in range(6)]
    dm.set_epoch(1)
    assert [dm.splits["train"].seed_of(i) for i in range(6)] == [s + 6 for s in first]
    with pytest.raises(ValueError, match="multiples of 14"):
        SceneDataModule(height=50)
    with pytest.raises(ValueError, match="at least 2 views"):
        SceneDataModule(num_views=1)


def test_a_batch_generates_fast():
    """8 scenes × 4 views × 56×56 (the config's default) on one thread: well under a second."""
    generate_scene(0)  # warm-up (lazy imports, allocator)
    start = time.perf_counter()
    for i in range(8):
        generate_scene(scene_seed("train", i))
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"8 scenes took {elapsed:.2f} s"


def test_task_config_builds_the_datamodule():
    import hydra
    from support import compose_train

    cfg = compose_train("task=depth")
    assert cfg.task.name == "depth" and cfg.task.metric.name == "abs_rel" and cfg.task.metric.mode == "min"
    dm = hydra.utils.instantiate(cfg.task.data, batch_size=2, train_size=4)
    assert isinstance(dm, SceneDataModule) and dm.options["height"] % 14 == 0
    assert cfg.task.module._target_ == "structlab.tasks.DepthModule"
