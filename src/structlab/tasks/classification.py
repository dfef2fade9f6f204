"""Image classification: a model (+ structured layers by surgery), loss, metrics and optimizer."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.data import Mixup
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from structlab.models import build_model
from structlab.optim import param_groups, warmup_cosine
from structlab.surgery import apply_structure, model_structure, replace_layers


class ClassificationModule(L.LightningModule):
    """Builds its network from configs, so `load_from_checkpoint` rebuilds the same architecture.

    model: {name, targets, exclude, **build kwargs}; layer: {name, init, **layer kwargs}. With
    layer name "dense" the network is left as built; otherwise every module matching
    model.targets is replaced by surgery.
    """

    def __init__(
        self,
        model: dict[str, Any],
        layer: dict[str, Any] | None = None,
        num_classes: int = 10,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        mixup: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        model_cfg = dict(model)
        targets, exclude = model_cfg.pop("targets", []), model_cfg.pop("exclude", [])
        self.model = build_model(model_cfg.pop("name"), num_classes=num_classes, **model_cfg)
        layer_cfg = dict(layer or {"name": "dense"})
        layer_name = layer_cfg.pop("name")
        if layer_name != "dense":
            replace_layers(self.model, layer_name, targets, exclude, **layer_cfg)
        self.optimizer_cfg = {"lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.999), **(optimizer or {})}
        self.scheduler_cfg = dict(scheduler or {})
        self.mixup = None
        if mixup and (mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0):
            self.mixup = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=num_classes)
        self.label_smoothing = label_smoothing

        # validate_args=False: validation calls torch.unique, a host sync in every step. Training logs
        # top-1 only: top-5 goes through F.one_hot, which also syncs on CUDA (the GPU would idle).
        def metrics(prefix: str, top_k: tuple[int, ...]) -> MetricCollection:
            return MetricCollection(
                {
                    ("acc" if k == 1 else f"acc_top{k}"): MulticlassAccuracy(
                        num_classes, top_k=k, average="micro", validate_args=False
                    )
                    for k in top_k
                    if k <= num_classes
                },
                prefix=prefix,
            )

        self.train_metrics = metrics("train/", (1,))
        self.val_metrics, self.test_metrics = metrics("val/", (1, 5)), metrics("test/", (1, 5))
        self.compile_model = compile

    def configure_model(self) -> None:
        if self.compile_model and not getattr(self, "_compiled", False):
            self.model.compile()  # in place: parameter names (and checkpoints) stay as they are
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            logits = self(x)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = self(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
            self.train_metrics.update(logits.detach(), y)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        # A progress-bar value is turned into a Python float after every step (a GPU sync), so ask
        # for that only when a bar is there to show it.
        bar = self.trainer.progress_bar_callback is not None
        self.log("train/loss", loss, prog_bar=bar, on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, batch, metrics: MetricCollection, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits.float(), y), sync_dist=True)
        metrics.update(logits, y)
        self.log_dict(metrics, prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def configure_optimizers(self):
        cfg = dict(self.optimizer_cfg)
        lr, wd = cfg.pop("lr"), cfg.pop("weight_decay")
        groups = param_groups(self.model, wd)
        for g in groups:
            g.setdefault("lr", lr)
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=wd, fused=fused, **cfg)
        if not self.scheduler_cfg:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        # estimated_stepping_batches has loaded the train loader, so its length is known here
        per_epoch = max(
            1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        )
        s = self.scheduler_cfg
        schedule = warmup_cosine(
            optimizer,
            total_steps=total,
            warmup_steps=round(s.get("warmup_epochs", 0) * per_epoch),
            cooldown_steps=round(s.get("cooldown_epochs", 0) * per_epoch),
            warmup_lr=s.get("warmup_lr", 1e-6),
            min_lr=s.get("min_lr", 1e-5),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # The structure travels with every checkpoint, so layers whose shapes depend on data
    # (a tsvd rank, say) are rebuilt before the state dict is loaded.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["structure"] = model_structure(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("structure") or {}
        changed = {k: v for k, v in saved.items() if model_structure(self.model).get(k) != v}
        if changed:
            apply_structure(self.model, changed)
