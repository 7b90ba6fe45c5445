"""Where training reports go: a per-iteration CSV (always), TensorBoard (optional), and console progress.

Only rank 0 creates these. The CSV is the record a resumed run continues: on resume, rows after the checkpoint's
iteration (written by the interrupted run after its last checkpoint) are dropped, so the file reads as one run.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from invpt.atomic import write_atomic
from invpt.errors import DependencyError, InputError

_logger = logging.getLogger("invpt.train")

LOG_NAME = "train_log.csv"
BASE_COLUMNS = ("iteration", "epoch", "lr", "seconds")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


class CsvLog:
    """Append-only per-iteration CSV: ``iteration, epoch, lr, seconds, <loss columns>``.

    Each row is one ``write`` of a complete line followed by a flush, so a killed run leaves whole rows. The loss
    columns are fixed by the first row (the criterion's keys: ``total``, then per task and ``inter_<task>``).
    """

    def __init__(self, path: Path, loss_columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(BASE_COLUMNS) + list(loss_columns)
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists:
            header = self.read_header(self.path)
            if header != self.columns:
                raise InputError(
                    f"Training log '{self.path}' has columns {header}, this run writes {self.columns} (a run of another "
                    "task set wrote it). Use a new --out folder."
                )
        self._file = open(self.path, "a", encoding="utf-8", newline="")
        if not exists:
            self._write_line(self.columns)

    @staticmethod
    def read_header(path: Path) -> list[str]:
        with open(path, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), [])

    def _write_line(self, values: Sequence[Any]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_fmt(v) for v in values])
        self._file.write(buf.getvalue())
        self._file.flush()

    def append(self, row: Mapping[str, Any]) -> None:
        self._write_line([row.get(c, "") for c in self.columns])

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def truncate_log(path: Path, last_iteration: int) -> int:
    """Drop the rows of ``path`` after ``last_iteration`` (rewritten atomically); returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    keep = []
    for r in body:
        try:
            if r and int(r[0]) <= last_iteration:
                keep.append(r)
        except ValueError:  # a partial last line of a killed run
            continue
    dropped = len(body) - len(keep)
    if dropped:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(keep)
        data = buf.getvalue().encode()
        write_atomic(path, lambda f: f.write(data), "Training log")
    return dropped


def read_log(path: Path) -> list[dict[str, float]]:
    """The rows of a training CSV as dicts of floats (``iteration`` and ``epoch`` as ints)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        d: dict[str, float] = {}
        for k, v in r.items():
            d[k] = int(v) if k in ("iteration", "epoch") else float(v)
        out.append(d)
    return out


class TensorBoardLog:
    """TensorBoard scalars, imported lazily; ``mode='auto'`` warns once and carries on when TensorBoard is missing."""

    def __init__(self, log_dir: Path, mode: str, purge_step: Optional[int] = None) -> None:
        self.writer = None
        if mode == "off":
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package
        except ImportError as err:
            if mode == "on":
                raise DependencyError(
                    f"TensorBoard logging was requested (--tensorboard on) but it is not installed ({err}); install the "
                    "'train' extra: pip install 'invpt[train]', or pass --tensorboard off."
                ) from err
            _logger.warning("TensorBoard is not installed (%s): losses go to the CSV log only. pip install "
                            "'invpt[train]' adds it.", err)
            return
        # purge_step hides events a killed run wrote after the checkpoint a resumed run starts from.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class Progress:
    """Console progress of the iteration loop: a tqdm bar, or a log line every ``every`` iterations."""

    def __init__(self, mode: str, total: int, initial: int, every: int, enabled: bool) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.every = every
        self.total = total
        self.bar = None
        self._t0 = time.perf_counter()
        self._start = initial
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True)

    def update(self, iteration: int, loss: float, lr: float) -> None:
        if self.mode == "bar":
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif self.mode == "lines" and (iteration % self.every == 0 or iteration == self.total):
            done = iteration - self._start
            rate = done / max(time.perf_counter() - self._t0, 1e-9)
            eta = (self.total - iteration) / rate if rate > 0 else float("nan")
            _logger.info("iter %d/%d  loss %.4f  lr %.3e  %.2f it/s  eta %s", iteration, self.total, loss, lr, rate,
                         _fmt_eta(eta))

    def write(self, message: str) -> None:
        """Log a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            _logger.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
