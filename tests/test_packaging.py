"""Packaging rules: code imports only invpt.* names, and lower stages never import higher ones."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["invpt", "export", "calib", "engines", "runtime"]  # lowest first
NAMESPACE = {"invpt": "invpt", "export": "invpt.export", "calib": "invpt.calib", "engines": "invpt.engines", "runtime": "invpt.runtime"}
BARE = ("export", "calib", "engines", "runtime")


def _python_files():
    for folder in [*STAGES, "tests", "bench"]:
        yield from (REPO / folder).rglob("*.py")


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_no_bare_top_level_imports():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in _python_files() for line, mod in _imports(p)
           if mod.split(".")[0] in BARE]
    assert not bad, "import the invpt.* names instead:\n" + "\n".join(bad)


def _stage_of_module(mod: str):
    parts = mod.split(".")
    if parts[0] != "invpt":
        return None
    if len(parts) > 1 and parts[1] in BARE:
        return STAGES.index(parts[1])
    return 0


@pytest.mark.parametrize("folder", STAGES)
def test_lower_stages_never_import_higher_ones(folder):
    level = STAGES.index(folder)
    bad = []
    for p in (REPO / folder).rglob("*.py"):
        for line, mod in _imports(p):
            s = _stage_of_module(mod)
            if s is not None and s > level:
                bad.append(f"{p.relative_to(REPO)}:{line} imports {mod}")
    assert not bad, f"{folder} is stage {level} and must not import higher stages:\n" + "\n".join(bad)


def test_installed_namespace_maps_folders():
    import importlib

    for folder, name in NAMESPACE.items():
        mod = importlib.import_module(name)
        assert Path(mod.__file__).resolve().parent == (REPO / folder).resolve()


CLI_MODULES = ["invpt.cli.infer", "invpt.cli.init", "invpt.export.cli", "invpt.calib.cli", "invpt.engines.cli",
               "invpt.runtime.parity_cli", "invpt.runtime.bench_cli", "invpt.runtime.deploy_cli"]
# What the optional extras bring; the core install has none of them.
OPTIONAL = ["onnx", "onnxruntime", "onnxscript", "onnxslim", "modelopt", "onnx_graphsurgeon", "polygraphy",
            "tensorrt", "tensorrt_rtx", "matplotlib", "google.protobuf"]
HEAVY = ["torch", "onnx", "onnxruntime", "modelopt", "tensorrt", "tensorrt_rtx"]


def _run_without_extras(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter where every optional extra fails to import."""
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in OPTIONAL) + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_every_module_imports_without_the_optional_extras():
    """Optional dependencies are imported where they are used, never at module import (so --help and the core
    work on a core install, and a missing extra is a one-line DependencyError naming it, not a ModuleNotFoundError)."""
    body = (
        "import importlib, pkgutil\n"
        "names = set()\n"
        "for pkg in ['invpt', 'invpt.export', 'invpt.calib', 'invpt.engines', 'invpt.runtime', 'invpt.cli',\n"
        "            'invpt.data', 'invpt.layers']:\n"
        "    names |= {m.name for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__, pkg + '.')}\n"
        "bad = []\n"
        "for n in sorted(names):\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except ImportError as e:\n"
        "        bad.append(f'{n}: {e}')\n"
        "print(len(names)); print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = _run_without_extras(body)
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split()[0]) >= 40  # the walk really saw the package


@pytest.mark.parametrize("module", CLI_MODULES)
def test_help_works_without_extras_and_imports_nothing_heavy(module):
    body = (
        f"import runpy\nsys.argv = ['x', '--help']\n"
        f"try:\n    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
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
    # The installed distribution's entry points (pyproject's [project.scripts]); no tomllib, so Python 3.10 works too.
    from importlib.metadata import distribution

    scripts = {ep.name for ep in distribution("invpt").entry_points if ep.group == "console_scripts"}
    assert {"invpt-infer", "invpt-init", "invpt-export", "invpt-quantize", "invpt-trt-build", "invpt-parity",
            "invpt-bench", "invpt-deploy"} <= scripts
