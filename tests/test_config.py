"""The global-batch rule, process counts and run identity."""

from __future__ import annotations

import pytest

from structlab.config import batch_plan, run_id, world_size


@pytest.mark.parametrize(
    "global_batch, per_device, world, expected",
    [
        (None, 128, 4, (128, 1)),
        (1024, 128, 1, (128, 8)),
        (1024, 128, 2, (128, 4)),
        (1024, 128, 8, (128, 1)),
        (1024, None, 2, (512, 1)),
        (1024, None, 1, (1024, 1)),
    ],
)
def test_batch_plan_keeps_the_global_batch(global_batch, per_device, world, expected):
    per, accumulate = batch_plan(global_batch, per_device, world)
    assert (per, accumulate) == expected
    if global_batch:
        assert per * accumulate * world == global_batch


def test_batch_plan_rejects_what_does_not_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        batch_plan(1000, 128, 2)
    with pytest.raises(ValueError, match="not divisible"):
        batch_plan(1000, None, 3)


def test_world_size():
    assert world_size(2, 1, "cpu") == 2 and world_size([0, 1, 2], 2, "gpu") == 6
    assert world_size("0,1", 1, "gpu") == 2 and world_size("auto", 1, "cpu") == 1


def test_run_id_is_stable_and_distinct(tmp_path):
    a = run_id("vit s/4 run", str(tmp_path / "a"))
    assert a == run_id("vit s/4 run", str(tmp_path / "a")) and a.startswith("vit-s-4-run-")
    assert a != run_id("vit s/4 run", str(tmp_path / "b"))
