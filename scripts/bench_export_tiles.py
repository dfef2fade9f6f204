"""Launch-shape sweep for the exported gblr layer's Triton kernels (structlab/layers/block_gemm.py).

    python scripts/bench_export_tiles.py      # GPU only; 128×197 tokens, bf16, CUDA graphs

For each shape of bench_layers.py and each plan (block, tile) it prints the plan's MACs / dense, the
error against x Wᵀ + b, and the fastest launch shapes (token tile, warps, stages) against nn.Linear
timed in the same process, then the time of each stage for the best one.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_layers import SHAPES, forward, graphed, timed  # noqa: E402

from structlab.layers import block_gemm, make_layer  # noqa: E402

PLANS = [(32, 64), (64, 64), (64, 128)]  # (block, tile)
LAUNCHES = list(itertools.product((64, 128), (4, 8), (3, 4)))  # (token tile, warps, stages)


def ms(fn) -> float:  # noqa: ANN001
    dev = torch.device("cuda")
    return timed(graphed(fn, dev), dev, 3, 20)["median"]


def main() -> None:
    dev, amp = torch.device("cuda"), torch.bfloat16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for n_in, n_out in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(128 * 197, n_in, device=dev).to(amp)
        dense = ms(forward(torch.nn.Linear(n_in, n_out).to(dev, amp), x))
        layer = make_layer("gblr", n_in, n_out, budget=0.25).to(dev).eval()
        with torch.no_grad():
            ref = x.float() @ layer.dense_weight().T + layer.bias
        results = []
        for block, tile in PLANS:
            exported = layer.export(block=block, tile=tile, max_cost=float("inf")).to(amp)
            with torch.no_grad():
                err = float((exported(x).float() - ref).norm() / ref.norm())
            print(
                f"{n_in}→{n_out} plan {block}/{tile}: MACs {exported.plan_macs / (n_in * n_out):.3f} of dense, bf16 error {err:.1e}"
            )
            for launch in LAUNCHES:
                block_gemm.TOKEN_TILE, block_gemm.NUM_WARPS, block_gemm.NUM_STAGES = launch
                results.append((ms(forward(exported, x)), (block, tile), launch, exported))
        results.sort(key=lambda r: r[0])
        print(
            f"{n_in}→{n_out}: nn.Linear {dense:.4f} ms; fastest (plan block/tile, token tile/warps/stages):"
        )
        for t, plan, launch, _ in results[:4]:
            print(f"    {t:.4f} ms = {t / dense:.2f}× dense   {plan} {launch}")
        _, _, launch, e = results[0]
        block_gemm.TOKEN_TILE, block_gemm.NUM_WARPS, block_gemm.NUM_STAGES = launch
        zt = block_gemm.blocks_in(x, e.blocks_in, e.ptr_in, e.idx_in)
        t_in = ms(lambda: block_gemm.blocks_in(x, e.blocks_in, e.ptr_in, e.idx_in))  # noqa: B023
        t_out = ms(lambda: block_gemm.blocks_out(zt, e.blocks_out, e.ptr_out, e.idx_out, e.bias))  # noqa: B023
        print(f"    stage in {t_in:.4f} ms, stage out {t_out:.4f} ms")


if __name__ == "__main__":
    main()
