"""Model registry; importing this package registers every architecture."""

from structlab.models import gpt2, pi3, vit  # noqa: F401  (registers)
from structlab.models.registry import MODELS, build_model, register_model

__all__ = ["MODELS", "build_model", "register_model"]
