"""Time the conversion (fit) of timm ViT-B/16's 48 block linears to gblr layers, as a new run does it
(`replace_layers(..., init="dense")` with the model on the training device), and report the relative
Frobenius fit error per layer type; then the time of one budget projection over all converted layers
(what GBLRBudget runs after every optimizer step). Random-init weights (no download).

    python scripts/bench_gblr_convert.py                                  # CUDA, all 48 layers
    python scripts/bench_gblr_convert.py --device cpu --layers 1 --fit-steps 20   # a quick check
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from structlab import surgery  # noqa: E402
from structlab.layers import gblr_fit  # noqa: E402
from structlab.layers.gblr import project_widths  # noqa: E402
from structlab.surgery import find_targets, replace_layers  # noqa: E402

TARGETS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]


def synced_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=None, help="convert only the first N targeted layers")
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--matmul-precision", default="high", help="as configs/train.yaml sets it (TF32)")
    args = p.parse_args()
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).to(device)
    names = find_targets(model, TARGETS)[: args.layers]
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in names}

    plan_seconds, plan_all = [], surgery._plan_all

    def timed_plan_all(*a: object) -> dict:  # the block-structure search, in host threads
        start = time.perf_counter()
        plans = plan_all(*a)
        plan_seconds.append(time.perf_counter() - start)
        return plans

    surgery._plan_all = timed_plan_all
    start = synced_time(device)
    patterns = [re.escape(n) for n in names]
    replace_layers(model, "gblr", patterns, init="dense", budget=args.budget, fit_steps=args.fit_steps)
    total = synced_time(device) - start
    print(
        f"{device}: {len(names)} layers, {args.fit_steps} fit steps: {total:.1f} s, {total / len(names):.2f} s a layer"
    )
    print(
        f"  planning the block structure ({len(os.sched_getaffinity(0))} host threads): {plan_seconds[0]:.1f} s"
    )
    print(f"  installing it and the fit steps, layer by layer: {total - plan_seconds[0]:.1f} s")

    errors = defaultdict(list)
    with torch.no_grad():
        for n, w in dense.items():
            fitted = model.get_submodule(n).dense_weight()
            errors[n.rsplit(".", 1)[-1]].append(float((fitted - w).norm() / w.norm()))
    for kind, errs in errors.items():
        print(f"  {kind}: relative Frobenius error {sum(errs) / len(errs):.4f} (mean of {len(errs)})")

    layers = [model.get_submodule(n) for n in names]
    projection = gblr_fit.WidthProjection(layers)
    for label, project in (
        ("eager", lambda: project_widths(layers, args.budget)),
        ("WidthProjection (a CUDA graph on a GPU)", lambda: projection(args.budget)),
    ):
        for _ in range(3):  # warm-up (the first call builds the per-column constants, or the graph)
            project()
        start, calls = synced_time(device), 20
        for _ in range(calls):
            project()
        ms = (synced_time(device) - start) / calls * 1e3
        print(f"  one budget projection over the {len(layers)} layers, {label}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
