"""GPU runs of the real pipeline (skipped without CUDA): bf16 training, compile, and synthetic data on device."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from support import ROOT, fused_vs_composed_gblr, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.parametrize("compile", [False, True])
def test_gpu_bf16_training_keeps_up_with_a_plain_loop(tmp_path, compile):
    """run.py (Lightning, the benchmark experiment) against a bare PyTorch loop over the same timm model, batch
    and precision, in the same test: the framework may cost some host time per step, not a lot."""
    steps = 20
    result = run_cli(
        "experiment=synthetic/vit_b16-dense",
        "model=vit_small",
        f"paths.log_dir={tmp_path}",
        "run_name=gpu",
        "task.data.batch_size=128",
        f"task.data.steps_per_epoch={steps + 5}",
        f"compile={compile}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "gpu" / "summary.json").read_text())
    assert (
        summary["run"]["precision"] == "bf16-mixed"
        and summary["speed"]["epochs / steps"] == f"1 / {steps + 5}"
    )
    plain = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plain_timm_loop.py"), "--model", "vit_small_patch16_224"]
        + ["--batch", "128", "--steps", str(steps)]
        + (["--compile"] if compile else []),
        capture_output=True,
        text=True,
        check=True,
    )
    baseline = float(re.search(r"([\d.]+) img/s", plain.stdout).group(1))
    # H100, 2026-12-07: eager passed 0.8; compiled measured 0.71 (4,190 against 5,871 img/s: the
    # per-step host work of Lightning and the metrics weighs more next to a compiled step), so the
    # compiled bar guards against regressions below that, not the gap itself (docs/benchmarks.md)
    floor = 0.65 if compile else 0.8
    assert summary["speed"]["train samples/s"] >= floor * baseline, (summary["speed"], baseline)


def test_gpu_fashion_mnist_learns(tmp_path):
    result = run_cli(
        "trainer=gpu",
        "trainer.max_epochs=2",
        f"paths.log_dir={tmp_path}",
        "run_name=fm",
        "trainer.enable_progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "fm" / "summary.json").read_text())
    assert summary["test"]["test/acc"] > 0.8


@pytest.mark.parametrize(
    "layer",
    [("layer=svd", "layer.budget=0.5", "layer.method=whitened_svd", "layer.allocation=global"),
     ("layer=gblr", "layer.budget=0.5")],
    ids=["whitened_svd", "gblr"],
)  # fmt: skip
def test_gpu_finetune_converts_on_the_gpu(tmp_path, layer):
    """init_from: Lightning converts inside its GPU default-device context, where host-side tensors
    once failed (the calibration loader's CPU generator, gblr's pinned search constants)."""
    common = ("trainer=gpu", "model=gpt2_tiny", "task=synthetic_text", "compress.after_training=false",
              f"paths.log_dir={tmp_path}", "trainer.enable_progress_bar=false", "trainer.max_epochs=1")  # fmt: skip
    dense = run_cli(*common, "run_name=dense")
    assert dense.returncode == 0, dense.stderr[-4000:]
    ckpt = json.loads((tmp_path / "runs" / "dense" / "summary.json").read_text())["outputs"]["checkpoint"]
    tuned = run_cli(*common, *layer, f"init_from={ckpt}", "run_name=ft")
    assert tuned.returncode == 0, tuned.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "ft" / "summary.json").read_text())
    assert summary["test"]["test/ppl"] < summary["test"]["val/ppl (converted, before fine-tuning)"] * 1.5


def test_gpu_gblr_fused_path_matches_composed_and_graphs():
    """On CUDA the fused sharp-box node (with its compiled spectral kernel) equals the op-by-op path
    in float32, and a whole training step can be captured in a CUDA graph and replayed."""
    import torch

    from structlab.layers import make_layer

    torch.manual_seed(0)
    layer = make_layer("gblr", 96, 160, budget=0.5).cuda()
    with torch.no_grad():
        layer.locations.add_(torch.rand_like(layer.locations) * 0.3)
    x = torch.randn(4000, 96, device="cuda", requires_grad=True)
    g = torch.randn(4000, 160, device="cuda")
    for name, (a, b) in fused_vs_composed_gblr(layer, x, g).items():
        assert float((a - b).norm() / b.norm()) < 1e-4, name

    fresh = make_layer("gblr", 96, 160, budget=0.5).cuda()  # the capture recipe of bench_layers.py --graphs
    xg = torch.randn(4000, 96, device="cuda", requires_grad=True)

    def step():
        fresh.zero_grad(set_to_none=True)
        xg.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = fresh(xg)
        y.backward(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(fresh.widths.grad).all() and fresh.U.grad.abs().sum() > 0


def test_gpu_gblr_export_kernels():
    """The exported gblr layer's Triton kernels equal x Wᵀ + b on CUDA: float32 (IEEE dots) and bf16,
    several block/tile shapes, a token count that is not a tile multiple, wrapped intervals."""
    import torch

    from structlab.layers import block_gemm, make_layer

    torch.manual_seed(0)
    layer = make_layer("gblr", 768, 3072, budget=0.25).cuda().eval()
    with torch.no_grad():
        layer.locations.add_(torch.rand_like(layer.locations) * 0.3)
        x = torch.randn(1001, 768, device="cuda")
        ref = x @ layer.dense_weight().T + layer.bias
        for block, tile in ((64, 128), (32, 64), (64, 64)):
            exported = layer.export(block=block, tile=tile, max_cost=float("inf"))
            assert not exported.dense
            assert float((exported(x) - ref).norm() / ref.norm()) < 1e-5
            y16 = exported.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
            assert float((y16 - ref).norm() / ref.norm()) < 1e-2
    assert not block_gemm._KERNELS_FAILED  # the Triton kernels ran, not the torch fallback


def test_gpu_gblr_compiled_training(tmp_path):
    result = run_cli(
        "experiment=synthetic/vit_b16-dense",
        "model=vit_tiny",
        "layer=gblr",
        "layer.budget=0.5",
        "layer.init=scratch",
        f"paths.log_dir={tmp_path}",
        "run_name=gpu_gblr",
        "task.data.batch_size=32",
        "task.data.steps_per_epoch=12",
        "compile=true",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "gpu_gblr" / "summary.json").read_text())
    assert summary["speed"]["epochs / steps"] == "1 / 12"


def test_gpu_gblr_mask_gradient_runs_the_compiled_kernel():
    """On CUDA the analytic mask gradient of an eager training step runs through the compiled spectral
    kernel, not the eager fallback (which only build failures of torch.compile may select)."""
    import torch

    from structlab.layers import gaudi, make_layer

    torch.manual_seed(0)
    layer = make_layer("gblr", 96, 160, budget=0.5).cuda()
    runs = gaudi._COMPILED_RUNS[0]
    layer(torch.randn(4000, 96, device="cuda")).square().mean().backward()
    assert not gaudi._COMPILE_FAILED and gaudi._COMPILED_RUNS[0] > runs
    assert torch.isfinite(layer.widths.grad).all() and layer.locations.grad.abs().sum() > 0
