"""The classification LightningModule: surgery on conversion, checkpoints that rebuild the structure,
mixup, compile, and clear errors for unknown names."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from structlab.layers import LAYERS
from structlab.tasks import ClassificationModule

TINY = {
    "name": "vit_fmnist_p7",
    "depth": 2,
    "embed_dim": 32,
    "num_heads": 2,
    "targets": ["blocks.*.attn.qkv", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"],
}


def loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)),
        batch_size=8,
    )


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_surgery_replaces_the_model_targets():
    m = ClassificationModule(model=TINY, layer={"name": "svd", "budget": 0.5})
    assert all(type(mod).__name__ == "Linear" for n, mod in m.model.named_modules() if n.endswith("fc1"))
    m.convert()  # what a new run does when training starts
    kinds = {
        n: type(mod).__name__
        for n, mod in m.model.named_modules()
        if n.endswith(("qkv", "proj", "fc1", "fc2"))
    }
    assert kinds["blocks.0.attn.qkv"] == "LowRankLinear" and kinds["blocks.1.mlp.fc2"] == "LowRankLinear"
    assert kinds["blocks.0.attn.proj"] == "Linear"  # not a target
    dense = ClassificationModule(model=TINY)
    assert all(type(mod).__name__ == "Linear" for n, mod in dense.model.named_modules() if n.endswith("fc1"))


def test_checkpoint_rebuilds_a_changed_structure(tmp_path):
    torch.manual_seed(0)
    m = ClassificationModule(model=TINY, layer={"name": "svd", "rank": 8, "budget": None})
    m.convert()
    # a structure that differs from what the config builds (as a tsvd rank or pruning would)
    from structlab.layers import make_layer

    m.model.set_submodule("blocks.0.mlp.fc1", make_layer("svd", 32, 64, rank=3, budget=None))
    t = trainer(tmp_path)
    t.fit(m, loader())
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = ClassificationModule.load_from_checkpoint(path)
    assert loaded.model.blocks[0].mlp.fc1.structure() == {"rank": 3}
    x = torch.randn(2, 1, 28, 28)
    m.eval(), loaded.eval()
    assert torch.equal(m(x), loaded(x))


def test_mixup_training_step_uses_soft_targets(tmp_path):
    m = ClassificationModule(
        model=TINY,
        mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
        label_smoothing=0.1,
        scheduler={"warmup_epochs": 1},
    )
    t = trainer(tmp_path, limit_train_batches=2)
    t.fit(m, loader())
    assert torch.isfinite(t.callback_metrics["train/loss"]) and t.global_step == 2
    assert "train/acc" not in t.callback_metrics  # accuracy against mixed targets would mislead


@pytest.mark.slow
def test_compiled_model_trains_and_keeps_parameter_names(tmp_path):
    m = ClassificationModule(model=TINY, compile=True)
    names = [n for n, _ in m.named_parameters()]
    t = trainer(tmp_path, limit_train_batches=2)
    t.fit(m, loader())
    assert t.global_step == 2 and [n for n, _ in m.named_parameters()] == names


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid models: .*vit_base_patch16_224"):
        ClassificationModule(model={**TINY, "name": "vit_gigantic"})
    with pytest.raises(ValueError, match="valid layer types: " + ", ".join(sorted(LAYERS))):
        ClassificationModule(model=TINY, layer={"name": "monarch"})
