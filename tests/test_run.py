"""run.py end to end, in subprocesses, as a user runs it: outputs, resume, eval, DDP, wandb, launcher."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from support import ROOT, run_cli, spawn_cli

from structlab.budget import BudgetSchedule
from structlab.config import run_id

pytestmark = pytest.mark.slow


def common(data: Path, logs: Path) -> list[str]:
    return [
        f"paths.data_dir={data}",
        f"paths.log_dir={logs}",
        "task.data.val_size=200",
        "task.data.system_dir=null",
        "task.data.download=false",
        "debug=limit",
        "trainer.enable_progress_bar=false",
    ]


def metrics(run_dir: Path, version: int = 0) -> list[dict[str, str]]:
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist_dir) -> Path:
    """One 2-epoch run that several tests look at (and resume from)."""
    logs = tmp_path_factory.mktemp("logs")
    ok(run_cli(*common(fmnist_dir, logs), "run_name=base"))
    return logs / "runs" / "base"


def test_run_writes_config_checkpoints_metrics_and_summary(trained):
    config = (trained / "config.yaml").read_text()
    assert "${" not in config and "name: vit_fmnist_p7" in config  # saved resolved
    assert (trained / "checkpoints" / "last.ckpt").is_file() and (trained / "run.log").is_file()
    rows = metrics(trained)
    assert len(column(rows, "val/acc")) == 2 and len(column(rows, "train/loss_step")) == 8
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["run"]["name"] == "base" and summary["speed"]["epochs / steps"] == "2 / 8"
    assert summary["test"]["test/acc"] == pytest.approx(column(rows, "test/acc")[0])
    assert summary["run"]["tested checkpoint"] == "best val/acc (max)"
    assert summary["run"]["validation"].startswith("held out from train (200")
    cost = summary["cost"]
    assert cost["parameters: dense"] == cost["parameters: deployed"] == 306_826
    assert summary["speed"]["train samples/s"] > 0
    # ViT, 7×7 patches of 28×28: 16 patches + class token, width 96, MLP 192, 4 blocks, 10 classes
    tokens, d, h = 17, 96, 192
    block = tokens * (d * 3 * d + d * d + 2 * d * h) + 2 * tokens * tokens * d  # linears + QKᵀ and AV
    macs = 16 * 49 * d + 4 * block + d * 10
    assert cost["MACs per sample: dense"] == cost["MACs per sample: deployed"] == macs


def shapes(structure: dict) -> list[tuple[int, int]]:
    """(in, out) of the default ViT's block linears, by name."""
    d, h = 96, 192
    kinds = {"attn.qkv": (d, 3 * d), "attn.proj": (d, d), "mlp.fc1": (d, h), "mlp.fc2": (h, d)}
    return [kinds[name.split(".", 2)[2]] for name in structure]


def test_default_run_also_reports_its_model_compressed(trained):
    """The default experiment compresses the tested weights to β = 0.3 without training (whitened SVD,
    global ranks) and reports accuracy, parameters and MACs beside the dense ones."""
    summary = json.loads((trained / "summary.json").read_text())
    c, cost = summary["compression"], summary["cost"]
    assert c["method"] == "whitened_svd" and c["allocation"] == "global"
    assert 0.29 <= c["budget reached (MACs / dense)"] <= 0.3
    assert cost["budget (structured MACs / dense): compressed"] == c["budget reached (MACs / dense)"]
    before, after = (int(v.replace(",", "")) for v in c["parameters of the targets"].split(" → "))
    assert before == 294_912 and cost["parameters: compressed"] == 306_826 - before + after
    assert 0.0 < summary["test"]["test/acc compressed"] <= 1.0
    structure = json.loads((trained / "compressed" / "structure.json").read_text())
    assert len(structure) == 16 and {v["layer"] for v in structure.values()} == {"svd"}
    assert (
        sum(v["rank"] * (f + o) for v, (f, o) in zip(structure.values(), shapes(structure), strict=True))
        == after
    )


def test_resume_continues_from_last_checkpoint(trained, fmnist_dir):
    logs = trained.parents[1]
    again = run_cli(*common(fmnist_dir, logs), "run_name=base")  # without resume=true: refuse, lose nothing
    assert again.returncode != 0 and "resume=true" in again.stderr
    step_before = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    resumed = run_cli(*common(fmnist_dir, logs), "run_name=base", "resume=true", "trainer.max_epochs=3")
    ok(resumed)
    assert step_before == 8
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["speed"]["epochs / steps"] == "3 / 12"  # continued, did not restart
    assert (
        column(metrics(trained, 1), "train/loss_step")
        and min(int(r["step"]) for r in metrics(trained, 1)) >= 8
    )
    nothing = run_cli(*common(fmnist_dir, logs), "run_name=never-ran", "resume=true")
    assert nothing.returncode != 0 and "does not exist" in nothing.stderr


def test_eval_mode_scores_a_checkpoint(trained, fmnist_dir, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    result = run_cli(
        *common(fmnist_dir, tmp_path),
        "run_name=ev",
        "mode=eval",
        f"ckpt_path={ckpt}",
        "trainer.limit_test_batches=null",
    )
    ok(result)
    summary = json.loads((tmp_path / "runs" / "ev" / "summary.json").read_text())
    assert summary["run"]["mode"] == "eval" and summary["test"]["test/acc"] > 0.5  # the fixture is learnable


def test_non_finite_loss_stops_and_keeps_the_checkpoint(trained, fmnist_dir, tmp_path):
    import shutil

    run_dir = tmp_path / "runs" / "nan"
    shutil.copytree(trained, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    # zero normalisation std (a realistic config bug) turns the inputs into inf/NaN
    result = run_cli(
        *common(fmnist_dir, tmp_path),
        "run_name=nan",
        "resume=true",
        "trainer.max_epochs=4",
        "+task.data.std=[0.0]",
    )
    assert result.returncode != 0
    assert "training loss became" in result.stderr and "lower learning rate" in result.stderr
    assert last.read_bytes() == before  # the good checkpoint is intact


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(fmnist_dir, tmp_path):
    """The run's own checkpoint callbacks: a save that fails midway (here an unpicklable object, as a
    full disk would) stops the run and leaves last.ckpt of the epoch before byte for byte, no debris."""
    result = run_cli(
        *common(fmnist_dir, tmp_path),
        "run_name=full",
        "+callbacks.fail._target_=support.FailOnceSaved",
        env={"PYTHONPATH": str(ROOT / "tests")},
    )
    assert result.returncode != 0 and "disk full" in result.stderr
    folder = tmp_path / "runs" / "full" / "checkpoints"
    saved = torch.load(folder / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4 and "bad" not in saved  # the end of epoch 1 (4 steps)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch000-step000004.ckpt", "last.ckpt"]


def test_ddp_on_two_cpu_processes(fmnist_dir, tmp_path):
    """2 gloo processes: each rank draws its own augmentations (seed + rank), the parameters stay
    identical (one initialisation seed, DDP's gradient all-reduce), and the loss goes down."""
    result = run_cli(
        *common(fmnist_dir, tmp_path),
        "run_name=ddp",
        "trainer=ddp_cpu",
        "trainer.max_epochs=3",
        "task.data.batch_size=32",
        "+callbacks.probe._target_=support.AugmentationProbe",
        "+callbacks.lock._target_=support.LockProbe",
        env={"PYTHONPATH": str(ROOT / "tests")},
    )
    ok(result)
    out = result.stdout + result.stderr
    assert "parameters identical on all 2 ranks" in out
    # one job, one lock: both ranks ran under rank 0's lock, given back at the end
    run_dir = tmp_path / "runs" / "ddp"
    (pid0, holder0), (pid1, holder1) = (
        json.loads((run_dir / f"lock_rank{r}.json").read_text()) for r in (0, 1)
    )
    assert holder0 == holder1 == pid0 != pid1 and not (run_dir / "run.lock").exists()
    flips = [json.loads((tmp_path / "runs" / "ddp" / f"augment_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(0 < sum(f) < 64 for f in flips) and flips[0] != flips[1]
    losses = column(metrics(tmp_path / "runs" / "ddp"), "train/loss_epoch")
    assert len(losses) == 3 and losses[-1] < losses[0]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["run"]["devices"] == 2


def test_resume_a_two_process_run_on_one_process(fmnist_dir, tmp_path):
    """Same global batch on 2 processes and on 1 (gradient accumulation), and the step count continues."""
    args = [
        *common(fmnist_dir, tmp_path),
        "run_name=moved",
        "global_batch_size=64",
        "task.data.batch_size=32",
    ]
    ok(run_cli(*args, "trainer=ddp_cpu", "trainer.max_epochs=1"))
    run_dir = tmp_path / "runs" / "moved"
    two = json.loads((run_dir / "summary.json").read_text())
    assert two["run"]["global batch"].startswith("64 = 32 per device × 2 × 1")
    assert two["speed"]["epochs / steps"] == "1 / 4"
    ok(run_cli(*args, "trainer=cpu", "trainer.max_epochs=2", "resume=true"))
    one = json.loads((run_dir / "summary.json").read_text())
    assert one["run"]["global batch"].startswith("64 = 32 per device × 1 × 2")
    assert one["speed"]["epochs / steps"] == "2 / 6"  # 4 steps, then 4 batches / 2 accumulated


def test_global_batch_rule_gives_one_schedule_on_one_and_two_processes(fmnist_dir, tmp_path):
    """global_batch_size=64 as 32 × 2 processes and as 32 × 1 × 2 accumulated: the same optimizer
    steps, and the same learning rate at every step (warmup and cosine count optimizer steps)."""
    lrs = {}
    for name, trainer in (("two", "trainer=ddp_cpu"), ("one", "trainer=cpu")):
        ok(
            run_cli(
                *common(fmnist_dir, tmp_path),
                f"run_name={name}",
                trainer,
                "global_batch_size=64",
                "task.data.batch_size=32",
                "trainer.limit_train_batches=1.0",
                "trainer.max_epochs=1",
            )
        )
        rows = metrics(tmp_path / "runs" / name)
        lrs[name] = sorted(
            {(int(r["step"]), float(r["lr-AdamW/pg1"])) for r in rows if r.get("lr-AdamW/pg1")}
        )
        steps = json.loads((tmp_path / "runs" / name / "summary.json").read_text())["speed"]["epochs / steps"]
        assert steps == "1 / 15"  # 1000 training samples // 64: whole global batches only
    assert len(lrs["one"]) == 15 and lrs["one"] == lrs["two"]
    values = [lr for _, lr in lrs["one"]]
    assert values[0] < values[7] and values[-1] < values[7]  # warmup, then decay: a schedule, not a constant


def test_a_checkpoint_from_before_the_final_budget_is_not_tested(fmnist_dir, tmp_path):
    """Budget 0.5 shrinking to 0.2 by step 100: the 8 steps end before it, so every validation
    checkpoint predates the final budget and the run tests its final weights, saying so."""
    schedule = BudgetSchedule(0.2, start=0.5, steps=100)
    ok(run_cli(*common(fmnist_dir, tmp_path), "run_name=shrink", "layer=gblr", "layer.init=scratch",
               "layer.budget=0.5", "callbacks.gblr_budget.budget=0.2", "callbacks.gblr_budget.start_budget=0.5",
               "callbacks.gblr_budget.schedule_steps=100", "callbacks.gblr_budget.schedule_every=1"))  # fmt: skip
    summary = json.loads((tmp_path / "runs" / "shrink" / "summary.json").read_text())
    assert summary["run"]["tested checkpoint"].startswith(
        "the final weights (the best val/acc (max) checkpoint"
    )
    assert "reached at step 100" in summary["run"]["tested checkpoint"]
    assert abs(summary["cost"]["budget (structured MACs / dense)"] - schedule.at(8)) < 0.01


def test_kill_a_two_process_gblr_run_and_resume_on_one_and_two(fmnist_dir, tmp_path):
    """A 2-process gblr run killed mid-epoch (SIGKILL, no clean-up) resumes from the periodic
    last.ckpt on 1 process and on 2: the step count continues, the structure and the global batch
    are the same, the loss carries on from where it was, the budget schedule (0.5 shrinking to 0.2
    by step 30) continues at the restored step, and every rank's parameters (widths and locations
    included) are identical every 2 steps of the 2-process runs."""
    schedule = BudgetSchedule(0.2, start=0.5, steps=30)
    args = [
        *common(fmnist_dir, tmp_path),
        "layer=gblr",
        "layer.init=scratch",
        "layer.budget=0.5",
        "callbacks.gblr_budget.budget=0.2",
        "callbacks.gblr_budget.start_budget=0.5",
        "callbacks.gblr_budget.schedule_steps=30",
        "callbacks.gblr_budget.schedule_every=1",
        "callbacks.rank_consistency.every_n_steps=2",
        "global_batch_size=64",
        "task.data.batch_size=32",
        "trainer.limit_train_batches=1.0",
        "trainer.max_epochs=20",
        "callbacks.periodic_checkpoint.every_n_train_steps=3",
    ]
    run_dir = tmp_path / "runs" / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = spawn_cli(*args, "run_name=killed", "trainer=ddp_cpu")
    try:
        step = 0
        deadline = time.monotonic() + 400
        while step < 6:  # two periodic saves in (an epoch here is 16 steps)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
            if last.is_file():
                step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    saved = torch.load(last, map_location="cpu", weights_only=False)
    step = saved["global_step"]
    assert step >= 6
    before = column(metrics(run_dir), "train/loss_step")
    for name, trainer in (("one", "trainer=cpu"), ("two", "trainer=ddp_cpu")):
        shutil.copytree(run_dir, tmp_path / "runs" / name)
        result = run_cli(*args, f"run_name={name}", trainer, "resume=true", f"trainer.max_steps={step + 4}")
        ok(result)
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert summary["speed"]["epochs / steps"].endswith(f"/ {step + 4}")
        assert summary["run"]["global batch"].startswith("64 = ")
        resumed = torch.load(tmp_path / "runs" / name / "checkpoints" / "last.ckpt", weights_only=False)
        assert resumed["structure"] == saved["structure"] and resumed["global_step"] == step + 4
        reached = summary["cost"][
            "budget (structured MACs / dense)"
        ]  # the projection is tight while shrinking
        assert abs(reached - schedule.at(step + 4)) < 0.01, (reached, schedule.at(step + 4), step)
        after = column(metrics(tmp_path / "runs" / name, version=1), "train/loss_step")
        assert sum(after[:3]) / 3 < sum(before[:3]) / 3 - 0.1, (before, after)  # not a fresh start
    assert "parameters identical on all 2 ranks" in result.stdout + result.stderr


def test_wandb_logs_offline_with_a_stable_id(fmnist_dir, tmp_path):
    env = {"WANDB_API_KEY": "", "WANDB_DIR": ""}
    ok(run_cli(*common(fmnist_dir, tmp_path), "run_name=wb", "logger=wandb", "trainer.max_epochs=1", env=env))
    run_dir = tmp_path / "runs" / "wb"
    expected = run_id("wb", str(run_dir))
    files = list((run_dir / "wandb").glob(f"offline-run-*-{expected}/run-{expected}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_submitit_local_launcher(fmnist_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "launcher=local",
        *common(fmnist_dir, tmp_path),
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        "seed=1,2",
    )
    ok(result)
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["speed"]["epochs / steps"] == "1 / 4"
