"""Build everything from a composed config, train / evaluate, and report. `run.py` calls `run`."""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from structlab.budget import macs_per_sample, model_cost
from structlab.callbacks import SpeedMonitor, WholeGlobalBatches
from structlab.callbacks.monitor import structure_rows
from structlab.config import batch_plan, print_config, save_config, world_size
from structlab.runlock import RunLock
from structlab.summary import write_summary
from structlab.tasks.structured import StructuredModule, example_batch, load_dense

log = logging.getLogger("structlab")
# `import lightning` adds its own console handler; Hydra's root handlers (console + run.log) already
# print its messages, so drop it to avoid every line appearing twice.
logging.getLogger("lightning").handlers.clear()
MODES = ("train", "eval", "compress")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def _callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = [*_instantiate_all(cfg.get("callbacks")), WholeGlobalBatches(cfg.get("global_batch_size"))]
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


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, StructuredModule, L.Trainer]:
    """Datamodule, LightningModule (dense: conversion happens once training starts) and Trainer."""
    t = cfg.trainer
    world = world_size(t.get("devices", 1), t.get("num_nodes", 1), t.get("accelerator", "cpu"))
    per_device, accumulate = batch_plan(cfg.get("global_batch_size"), cfg.task.data.get("batch_size"), world)
    datamodule = hydra.utils.instantiate(cfg.task.data, batch_size=per_device)
    module = hydra.utils.instantiate(
        cfg.task.module,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        layer=OmegaConf.to_container(cfg.layer, resolve=True),
        init_from=cfg.get("init_from"),
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
    """Train (then test a checkpoint chosen on validation) or evaluate; returns the summary dict."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; valid modes: {', '.join(MODES)}")
    if cfg.mode == "eval" and not cfg.get("ckpt_path"):
        raise ValueError("mode=eval needs ckpt_path=<path to a .ckpt>")
    if cfg.mode == "compress":
        from structlab.compress.mode import check_compressible

        check_compressible(cfg)  # before anything is built or written
    output_dir = Path(cfg.paths.output_dir)
    # global rank 0 holds the run directory for the whole job (the other ranks are part of it)
    lock = RunLock(output_dir, force=cfg.get("force", False)) if rank_zero_only.rank == 0 else nullcontext()
    with lock:
        return _run(cfg, output_dir)


def _run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    if rank_zero_only.rank == 0:
        if cfg.get("print_config", True):
            print_config(cfg)
        save_config(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True)  # one seed for the model's initialisation
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    ckpt = resume_checkpoint(cfg) if cfg.mode == "train" else None
    datamodule, module, trainer = build(cfg)
    # and one per rank for everything drawn from now on (augmentation, mixup, dropout)
    L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})

    if cfg.mode == "compress":
        from structlab.compress.mode import compress_run, print_layers

        def costs() -> dict[str, Any]:  # called after a test run has set the datamodule up
            return cost_rows(module, module.model_inputs(example_batch(datamodule, module)))

        sections, report = compress_run(cfg, datamodule, module, trainer, costs)
        summary: dict[str, Any] = {}
        if trainer.is_global_zero:
            print_layers(report)
            summary = {"run": run_rows(cfg, datamodule, trainer), **sections}
            summary["outputs"]["run dir"] = str(output_dir)
            summary["speed"]["total wall time (s)"] = round(time.perf_counter() - start, 1)
            write_summary(summary, output_dir)
        return summary
    if cfg.mode == "train":
        converted = None
        if ckpt:
            module.structure_from(ckpt)  # resuming rebuilds the structure, never converts again
        elif cfg.get("init_from"):
            converted = validate_converted(trainer, module, datamodule)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        tested = tested_checkpoint(trainer, datamodule, cfg.task.metric)
        results = trainer.test(module, datamodule=datamodule, ckpt_path=tested["path"] or None)
        if cfg.get("init_from") and results:  # the dense model it started from, on the same test split
            results[0].update(
                {f"{k} (dense init_from)": v for k, v in test_dense(cfg, module, datamodule, trainer).items()}
            )
            if converted:
                results[0].update(
                    {f"{k} (converted, before fine-tuning)": v for k, v in converted[0].items()}
                )
    else:
        ckpt_path = Path(cfg.ckpt_path)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
        tested = {"path": str(ckpt_path), "which": "given by ckpt_path"}
        module = type(module).load_from_checkpoint(ckpt_path, map_location="cpu")
        results = trainer.test(module, datamodule=datamodule)

    summary = summarize(cfg, module, datamodule, trainer, results, tested, time.perf_counter() - start)
    if cfg.mode == "train" and cfg.compress.after_training and cfg.layer.name == "dense" and results:
        compress_trained(cfg, datamodule, module, trainer, summary, tested)
    if trainer.is_global_zero:
        write_summary(summary, output_dir, details={"structured layers": structure_rows(module.model)})
    return summary


def validate_converted(trainer: L.Trainer, module: StructuredModule, datamodule: Any) -> list[dict]:
    """Validation metrics of the converted model before fine-tuning (validate converts it; fit keeps
    that structure). Validation ran in inference mode, so the metric states it left behind are
    inference tensors that training's validation could not update in place: reset them here."""
    from torchmetrics import Metric

    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    for metric in module.modules():
        if isinstance(metric, Metric):
            metric.reset()
    return results


def compress_trained(
    cfg: DictConfig,
    datamodule: Any,
    module: StructuredModule,
    trainer: L.Trainer,
    summary: dict,
    tested: dict,
) -> None:
    """`compress.after_training`: the tested weights compressed as mode=compress does, without more
    training; its section, test metric and costs join the run's summary beside the dense ones."""
    from structlab.compress.mode import compress_run

    metric = f"test/{cfg.task.metric.name}"
    trained = (f"{tested['which']} of this run", summary["test"][metric])

    def costs() -> dict[str, Any]:
        return cost_rows(module, module.model_inputs(example_batch(datamodule, module)))

    sections, _ = compress_run(cfg, datamodule, module, trainer, costs, trained)
    summary["compression"] = sections["compression"]
    summary["test"][f"{metric} compressed"] = sections["test"][f"{metric} compressed"]
    compressed = sections["cost"]
    summary["cost"].update(
        {
            "parameters: compressed": compressed["parameters: as trained"],
            "MACs per sample: compressed": compressed["MACs per sample: as trained"],
            "budget (structured MACs / dense): compressed": compressed["budget (structured MACs / dense)"],
        }
    )
    summary["outputs"]["compressed model"] = sections["outputs"]["compressed model"]
    summary["speed"].update(sections["speed"])


def test_dense(
    cfg: DictConfig, module: StructuredModule, datamodule: Any, trainer: L.Trainer
) -> dict[str, float]:
    """Test metrics of the dense weights `init_from` names, through the same trainer (not logged)."""
    dense = type(module)(**{**module.hparams, "layer": {"name": "dense"}, "init_from": None})
    load_dense(dense.model, cfg.init_from)
    loggers, trainer.loggers = trainer.loggers, []  # the loggers keep the structured model's test metrics
    try:
        results = trainer.test(dense, datamodule=datamodule, verbose=False)
    finally:
        trainer.loggers = loggers
    return {k: float(v) for k, v in results[0].items()}


def tested_checkpoint(trainer: L.Trainer, datamodule: Any, metric: DictConfig) -> dict[str, str]:
    """The best checkpoint by val/<metric>, or the last one when validation ran on the test split
    (selecting on the split that is then reported would overstate the result)."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return {"path": "", "which": "the final weights (checkpointing is off)"}
    if getattr(datamodule, "validates_on_test", False):
        return {"path": callback.last_model_path, "which": "last (validation ran on the test split)"}
    if not callback.best_model_path:
        return {"path": "", "which": "the final weights (no checkpoint was chosen on validation)"}
    which = f"best val/{metric.name} ({metric.mode})"
    settled = max((c.settled_step() for c in trainer.callbacks if hasattr(c, "settled_step")), default=0)
    if settled:
        saved_at = torch.load(callback.best_model_path, map_location="cpu", mmap=True, weights_only=False)
        if saved_at["global_step"] < settled:  # its structure may cost more than the final budget
            return {
                "path": "",
                "which": f"the final weights (the {which} checkpoint, step {saved_at['global_step']}, "
                f"predates the final budget, reached at step {settled})",
            }
    return {"path": callback.best_model_path, "which": which}


def stored_values(model: torch.nn.Module) -> int:
    """Parameters and buffers (an exported layer may keep its weights as buffers), tied ones once."""
    return sum(t.numel() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())


def cost_rows(module: StructuredModule, inputs: Any) -> dict[str, Any]:
    """Parameters and MACs per sample (executed, FlopCounterMode) of the dense network, the network as
    trained and its deployed (exported) form, and the budget the structured layers reach."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        dense = module.build_dense()
    deployed = module.deployed()
    rows: dict[str, Any] = {
        "parameters: dense": stored_values(dense),
        "parameters: as trained": stored_values(module.model),
        "parameters: deployed": stored_values(deployed),
        "MACs per sample: dense": macs_per_sample(dense, move_data_to_device(inputs, "meta")),
        "MACs per sample: as trained": macs_per_sample(module.model, inputs),
        "MACs per sample: deployed": macs_per_sample(deployed, move_data_to_device(inputs, "cpu")),
    }
    cost = model_cost(module.model)
    if cost["structured_layers"]:
        rows["structured layers"] = cost["structured_layers"]
        rows["budget (structured MACs / dense)"] = round(cost["budget"], 4)
    return rows


def run_rows(cfg: DictConfig, datamodule: Any, trainer: L.Trainer) -> dict[str, Any]:
    per_device, accumulate = datamodule.batch_size, trainer.accumulate_grad_batches
    return {
        "name": cfg.run_name,
        "mode": cfg.mode,
        "model": cfg.model.name,
        "layer": cfg.layer.name,
        "task": cfg.task.name,
        "devices": trainer.world_size,
        "precision": str(trainer.precision),
        "global batch": f"{per_device * trainer.world_size * accumulate} = "
        f"{per_device} per device × {trainer.world_size} × {accumulate} accumulated",
    }


def summarize(
    cfg, module, datamodule, trainer, results, tested: dict[str, str], wall: float
) -> dict[str, Any]:
    speed = next((c for c in trainer.callbacks if isinstance(c, SpeedMonitor)), None)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    loggers = {
        type(lg).__name__.replace("Logger", "").lower(): lg.log_dir or lg.save_dir for lg in trainer.loggers
    }
    rows = run_rows(cfg, datamodule, trainer)
    if hasattr(datamodule, "validation_split"):
        rows["validation"] = datamodule.validation_split
    rows["tested checkpoint"] = tested["which"]
    speed_rows: dict[str, Any] = {}
    if speed is not None and speed.timed_seconds > 0:
        speed_rows["train samples/s"] = round(speed.samples_per_sec(), 1)
        if speed.timed_tokens:
            speed_rows["train tokens/s"] = round(speed.tokens_per_sec(), 1)
    if speed is not None:
        speed_rows["train wall time (s)"] = round(speed.fit_seconds, 1)
    speed_rows["total wall time (s)"] = round(wall, 1)
    speed_rows["epochs / steps"] = f"{trainer.current_epoch} / {trainer.global_step}"
    return {
        "run": rows,
        "test": metrics,
        "cost": cost_rows(module, module.model_inputs(example_batch(datamodule, module))),
        "speed": speed_rows,
        "outputs": {"run dir": str(cfg.paths.output_dir), "checkpoint": tested["path"] or "none", **loggers},
    }
