"""Warnings invpt's own code must not raise: an export is quiet about torch.distributed's deprecated ``reduce_op``
(a whole export is watched in tests/test_export_memory.py).

The FutureWarning came from invpt's walk over every object the gc holds after an export (``release_exporter_state``):
an ``isinstance`` check against an ABC reads each object's ``__class__``, and one of those objects is the deprecated
``torch.distributed.reduce_op``, whose every attribute access warns.
"""
from __future__ import annotations

import warnings

import pytest

pytest.importorskip("onnxscript")


def _reduce_op_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning) and "reduce_op" in str(w.message)]


def test_the_deprecated_reduce_op_object_warns_when_touched():
    """The premise of the tests below: touching the object does warn, so their empty lists mean something."""
    import torch.distributed as dist

    if not hasattr(dist, "reduce_op"):
        pytest.skip("this torch has no torch.distributed.reduce_op")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist.reduce_op.__class__  # noqa: B018 (the attribute access is what warns)
    assert _reduce_op_warnings(caught)


def test_release_exporter_state_does_not_touch_reduce_op():
    from invpt.export.onnx_export import release_exporter_state

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        release_exporter_state()
    assert _reduce_op_warnings(caught) == []
