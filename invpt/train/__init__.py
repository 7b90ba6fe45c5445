"""Training and evaluation of InvPT (``invpt-train``, ``invpt-eval``).

Public API: :func:`train` with :class:`TrainOptions` (the official recipe by default; single process, or one process
per GPU under ``torchrun``), :func:`evaluate` (official metrics of a model on a dataset), :func:`build_criterion`
(the official multi-task loss) and :func:`build_evaluator` (the official metrics).
Names are imported on first use (PEP 562), so importing the package (and ``invpt-train --help``) stays fast.
"""
from invpt.lazy import lazy_face

_EXPORTS = {
    "build_criterion": "invpt.train.losses",
    "MultiTaskLoss": "invpt.train.losses",
    "build_evaluator": "invpt.train.metrics",
    "MultiTaskEvaluator": "invpt.train.metrics",
    "TrainOptions": "invpt.train.options",
    "TrainResult": "invpt.train.loop",
    "TrainingDivergedError": "invpt.errors",
    "load_backbone_weights": "invpt.train.loop",
    "train": "invpt.train.loop",
    "evaluate": "invpt.train.evaluate",
    "write_report": "invpt.train.evaluate",
}
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
