"""What the structure learned, shown while it trains: per-layer scalars, a picture of every gblr
layer's block layout (the image the Gaudi-GBLR README shows), and a model-wide heat map of the
per-layer budgets — logged to every logger that takes images (wandb, tensorboard) and saved as PNGs
in <run dir>/structure/."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from structlab.budget import layer_costs
from structlab.layers.gblr import GaudiGBLRLinear

log = logging.getLogger(__name__)


def structure_rows(model: torch.nn.Module) -> list[dict[str, Any]]:
    """The structured layers' costs (budget.layer_costs) with their MACs ratio and, where the layer
    has one, its rank or mean width: the per-layer table of the summary."""
    rows = []
    for row in layer_costs(model):
        if not row["structured"]:
            continue
        layer = model.get_submodule(row["name"])
        row = {**row, "macs_ratio": row["macs_per_token"] / row["dense_macs"]}
        if isinstance(layer, GaudiGBLRLinear):
            row["mean_width"] = float(layer.widths.detach().clamp(0, 1).mean())
        elif hasattr(layer, "rank"):
            row["rank"] = int(layer.rank)
        rows.append(row)
    return rows


@torch.no_grad()
def block_layout(layer: GaudiGBLRLinear, size: int = 128) -> torch.Tensor:
    """How many components cover each cell of the (out × in) weight, average-pooled to at most
    `size` cells a side: Σ_k M_out[k] ⊗ M_in[k] from the layer's own (rounded) masks."""
    m_out, m_in = (m.float().cpu() for m in layer.masks())
    cover = m_out.T @ m_in  # out × in
    rows, cols = min(size, cover.shape[0]), min(size, cover.shape[1])
    return F.adaptive_avg_pool2d(cover[None, None], (rows, cols))[0, 0]


def _grid_position(name: str) -> tuple[int, str]:
    """(block index, role) from a module name: "blocks.3.mlp.fc1" → (3, "mlp.fc1"); no index → (0, name)."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    if match is None:
        return 0, name
    return int(match.group(1)), name[match.end() - 1 :].strip(".") or name


class StructureMonitor(L.Callback):
    """Every `every_n_epochs` epochs: per-layer `structure/<layer>/macs_ratio` (and `/rank` or
    `/mean_width`) and the global `structure/macs_ratio` as scalars; when `images`, the gblr layouts
    and the budget heat map as PNGs in <run dir>/structure/ and as images in wandb / tensorboard.
    Does nothing for a model without structured layers."""

    def __init__(self, every_n_epochs: int = 1, images: bool = True, image_size: int = 128) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be ≥ 1, got {every_n_epochs}")
        self.every_n_epochs, self.images, self.image_size = every_n_epochs, images, image_size
        self.saved: list[Path] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        model = getattr(pl_module, "model", pl_module)
        rows = structure_rows(model)
        if not rows:
            return
        scalars = {
            "structure/macs_ratio": sum(r["macs_per_token"] for r in rows)
            / sum(r["dense_macs"] for r in rows)
        }
        for r in rows:
            scalars[f"structure/{r['name']}/macs_ratio"] = r["macs_ratio"]
            for key in ("rank", "mean_width"):
                if key in r:
                    scalars[f"structure/{r['name']}/{key}"] = float(r[key])
        pl_module.log_dict(scalars, on_step=False, on_epoch=True, rank_zero_only=True)
        if self.images and trainer.is_global_zero:
            self._draw(trainer, model, rows)

    def _draw(self, trainer: L.Trainer, model: torch.nn.Module, rows: list[dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a cluster node
        import matplotlib.pyplot as plt

        folder = Path(trainer.default_root_dir) / "structure"
        folder.mkdir(parents=True, exist_ok=True)
        epoch = trainer.current_epoch
        figures = {"budgets": self._budget_map(plt, rows)}
        gblr = [r["name"] for r in rows if isinstance(model.get_submodule(r["name"]), GaudiGBLRLinear)]
        if gblr:
            figures["gblr_layout"] = self._layouts(plt, model, gblr)
        for key, fig in figures.items():
            path = folder / f"epoch{epoch:03d}-{key}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            self.saved.append(path)
            self._log_image(trainer, f"structure/{key}", fig, path, epoch)
            plt.close(fig)

    def _budget_map(self, plt, rows: list[dict[str, Any]]):
        cells = {_grid_position(r["name"]): r["macs_ratio"] for r in rows}
        blocks = sorted({b for b, _ in cells})
        roles = list(dict.fromkeys(role for _, role in cells))
        grid = torch.full((len(blocks), len(roles)), float("nan"))
        for (b, role), value in cells.items():
            grid[blocks.index(b), roles.index(role)] = value
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(roles), 1.0 + 0.3 * len(blocks)))
        image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(roles)), roles, rotation=30, ha="right")
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_ylabel("block")
        ax.set_title("MACs / dense MACs per layer")
        fig.colorbar(image, ax=ax)
        return fig

    def _layouts(self, plt, model: torch.nn.Module, names: list[str]):
        cols = min(4, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, name in zip(axes.flat, names, strict=False):
            ax.imshow(
                block_layout(model.get_submodule(name), self.image_size).numpy(), cmap="magma", aspect="auto"
            )
            ax.set_title(name, fontsize=7)
        fig.suptitle("gblr block layout: components covering each weight (out × in)")
        return fig

    @staticmethod
    def _log_image(trainer: L.Trainer, key: str, fig, path: Path, epoch: int) -> None:
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_figure"):  # tensorboard
                logger.experiment.add_figure(key, fig, global_step=epoch, close=False)
