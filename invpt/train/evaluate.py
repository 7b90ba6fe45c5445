"""Evaluation with the official protocol (spec §10, §13) and its reports (JSON for machines, Markdown for people).

:func:`evaluate` runs a model over a dataset built with the eval transforms (normalise, centred pad to the model
size, ignore regions; no resize), feeds the raw outputs at the padded size to an evaluator whose metrics skip the
padding (its labels are 255 there), and returns ``{task: {metric: value}}``. Under ``torchrun`` each process takes
every ``world``-th image and the evaluator's sums are added over processes before scoring, so the score is the one
a single process would compute. Prediction files (``build_evaluator(save_dir=...)``) are cropped back to each image's
own size by the evaluator.
"""
from __future__ import annotations

import json
import logging
import math
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from invpt.train.distributed import DistContext, ShardSampler, unwrap

_logger = logging.getLogger("invpt.train")

#: Metric direction for the Markdown table (metrics not listed are shown without an arrow).
HIGHER_IS_BETTER = {"mIoU": True, "maxF": True, "maxF_prob": True, "11.25": True, "22.5": True, "30": True,
                    "mean": False, "median": False, "rmse": False, "log_rmse": False, "abs_rel": False,
                    "sq_rel": False, "loss": False}


def iterate_loader(loader: Iterable) -> Iterator:
    """Iterate a DataLoader; an invpt error raised in a worker (a missing or out-of-range label file) is re-raised
    with its own one-paragraph message instead of the worker's traceback text. The loader's workers are shut down
    when the iteration ends, fails or is closed."""
    from invpt.errors import InvptError

    iterator = iter(loader)
    try:
        while True:
            failure: Optional[InvptError] = None
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except InvptError as err:
                text = str(err)
                if "Original Traceback" not in text:
                    raise
                name = type(err).__name__
                last = [ln for ln in text.strip().splitlines() if ln.startswith(("invpt.errors.", name + ":"))]
                failure = type(err)(last[-1].split(":", 1)[1].strip() if last else text)
                # The worker's exception holds the loader iterator through its traceback's frames (in a reference
                # cycle): clear them, so the workers stop when the iterator is dropped below, not at a later GC.
                traceback.clear_frames(err.__traceback__)
            if failure is not None:
                raise failure
            yield batch
    finally:
        # Drop the iterator now, not when a traceback that holds this frame is collected: its workers stop here.
        del iterator


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    evaluator: Any,
    *,
    batch_size: int = 1,
    workers: int = 0,
    ctx: Optional[DistContext] = None,
    device: Optional[torch.device | str] = None,
    bf16: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Official metrics of ``model`` on ``dataset``: ``{task: {metric: value}}`` (see :mod:`invpt.train.metrics`).

    Args:
        model: an InvPT (a DDP wrapper is unwrapped); evaluated in eval mode, its mode is restored afterwards.
        dataset: a :class:`~invpt.data.multitask.MultiTaskDataset` built with ``transforms="eval"``.
        evaluator: from :func:`invpt.train.metrics.build_evaluator`; it is reset first.
        batch_size, workers: per process.
        ctx: the distributed context (None: one process); the evaluator's sums are reduced over its processes.
        device: where the model runs (default: ``ctx.device``, else the model's parameters' device).
        bf16: bfloat16 autocast for the forward pass (metrics are computed in FP32).
        progress: show a tqdm bar.
    """
    from torch.utils.data import DataLoader

    from invpt.data.multitask import collate_multitask

    ctx = ctx or DistContext()
    bare = unwrap(model)
    dev = torch.device(device) if device is not None else (
        ctx.device if ctx.distributed else next(bare.parameters()).device)
    was_training = bare.training
    bare.eval()
    evaluator.reset()
    tasks = list(evaluator.tasks) if hasattr(evaluator, "tasks") else list(bare.tasks)
    sampler = ShardSampler(len(dataset), ctx.world_size, ctx.rank)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate_multitask, generator=torch.Generator().manual_seed(0),
                        pin_memory=dev.type == "cuda")
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="eval", unit="batch", dynamic_ncols=True, leave=False)
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    try:
        for batch in iterate_loader(it):
            images = batch["image"].to(dev, non_blocking=True)
            with amp:
                outputs = bare(images, tasks=tasks)
            outputs = {t: outputs[t].float() for t in tasks}
            targets = {t: batch[t].to(dev, non_blocking=True) for t in tasks}
            evaluator.update(outputs, targets, batch.get("meta"))
    finally:
        bare.train(was_training)
    if ctx.distributed:
        evaluator.all_reduce()
    return evaluator.score()


# ---- reports --------------------------------------------------------------------------------------------------

def _json_safe(obj: Any) -> Any:
    """Non-finite floats become None (strict JSON); tensors, numpy values, paths and tuples become plain values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return _json_safe(obj.item())
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy array
        return _json_safe(obj.tolist())
    return obj


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def headline(scores: Mapping[str, Mapping[str, Any]], config: Any) -> str:
    """``semseg mIoU 41.2, normals mean 19.8, ...``: each task's headline metric (for summary lines)."""
    from invpt.config import load_config
    from invpt.train.metrics import PRIMARY_METRICS

    cfg = load_config(config)
    parts = []
    for spec in cfg.task_specs:
        name = PRIMARY_METRICS.get(spec.kind, ("", True))[0]
        value = scores.get(spec.name, {}).get(name)
        if isinstance(value, (int, float)):
            parts.append(f"{spec.name} {name} {_fmt(value)}")
    return ", ".join(parts)


def scores_markdown(scores: Mapping[str, Mapping[str, Any]], title: str = "Evaluation") -> str:
    """A Markdown table of the scalar metrics: one row per task and metric (per-class lists are left to the JSON)."""
    lines = [f"## {title}", "", "| task | metric | value | better |", "|---|---|---|---|"]
    for task, metrics in scores.items():
        for name, value in metrics.items():
            if isinstance(value, (list, tuple, dict)):
                continue
            arrow = {True: "higher", False: "lower"}.get(HIGHER_IS_BETTER.get(name), "")
            lines.append(f"| {task} | {name} | {_fmt(value)} | {arrow} |")
    return "\n".join(lines) + "\n"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown form of a report dict (its ``scores`` table plus the facts that identify the run)."""
    facts = []
    for key in ("checkpoint", "iteration", "split", "images", "data_root", "seconds"):
        if key in report and report[key] is not None:
            facts.append(f"- {key}: `{report[key]}`")
    cfg = report.get("config") or {}
    if cfg:
        facts.append(f"- model: `{cfg.get('name') or cfg.get('dataset')}`, tasks {', '.join(cfg.get('tasks', []))}, "
                     f"input {'x'.join(map(str, cfg.get('image_size', [])))}")
    notes = ["", "Metrics follow the official protocol: eval transforms (normalise, centred pad, no resize), metrics "
             "accumulated over the split on the padded outputs with padding ignored. mIoU and maxF are percentages; "
             "the boundary `loss` is upstream's in-code reference value (the official odsF is computed offline from "
             "the saved boundary PNGs)."]
    return scores_markdown(report.get("scores", {}), report.get("title", "Evaluation")) + "\n" + "\n".join(facts) + \
        "\n" + "\n".join(notes) + "\n"


def write_report(report: Mapping[str, Any], json_path: Path, md_path: Optional[Path] = None) -> tuple[Path, Path]:
    """Write ``report`` as strict JSON to ``json_path`` and its Markdown table to ``md_path`` (default: same name,
    ``.md``), each atomically."""
    from invpt.atomic import write_atomic

    json_path = Path(json_path)
    md_path = Path(md_path) if md_path is not None else json_path.with_suffix(".md")
    data = (json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n").encode()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(json_path, lambda f: f.write(data), "Evaluation report")
    md = report_markdown(report).encode()
    write_atomic(md_path, lambda f: f.write(md), "Evaluation report")
    return json_path, md_path
