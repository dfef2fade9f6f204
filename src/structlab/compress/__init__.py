"""Post-training compression: calibration statistics and low-rank factorisations of dense weights."""

from structlab.budget import budget_from_ratio, rank_from_ratio, ratio_from_budget
from structlab.compress.calibration import CalibrationStats
from structlab.compress.svd import asvd, output_error, plain_svd, whitened_svd

__all__ = [
    "CalibrationStats",
    "asvd",
    "budget_from_ratio",
    "output_error",
    "plain_svd",
    "rank_from_ratio",
    "ratio_from_budget",
    "whitened_svd",
]
