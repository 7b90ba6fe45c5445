#!/usr/bin/env bash
# Install what the tests need into ./.venv, then run the CPU test suite (slow ViT-L tests excluded: -m slow runs them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh" test
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
