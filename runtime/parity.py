"""``invpt-parity``: the same images through PyTorch FP32 and each candidate artifact, per task.

Per candidate and task: the tensor metrics and verdict of :mod:`invpt.compare` (max / mean / p99 absolute error,
relative error, cosine, decision agreement) against the stated tolerance of the candidate's precision
(:data:`invpt.compare.TOLERANCES`, the table export and calib verify against), and the task-level agreement of the
decoded predictions with PyTorch's (label agreement and mIoU, saliency/edge agreement at 0.5, depth RMSE, normals
mean angular difference). One PNG per candidate and task shows a few images: input, PyTorch, candidate and the
per-pixel error heatmap.

The report folder gets ``parity.json`` (the documented fields below), ``parity.md`` and ``visuals/*.png``.
A candidate that cannot run here (an engine on a machine without a CUDA GPU) is listed with the reason; it is
neither passed nor failed. Ground-truth evaluation (official task metrics against dataset labels) is `invpt-eval`'s,
for PyTorch checkpoints; it is not run on ONNX files and engines here yet: the report says so.

``parity.json``: ``schema`` ("invpt.parity"), ``version`` (1), ``created``, ``passed`` (every candidate that ran
passed, and at least one ran), ``reference`` {``checkpoint``, ``sha256``, ``config``, ``runner``}, ``inputs``
{``description``, ``ids``, ``samples``}, ``tolerances`` {precision: bounds}, ``candidates``: a list of
{``artifact``, ``label``, ``kind``, ``precision``, ``runner``, ``status`` ("passed" | "failed" | "not run"),
``reason``, ``comparison`` (:meth:`invpt.compare.ComparisonResult.to_dict`: per task metrics, failures,
``task_agreement``), ``visuals`` (PNG paths relative to the report folder)}, ``ground_truth``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from invpt.errors import InputError

_logger = logging.getLogger(__name__)

SCHEMA = "invpt.parity"
REPORT_FILES = ("parity.json", "parity.md")


@dataclass
class ParityReport:
    """What :func:`run_parity` wrote and found."""

    out_dir: Path
    json_path: Path
    markdown_path: Path
    data: dict
    visuals: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.data.get("passed"))

    @property
    def failed(self) -> list[str]:
        return [c["label"] for c in self.data["candidates"] if c["status"] == "failed"]


def _visual_rows(spec: Any, x: np.ndarray, ref: np.ndarray, test: np.ndarray, label: str) -> np.ndarray:
    """One PNG for one task: a row per image with input, PyTorch, candidate and the error heatmap."""
    from invpt.data.decode import decode
    from invpt.data.visualize import _put_label, overview, visualize
    from invpt.runtime.reports import denormalize, error_heatmap

    vmax = float(np.abs(test.astype(np.float64) - ref.astype(np.float64)).mean(axis=1).max(initial=0.0))
    rows = []
    for i in range(len(x)):
        heat, top = error_heatmap(ref[i], test[i], vmax if np.isfinite(vmax) and vmax > 0 else None)
        _put_label(heat, f"max {top:.3g}", corner="bottom")
        tiles = {"pytorch fp32": visualize(spec, decode(spec, ref[i])),
                 label[:28]: visualize(spec, decode(spec, test[i])),
                 "|error|": heat}
        rows.append(overview(denormalize(x[i]), tiles, columns=4))
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    out = [rows[0]]
    for r in rows[1:]:
        out += [gap, r]
    return np.concatenate(out)


def _overall(data: dict) -> str:
    """PASS (every candidate that ran passed, one at least), FAIL (one failed) or NOT RUN (none could run here)."""
    if data["passed"]:
        return "PASS"
    return "FAIL" if any(c["status"] == "failed" for c in data["candidates"]) else "NOT RUN"


def _markdown(data: dict) -> str:
    ref = data["reference"]
    lines = [f"# Parity report", "",
             f"Reference: PyTorch FP32 ({ref['runner']}) from `{ref['checkpoint']}` ({ref['config']}). "
             f"Inputs: {data['inputs']['description']}.", "",
             f"**Overall: {_overall(data)}** "
             f"({sum(c['status'] == 'passed' for c in data['candidates'])} passed, "
             f"{sum(c['status'] == 'failed' for c in data['candidates'])} failed, "
             f"{sum(c['status'] == 'not run' for c in data['candidates'])} not run here)", "",
             "| candidate | kind | precision | runner | status |", "|---|---|---|---|---|"]
    for c in data["candidates"]:
        lines.append(f"| `{c['label']}` | {c['kind']} | {c['precision']} | {c['runner'] or '-'} | "
                     f"{c['status'].upper()}{': ' + c['reason'] if c['reason'] else ''} |")
    for c in data["candidates"]:
        lines += ["", f"## `{c['label']}` ({c['precision']} {c['kind']})", ""]
        if c["status"] == "not run":
            lines.append(f"Not run on this machine: {c['reason']}.")
            continue
        lines.append(c["markdown"])
        for v in c["visuals"]:
            lines += ["", f"![{Path(v).stem}]({v})"]
    lines += ["", "## Ground truth", "", data["ground_truth"], ""]
    return "\n".join(lines)


def run_parity(
    ckpt: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike = "parity",
    *,
    config: Optional[str] = None,
    data: Optional[str | os.PathLike] = None,
    samples: int = 4,
    visual_samples: int = 2,
    seed: int = 0,
    providers: Sequence[str] = ("cpu",),
    artifacts: Optional[list] = None,
    reference: Any = None,
) -> ParityReport:
    """Compare each of ``models`` with the checkpoint's FP32 PyTorch outputs; write the report into ``out``.

    ``artifacts`` (already loaded :class:`invpt.runtime.load.Artifact`) and ``reference`` (a PyTorch runner) let
    ``invpt-deploy`` pass what it has; otherwise they are loaded here. Raises InputError / ManifestError (exit 2)
    before any inference for a missing or mismatched manifest, a candidate of another model, a bad data path.
    """
    from invpt.compare import TOLERANCES, collect_outputs, compare
    from invpt.data.visualize import save_png
    from invpt.errors import CheckpointError
    from invpt.manifest import now_iso, sha256_file
    from invpt.paths import require_file
    from invpt.runtime.load import check_against_model, load_artifacts, load_runner, reference_runner
    from invpt.runtime.reports import load_inputs, prepare_report_dir, write_json, write_text

    ckpt = require_file(ckpt, "Checkpoint", "Pass the InvPT checkpoint the candidates were made from with --ckpt.",
                        CheckpointError)
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}.")
    if visual_samples < 0:
        raise InputError(f"--visual-samples must be >= 0, got {visual_samples}.")
    if data is not None and not Path(data).exists():
        raise InputError(f"--data '{data}' does not exist. Pass an image, a folder of images, a video or a "
                         "PASCAL-Context/NYUD-v2 root, or leave --data out for seeded random inputs.")
    arts = artifacts if artifacts is not None else load_artifacts(models)
    out = prepare_report_dir(out, (*REPORT_FILES, "visuals"), [ckpt, data, *[a.path for a in arts]], data=[data],
                             owner=("parity.json", SCHEMA))
    if any(a.kind == "onnx" for a in arts):
        from invpt.runners import resolve_providers

        resolve_providers(providers)  # an execution provider this onnxruntime lacks: exit 2 now, not after PyTorch
    ref_runner = reference if reference is not None else reference_runner(ckpt, config, name="pytorch-cpu-fp32")
    cfg = ref_runner.model.cfg
    specs = {s.name: s for s in cfg.task_specs}
    task_lists = [check_against_model(a, cfg, ckpt) for a in arts]  # every candidate before any inference
    pre = arts[0].manifest.preprocessing
    x, ids, desc = load_inputs(data, cfg.image_size, pre.mode, samples, seed, pre.mean, pre.std)
    feeds = [x[i:i + 1] for i in range(len(x))]
    _logger.info("parity: PyTorch FP32 reference on %s", desc)
    ref = collect_outputs(ref_runner, feeds)
    candidates, visuals = [], []
    for art, tasks in zip(arts, task_lists):
        entry: dict[str, Any] = {"artifact": str(art.path), "label": art.label, "kind": art.kind,
                                 "precision": art.precision, "runner": None, "status": "not run", "reason": "",
                                 "comparison": None, "visuals": [], "markdown": ""}
        candidates.append(entry)
        if art.unavailable:
            entry["reason"] = art.unavailable
            _logger.warning("parity: %s not run: %s", art.label, art.unavailable)
            continue
        runner = load_runner(art, providers=providers)
        entry["runner"] = f"{runner.backend}-{runner.device}"
        got = collect_outputs(runner, feeds)
        task_specs = [specs[t] for t in tasks]
        result = compare({t: ref[t] for t in tasks}, got, task_specs, art.precision, "pytorch-fp32",
                         f"{art.label} ({entry['runner']})")
        entry["comparison"] = result.to_dict()
        entry["markdown"] = result.markdown()
        entry["status"] = "passed" if result.passed else "failed"
        entry["reason"] = "" if result.passed else "; ".join(f"{k}: {', '.join(v)}" for k, v in result.failures.items())
        (_logger.info if result.passed else _logger.error)("parity %s: %s", art.label, result.summary())
        n_vis = min(visual_samples, len(x))
        for t in tasks if n_vis else ():
            rel = f"visuals/{art.label}__{t}.png"
            save_png(out / rel, _visual_rows(specs[t], x[:n_vis], ref[t][:n_vis], got[t][:n_vis], art.label))
            entry["visuals"].append(rel)
            visuals.append(out / rel)
    ran = [c for c in candidates if c["status"] != "not run"]
    data_out = {
        "schema": SCHEMA, "version": 1, "created": now_iso(),
        "passed": bool(ran) and all(c["status"] == "passed" for c in ran),
        "reference": {"checkpoint": str(ckpt), "sha256": sha256_file(ckpt), "config": cfg.name or cfg.dataset,
                      "runner": ref_runner.name},
        "inputs": {"description": desc, "ids": ids, "samples": len(ids)},
        "tolerances": {k: v.to_dict() for k, v in TOLERANCES.items()},
        "candidates": candidates,
        "ground_truth": ("Not evaluated here: official task metrics against PASCAL-Context / NYUD-v2 labels come from "
                         "invpt-eval for the PyTorch checkpoint; this report does not run them on ONNX files and "
                         "engines yet. The agreement above is against PyTorch's own predictions."),
    }
    md = _markdown(data_out)
    for c in candidates:
        c.pop("markdown", None)
    md_path = write_text(out / "parity.md", md)
    json_path = write_json(out / "parity.json", data_out)
    _logger.info("parity report: %s (%s)", md_path, json_path)
    return ParityReport(out, json_path, md_path, data_out, visuals)
