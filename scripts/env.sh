# Sourced by run.sh and test.sh: create or reuse the project-local venv (.venv) and set Flower's environment.
# torch is installed with pip on purpose: pip finds the pinned wheels on local disk (uv/poetry would download GBs).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "creating $ROOT/.venv" >&2
  "$PY" -m venv "$ROOT/.venv" || return 1 2>/dev/null || exit 1
fi
STAMP="$ROOT/.venv/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "installing the project and its pinned dependencies into .venv (first run: a few minutes)" >&2
  "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" 2>&1 \
    | { grep -v "^WARNING: Location .* is ignored" >&2 || true; }
  if ! "$ROOT/.venv/bin/python" -c "import app.client_app, strategies" >/dev/null 2>&1; then
    echo "error: installing into .venv failed (see pip's output above)" >&2
    return 1 2>/dev/null || exit 1
  fi
  rm -f "$ROOT"/.venv/.installed-* && touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export FLWR_HOME="${FLWR_HOME:-$ROOT/.flwr}"
set -a; source "$ROOT/scripts/flower.env"; set +a  # Flower's environment, one place (app/runners/launch.py reads it too)
# File-backed datasets (vehicle) read $DITTO_DATA_DIR/NAME; default: the shared data folder next to the project.
if [ -z "${DITTO_DATA_DIR:-}" ] && [ -d "$ROOT/../shared/data" ]; then
  DITTO_DATA_DIR="$(cd "$ROOT/../shared/data" && pwd)"
  export DITTO_DATA_DIR
fi
