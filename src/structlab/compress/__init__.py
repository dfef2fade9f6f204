"""Post-training compression: calibration statistics, low-rank and ternary factorisations of dense weights."""

from structlab.budget import budget_from_ratio, rank_from_ratio, ratio_from_budget
from structlab.compress.calibration import CalibrationStats
from structlab.compress.svd import asvd, output_error, plain_svd, whitened_svd
from structlab.compress.ternary import ternarize, ternary_decompose, ternary_stats

__all__ = [
    "CalibrationStats",
    "asvd",
    "budget_from_ratio",
    "output_error",
    "plain_svd",
    "rank_from_ratio",
    "ratio_from_budget",
    "ternarize",
    "ternary_decompose",
    "ternary_stats",
    "whitened_svd",
]
