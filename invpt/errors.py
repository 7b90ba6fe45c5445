"""The invpt error family.

Every user-facing failure raises a subclass of :class:`InvptError` whose message is one paragraph:
what failed, the observed value, and the fix. CLIs catch ``InvptError``, log the message and exit
non-zero (2 bad input, 3 outside tolerance, 4 :class:`ToolError`: a library we call failed, traceback kept for
-v and --log-file); anything else is a bug and keeps its traceback.
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


class TrainingDivergedError(InvptError):
    """The training loss became NaN or Inf; the run stopped before the step that would have corrupted the weights.

    Exit 2 like the other errors the user fixes (``invpt-train`` documents it so): the cause is the run's settings
    or data (learning rate, ``--bf16``, labels), the last good checkpoint is kept, and the message says how to resume.
    """


class ManifestError(InvptError):
    """A manifest is missing, unreadable, or of an unknown schema version."""


class DependencyError(InvptError):
    """An optional dependency (TensorRT, ModelOpt, ...) is not installed; the message names the extra."""


class ToolError(InvptError):
    """A library invpt calls (ONNX, ONNX Runtime, ModelOpt, ...) failed on input invpt had already checked.

    Not the user's mistake: the message names the library, its version and the first line of its error, and asks
    for a report; ``invpt-*`` commands show the chained traceback with ``-v`` and always write it to ``--log-file``.
    Build one with :meth:`from_exception`.
    """

    exit_code = 4

    def __init__(self, message: str, library: str = "", version: str = "") -> None:
        super().__init__(message)
        self.library = library
        self.version = version

    @classmethod
    def from_exception(cls, library: str, action: str, err: BaseException,
                       distribution: str | None = None) -> "ToolError":
        """``library`` (display name; ``distribution``, default ``library``, is looked up for the version) failed
        while ``action`` (e.g. "quantizing 'm.onnx' to INT8") with ``err``; raise the result ``from err``."""
        version = library_version(distribution or library)
        text = str(err).strip()
        first = text.splitlines()[0][:300] if text else "(no message)"
        return cls(
            f"{library} {version} failed while {action}: {type(err).__name__}: {first}. This is a failure inside "
            f"{library}, not a problem invpt found with your input: re-run with -v to see the full traceback (or "
            "--log-file FILE to save it) and report it with the command line and that traceback.",
            library=library, version=version,
        )


def library_version(distribution: str) -> str:
    """The installed version of ``distribution`` (e.g. ``nvidia-modelopt``), or ``"(version unknown)"``."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(version unknown)"
