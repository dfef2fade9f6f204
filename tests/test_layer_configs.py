"""configs/layer/*.yaml: every key is a real argument of its layer, with the code's default, and
both init modes build working layers from the config alone."""

from __future__ import annotations

import inspect

import pytest
import torch
from omegaconf import OmegaConf
from support import CONFIGS, compose_train
from torch import nn

from structlab.budget import model_cost
from structlab.layers import layer_class
from structlab.surgery import replace_layers
from structlab.tasks.structured import CONVERSION_KEYS

STRUCTURED = ("svd", "tsvd", "gblr")
# Deliberate differences from the constructor's defaults (none at present).
CONFIG_DEFAULTS: dict[tuple[str, str], object] = {}


def layer_cfg(name: str) -> dict:
    return OmegaConf.to_container(compose_train(f"layer={name}").layer, resolve=True)


def test_every_layer_type_has_a_config() -> None:
    assert {p.stem for p in (CONFIGS / "layer").glob("*.yaml")} == {"dense", *STRUCTURED}


@pytest.mark.parametrize("name", STRUCTURED)
def test_keys_are_constructor_arguments_with_their_defaults(name: str) -> None:
    cfg = layer_cfg(name)
    assert cfg.pop("name") == name and cfg.pop("init") == "dense"
    conversion = {k: cfg.pop(k) for k in CONVERSION_KEYS if k in cfg}  # read by the conversion, not the layer
    assert conversion == (CONVERSION_KEYS if name == "svd" else {})
    params = inspect.signature(layer_class(name).__init__).parameters
    for key, value in cfg.items():
        assert key in params, f"{name}.yaml: {key} is not an argument of {layer_class(name).__name__}"
        assert value == CONFIG_DEFAULTS.get((name, key), params[key].default), f"{name}.yaml: {key}"


@pytest.mark.parametrize("init", ["dense", "scratch"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_config_builds_layers(name: str, init: str) -> None:
    cfg = layer_cfg(name)
    cfg.pop("name")
    for (
        key
    ) in CONVERSION_KEYS:  # StructuredModule.convert's (compress_model's), see tests/tasks/test_finetune.py
        cfg.pop(key, None)
    cfg["init"] = init
    if name == "gblr":
        cfg["fit_steps"] = 10  # the fit itself is tested in tests/layers/test_gblr.py
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 48))
    replaced = replace_layers(model, name, [r"\d"], **cfg)
    assert len(replaced) == 2 and all(v["layer"] == name for v in replaced.values())
    budget, dense = model_cost(model)["budget"], 2 * 48 * 64
    layers = [model[0], model[2]]
    if name == "svd":  # default β = 0.5: rank ⌊0.5·48·64/112⌋ = 13 → 8 (a multiple of 8)
        assert [m.rank for m in layers] == [8, 8] and budget == 2 * 8 * 112 / dense
    elif name == "tsvd":  # sized by its tolerance: charged ⌈(nnz(U)+nnz(V))/2⌉ + rank MACs per layer
        charged = sum((int((m.u != 0).sum()) + int((m.v != 0).sum()) + 1) // 2 + m.rank for m in layers)
        assert budget == charged / dense
        assert 0.78 < budget < 0.85  # tolerance 0.05 on a random 48×64 layer: 0.81 (dense), 0.82 (scratch)
    else:  # gblr's init / fit spends at most layer.budget = 0.5: 0.499 (dense), 0.479 (scratch)
        assert 0.45 < budget <= 0.5
    assert torch.isfinite(model(torch.randn(3, 48))).all()
