"""Config helpers: resolvers, printing/saving the tree, and the global-batch rule."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def run_id(run_name: str, output_dir: str) -> str:
    """Stable id (wandb) for a run: its name + a short hash of its run dir (unique per sweep job)."""
    digest = hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_name)[:120]}-{digest}"


def required(key: str) -> Any:
    """`key: ${structlab.required:key}` in an experiment: a value the command line must give. (`???`
    cannot say it: merged over the root config's default it leaves that default in place.)"""
    raise ValueError(f"this experiment needs {key}=... on the command line (its file's header says what)")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("structlab.run_id"):
        OmegaConf.register_new_resolver("structlab.run_id", run_id)
    if not OmegaConf.has_resolver("structlab.required"):
        OmegaConf.register_new_resolver("structlab.required", required)


def print_config(cfg: DictConfig, order: tuple[str, ...] = ("model", "layer", "task", "trainer")) -> None:
    """Rich tree of the resolved config, main groups first."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}").add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)


def save_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def world_size(devices: Any, num_nodes: int, accelerator: str) -> int:
    """Processes a trainer config will start (devices × nodes), as Lightning will resolve it."""
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif devices in ("auto", -1, "-1"):
        per_node = (
            torch.cuda.device_count()
            if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
            else 1
        )
    elif isinstance(devices, str) and "," in devices:
        per_node = len([d for d in devices.split(",") if d.strip()])
    else:
        per_node = int(devices)
    return max(1, per_node) * max(1, int(num_nodes))


def batch_plan(global_batch: int | None, per_device: int | None, world: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) so that per_device × world × accumulation = global.

    Without a global batch size the per-device batch is used as is (accumulation 1).
    """
    if global_batch is None:
        if per_device is None:
            raise ValueError("set task.data.batch_size (per device) or global_batch_size")
        return per_device, 1
    if per_device is None:
        if global_batch % world:
            raise ValueError(
                f"global_batch_size={global_batch} is not divisible by the {world} processes; "
                "change global_batch_size or set task.data.batch_size"
            )
        return global_batch // world, 1
    if global_batch % (per_device * world):
        raise ValueError(
            f"global_batch_size={global_batch} is not a multiple of task.data.batch_size × processes = "
            f"{per_device} × {world}; change one of them"
        )
    return per_device, global_batch // (per_device * world)
