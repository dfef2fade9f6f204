"""The whole-global-batch limit (the run itself is tested in test_run.py)."""

from __future__ import annotations

import pytest

from structlab.callbacks.batches import whole_step_limit


@pytest.mark.parametrize(
    ("batches", "accumulate", "limit", "expected"),
    [
        (31, 2, 1.0, 30),
        (31, 2, 4, 4),
        (31, 2, 5, 4),
        (31, 3, 0.5, 15),
        (32, 2, 1.0, 32),
        (31, 1, 1.0, 31),
        (1, 2, 1.0, 0),
    ],
)
def test_whole_step_limit(batches: int, accumulate: int, limit: int | float, expected: int) -> None:
    assert whole_step_limit(batches, accumulate, limit) == expected
