"""Per-block INT8 sensitivity of a multi-task model, and a search for what to keep in high precision.

For each quantizable block (ViT patch embedding and blocks, preliminary decoders, scale embedding,
mix projection, each InvPT stage, the aggregation, each task head) the model is quantized with *only*
that block in INT8, and every task's degradation against the FP32 reference is measured on held-out
samples (relative L2 error of the raw outputs, plus the task-level metric). Because InvPT's tasks share
attention and one LayerNorm, a block can hurt one task and not another: the report shows it per task.

The search then keeps blocks in high precision, most damaging first, until the summed single-block
degradation of every task fits its budget, and measures the chosen mixed model once more for real.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from invpt.artifacts import private_copy
from invpt.calib.evaluate import run_onnx_batches, task_agreement
from invpt.calib.int8 import RangeCache, quantize_int8
from invpt.calib.policy import NodeSelection, block_terms, graph_nodes, quantizable_nodes, resolve_terms
from invpt.config import InvPTConfig
from invpt.errors import ToolError
from invpt.tasks import TaskSpec

_logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 0.05  # relative L2 error of each task's raw output vs FP32


def rel_l2(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.linalg.norm(test.astype(np.float64) - ref) / (np.linalg.norm(ref.astype(np.float64)) or 1.0))


def _measure(path: Path, inputs: np.ndarray, ref: Mapping[str, np.ndarray], specs: Sequence[TaskSpec]) -> dict:
    test = run_onnx_batches(path, inputs, [s.name for s in specs])
    return {s.name: {"rel_l2": rel_l2(ref[s.name], test[s.name]), **task_agreement(s, ref[s.name], test[s.name])}
            for s in specs}


def greedy_keep(per_block: Mapping[str, Mapping[str, dict]], budgets: Mapping[str, float]) -> list[str]:
    """Blocks to keep in high precision so each task's summed degradation fits its budget (greedy, most damaging first)."""
    tasks = list(budgets)
    total = {t: sum(per_block[b][t]["rel_l2"] for b in per_block) for t in tasks}
    keep: list[str] = []
    remaining = dict(per_block)
    while any(total[t] > budgets[t] for t in tasks) and remaining:
        over = [t for t in tasks if total[t] > budgets[t]]
        block = max(remaining, key=lambda b: sum(remaining[b][t]["rel_l2"] / budgets[t] for t in over))
        keep.append(block)
        for t in tasks:
            total[t] -= remaining[block][t]["rel_l2"]
        del remaining[block]
    return keep


def _plot(per_block: Mapping[str, Mapping[str, dict]], tasks: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(per_block)
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(blocks)), 4.5))
    width = 0.8 / len(tasks)
    x = np.arange(len(blocks))
    for k, t in enumerate(tasks):
        ax.bar(x + k * width, [per_block[b][t]["rel_l2"] for b in blocks], width, label=t)
    ax.set_xticks(x + 0.4 - width / 2, blocks, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("relative L2 error vs FP32")
    ax.set_title("INT8 sensitivity: only this block quantized")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(report: dict) -> str:
    tasks = report["tasks"]
    lines = ["# INT8 sensitivity (one block quantized at a time; relative L2 error vs FP32 per task)", "",
             "| block | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for block, per_task in report["per_block"].items():
        lines.append(f"| {block} | " + " | ".join(f"{per_task[t]['rel_l2']:.4f}" for t in tasks) + " |")
    s = report.get("search")
    if s:
        lines += ["", f"Budgets: {s['budgets']}", f"Kept in high precision: {s['keep_blocks'] or 'none'}",
                  "Measured with those kept (all else INT8): " + ", ".join(
                      f"{t} {v['rel_l2']:.4f} ({'within' if v['rel_l2'] <= s['budgets'][t] else 'OVER'} budget)"
                      for t, v in s["measured"].items())]
    return "\n".join(lines) + "\n"


def run_sensitivity(onnx_path: Path, workdir: Path, data, ref: Mapping[str, np.ndarray], specs: Sequence[TaskSpec],
                    selection: NodeSelection, method: str, cfg: InvPTConfig,
                    budgets: Optional[Mapping[str, float]] = None, per_node: Optional[bool] = None, *,
                    input_is_private: bool = False) -> dict:
    """Measure every block alone in INT8, search the keep-set for ``budgets``; writes JSON, Markdown and PNG.

    ``per_node`` is passed to ``quantize_int8`` (ModelOpt node-by-node or whole-graph calibration; None = invpt's bounded-memory ranges).
    Every quantization reads one :func:`~invpt.artifacts.private_copy` of ``onnx_path`` made in ``workdir`` (the
    stage's staging folder) for the whole sweep, never the user's file; a caller that already made one for the
    stage passes it with ``input_is_private=True``. With invpt's ranges engine (``per_node`` None) the activation
    ranges are measured once for the whole sweep (:class:`~invpt.calib.int8.RangeCache`): each block then costs its
    Q/DQ insertion and its parity run, not a forward pass per calibration sample; the models are the same.
    """
    from tqdm import tqdm

    tasks = [s.name for s in specs]
    nodes = graph_nodes(onnx_path)
    blocks = resolve_terms(block_terms(tasks, cfg.backbone.depth), nodes, tasks, cfg.backbone.depth)
    base_excluded = set(selection.kept_nodes)
    all_q = quantizable_nodes(nodes, base_excluded)
    per_block = {}
    failed: dict[str, str] = {}
    copy_dir = workdir / ".sensitivity-input"
    # once for the sweep (quantize_int8 would copy per call); removed at the end unless it is the caller's
    private = onnx_path if input_is_private else private_copy(onnx_path, copy_dir)
    cache = RangeCache(workdir / ".sensitivity-ranges", warm_exclude=sorted(base_excluded))
    try:
        for block in tqdm(list(blocks), desc="sensitivity", unit="block", disable=None):
            mine = set(blocks[block]) & set(all_q)
            if not mine:
                continue
            exclude = base_excluded | (set(all_q) - mine)
            tmp = workdir / f"sens_{block}.onnx"
            try:
                quantize_int8(private, tmp, data.calib, method, sorted(exclude), per_node=per_node,
                              input_is_private=True, range_cache=cache)
            except ToolError as err:  # e.g. a calibrator that cannot handle a single small block
                _logger.warning("sensitivity: %s could not be quantized alone (%s); left out of the report", block,
                                err)
                _logger.debug("sensitivity: %s failure", block, exc_info=err)
                failed[block] = str(err)
                continue
            per_block[block] = _measure(tmp, data.holdout, ref, specs)
            tmp.unlink(missing_ok=True)
            _logger.debug("sensitivity %s: %s", block, {t: round(v["rel_l2"], 5) for t, v in per_block[block].items()})
        report = {"tasks": tasks, "method": method, "holdout_samples": int(len(data.holdout)), "per_block": per_block,
                  "failed_blocks": failed}
        budgets = {t: float((budgets or {}).get(t, DEFAULT_BUDGET)) for t in tasks}
        keep = greedy_keep(per_block, budgets)
        exclude = base_excluded | {n for b in keep for n in blocks[b]}
        tmp = workdir / "sens_search.onnx"
        quantize_int8(private, tmp, data.calib, method, sorted(exclude), per_node=per_node, input_is_private=True,
                      range_cache=cache)
        report["search"] = {"budgets": budgets, "keep_blocks": keep,
                            "measured": _measure(tmp, data.holdout, ref, specs)}
        tmp.unlink(missing_ok=True)
        if cache.sessions or cache.served:  # invpt's ranges engine: what the sweep measured and reused
            report["ranges"] = {"sessions": cache.sessions, "tensors_measured": cache.measured,
                                "tensors_reused": cache.served}
    finally:
        cache.close()
        shutil.rmtree(copy_dir, ignore_errors=True)
    stem = onnx_path.stem + ".int8"
    (workdir / f"{stem}.sensitivity.json").write_text(json.dumps(report, indent=2))
    (workdir / f"{stem}.sensitivity.md").write_text(_markdown(report))
    _plot(per_block, tasks, workdir / f"{stem}.sensitivity.png")
    _logger.info("sensitivity: kept in high precision for the budgets %s: %s", budgets, keep or "none")
    return report
