"""Pieces the runtime's reports share: the report folder, atomic text files, input images, error heatmaps, HTML."""
from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from invpt.errors import InputError

_logger = logging.getLogger(__name__)


def prepare_report_dir(out: str | os.PathLike, names: Sequence[str], inputs: Iterable[Optional[str | os.PathLike]],
                       *, data: Iterable[Optional[str | os.PathLike]] = (), owner: Optional[tuple[str, str]] = None,
                       markers: Optional[Mapping[str, str]] = None, what: str = "Report folder") -> Path:
    """Check the report folder ``out`` before any work; returns ``Path(out)``. Refused, each with one paragraph:

    * an existing file at ``out``; a folder that cannot be created or written;
    * a report file ``names`` will (re)write that is one of ``inputs`` or an input's manifest;
    * ``out`` being, holding or inside a folder in ``data`` (the images read): the report would land among the inputs,
      and the next run would read its PNGs as images;
    * a file (or folder) among ``names`` that exists and that invpt did not write: with ``owner`` = (report JSON name,
      schema), the folder's report JSON must exist and carry that schema (an earlier report of this kind: its files
      are replaced); with ``markers``, each such file must begin with its marker text.
    """
    from invpt.manifest import manifest_path_for
    from invpt.paths import check_output_dir, describe_path_problem, is_within, same_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{what} '{out}' exists and is not a folder ({describe_path_problem(out) or 'a file'}); "
                         "invpt writes several report files there. Choose another --out folder.")
    for d in data:
        if d is None or not Path(d).is_dir():
            continue
        if is_within(out, d) or is_within(d, out):
            raise InputError(f"{what} '{out}' {'is' if same_file(out, d) else 'overlaps'} the image folder "
                             f"'{d}' this run reads; invpt never writes among its inputs (and a later run would read "
                             "the report's pictures as images). Choose an --out folder outside it, e.g. reports/.")
    protected = []
    for inp in inputs:
        if inp is not None:
            protected += [Path(inp), manifest_path_for(inp)]
    for name in names:
        target = out / name
        for p in protected:
            if target.exists() and p.exists() and same_file(target, p):
                raise InputError(f"Report file '{target}' is the input '{p}'; writing the report would destroy it, and "
                                 "invpt never writes into its inputs. Choose another --out folder.")
    existing = [n for n in names if (out / n).exists()] if out.is_dir() else []
    foreign = [n for n in existing if not _made_by_invpt(out, n, owner, markers)]
    if foreign:
        why = (f"no invpt {owner[0]} is beside them" if owner else "they are not invpt's reports")
        raise InputError(f"{what} '{out}' already holds {', '.join(foreign)}, which invpt did not write ({why}); "
                         "invpt never replaces files it did not make. Choose a new or empty --out folder, or move "
                         "those files away.")
    return check_output_dir(out, what, "Choose a writable --out folder.")


def _made_by_invpt(folder: Path, name: str, owner: Optional[tuple[str, str]], markers: Optional[Mapping[str, str]]
                   ) -> bool:
    """Whether ``folder/name`` is a report file invpt wrote (see :func:`prepare_report_dir`)."""
    if markers and name in markers:
        try:
            with open(folder / name, "rb") as f:
                return markers[name].encode() in f.read(4096)
        except OSError:
            return False
    if owner:
        try:
            report = json.loads((folder / owner[0]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(report, dict) and report.get("schema") == owner[1]
    return False


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (temporary file beside it, then rename; InputError naming the file on an OS error)."""
    from invpt.atomic import write_atomic

    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data), what="Report file")


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def finite_or_none(x: float) -> Optional[float]:
    return float(x) if x is not None and np.isfinite(x) else None


# ---- inputs -------------------------------------------------------------------------------------------------
def load_inputs(data: Optional[str | os.PathLike], size_hw: Sequence[int], mode: str, samples: int, seed: int = 0,
                mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                ) -> tuple[np.ndarray, list[str], str]:
    """``samples`` preprocessed images ``[N, 3, H, W]`` from ``data`` (image, folder, video, dataset root: the first
    N in the source's order), their ids and a description; without ``data``, seeded standard-normal tensors.

    ``mode`` is the manifest's preprocessing; ``pad`` becomes ``letterbox`` (identical for images that fit the input,
    larger ones are scaled down to fit instead of refused), so any photo can be compared.
    """
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}.")
    h, w = int(size_hw[0]), int(size_hw[1])
    if data is None:
        x = np.random.default_rng(seed).standard_normal((samples, 3, h, w), dtype=np.float32)
        return x, [f"random-{i}" for i in range(samples)], f"{samples} seeded random input(s) (seed {seed}; no --data)"
    from invpt.data.datasets import open_source
    from invpt.data.transforms import preprocess

    src = open_source(data)
    n = min(samples, len(src))
    if n == 0:
        raise InputError(f"'{data}' holds no image. Pass an image, a folder of images, a video or a dataset root.")
    geometry = "letterbox" if mode == "pad" else mode
    ids = src.ids()[:n]
    xs = [preprocess(src.load(i), (h, w), geometry, mean, std, source=ids[i])[0] for i in range(n)]
    if n < samples:
        _logger.warning("'%s' has %d image(s); using all of them (--samples %d)", data, n, samples)
    return np.stack(xs), ids, f"{n} image(s) from {data} ({geometry} to {h}x{w})"


def denormalize(x: np.ndarray, mean: Sequence[float] = (0.485, 0.456, 0.406),
                std: Sequence[float] = (0.229, 0.224, 0.225)) -> np.ndarray:
    """A ``[3, H, W]`` network input back to an ``HxWx3`` uint8 RGB picture (random inputs become noise)."""
    img = x.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def error_heatmap(ref: np.ndarray, test: np.ndarray, vmax: Optional[float] = None) -> tuple[np.ndarray, float]:
    """``HxWx3`` uint8 RGB heatmap (inferno) of the per-pixel mean absolute error of two ``[C, H, W]`` raw maps, and
    the value white stands for (``vmax``; default the map's own maximum)."""
    import cv2

    err = np.abs(test.astype(np.float64) - ref.astype(np.float64)).mean(axis=0)
    err = np.nan_to_num(err, nan=np.inf)
    top = float(vmax) if vmax is not None else float(err[np.isfinite(err)].max(initial=0.0))
    scaled = np.clip(err / top, 0.0, 1.0) if top > 0 else np.zeros_like(err)
    grey = (scaled * 255.0 + 0.5).astype(np.uint8)
    bgr = cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO)
    return np.ascontiguousarray(bgr[:, :, ::-1]), top


# ---- HTML ---------------------------------------------------------------------------------------------------
def markdown_to_html(md: str) -> str:
    """A small Markdown subset (headings, pipe tables, images, paragraphs, code) to HTML, enough for the summary."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table>")
            for k, r in enumerate(body):
                tag = "th" if k == 0 else "td"
                out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in r) + "</tr>")
            out.append("</table>")
            continue
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            out.append("<pre>" + html.escape("\n".join(block)) + "</pre>")
            i += 1
            continue
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, _, rest = line[2:].partition("](")
            out.append(f'<p><img src="{html.escape(rest.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
        elif line.startswith("- "):
            out.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _inline(text: str) -> str:
    import re

    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', t)
    return t


HTML_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
              "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
              "font-size:90%}th{background:#eee}img{max-width:100%;border:1px solid #ddd}"
              "pre{background:#f6f6f6;padding:8px;overflow-x:auto}")


def html_page(title: str, body_html: str) -> str:
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head><body>\n{body_html}\n</body></html>\n")
