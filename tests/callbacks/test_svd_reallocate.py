"""svd rank re-allocation during training (callbacks.svd_reallocate): the ranks `allocate_ranks` gives
for known spectra, each layer truncated to the best approximation of its new rank within the one
budget, inactive entries that stay zero while training goes on, DDP ranks that receive rank 0's
decision, a real run resumed at the active ranks, and the export / structure round trip."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from support import compose_train
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from structlab.budget import BudgetSchedule, allocate_ranks, macs_per_sample, model_cost
from structlab.callbacks import SVDReallocate
from structlab.callbacks.reallocate import restart_optimizer_state
from structlab.compress.quantize import as_linears
from structlab.layers.svd import LowRankLinear, reallocated_ranks
from structlab.surgery import load_compressed, model_structure, save_compressed
from structlab.tasks import ClassificationModule
from structlab.train import run

D = torch.float64
TARGETS = ["blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"]
TINY = {"name": "vit_fmnist_p7", "depth": 1, "embed_dim": 64, "num_heads": 2, "targets": TARGETS}
# qkv 64→192, proj 64→64, fc1 64→128, fc2 128→64 (MLP ratio 2): Σ dense MACs = 32768
DENSE = 12288 + 4096 + 2 * 8192


def with_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int) -> tuple[LowRankLinear, torch.Tensor]:
    """A float64 layer whose product is U diag(σ) Vᵀ (random orthonormal U, V), held as a generic
    factorisation (A = UΣR, B = R⁻¹Vᵀ: not the SVD's own split); returns it and U, σ, V as one W."""
    g = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=D))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=D))[0]
    r = torch.eye(k, dtype=D) + 0.3 * torch.randn(k, k, generator=g, dtype=D)
    layer = LowRankLinear(n, m, rank=k).double()
    with torch.no_grad():
        layer.A.copy_((u * sigma) @ r)
        layer.B.copy_(torch.linalg.solve(r, v.T))
        layer.bias.copy_(torch.randn(m, generator=g, dtype=D))
    return layer, (u, sigma, v)


def known_layers() -> tuple[nn.ModuleDict, dict[str, tuple]]:
    i24, i32 = torch.arange(24, dtype=D), torch.arange(32, dtype=D)
    spectra = {"steep": (48, 64, 0.7**i24), "flat": (64, 96, 1 - 0.01 * i24), "mid": (64, 64, 1 / (i32 + 1))}
    layers, svds = nn.ModuleDict(), {}
    for seed, (name, (m, n, sigma)) in enumerate(spectra.items()):
        layers[name], svds[name] = with_spectrum(m, n, sigma, seed)
    return layers, svds


def fake_trainer(step: int = 0, world: int = 1, zero: bool = True, broadcast=None, optimizers=()):
    return SimpleNamespace(
        global_step=step, world_size=world, is_global_zero=zero, optimizers=list(optimizers),
        strategy=SimpleNamespace(broadcast=broadcast),
    )  # fmt: skip


def callback_on(layers: nn.ModuleDict, **kw) -> SVDReallocate:
    cb = SVDReallocate(steps=[1], **kw)
    cb.names, cb.layers = list(layers), list(layers.values())
    return cb


def test_known_spectra_get_allocate_ranks_ranks_and_their_best_truncation() -> None:
    layers, svds = known_layers()
    # 48·64 + 64·96 + 64·64 = 13312 dense MACs; now 24·112 + 24·160 + 32·128 = 10624 (0.798)
    assert model_cost(layers)["budget"] == pytest.approx(10624 / 13312)
    x = torch.randn(5, 96, dtype=D)
    shapes = {name: (la.out_features, la.in_features) for name, la in layers.items()}
    for name, la in layers.items():  # the layer measures the σ² the allocation takes
        assert torch.allclose(la.spectrum(), svds[name][1].square(), rtol=1e-10, atol=1e-14)
    expected = allocate_ranks(shapes, {n: s[1].square() for n, s in svds.items()}, 0.25, multiple=4)
    assert expected == {"steep": 8, "flat": 12, "mid": 4}  # the flat spectrum needs the ranks

    cb = callback_on(layers, budget=0.25, rank_multiple=4)
    ranks = cb.reallocate(fake_trainer(step=1), 0.25)
    assert ranks == expected and {n: la.rank for n, la in layers.items()} == expected
    # 8·112 + 12·160 + 4·128 = 3328 = 0.25 · 13312: the budget met exactly, never exceeded
    assert model_cost(layers)["structured_macs_per_token"] == 3328
    assert model_cost(layers)["budget"] <= 0.25
    for name, la in layers.items():
        u, sigma, v = svds[name]
        k = expected[name]
        best = (u[:, :k] * sigma[:k]) @ v[:, :k].T  # Eckart–Young: the rank-k truncation of the old W
        assert (la.dense_weight() - best).abs().max().item() < 1e-12
        assert torch.allclose(la.A[:, :k].norm(dim=0), sigma[:k].sqrt(), rtol=1e-10)  # √Σ split
        assert not la.A[:, k:].any() and not la.B[k:].any() and la.A.shape[1] == la.capacity
        inputs = x[:, : la.in_features]
        assert (la(inputs) - (inputs @ best.T + la.bias)).abs().max().item() < 1e-12
        assert la.structure() == {"rank": la.capacity, "active_rank": k}
        assert la.num_params() == k * (la.in_features + la.out_features) + la.out_features


def test_ranks_only_shrink_and_keep_the_ones_the_budget_affords() -> None:
    layers, _ = known_layers()
    shapes = {name: (la.out_features, la.in_features) for name, la in layers.items()}
    raw = allocate_ranks(shapes, {n: la.spectrum() for n, la in layers.items()}, 0.9, multiple=4)
    assert raw == {"steep": None, "flat": 24, "mid": None}  # "dense" for the leftover budget
    assert reallocated_ranks(dict(layers), 0.9, multiple=4) == {"steep": 24, "flat": 24, "mid": 32}
    cb = callback_on(layers, budget=0.9, rank_multiple=4)
    before = {n: la.A.detach().clone() for n, la in layers.items()}
    cb.reallocate(fake_trainer(), 0.9)  # all kept: nothing re-factored, no buffer, the same factors
    assert all(torch.equal(la.A, before[n]) and la._active is None for n, la in layers.items())
    with pytest.raises(ValueError, match="can only keep or lower the rank"):
        layers["steep"].truncate(25)
    # rank 22, not a multiple of 4, with a flat spectrum: the step to 24 is taken and stays at 22
    flat, _ = with_spectrum(64, 64, torch.ones(22, dtype=D), 5)
    steep, _ = with_spectrum(64, 64, 0.5 ** torch.arange(32, dtype=D), 6)
    spectra = {"flat": flat.spectrum(), "steep": steep.spectrum()}
    assert allocate_ranks({"flat": (64, 64), "steep": (64, 64)}, spectra, 0.45, 4) == {"flat": 24, "steep": 4}
    assert reallocated_ranks({"flat": flat, "steep": steep}, 0.45, multiple=4) == {"flat": 22, "steep": 4}


def test_inactive_entries_stay_zero_and_the_cost_stays_down_while_training() -> None:
    torch.manual_seed(0)
    m = ClassificationModule(
        model=TINY, layer={"name": "svd", "init": "scratch", "budget": 0.6, "rank_multiple": 4},
        optimizer={"lr": 1e-2},
    )  # fmt: skip
    m.convert()
    # ⌊0.6·mn/(m+n)⌋ rounded down to 4: qkv 28, proj 16, fc1 and fc2 24
    assert model_cost(m.model)["budget"] == (28 * 256 + 16 * 128 + 2 * 24 * 192) / DENSE == 0.5625
    cb = SVDReallocate(steps=[2], budget=0.3, rank_multiple=4)

    class Record(L.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            svd = [x for x in pl_module.modules() if isinstance(x, LowRankLinear)]
            zero = all(not la.A[:, la.rank :].any() and not la.B[la.rank :].any() for la in svd)
            opt = trainer.optimizers[0]
            steps = {la.capacity > la.rank: {int(opt.state[p]["step"]) for p in (la.A, la.B)} for la in svd}
            self.rows.append((trainer.global_step, model_cost(pl_module.model)["budget"], zero, steps))

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 1, 28, 28, generator=g), torch.randint(0, 10, (24,), generator=g))
    rec = Record()
    t = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, callbacks=[cb, rec])  # fmt: skip
    t.fit(m, DataLoader(data, batch_size=4))
    assert t.global_step == 6 and [r[0] for r in rec.rows] == [1, 2, 3, 4, 5, 6]
    assert rec.rows[0][1] > 0.55 and all(r[1] <= 0.3 for r in rec.rows[1:])  # from step 2 on, ≤ β
    assert len({r[1] for r in rec.rows[1:]}) == 1  # and the ranks stay where they were put
    assert all(r[2] for r in rec.rows)  # the inactive entries are exactly zero after every step
    # Adam's state restarted at step 2 for the layers cut there (True) and only for them
    assert rec.rows[0][3] == {False: {1}} and rec.rows[1][3] == {True: {0}, False: {2}}
    assert rec.rows[-1][3] == {True: {4}, False: {6}}
    assert [s for s, *_ in cb.reallocations] == [2] and cb.reallocations[0][1] == 0.3
    assert t.callback_metrics["structure/svd_budget"].item() == pytest.approx(rec.rows[1][1])
    svd = dict(m.named_modules())
    # qkv gives up most; proj nothing: each of its 4 rank steps holds ~¼ of its energy for 512 MACs
    ranks = cb.reallocations[0][2]
    assert {n.split(".")[-1]: k for n, k in ranks.items()} == {"qkv": 4, "proj": 16, "fc1": 16, "fc2": 16}
    assert all(svd[n].rank == k for n, k in ranks.items())
    opt_state = t.optimizers[0].state
    cut = [svd[n] for n, k in ranks.items() if k < svd[n].capacity]
    assert len(cut) == 3 and all(not opt_state[la.A]["exp_avg"][:, la.rank :].any() for la in cut)  # Adam too


def test_a_schedule_shrinks_at_each_chosen_step_and_the_end_never_exceeds_beta() -> None:
    layers, _ = known_layers()
    cb = SVDReallocate(steps=[2, 4], budget=0.25, start_budget=0.7, schedule_steps=4, rank_multiple=4)
    cb.names, cb.layers = list(layers), list(layers.values())
    assert cb.schedule == BudgetSchedule(0.25, start=0.7, steps=4)
    cb.after_step(fake_trainer(step=1), SimpleNamespace(log=lambda *a, **k: None))
    assert cb.reallocations == []  # not a chosen step
    logged: dict = {}
    cb.after_step(fake_trainer(step=2), SimpleNamespace(log=lambda k, v, **_: logged.__setitem__(k, v)))
    assert logged["structure/svd_budget_target"] == pytest.approx(0.475)  # halfway from 0.7 to 0.25
    assert 0.4 < logged["structure/svd_budget"] <= 0.475
    cb.after_step(fake_trainer(step=4), SimpleNamespace(log=lambda k, v, **_: logged.__setitem__(k, v)))
    assert logged["structure/svd_budget"] == pytest.approx(0.25)  # 3328 / 13312, as above
    with pytest.raises(ValueError, match="add a step ≥ 10"):
        SVDReallocate(steps=[4], budget=0.3, start_budget=0.6, schedule_steps=10)
    # a run that stops before its re-allocation step is brought down to β at the end
    late, _ = known_layers()
    cb = SVDReallocate(steps=[100], budget=0.3, rank_multiple=4)
    cb.names, cb.layers = list(late), list(late.values())
    cb.on_train_end(fake_trainer(step=3), None)
    assert model_cost(late)["budget"] <= 0.3 and cb.reallocations[0][:2] == (3, 0.3)


def test_optimizer_state_restarts_for_the_given_parameters_only() -> None:
    a, b = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    for _ in range(3):
        (a.sum() + b.sum()).backward()
        opt.step()
    assert restart_optimizer_state([opt], [a]) == 1
    assert int(opt.state[a]["step"]) == 0 and not opt.state[a]["exp_avg"].any()
    assert not opt.state[a]["exp_avg_sq"].any() and int(opt.state[b]["step"]) == 3
    assert opt.state[b]["exp_avg"].abs().min() > 0
    before = a.detach().clone()
    a.grad.zero_()
    opt.step()  # fresh moments from a zero gradient: no update, only AdamW's decay of the values
    assert torch.allclose(a, before * (1 - 0.1 * 0.01))


def test_ddp_ranks_take_rank_zeros_ranks_and_factors() -> None:
    zero_layers, _ = known_layers()
    other_layers, _ = known_layers()
    with torch.no_grad():  # a last-bit difference: a rank deciding on its own could diverge
        other_layers["mid"].A.mul_(1 + 1e-12)
    sent: list = []

    def broadcast(is_zero: bool):
        return (lambda obj, src: sent.append(obj) or obj) if is_zero else (lambda obj, src: sent[0])

    for layers, is_zero in ((zero_layers, True), (other_layers, False)):
        cb = callback_on(layers, budget=0.25, rank_multiple=4)
        if not is_zero:
            for la in layers.values():  # the other ranks compute no spectrum
                la.spectrum = None
        cb.reallocate(fake_trainer(step=1, world=2, zero=is_zero, broadcast=broadcast(is_zero)), 0.25)
    for name in zero_layers:
        mine, theirs = zero_layers[name], other_layers[name]
        assert mine.rank == theirs.rank and torch.equal(mine.A, theirs.A) and torch.equal(mine.B, theirs.B)
        assert torch.equal(mine.active_rank, theirs.active_rank)


def test_export_and_structure_round_trip_at_the_active_ranks(tmp_path) -> None:
    torch.manual_seed(0)
    m = ClassificationModule(
        model=TINY, layer={"name": "svd", "init": "scratch", "budget": 0.6, "rank_multiple": 4}
    )
    m.convert()
    cb = SVDReallocate(steps=[1], budget=0.3, rank_multiple=4)
    cb.layers = cb.find_layers(m)
    ranks = cb.reallocate(fake_trainer(step=1), 0.3)
    model = m.model.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y = model(x)
    structure = model_structure(model)
    assert {n: s.get("active_rank", s["rank"]) for n, s in structure.items()} == {
        n[len("model.") :]: k for n, k in ranks.items()
    }
    assert sum("active_rank" in s for s in structure.values()) == 3  # proj keeps its 16 (see above)
    cost = model_cost(model)
    assert cost["budget"] <= 0.3
    # the trained form already runs at the active ranks: FlopCounterMode sees the truncated cost
    dense_macs = macs_per_sample(ClassificationModule(model=TINY).model.eval(), x)  # the MACs delta
    saved_macs = macs_per_sample(model, x)
    assert dense_macs - saved_macs == 17 * (
        cost["structured_dense_macs_per_token"] - cost["structured_macs_per_token"]
    )

    # save_compressed / load_compressed: a fresh dense model rebuilt at the same capacities and active ranks
    save_compressed(model, tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "structure.json").read_text()) == structure
    fresh = ClassificationModule(model=TINY).model.eval()
    load_compressed(fresh, tmp_path / "trained")
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    assert model_structure(fresh) == structure and model_cost(fresh) == cost

    # export: each layer sliced to its active rank (no padding left), the same function and MACs
    deployed = m.deployed()
    for name, la in deployed.named_modules():
        if isinstance(la, LowRankLinear):
            k = ranks["model." + name]
            assert la.A.shape == (la.out_features, k) and la.B.shape == (k, la.in_features)
            assert la.structure() == {"rank": k} and "active_rank" not in la.state_dict()
    with torch.no_grad():
        assert torch.allclose(deployed(x), y, atol=1e-5)
    assert macs_per_sample(deployed, x) == saved_macs
    assert model_cost(deployed)["structured_macs_per_token"] == cost["structured_macs_per_token"]
    save_compressed(deployed, tmp_path / "deployed")
    again = load_compressed(ClassificationModule(model=TINY).model.eval(), tmp_path / "deployed")
    with torch.no_grad():
        assert torch.equal(again(x), deployed(x))

    # int8's plain-linear form (compress.quantize) takes the active factors only
    plain = as_linears(next(x for x in model.modules() if isinstance(x, LowRankLinear)))
    first = next(x for x in model.modules() if isinstance(x, LowRankLinear))
    assert plain[0].weight.shape == (first.rank, first.in_features) and first.rank < first.capacity
    tokens = torch.randn(4, first.in_features)
    with torch.no_grad():
        assert torch.allclose(plain(tokens), first(tokens), atol=1e-6)

    # a plain state dict carries the active rank: it loads into a layer built at full rank, and back
    la = next(x for x in model.modules() if isinstance(x, LowRankLinear))
    full = LowRankLinear(la.in_features, la.out_features, rank=la.capacity)
    full.load_state_dict(la.state_dict())
    assert full.rank == la.rank < full.capacity and full.macs_per_token() == la.macs_per_token()
    full.load_state_dict(LowRankLinear(la.in_features, la.out_features, rank=la.capacity).state_dict())
    assert full.rank == full.capacity and "active_rank" not in full.state_dict()


def test_off_by_default_and_silent_without_svd_layers(caplog) -> None:
    cfg = compose_train()
    assert list(cfg.callbacks.svd_reallocate.steps) == []
    assert compose_train("layer=svd", "layer.budget=0.4").callbacks.svd_reallocate.budget == 0.4
    torch.manual_seed(0)
    m = ClassificationModule(model=TINY, layer={"name": "svd", "init": "scratch", "budget": 0.6})
    m.convert()
    off = SVDReallocate()  # steps=[]: not even a debug line
    dense = ClassificationModule(model=TINY)
    idle = SVDReallocate(steps=[1])
    with caplog.at_level(logging.DEBUG, logger="structlab.callbacks"):
        off.on_train_start(fake_trainer(), m)
        idle.on_train_start(fake_trainer(), dense)
    assert off.layers == [] and idle.layers == []
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]  # the idle one, at DEBUG only
    too_low = SVDReallocate(steps=[1], budget=0.01)
    with pytest.raises(ValueError, match="below one rank step of 8 per svd layer"):
        too_low.on_train_start(fake_trainer(), m)


def test_a_run_reallocates_and_resumes_at_the_active_ranks(tmp_path, fmnist_dir) -> None:
    """run.py's path in process: svd from scratch at β = 0.6, re-allocated at β = 0.3 after step 3;
    last.ckpt holds the active ranks (structure and buffers); a resume continues at them."""
    args = (
        f"paths.data_dir={fmnist_dir}", "task.data.val_size=200", "task.data.system_dir=null",
        "task.data.download=false", "debug=limit", "trainer.enable_progress_bar=false", "print_config=false",
        "run_name=svd", "layer=svd", "layer.init=scratch", "layer.budget=0.6",
        "callbacks.svd_reallocate.steps=[3]", "callbacks.svd_reallocate.budget=0.3",
    )  # fmt: skip
    summary = run(compose_train(*args, output_dir=tmp_path))
    assert summary["speed"]["epochs / steps"] == "2 / 8"
    assert summary["cost"]["budget (structured MACs / dense)"] <= 0.3
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    actives = {n: s["active_rank"] for n, s in saved["structure"].items() if "active_rank" in s}
    assert len(saved["structure"]) == 16 and len(actives) >= 8  # 4 blocks × 4 targets, most of them cut
    state = saved["state_dict"]
    for name, k in actives.items():
        assert int(state[f"model.{name}.active_rank"]) == k
        assert not state[f"model.{name}.A"][:, k:].any() and not state[f"model.{name}.B"][k:].any()
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        header = f.readline()
    assert "structure/svd_budget" in header

    resumed = run(compose_train(*args, "resume=true", "trainer.max_epochs=3", output_dir=tmp_path))
    assert resumed["speed"]["epochs / steps"] == "3 / 12"
    again = torch.load(last, map_location="cpu", weights_only=False)
    assert again["global_step"] == 12 and again["structure"] == saved["structure"]  # the ranks survived
    for name, k in actives.items():  # and their zero columns stayed zero through 4 more steps
        assert not again["state_dict"][f"model.{name}.A"][:, k:].any()
    assert (
        resumed["cost"]["budget (structured MACs / dense)"]
        == summary["cost"]["budget (structured MACs / dense)"]
    )
