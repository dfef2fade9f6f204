"""structlab's own callbacks; everything else comes from Lightning."""

from structlab.callbacks.consistency import CheckRankConsistency, RankDivergenceError
from structlab.callbacks.guards import NonFiniteLossError, StopOnNonFiniteLoss
from structlab.callbacks.speed import SpeedMonitor

__all__ = ["CheckRankConsistency", "NonFiniteLossError", "RankDivergenceError", "SpeedMonitor", "StopOnNonFiniteLoss"]
