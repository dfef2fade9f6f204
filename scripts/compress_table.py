"""One perplexity (or task-metric) table of every compression method for a trained run, in one process.

Loads the run's resolved config and checkpoint once, then for each method × ratio × allocation
(× update) compresses a fresh copy of the dense model exactly as `mode=compress` does (the same
calibration from the train split, the same `compress_model`) and scores it with the task's test loop
(`trainer.test`: for language models, perplexity over non-overlapping windows of the test split).

    python scripts/compress_table.py logs/runs/<run> [--ckpt best|last|PATH] [--ratios 0.2 0.4]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from structlab.compress import compress_model  # noqa: E402
from structlab.compress.mode import calibration_inputs, load_weights  # noqa: E402
from structlab.compress.model import NEEDS_CALIBRATION  # noqa: E402
from structlab.train import build  # noqa: E402

ROWS = [  # (method, update)
    ("svd", False),
    ("asvd", False),
    ("whitened_svd", False),
    ("whitened_svd", True),
    ("falor", False),
    ("tsvd", False),
]


def checkpoint(run_dir: Path, which: str) -> Path:
    if which not in ("best", "last"):
        return Path(which)
    ckpts = run_dir / "checkpoints"
    if which == "last":
        return ckpts / "last.ckpt"
    best = [p for p in ckpts.glob("*.ckpt") if p.name != "last.ckpt"]
    if not best:
        raise FileNotFoundError(f"no best checkpoint in {ckpts}")
    return max(best, key=lambda p: p.stat().st_mtime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--ckpt", default="best")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    p.add_argument("--samples", type=int, default=None, help="calibration samples (default: calib.samples)")
    args = p.parse_args()
    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    cfg.ckpt_path = str(checkpoint(args.run_dir, args.ckpt))
    cfg.logger, cfg.callbacks = None, None
    cfg.trainer.enable_progress_bar = False
    if args.samples:
        cfg.calib.samples = args.samples
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    datamodule, module, trainer = build(cfg)
    source = load_weights(cfg, module)
    device = trainer.strategy.root_device
    module.to(device)
    metric = f"test/{cfg.task.metric.name}"

    def score() -> float:
        return float(trainer.test(module, datamodule=datamodule, verbose=False)[0][metric])

    dense_model = module.model
    dense = score()
    module.to(device)
    calibration = calibration_inputs(cfg, datamodule, module)
    print(f"{source}; {metric} dense {dense:.3f}; precision {trainer.precision}; "
          f"calibration {cfg.calib.samples} samples from the train split", flush=True)  # fmt: skip
    table = []
    for ratio in args.ratios:
        for method, update in ROWS:
            for allocation in args.allocations:
                module.model = copy.deepcopy(dense_model).to(device)  # trainer.test leaves it on the CPU
                start = time.perf_counter()
                report = compress_model(
                    module.model, method, ratio, targets=module.targets, exclude=module.exclude,
                    calibration=calibration if method in NEEDS_CALIBRATION or update else None,
                    update=update, allocation=allocation, rank_multiple=cfg.compress.rank_multiple,
                )  # fmt: skip
                seconds = time.perf_counter() - start
                value = score()
                name = method + (" + update" if update else "")
                table.append((ratio, name, allocation, report.achieved_ratio, value, seconds))
                print(f"| {ratio} | {name} | {allocation} | {report.achieved_ratio:.3f} | {value:.3f} | "
                      f"{seconds:.1f} |", flush=True)  # fmt: skip
    module.model = dense_model
    print(f"\n| ratio | method | allocation | removed | {metric} | compress s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| 0 | dense | | 0 | {dense:.3f} | |")
    for ratio, name, allocation, removed, value, seconds in table:
        print(f"| {ratio} | {name} | {allocation} | {removed:.3f} | {value:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
