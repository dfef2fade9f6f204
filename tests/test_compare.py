"""scripts/compare.py: dense and a structured layer on one task, skipping finished runs, one table and plot."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from support import ROOT

pytestmark = pytest.mark.slow


def compare(fmnist_dir, logs, *args: str) -> subprocess.CompletedProcess:
    extra = [f"paths.data_dir={fmnist_dir}", "task.data.val_size=200", "task.data.system_dir=null",
             "task.data.download=false", "debug=limit", "trainer.enable_progress_bar=false"]  # fmt: skip
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare.py"), "--log-dir", str(logs), "--layers", "svd",
         "--budgets", "0.3", *args, "--extra", *extra],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def test_compare_trains_once_and_writes_table_and_plot(fmnist_dir, tmp_path) -> None:
    first = compare(fmnist_dir, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(tmp_path / "cmp-fashion_mnist-vit_p7.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["dense", "svd"]
    assert float(rows[1]["macs ratio (structured layers)"]) <= 0.3 + 0.005
    assert int(rows[1]["parameters (as trained)"]) < int(rows[0]["parameters (as trained)"])
    assert (tmp_path / "cmp-fashion_mnist-vit_p7.png").stat().st_size > 1000
    assert "| svd | 0.3000 |" in (tmp_path / "cmp-fashion_mnist-vit_p7.md").read_text()
    again = compare(fmnist_dir, tmp_path, "--finetune")  # dense is reused; the fine-tune starts from it
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done already: cmp-fashion_mnist-vit_p7-dense" in again.stdout
    with open(tmp_path / "cmp-fashion_mnist-vit_p7-ft.csv") as f:
        tuned = list(csv.DictReader(f))[1]
    assert tuned["layer"] == "svd-ft" and float(tuned["dense init"]) == pytest.approx(
        float(rows[0]["test/acc"])
    )


def test_layer_variants_parse_into_type_label_and_overrides() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "compare.py")
    compare_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_script)
    parse = compare_script.parse_layer
    assert parse("gblr") == ("gblr", "gblr", [])
    assert parse("svd:plain:layer.method=svd,layer.allocation=uniform") == (
        "svd", "svd-plain", ["layer.method=svd", "layer.allocation=uniform"]
    )  # fmt: skip
    with pytest.raises(SystemExit, match="LAYER:LABEL:OVERRIDES"):
        parse("svd:layer.method=svd")
