"""LightningModules: one per task, each a thin layer (loss, metrics, batch format) over the shared
StructuredModule (surgery, checkpointed structure, compile, optimizer)."""

from structlab.tasks.classification import ClassificationModule
from structlab.tasks.depth import DepthModule
from structlab.tasks.language_modeling import LanguageModelingModule
from structlab.tasks.structured import StructuredModule

__all__ = ["ClassificationModule", "DepthModule", "LanguageModelingModule", "StructuredModule"]
