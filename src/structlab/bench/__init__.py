"""Inputs and helpers shared by benchmark scripts and tests."""

from structlab.bench.matrices import tsvd_reference_matrices

__all__ = ["tsvd_reference_matrices"]
