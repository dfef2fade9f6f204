"""Structure callbacks on a one-block ViT: the gblr budget holds after every optimizer step (and the
projection runs once per step under accumulation), σ follows its schedule, QAT tsvd layers are
re-decomposed, and models without such layers are left alone."""

from __future__ import annotations

import copy
import logging
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from structlab.budget import BudgetSchedule, model_cost
from structlab.callbacks import GBLRBudget, SigmaAnneal, StructureMonitor, TernaryRequantize
from structlab.callbacks.monitor import block_layout
from structlab.layers.gblr import GaudiGBLRLinear
from structlab.layers.gblr_fit import floor_fraction
from structlab.layers.tsvd import TernaryLinear
from structlab.tasks import ClassificationModule

TARGETS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]
TINY = {"name": "vit_fmnist_p7", "depth": 1, "embed_dim": 32, "num_heads": 2, "targets": TARGETS}


def module(layer: dict, lr: float = 1e-3) -> ClassificationModule:
    torch.manual_seed(0)
    m = ClassificationModule(model=TINY, layer={"init": "scratch", **layer}, optimizer={"lr": lr})
    m.convert()  # what a new run does when training starts: the tests look at the layers before that
    return m


def fit(m: ClassificationModule, callbacks: list[L.Callback], batches: int, **kw) -> L.Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(4 * batches, 1, 28, 28, generator=g), torch.randint(0, 10, (4 * batches,), generator=g)
    )
    t = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        **kw,
    )
    t.fit(m, DataLoader(data, batch_size=4))
    return t


def layers(m: ClassificationModule, cls: type) -> list:
    return [x for x in m.modules() if isinstance(x, cls)]


class Record(L.Callback):
    """After each batch (behind the callbacks under test): global step, gblr budget, mean width, σ."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float, float | None]] = []
        self.sigma_in_forward: list[float | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sigma_in_forward.append(layers(pl_module, GaudiGBLRLinear)[0].sigma)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        gblr = layers(pl_module, GaudiGBLRLinear)
        width = float(torch.cat([g.widths.detach().clamp(0, 1).flatten() for g in gblr]).mean())
        self.rows.append((trainer.global_step, model_cost(pl_module.model)["budget"], width, gblr[0].sigma))


def test_budget_holds_after_every_optimizer_step() -> None:
    m = module({"name": "gblr", "budget": 0.5})
    start = model_cost(m.model)["budget"]
    width0 = float(torch.cat([g.widths.flatten() for g in layers(m, GaudiGBLRLinear)]).mean())
    budget, rec = GBLRBudget(budget=0.25), Record()
    t = fit(m, [budget, rec], batches=4)
    assert 0.45 < start <= 0.5  # the layers start at their own budget, well above the callback's
    assert t.global_step == 4 and [r[0] for r in rec.rows] == [1, 2, 3, 4]
    assert all(0.24 <= r[1] <= 0.25 + 1e-12 for r in rec.rows)  # at the budget (active), never above
    assert all(r[2] < 0.75 * width0 for r in rec.rows)  # widths shrank to get there
    assert t.callback_metrics["structure/budget"].item() == pytest.approx(rec.rows[-1][1], abs=1e-6)
    assert t.callback_metrics["structure/mean_width"].item() == pytest.approx(rec.rows[-1][2], abs=1e-6)


def test_budget_schedule_values_and_checks() -> None:
    linear = BudgetSchedule(0.25, start=1.0, steps=100, every=10)
    assert [linear.at(s) for s in (0, 9, 10, 55, 100, 500)] == pytest.approx(
        [1.0, 1.0, 0.925, 0.625, 0.25, 0.25]
    )
    cosine = BudgetSchedule(0.25, start=1.0, steps=100, shape="cosine")
    assert cosine.at(50) == pytest.approx(0.625) and cosine.at(10) > linear.at(10)  # slow start
    assert BudgetSchedule(0.3).at(0) == 0.3  # no start: constant
    with pytest.raises(ValueError, match="outside"):
        BudgetSchedule(0.3, start=1.5, steps=10)
    with pytest.raises(ValueError, match="'linear' or 'cosine'"):
        GBLRBudget(budget=0.3, start_budget=0.9, schedule_steps=10, schedule="step")


def test_budget_shrinks_on_its_schedule() -> None:
    m = module({"name": "gblr", "budget": 0.5})
    cb, rec = GBLRBudget(budget=0.25, start_budget=0.45, schedule_steps=4), Record()
    t = fit(m, [cb, rec], batches=6)
    schedule = BudgetSchedule(0.25, start=0.45, steps=4)
    for step, budget, *_ in rec.rows:  # never above the budget in force, and close to it (active)
        assert schedule.at(step) - 0.01 <= budget <= schedule.at(step) + 1e-12
    assert rec.rows[0][1] > 0.38 and rec.rows[-1][1] <= 0.25 + 1e-12
    assert t.callback_metrics["structure/budget_target"].item() == pytest.approx(0.25)


def test_budget_none_uses_the_layers_own_budgets() -> None:
    m = module({"name": "gblr", "budget": 0.3})
    for g in layers(m, GaudiGBLRLinear):
        g.widths.data.fill_(1.0)  # every component full: far over the layers' budget
    assert model_cost(m.model)["budget"] > 1.0
    budget, rec = GBLRBudget(), Record()
    fit(m, [budget, rec], batches=3)
    assert budget.target() == pytest.approx(0.3)
    assert all(0.29 <= r[1] <= 0.3 + 1e-12 for r in rec.rows)


def test_unreachable_budget_warns_once_and_stops_at_the_floor(caplog) -> None:
    torch.manual_seed(0)
    gblr = [GaudiGBLRLinear(32, 64), GaudiGBLRLinear(64, 32)]
    cb = GBLRBudget(budget=0.05, min_width=0.25)
    cb.layers = gblr
    with caplog.at_level(logging.WARNING, logger="structlab.callbacks.structure"):
        for _ in range(2):
            cb.project(SimpleNamespace(global_step=0, is_global_zero=True))
    assert all(torch.equal(g.widths, torch.full_like(g.widths, 0.25)) for g in gblr)
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    # every width at 0.25: 2 layers × 32 components × (16 + 8) rows + cols = 1536 of 2·32·64 dense MACs
    assert sum(g.macs_per_token() for g in gblr) / (2 * 32 * 64) == pytest.approx(0.375)
    assert floor_fraction(gblr, 0.25) == 0.375  # what the check computes, on the host
    assert "costs 0.3750" in next(r.getMessage() for r in caplog.records if "unreachable" in r.getMessage())


def test_budget_reads_nothing_back_per_step(monkeypatch) -> None:
    """Per optimizer step the callback only projects (on the device). Reachability is host arithmetic,
    checked once; the achieved budget is read back at train start and at the epoch end only."""
    import structlab.callbacks.structure as structure

    calls = {"budget_and_mean_width": 0, "floor_fraction": 0}
    for name in calls:
        real = getattr(structure, name)
        monkeypatch.setattr(
            structure, name, lambda *a, _n=name, _f=real: calls.__setitem__(_n, calls[_n] + 1) or _f(*a)
        )
    monkeypatch.setattr(structure, "_macs_fraction", None)  # the per-layer read-back: not used by GBLRBudget
    cb = GBLRBudget(budget=0.25)
    t = fit(module({"name": "gblr", "budget": 0.5}), [cb], batches=4)
    assert t.global_step == 4 and cb.projections == 5
    assert calls == {"budget_and_mean_width": 2, "floor_fraction": 1}


@pytest.mark.parametrize(
    ("accumulate", "every", "batches", "steps", "projections"),
    [
        (2, 1, 4, 2, 3),  # train start + one per optimizer step, not per batch
        (1, 2, 5, 5, 4),  # train start + steps 2 and 4 + train end (step 5 was not projected)
    ],
)
def test_projection_runs_once_per_optimizer_step(
    accumulate, every, batches, steps, projections, monkeypatch
) -> None:
    import structlab.layers.gblr_fit as gblr_fit

    calls: list[int] = []
    real = gblr_fit.project_widths  # what GBLRBudget's WidthProjection calls on the CPU
    monkeypatch.setattr(gblr_fit, "project_widths", lambda *a, **k: calls.append(1) or real(*a, **k))
    cb = GBLRBudget(budget=0.25, every_n_steps=every)
    t = fit(
        module({"name": "gblr", "budget": 0.5}), [cb], batches=batches, accumulate_grad_batches=accumulate
    )
    assert t.global_step == steps and cb.projections == len(calls) == projections


@pytest.mark.parametrize(
    ("schedule", "after_steps"),
    [
        ("exp", [10**0.5, 10.0, 10**1.5, 100.0]),  # 1·100^(t/4)
        ("linear", [25.75, 50.5, 75.25, 100.0]),  # 1 + 99·t/4
    ],
)
def test_sigma_follows_the_schedule(schedule: str, after_steps: list[float]) -> None:
    m = module({"name": "gblr", "budget": 0.5, "sigma": 1.0})
    rec = Record()
    t = fit(
        m, [SigmaAnneal(start=1.0, end=100.0, schedule=schedule), rec], batches=8, accumulate_grad_batches=2
    )
    assert t.estimated_stepping_batches == 4
    # every batch of an accumulation window runs with the σ of its optimizer step
    expected_forward = [1.0, 1.0] + [s for s in after_steps[:3] for _ in (0, 1)]
    assert rec.sigma_in_forward == pytest.approx(expected_forward, rel=1e-9)
    assert [r[3] for r in rec.rows[1::2]] == pytest.approx(after_steps, rel=1e-9)
    assert all(g.sigma == pytest.approx(100.0) for g in layers(m, GaudiGBLRLinear))
    assert t.callback_metrics["structure/sigma"].item() == pytest.approx(100.0)


def test_sigma_is_held_after_steps() -> None:
    cb = SigmaAnneal(start=2.0, end=50.0, schedule="exp", steps=2)
    rec = Record()
    fit(module({"name": "gblr", "budget": 0.5, "sigma": 2.0}), [cb, rec], batches=3)
    assert [r[3] for r in rec.rows] == pytest.approx([10.0, 50.0, 50.0])  # 2·25^(1/2), then held


def test_sharp_box_layers_keep_sigma_none() -> None:
    m = module({"name": "gblr", "budget": 0.5})  # sigma=None: exact boxes
    cb = SigmaAnneal(start=1.0, end=100.0)
    fit(m, [cb], batches=2)
    assert cb.layers == [] and all(g.sigma is None for g in layers(m, GaudiGBLRLinear))


def test_ternary_layers_are_redecomposed_after_each_step() -> None:
    m = module({"name": "tsvd", "qat": True, "tolerance": 0.05}, lr=0.05)
    before = {
        n: (x.u.clone(), x.scale.clone(), x.v.clone())
        for n, x in m.named_modules()
        if isinstance(x, TernaryLinear)
    }
    cb = TernaryRequantize()
    t = fit(m, [cb], batches=2)
    assert t.global_step == 2 and cb.redecompositions == 2
    ranks = []
    for name, x in m.named_modules():
        if not isinstance(x, TernaryLinear):
            continue
        u0, s0, v0 = before[name]
        w = x.weight.detach()
        err = float(torch.linalg.matrix_norm(w - x.dense_weight(), 2) / torch.linalg.matrix_norm(w, 2))
        stale = float(
            torch.linalg.matrix_norm(w - (u0.float() * s0) @ v0.float(), 2) / torch.linalg.matrix_norm(w, 2)
        )
        assert err <= 0.05 < stale  # the factors track the trained latent weight; the old ones would not
        assert x.rank != u0.shape[1] or not torch.equal(x.u, u0)
        assert x.u.dtype == torch.int8 and set(x.u.unique().tolist()) <= {-1, 0, 1}
        assert set(x.v.unique().tolist()) <= {-1, 0, 1}
        ranks.append(x.rank)
    assert t.callback_metrics["structure/tsvd_rank"].item() == pytest.approx(sum(ranks) / len(ranks))


def test_ternary_factors_come_from_rank_zero_under_ddp() -> None:
    """A non-zero rank installs what rank 0 broadcasts instead of decomposing itself."""
    torch.manual_seed(0)
    zero = TernaryLinear(24, 16, qat=True)
    other = copy.deepcopy(zero)
    with torch.no_grad():
        zero.weight.add_(0.2 * torch.randn_like(zero.weight))
        other.weight.copy_(zero.weight)
    sent: list = []

    def trainer(is_zero: bool) -> SimpleNamespace:
        broadcast = (lambda obj, src: sent.append(obj) or obj) if is_zero else (lambda obj, src: sent[0])
        return SimpleNamespace(
            world_size=2, is_global_zero=is_zero, strategy=SimpleNamespace(broadcast=broadcast)
        )

    for layer, is_zero in ((zero, True), (other, False)):
        cb = TernaryRequantize()
        cb.layers = [layer]
        cb.requantize(trainer(is_zero))
    assert (
        torch.equal(other.u, zero.u) and torch.equal(other.v, zero.v) and torch.equal(other.scale, zero.scale)
    )
    assert torch.equal(other.dense_weight(), zero.dense_weight())


def test_callbacks_idle_without_their_layers(caplog) -> None:
    m = module({"name": "tsvd", "tolerance": 0.2})  # post-training tsvd: nothing to re-decompose
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    cbs = [GBLRBudget(budget=0.25), SigmaAnneal(), TernaryRequantize()]
    with caplog.at_level(logging.DEBUG, logger="structlab.callbacks.structure"):
        t = fit(m, cbs, batches=2, limit_train_batches=2)
    idle = [r for r in caplog.records if "doing nothing" in r.getMessage()]
    assert [r.levelno for r in idle] == [logging.DEBUG] * 3  # every default run has them: not at INFO
    messages = [r.getMessage() for r in idle]
    assert "no gblr layer" in messages[0] and "quantisation-aware tsvd" in messages[2]
    assert cbs[0].projections == 0 and cbs[2].redecompositions == 0 and t.global_step == 2
    assert not any(k.startswith("structure/") for k in t.callback_metrics)
    changed = [
        k for k, v in m.state_dict().items() if k.endswith((".u", ".v")) and not torch.equal(v, weights[k])
    ]
    assert changed == [] and math.isfinite(t.callback_metrics["train/loss"].item())


def test_block_layout_counts_the_components_covering_each_cell() -> None:
    layer = GaudiGBLRLinear(64, 32, components=4, budget=0.5)
    with torch.no_grad():
        layer.widths.zero_()
        layer.locations.zero_()
        layer.widths[:, 0] = 0.5  # rows 0-15, columns 0-31
        layer.widths[:, 1] = torch.tensor([0.25, 1.0])  # rows 0-7, every column
        layer._set_live()
    cover = block_layout(layer)
    expected = torch.zeros(32, 64)
    expected[:16, :32] += 1
    expected[:8, :] += 1
    assert torch.equal(cover, expected)


def test_monitor_logs_scalars_and_images_to_wandb_and_png(tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    m = module({"name": "gblr", "budget": 0.5})
    logger = WandbLogger(project="structlab-test", save_dir=str(tmp_path), offline=True)
    monitor = StructureMonitor()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[monitor],
                        default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(m, DataLoader(data, batch_size=4))
    logger.experiment.finish()
    assert sorted(p.name for p in monitor.saved) == ["epoch000-budgets.png", "epoch000-gblr_layout.png"]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in monitor.saved)
    metrics = trainer.callback_metrics
    assert 0.45 < metrics["structure/macs_ratio"].item() <= 0.5
    assert "structure/blocks.0.mlp.fc1/mean_width" in metrics
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    images = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert {p.name.split("_")[0] for p in images} >= {"budgets", "gblr"}  # structure/<key>_<step>_<hash>.png
    records = next(run_dir.glob("run-*.wandb")).read_bytes()  # the offline run's history, to sync later
    assert b"structure/blocks.0.attn.qkv/macs_ratio" in records and b"structure/macs_ratio" in records
