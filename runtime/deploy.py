"""``invpt-deploy``: checkpoint -> FP32 ONNX -> FP16 / INT8 ONNX -> TensorRT engines -> parity -> latency, one command.

Every stage is the toolchain's own (``run_export``, ``run_quantize``, ``run_build``, :func:`run_parity`,
:func:`run_bench`), every artifact and manifest lands in the output folder, and a rerun reuses what is already there
once it is verified: the file matches its manifest's sha256 (:func:`invpt.artifacts.verified_manifest`), it was made
from this run's parent (the checkpoint's / the FP32 ONNX's sha256), its verification passed, and (engines) its
profile covers the requested batches. A file that exists but fails any of these is never overwritten: the run stops
before any work and says how to proceed.

Engines are built with whichever TensorRT backend imports (enterprise ``tensorrt`` first, else ``tensorrt_rtx``,
which builds without a GPU); their parity and latency need a GPU they can load on, and the reports say so where
there is none. The folder ends with ``summary.md`` and ``index.html`` (the tables, the latency plot and the per-task
visual diffs).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from invpt.errors import DependencyError, InputError, InvptError

_logger = logging.getLogger(__name__)
SUMMARY_TITLE = "# invpt-deploy summary"  # the first line of summary.md; how a rerun knows the file is its own

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class DeployResult:
    out_dir: Path
    artifacts: list  # invpt.runtime.load.Artifact, in chain order
    steps: list[dict] = field(default_factory=list)
    parity: Any = None
    bench: Any = None
    summary_path: Optional[Path] = None
    html_path: Optional[Path] = None

    @property
    def passed(self) -> bool:
        return self.parity is None or self.parity.passed or not any(
            c["status"] != "not run" for c in self.parity.data["candidates"])


def parse_precisions(text: Optional[str], calib_data: Optional[str]) -> list[str]:
    """``"fp32,fp16"`` -> ["fp32", "fp16"]; None -> fp32, fp16, and int8 when calibration data is given."""
    if text is None:
        return ["fp32", "fp16"] + (["int8"] if calib_data else [])
    vals = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [v for v in vals if v not in PRECISIONS]
    if not vals or bad:
        raise InputError(f"--precision takes a comma-separated list of {', '.join(PRECISIONS)} (e.g. fp32,fp16,int8); "
                         f"got '{text}'.")
    return list(dict.fromkeys(vals))


DEFAULT_CONFIG = "tiny_pascal"


def bundled_images() -> Optional[Path]:
    """The sample photos shipped with the source tree (``assets/``), or None when invpt is installed without them."""
    import invpt

    folder = Path(invpt.__file__).resolve().parents[1] / "assets"
    return folder if folder.is_dir() and any(folder.glob("*.jpg")) else None


def default_checkpoint(out: str | os.PathLike) -> Path:
    """The embedded default model: ``OUT/tiny_pascal.pth``, a tiny PASCAL-Context InvPT with random weights (seed 0,
    non-trivial BatchNorm statistics, official layout, like ``invpt-init --config tiny_pascal --official-format``).
    An existing file there is used as it is (so a rerun reuses everything made from it) when it is a checkpoint of
    that model's architecture; anything else there (another model, not a checkpoint) is refused, never presented as
    the embedded default. Else it is written now."""
    path = Path(out) / f"{DEFAULT_CONFIG}.pth"
    if path.is_file():
        from invpt.checkpoint import infer_config, read_checkpoint
        from invpt.config import load_config

        try:
            found = infer_config(read_checkpoint(path))
        except InvptError as err:
            found, why = None, str(err)
        want = load_config(DEFAULT_CONFIG)
        if found is None or found.to_dict() != want.to_dict():
            what = (f"a {found.dataset} model ({found.name or 'custom config'})" if found is not None
                    else f"not a checkpoint invpt reads ({why})")
            raise InputError(
                f"'{path}' exists but is not invpt-deploy's embedded default model ({DEFAULT_CONFIG}): it is {what}. "
                f"invpt-deploy without --ckpt writes and uses its own {DEFAULT_CONFIG} checkpoint there. To deploy "
                f"that file, pass it with --ckpt; else choose another --out.")
        _logger.info("embedded default: using %s", path)
        return path
    if path.exists() or path.is_symlink():
        raise InputError(f"'{path}' exists and is not a regular file; invpt-deploy writes the default checkpoint "
                         "there. Move it away, pass --ckpt, or choose another --out.")
    import torch

    import invpt
    from invpt.checkpoint import save_official_checkpoint

    torch.manual_seed(0)
    model = invpt.build_model(DEFAULT_CONFIG).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_official_checkpoint(model, path)
    _logger.info("embedded default: wrote %s (%s, random weights: the maps are noise, every number is real)", path,
                 DEFAULT_CONFIG)
    return path


def _refuse(path: Path, why: str) -> InputError:
    return InputError(f"'{path}' exists but cannot be reused by this run ({why}); invpt-deploy never overwrites a file "
                      "it did not verify. Move it away, or choose another --out folder.")


def _reusable(path: Path, precision: str, parent_sha: str, kind: str = "onnx",
              calibration: Optional[tuple[str, int]] = None) -> Optional[Any]:
    """The verified manifest of ``path`` when it can be reused (see the module doc), None when absent; InputError
    when it exists but cannot be reused."""
    from invpt.artifacts import verified_manifest

    if not path.exists() and not path.is_symlink():
        return None
    try:
        man = verified_manifest(path, InputError, what="Existing artifact")
    except InputError as err:
        raise _refuse(path, str(err).rstrip(".")) from err
    if man.kind != kind or man.precision != precision:
        raise _refuse(path, f"it is a {man.precision} {man.kind}, not a {precision} {kind}")
    if kind == "onnx" and man.inputs and isinstance(man.inputs[0].shape[0], int):
        raise _refuse(path, f"it has a static batch of {man.inputs[0].shape[0]}, and invpt-deploy makes and times a "
                            "dynamic-batch ONNX (invpt-export --dynamic-batch)")
    if kind == "engine":
        src_sha = man.build.source_onnx.get("sha256") if man.build is not None else None
        if src_sha != parent_sha:
            raise _refuse(path, "it was built from another ONNX (source sha256 differs)")
    else:
        if (man.parent or {}).get("sha256") != parent_sha:
            raise _refuse(path, "it was made from another parent (parent sha256 differs)")
        if not man.verified:
            raise _refuse(path, "its verification did not run or did not pass")
        policy = man.precision_policy.name if man.precision_policy is not None else None
        if precision != "fp32" and policy != "default":
            raise _refuse(path, f"it uses precision policy '{policy}', not the default one invpt-deploy makes")
        if calibration is not None:
            cal = man.calibration
            source, samples = calibration
            if cal is None or os.path.abspath(cal.source) != os.path.abspath(source) or cal.num_samples != samples:
                raise _refuse(path, f"it was calibrated on {cal and cal.source} ({cal and cal.num_samples} samples), "
                              f"not {source} ({samples})")
    return man


class _Progress:
    def __init__(self, total: int) -> None:
        self.total, self.k, self.t0 = total, 0, time.perf_counter()

    def step(self, text: str) -> None:
        self.k += 1
        _logger.info("[%d/%d] %s", self.k, self.total, text)


def run_deploy(
    ckpt: Optional[str | os.PathLike],
    out: str | os.PathLike = "deploy",
    *,
    config: Optional[str] = None,
    precisions: Optional[Sequence[str]] = None,
    calib_data: Optional[str | os.PathLike] = None,
    calib_samples: int = 32,
    holdout_samples: int = 4,
    data: Optional[str | os.PathLike] = None,
    samples: int = 4,
    batches: Sequence[int] = (1,),
    iters: int = 30,
    warmup: int = 3,
    backend: str = "auto",
    engines: bool = True,
    command: Optional[str] = None,
) -> DeployResult:
    """The whole chain into the folder ``out``; see the module doc and ``invpt-deploy --help``. ``ckpt`` None: the
    embedded default model (:func:`default_checkpoint`), made once every option has been checked."""
    from invpt.artifacts import verified_manifest
    from invpt.cli.common import human_size
    from invpt.errors import CheckpointError
    from invpt.export.cli import default_out
    from invpt.manifest import sha256_file
    from invpt.paths import require_file
    from invpt.runtime.reports import prepare_report_dir

    # ---- everything checkable is checked before any work -------------------------------------------------------
    if ckpt is not None:
        ckpt = require_file(ckpt, "Checkpoint", "Pass the InvPT checkpoint (.pth/.pth.tar) with --ckpt.",
                            CheckpointError)
    elif config is not None:
        raise InputError("--config applies to --ckpt; the embedded default is the tiny_pascal model. Pass --ckpt with "
                         "--config, or leave both out.")
    precs = list(precisions) if precisions is not None else parse_precisions(None, str(calib_data) if calib_data else None)
    bad = [p for p in precs if p not in PRECISIONS]
    if not precs or bad:
        raise InputError(f"--precision takes {', '.join(PRECISIONS)}; got {precs}.")
    if "int8" in precs and not calib_data:
        raise InputError("--precision int8 needs --calib-data (a PASCAL-Context/NYUD-v2 root, an image folder or a "
                         "video); invpt never calibrates on random data. Add --calib-data, or drop int8.")
    for flag, p in (("--calib-data", calib_data), ("--data", data)):
        if p is not None and not Path(p).exists():
            raise InputError(f"{flag} '{p}' does not exist. Pass an image folder, a video or a PASCAL-Context/NYUD-v2 "
                             "root.")
        if p is not None:  # an empty folder would otherwise surface after the export (minutes for ViT-L)
            from invpt.data.datasets import open_source

            if len(open_source(p)) == 0:
                raise InputError(f"{flag} '{p}' holds no image. Pass an image folder, a video or a "
                                 "PASCAL-Context/NYUD-v2 root.")
    if any(not isinstance(b, int) or b < 1 for b in batches) or not batches:
        raise InputError(f"--batch sizes must be integers >= 1, got {list(batches)}.")
    # The later stages check these too, but only after the export (minutes for ViT-L) and with its files written.
    lows = [("--iters", iters, 1), ("--warmup", warmup, 0), ("--samples", samples, 1)]
    if any(p != "fp32" for p in precs):  # invpt-quantize's checks: its parity verification needs a held-out image
        lows += [("--calib-samples", calib_samples, 1), ("--holdout-samples", holdout_samples, 1)]
    for flag, value, low in lows:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{flag} must be an integer >= {low}, got {value!r}. Nothing was written; fix {flag} and "
                             "run invpt-deploy again.")
    if backend not in ("auto", "tensorrt", "rtx"):
        raise InputError(f"--backend must be auto, tensorrt or rtx; got '{backend}'.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' exists and is not a folder; invpt-deploy writes every artifact and report "
                         "into a folder. Choose another --out.")
    ckpt_path = ckpt if ckpt is not None else out / f"{DEFAULT_CONFIG}.pth"
    inputs = [ckpt_path, Path(calib_data) if calib_data and Path(calib_data).is_file() else None,
              Path(data) if data and Path(data).is_file() else None]
    prepare_report_dir(out, ("summary.md", "index.html"), inputs, data=[data, calib_data],
                       markers={"summary.md": SUMMARY_TITLE, "index.html": f"<title>{SUMMARY_TITLE[2:]}</title>"},
                       what="--out folder")
    fp32_onnx = out / default_out(str(ckpt_path)).name
    onnx_of = {p: fp32_onnx if p == "fp32" else fp32_onnx.with_name(f"{fp32_onnx.stem}.{p}.onnx") for p in precs}
    from invpt.artifacts import check_output

    for p in dict.fromkeys(["fp32", *precs]):
        check_output(onnx_of.get(p, fp32_onnx), inputs, InputError)
        check_output(onnx_of.get(p, fp32_onnx).with_suffix(".plan"), inputs, InputError)
    if ckpt is None:  # every option is checked: now the embedded default model may be written
        ckpt = default_checkpoint(out)
    command = command or "invpt-deploy"
    be = None
    engine_note = ""
    if engines:
        from invpt.engines.backend import load_backend

        try:
            be = load_backend(backend)
        except DependencyError as err:
            engine_note = f"no engines built: {err}"
            _logger.warning("%s", engine_note)
    else:
        engine_note = "no engines built (--no-engines)"
    total = 1 + len([p for p in precs if p != "fp32"]) + (len(precs) if be is not None else 0) + 3
    prog = _Progress(total)
    steps: list[dict] = []
    ck_sha = sha256_file(ckpt)

    def record(stage: str, path: Path, reused: bool, t0: float) -> None:
        steps.append({"stage": stage, "artifact": str(path), "reused": reused,
                      "seconds": round(time.perf_counter() - t0, 2)})

    # ---- export ------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    prog.step(f"export {ckpt} -> {fp32_onnx}")
    man = _reusable(fp32_onnx, "fp32", ck_sha)
    if man is not None and config is not None:
        from invpt.config import load_config

        if load_config(config) != man.model_config:
            raise _refuse(fp32_onnx, "it was exported with another --config")
    if man is not None:
        _logger.info("reusing %s (exported from this checkpoint; sha256 and verification checked)", fp32_onnx)
    else:
        from invpt.export.pipeline import run_export

        run_export(ckpt, fp32_onnx, config=config, dynamic_batch=True, command=command)
    record("export", fp32_onnx, man is not None, t0)
    fp32_man = verified_manifest(fp32_onnx, InputError, what="ONNX file")
    fp32_sha = fp32_man.sha256
    # The model's size is known now: refuse a --batch / --samples whose inputs and outputs cannot fit in memory
    # before the quantize and engine stages (the latency and parity stages would fail only at the end).
    from invpt.runtime.load import check_memory, io_bytes_per_image

    per_in, per_out = io_bytes_per_image(fp32_man)
    check_memory(per_in + per_out, max(batches), "--batch", ",".join(map(str, batches)),
                 f"one batch of inputs and outputs ({(per_in + per_out) / 2**20:.1f} MiB an image)")
    if data is None:
        check_memory(per_in + 2 * per_out, samples, "--samples", samples,
                     f"the parity inputs and outputs ({(per_in + 2 * per_out) / 2**20:.1f} MiB an image)")

    # ---- FP16 / INT8 ONNX --------------------------------------------------------------------------------------
    for p in precs:
        if p == "fp32":
            continue
        t0 = time.perf_counter()
        target = onnx_of[p]
        prog.step(f"quantize {p.upper()} -> {target}")
        reuse = _reusable(target, p, fp32_sha,
                          calibration=(str(calib_data), calib_samples) if p == "int8" else None)
        if reuse is not None:
            _logger.info("reusing %s (made from this FP32 ONNX; sha256 and verification checked)", target)
        else:
            from invpt.calib.pipeline import run_quantize

            run_quantize(fp32_onnx, p, target, calib_data=calib_data, calib_samples=calib_samples,
                         holdout_samples=holdout_samples, command=command)
        record(f"quantize-{p}", target, reuse is not None, t0)

    # ---- engines ------------------------------------------------------------------------------------------------
    plans: list[Path] = []
    if be is not None:
        from invpt.engines.build import BuildOptions, run_build

        profile = (min(batches), min(batches), max(batches))
        for p in precs:
            t0 = time.perf_counter()
            src = onnx_of[p]
            plan = src.with_suffix(".plan")
            prog.step(f"engine {p.upper()} with {be.describe()} -> {plan}")
            src_sha = verified_manifest(src, InputError, what="ONNX file").sha256
            reuse = _reusable(plan, p, src_sha, kind="engine")
            if reuse is not None:
                from invpt.runtime.tensorrt_runner import engine_batch_range

                rng = engine_batch_range(reuse)
                if rng is None or rng[0] > profile[0] or rng[1] < profile[2]:
                    raise _refuse(plan, f"its batch profile {rng} does not cover --batch {list(batches)}")
                _logger.info("reusing %s (built from this ONNX; sha256 checked)", plan)
            else:
                run_build(src, precision=p, out=plan, backend=backend,
                          options=BuildOptions(batch=profile, progress=False), command=command)
            plans.append(plan)
            record(f"engine-{p}", plan, reuse is not None, t0)

    # ---- parity and latency -------------------------------------------------------------------------------------
    from invpt.runtime.load import load_artifacts, reference_runner

    arts = load_artifacts([onnx_of[p] for p in precs] + plans)
    prog.step(f"parity of {len(arts)} artifact(s) against PyTorch FP32")
    from invpt.runtime.parity import run_parity

    t0 = time.perf_counter()
    ref = reference_runner(ckpt, config, name="pytorch-cpu-fp32")
    parity = run_parity(ckpt, [], out / "parity", config=config, data=data, samples=samples, artifacts=arts,
                        reference=ref)
    del ref
    steps.append({"stage": "parity", "artifact": str(parity.json_path), "reused": False,
                  "seconds": round(time.perf_counter() - t0, 2)})
    prog.step(f"latency of PyTorch and {len(arts)} artifact(s), batch {','.join(map(str, batches))}")
    from invpt.runtime.bench import run_bench

    t0 = time.perf_counter()
    bench = run_bench(out=out / "bench", ckpt=ckpt, config=config, batches=list(batches), iters=iters, warmup=warmup,
                      artifacts=arts)
    steps.append({"stage": "bench", "artifact": str(bench.json_path), "reused": False,
                  "seconds": round(time.perf_counter() - t0, 2)})
    prog.step("summary")
    result = DeployResult(out, arts, steps, parity, bench)
    _write_summary(result, engine_note, human_size)
    _logger.info("deploy %s in %.1fs: %s (open %s)", "ok" if result.passed else "FAILED parity",
                 time.perf_counter() - prog.t0, result.summary_path, result.html_path)
    return result


def _write_summary(res: DeployResult, engine_note: str, human_size: Any) -> None:
    from invpt.runtime.reports import html_page, markdown_to_html, write_text

    out = res.out_dir
    lines = [SUMMARY_TITLE, "",
             f"Folder: `{out}`. Parity: **{'PASS' if res.passed else 'FAIL'}** (against PyTorch FP32 on "
             f"{res.parity.data['inputs']['description']}).", "",
             "| stage | artifact | size | reused | seconds |", "|---|---|---|---|---|"]
    sizes = {str(a.path): a.manifest.size_bytes for a in res.artifacts}
    for s in res.steps:
        size = human_size(sizes[s["artifact"]]) if s["artifact"] in sizes else "-"
        rel = os.path.relpath(s["artifact"], out)
        lines.append(f"| {s['stage']} | `{rel}` | {size} | {'yes' if s['reused'] else 'no'} | {s['seconds']} |")
    if engine_note:
        lines += ["", engine_note]
    lines += ["", "## Parity", "", "| candidate | precision | status |", "|---|---|---|"]
    for c in res.parity.data["candidates"]:
        lines.append(f"| `{c['label']}` | {c['precision']} | {c['status'].upper()}"
                     f"{': ' + c['reason'] if c['reason'] else ''} |")
    lines += ["", "Per-task metrics: [parity/parity.md](parity/parity.md)."]
    lines += ["", "## Latency", "", "| runner | batch | mean ms | p50 | p99 | img/s |", "|---|---|---|---|---|---|"]
    for r in res.bench.data["results"]:
        st = r["stats"]
        lines.append(f"| `{r['runner']}` | {r['batch']} | {st['mean_ms']:.3f} | {st['p50_ms']:.3f} | "
                     f"{st['p99_ms']:.3f} | {st['throughput_ips']:.1f} |")
    if res.bench.data["not_run"]:
        lines.append("")
    for n in res.bench.data["not_run"]:
        lines.append(f"- not timed: `{os.path.relpath(n['artifact'], out)}`: {n['reason']}")
    if res.bench.data["commands"]:
        lines += ["", "Equivalent TensorRT commands for the engines (on their target GPU):", "", "```"]
        lines += [c["command"] for c in res.bench.data["commands"]] + ["```"]
    lines += ["", "Full table: [bench/bench.md](bench/bench.md)."]
    if res.bench.plot_path is not None:
        lines += ["", "![latency](bench/bench.png)"]
    lines += ["", "## Visual diffs (input, PyTorch, candidate, error)", ""]
    for c in res.parity.data["candidates"]:
        for v in c["visuals"]:
            lines += [f"### {Path(v).stem}", "", f"![{Path(v).stem}](parity/{v})", ""]
    md = "\n".join(lines) + "\n"
    res.summary_path = write_text(out / "summary.md", md)
    res.html_path = write_text(out / "index.html", html_page(SUMMARY_TITLE[2:], markdown_to_html(md)))
