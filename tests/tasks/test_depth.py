"""The depth task: π3's loss (invariances, gradients), depth and pose metrics on hand-computed cases,
epoch aggregation, and DepthModule training / evaluating a small real network and pi3_tiny."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from structlab.data.scenes import SceneDataModule, generate_scene
from structlab.models import MODELS, register_model
from structlab.tasks import DepthModule
from structlab.tasks.depth import (
    DepthPoseMetrics,
    align_depth,
    depth_loss,
    depth_metrics,
    optimal_scale,
    pose_auc,
    relative_pose_errors,
    rotation_angle,
    weighted_median,
)


# --- a small real network with π3's outputs ------------------------------------------------------------
class TinyGeometryNet(nn.Module):
    """Convolutions per frame → (x, y, log z) local points as π3 reads them, a confidence logit, and a
    pose per frame (6-D rotation + translation from pooled features); points = pose · local."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1)
        )
        self.head = nn.Conv2d(width, 4, 1)
        self.camera = nn.Linear(width, 9)

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n, _, h, w = imgs.shape
        f = F.gelu(self.body(imgs.flatten(0, 1)))
        out = self.head(f).permute(0, 2, 3, 1).reshape(b, n, h, w, 4)
        z = out[..., 2].clamp(-5, 5).exp()
        local = torch.stack([out[..., 0] * z, out[..., 1] * z, z], -1)
        c = self.camera(f.mean((2, 3))).reshape(b, n, 9)
        a1 = c[..., :3] + torch.tensor([1.0, 0, 0])
        a2 = c[..., 3:6] + torch.tensor([0, 1.0, 0])
        r1 = F.normalize(a1, dim=-1)
        r2 = F.normalize(a2 - (r1 * a2).sum(-1, keepdim=True) * r1, dim=-1)
        R = torch.stack([r1, r2, torch.linalg.cross(r1, r2)], -1)
        pose = torch.cat([torch.cat([R, c[..., 6:, None]], -1), torch.eye(4)[3:].expand(b, n, 1, 4)], -2)
        points = (R[:, :, None, None] @ local[..., None]).squeeze(-1) + c[:, :, None, None, 6:]
        return {"points": points, "local_points": local, "conf": out[..., 3:], "camera_poses": pose}


class NaNNet(TinyGeometryNet):
    def forward(self, imgs):
        return {k: v * torch.nan for k, v in super().forward(imgs).items()}


for _name, _factory in (("depth_test_net", TinyGeometryNet), ("depth_test_nan", NaNNet)):
    if _name not in MODELS:
        register_model(_name)(_factory)


def scenes(n: int = 2, views: int = 3, size: int = 28) -> dict[str, torch.Tensor]:
    return default_collate([generate_scene(100 + i, views, size, size) for i in range(n)])


def perfect(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pred = {k: batch[k].clone() for k in ("local_points", "points", "camera_poses")}
    pred["conf"] = torch.full((*batch["depth"].shape, 1), 12.0)
    return pred


def similarity(pred: dict[str, torch.Tensor], scale: float, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prediction in another world frame (rigid G) and at another scale."""
    out = dict(pred)
    out["local_points"] = pred["local_points"] * scale
    poses = pred["camera_poses"].clone()
    poses[..., :3, 3] *= scale
    out["camera_poses"] = G @ poses
    pts = pred["points"] * scale
    out["points"] = (G[:3, :3] @ pts[..., None]).squeeze(-1) + G[:3, 3]
    return out


def random_rigid(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    q = q * torch.sign(torch.linalg.det(q))
    G = torch.eye(4)
    G[:3, :3], G[:3, 3] = q, torch.randn(3, generator=g) * 3
    return G


def rot_about(axis: int, degrees: float) -> torch.Tensor:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    R = torch.eye(4, dtype=torch.float64)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


# --- loss -----------------------------------------------------------------------------------------------
def test_loss_is_zero_for_the_truth_at_any_scale_and_world_frame():
    batch = scenes()
    terms = ("local", "global", "camera_trans", "camera_rot", "conf")
    out = depth_loss(perfect(batch), batch)
    assert all(float(out[k]) < 1e-3 for k in terms), {k: float(out[k]) for k in terms}
    assert float(out["loss"]) < 1e-3 and float(out["scale"]) == pytest.approx(1.0, abs=1e-5)
    moved = similarity(perfect(batch), 3.0, random_rigid(0))  # ×3 and in another world frame
    out = depth_loss(moved, batch)
    assert all(float(out[k]) < 1e-3 for k in terms), {k: float(out[k]) for k in terms}
    # the local term alone: a ×3 local prediction with wrong poses is still perfect locally
    wrong_poses = {**perfect(batch), "camera_poses": torch.eye(4).expand(2, 3, 4, 4)}
    wrong_poses["local_points"] = wrong_poses["local_points"] * 3
    out = depth_loss(wrong_poses, batch)
    assert float(out["local"]) < 1e-5 and float(out["camera"]) > 0.1 and float(out["global"]) > 0.01


def test_loss_grows_with_errors_and_its_gradients_flow():
    batch = scenes()
    g = torch.Generator().manual_seed(0)
    losses = []
    for noise in (0.0, 0.05, 0.3):
        pred = perfect(batch)
        pred = {
            k: v + noise * torch.randn(v.shape, generator=g) if k != "camera_poses" else v
            for k, v in pred.items()
        }
        losses.append({k: float(v) for k, v in depth_loss(pred, batch).items()})
    assert losses[0]["local"] < losses[1]["local"] < losses[2]["local"]
    assert losses[0]["global"] < losses[1]["global"] < losses[2]["global"]
    assert losses[0]["conf"] < losses[1]["conf"]  # confident everywhere, but now the error is large
    pred = {k: v.clone().requires_grad_() for k, v in perfect(batch).items()}
    pred["camera_poses"] = (pred["camera_poses"].detach() @ rot_about(1, 5).float()).requires_grad_()
    with torch.no_grad():
        pred["local_points"].mul_(1.1).add_(0.01)
    out = depth_loss(pred, batch, normal_weight=1.0)
    out["loss"].backward()
    assert float(out["normal"]) >= 0
    for k, v in pred.items():
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, k


def test_loss_and_metrics_ignore_mixed_precision():
    """Under bf16 autocast (the trainer's mixed precision) the loss and metrics still run in float32."""
    batch = scenes(n=1, views=2)
    pred = perfect(batch)
    pred["camera_poses"] = (pred["camera_poses"].double() @ rot_about(1, 3)).float()
    pred["local_points"] = pred["local_points"] * 1.01 + 0.003
    plain = depth_loss(pred, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = depth_loss(pred, batch)
        rot, _ = relative_pose_errors(pred["camera_poses"], batch["camera_poses"])
    assert all(v.dtype == torch.float32 and torch.allclose(v, plain[k], rtol=1e-5) for k, v in mixed.items())
    assert torch.allclose(rot, relative_pose_errors(pred["camera_poses"], batch["camera_poses"])[0])


def test_optimal_scale_minimises_the_weighted_l1():
    assert float(weighted_median(torch.tensor([[3.0, 1, 2]]), torch.tensor([[5.0, 1, 1]]))) == 3
    assert float(weighted_median(torch.tensor([[3.0, 1, 2]]), torch.tensor([[1.0, 1, 1]]))) == 2
    assert float(weighted_median(torch.tensor([[3.0, 1]]), torch.zeros(1, 2))) == 1  # no weight: 1
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 40, 3, generator=g)
    gt = 2.5 * pred + 0.3 * torch.randn(2, 40, 3, generator=g)
    w = torch.rand(2, 40, generator=g)
    w[1, :10] = 0
    s = optimal_scale(pred, gt, w)

    def objective(scale: torch.Tensor) -> torch.Tensor:
        return (w[..., None] * (scale[:, None, None] * pred - gt).abs()).sum((1, 2))

    grid = torch.linspace(1.5, 3.5, 2001)
    best = torch.stack([objective(torch.full((2,), float(x))) for x in grid]).min(0).values
    assert (objective(s) <= best + 1e-5).all() and (s - 2.5).abs().max() < 0.3


def test_camera_loss_of_a_known_rotation_error():
    batch = scenes(n=1, views=2)
    pred = perfect(batch)
    pred["camera_poses"] = pred["camera_poses"].clone()
    pred["camera_poses"][0, 1] = (pred["camera_poses"][0, 1].double() @ rot_about(1, 10)).float()
    out = depth_loss(pred, batch)
    assert float(out["camera_rot"]) == pytest.approx(math.radians(10), abs=1e-4)  # both ordered pairs
    assert float(rotation_angle(rot_about(2, 170)[:3, :3])) == pytest.approx(math.radians(170))
    single = scenes(n=1, views=1)  # one frame: no pairs, no camera term
    assert float(depth_loss(perfect(single), single)["camera"]) == 0


# --- metrics --------------------------------------------------------------------------------------------
def test_depth_metrics_on_hand_computed_frames():
    gt = torch.tensor([1.0, 2, 4, 8]).reshape(1, 1, 2, 2)
    off = torch.tensor([1.0, 2, 4, 16]).reshape(1, 1, 2, 2)
    m = depth_metrics(off, gt, align="none")
    assert float(m["abs_rel"]) == pytest.approx(0.25) and float(m["delta1"]) == pytest.approx(0.75)
    assert float(m["rmse"]) == pytest.approx(4.0)  # sqrt(64 / 4)
    twice = 2 * gt
    m = depth_metrics(twice, gt, align="none")
    assert float(m["abs_rel"]) == pytest.approx(1.0) and float(m["delta1"]) == 0
    assert float(m["rmse"]) == pytest.approx(math.sqrt((1 + 4 + 16 + 64) / 4))
    for align in ("median", "lsq"):
        m = depth_metrics(twice, gt, align=align)
        assert float(m["abs_rel"]) == pytest.approx(0, abs=1e-6) and float(m["delta1"]) == 1
    # per-frame scales: two frames off by different factors both align
    two = torch.stack([gt[0, 0] * 2, gt[0, 0] * 5])[None]
    assert depth_metrics(two, gt.expand(1, 2, 2, 2), align="median")["abs_rel"].abs().max() < 1e-6
    seq = align_depth(two, gt.expand(1, 2, 2, 2), torch.ones(1, 2, 2, 2, dtype=torch.bool), per="sequence")
    assert not torch.allclose(seq, gt.expand(1, 2, 2, 2))  # one scale for the sequence cannot fit both
    # invalid pixels: gt 0, masked, or beyond max_depth are left out; an empty frame is flagged
    gt0 = torch.tensor([[[[1.0, 0], [2, 100]]], [[[0, 0], [0, 0]]]])
    pred0 = torch.tensor([[[[1.0, 50], [2, 1]]], [[[1, 1], [1, 1]]]])
    m = depth_metrics(pred0, gt0, max_depth=70, align="none")
    assert m["frames"].tolist() == [[True], [False]] and float(m["abs_rel"][0, 0]) == 0
    with pytest.raises(ValueError, match="unknown depth alignment 'mean'"):
        depth_metrics(pred0, gt0, align="mean")


def poses_pair(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.eye(4, dtype=torch.float64).repeat(1, 2, 1, 1)
    for i in range(2):
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
        out[0, i, :3, :3] = q * torch.sign(torch.linalg.det(q))
        out[0, i, :3, 3] = torch.randn(3, generator=g, dtype=torch.float64)
    return out


def test_pose_errors_accuracy_and_auc_of_a_known_rotation_error():
    gt = poses_pair()
    pred = gt.clone()
    pred[0, 1] = gt[0, 1] @ rot_about(0, 10)  # camera 1 turned 10° about its own x axis, same centre
    rot, trans = relative_pose_errors(pred, gt)
    assert rot.shape == (1, 1) and float(rot) == pytest.approx(10, abs=1e-4) and float(trans) < 1e-3
    for threshold, rra in ((5, 0.0), (30, 1.0)):
        m = DepthPoseMetrics(threshold=threshold)
        m.update(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2), None, pred, gt)
        out = m.compute()
        assert float(out[f"rra{threshold}"]) == rra and float(out[f"rta{threshold}"]) == 1
    assert float(out["auc30"]) == pytest.approx(20 / 30)  # max error 10°: below τ for τ = 11 … 30
    assert float(pose_auc(rot, trans)) == pytest.approx(20 / 30)
    # a similarity transform of the whole prediction changes nothing
    G = random_rigid(3).double()
    moved = G @ pred
    moved[..., :3, 3] *= 4
    rot2, trans2 = relative_pose_errors(moved, gt)
    assert float(rot2) == pytest.approx(10, abs=1e-4) and float(trans2) < 1e-3


def test_translation_direction_error_and_its_sign_fold():
    gt = torch.eye(4, dtype=torch.float64).repeat(1, 2, 1, 1)
    gt[0, 1, :3, 3] = torch.tensor([1.0, 0, 0], dtype=torch.float64)
    pred = gt.clone()
    pred[0, 1, :3, 3] = torch.tensor([math.cos(math.radians(40)), math.sin(math.radians(40)), 0])
    assert float(relative_pose_errors(pred, gt)[1]) == pytest.approx(40, abs=1e-4)
    pred[0, 1, :3, 3] = torch.tensor([-math.cos(math.radians(10)), math.sin(math.radians(10)), 0])
    assert float(relative_pose_errors(pred, gt)[1]) == pytest.approx(10, abs=1e-4)  # 170° folds to 10°
    assert float(relative_pose_errors(pred, gt, fold_translation=False)[1]) == pytest.approx(170, abs=1e-4)


def test_epoch_metrics_are_exact_means_over_frames_and_pairs():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(5, 3, 4, 4, generator=g) + 0.5
    pred = gt * (1 + 0.2 * torch.rand(5, 3, 4, 4, generator=g))
    valid = torch.rand(5, 3, 4, 4, generator=g) > 0.3
    valid[1, 2] = False  # a frame with nothing to measure
    poses_gt = torch.eye(4).repeat(5, 3, 1, 1)
    poses_gt[..., :3, 3] = torch.randn(5, 3, 3, generator=g)
    poses_pred = poses_gt.clone()
    poses_pred[..., :3, 3] += 0.3 * torch.randn(5, 3, 3, generator=g)
    whole = DepthPoseMetrics(align="lsq")
    whole.update(pred, gt, valid, poses_pred, poses_gt)
    split = DepthPoseMetrics(align="lsq")
    for lo, hi in ((0, 1), (1, 5)):  # uneven batches: a mean of batch means would differ
        split.update(pred[lo:hi], gt[lo:hi], valid[lo:hi], poses_pred[lo:hi], poses_gt[lo:hi])
    a, b = whole.compute(), split.compute()
    assert set(a) == {"abs_rel", "delta1", "rmse", "rra30", "rta30", "auc30"}
    assert all(torch.allclose(a[k], b[k]) for k in a)
    per = depth_metrics(pred, gt, valid, align="lsq")
    assert torch.allclose(a["abs_rel"], per["abs_rel"][per["frames"]].mean())
    rot, trans = relative_pose_errors(poses_pred, poses_gt)
    assert torch.allclose(a["rta30"], (trans < 30).float().mean()) and int(split.pairs) == 15
    mono = DepthPoseMetrics()
    mono.update(pred[:, :1], gt[:, :1], valid[:, :1], poses_pred[:, :1], poses_gt[:, :1])
    assert set(mono.compute()) == {"abs_rel", "delta1", "rmse"}  # one frame: no pairs


# --- the LightningModule --------------------------------------------------------------------------------
def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, **kw,
    )  # fmt: skip


def small_scenes(**kw) -> SceneDataModule:
    return SceneDataModule(
        num_views=2,
        height=28,
        width=28,
        num_objects=2,
        train_size=4,
        val_size=3,
        test_size=2,
        batch_size=2,
        **kw,
    )


EVAL_KEYS = {"loss", "abs_rel", "delta1", "rmse", "rra30", "rta30", "auc30"}


def test_module_trains_and_evaluates_a_small_network(tmp_path):
    torch.manual_seed(0)
    m = DepthModule(model={"name": "depth_test_net"}, scheduler={"warmup_epochs": 0.5}, normal_weight=0.1)
    assert m.hparams["camera_weight"] == 0.1 and m.hparams["model"] == {"name": "depth_test_net"}
    dm = small_scenes()
    t = trainer(tmp_path, max_epochs=2)
    t.fit(m, datamodule=dm)
    assert t.global_step == 4 and dm.splits["train"].epoch == 1  # the second epoch drew new scenes
    metrics = t.callback_metrics
    assert {"train/loss", "train/local", "train/global", "train/camera", "train/conf", "train/normal"} <= set(
        metrics
    )
    assert {f"val/{k}" for k in EVAL_KEYS} <= set(metrics)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert 0 <= float(metrics["val/delta1"]) <= 1 and float(metrics["val/abs_rel"]) > 0
    (result,) = t.test(m, datamodule=dm)
    assert {f"test/{k}" for k in EVAL_KEYS} <= set(result)
    # the epoch value is the metric over all test scenes, not of the last batch
    ref = DepthPoseMetrics()
    m.eval()
    with torch.no_grad():
        for batch in dm.test_dataloader():
            out = m(batch["imgs"])
            ref.update(
                out["local_points"][..., 2],
                batch["depth"],
                batch["valid"],
                out["camera_poses"],
                batch["camera_poses"],
            )
    assert result["test/abs_rel"] == pytest.approx(float(ref.compute()["abs_rel"]), rel=1e-5)
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = DepthModule.load_from_checkpoint(path)
    assert loaded.hparams["normal_weight"] == 0.1
    x = dm.splits["test"][0]["imgs"][None]
    assert torch.equal(loaded.eval()(x)["local_points"], m(x)["local_points"])


def test_single_view_samples_train_and_evaluate_without_pose_terms(tmp_path):
    """One frame per sample (NYU-v2): no frame pairs, so a zero camera loss and no pose metrics, and
    nothing logged is NaN."""
    from structlab.data.scenes import SceneDataset

    torch.manual_seed(0)
    options = {"num_views": 1, "height": 28, "width": 28, "num_objects": 2}
    dm = L.LightningDataModule.from_datasets(
        train_dataset=SceneDataset("train", 2, **options),
        val_dataset=SceneDataset("val", 2, **options),
        test_dataset=SceneDataset("test", 3, **options),
        batch_size=2,
    )
    m = DepthModule(model={"name": "depth_test_net"}, scheduler={"warmup_epochs": 0.5})
    t = trainer(tmp_path, max_epochs=1)
    t.fit(m, datamodule=dm)
    metrics = t.callback_metrics
    assert float(metrics["train/camera"]) == 0 and all(torch.isfinite(v) for v in metrics.values())
    assert {"val/abs_rel", "val/delta1", "val/rmse", "val/loss"} <= set(metrics)
    (result,) = t.test(m, datamodule=dm)
    assert set(result) == {f"test/{k}" for k in ("loss", "abs_rel", "delta1", "rmse")}
    assert all(math.isfinite(v) for v in result.values())


def test_a_non_finite_eval_loss_is_an_error(tmp_path):
    m = DepthModule(model={"name": "depth_test_nan"})
    with pytest.raises(FloatingPointError, match="val batch 0 gave a non-finite loss"):
        trainer(tmp_path, max_epochs=1).validate(m, datamodule=small_scenes())


@pytest.mark.slow
@pytest.mark.parametrize(
    "layer",
    [("layer=dense",), ("layer=svd", "layer.budget=0.5"), ("layer=tsvd", "layer.budget=0.5"),
     ("layer=gblr", "layer.budget=0.5", "layer.fit_steps=20")],
    ids=["dense", "svd", "tsvd", "gblr"],
)  # fmt: skip
def test_pi3_tiny_trains_through_run_with_each_layer_type(tmp_path, layer):
    """`python run.py model=pi3_tiny task=depth layer=...` as a user runs it (default callbacks:
    budget projection, re-quantisation, checkpoints): a few optimizer steps, every depth and pose
    metric, the structured layers' MACs within the budget."""
    from support import compose_train

    from structlab.train import run

    summary = run(compose_train(
        "task=depth", "model=pi3_tiny", *layer, "trainer.max_epochs=2", "compress.after_training=false",
        "task.data.height=28", "task.data.width=28", "task.data.num_views=2", "task.data.batch_size=2",
        "task.data.train_size=4", "task.data.val_size=2", "task.data.test_size=2",
        "print_config=false", "trainer.enable_progress_bar=false", output_dir=tmp_path,
    ))  # fmt: skip
    assert summary["speed"]["epochs / steps"] == "2 / 4"
    assert {f"test/{k}" for k in EVAL_KEYS} <= set(summary["test"])
    assert all(math.isfinite(v) for v in summary["test"].values())
    if layer[0] != "layer=dense":
        assert summary["cost"]["structured layers"] == 28
        assert summary["cost"]["budget (structured MACs / dense)"] <= 0.5 + 1e-3
