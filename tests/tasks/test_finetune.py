"""Fine-tuning from a dense checkpoint: `init_from` loads it strictly, then the targeted layers are
converted under the budget — for svd by `compress_model` (whitened, global ranks), the same
conversion as `mode=compress` — and training continues from there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import compose_train

from structlab.train import run

LM = ("model=gpt2_tiny", "task=synthetic_text", "trainer.enable_progress_bar=false", "print_config=false")


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("dense")
    summary = run(compose_train(*LM, "trainer.max_epochs=4", "run_name=dense", output_dir=out))
    return Path(summary["outputs"]["checkpoint"]), summary["test"]["test/ppl"]  # the tested (best) one


def test_finetune_from_dense_with_whitened_global_svd(dense_checkpoint, tmp_path) -> None:
    ckpt, dense_ppl = dense_checkpoint
    layer = ("layer=svd", "layer.budget=0.5", "layer.method=whitened_svd", "layer.allocation=global")
    tuned = run(compose_train(*LM, *layer, f"init_from={ckpt}", "trainer.max_epochs=1", "run_name=ft",
                              output_dir=tmp_path / "ft"))  # fmt: skip
    scratch = run(
        compose_train(*LM, *layer, "trainer.max_epochs=1", "run_name=scratch", output_dir=tmp_path / "s")
    )
    assert tuned["cost"]["budget (structured MACs / dense)"] <= 0.5
    # the summary shows the dense checkpoint's test metric beside the structured model's
    assert tuned["test"]["test/ppl (dense init_from)"] == pytest.approx(dense_ppl, rel=1e-5)
    # and the converted model's validation metric before fine-tuning, which the epoch then improves on
    converted = tuned["test"]["val/ppl (converted, before fine-tuning)"]
    assert tuned["test"]["test/ppl"] < converted
    # one epoch from the dense checkpoint is close to it; the same epoch from a random init is not
    assert tuned["test"]["test/ppl"] < 1.3 * dense_ppl < scratch["test"]["test/ppl"]


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (("init_from=/nonexistent/last.ckpt",), FileNotFoundError, "no such file"),
        (("init_from=CKPT", "model.n_embd=32"), ValueError, "does not fit this model"),
        (("init_from=CKPT", "layer=gblr", "+layer.method=whitened_svd"), ValueError, "need layer=svd"),
    ],
)
def test_bad_init_from_stops_before_training(dense_checkpoint, tmp_path, overrides, error, message) -> None:
    ckpt, _ = dense_checkpoint
    args = [o.replace("CKPT", str(ckpt)) for o in overrides]
    with pytest.raises(error, match=message):
        run(compose_train(*LM, "layer=svd", *args, "trainer.max_epochs=1", output_dir=tmp_path))


def test_conversion_runs_on_the_cpu_default_device_under_another(tmp_path) -> None:
    """Lightning converts inside a default-device context (the GPU's): the conversion's host-side
    tensors (gblr's search constants, the calibration loader's order) must still be CPU tensors."""
    from structlab.train import build

    _, module, _ = build(compose_train(*LM, "layer=gblr", "layer.budget=0.5", output_dir=tmp_path))
    with torch.device("meta"):  # stands in for the GPU: any default device other than the CPU
        module.convert()
    assert module.structured and module.conversions == 1
    assert all(p.device.type == "cpu" for p in module.parameters())
