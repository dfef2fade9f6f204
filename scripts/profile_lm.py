"""Where GPT-2's compiled prefill spends its time, dense and compressed, in one process.

The prefill forward (16 × 1024 tokens, last-position logits, no cache) of the dense model and of
copies compressed at `--ratio` with ranks rounded to each `--rank-multiples` value, compiled with
`--mode`: median ms of 20 after warm-up, and a `torch.profiler` table of the top CUDA kernels for the
dense model and the first compressed one. Random weights (speed only).

    python scripts/profile_lm.py                       # GPT-2 124M, ratio 0.4, multiples 8 64 128
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lm import TARGETS  # noqa: E402

from structlab.bench.timing import median_ms  # noqa: E402
from structlab.compress import compress_model  # noqa: E402
from structlab.models import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--rank-multiples", type=int, nargs="+", default=[8, 64, 128])
    p.add_argument("--mode", default="default", help="torch.compile mode")
    args = p.parse_args()
    torch.manual_seed(0)
    dense = build_model(args.model).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, dense.config.vocab_size, (16, 1024), device="cuda")
    models = {"dense": dense}
    for multiple in args.rank_multiples:
        small = copy.deepcopy(dense)
        report = compress_model(small, "svd", args.ratio, targets=TARGETS, rank_multiple=multiple)
        models[f"ranks × {multiple} ({report.achieved_ratio:.3f} removed)"] = small
    for i, (label, model) in enumerate(models.items()):
        forward = torch.compile(model, mode=args.mode)

        def prefill(forward: torch.nn.Module = forward) -> None:
            with torch.no_grad():
                forward(input_ids=ids, use_cache=False, logits_to_keep=1)

        ms = median_ms(prefill, warmup=3, iters=20)
        print(f"{label} [{args.mode}]: {ms:.3f} ms, {ids.numel() / ms * 1e3:,.0f} tok/s", flush=True)
        if i < 2:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    prefill()
                torch.cuda.synchronize()
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70)
            )


if __name__ == "__main__":
    main()
