"""Packaging rules: code imports only invpt.* names, each package imports only what its row of ALLOWED names, every
module imports and every --help runs without the optional extras."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the installed package it becomes (pyproject's package-dir).
NAMESPACE = {"invpt": "invpt", "export": "invpt.export", "calib": "invpt.calib", "engines": "invpt.engines",
             "runtime": "invpt.runtime"}
BARE = ("export", "calib", "engines", "runtime")
STAGES = ("invpt.export", "invpt.calib", "invpt.engines", "invpt.runtime")  # lowest first
CORE = ("invpt", "invpt.train")
# Which layer may import which. Every invpt module belongs to one layer (see ``_layer``): the core ("invpt", with its
# subpackages data, layers, cli, presets), the training package in the core ("invpt.train"), or a stage. A stage
# may import the core (training included) and the stages below it; the training package may import the core but
# no stage; the rest of the core may not import the training package (inference never needs it).
ALLOWED: dict[str, frozenset[str]] = {
    "invpt": frozenset({"invpt"}),
    "invpt.train": frozenset({"invpt", "invpt.train"}),
    "invpt.export": frozenset({*CORE, "invpt.export"}),
    "invpt.calib": frozenset({*CORE, "invpt.export", "invpt.calib"}),
    "invpt.engines": frozenset({*CORE, "invpt.export", "invpt.calib", "invpt.engines"}),
    "invpt.runtime": frozenset({*CORE, *STAGES}),
}
RULES = {
    "invpt": "the core never imports a stage or the training package",
    "invpt.train": "the training package imports the core only, never a stage",
    "invpt.export": "export imports the core only",
    "invpt.calib": "calib imports the core and export",
    "invpt.engines": "engines imports the core, export and calib",
    "invpt.runtime": "runtime imports the core and every stage",
}
# Calls whose string argument names a module imported at run time (lazy imports that ``import`` statements miss).
DYNAMIC_IMPORTERS = {"import_module", "require", "__import__"}


def _layer(module: str) -> str | None:
    """The ALLOWED row of an invpt module name (None for other packages)."""
    parts = module.split(".")
    if parts[0] != "invpt":
        return None
    if len(parts) > 1 and f"invpt.{parts[1]}" in ALLOWED:
        return f"invpt.{parts[1]}"
    return "invpt"


def _module_name(path: Path) -> str:
    """The installed module name of a source file (``export/cli.py`` -> ``invpt.export.cli``)."""
    rel = path.relative_to(REPO)
    parts = [NAMESPACE[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def _python_files():
    for folder in [*NAMESPACE, "tests", "bench"]:
        yield from (REPO / folder).rglob("*.py")


def _package_files():
    for folder in NAMESPACE:
        yield from (REPO / folder).rglob("*.py")


def _called_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _imports(source: str, module: str = "", filename: str = "<string>"):
    """(line, imported name) for every import in ``source``, at any depth (functions, methods, ``if`` blocks), with
    relative imports resolved against ``module``; ``from invpt import export`` yields ``invpt.export``. Also the
    string arguments of ``importlib.import_module``/``require`` calls and the module names of a ``lazy_face`` map."""
    tree = ast.parse(source, filename=filename)
    is_package = filename.endswith("__init__.py")
    dicts = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
             for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, *([base] if base else [])])
            yield node.lineno, base
            for a in node.names:
                if a.name != "*":
                    yield node.lineno, f"{base}.{a.name}"
        elif isinstance(node, ast.Call):
            name = _called_name(node)
            if name in DYNAMIC_IMPORTERS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value
            elif name == "lazy_face" and len(node.args) > 1:
                table = node.args[1]
                table = dicts.get(table.id, table) if isinstance(table, ast.Name) else table
                if isinstance(table, ast.Dict):
                    for v in table.values:
                        if isinstance(v, ast.Constant) and isinstance(v.value, str):
                            yield v.lineno, v.value


def _violations(source: str, module: str, where: str, filename: str = "<string>") -> list[str]:
    """Lines ``where:LINE imports NAME`` for each import of ``source`` (module ``module``) that ALLOWED forbids."""
    own = _layer(module)
    found: dict[tuple[int, str], str] = {}  # (line, forbidden layer) -> the shortest name imported from it there
    for line, name in _imports(source, module, filename):
        layer = _layer(name)
        if layer is not None and layer not in ALLOWED[own]:
            found[line, layer] = min(found.get((line, layer), name), name, key=len)
    return [f"{where}:{line} imports {name} ({layer}); {own} may import only {', '.join(sorted(ALLOWED[own]))}: "
            f"{RULES[own]}" for (line, layer), name in sorted(found.items())]


def test_no_bare_top_level_imports():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _python_files()
           for line, mod in _imports(p.read_text(), filename=str(p)) if mod.split(".")[0] in BARE]
    assert not bad, "import the invpt.* names instead:\n" + "\n".join(bad)


def test_allowed_import_map_covers_every_package():
    """Each source file belongs to a row of ALLOWED (a new stage or core package needs its row first)."""
    layers = {_layer(_module_name(p)) for p in _package_files()}
    assert layers <= set(ALLOWED) and {"invpt", "invpt.export", "invpt.calib", "invpt.runtime"} <= layers
    assert _layer("invpt.data.datasets") == _layer("invpt.cli.common") == _layer("invpt.layers") == "invpt"
    assert _layer("invpt.presets") == "invpt" and _layer("invpt.train.cli") == "invpt.train"
    for row, allowed in ALLOWED.items():
        assert row in allowed and "invpt" in allowed  # everything may import its own layer and the core


@pytest.mark.parametrize("folder", list(NAMESPACE))
def test_packages_import_only_what_the_map_allows(folder):
    """Checked on every import at any depth: stages import each other lazily, inside functions."""
    bad = []
    for p in sorted((REPO / folder).rglob("*.py")):
        bad += _violations(p.read_text(), _module_name(p), str(p.relative_to(REPO)), str(p))
    assert not bad, "imports against the layering rules (tests/test_packaging.py ALLOWED):\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source, fragment", [
    ("invpt.compare", "def f():\n    from invpt.runtime import load_runner\n", "invpt.runtime"),
    ("invpt.data.datasets", "import invpt.train.loop\n", "invpt.train"),
    ("invpt.cli.infer", "def f():\n    from invpt import export\n", "invpt.export"),
    ("invpt.train.loop", "def f():\n    from invpt.export.pipeline import export_model\n", "invpt.export"),
    ("invpt.train.cli", "import importlib\nimportlib.import_module('invpt.calib.cli')\n", "invpt.calib"),
    ("invpt.export.cli", "from invpt.calib import run_quantize\n", "invpt.calib"),
    ("invpt.calib.int8", "from ..engines import build\n", "invpt.engines"),
    ("invpt.engines.build", "from invpt.lazy import lazy_face\n__getattr__, __dir__ = lazy_face(__name__, "
                            "{'x': 'invpt.runtime.load'})\n", "invpt.runtime"),
])
def test_the_layering_check_catches_forbidden_imports(module, source, fragment):
    """The check can fail: each snippet breaks one rule of the map (lazily, relatively or through a face)."""
    bad = _violations(source, module, "x.py")
    assert len(bad) == 1 and fragment in bad[0] and "x.py:" in bad[0], bad


@pytest.mark.parametrize("module, source", [
    ("invpt.runtime.deploy", "from invpt.engines import build\nfrom invpt.train import evaluate\n"),
    ("invpt.engines.cli", "def f():\n    from invpt.calib.pipeline import run_quantize\n"),
    ("invpt.calib.evaluate", "from invpt.train.metrics import miou\nfrom . import data\n"),
    ("invpt.train.cli", "from invpt.data.datasets import open_source\nfrom invpt.train import loop\n"),
    ("invpt.cli.infer", "from invpt.cli.common import run_cli\nimport onnx\n"),
])
def test_the_layering_check_allows_what_the_map_allows(module, source):
    assert _violations(source, module, "x.py") == []


def test_installed_namespace_maps_folders():
    import importlib

    for folder, name in NAMESPACE.items():
        mod = importlib.import_module(name)
        assert Path(mod.__file__).resolve().parent == (REPO / folder).resolve()


def _console_scripts() -> dict[str, tuple[str, str]]:
    """pyproject's [project.scripts]: script name -> (module, function); read without tomllib (Python 3.10 has none)."""
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert section, "pyproject.toml has no [project.scripts] table"
    return {m[1]: (m[2], m[3]) for m in re.finditer(r'^\s*([\w.-]+)\s*=\s*"([\w.]+):(\w+)"', section[1], re.M)}


CLI_MODULES = sorted({module for module, _ in _console_scripts().values()})
# What the optional extras bring; the core install has none of them.
OPTIONAL = ["onnx", "onnxruntime", "onnxscript", "onnxslim", "modelopt", "onnx_graphsurgeon", "polygraphy",
            "tensorrt", "tensorrt_rtx", "matplotlib", "google.protobuf", "scipy", "skimage", "tensorboard"]
HEAVY = ["torch", "onnx", "onnxruntime", "modelopt", "tensorrt", "tensorrt_rtx"]


def _run_without_extras(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter where every optional extra fails to import."""
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in OPTIONAL) + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_every_module_imports_without_the_optional_extras():
    """Optional dependencies are imported where they are used, never at module import (so --help and the core
    work on a core install, and a missing extra is a one-line DependencyError naming it, not a ModuleNotFoundError).
    The modules are discovered (pkgutil walk of every package), so a new one is covered the day it is added."""
    body = (
        "import importlib, pkgutil\n"
        f"names, bad = set(), []\n"
        f"for pkg in {sorted(NAMESPACE.values())!r}:\n"
        "    names.add(pkg)\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for m in pkgutil.walk_packages(mod.__path__, pkg + '.', onerror=lambda n: bad.append(f'{n}: walk failed')):\n"
        "        names.add(m.name)\n"
        "for n in sorted(names):\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except ImportError as e:\n"
        "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
        "print(' '.join(sorted(names))); print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = _run_without_extras(body)
    assert r.returncode == 0, "modules that need an optional extra at import:\n" + r.stdout.partition("\n")[2] + r.stderr
    seen = set(r.stdout.splitlines()[0].split())
    on_disk = {_module_name(p) for p in _package_files()}
    assert on_disk <= seen, f"the walk missed {sorted(on_disk - seen)}"  # it really saw every file
    assert len(seen) >= 40


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_help_works_without_extras_and_imports_nothing_heavy(script):
    """What the installed console script does (``main()`` with ``--help`` in sys.argv), in an interpreter where every
    optional extra fails to import; afterwards neither torch nor an ONNX/TensorRT module may be loaded."""
    module, func = _console_scripts()[script]
    body = (
        f"import importlib\nsys.argv = [{script!r}, '--help']\ncode = 0\n"
        f"try:\n    code = importlib.import_module({module!r}).{func}()\nexcept SystemExit as e:\n    code = e.code\n"
        f"heavy = [m for m in {HEAVY!r} if sys.modules.get(m) is not None]\n"
        "print('HEAVY', heavy)\nsys.exit(code or (1 if heavy else 0))\n"
    )
    r = _run_without_extras(body)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "HEAVY []" in r.stdout and "example" in r.stdout.lower()


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_cli_has_help_with_examples(module, capsys):
    import importlib

    cli = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text.lower() and "--" in text


def test_console_scripts_declared():
    """pyproject declares every command, and the installed distribution has them (else: pip install -e .)."""
    from importlib.metadata import distribution

    declared = _console_scripts()
    assert {"invpt-infer", "invpt-init", "invpt-export", "invpt-quantize", "invpt-trt-build", "invpt-parity",
            "invpt-bench", "invpt-deploy", "invpt-train", "invpt-eval"} <= set(declared)
    installed = {ep.name for ep in distribution("invpt").entry_points if ep.group == "console_scripts"}
    assert set(declared) <= installed, f"not installed: {sorted(set(declared) - installed)}; run pip install -e ."
