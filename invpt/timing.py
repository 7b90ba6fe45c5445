"""One phase timer for every stage: seconds and memory per named phase.

A stage wraps each step in ``with timer.phase("convert"):``; the seconds and the memory figures go into the stage's
result and its manifest (``timings``), and benchmarks read them from there instead of patching the stage's internals.

Memory per phase (Linux; elsewhere only the process's peak so far): the resident set when the phase started, the
process's peak so far when it ended, and the peak *within* the phase. The latter is exact when the process's peak
rose during the phase (the peak then happened in it); a timer made with ``reset_peak=True`` (benchmarks) resets the
kernel's peak counter (``/proc/self/clear_refs``) at every phase boundary, so it is exact for every phase, and keeps
the process's overall peak itself (the kernel's counter, hence ``ru_maxrss``, then only covers the last window).
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional


def _status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (empty where it cannot be read)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (VmHWM on Linux; ru_maxrss elsewhere)."""
    hwm = _status_kib("VmHWM").get("VmHWM")
    if hwm is not None:
        return hwm * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def rss_bytes() -> Optional[int]:
    """This process's current resident set size (VmRSS), or None where /proc is not available."""
    rss = _status_kib("VmRSS").get("VmRSS")
    return None if rss is None else rss * 1024


def reset_peak_rss() -> bool:
    """Start a new window for the kernel's peak RSS counter (VmHWM) of this process; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhaseTimer:
    """Wall-clock seconds and memory per phase, ``<name>_s`` keys in run order; a phase entered twice adds up (its
    memory figures are then the larger of the two). Phases may nest."""

    def __init__(self, reset_peak: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}  # the process's peak so far when the phase ended
        self.phase_peak_rss: dict[str, int] = {}  # the peak within the phase (see the module docstring)
        self.start_rss: dict[str, int] = {}  # resident set when the phase (first) started
        self.reset_peak = reset_peak
        self._peak = 0  # the process's peak over every window the timer has seen
        self._open: list[list] = []  # [key, peak within the phase so far, peak so far when it started]

    def _sample_peak(self) -> int:
        """Read the kernel's peak, fold it into every open phase and the overall peak, and (reset_peak) reset it."""
        hwm = peak_rss_bytes()
        self._peak = max(self._peak, hwm)
        for entry in self._open:
            entry[1] = max(entry[1], hwm)
        if self.reset_peak:
            reset_peak_rss()
        return hwm

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        key = f"{name}_s"
        before = self._sample_peak()
        rss = rss_bytes()
        if rss is not None and key not in self.start_rss:
            self.start_rss[key] = rss
        entry = [key, 0, before]
        self._open.append(entry)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - start, 3)
            self._sample_peak()
            self._open.remove(entry)
            self.peak_rss[key] = max(self.peak_rss.get(key, 0), self._peak)
            within = entry[1] if (self.reset_peak or entry[1] > entry[2]) else None
            if within:
                self.phase_peak_rss[key] = max(self.phase_peak_rss.get(key, 0), within)

    @property
    def total(self) -> float:
        return round(sum(self.seconds.values()), 3)

    @property
    def process_peak_rss(self) -> int:
        """The process's peak RSS over everything the timer has seen (and the kernel's current window)."""
        return max(self._peak, peak_rss_bytes())

    def to_dict(self) -> dict:
        """What a manifest records: seconds per phase, their total, the peak RSS reached by the end of each phase,
        the peak within each phase (where known), the RSS at each phase's start, and the process's peak."""
        return {"seconds": dict(self.seconds), "total_s": self.total, "peak_rss_bytes": dict(self.peak_rss),
                "phase_peak_rss_bytes": dict(self.phase_peak_rss), "start_rss_bytes": dict(self.start_rss),
                "process_peak_rss_bytes": self.process_peak_rss}
