"""Benchmark one ``invpt-quantize`` run on an existing FP32 ONNX: wall time, peak memory, phases, parity.

Runs the real command line (``invpt-quantize ARGS... -v``) in a child process, samples its resident memory from
/proc every 0.5 s (with the time of each sample, so a peak can be placed in a phase), takes the child's exact peak
(``ru_maxrss``) when it ends, and reads the written manifest for the parity numbers. Writes JSON (and the samples)
to ``--out``; the console gets a Markdown summary. Nothing about the run is changed: what is measured is what a user
runs.

Example (ViT-L, see bench/README.md)::

    python -m bench.bench_quantize --out bench/results/quantize_pascal_vitl_fp16.json -- \
        --onnx /work/vitl/pascal_vitl.onnx --precision fp16 --calib-data /work/vitl/crops --holdout-samples 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    SHARED_MACHINE_NOTE,
    command_line,
    environment,
    fmt_bytes,
    fmt_seconds,
    markdown_table,
    write_json_atomic,
)

SCHEMA = "invpt-bench-quantize/1"


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def run(cli_args: list[str], poll_s: float = 0.5) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("invpt-quantize")
    cmd = [str(exe) if exe.exists() else "invpt-quantize", *cli_args, "-v"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []
    lines: list[str] = []
    import threading

    def reader():
        for line in proc.stdout:
            lines.append(f"{time.perf_counter() - t0:8.1f} {line.rstrip()}")

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        samples.append((round(time.perf_counter() - t0, 2), _rss_kib(proc.pid) * 1024))
        time.sleep(poll_s)
    th.join(timeout=10)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"command": cmd, "exit_code": proc.returncode, "wall_s": wall, "peak_rss_bytes": peak,
            "rss_samples": samples, "log": lines}


def phase_peaks(log: list[str], samples: list[tuple[float, int]], wall_s: float) -> list[dict[str, Any]]:
    """Peak RSS between consecutive invpt log lines (each line ``"  12.3 [invpt] INFO ..."``): the memory of the phase
    a line opens, e.g. from "INT8 ... calibration" to "... ranges of N tensors" is the range measurement."""
    marks = [(0.0, "start")]
    for line in log:
        if "[invpt]" not in line or " DEBUG " in line:
            continue
        t, _, text = line.strip().partition(" ")
        try:
            marks.append((float(t), text.split(" INFO ", 1)[-1].strip()[:120]))
        except ValueError:
            continue
    out = []
    for (t0, what), (t1, _) in zip(marks, marks[1:] + [(wall_s, "end")]):
        inside = [b for t, b in samples if t0 <= t < t1]
        out.append({"from_s": round(t0, 1), "to_s": round(t1, 1), "after": what,
                    "peak_rss_bytes": max(inside) if inside else None})
    return out


def _out_path(cli_args: list[str]) -> Path | None:
    a = {k: v for k, v in zip(cli_args, cli_args[1:])}
    if "--out" in a:
        return Path(a["--out"])
    if "--onnx" in a and "--precision" in a:
        p = Path(a["--onnx"])
        return p.with_name(f"{p.stem}.{a['--precision']}.onnx")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON report")
    p.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the invpt-quantize arguments")
    args = p.parse_args(argv)
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = os.getloadavg()
    res = run(cli)
    load_after = os.getloadavg()
    out = _out_path(cli)
    man = None
    if res["exit_code"] == 0 and out is not None and out.with_suffix(".json").is_file():
        man = json.loads(out.with_suffix(".json").read_text())
    report = {
        "schema": SCHEMA, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(), "quantize_args": cli, **{k: v for k, v in res.items() if k != "log"},
        "phase_log": [line for line in res["log"] if "[invpt]" in line and " DEBUG " not in line][:200],
        "phase_peaks": phase_peaks(res["log"], res["rss_samples"], res["wall_s"]),
        # the machine is shared: 1/5/15-minute load averages when the run started and ended (2 cores)
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "output": str(out) if out else None,
        "output_bytes": out.stat().st_size if out and out.is_file() else None,
        "verification": (man or {}).get("verification"),
        "calibration": (man or {}).get("calibration"),
        "precision_policy": {k: v for k, v in ((man or {}).get("precision_policy") or {}).items()
                             if k != "kept_nodes"},
        "environment": environment(), "note": SHARED_MACHINE_NOTE,
    }
    write_json_atomic(report, args.out)
    rows = [["exit code", res["exit_code"]], ["wall time", fmt_seconds(res["wall_s"])],
            ["peak RSS (ru_maxrss)", fmt_bytes(res["peak_rss_bytes"])],
            ["output", f"{out} ({fmt_bytes(report['output_bytes'])})"]]
    for task, t in ((report["verification"] or {}).get("tasks") or {}).items():
        rows.append([f"parity {task}", f"rel err {t.get('rel_err'):.3g}, cosine {t.get('cosine'):.6f}"])
    print(markdown_table(["measure", "value"], rows))
    print()
    print(markdown_table(["from (s)", "to (s)", "peak RSS", "after the line"],
                         [[p["from_s"], p["to_s"], fmt_bytes(p["peak_rss_bytes"]), p["after"]]
                          for p in report["phase_peaks"]]))
    return 0 if res["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
