"""Helpers shared by tests (imported as `support`; `conftest` is not importable by name when
several conftest.py files exist)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
os.environ.setdefault("STRUCTLAB_ROOT", str(ROOT))

from structlab.config import register_resolvers  # noqa: E402

register_resolvers()


def compose_train(*overrides: str, output_dir: Path | None = None) -> DictConfig:
    """The root config with `overrides`, as `python run.py <overrides>` would compose it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=False)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
    return cfg


def _cli_env(env: dict | None) -> dict:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "", **(env or {})}
    return {k: v for k, v in full_env.items() if v != ""}


def run_cli(
    *args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python run.py args...` in a subprocess (the robust way to test DDP and Hydra launchers)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=_cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.Popen:
    """`python run.py args...` started in its own process group (kill it with os.killpg)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=_cli_env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def fused_vs_composed_gblr(layer, x, grad_y) -> dict[str, tuple]:
    """{name: (fused, composed)} for y and the gradients of x and every parameter of a gblr `layer`:
    once through its forward (which must take the fused sharp-box node) and once op by op."""
    import torch

    runs = []
    for fused in (True, False):
        y = layer(x) if fused else torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
        assert (y.grad_fn.name() == "BoxGBLRLinearBackward") == fused
        layer.zero_grad()
        x.grad = None
        y.backward(grad_y)
        runs.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    return dict(zip(["y", "x", *dict(layer.named_parameters())], zip(*runs, strict=True), strict=True))


class AugmentationProbe(L.Callback):
    """For run.py subprocesses (`+callbacks.probe._target_=support.AugmentationProbe`, PYTHONPATH=tests):
    at train start, augment one fixed batch through the datamodule as training does and write which
    of its images came out flipped to <run dir>/augment_rank<r>.json."""

    def on_train_start(self, trainer, pl_module):
        import torch

        g = torch.Generator().manual_seed(0)  # the same images on every rank
        x = torch.randint(0, 255, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
        dm = trainer.datamodule
        out, _ = dm.on_after_batch_transfer((x, torch.zeros(64, dtype=torch.long)), 0)
        flipped = [int(not torch.equal(o, p)) for o, p in zip(out, dm.normalize(x), strict=True)]
        path = Path(trainer.default_root_dir) / f"augment_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(flipped))


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")


class FailOnceSaved(L.Callback):
    """Makes every checkpoint save fail mid-write (as a full disk would) once last.ckpt exists."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if (Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt").exists():
            checkpoint["bad"] = _Unpicklable()


class LockProbe(L.Callback):
    """Writes <run dir>/lock_rank<r>.json at train start: this rank's pid and the run lock's holder."""

    def on_train_start(self, trainer, pl_module):
        root = Path(trainer.default_root_dir)
        holder = json.loads((root / "run.lock").read_text())
        (root / f"lock_rank{trainer.global_rank}.json").write_text(json.dumps([os.getpid(), holder["pid"]]))
