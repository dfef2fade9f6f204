"""Forward speed of a dense π3 and its SVD-compressed form, measured in one process.

For each input (frames × height × width), both models report:
- forward ms: the median of `--iters` CUDA-event timings after `--warmup` calls; on the CPU, the
  wall clock;
- frames/s and the first (cold) call;
- peak memory, parameters and MACs per forward.

Weights are float32 and the forward runs under bf16 autocast, as the official code runs it. They are
a seeded random init, or the official `model.safetensors` with `--ckpt-path`: speed does not depend
on the values, but a random matrix has a flat spectrum, so compressing it says nothing about
accuracy. The compressed model is `compress_model(method, ratio)` on the config's targets, then
`export_model`.

    python scripts/benchmark.py                                  # pi3, 11×364×700 and 8×224×224, keep 50%
    python scripts/benchmark.py --compile --ratio 0.2 0.5
    python scripts/benchmark.py --model pi3_tiny --inputs 2x28x28 --device cpu --iters 2   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from structlab.bench.timing import median_ms_on  # noqa: E402
from structlab.budget import macs_per_sample  # noqa: E402
from structlab.compress import compress_model  # noqa: E402
from structlab.models import build_model  # noqa: E402
from structlab.surgery import export_model  # noqa: E402


def parse_input(spec: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--inputs takes FRAMESxHEIGHTxWIDTH, e.g. 11x364x700 (got {spec!r})") from None
    return frames, height, width


def measure(label: str, model: torch.nn.Module, imgs: torch.Tensor, args: argparse.Namespace) -> dict:
    device = imgs.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.float32)

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(imgs)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    forward()  # the first call: kernel selection (and compilation, with --compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    cold = time.perf_counter() - start
    ms = median_ms_on(device, forward, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    frames = imgs.shape[1]
    row = {
        "model": label,
        "input": "×".join(map(str, imgs.shape[1:2] + imgs.shape[3:])),
        "ms": ms,
        "frames/s": frames * 1e3 / ms,
        "cold s": cold,
        "peak GiB": peak,
        "params M": sum(p.numel() for p in model.parameters()) / 1e6,
        "GMACs": args.macs[label] / 1e9,
    }
    print(
        "  ".join(f"{k}: {v:,.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()),
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pi3", help="pi3 | pi3_small | pi3_tiny (configs/model/<name>.yaml)")
    p.add_argument("--inputs", nargs="+", default=["11x364x700", "8x224x224"], help="FRAMESxHEIGHTxWIDTH")
    p.add_argument(
        "--ratio", type=float, nargs="*", default=[0.5], help="fractions of the targets' parameters removed"
    )
    p.add_argument("--method", default="svd", help="compress_model method (data-free: svd, tsvd)")
    p.add_argument("--rank-multiple", type=int, default=64, help="ranks rounded down to a multiple")
    p.add_argument(
        "--ckpt-path", default=None, help="weights (the official model.safetensors); default: random"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--fuse-qk", action="store_true", help="π3's compiled QK-norm + RoPE (CUDA)")
    p.add_argument("--float32", action="store_true", help="no bf16 autocast")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{args.model}.yaml"))
    targets, exclude = cfg.pop("targets"), cfg.pop("exclude")
    name = cfg.pop("name")
    cfg.update(ckpt_path=args.ckpt_path, fuse_qk=args.fuse_qk)
    torch.manual_seed(0)
    dense = build_model(name, **cfg).to(device).eval()
    models = {"dense": dense}
    for ratio in args.ratio:
        small = copy.deepcopy(dense)
        report = compress_model(
            small, args.method, ratio, targets=targets, exclude=exclude, rank_multiple=args.rank_multiple
        )
        label = f"{args.method} {report.achieved_ratio:.0%} removed"
        models[label] = export_model(small).eval()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, {'float32' if args.float32 else 'bf16 autocast'}, "
          f"{'compiled' if args.compile else 'eager'}, weights: {args.ckpt_path or 'random (seed 0)'}", flush=True)  # fmt: skip
    rows = []
    for spec in args.inputs:
        frames, height, width = parse_input(spec)
        imgs = torch.rand(1, frames, 3, height, width, device=device)
        with torch.device("meta"):
            shapes = {label: copy.deepcopy(m).to("meta") for label, m in models.items()}
        args.macs = {label: macs_per_sample(m, imgs.to("meta")) for label, m in shapes.items()}
        for label, model in models.items():
            rows.append(measure(label, torch.compile(model) if args.compile else model, imgs, args))
    base = {r["input"]: r["ms"] for r in rows if r["model"] == "dense"}
    print(
        "\n| model | input (frames×H×W) | ms | × dense | frames/s | first call s | peak GiB | params M | GMACs |"
    )
    print("| --- " * 9 + "|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['ms']:.1f} | {base[r['input']] / r['ms']:.2f} | "
              f"{r['frames/s']:.1f} | {r['cold s']:.2f} | {r['peak GiB']:.2f} | {r['params M']:.1f} | {r['GMACs']:,.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
