"""structlab's own callbacks; everything else comes from Lightning."""

from structlab.callbacks.batches import WholeGlobalBatches
from structlab.callbacks.consistency import CheckRankConsistency, RankDivergenceError
from structlab.callbacks.guards import NonFiniteLossError, StopOnNonFiniteLoss
from structlab.callbacks.monitor import StructureMonitor
from structlab.callbacks.reallocate import SVDReallocate
from structlab.callbacks.speed import SpeedMonitor
from structlab.callbacks.structure import GBLRBudget, SigmaAnneal, TernaryRequantize

__all__ = [
    "CheckRankConsistency",
    "GBLRBudget",
    "NonFiniteLossError",
    "RankDivergenceError",
    "SigmaAnneal",
    "SpeedMonitor",
    "StopOnNonFiniteLoss",
    "StructureMonitor",
    "SVDReallocate",
    "TernaryRequantize",
    "WholeGlobalBatches",
]
