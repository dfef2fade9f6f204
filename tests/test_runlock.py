"""One job per run directory: the run lock, in-process rules and run.py launches in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import ROOT, run_cli, spawn_cli

from structlab.runlock import LOCK_FILE, RunLock, RunLockedError, this_process


def write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({**this_process(), **fields}))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_free_run_is_taken_and_given_back(tmp_path):
    with RunLock(tmp_path) as lock:
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        assert lock.path == tmp_path / LOCK_FILE
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_holder_on_this_host_refuses(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = write_lock(tmp_path, pid=holder.pid, process_start=None)
        before = path.read_bytes()
        with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} on .*kill {holder.pid}"):
            RunLock(tmp_path).acquire()
        assert path.read_bytes() == before  # the holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """The holder's pid now runs another process (a different start time): the lock is stale."""
    write_lock(tmp_path, pid=os.getpid(), process_start="1")
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["process_start"] != "1"


def test_a_dead_holder_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    with caplog.at_level("WARNING"), RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"its holder (pid {pid}) is gone" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_another_host_needs_force(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_lock(tmp_path, host="node-17", pid=4242, slurm_job_id=None)
    with pytest.raises(RunLockedError, match="pid 4242 on node-17.*another host.*force=true"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path, force=True):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == socket.gethostname()


def test_a_requeue_of_the_same_slurm_job_takes_over(tmp_path, monkeypatch):
    write_lock(tmp_path, host="node-17", pid=4242, slurm_job_id="555")
    monkeypatch.setenv("SLURM_JOB_ID", "556")
    with pytest.raises(RunLockedError, match="SLURM job 555"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_job_id"] == "555"


def test_an_unreadable_lock_refuses(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{trunc")
    with pytest.raises(RunLockedError, match="cannot be read.*delete the file or pass force=true"):
        RunLock(tmp_path).acquire()


def test_sigterm_gives_the_lock_back(tmp_path):
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from structlab.runlock import RunLock\n"
        "with RunLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), str(ROOT / "src")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held" and (tmp_path / LOCK_FILE).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not (tmp_path / LOCK_FILE).exists()


# --- run.py, as users launch it ---------------------------------------------------------------------
def args(data: Path, logs: Path, name: str) -> list[str]:
    return [
        f"paths.data_dir={data}",
        f"paths.log_dir={logs}",
        f"run_name={name}",
        "task.data.val_size=200",
        "task.data.system_dir=null",
        "task.data.download=false",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.enable_progress_bar=false",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
    ]


def wait_for(condition, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_second_launch_of_a_running_run_is_refused(fmnist_dir, tmp_path):
    run_dir = tmp_path / "runs" / "dup"
    first = spawn_cli(*args(fmnist_dir, tmp_path, "dup"), "trainer.max_epochs=200")
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file(), first)
        os.kill(first.pid, signal.SIGSTOP)  # hold the first still while the second tries
        before = snapshot(run_dir)
        for extra in ([], ["resume=true"]):
            second = run_cli(*args(fmnist_dir, tmp_path, "dup"), *extra)
            assert second.returncode != 0
            assert f"is in use by pid {first.pid} on {socket.gethostname()}" in second.stderr
            assert snapshot(run_dir) == before  # nothing written into the first's run: no csv/version_1
        os.kill(first.pid, signal.SIGCONT)
    finally:
        os.killpg(first.pid, signal.SIGTERM)  # the lock is given back on SIGTERM
        first.communicate(timeout=120)
    assert not (run_dir / LOCK_FILE).exists()
    assert sorted(p.name for p in (run_dir / "csv").iterdir()) == ["version_0"]


@pytest.mark.slow
def test_a_killed_run_resumes_by_taking_over_its_stale_lock(fmnist_dir, tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    proc = spawn_cli(*args(fmnist_dir, tmp_path, "killed"), "trainer.max_epochs=200")
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").is_file(), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no clean-up at all
        proc.communicate()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    resumed = run_cli(*args(fmnist_dir, tmp_path, "killed"), "resume=true", f"trainer.max_steps={step + 2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"its holder (pid {proc.pid}) is gone" in resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["speed"]["epochs / steps"].endswith(f"/ {step + 2}") and not (run_dir / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_slurm_requeue_takes_over_from_its_earlier_incarnation(fmnist_dir, tmp_path):
    """The earlier run of the same job id held the lock on another node (so its pid cannot be
    checked): the requeued job (SLURM_RESTART_COUNT=1) takes over and resumes; another job may not."""
    run_dir = tmp_path / "runs" / "requeued"
    assert run_cli(*args(fmnist_dir, tmp_path, "requeued"), "trainer.max_steps=2").returncode == 0
    write_lock(run_dir, host="node-17", pid=4242, slurm_job_id="777")
    other = run_cli(*args(fmnist_dir, tmp_path, "requeued"), env={"SLURM_JOB_ID": "778"})
    assert other.returncode != 0 and "pid 4242 on node-17, SLURM job 777" in other.stderr
    env = {"SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "1"}
    requeued = run_cli(*args(fmnist_dir, tmp_path, "requeued"), "trainer.max_steps=4", env=env)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "a requeue of SLURM job 777" in requeued.stdout + requeued.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["speed"]["epochs / steps"].endswith("/ 4") and not (run_dir / LOCK_FILE).exists()
