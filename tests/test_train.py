"""Resume rules of structlab.train: explicit resume, refusal to overwrite, SLURM requeue."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from structlab.train import resume_checkpoint


def cfg_for(tmp_path, resume: bool):
    return OmegaConf.create({"resume": resume, "run_name": "r", "paths": {"output_dir": str(tmp_path)}})


def test_resume_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_checkpoint(cfg_for(tmp_path, False)) is None  # a new run
    with pytest.raises(FileNotFoundError, match="run_name"):
        resume_checkpoint(cfg_for(tmp_path, True))
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resume_checkpoint(cfg_for(tmp_path, True)) == str(last)
    with pytest.raises(FileExistsError, match="resume=true"):
        resume_checkpoint(cfg_for(tmp_path, False))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job continues on its own
    assert resume_checkpoint(cfg_for(tmp_path, False)) == str(last)
