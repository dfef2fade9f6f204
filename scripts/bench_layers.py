"""Layer-level efficiency benchmark (docs/methods.md §6): gblr training step and svd/gblr inference forms
against nn.Linear, and the stored size of tsvd's packed export.

    python scripts/bench_layers.py                       # GPU: 128×197 tokens, bf16 autocast
    python scripts/bench_layers.py --graphs              # every callable replayed from a CUDA graph
    python scripts/bench_layers.py --device cpu --quick  # smoke check (< 30 s)

Every figure is the median (min–max) of ≥ 10 timed calls after ≥ 3 warm-up calls, timed with CUDA
events on a GPU (perf_counter after a synchronize on the CPU); dense and structured layers run in the
same process on the same inputs, and the ratios are structured / dense time. Prints markdown tables.
With --graphs each step (dense and structured alike) is captured once in a CUDA graph and replayed,
as `torch.compile(mode="reduce-overhead")` or a serving stack would run it: that removes the host's
kernel-launch cost and leaves the GPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from structlab.bench import tsvd_reference_matrices  # noqa: E402
from structlab.layers import make_layer  # noqa: E402
from structlab.layers.tsvd import TernaryLinear  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (768, 768)]  # (in, out)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median/min/max milliseconds and peak memory (MiB, GPU only) of `fn`."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "peak_mib": peak}


def train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, amp: torch.dtype) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(x.device.type, dtype=amp, cache_enabled=False):
            y = layer(x)
        y.backward(grad)

    return step


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` captured in a CUDA graph (after warm-up calls on a side stream, as capture requires)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def forward(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Inference as a deployed model runs it: weights and activations already in the compute dtype."""

    @torch.no_grad()
    def run() -> None:
        layer(x)

    return run


def row(
    shape: str, case: str, t: dict[str, float], base: float, macs: int, dense_macs: int, params: int
) -> str:
    return (
        f"| {shape} | {case} | {t['median']:.3f} | {t['min']:.3f}–{t['max']:.3f} | {t['median'] / base:.2f}× "
        f"| {macs / dense_macs:.3f} | {params / 1e6:.2f} | {t['peak_mib']:.0f} |"
    )


def bench_shapes(args: argparse.Namespace, device: torch.device, amp: torch.dtype) -> None:
    header = (
        "| shape (in→out) | case | median ms | min–max ms | vs dense | MACs/dense | params (M) | peak MiB |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    train_rows, infer_rows = [], []

    def measure(fn: Callable[[], object]) -> dict[str, float]:
        return timed(graphed(fn, device) if args.graphs else fn, device, args.warmup, args.iters)

    for n_in, n_out in SHAPES:
        if args.quick:
            n_in, n_out = n_in // 4, n_out // 4
        shape = f"{n_in}→{n_out}"
        torch.manual_seed(0)
        x = torch.randn(args.tokens, n_in, device=device, requires_grad=True)
        grad = torch.randn(args.tokens, n_out, device=device)
        dense = nn.Linear(n_in, n_out).to(device)
        dm, dp = n_in * n_out, sum(p.numel() for p in dense.parameters())
        base = measure(train_step(dense, x, grad, amp))
        train_rows.append(row(shape, "nn.Linear fwd+bwd", base, base["median"], dm, dm, dp))
        for budget in (1.0, 0.25):
            layer = make_layer("gblr", n_in, n_out, budget=budget).to(device)
            t = measure(train_step(layer, x, grad, amp))
            train_rows.append(
                row(
                    shape,
                    f"gblr β={budget} fwd+bwd",
                    t,
                    base["median"],
                    layer.macs_per_token(),
                    dm,
                    layer.num_params(),
                )
            )
        # inference: weights cast once to the compute dtype, activations arrive in it (no autocast casts)
        xi = x.detach().to(amp)
        base_f = measure(forward(dense.to(amp), xi))
        infer_rows.append(row(shape, "nn.Linear fwd", base_f, base_f["median"], dm, dm, dp))
        for name in ("svd", "gblr"):
            layer = make_layer(name, n_in, n_out, budget=0.25).to(device).eval()
            exported = layer.export().to(amp)
            t = measure(forward(exported, xi))
            params = sum(p.numel() for p in exported.parameters()) + sum(
                b.numel() for b in exported.buffers()
            )
            label = f"{name} β=0.25 export fwd"
            if name == "gblr":
                label += f" ({'dense fallback' if exported.dense else f'block-sparse, plan {exported.plan_macs / dm:.3f}'})"
            infer_rows.append(row(shape, label, t, base_f["median"], layer.macs_per_token(), dm, params))
    mode = "CUDA graphs" if args.graphs else "eager"
    print(
        f"\n### Training step (fwd+bwd), {args.tokens} tokens, {amp} autocast, {device}, {mode}\n\n{header}"
    )
    print("\n".join(train_rows))
    print(
        f"\n### Inference forward, {args.tokens} tokens, {amp} weights and inputs, {device}, {mode}\n\n{header}"
    )
    print("\n".join(infer_rows))


def bench_tsvd(args: argparse.Namespace, device: torch.device) -> None:
    ref = tsvd_reference_matrices()
    mats = {"gaussian 256×512": ref["gaussian"], "decay 384×768": ref["decay"]}
    if not args.quick:
        import timm

        vit = timm.create_model("vit_base_patch16_224", pretrained=False)
        mats["ViT-B mlp.fc1 768→3072 (timm init)"] = vit.blocks[0].mlp.fc1.weight.detach().clone()
    print("\n### tsvd packed export at tolerance 0.05 (bytes: 2-bit factors + fp32 scales + bias)\n")
    print(
        "| matrix | rank | nnz(U)+nnz(V) | mul / add per token | export bytes | bf16 dense bytes | ratio | decompose s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, w in mats.items():
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False).to(device)
        with torch.no_grad():
            lin.weight.copy_(w)
        t0 = time.perf_counter()
        layer = TernaryLinear.from_dense(lin, tolerance=0.05)
        secs = time.perf_counter() - t0
        mul, add = layer.mul_add_per_token()
        nbytes, dense_bytes = layer.export().nbytes(), 2 * w.numel()
        print(
            f"| {name} | {layer.rank} | {add} | {mul} / {add} | {nbytes} | {dense_bytes} | {nbytes / dense_bytes:.2f} "
            f"| {secs:.1f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few tokens: a smoke check")
    p.add_argument("--tokens", type=int, default=None, help="tokens per call (default 128×197)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--skip-tsvd", action="store_true")
    p.add_argument("--graphs", action="store_true", help="replay every step from a CUDA graph (GPU only)")
    args = p.parse_args()
    if args.tokens is None:
        args.tokens = 256 if args.quick else 128 * 197
    args.warmup, args.iters = max(3, args.warmup), max(10, args.iters)
    device = torch.device(args.device)
    if args.graphs and device.type != "cuda":
        p.error("--graphs needs a CUDA device")
    amp = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    bench_shapes(args, device, amp)
    if not args.skip_tsvd:
        bench_tsvd(args, device)


if __name__ == "__main__":
    main()
