"""Lightning callbacks for dpvae training.

In a checkout this is the top-level ``callbacks/`` folder; it is installed as ``dpvae.callbacks``
(the only name it is imported by). Every callback of a run is named in the ``callbacks:`` section of
``conf/train.yaml``.
"""

from __future__ import annotations

from .best_weights import BestWeights
from .checkpoint import RunCheckpoint
from .early_stopping import WarmupEarlyStopping
from .freeze import Freeze
from .report import Report
from .run_state import RunState
from .spatial_validation import SpatialValidation
from .validation_schedule import ValidationSchedule

__all__ = [
    "BestWeights",
    "Freeze",
    "Report",
    "RunCheckpoint",
    "RunState",
    "SpatialValidation",
    "ValidationSchedule",
    "WarmupEarlyStopping",
]
