"""Image classification on the structured core: cross-entropy (or timm's soft-target loss under
mixup / cutmix), top-1 / top-5 accuracy."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from structlab.tasks.structured import StructuredModule

log = logging.getLogger(__name__)


class ClassificationModule(StructuredModule):
    """Batches are (images, integer labels); the model maps images to `num_classes` logits."""

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
        init_from: str | None = None,
    ) -> None:
        self.num_classes = num_classes
        super().__init__(model, layer, optimizer, scheduler, compile, init_from)
        self.save_hyperparameters()
        self.mixup = None
        if mixup and (mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0):
            self.mixup = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=num_classes)
            self.soft_loss = SoftTargetCrossEntropy()
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

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def model_inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return batch[0]

    def on_train_start(self) -> None:
        if self.mixup is not None and self.trainer.is_global_zero:
            log.info("train/acc is not logged under mixup / cutmix: the targets are mixed; see val/acc")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:
            x, soft = self.mixup(x, y)
            loss = self.soft_loss(self(x).float(), soft)
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
