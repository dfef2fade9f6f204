"""The baseline for run.py's throughput: a bare PyTorch training loop over timm's ViT-B/16 (bf16
autocast, fused AdamW, one random batch kept on the GPU). Prints img/s over the timed steps.

    python scripts/plain_timm_loop.py [--batch 256] [--steps 40] [--compile]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    model = timm.create_model(args.model, num_classes=1000).cuda().train()
    if args.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (args.batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mode = "compiled" if args.compile else "eager"
    print(f"plain timm loop {mode}: {args.batch * args.steps / seconds:.1f} img/s")


if __name__ == "__main__":
    main()
