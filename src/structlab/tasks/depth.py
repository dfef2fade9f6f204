"""Multi-view depth and camera poses (the π3 task): the training loss, the evaluation metrics (plain,
batched torch functions) and `DepthModule`, the LightningModule over any model that returns π3's dict.

Shapes: B samples of N frames of H×W. A prediction (the model's output) holds
  local_points B×N×H×W×3 (camera frame, OpenCV: x right, y down, z forward), camera_poses B×N×4×4
  (camera-to-world), and optionally points B×N×H×W×3 (world; default pose · local point) and conf
  B×N×H×W×1 (logits).
A batch (`structlab.data.scenes`) holds imgs, depth, valid, intrinsics, camera_poses, local_points,
points, normals (see that module).

Loss (π3's recipe; all terms in float32):
  1. Ground truth is moved into the first camera's frame (global points P ← T₀⁻¹ P, poses T_i ← T₀⁻¹ T_i)
     and divided, per sample, by the mean distance ‖P‖ of its valid points (to the first camera).
  2. The prediction is treated alike with its own poses and its own mean norm: P̂ ← T̂₀⁻¹ P̂, T̂_i ← T̂₀⁻¹ T̂_i,
     everything divided by the mean ‖P̂‖ over the valid pixels.
  3. One scale s* per sample aligns the prediction to the ground truth: the exact minimiser of
     Σ_valid (1/z)·‖s·p̂ − p‖₁ over the local points (z: the normalised ground-truth depth), which is the
     weighted median of the per-coordinate ratios p/p̂ with weights |p̂|/z (a weighted L1 fit of one
     scale; computed without gradient, as MoGe / π3 do).
  local  = mean over valid pixels of (1/z)·‖s*·p̂ − p‖₁ (per sample, then over the batch)
  global = the same on the global points in the first camera's frame
  camera = over ordered frame pairs i ≠ j of the relative poses T_i⁻¹ T_j:
           trans_weight (100) · mean Huber_δ(s*·t̂_ij − t_ij) (δ = 0.1, element-wise over x, y, z)
           + mean geodesic angle (radians) between R̂_ij and R_ij
  conf   = mean over valid pixels of BCE(conf logit, [‖s*·p̂ − p‖₁ < conf_threshold]) (local points,
           normalised units, threshold 0.02)
  normal = mean over pixels whose 2×2 neighbourhood is valid of 1 − cos between the normals of the
           predicted and true local points (finite differences); off by default (normal_weight = 0)
  loss   = local + global_weight·global + camera_weight·camera + conf_weight·conf + normal_weight·normal
           with defaults 1, 0.1, 0.05, 0.

Metrics (`depth_metrics`, `relative_pose_errors`, `DepthPoseMetrics`):
  depth, over valid pixels (d > 0, and d < max_depth when set), after a per-frame (or per-sequence)
  median or least-squares scale alignment: AbsRel = mean |d̂ − d| / d, δ1 = mean(max(d̂/d, d/d̂) < 1.25),
  RMSE = sqrt(mean (d̂ − d)²); each is computed per frame and averaged over frames.
  pose, over the unordered frame pairs i < j of each sample, on the relative poses T_i⁻¹ T_j: rotation
  error (geodesic angle, degrees) and translation-direction error (angle between t̂_ij and t_ij, degrees;
  by default folded to min(e, 180° − e) as in the RelPose / VGGT evaluation code); RRA@τ and RTA@τ =
  fraction of pairs with that error < τ; AUC@τ = mean over thresholds 1°, …, τ° of the fraction of pairs
  with max(rotation error, translation error) below it (VGGT's histogram AUC). Averaged over pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from structlab.tasks.structured import StructuredModule

EPS = 1e-8
_F = TypeVar("_F", bound=Callable[..., Any])


def full_precision(fn: _F) -> _F:
    """Run `fn` with autocast off: under bf16 / fp16 mixed precision the poses' matrix products
    would otherwise run in half precision (rotation errors of ~0.5°)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


# --- geometry -------------------------------------------------------------------------------------------
def invert_pose(T: Tensor) -> Tensor:
    """Inverse of rigid 4×4 transforms (…×4×4)."""
    R, t = T[..., :3, :3], T[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    top = torch.cat([Rt, -Rt @ t], dim=-1)
    bottom = torch.zeros_like(T[..., 3:, :])
    bottom[..., 3] = 1
    return torch.cat([top, bottom], dim=-2)


def transform_points(T: Tensor, p: Tensor) -> Tensor:
    """Apply 4×4 transforms T (…×4×4) to point maps p (…×H×W×3), the leading dims broadcast."""
    R, t = T[..., None, None, :3, :3], T[..., None, None, :3, 3]
    return (R @ p[..., None]).squeeze(-1) + t


def rotation_angle(R: Tensor) -> Tensor:
    """The rotation angle (radians) of rotation matrices (…×3×3), atan2 form: stable near 0 and π,
    and differentiable at the identity."""
    cos = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    v = torch.stack(
        [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1
    )
    sin = torch.sqrt((v * v).sum(-1) + 1e-12) / 2
    return torch.atan2(sin, cos)


def relative_poses(T: Tensor) -> Tensor:
    """T_i⁻¹ T_j for every ordered pair (…×N×N×4×4) of camera-to-world poses T (…×N×4×4): camera j's
    pose in camera i's frame."""
    return invert_pose(T)[..., :, None, :, :] @ T[..., None, :, :, :]


def _masked_mean(x: Tensor, mask: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(mean of x over mask along dims, count); 0 where the count is 0."""
    m = mask.to(x.dtype)
    count = m.sum(dims)
    return (x * m).sum(dims) / count.clamp_min(1), count


def mean_norm(p: Tensor, valid: Tensor) -> Tensor:
    """Mean ‖p‖ over the valid pixels of each sample (p B×N×H×W×3, valid B×N×H×W) → B; 1 where none."""
    mean, count = _masked_mean(p.norm(dim=-1), valid, (1, 2, 3))
    return torch.where(count > 0, mean.clamp_min(EPS), torch.ones_like(mean))


def normalize_scene(
    local_points: Tensor, points: Tensor, camera_poses: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(local points, global points and poses in the first camera's frame, all divided by the mean
    distance of the valid global points to the first camera; that scale B)."""
    to_first = invert_pose(camera_poses[:, 0])
    points = transform_points(to_first[:, None], points)
    poses = to_first[:, None] @ camera_poses
    scale = mean_norm(points, valid)
    s = scale[:, None, None, None, None]
    top = torch.cat([poses[..., :3, :3], poses[..., :3, 3:] / scale[:, None, None, None]], -1)
    poses = torch.cat([top, poses[..., 3:, :]], -2)
    return local_points / s, points / s, poses, scale


def weighted_median(values: Tensor, weights: Tensor) -> Tensor:
    """Per row (B×M → B): the weighted median, the minimiser of Σ w·|s − v|. Rows of zero weight give 1."""
    order = values.argsort(dim=1)
    v, w = values.gather(1, order), weights.gather(1, order)
    cum = w.cumsum(1)
    total = cum[:, -1:]
    idx = (cum < total / 2).sum(1, keepdim=True).clamp(max=values.shape[1] - 1)
    med = v.gather(1, idx).squeeze(1)
    return torch.where(total.squeeze(1) > 0, med, torch.ones_like(med))


@torch.no_grad()
def optimal_scale(pred: Tensor, gt: Tensor, weight: Tensor) -> Tensor:
    """argmin_s Σ weight·‖s·pred − gt‖₁ per sample (pred, gt B×…×3; weight B×…, 0 = ignored): the
    weighted median of gt/pred per coordinate with weights weight·|pred|."""
    b = pred.shape[0]
    w = (weight[..., None] * pred.abs()).reshape(b, -1)
    ok = w > 0
    ratio = torch.where(ok, gt.reshape(b, -1) / torch.where(ok, pred.reshape(b, -1), 1.0), 0.0)
    return weighted_median(ratio, torch.where(ok, w, 0.0))


def normals_from_points(p: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Unit normals (…×(H−1)×(W−1)×3) of point maps p (…×H×W×3) in a camera frame (OpenCV), facing the
    camera, from the right and lower neighbours; and where the three pixels are valid."""
    dx = p[..., :-1, 1:, :] - p[..., :-1, :-1, :]
    dy = p[..., 1:, :-1, :] - p[..., :-1, :-1, :]
    n = F.normalize(torch.linalg.cross(dy, dx), dim=-1, eps=1e-12)
    ok = valid[..., :-1, :-1] & valid[..., :-1, 1:] & valid[..., 1:, :-1]
    return n, ok


# --- loss -----------------------------------------------------------------------------------------------
@full_precision
def depth_loss(
    pred: Mapping[str, Tensor],
    batch: Mapping[str, Tensor],
    global_weight: float = 1.0,
    camera_weight: float = 0.1,
    conf_weight: float = 0.05,
    normal_weight: float = 0.0,
    trans_weight: float = 100.0,
    huber_delta: float = 0.1,
    conf_threshold: float = 0.02,
) -> dict[str, Tensor]:
    """The π3 training loss (module docstring) of a prediction for a batch: a dict with `loss` (the
    weighted total, differentiable) and its terms `local`, `global`, `camera`, `camera_trans`,
    `camera_rot`, `conf` (when the prediction has `conf` and conf_weight > 0), `normal` (when
    normal_weight > 0), and `scale` (mean s*), all but `loss` detached."""
    valid = batch["valid"].bool()
    gt_local, gt_points, gt_poses, _ = normalize_scene(
        batch["local_points"].float(), batch["points"].float(), batch["camera_poses"].float(), valid
    )
    p_local, p_poses = pred["local_points"].float(), pred["camera_poses"].float()
    p_points = pred["points"].float() if "points" in pred else transform_points(p_poses, p_local)
    p_local, p_points, p_poses, _ = normalize_scene(p_local, p_points, p_poses, valid)

    z = gt_local[..., 2]
    valid = valid & (z > 0)
    weight = torch.where(valid, 1.0 / z.clamp_min(EPS), 0.0)
    s = optimal_scale(p_local, gt_local, weight)  # B, no gradient
    s5 = s[:, None, None, None, None]
    dims = (1, 2, 3)

    def per_pixel_mean(err: Tensor, mask: Tensor = valid) -> Tensor:
        """Mean over each sample's pixels in `mask`, then over the samples that have any (no host sync)."""
        mean, count = _masked_mean(err, mask, dims)
        has = (count > 0).to(mean.dtype)
        return (mean * has).sum() / has.sum().clamp_min(1)

    local_err = (s5 * p_local - gt_local).abs().sum(-1)
    local = per_pixel_mean(local_err * weight)
    global_ = per_pixel_mean((s5 * p_points - gt_points).abs().sum(-1) * weight)

    n = gt_poses.shape[1]
    if n > 1:
        pairs = ~torch.eye(n, dtype=torch.bool, device=s.device)
        rel_gt, rel_pred = relative_poses(gt_poses)[:, pairs], relative_poses(p_poses)[:, pairs]
        t_err = F.huber_loss(
            s[:, None, None] * rel_pred[..., :3, 3], rel_gt[..., :3, 3], reduction="mean", delta=huber_delta
        )
        rot = rotation_angle(rel_pred[..., :3, :3].transpose(-1, -2) @ rel_gt[..., :3, :3]).mean()
        cam_trans, cam_rot = trans_weight * t_err, rot
    else:
        cam_trans = cam_rot = p_poses.sum() * 0
    camera = cam_trans + cam_rot
    total = local + global_weight * global_ + camera_weight * camera
    out = {
        "local": local,
        "global": global_,
        "camera": camera,
        "camera_trans": cam_trans,
        "camera_rot": cam_rot,
    }
    if conf_weight > 0 and "conf" in pred:
        target = (local_err.detach() < conf_threshold).float()
        bce = F.binary_cross_entropy_with_logits(pred["conf"][..., 0].float(), target, reduction="none")
        out["conf"] = per_pixel_mean(bce)
        total = total + conf_weight * out["conf"]
    if normal_weight > 0:
        n_pred, _ = normals_from_points(p_local, valid)
        n_gt, ok = normals_from_points(gt_local, valid)
        out["normal"] = per_pixel_mean(1 - (n_pred * n_gt).sum(-1), ok)
        total = total + normal_weight * out["normal"]
    return {"loss": total, **{k: v.detach() for k, v in out.items()}, "scale": s.mean()}


# --- metrics --------------------------------------------------------------------------------------------
ALIGN = ("median", "lsq", "none")


def align_depth(pred: Tensor, gt: Tensor, valid: Tensor, mode: str = "median", per: str = "frame") -> Tensor:
    """`pred` (B×N×H×W) times one scale per frame (`per="frame"`) or per sample (`per="sequence"`):
    median(gt)/median(pred) over the valid pixels (`median`), the least-squares Σ pred·gt / Σ pred²
    (`lsq`), or 1 (`none`). A frame (sequence) with no valid pixel keeps scale 1."""
    if mode not in ALIGN:
        raise ValueError(f"unknown depth alignment {mode!r}; valid: {', '.join(ALIGN)}")
    if per not in ("frame", "sequence"):
        raise ValueError(f"unknown alignment unit {per!r}; valid: frame, sequence")
    if mode == "none":
        return pred
    b, n = pred.shape[:2]
    rows = b * n if per == "frame" else b
    p, g, v = pred.reshape(rows, -1), gt.reshape(rows, -1), valid.reshape(rows, -1)
    if mode == "median":
        nan = torch.full_like(p, torch.nan)
        scale = torch.where(v, g, nan).nanmedian(1).values / torch.where(v, p, nan).nanmedian(1).values
    else:
        vf = v.to(p.dtype)
        scale = (vf * p * g).sum(1) / (vf * p * p).sum(1)
    scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
    shape = (b, n, 1, 1) if per == "frame" else (b, 1, 1, 1)
    return pred * scale.reshape(shape)


@full_precision
def depth_metrics(
    pred: Tensor,
    gt: Tensor,
    valid: Tensor | None = None,
    max_depth: float | None = None,
    align: str = "median",
    per: str = "frame",
) -> dict[str, Tensor]:
    """Per-frame depth errors (each B×N) of predicted depth `pred` against `gt` (B×N×H×W) over valid
    pixels (`valid` and gt > 0, and gt < max_depth when set): `abs_rel`, `delta1`, `rmse`, and `frames`
    (bool: the frame has a valid pixel; the others are 0 where it has none). The prediction is scaled
    first (`align_depth`) and clamped to ≥ 1e-6."""
    pred, gt = pred.float(), gt.float()
    ok = gt > 0
    if valid is not None:
        ok &= valid.bool()
    if max_depth is not None:
        ok &= gt < max_depth
    pred = align_depth(pred, gt, ok, align, per).clamp_min(1e-6)
    g = torch.where(ok, gt, torch.ones_like(gt))
    dims = (-2, -1)
    abs_rel, count = _masked_mean((pred - g).abs() / g, ok, dims)
    delta1, _ = _masked_mean((torch.maximum(pred / g, g / pred) < 1.25).float(), ok, dims)
    mse, _ = _masked_mean((pred - g) ** 2, ok, dims)
    return {"abs_rel": abs_rel, "delta1": delta1, "rmse": mse.sqrt(), "frames": count > 0}


@full_precision
def relative_pose_errors(pred: Tensor, gt: Tensor, fold_translation: bool = True) -> tuple[Tensor, Tensor]:
    """(rotation errors, translation-direction errors), degrees, B×P over the P = N(N−1)/2 frame pairs
    i < j of camera-to-world poses pred, gt (B×N×4×4), on the relative poses T_i⁻¹ T_j.
    `fold_translation`: min(e, 180 − e), the direction's sign ambiguity (RelPose / VGGT evaluation)."""
    pred, gt = pred.double(), gt.double()
    n = gt.shape[1]
    i, j = torch.triu_indices(n, n, offset=1, device=gt.device)
    rp, rg = relative_poses(pred)[:, i, j], relative_poses(gt)[:, i, j]
    rot = torch.rad2deg(rotation_angle(rp[..., :3, :3].transpose(-1, -2) @ rg[..., :3, :3]))
    tp, tg = F.normalize(rp[..., :3, 3], dim=-1, eps=1e-12), F.normalize(rg[..., :3, 3], dim=-1, eps=1e-12)
    trans = torch.rad2deg(torch.acos((tp * tg).sum(-1).clamp(-1, 1)))
    if fold_translation:
        trans = torch.minimum(trans, 180 - trans)
    return rot.float(), trans.float()


def pose_auc(rot: Tensor, trans: Tensor, max_threshold: int = 30) -> Tensor:
    """Mean over thresholds τ = 1, …, max_threshold degrees of the fraction of pairs whose
    max(rotation, translation) error is below τ (VGGT's AUC@max_threshold)."""
    err = torch.maximum(rot, trans).flatten()
    taus = torch.arange(1, max_threshold + 1, device=err.device, dtype=err.dtype)
    return (err[:, None] < taus).float().mean(0).mean()


class DepthPoseMetrics(Metric):
    """Depth (AbsRel, δ1, RMSE: means over frames) and pose (RRA@τ, RTA@τ, AUC@τ: means over frame
    pairs) metrics accumulated as sums and counts, so the epoch's values are exact under DDP and
    uneven batches. `compute()` returns {abs_rel, delta1, rmse} and, when frame pairs were seen,
    {rra<τ>, rta<τ>, auc<τ>}."""

    full_state_update = False

    def __init__(
        self,
        align: str = "median",
        per: str = "frame",
        max_depth: float | None = None,
        threshold: int = 30,
        fold_translation: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if align not in ALIGN:
            raise ValueError(f"unknown depth alignment {align!r}; valid: {', '.join(ALIGN)}")
        self.align, self.per, self.max_depth = align, per, max_depth
        self.threshold, self.fold_translation = threshold, fold_translation
        for name in ("abs_rel", "delta1", "rmse", "frames", "rra", "rta", "pairs"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("auc_hits", default=torch.zeros(threshold, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        pred_depth: Tensor,
        gt_depth: Tensor,
        valid: Tensor | None = None,
        pred_poses: Tensor | None = None,
        gt_poses: Tensor | None = None,
    ) -> None:
        d = depth_metrics(pred_depth, gt_depth, valid, self.max_depth, self.align, self.per)
        frames = d["frames"]
        for name in ("abs_rel", "delta1", "rmse"):
            setattr(self, name, getattr(self, name) + (d[name].double() * frames).sum())  # 0 where no pixel
        self.frames += frames.sum()
        if pred_poses is not None and gt_poses is not None and gt_poses.shape[1] > 1:
            rot, trans = relative_pose_errors(pred_poses, gt_poses, self.fold_translation)
            rot, trans = rot.flatten().double(), trans.flatten().double()
            self.rra += (rot < self.threshold).sum()
            self.rta += (trans < self.threshold).sum()
            taus = torch.arange(1, self.threshold + 1, device=rot.device, dtype=rot.dtype)
            self.auc_hits += (torch.maximum(rot, trans)[:, None] < taus).sum(0)
            self.pairs += rot.numel()

    def compute(self) -> dict[str, Tensor]:
        out = {k: (getattr(self, k) / self.frames).float() for k in ("abs_rel", "delta1", "rmse")}
        if self.pairs > 0:
            t = self.threshold
            out[f"rra{t}"] = (self.rra / self.pairs).float()
            out[f"rta{t}"] = (self.rta / self.pairs).float()
            out[f"auc{t}"] = (self.auc_hits / self.pairs).mean().float()
        return out


# --- the LightningModule --------------------------------------------------------------------------------
class DepthModule(StructuredModule):
    """Batches are dicts of the scene keys (`structlab.data.scenes`); the model maps `imgs`
    (B×N×3×H×W in [0, 1]) to π3's dict (local_points, camera_poses, optionally points and conf).
    Logs train/loss and its terms (train/local, train/global, train/camera, …); val/ and test/ loss,
    abs_rel, delta1, rmse, rra30, rta30, auc30 (depth from the local points' z, aligned per frame by
    `depth_align`)."""

    def __init__(
        self,
        model: dict[str, Any],
        layer: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool = False,
        init_from: str | None = None,
        global_weight: float = 1.0,
        camera_weight: float = 0.1,
        conf_weight: float = 0.05,
        normal_weight: float = 0.0,
        trans_weight: float = 100.0,
        huber_delta: float = 0.1,
        conf_threshold: float = 0.02,
        depth_align: str = "median",
        max_depth: float | None = None,
        pose_threshold: int = 30,
    ) -> None:
        super().__init__(model, layer, optimizer, scheduler, compile, init_from)
        self.save_hyperparameters()
        self.loss_cfg = {
            "global_weight": global_weight,
            "camera_weight": camera_weight,
            "conf_weight": conf_weight,
            "normal_weight": normal_weight,
            "trans_weight": trans_weight,
            "huber_delta": huber_delta,
            "conf_threshold": conf_threshold,
        }
        metric = {"align": depth_align, "max_depth": max_depth, "threshold": pose_threshold}
        self.val_metrics, self.test_metrics = DepthPoseMetrics(**metric), DepthPoseMetrics(**metric)

    def model_inputs(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch["imgs"]

    def samples_in(self, batch: Mapping[str, Tensor]) -> int:
        return int(batch["imgs"].shape[0])

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):  # procedural scenes: new training scenes every epoch
            datamodule.set_epoch(self.current_epoch)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        losses = depth_loss(self(self.model_inputs(batch)), batch, **self.loss_cfg)
        size = self.samples_in(batch)
        bar = self.trainer.progress_bar_callback is not None  # a bar value syncs the GPU every step
        self.log("train/loss", losses["loss"], prog_bar=bar, on_step=True, on_epoch=True, batch_size=size)
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items() if k != "loss"},
            on_step=True,
            on_epoch=True,
            batch_size=size,
        )
        return losses["loss"]

    def _eval_step(
        self, batch: Mapping[str, Tensor], index: int, metrics: DepthPoseMetrics, stage: str
    ) -> None:
        pred = self(self.model_inputs(batch))
        loss = depth_loss(pred, batch, **self.loss_cfg)["loss"]
        if not torch.isfinite(loss):  # dropping the batch would report metrics of the rest
            raise FloatingPointError(f"{stage} batch {index} gave a non-finite loss ({float(loss)})")
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=self.samples_in(batch))
        metrics.update(
            pred["local_points"][..., 2],
            batch["depth"],
            batch["valid"],
            pred["camera_poses"],
            batch["camera_poses"],
        )

    def _log_metrics(self, metrics: DepthPoseMetrics, stage: str) -> None:
        values = metrics.compute()  # synchronised across ranks by torchmetrics
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        metrics.reset()

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")
