"""Helpers shared by the invpt benchmarks (export, calibration, ...).

Everything here is standard library only, so a benchmark can import it before torch/onnxruntime:

* :func:`environment`: CPU model, core counts, memory, load average, Python and package versions, git commit;
* :func:`timing_stats` / :func:`time_interleaved`: warm-up then timed runs, several backends interleaved
  (A, B, A, B, ...) so slow drift of a shared machine biases every backend alike;
* :func:`write_json_atomic`: JSON written to a temp file in the target folder, fsynced, then renamed;
* :func:`markdown_table`, :func:`fmt_seconds`, :func:`fmt_bytes`: report formatting.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGES = ("torch", "torchvision", "timm", "numpy", "onnx", "onnxruntime", "onnxscript", "onnxslim", "invpt")
SHARED_MACHINE_NOTE = (
    "Timings were taken on a shared 2-core CPU machine where other work may run at the same time; they are noisy "
    "(run-to-run variation of 2-6x has been seen on these machines) and are indicative only. Compare medians "
    "of runs taken in the same process, not absolute numbers across runs."
)


# ----------------------------------------------------------------------------------------------- environment

def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def package_versions(names: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, Optional[str]]:
    """Installed distribution versions (None when not installed); does not import the packages."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(repo: Path = REPO) -> Optional[dict[str, Any]]:
    """HEAD commit and whether the working tree has local changes (None outside a git checkout)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=20)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(packages: Iterable[str] = DEFAULT_PACKAGES, **extra: Any) -> dict[str, Any]:
    """Everything a reader needs to judge a timing: hardware, load, software versions, thread settings."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    env = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "mem_total_bytes": _meminfo_bytes("MemTotal"),
        "mem_available_bytes": _meminfo_bytes("MemAvailable"),
        "load_average_1_5_15": load_average(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(packages),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "git": git_revision(),
        "gpu": None,
    }
    env.update(extra)
    return env


def environment_markdown(env: Mapping[str, Any]) -> str:
    """The environment as a short fenced block for a report."""
    pk = env.get("packages", {})
    mem = env.get("mem_total_bytes")
    git = env.get("git") or {}
    lines = [
        f"CPU:       {env.get('cpu_model')} ({env.get('cpu_count')} logical cores, {env.get('cpu_usable')} usable)",
        f"Memory:    {fmt_bytes(mem) if mem else '?'} total",
        f"Load avg:  {env.get('load_average_1_5_15')} (1/5/15 min, at start)",
        f"Python:    {env.get('python')} on {env.get('platform')}",
        "Packages:  " + ", ".join(f"{k} {v}" for k, v in pk.items() if v),
    ]
    for key in ("threads", "torch_threads", "ort_intra_op_threads"):
        if key in env:
            lines.append(f"{key + ':':<10} {env[key]}")
    if git:
        lines.append(f"Git:       {git.get('commit', '?')[:12]}{' (local changes)' if git.get('dirty') else ''}")
    return "```\n" + "\n".join(lines) + "\n```"


def command_line() -> str:
    """The command that started this process, shell-quoted (``python -m pkg.mod ...`` for module runs)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    argv = ["python", "-m", spec.name, *sys.argv[1:]] if spec is not None and spec.name else ["python", *sys.argv]
    return " ".join(shlex.quote(a) for a in argv)


# ----------------------------------------------------------------------------------------------- timing

@dataclass
class TimingStats:
    """Wall-clock statistics of the timed runs (seconds); warm-up runs are listed but not counted."""

    runs: list[float]
    warmup: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds (all threads) of each timed run

    @property
    def cores_busy(self) -> float:
        """Mean process CPU time / wall time over the timed runs: ~threads when the work had the cores to itself,
        lower when threads waited (e.g. for cores taken by other jobs)."""
        if not self.cpu or not self.runs:
            return math.nan
        return sum(self.cpu) / sum(self.runs)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.runs) if self.runs else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (0 for a single run)."""
        return statistics.stdev(self.runs) if len(self.runs) > 1 else 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else math.nan

    @property
    def min(self) -> float:
        return min(self.runs) if self.runs else math.nan

    @property
    def max(self) -> float:
        return max(self.runs) if self.runs else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean_s": self.mean, "std_s": self.std, "median_s": self.median, "min_s": self.min,
                "max_s": self.max, "runs_s": list(self.runs), "warmup_s": list(self.warmup),
                "cpu_s": list(self.cpu), "cores_busy": self.cores_busy}

    def summary(self) -> str:
        return (f"median {fmt_seconds(self.median)} (mean {fmt_seconds(self.mean)} ± {fmt_seconds(self.std)}, "
                f"min {fmt_seconds(self.min)}; n={self.n}"
                + (f"; {self.cores_busy:.2f} cores busy)" if self.cpu else ")"))


def timing_stats(fn: Callable[[], Any], runs: int, warmup: int = 1) -> TimingStats:
    """Time ``fn()`` ``runs`` times after ``warmup`` untimed-in-stats calls."""
    return time_interleaved({"fn": fn}, runs, warmup)["fn"]


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    runs: int,
    warmup: int = 1,
    on_run: Optional[Callable[[str, str, int, float], None]] = None,
) -> dict[str, TimingStats]:
    """Warm up each backend, then time them round-robin (A, B, C, A, B, C, ...), ``runs`` rounds.

    Interleaving makes slow drift (thermal, other jobs on a shared machine) hit every backend alike instead
    of biasing whichever ran last. ``on_run(name, phase, index, seconds)`` is called after each call
    (``phase`` is ``"warmup"`` or ``"timed"``), e.g. for progress logging. Process CPU time of each timed
    call is recorded too (see :attr:`TimingStats.cores_busy`).
    """
    stats = {name: TimingStats(runs=[], warmup=[], cpu=[]) for name in fns}
    for phase, count in (("warmup", warmup), ("timed", runs)):
        for i in range(count):
            for name, fn in fns.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                cpu = time.process_time() - c0
                if phase == "warmup":
                    stats[name].warmup.append(dt)
                else:
                    stats[name].runs.append(dt)
                    stats[name].cpu.append(cpu)
                if on_run:
                    on_run(name, phase, i, dt)
    return stats


# ----------------------------------------------------------------------------------------------- output

def _json_safe(obj: Any) -> Any:
    """Non-finite floats become None (strict JSON); dataclasses, paths, tuples and numpy scalars are converted."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return _json_safe(asdict(obj))
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        try:
            return _json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    return obj


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented strict JSON; readers never see a partial file (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the result file the usual permissions
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(obj), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are str()-ed and '|' escaped."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(out)


def fmt_seconds(s: Optional[float]) -> str:
    """Human time: '12.3 s', '456 ms', '7.89 ms', '12 µs'."""
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_bytes(n: Optional[float]) -> str:
    """Human size in binary units: '1.55 GiB'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 1000 else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n} B"


def peak_rss(reset: bool = False) -> Optional[int]:
    """This process's peak RSS (VmHWM, bytes) since the last reset; ``reset`` starts a new window (Linux)."""
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return peak
    except (OSError, StopIteration):
        return None


def make_photo_crops(folder: Path, n: int, size: Sequence[int]) -> None:
    """``n`` calibration images: seeded square crops of the photos in assets/, resized to ``size`` (H, W)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    photos = [cv2.imread(str(p)) for p in sorted((REPO / "assets").glob("*.jpg"))]
    for i in range(n):
        img = photos[i % len(photos)]
        s = int(rng.integers(min(img.shape[:2]) // 2, min(img.shape[:2])))
        y, x = rng.integers(0, img.shape[0] - s + 1), rng.integers(0, img.shape[1] - s + 1)
        cv2.imwrite(str(folder / f"img{i:03d}.png"), cv2.resize(img[y:y + s, x:x + s], (size[1], size[0])))
