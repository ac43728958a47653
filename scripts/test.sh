#!/usr/bin/env bash
# The test suite (what CI runs). Extra arguments go to pytest, e.g.  scripts/test.sh -m "not slow"
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
python -m ruff check --quiet app strategies tests benchmarks  # lint first: pyproject [tool.ruff]
python -m ruff format --check --quiet app strategies tests benchmarks  # and the format (ruff format fixes it)
exec python -m pytest "$@"
