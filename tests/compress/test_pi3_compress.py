"""SVD-π3: π3's layers compressed by the same `mode=compress` path as GPT-2's, with multi-view
calibration scenes from the depth task's train split, saved, reloaded and scored again."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from support import ROOT, compose_train

from structlab import load_compressed
from structlab.compress.stages import block_layout, capture_inputs, run_block
from structlab.models import build_model
from structlab.surgery import find_targets
from structlab.train import build, run

TARGETS = list(OmegaConf.load(ROOT / "configs" / "model" / "pi3_tiny.yaml").targets)
# four views per scene (calibration and evaluation), 28×28, a handful of scenes
SCENES = ("task=depth", "model=pi3_tiny", "task.data.num_views=4", "task.data.height=28", "task.data.width=28",
          "task.data.batch_size=2", "task.data.train_size=8", "task.data.val_size=2", "task.data.test_size=4",
          "print_config=false", "trainer.enable_progress_bar=false")  # fmt: skip


@pytest.mark.parametrize("part", ["encoder.blocks", "decoder"])
def test_pi3_block_stacks_chain_as_calibration_streams_them(part) -> None:
    """Block-by-block calibration feeds each block the previous block's output: that must be what the
    model computes, also across the decoder's alternating frame / global attention."""
    torch.manual_seed(0)
    model = build_model("pi3_tiny").eval()
    imgs = torch.rand(2, 3, 3, 28, 28)
    layout = block_layout(model, [n for n in find_targets(model, TARGETS) if n.startswith(part + ".")])
    assert layout.container == part and len(layout.blocks) == 2
    seen = {}
    last = model.get_submodule(layout.blocks[-1])
    handle = last.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    with torch.no_grad():
        model(imgs)
        handle.remove()
        inputs = capture_inputs(model, model.get_submodule(layout.blocks[0]), [imgs])
        for name in layout.blocks:
            inputs = run_block(model.get_submodule(name), inputs)
    torch.testing.assert_close(inputs[0].args[0], seen["out"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_svd_pi3_through_mode_compress_reloads_to_the_same_depth_metrics(tmp_path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "pi3_tiny.safetensors"  # stands in for the official model.safetensors
    save_file(build_model("pi3_tiny").state_dict(), str(weights))
    overrides = (*SCENES, f"model.ckpt_path={weights}")
    summary = run(compose_train(
        *overrides, "mode=compress", "compress.method=whitened_svd", "compress.ratio=0.5",
        "compress.rank_multiple=1", "calib.samples=4", output_dir=tmp_path / "run",
    ))  # fmt: skip
    test = summary["test"]
    dense, small = test["test/abs_rel dense"], test["test/abs_rel compressed"]
    assert 0 < dense and 0 < small and dense != small
    assert summary["compression"]["calibration"] == "4 samples from the train split"
    assert summary["compression"]["weights"] == f"weights {weights}"
    assert 0.49 <= float(summary["compression"]["ratio (parameters removed)"].split()[0]) <= 0.5
    assert summary["cost"]["structured layers"] == 28
    speed = summary["speed"]
    assert (
        speed["forward ms per test batch: dense"] > 0 and speed["forward ms per test batch: compressed"] > 0
    )
    # a fresh π3 + the saved folder, scored on the same test scenes: the same metric
    datamodule, module, trainer = build(compose_train(*overrides, output_dir=tmp_path / "eval"))
    module.model = load_compressed(build_model("pi3_tiny"), tmp_path / "run" / "compressed")
    (result,) = trainer.test(module, datamodule=datamodule, verbose=False)
    assert result["test/abs_rel"] == pytest.approx(small, rel=1e-5)


def test_benchmark_script_reports_dense_and_compressed_pi3() -> None:
    """scripts/benchmark.py end to end on the CPU (the GPU figures in docs/benchmarks.md come from it)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "pi3_tiny", "--inputs", "2x28x28",
         "--device", "cpu", "--warmup", "1", "--iters", "2", "--rank-multiple", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| dense", "| svd"))]
    assert rows[0][0] == "| dense" and rows[1][0].startswith("| svd") and rows[1][0].endswith("removed")
    dense_macs, small_macs = (float(r[-1].rstrip(" |")) for r in rows)
    assert 0 < small_macs < dense_macs
