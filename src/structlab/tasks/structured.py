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
# layer-config keys that say how dense weights become low-rank layers (compress_model), not the layer's shape
CONVERSION_KEYS = {"method": "svd", "allocation": "uniform", "calib_samples": 256}


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


def example_batch(datamodule: Any, module: L.LightningModule, samples: int | None = 1) -> Any:
    """`samples` samples (None: all) of the first test batch, as the model sees them (on its device,
    transformed)."""
    batch = next(iter(datamodule.test_dataloader()))
    batch = module.transfer_batch_to_device(batch, module.device, 0)
    batch = datamodule.on_after_batch_transfer(batch, 0)
    return batch if samples is None else take(batch, samples)


def crop_sequences(inputs: Any, length: int) -> Any:
    """The first `length` positions (dim 1) of every sequence tensor in a (nested) batch of inputs."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() < 2:
            return inputs
        if length > inputs.shape[1]:
            raise ValueError(
                f"calib.seq_len={length} is longer than the task's windows ({inputs.shape[1]} tokens): "
                f"set task.data.block_size={length} or a shorter calib.seq_len"
            )
        return inputs[:, :length]
    if isinstance(inputs, Mapping):
        return {k: crop_sequences(v, length) for k, v in inputs.items()}
    if isinstance(inputs, list | tuple):
        return type(inputs)(crop_sequences(v, length) for v in inputs)
    return inputs


def load_dense(model: nn.Module, source: str) -> str:
    """Load trained dense weights into `model`, strictly: a Lightning checkpoint (.ckpt, its "model."
    entries) or a folder / file holding model.safetensors. A mismatch names the keys that differ."""
    from pathlib import Path

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"init_from={source}: no such file (give a .ckpt of a dense run or a folder with model.safetensors)"
        )
    if path.suffix == ".ckpt":
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if saved.get("structure"):
            raise ValueError(
                f"init_from={source} is a checkpoint of a structured model; fine-tuning starts from a dense one"
            )
        state = {k[len("model.") :]: v for k, v in saved["state_dict"].items() if k.startswith("model.")}
    else:
        from safetensors.torch import load_file

        state = load_file(str(path))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"init_from={source} does not fit this model ({type(model).__name__}): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, other shapes {sorted(shapes)[:4]}. "
            "Use the model config the checkpoint was trained with"
        )
    model.load_state_dict(state, strict=True)
    return str(path)


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
        init_from: str | None = None,
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
        self.init_from = init_from  # dense weights loaded before a new run converts (fine-tuning)

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
        """Replace the targeted layers by the configured layer type (surgery), once. Low-rank layers
        from dense weights under a budget go through `compress_model` (the post-training compression:
        plain, whitened, ASVD or FALOR factors, uniform or global ranks, calibration from the train split)."""
        # Lightning calls this under the GPU as default device; the conversion's host-side tensors
        # (calibration loader order, gblr search constants) belong on the CPU, as everywhere else
        with torch.device("cpu"):
            self._convert()
        self.structured = True

    def _convert(self) -> None:
        cfg = dict(self.layer_cfg)
        name = cfg.pop("name")
        if name != "dense":
            before = sum(p.numel() for p in self.model.parameters())
            data_aware = {k: cfg.pop(k) for k in CONVERSION_KEYS if k in cfg}
            if name == "svd" and cfg.get("init", "dense") == "dense" and cfg.get("rank") is None:
                replaced = self._compress_to_svd({**cfg, **data_aware})
            elif (
                data_aware.get("method", "svd") != "svd"
                or data_aware.get("allocation", "uniform") != "uniform"
            ):
                raise ValueError(
                    f"layer.method / layer.allocation convert dense weights under a budget: they need layer=svd, "
                    f"layer.init=dense and layer.rank=null (got layer={name}, {data_aware})"
                )
            else:
                replaced = replace_layers(self.model, name, self.targets, self.exclude, progress=True, **cfg)
            self.conversions += 1
            after = sum(p.numel() for p in self.model.parameters())
            log.info(
                "%d layers are now %s: %s parameters → %s", len(replaced), name, f"{before:,}", f"{after:,}"
            )

    def _compress_to_svd(self, cfg: dict[str, Any]) -> list[str]:
        from structlab.budget import DEFAULT_BUDGET, check_budget
        from structlab.compress.model import NEEDS_CALIBRATION, compress_model

        method, allocation = cfg.get("method", "svd"), cfg.get("allocation", "uniform")
        budget = check_budget(cfg["budget"] if cfg.get("budget") is not None else DEFAULT_BUDGET)
        calibration = None
        if method in NEEDS_CALIBRATION:
            calibration = self.calibration_inputs(self.trainer.datamodule, cfg.get("calib_samples", 256))
        report = compress_model(
            self.model, method, 1.0 - budget, targets=self.targets, exclude=self.exclude,
            calibration=calibration, allocation=allocation, rank_multiple=cfg.get("rank_multiple", 8),
            untie=cfg.get("untie", False), progress=True,
        )  # fmt: skip
        return [r.name for r in report.layers]

    def calibration_inputs(
        self, datamodule: Any, samples: int, seq_len: int | None = None, seed: int = 0
    ) -> list[Any]:
        """`samples` model inputs from the train split (its loader order under `seed`), on this
        module's device; token windows cropped to `seq_len` when it is set."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        datamodule.setup("fit")
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        out, count = [], 0
        try:
            for batch in datamodule.train_dataloader():
                batch = datamodule.on_after_batch_transfer(move_data_to_device(batch, self.device), 0)
                batch = take(batch, samples - count)
                inputs = self.model_inputs(batch)
                if seq_len is not None:
                    if self.tokens_in(batch) is None:
                        raise ValueError(
                            f"calib.seq_len={seq_len} applies to token tasks; this task has no tokens"
                        )
                    inputs = crop_sequences(inputs, seq_len)
                out.append(inputs)
                count += self.samples_in(batch)
                if count >= samples:
                    break
        finally:
            torch.random.set_rng_state(generator_state)  # calibration draws nothing from the run's stream
        if count < samples:
            log.warning("calibration: the train split has only %d samples (asked for %d)", count, samples)
        return out

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
            if self.init_from:
                load_dense(self.model, self.init_from)
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
