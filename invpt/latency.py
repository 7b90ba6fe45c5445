"""Latency statistics of a runner: per-iteration wall times in, mean / percentiles / throughput out.

What is timed is :meth:`invpt.runners.Runner.infer` end to end: host arrays in, host arrays out (for a GPU backend
this includes the copies, like Polygraphy's runner timings and trtexec's "host latency"). The feed is checked once
before timing, not in every iteration. Warm-up iterations run first and are kept apart from the statistics.

Several runners are timed interleaved (A, B, C, A, B, C, ...) so slow drift of a shared machine (thermal state,
other jobs) hits every runner alike instead of biasing whichever ran last.

Percentiles are numpy's (``np.percentile``, linear interpolation); ``std`` is the sample standard deviation
(``ddof=1``, 0 for a single iteration); ``throughput`` is images per second: ``batch / mean``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np

from invpt.errors import InputError

if TYPE_CHECKING:
    from invpt.runners import Feed, Runner

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class LatencyStats:
    """Statistics of the timed iterations (seconds). ``batch`` images per iteration."""

    times_s: tuple[float, ...]
    batch: int = 1
    warmup_s: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        times = tuple(float(t) for t in self.times_s)
        if not times:
            raise InputError("Latency statistics need at least one timed iteration (iters >= 1).")
        if not all(math.isfinite(t) and t >= 0 for t in times):
            raise InputError(f"Latency times must be finite and >= 0 seconds, got {[t for t in times if not (math.isfinite(t) and t >= 0)][:3]}.")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise InputError(f"Latency batch must be an integer >= 1, got {self.batch!r}.")
        object.__setattr__(self, "times_s", times)
        object.__setattr__(self, "warmup_s", tuple(float(t) for t in self.warmup_s))

    @property
    def n(self) -> int:
        return len(self.times_s)

    @property
    def mean(self) -> float:
        return float(np.mean(self.times_s))

    @property
    def std(self) -> float:
        return float(np.std(self.times_s, ddof=1)) if self.n > 1 else 0.0

    @property
    def min(self) -> float:
        return float(np.min(self.times_s))

    @property
    def max(self) -> float:
        return float(np.max(self.times_s))

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of the iteration times, numpy's linear method."""
        if not 0 <= q <= 100:
            raise InputError(f"A percentile must be between 0 and 100, got {q}.")
        return float(np.percentile(self.times_s, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def median(self) -> float:
        return self.p50

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p95(self) -> float:
        return self.percentile(95)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def throughput(self) -> float:
        """Images per second at this batch: ``batch / mean`` (inf when the mean time is 0)."""
        return self.batch / self.mean if self.mean > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Milliseconds (``*_ms``), images/s, and the raw per-iteration seconds."""
        ms = {f"{k}_ms": getattr(self, k) * 1e3 for k in ("mean", "std", "min", "max")}
        ms.update({f"p{q}_ms": self.percentile(q) * 1e3 for q in PERCENTILES})
        return {"iterations": self.n, "batch": self.batch, **ms, "throughput_ips": self.throughput,
                "times_s": list(self.times_s), "warmup_s": list(self.warmup_s)}

    def summary(self) -> str:
        """One line, trtexec style."""
        return (f"mean {self.mean * 1e3:.3f} ms, p50 {self.p50 * 1e3:.3f}, p90 {self.p90 * 1e3:.3f}, "
                f"p95 {self.p95 * 1e3:.3f}, p99 {self.p99 * 1e3:.3f}, min {self.min * 1e3:.3f}, "
                f"max {self.max * 1e3:.3f} ms (std {self.std * 1e3:.3f} ms; n={self.n}, batch {self.batch}: "
                f"{self.throughput:.2f} img/s)")


def latency_stats(times_s: Sequence[float], batch: int = 1, warmup_s: Sequence[float] = ()) -> LatencyStats:
    """:class:`LatencyStats` of per-iteration times in seconds."""
    return LatencyStats(tuple(times_s), batch, tuple(warmup_s))


def _check_counts(warmup: int, iters: int) -> None:
    if not isinstance(iters, int) or iters < 1:
        raise InputError(f"iters must be an integer >= 1, got {iters!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"warmup must be an integer >= 0, got {warmup!r}.")


def _batch_of(runner: "Runner", feed: "Feed") -> int:
    first = feed[runner.inputs[0].name]
    return int(first.shape[0]) if getattr(first, "ndim", 0) >= 1 else 1


def time_interleaved(
    runners: Sequence["Runner"] | Mapping[str, "Runner"],
    feed: "Feed",
    warmup: int = 10,
    iters: int = 100,
    *,
    feeds: Optional[Mapping[str, "Feed"]] = None,
    on_iteration: Optional[Callable[[str, str, int, float], None]] = None,
) -> dict[str, LatencyStats]:
    """Time several runners round-robin on ``feed`` (or ``feeds[name]`` per runner): warm-up rounds, then ``iters``
    timed rounds. Runners not yet active are activated for the call (all at once: they must fit in memory together)
    and deactivated after. Returns ``name -> LatencyStats`` (names: the mapping's keys, else each runner's name).

    ``on_iteration(name, phase, index, seconds)`` is called after each iteration (``phase``: warmup or timed).
    """
    _check_counts(warmup, iters)
    named = dict(runners) if isinstance(runners, Mapping) else {}
    if not isinstance(runners, Mapping):
        for r in runners:
            if r.name in named:
                raise InputError(f"Two runners are named '{r.name}'; give them distinct names (name=...) or pass a "
                                 "mapping of name to runner.")
            named[r.name] = r
    if not named:
        raise InputError("time_interleaved needs at least one runner.")
    import contextlib

    with contextlib.ExitStack() as stack:
        checked: dict[str, dict] = {}
        for key, runner in named.items():
            stack.enter_context(runner.activated())
            checked[key] = runner.check_inputs(feeds[key] if feeds is not None and key in feeds else feed)
        times: dict[str, dict[str, list[float]]] = {k: {"warmup": [], "timed": []} for k in named}
        for phase, count in (("warmup", warmup), ("timed", iters)):
            for i in range(count):
                for key, runner in named.items():
                    t0 = time.perf_counter()
                    runner.infer(checked[key], check=False)
                    dt = time.perf_counter() - t0
                    times[key][phase].append(dt)
                    if on_iteration is not None:
                        on_iteration(key, phase, i, dt)
        return {k: LatencyStats(tuple(times[k]["timed"]), _batch_of(named[k], checked[k]), tuple(times[k]["warmup"]))
                for k in named}


def time_runner(runner: "Runner", feed: "Feed", warmup: int = 10, iters: int = 100,
                on_iteration: Optional[Callable[[str, str, int, float], None]] = None) -> LatencyStats:
    """Latency of ``runner.infer(feed)``: ``warmup`` untimed iterations, then ``iters`` timed ones. The feed is
    checked once first; the runner is activated for the call when it is not active."""
    return time_interleaved({runner.name: runner}, feed, warmup, iters, on_iteration=on_iteration)[runner.name]
