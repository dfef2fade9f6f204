"""Post-training compression: calibration statistics, low-rank and ternary factorisations of dense
weights, and `compress_model`, which applies them to a whole model."""

from __future__ import annotations

from typing import Any

from structlab.budget import budget_from_ratio, rank_from_ratio, ratio_from_budget
from structlab.compress.calibration import CalibrationStats
from structlab.compress.svd import asvd, falor, output_error, plain_svd, refit_left, whitened_svd
from structlab.compress.ternary import ternarize, ternary_decompose, ternary_stats

__all__ = [
    "METHODS",
    "CalibrationStats",
    "CompressionReport",
    "LayerReport",
    "asvd",
    "compress_model",
    "falor",
    "quantize_model",
    "refit_left",
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

# compress_model builds layers, and the layers import the factorisations above: loaded on first use
_LAZY = {
    "METHODS": "model",
    "CompressionReport": "model",
    "LayerReport": "model",
    "compress_model": "model",
    "quantize_model": "quantize",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"structlab.compress.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'structlab.compress' has no attribute {name!r}")
