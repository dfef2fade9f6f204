"""LightningModules: one per task; each owns model + loss + metrics, never its data."""

from structlab.tasks.classification import ClassificationModule

__all__ = ["ClassificationModule"]
