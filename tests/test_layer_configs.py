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
    params = inspect.signature(layer_class(name).__init__).parameters
    for key, value in cfg.items():
        assert key in params, f"{name}.yaml: {key} is not an argument of {layer_class(name).__name__}"
        assert value == CONFIG_DEFAULTS.get((name, key), params[key].default), f"{name}.yaml: {key}"


@pytest.mark.parametrize("init", ["dense", "scratch"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_config_builds_layers(name: str, init: str) -> None:
    cfg = layer_cfg(name)
    cfg.pop("name")
    cfg["init"] = init
    if name == "gblr":
        cfg["fit_steps"] = 10  # the fit itself is tested in tests/layers/test_gblr.py
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 48))
    replaced = replace_layers(model, name, [r"\d"], **cfg)
    assert len(replaced) == 2 and all(v["layer"] == name for v in replaced.values())
    budget = model_cost(model)["budget"]
    assert 0.0 < budget <= (1.5 if name == "tsvd" else 0.5)  # tsvd's size follows its tolerance instead
    assert torch.isfinite(model(torch.randn(3, 48))).all()
