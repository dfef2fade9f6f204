"""structlab entry point: `python run.py [experiment=<task>/<name>] [overrides...]`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("STRUCTLAB_ROOT", str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # runs from a checkout without install

from structlab.config import register_resolvers  # noqa: E402

register_resolvers()
log = logging.getLogger("structlab")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from structlab.runlock import RunLockedError
    from structlab.train import run  # heavy imports after Hydra has parsed the command line

    try:
        summary = run(cfg)
    except RunLockedError:  # another job's run: say so on stderr, write nothing into its folder
        raise
    except Exception:
        log.exception("run failed; outputs so far are in %s", cfg.paths.output_dir)
        raise
    finally:
        _finish_wandb()
    print(f"outputs: {cfg.paths.output_dir}")
    return summary["test"].get(f"test/{cfg.task.metric.name}")  # the value Hydra sweepers optimise


def _finish_wandb() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


if __name__ == "__main__":
    main()
