"""`python run.py mode=compress ...`: compress a trained model without training and report it (also
what a training run with `compress.after_training=true` does with the model it just trained).

The task's test metric (perplexity for language models) before and after, on the task's own test
loader and precision; calibration from the train split (disjoint from evaluation); the compressed
model saved by `save_compressed` into <run dir>/compressed; optionally int8 (torchao) evaluated too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from structlab.budget import budget_from_ratio, stored_bytes
from structlab.compress.model import NEEDS_CALIBRATION, compress_model
from structlab.surgery import save_compressed
from structlab.tasks.structured import StructuredModule, example_batch, leading_dim

log = logging.getLogger("structlab")


def load_weights(cfg: DictConfig, module: StructuredModule) -> str:
    """The trained weights to compress: a Lightning checkpoint (ckpt_path) or the model's own
    weights (model.pretrained: HF / timm; model.ckpt_path: a weights file, e.g. π3's official
    model.safetensors), loaded when the model was built; compressing a random initialisation is refused."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist")
        module.structure_from(str(path))
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
        module.load_state_dict(state)
        return f"checkpoint {path}"
    if cfg.model.get("pretrained"):
        return f"pretrained {cfg.model.pretrained}"
    if cfg.model.get("ckpt_path"):
        return f"weights {cfg.model.ckpt_path}"
    raise ValueError(
        "mode=compress needs trained weights: ckpt_path=<a .ckpt of a training run> or "
        "model.pretrained=<name or directory> or model.ckpt_path=<weights file> "
        "(compressing a random initialisation measures nothing)"
    )


def calibration_inputs(cfg: DictConfig, datamodule: Any, module: StructuredModule) -> list[Any]:
    """`calib.samples` model inputs from the train split (see StructuredModule.calibration_inputs)."""
    return module.calibration_inputs(datamodule, cfg.calib.samples, cfg.calib.seq_len, cfg.calib.seed)


def check_compressible(cfg: DictConfig) -> None:
    """Compression (mode=compress, or compress.after_training) starts from a dense model."""
    if cfg.layer.name != "dense":
        raise ValueError(
            f"compression takes its method from compress.method and starts from dense layers; "
            f"leave layer=dense (got layer={cfg.layer.name})"
        )


def forward_ms(module: StructuredModule, inputs: Any, trainer: L.Trainer) -> float:
    """Median milliseconds of one forward pass on `inputs`, in the run's precision and device."""
    from structlab.bench.timing import median_ms_on
    from structlab.inputs import call_model

    def forward() -> None:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            call_model(module.model, inputs)

    training = module.model.training
    module.model.eval()
    try:
        return median_ms_on(trainer.strategy.root_device, forward)
    finally:
        module.model.train(training)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def compress_run(
    cfg: DictConfig,
    datamodule: Any,
    module: StructuredModule,
    trainer: L.Trainer,
    costs: Callable[[], dict],
    trained: tuple[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate, compress, save, evaluate again (and int8). Returns (summary sections, the report);
    `costs()` gives the cost rows of the compressed model (taken before int8). `trained`: the
    weights are already in `module` (a run that just trained them): (their source, their test metric)."""
    check_compressible(cfg)
    c = cfg.compress
    update = bool(c["update"])  # update would be the mapping's update() method
    source = load_weights(cfg, module) if trained is None else trained[0]
    device = trainer.strategy.root_device
    module.to(device)
    metric = f"test/{cfg.task.metric.name}"

    def evaluate() -> float:
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        return float(results[0][metric])

    before = evaluate() if trained is None else trained[1]
    module.to(device)  # trainer.test hands the module back on the CPU
    inputs = module.model_inputs(example_batch(datamodule, module, samples=None))  # one test batch
    speed = {"forward ms per test batch: dense": forward_ms(module, inputs, trainer)}
    size = {"weights MB: dense": stored_bytes(module.model) / 2**20}
    needs_data = c.method in NEEDS_CALIBRATION or update
    calibration = calibration_inputs(cfg, datamodule, module) if needs_data else None
    report = compress_model(
        module.model,
        method=c.method,
        ratio=c.ratio,
        targets=module.targets,
        exclude=module.exclude,
        calibration=calibration,
        update=update,
        allocation=c.allocation,
        alpha=c.alpha,
        rank_multiple=c.rank_multiple,
        untie=c.untie,
        progress=True,
    )
    info = {
        "report": report.to_dict(),
        "source": source,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
    }
    if c.quantize:
        info.update(quantize=c.quantize, quantized=[r.name for r in report.layers])
    saved = Path(cfg.paths.output_dir) / "compressed"
    if trainer.is_global_zero:  # one writer: DDP ranks hold the same compressed model
        save_compressed(module.model, saved, info)
    trainer.strategy.barrier()
    results = {f"{metric} dense": before, f"{metric} compressed": evaluate()}
    module.to(device)
    size["weights MB: compressed"] = stored_bytes(module.model) / 2**20
    speed["forward ms per test batch: compressed"] = forward_ms(module, inputs, trainer)
    speed["speed-up (dense / compressed)"] = (
        speed["forward ms per test batch: dense"] / speed["forward ms per test batch: compressed"]
    )
    cost = costs()
    if c.quantize:
        from structlab.compress.quantize import quantize_model

        quantize_model(module.model, c.quantize, [r.name for r in report.layers])
        size[f"weights MB: compressed + {c.quantize}"] = stored_bytes(module.model) / 2**20
        results[f"{metric} compressed + {c.quantize}"] = evaluate()
    sections = {
        "compression": {
            "method": c.method + (" + update" if update else ""),
            "allocation": c.allocation,
            "ratio (parameters removed)": f"{report.achieved_ratio:.4f} (asked {c.ratio}, budget β = {budget_from_ratio(c.ratio):.3f})",
            "budget reached (MACs / dense)": round(report.budget, 4),
            "targeted layers": len(report.layers),
            "parameters of the targets": f"{report.params_before:,} → {report.params_after:,}",
            "calibration": "none (data-free)"
            if calibration is None
            else f"{sum(leading_dim(b) for b in calibration)} samples from the train split",
            "weights": source,
            "precision": str(trainer.precision),
        },
        "test": results,
        "cost": {**cost, **{k: round(v, 2) for k, v in size.items()}},
        "speed": {
            **{k: round(v, 2) for k, v in speed.items()},
            "measured on": f"{device_name(device)}, {trainer.precision}, {leading_dim(inputs)} samples, "
            "median of 10 after 3 warm-up",
        },
        "outputs": {"compressed model": str(saved)},
    }
    return sections, report.to_dict()


def print_layers(report: dict[str, Any], console: Console | None = None) -> None:
    """Per-layer ranks, parameters, MACs per token and calibration output error ‖ΔW Xᵀ‖/‖W Xᵀ‖."""
    table = Table(title=f"compressed layers ({report['method']})")
    for col in ("layer", "out×in", "rank", "params", "MACs/token", "out. error"):
        table.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
    for r in report["layers"]:
        table.add_row(
            r["name"],
            "×".join(map(str, r["shape"])),
            "dense" if r["rank"] is None else str(r["rank"]),
            f"{r['params_before']:,}→{r['params_after']:,}",
            f"{r['macs_before']:,}→{r['macs_after']:,}",
            "" if r["output_error"] is None else f"{r['output_error']:.4f}",
        )
    (console or Console()).print(table)
