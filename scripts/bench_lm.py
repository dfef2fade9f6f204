"""Prefill and decode speed of GPT-2 (HF transformers), dense and compressed, in one process.

Every model is measured in the same run on the same GPU: prefill tokens/s (batch × seq prompt tokens
in one forward as `generate` runs it: the KV cache filled, logits of the last position only), the
full-logits forward tokens/s (the training / perplexity forward: every position's 50k logits, no
cache), decode tokens/s (greedy generation with the KV cache), weight bytes and peak
memory. Compressed = `compress_model` at `--ratio` of the block linears' parameters removed, uniform
ranks (the ranks, hence the speed, are the same for svd, asvd, whitened_svd and falor); int8 rows use
torchao on the compressed factors or on the dense block linears. Random weights (speed only).

    python scripts/bench_lm.py                          # GPT-2 124M, bf16, 16 × 1024, ratio 0.4
    python scripts/bench_lm.py --model gpt2_medium --ratio 0.2 --compile
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from structlab.bench.timing import median_ms  # noqa: E402
from structlab.budget import stored_bytes  # noqa: E402
from structlab.compress import compress_model, quantize_model  # noqa: E402
from structlab.models import build_model  # noqa: E402
from structlab.surgery import find_targets  # noqa: E402

TARGETS = ["transformer.h.*.attn.c_attn", "transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"]  # fmt: skip


def measure(label: str, model: torch.nn.Module, args: argparse.Namespace) -> dict:
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    prompt = ids[:, : args.prompt]
    forward = torch.compile(model, mode=args.compile) if args.compile else model

    def prefill() -> None:  # what generate runs before its first token
        with torch.no_grad():
            forward(input_ids=ids, use_cache=True, logits_to_keep=1)

    def full_forward() -> None:
        with torch.no_grad():
            forward(input_ids=ids, use_cache=False)

    def decode() -> None:
        with torch.no_grad():
            model.generate(
                prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0
            )

    torch.cuda.reset_peak_memory_stats()
    prefill_ms = median_ms(prefill, warmup=3, iters=args.repeats)
    peak = torch.cuda.max_memory_allocated()
    full_ms = median_ms(full_forward, warmup=3, iters=args.repeats)
    decode_ms = median_ms(decode, warmup=1, iters=max(3, args.repeats // 3))
    row = {
        "model": label,
        "prefill tok/s": args.batch * args.seq / prefill_ms * 1e3,
        "full forward tok/s": args.batch * args.seq / full_ms * 1e3,
        "decode tok/s": args.batch * args.new / decode_ms * 1e3,
        "weights MB": stored_bytes(model) / 2**20,
        "peak MB (prefill)": peak / 2**20,
    }
    print(
        "  ".join(f"{k}: {v:,.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()),
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=128, help="decode: prompt tokens")
    p.add_argument("--new", type=int, default=128, help="decode: generated tokens")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="torch.compile the prefill and full forwards (mode: default, max-autotune, ...)",
    )
    p.add_argument("--rank-multiple", type=int, default=8, help="ranks rounded down to a multiple")
    p.add_argument(
        "--int8",
        nargs="*",
        default=["int8", "int8_dynamic"],
        choices=["int8", "int8_dynamic"],
        help="torchao schemes measured on both models (none given: no int8 rows)",
    )
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, bf16, prefill {args.batch}×{args.seq}, decode {args.batch}×"
          f"({args.prompt} + {args.new}), {f'compiled ({args.compile})' if args.compile else 'eager'}", flush=True)  # fmt: skip
    dense = build_model(args.model).to("cuda", torch.bfloat16)
    small = copy.deepcopy(dense)
    report = compress_model(small, "svd", args.ratio, targets=TARGETS, rank_multiple=args.rank_multiple)
    print(f"compressed: {report.achieved_ratio:.3f} of the block linears' parameters removed", flush=True)
    rows = [measure("dense", dense, args), measure(f"compressed {args.ratio:.0%}", small, args)]
    if args.int8:
        names = find_targets(dense, TARGETS)
        for scheme in args.int8:
            for label, base in (("dense", dense), (f"compressed {args.ratio:.0%}", small)):
                q = copy.deepcopy(base)
                quantize_model(q, scheme, names)
                rows.append(measure(f"{label} + {scheme}", q, args))
    base = rows[0]
    speeds = ("prefill tok/s", "full forward tok/s", "decode tok/s")
    print(
        "\n| model | " + " | ".join(f"{k} | × dense" for k in speeds) + " | weights MB | peak MB (prefill) |"
    )
    print("| --- " * (2 * len(speeds) + 3) + "|")
    for r in rows:
        cells = [f"{r[k]:,.0f} | {r[k] / base[k]:.2f}" for k in speeds]
        print(
            f"| {r['model']} | "
            + " | ".join(cells)
            + f" | {r['weights MB']:,.0f} | {r['peak MB (prefill)']:,.0f} |"
        )


if __name__ == "__main__":
    main()
