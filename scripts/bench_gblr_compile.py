"""gblr training step (fwd+bwd, bf16 autocast, 128×197 tokens) eager and under torch.compile, against
nn.Linear eager and compiled, same process, CUDA events (median of 20 after 5 warm-up calls).

    python scripts/bench_gblr_compile.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from structlab.bench.timing import median_ms  # noqa: E402
from structlab.layers import make_layer  # noqa: E402

TOKENS = 128 * 197


def train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(grad)

    return step


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {TOKENS} tokens")
    print("| shape | layer | eager ms | compiled ms | eager / dense eager | compiled / dense eager |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n_in, n_out in [(768, 3072), (3072, 768), (768, 768)]:
        x = torch.randn(TOKENS, n_in, device="cuda", requires_grad=True)
        grad = torch.randn(TOKENS, n_out, device="cuda")
        cases = {
            "dense": lambda i=n_in, o=n_out: nn.Linear(i, o),
            "gblr β=1.0": lambda i=n_in, o=n_out: make_layer("gblr", i, o, budget=1.0),
            "gblr β=0.25": lambda i=n_in, o=n_out: make_layer("gblr", i, o, budget=0.25),
        }
        base = None
        for name, build in cases.items():
            eager = median_ms(train_step(build().cuda(), x, grad))
            compiled = median_ms(train_step(torch.compile(build().cuda()), x, grad))
            base = base or eager
            print(
                f"| {n_in}→{n_out} | {name} | {eager:.3f} | {compiled:.3f} | {eager / base:.2f}× | {compiled / base:.2f}× |"
            )


if __name__ == "__main__":
    main()
