"""The LightningModule every task builds on: a network from the model registry whose targeted linear
layers become structured layers, converted once; the structure carried in checkpoints; compile;
optimizer parameter groups and the learning-rate schedule.

A task subclass adds its loss, metrics and steps, and says how to read its batches
(`model_inputs`, `samples_in`, `tokens_in`); nothing here depends on what a batch holds.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from structlab.layers import layer_class
from structlab.models import build_model
from structlab.optim import param_groups, warmup_cosine
from structlab.surgery import apply_structure, export_model, model_structure, replace_layers

log = logging.getLogger(__name__)


def leading_dim(batch: Any) -> int:
    """Size of the leading (sample) dimension of the first tensor in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor | Mapping | list | tuple):
            return leading_dim(v)
    raise TypeError(f"no tensor in a batch of type {type(batch).__name__}")


def take(batch: Any, n: int) -> Any:
    """The first `n` samples of every tensor in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: take(v, n) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(take(v, n) for v in batch)
    return batch


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy that runs eagerly: `nn.Module.compile()` keeps a function bound to the original
    module, which deepcopy would share, so the copy would silently run the original."""
    clone = copy.deepcopy(model)
    for m in clone.modules():
        m.__dict__.pop("_compiled_call_impl", None)
    return clone


class StructuredModule(L.LightningModule):
    """model: {name, targets, exclude, **build kwargs}; layer: {name, init, **layer kwargs}.

    The constructor builds the dense network only (cheap), so `load_from_checkpoint` and resume
    (`structure_from` before `trainer.fit(ckpt_path=...)`) never convert: the structure comes from the
    checkpoint and the weights from its state dict. A new run converts the targeted layers once, in
    `configure_model` (on the training device; rank 0 under DDP, broadcast to the other ranks).
    """

    def __init__(
        self,
        model: dict[str, Any],
        layer: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        model_cfg = dict(model)
        self.targets, self.exclude = model_cfg.pop("targets", []), model_cfg.pop("exclude", [])
        self.model_name = model_cfg.pop("name")
        self.model_cfg = model_cfg
        self.model = self.build_dense()
        self.layer_cfg = dict(layer or {"name": "dense"})
        layer_class(self.layer_cfg["name"])  # an unknown layer type fails here, not when training starts
        # True once the layers are what training uses: converted, or rebuilt from a checkpoint
        self.structured = self.layer_cfg["name"] == "dense"
        self.conversions = 0  # how often `convert` ran in this process (tests: never on resume/eval)
        self.optimizer_cfg = {"lr": 1e-3, "weight_decay": 0.05, "betas": (0.9, 0.999), **(optimizer or {})}
        self.scheduler_cfg = dict(scheduler or {})
        self.compile_model = compile

    # --- what a task adds ----------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Build arguments the task adds to the model config (a classifier's output count, say)."""
        return {}

    def model_inputs(self, batch: Any) -> Any:
        """What `self.model` is called with for `batch` (a tensor, a tuple or a dict of kwargs)."""
        raise NotImplementedError

    def samples_in(self, batch: Any) -> int:
        return leading_dim(batch)

    def tokens_in(self, batch: Any) -> int | None:
        """Tokens in `batch` for tokens/s, or None where the task has no tokens."""
        return None

    # --- the network -----------------------------------------------------------------------------
    def build_dense(self) -> nn.Module:
        return build_model(self.model_name, **self.model_cfg, **self.model_kwargs())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def convert(self) -> None:
        """Replace the targeted layers by the configured layer type (surgery), once."""
        cfg = dict(self.layer_cfg)
        name = cfg.pop("name")
        if name != "dense":
            before = sum(p.numel() for p in self.model.parameters())
            replaced = replace_layers(self.model, name, self.targets, self.exclude, progress=True, **cfg)
            self.conversions += 1
            after = sum(p.numel() for p in self.model.parameters())
            log.info(
                "%d layers are now %s: %s parameters → %s", len(replaced), name, f"{before:,}", f"{after:,}"
            )
        self.structured = True

    def _convert_on_rank_zero(self) -> None:
        """Rank 0 converts; the others rebuild its structure and take its weights (a conversion may
        be random or numerically rank-dependent; this way every rank starts from the same layers)."""
        strategy = self.trainer.strategy
        if self.trainer.world_size == 1:
            self.convert()
            return
        payload = None
        if self.trainer.is_global_zero:
            self.convert()
            payload = (model_structure(self.model), {k: v.cpu() for k, v in self.model.state_dict().items()})
        structure, state = strategy.broadcast(payload, src=0)
        if not self.trainer.is_global_zero:
            apply_structure(self.model, structure)
            self.model.load_state_dict(state)
            self.structured = True

    def structure_from(self, ckpt_path: str) -> None:
        """Take the structure of a checkpoint about to be resumed, so that `configure_model` (which
        Lightning calls before restoring) does not convert: the weights come from the checkpoint."""
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        self.on_load_checkpoint(saved)

    def configure_model(self) -> None:
        # `load_from_checkpoint` calls this without a trainer; it rebuilds the structure itself
        trainer = self._trainer
        if not self.structured and trainer is not None:
            self.model.to(self.trainer.strategy.root_device)  # the fit runs on the GPU when there is one
            self._convert_on_rank_zero()
        if self.compile_model and not getattr(self, "_compiled", False):
            self.model.compile()  # in place: parameter names (and checkpoints) stay as they are
            self._compiled = True

    # The structure travels with every checkpoint, so layers whose shapes depend on data (a tsvd
    # rank, say) or on the conversion are rebuilt before the state dict is loaded.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["structure"] = model_structure(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("structure") or {}
        current = model_structure(self.model)
        changed = {k: v for k, v in saved.items() if current.get(k) != v}
        if changed:
            apply_structure(self.model, changed)
        self.structured = True

    def deployed(self) -> nn.Module:
        """An eager copy of the network in its inference form (`export_model`), on the CPU."""
        return export_model(plain_copy(self.model).cpu().float())  # float32: CPU GEMMs

    # --- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = dict(self.optimizer_cfg)
        lr, wd = cfg.pop("lr"), cfg.pop("weight_decay")
        groups = param_groups(self.model, wd)
        for g in groups:
            g.setdefault("lr", lr)
        # Lightning refuses to clip the gradients of a fused optimizer under AMP (it unscales internally)
        fused = self.device.type == "cuda" and not self.trainer.gradient_clip_val
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=wd, fused=fused, **cfg)
        if not self.scheduler_cfg:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        if math.isinf(self.trainer.num_training_batches):  # a max_steps run (max_epochs=-1) has not loaded it
            self.trainer.fit_loop.setup_data()
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
            base_lr=lr,
            decay=s.get("decay", "cosine"),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
