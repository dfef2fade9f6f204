"""`run.py mode=compress` end to end, in subprocesses: train a small GPT-2, compress it, reload it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from support import run_cli

from structlab import load_compressed
from structlab.models import build_model

pytestmark = pytest.mark.slow
LM = ["task=synthetic_text", "model=gpt2_tiny", "trainer.enable_progress_bar=false", "print_config=false"]


def ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("train")
    ok(run_cli(*LM, "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"))
    return run_dir / "checkpoints" / "last.ckpt"


def test_compress_reports_before_and_after_and_saves_a_reloadable_model(checkpoint, tmp_path) -> None:
    args = ["compress.method=whitened_svd", "compress.update=true", "compress.allocation=global"]
    ok(run_cli(*LM, "mode=compress", f"ckpt_path={checkpoint}", *args, "compress.ratio=0.4",
               "compress.rank_multiple=1", "compress.quantize=int8", "calib.samples=64", f"hydra.run.dir={tmp_path}"))  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    test = summary["test"]
    dense, small, int8 = (test[f"test/ppl {k}"] for k in ("dense", "compressed", "compressed + int8"))
    assert 1 < dense < small < 1.5 * dense and int8 == pytest.approx(small, rel=0.02)
    assert summary["compression"]["method"] == "whitened_svd + update"
    mb = [summary["cost"][f"weights MB: {k}"] for k in ("dense", "compressed", "compressed + int8")]
    assert mb[0] > mb[1] > mb[2]  # int8 counts its int8 data and scales
    info = json.loads((tmp_path / "compressed" / "compression.json").read_text())
    assert info["report"]["achieved_ratio"] == pytest.approx(0.4, abs=0.01) and info["quantize"] == "int8"
    # rebuilt from a fresh instance of the architecture, without the training code: the same ranks
    model = load_compressed(build_model("gpt2_tiny"), tmp_path / "compressed")
    ranks = {r["name"]: r["rank"] for r in info["report"]["layers"]}

    def rank(module: torch.nn.Module) -> int | None:  # int8: a low-rank layer is two Linears, a dense one one
        return module[0].out_features if isinstance(module, torch.nn.Sequential) else None

    assert {n: rank(model.get_submodule(n)) for n in ranks} == ranks
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 256, (2, 16))).logits).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "needs trained weights"),
        (["layer=svd", "ckpt_path=CKPT"], "leave layer=dense"),
        (
            ["compress.method=svd-llm", "ckpt_path=CKPT"],
            "valid methods: svd, asvd, whitened_svd, falor, tsvd",
        ),
        (["compress.ratio=1.0", "ckpt_path=CKPT"], r"\[0, 1\)"),
        (["calib.seq_len=999", "ckpt_path=CKPT"], "longer than the task's windows"),
    ],
)
def test_bad_compress_input_is_a_clear_error(checkpoint, tmp_path, overrides, message) -> None:
    overrides = [o.replace("CKPT", str(checkpoint)) for o in overrides]
    result = run_cli(*LM, "mode=compress", *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert not (tmp_path / "compressed").exists()  # nothing written half-way
