"""Structured linear layers: one base class, one registry, one module per type."""

from structlab.layers import dense, gblr, svd, tsvd  # noqa: F401  (each registers its layer type)
from structlab.layers.base import StructuredLinear, dense_parts, set_optim
from structlab.layers.registry import LAYERS, layer_class, make_layer, register_layer

__all__ = [
    "LAYERS",
    "StructuredLinear",
    "dense_parts",
    "layer_class",
    "make_layer",
    "register_layer",
    "set_optim",
]
