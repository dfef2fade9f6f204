"""Every experiment composes and runs one fast-dev batch; struct mode catches override typos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from support import CONFIGS, compose_train, run_cli

from structlab.train import run

EXPERIMENTS = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
)


def test_experiments_are_found():
    """The glob finds exactly the committed recipes (a moved or misnamed file fails here)."""
    assert EXPERIMENTS == [
        "cifar10/vit_s4-dense",
        "cifar10/vit_s4-gblr",
        "cifar10/vit_s4-gblr-ft",
        "cifar10/vit_s4-svd",
        "cifar10/vit_s4-svd-ft",
        "cifar10/vit_s4-tsvd",
        "cifar10/vit_s4-tsvd-ft",
        "depth/pi3_small-dense",
        "depth/pi3_small-gblr",
        "depth/pi3_small-gblr-ft",
        "depth/pi3_small-svd",
        "depth/pi3_small-svd-ft",
        "depth/pi3_small-tsvd",
        "depth/pi3_small-tsvd-ft",
        "fashion_mnist/vit_p7-dense",
        "fashion_mnist/vit_p7-gblr",
        "fashion_mnist/vit_p7-gblr-ft",
        "fashion_mnist/vit_p7-svd",
        "fashion_mnist/vit_p7-svd-ft",
        "fashion_mnist/vit_p7-tsvd",
        "fashion_mnist/vit_p7-tsvd-ft",
        "imagenet/vit_b16-dense",
        "imagenet/vit_b16-gblr",
        "imagenet/vit_b16-gblr-ft",
        "imagenet/vit_b16-gblr-ft-sweep",
        "imagenet/vit_b16-svd",
        "imagenet/vit_b16-svd-ft",
        "imagenet/vit_b16-tsvd",
        "imagenet/vit_b16-tsvd-ft",
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
    cfg = compose_train(f"experiment={experiment}", "init_from=null", output_dir=tmp_path)
    shrink = small_structured(cfg)
    init_from = []
    if "-ft" in experiment:  # fine-tune recipes start from dense weights: a fresh dense model's
        same_model = [o for o in shrink if o.startswith(("+model.", "model."))]
        same_model += ["task.num_classes=3"] if cfg.task.name == "imagenet" else []
        init_from = [f"init_from={dense_weights(experiment, tmp_path / 'dense', *same_model)}"]
    data = {
        "fashion_mnist": fmnist_dir,
        "cifar10": cifar_dir,
        "cifar100": cifar_dir,
        "imagenet": imagefolder_dir,
    }
    overrides = [
        f"experiment={experiment}",
        *init_from,
        *shrink,
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
    if "calib_samples" in cfg.layer:  # whitened-svd conversions: calibration from a few samples
        overrides += ["layer.calib_samples=8"]
    if cfg.task.name == "depth":
        overrides += ["task.data.height=28", "task.data.width=28", "task.data.num_views=2"]
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


def small_structured(cfg: DictConfig) -> list[str]:
    """Overrides that keep a structured recipe of ViT-S/4, ViT-B/16 or π3 small to seconds on a CPU:
    fewest blocks (the recipe's layer type, budget and schedule unchanged), a short gblr fit, few
    ternary components."""
    shallow = {
        "vit_small_patch4_32": ["+model.depth=1"],
        "vit_base_patch16_224": ["+model.depth=1"],
        "pi3_small": ["model.enc_depth=1", "model.dec_depth=2", "model.head_depth=1"],
    }
    if cfg.layer.name == "dense" or cfg.model.name not in shallow:
        return []
    fewer = {"gblr": ["layer.fit_steps=5"], "tsvd": ["layer.max_rank=16"]}
    return [*shallow[cfg.model.name], *fewer.get(cfg.layer.name, [])]


def dense_weights(experiment: str, folder: Path, *overrides: str) -> Path:
    """model.safetensors of the experiment's model, dense and freshly initialised (what init_from reads)."""
    from safetensors.torch import save_model

    from structlab.train import build

    cfg = compose_train(
        f"experiment={experiment}",
        "init_from=null",
        "layer=dense",
        "trainer=cpu",
        *overrides,
        output_dir=folder,
    )
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


# The structured CIFAR-10 / ImageNet recipes: {task: (model, default β from scratch, fine-tune schedule)}.
# Fine-tunes: (epochs, lr, warmup epochs, warmup lr); cooldown 0, everything else as the dense recipe.
STRUCTURED_RECIPES = {
    "cifar10": ("vit_s4", 0.25, (50, 5e-5, 5, 5e-6)),
    "imagenet": ("vit_b16", 0.16, (35, 1e-4, 0, 1e-6)),
}
GAUDI_SWEEP = (0.125, 0.15, 0.175, 0.2)  # Gaudi-GBLR's ImageNet fine-tune budgets (β_ref)


def compose_with_hydra(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def target_shapes(model_cfg: DictConfig) -> list[tuple[int, int]]:
    """(out, in) of every linear the model config targets, from the real network (on the meta device)."""
    import torch

    from structlab.models import build_model
    from structlab.surgery import find_targets

    kw = OmegaConf.to_container(model_cfg, resolve=True)
    name, targets, exclude = kw.pop("name"), kw.pop("targets"), kw.pop("exclude")
    with torch.device("meta"):
        model = build_model(name, **kw)
    return [
        (m.out_features, m.in_features)
        for m in map(model.get_submodule, find_targets(model, targets, exclude))
    ]


def gaudi_budget(shapes: list[tuple[int, int]], beta_ref: float) -> float:
    """Gaudi-GBLR's budget β_ref (a rank-⌊β_ref·min(m,n)⌋ matrix's MACs in every layer) as structlab's
    β, one fraction of all the layers' dense MACs (docs/methods.md §5)."""
    spent = sum(math.floor(beta_ref * min(m, n)) * (m + n) for m, n in shapes)
    return spent / sum(m * n for m, n in shapes)


def plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("layer", ["svd", "tsvd", "gblr"])
@pytest.mark.parametrize("task", sorted(STRUCTURED_RECIPES))
def test_structured_recipes_are_the_dense_recipe_with_a_layer(task, layer):
    """From scratch: the dense recipe's training exactly, the layer at the recipe's β. Fine-tune: needs
    init_from, converts the dense weights, and only the schedule (fewer epochs, lower lr) differs."""
    model, beta, (epochs, lr, warmup, warmup_lr) = STRUCTURED_RECIPES[task]
    dense = compose_train(f"experiment={task}/{model}-dense")
    scratch = compose_train(f"experiment={task}/{model}-{layer}")
    for key in ("model", "task", "trainer", "callbacks", "global_batch_size", "seed", "init_from"):
        assert plain(scratch)[key] == plain(dense)[key], key
    assert (scratch.layer.name, scratch.layer.init, scratch.layer.budget) == (layer, "scratch", beta)

    ft = compose_train(f"experiment={task}/{model}-{layer}-ft")
    with pytest.raises(InterpolationResolutionError, match="needs init_from="):
        ft.init_from  # noqa: B018  (required: the recipe fails rather than fine-tune a random init)
    assert compose_train(f"experiment={task}/{model}-{layer}-ft", "init_from=/a/dense.ckpt").init_from
    budget = gaudi_budget(target_shapes(ft.model), 0.15) if task == "imagenet" else beta
    assert (ft.layer.name, ft.layer.init) == (layer, "dense") and ft.layer.budget == pytest.approx(
        budget, abs=1e-6
    )
    if layer == "svd":
        assert (ft.layer.method, ft.layer.allocation) == ("whitened_svd", "global")
    if layer == "tsvd":  # quantisation-aware training
        assert ft.layer.qat and scratch.layer.qat
    m, d = ft.task.module, dense.task.module
    assert (ft.trainer.max_epochs, m.optimizer.lr, m.scheduler.warmup_epochs, m.scheduler.warmup_lr) == (
        epochs,
        lr,
        warmup,
        warmup_lr,
    )
    assert m.scheduler.cooldown_epochs == 0 and ft.model.drop_path_rate == 0.1
    assert ft.trainer.max_epochs < dense.trainer.max_epochs and m.optimizer.lr <= d.optimizer.lr / 10
    for key in ("model", "callbacks", "global_batch_size", "seed"):
        assert plain(ft)[key] == plain(dense)[key], key
    assert plain(ft.task.data) == plain(dense.task.data)
    assert (m.optimizer.weight_decay, m.scheduler.min_lr, m.mixup, m.label_smoothing) == (
        d.optimizer.weight_decay,
        d.scheduler.min_lr,
        d.mixup,
        d.label_smoothing,
    )


def test_imagenet_scratch_budget_is_gaudi_readmes_mean_width():
    """β = 0.16 is the cost of every ViT-B block linear at the README's from-scratch mean width 0.12
    (K = min(m,n) rank-1 blocks of width w cost w·min(m,n)·(m+n))."""
    shapes = target_shapes(compose_train("experiment=imagenet/vit_b16-gblr").model)
    assert len(shapes) == 48
    cost = sum(0.12 * min(m, n) * (m + n) for m, n in shapes) / sum(m * n for m, n in shapes)
    assert cost == pytest.approx(0.16)


def test_imagenet_gblr_sweep_is_gaudis_budgets_translated():
    """The sweep runs imagenet/vit_b16-gblr-ft at Gaudi-GBLR's 4 fine-tune budgets in structlab's terms,
    each job in a folder and under a run_name that say its budget."""
    cfg = compose_with_hydra("experiment=imagenet/vit_b16-gblr-ft-sweep")
    shapes = target_shapes(cfg.model)
    assert {(m, n) for m, n in shapes} == {(2304, 768), (768, 768), (3072, 768), (768, 3072)}
    budgets = [float(b) for b in cfg.hydra.sweeper.params["layer.budget"].split(",")]
    assert budgets == pytest.approx([gaudi_budget(shapes, b) for b in GAUDI_SWEEP], abs=1e-6)
    assert budgets == pytest.approx([96 / 576, 115 / 576, 134 / 576, 153 / 576], abs=1e-6)  # the comment's
    assert "${layer.budget}" in OmegaConf.to_container(cfg.hydra.sweep)["subdir"]
    assert "${layer.budget}" in plain(cfg)["run_name"]
    recipe = compose_train("experiment=imagenet/vit_b16-gblr-ft")
    sweep = compose_train("experiment=imagenet/vit_b16-gblr-ft-sweep")
    with pytest.raises(InterpolationResolutionError, match="needs init_from="):
        sweep.init_from  # noqa: B018
    assert {k: v for k, v in plain(sweep).items() if k != "run_name"} == {
        k: v for k, v in plain(recipe).items() if k != "run_name"
    }


@pytest.mark.slow
def test_imagenet_gblr_sweep_launches_one_run_per_budget(tmp_path, imagefolder_dir):
    """`python run.py -m experiment=imagenet/vit_b16-gblr-ft-sweep init_from=...` trains the 4 budgets,
    each in its own folder (the ViT cut to one narrow block on 32×32 images to take seconds)."""
    small = ["+model.depth=1", "+model.embed_dim=64", "+model.num_heads=2", "+model.img_size=32"]
    small += ["task.num_classes=3"]
    weights = dense_weights("imagenet/vit_b16-gblr-ft-sweep", tmp_path / "dense", *small)
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "experiment=imagenet/vit_b16-gblr-ft-sweep",
        f"init_from={weights}",
        *small,
        "task.data.img_size=32",
        "layer.fit_steps=5",
        "debug=fdr",
        "trainer=cpu",
        "trainer.precision=32-true",
        "trainer.enable_progress_bar=false",
        "global_batch_size=null",
        "task.data.batch_size=2",
        "task.data.val_size=3",
        f"task.data.data_dir={imagefolder_dir}",
        "task.data.num_workers=0",
        "logger=csv",
        "print_config=false",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={sweep}",
        env={"OMP_NUM_THREADS": "1"},  # small matmuls on a loaded 2-core machine (tests/conftest.py)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    budgets = compose_with_hydra("experiment=imagenet/vit_b16-gblr-ft-sweep").hydra.sweeper.params
    budgets = budgets["layer.budget"].split(",")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        f"{i}-b{b}" for i, b in enumerate(budgets)
    ]
    for i, b in enumerate(budgets):
        summary = json.loads((sweep / f"{i}-b{b}" / "summary.json").read_text())
        assert f"-gblr-ft-b{b}-" in summary["run"]["name"]
        assert summary["cost"]["budget (structured MACs / dense)"] <= float(b) + 0.005
        assert "test/acc (dense init_from)" in summary["test"]


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
