"""CheckRankConsistency on fingerprints gathered from two "ranks" (the DDP run itself is in test_run.py)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from structlab.callbacks.consistency import CheckRankConsistency, RankDivergenceError, parameter_fingerprint
from structlab.layers import make_layer


def two_ranks(rank0: torch.nn.Module, rank1: torch.nn.Module) -> SimpleNamespace:
    gather = lambda _mine: torch.stack([parameter_fingerprint(rank0), parameter_fingerprint(rank1)])  # noqa: E731
    return SimpleNamespace(
        world_size=2, global_step=7, is_global_zero=True, strategy=SimpleNamespace(all_gather=gather)
    )


def test_identical_ranks_pass_even_with_an_infinite_buffer() -> None:
    layer = make_layer("gblr", 16, 24)  # sharp boxes: σ buffer = inf
    assert torch.isinf(layer.gaudi_sigma)
    check = CheckRankConsistency()
    check.check(two_ranks(layer, copy.deepcopy(layer)), layer)
    assert check.checks == 1


def test_a_moved_width_on_one_rank_fails() -> None:
    layer = make_layer("gblr", 16, 24)
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.widths[0, 3] += 1e-6
    with pytest.raises(RankDivergenceError, match="1 of 6 tensors differ"):
        CheckRankConsistency().check(two_ranks(layer, other), layer)
