"""Per-task numerical parity: moved to the core, :mod:`invpt.compare`; this module re-exports it.

Kept so that ``from invpt.export.parity import Tolerance, compare_outputs, FP32_TOLERANCE, ParityReport`` keeps
working. New code imports :mod:`invpt.compare` (every stage can: it is the core).
"""
from __future__ import annotations

from invpt.compare import (
    FP32_TOLERANCE,
    TOLERANCES,
    ComparisonResult,
    ParityReport,
    TaskParity,
    Tolerance,
    compare_outputs,
    compare_task,
    decisions,
)

__all__ = [
    "FP32_TOLERANCE", "TOLERANCES", "ComparisonResult", "ParityReport", "TaskParity", "Tolerance",
    "compare_outputs", "compare_task", "decisions",
]
