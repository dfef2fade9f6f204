"""The task-agnostic core: a second task (a tiny HF GPT-2 on token-id dict batches) goes through the
same path as image classification: surgery, checkpoint, resume, eval, summary and tokens/s; the layers
are converted once per run, never on resume or in eval."""

from __future__ import annotations

import inspect
import math

import lightning as L
import pytest
import torch
from support import compose_train

import structlab.tasks.structured as structured
from structlab.callbacks import WholeGlobalBatches
from structlab.data import SyntheticTextDataModule
from structlab.tasks import LanguageModelingModule, StructuredModule
from structlab.train import run

LM = ("model=gpt2_tiny", "task=synthetic_text", "trainer.enable_progress_bar=false", "print_config=false")
# gpt2_tiny on 32 tokens: per token 2 blocks × (64·192 + 64·64 + 2·64·256) + the 64→256 LM head;
# per layer causal attention counted in full by FlopCounterMode: 2 · 32 · 32 · 64 (QKᵀ and AV)
DENSE_MACS = 32 * (2 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 64 * 256) + 2 * (2 * 32 * 32 * 64)


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """Every StructuredModule.convert call in this process (the real method still runs)."""
    calls: list[str] = []
    original = StructuredModule.convert

    def spy(self):
        calls.append(self.layer_cfg["name"])
        return original(self)

    monkeypatch.setattr(StructuredModule, "convert", spy)
    return calls


def test_the_core_names_no_task():
    source = inspect.getsource(structured).lower()
    for word in ("num_classes", "label", "image", "logits", "accuracy", "mixup", "input_ids"):
        assert word not in source, word


def test_language_model_trains_resumes_and_evaluates_through_run(tmp_path, conversions):
    """gblr from dense on GPT-2's Conv1D projections: converted once; resume and eval rebuild the
    structure from the checkpoint instead."""
    args = (*LM, "layer=gblr", "layer.fit_steps=5", "layer.budget=0.5", "run_name=lm")
    summary = run(compose_train(*args, "trainer.max_epochs=1", output_dir=tmp_path))
    assert conversions == ["gblr"]
    assert summary["speed"]["epochs / steps"] == "1 / 16"  # 256 sequences / 16 per batch
    # throughput counts the dict batches' samples and tokens (32 per sequence)
    speed = summary["speed"]
    assert speed["train tokens/s"] == pytest.approx(32 * speed["train samples/s"], rel=1e-3)
    cost = summary["cost"]
    assert cost["MACs per sample: dense"] == DENSE_MACS  # from a real batch of this task
    assert cost["structured layers"] == 8 and cost["budget (structured MACs / dense)"] <= 0.5
    assert cost["parameters: dense"] == 120_576  # the LM head tied to the embedding counts once
    assert set(summary["test"]) == {"test/loss", "test/ppl"}
    assert summary["test"]["test/ppl"] == pytest.approx(math.exp(summary["test"]["test/loss"]), rel=1e-4)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert len(saved["structure"]) == 8 and saved["global_step"] == 16

    resumed = run(compose_train(*args, "trainer.max_epochs=2", "resume=true", output_dir=tmp_path))
    assert conversions == ["gblr"]  # not again
    assert resumed["speed"]["epochs / steps"] == "2 / 32"
    assert resumed["test"]["test/loss"] < summary["test"]["test/loss"] < math.log(256)  # it learns

    evaluated = run(compose_train(*LM, "mode=eval", f"ckpt_path={ckpt}", output_dir=tmp_path / "eval"))
    assert conversions == ["gblr"]
    assert evaluated["test"]["test/loss"] == pytest.approx(resumed["test"]["test/loss"], rel=1e-5)


def test_svd_layers_are_converted_on_the_first_fit_only(tmp_path, conversions):
    module = LanguageModelingModule(
        model={"name": "gpt2_tiny", "targets": [r"transformer\.h\.\d+\.mlp\.c_fc"]},
        layer={"name": "svd", "rank": 4},
    )
    assert type(module.model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"  # built dense: cheap
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    data = SyntheticTextDataModule(vocab_size=256, train_size=32, batch_size=8)
    trainer.fit(module, datamodule=data)
    assert conversions == ["svd"] and module.model.transformer.h[1].mlp.c_fc.structure() == {"rank": 4}
    trainer.test(module, datamodule=data)
    assert conversions == ["svd"]


def test_a_global_batch_the_launch_does_not_give_is_an_error(tmp_path):
    """As under SLURM with one task per GPU and trainer.devices=1: the processes Lightning started
    (here 1) do not make up global_batch_size=64 from 32 per device without accumulation."""
    module = LanguageModelingModule(model={"name": "gpt2_tiny"})
    trainer = L.Trainer(
        max_steps=1, logger=False, callbacks=[WholeGlobalBatches(64)], default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match=r"global_batch_size=64.*32 per device × 1 × 1 accumulated = 32"):
        trainer.fit(module, datamodule=SyntheticTextDataModule(batch_size=32))
