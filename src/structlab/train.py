"""Build everything from a composed config, train / evaluate, and report. `run.py` calls `run`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from structlab.budget import macs_per_sample, model_cost
from structlab.callbacks import SpeedMonitor, WholeGlobalBatches
from structlab.config import batch_plan, print_config, save_config, world_size
from structlab.summary import write_summary

log = logging.getLogger("structlab")
# `import lightning` adds its own console handler; Hydra's root handlers (console + run.log) already
# print its messages, so drop it to avoid every line appearing twice.
logging.getLogger("lightning").handlers.clear()
MODES = ("train", "eval")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def _callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = [*_instantiate_all(cfg.get("callbacks")), WholeGlobalBatches()]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """last.ckpt of this run when resuming; refuses to silently overwrite an existing run.

    A job that SLURM requeued (SLURM_RESTART_COUNT > 0) resumes as if resume=true had been given.
    """
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if cfg.resume or (requeued and last.is_file()):
        if not last.is_file():
            raise FileNotFoundError(
                f"resume=true but {last} does not exist. A run resumes by its run_name "
                f"(now {cfg.run_name!r}): pass the same run_name=... as the run to continue."
            )
        return str(last)
    if last.is_file():
        raise FileExistsError(
            f"run {cfg.run_name!r} already has checkpoints in {last.parent}. "
            "Pass resume=true to continue it, or choose another run_name=..."
        )
    return None


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Datamodule, LightningModule and Trainer from the config (the batch rule applied)."""
    t = cfg.trainer
    world = world_size(t.get("devices", 1), t.get("num_nodes", 1), t.get("accelerator", "cpu"))
    per_device, accumulate = batch_plan(cfg.get("global_batch_size"), cfg.task.data.get("batch_size"), world)
    datamodule = hydra.utils.instantiate(cfg.task.data, batch_size=per_device)
    module = hydra.utils.instantiate(
        cfg.task.module,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        layer=OmegaConf.to_container(cfg.layer, resolve=True),
        _convert_="all",
    )
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=_callbacks(cfg),
        logger=_instantiate_all(cfg.get("logger")) or False,
        accumulate_grad_batches=accumulate,
    )
    return datamodule, module, trainer


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (then test on the best checkpoint) or evaluate; returns the summary dict."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; valid modes: {', '.join(MODES)}")
    if cfg.mode == "eval" and not cfg.get("ckpt_path"):
        raise ValueError("mode=eval needs ckpt_path=<path to a .ckpt>")
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:
        if cfg.get("print_config", True):
            print_config(cfg)
        save_config(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    ckpt = resume_checkpoint(cfg) if cfg.mode == "train" else None
    datamodule, module, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})

    if cfg.mode == "train":
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
    else:
        ckpt_path = Path(cfg.ckpt_path)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
        best = str(ckpt_path)
        module = type(module).load_from_checkpoint(best, map_location="cpu")
        results = trainer.test(module, datamodule=datamodule)

    summary = summarize(cfg, module, datamodule, trainer, results, best, time.perf_counter() - start)
    if trainer.is_global_zero:
        write_summary(summary, output_dir)
    return summary


def cost_rows(model: torch.nn.Module, sample: torch.Tensor) -> dict[str, Any]:
    """Parameters, MACs as executed (FlopCounterMode) and, with structured layers, the budget they reach."""
    rows: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "MACs per sample (executed)": macs_per_sample(model, sample),
    }
    cost = model_cost(model)
    if cost["structured_layers"]:
        rows["structured layers"] = cost["structured_layers"]
        rows["budget (structured MACs / dense)"] = round(cost["budget"], 4)
    return rows


def summarize(cfg, module, datamodule, trainer, results, best: str, wall: float) -> dict[str, Any]:
    speed = next((c for c in trainer.callbacks if isinstance(c, SpeedMonitor)), None)
    sample = torch.zeros(1, datamodule.in_chans, datamodule.img_size, datamodule.img_size)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    loggers = {
        type(lg).__name__.replace("Logger", "").lower(): lg.log_dir or lg.save_dir for lg in trainer.loggers
    }
    return {
        "run": {
            "name": cfg.run_name,
            "mode": cfg.mode,
            "model": cfg.model.name,
            "layer": cfg.layer.name,
            "task": cfg.task.name,
            "devices": trainer.world_size,
            "precision": str(trainer.precision),
            "global batch": f"{datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches} = "
            f"{datamodule.batch_size} per device × {trainer.world_size} × {trainer.accumulate_grad_batches} accumulated",
        },
        "test": metrics,
        "cost": cost_rows(module.model, sample.to(module.device)),
        "speed": {
            "train samples/s": round(speed.samples_per_sec(), 1) if speed else "n/a",
            "train wall time (s)": round(speed.fit_seconds, 1) if speed else "n/a",
            "total wall time (s)": round(wall, 1),
            "epochs / steps": f"{trainer.current_epoch} / {trainer.global_step}",
        },
        "outputs": {"run dir": str(cfg.paths.output_dir), "checkpoint": best or "none", **loggers},
    }
