"""Every experiment composes and runs one fast-dev batch; struct mode catches override typos."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from support import CONFIGS, compose_train

from structlab.train import run

EXPERIMENTS = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
)


def test_experiments_are_found():
    """The glob finds exactly the committed recipes (a moved or misnamed file fails here)."""
    assert EXPERIMENTS == [
        "cifar10/vit_s4-dense",
        "fashion_mnist/vit_p7-dense",
        "fashion_mnist/vit_p7-gblr",
        "fashion_mnist/vit_p7-gblr-ft",
        "fashion_mnist/vit_p7-svd",
        "fashion_mnist/vit_p7-svd-ft",
        "fashion_mnist/vit_p7-tsvd",
        "fashion_mnist/vit_p7-tsvd-ft",
        "imagenet/vit_b16-dense",
        "synthetic/vit_b16-dense",
        "text/gpt2_ft-dense",
        "text/gpt2_ft-gblr",
        "text/gpt2_ft-svd",
        "text/gpt2_ft-tsvd",
        "text/gpt2_scratch-dense",
    ]


@pytest.mark.slow  # text/ recipes: tests/test_text_experiments.py (a small corpus and GPT-2 weights)
@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if not e.startswith("text/")])
def test_experiment_fast_dev_run(experiment, tmp_path, fmnist_dir, cifar_dir, imagefolder_dir):
    init_from = []
    if experiment.endswith("-ft"):  # fine-tune recipes start from dense weights: a fresh dense model's
        init_from = [f"init_from={dense_weights(experiment, tmp_path / 'dense')}"]
    cfg = compose_train(f"experiment={experiment}", *init_from, output_dir=tmp_path)
    data = {
        "fashion_mnist": fmnist_dir,
        "cifar10": cifar_dir,
        "cifar100": cifar_dir,
        "imagenet": imagefolder_dir,
    }
    overrides = [
        f"experiment={experiment}",
        *init_from,
        "debug=fdr",
        "trainer=cpu",
        "trainer.precision=32-true",
        "global_batch_size=null",
        "task.data.batch_size=2",
        "logger=csv",
        "print_config=false",
    ]
    if cfg.task.name in data:
        overrides += [f"paths.data_dir={data[cfg.task.name]}"]
    if "download" in cfg.task.data:
        overrides += ["task.data.download=false"]
    if cfg.task.name == "fashion_mnist":
        overrides += ["task.data.val_size=200"]
    if cfg.task.name in ("cifar10", "cifar100", "imagenet"):
        overrides += ["task.data.val_size=3"]  # of the tiny fixtures' training images
    if cfg.task.name == "imagenet":
        overrides += [f"task.data.data_dir={imagefolder_dir}", "task.num_classes=3"]
    if "num_workers" in cfg.task.data:
        overrides += ["task.data.num_workers=0"]
    if cfg.task.name == "synthetic_imagenet":
        overrides += ["task.data.img_size=224", "task.data.steps_per_epoch=1", "task.data.eval_steps=1"]
    summary = run(compose_train(*overrides, output_dir=tmp_path))
    assert summary["speed"]["epochs / steps"].endswith("/ 1")  # exactly one optimizer step
    if cfg.task.name in ("fashion_mnist", "cifar10", "cifar100", "imagenet"):
        assert summary["run"]["validation"].startswith("held out from train")
    metric = cfg.task.metric.name
    assert {f"test/{metric}", "test/loss"} <= set(summary["test"])
    assert summary["test"]["test/loss"] > 0 and summary["cost"]["MACs per sample: as trained"] > 0
    if cfg.layer.name == "dense":
        assert summary["cost"]["MACs per sample: dense"] == summary["cost"]["MACs per sample: deployed"]
    else:  # the structured layers' MACs never above the budget
        assert summary["cost"]["budget (structured MACs / dense)"] <= cfg.layer.budget + 0.005
    if init_from:
        assert f"test/{metric} (dense init_from)" in summary["test"]


def dense_weights(experiment: str, folder: Path) -> Path:
    """model.safetensors of the experiment's model, dense and freshly initialised (what init_from reads)."""
    from safetensors.torch import save_model

    from structlab.train import build

    cfg = compose_train(f"experiment={experiment}", "init_from=null", "layer=dense", output_dir=folder)
    folder.mkdir(parents=True)
    save_model(build(cfg)[1].model, str(folder / "model.safetensors"))
    return folder


def test_default_config_is_the_offline_fashion_mnist_experiment():
    default = compose_train()
    explicit = compose_train("experiment=fashion_mnist/vit_p7-dense")
    for key in ("model", "layer", "task", "trainer"):
        assert default[key] == explicit[key]
    assert default.trainer.accelerator == "cpu" and default.task.name == "fashion_mnist"


def test_recipes_match_the_papers():
    cifar = compose_train("experiment=cifar10/vit_s4-dense")
    m = cifar.task.module
    assert (m.optimizer.lr, m.optimizer.weight_decay, cifar.global_batch_size) == (5e-4, 0.05, 1024)
    assert (m.scheduler.warmup_epochs, m.scheduler.cooldown_epochs, cifar.trainer.max_epochs) == (5, 10, 310)
    assert (m.scheduler.warmup_lr, m.scheduler.min_lr, cifar.model.drop_path_rate) == (1e-6, 1e-5, 0.1)
    assert (m.label_smoothing, m.mixup.mixup_alpha, m.mixup.cutmix_alpha) == (0.1, 0.8, 1.0)
    assert cifar.task.data.auto_augment is True and cifar.model.name == "vit_small_patch4_32"
    inet = compose_train("experiment=imagenet/vit_b16-dense")
    m = inet.task.module
    assert (m.optimizer.lr, m.optimizer.weight_decay, inet.global_batch_size) == (1e-3, 0.05, 1024)
    assert (m.scheduler.warmup_epochs, inet.trainer.max_epochs, m.label_smoothing) == (10, 300, 0.1)
    assert (m.mixup.mixup_alpha, m.mixup.cutmix_alpha) == (0.8, 1.0)
    assert inet.task.data.auto_augment.startswith("rand-m9") and inet.task.data.re_prob == 0.25


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_epoch=3", "max_epoch"),  # typo in a key
        ("task=imagenett", "imagenett"),  # unknown option of a group
        ("model=vit_huge", "vit_huge"),
        ("layer=monarch", "monarch"),
    ],
)
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(override)
    text = str(err.value) + str(err.value.__cause__)
    assert message in text


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train("task=imagenett")
    text = str(err.value) + str(err.value.__cause__)
    assert "fashion_mnist" in text and "cifar10" in text


@pytest.mark.slow
@pytest.mark.parametrize("val_size, tested", [(3, "best val/acc (max)"), (0, "last (validation ran on")])
def test_cifar_selects_on_a_held_out_split_or_tests_the_last_checkpoint(
    val_size, tested, tmp_path, cifar_dir
):
    """With a held-out split the best checkpoint by val/acc is tested; validating on the test split
    (val_size=0) tests the last checkpoint instead, and the summary says which."""
    cfg = compose_train(
        "experiment=cifar10/vit_s4-dense",
        "model=vit_fmnist",
        "+model.img_size=32",
        "+model.in_chans=3",
        "debug=limit",
        "trainer=cpu",
        "global_batch_size=null",
        "task.data.batch_size=4",
        "task.data.num_workers=0",
        "task.data.download=false",
        f"task.data.val_size={val_size}",
        f"paths.data_dir={cifar_dir}",
        "logger=csv",
        "print_config=false",
        "trainer.enable_progress_bar=false",
        output_dir=tmp_path,
    )
    summary = run(cfg)
    assert summary["run"]["tested checkpoint"].startswith(tested)
    expected = "held out from train (3 images)" if val_size else "test split"
    assert summary["run"]["validation"] == expected
    checkpoint = summary["outputs"]["checkpoint"]
    assert checkpoint.endswith("last.ckpt") == (val_size == 0) and Path(checkpoint).is_file()
