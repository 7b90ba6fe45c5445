"""One phase timer for every stage: seconds (and the process's peak RSS so far) per named phase.

A stage wraps each step in ``with timer.phase("convert"):``; the seconds go into the stage's result and its
manifest (``timings``), and benchmarks read them from there instead of patching the stage's internals.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (VmHWM on Linux; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class PhaseTimer:
    """Wall-clock seconds per phase, ``<name>_s`` keys in run order; a phase entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"{name}_s"
            self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - start, 3)
            self.peak_rss[key] = peak_rss_bytes()

    @property
    def total(self) -> float:
        return round(sum(self.seconds.values()), 3)

    def to_dict(self) -> dict:
        """What a manifest records: seconds per phase, their total, and the peak RSS reached by the end of each."""
        return {"seconds": dict(self.seconds), "total_s": self.total, "peak_rss_bytes": dict(self.peak_rss)}
