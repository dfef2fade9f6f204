"""GPU runs of the real pipeline (skipped without CUDA): bf16 training, compile, and synthetic data on device."""

from __future__ import annotations

import json

import pytest
from support import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.parametrize("compile", [False, True])
def test_gpu_bf16_training(tmp_path, compile):
    result = run_cli(
        "experiment=synthetic/vit_b16-dense",
        "model=vit_tiny",
        f"paths.log_dir={tmp_path}",
        "run_name=gpu",
        "task.data.batch_size=32",
        "task.data.steps_per_epoch=12",
        f"compile={compile}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "gpu" / "summary.json").read_text())
    assert summary["run"]["precision"] == "bf16-mixed" and summary["speed"]["epochs / steps"] == "1 / 12"
    assert summary["speed"]["train samples/s"] > 500


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
