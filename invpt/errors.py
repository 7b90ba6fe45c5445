"""The invpt error family.

Every user-facing failure raises a subclass of :class:`InvptError` whose message is one paragraph:
what failed, the observed value, and the fix. CLIs catch ``InvptError``, log the message and exit
non-zero; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class InvptError(Exception):
    """Base class of every error invpt reports to a user (bad input, bad file, bad config)."""

    exit_code = 2


class ConfigError(InvptError):
    """The configuration is invalid: unknown key, bad size, unknown task or dataset."""


class CheckpointError(InvptError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


class InputError(InvptError):
    """An input file (image, video, directory, calibration data) is missing or unreadable."""


class ExportError(InvptError):
    """ONNX export failed or produced a graph that does not pass its checks."""


class VerificationError(InvptError):
    """A produced artifact runs but its outputs do not match the reference within tolerance."""

    exit_code = 3


class ManifestError(InvptError):
    """A manifest is missing, unreadable, or of an unknown schema version."""


class DependencyError(InvptError):
    """An optional dependency (TensorRT, ModelOpt, ...) is not installed; the message names the extra."""
