#!/usr/bin/env bash
# Install what the tests need into ./.venv, then run the CPU test suite (slow ViT-L tests excluded: -m slow runs them).
# Tests run in parallel on every core (pytest-xdist), one compute thread each: most of their time is single-threaded
# Python (export tracing, ModelOpt, TensorRT parsing), so N workers on N cores take about 1/N of the time. The
# exported/quantized tiny models the tests share are made once per run, not once per worker (tests/conftest.py), and
# each test file runs on one worker (--dist loadfile) so that a file's own module fixtures are built once, not on both.
# INVPT_TEST_WORKERS=0 runs them in one process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh" test
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$ROOT/.venv/bin/python" -m pytest -n "${INVPT_TEST_WORKERS:-auto}" --dist loadfile "$@"
