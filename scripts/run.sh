#!/usr/bin/env bash
# The main job: `flwr run .` of the default experiment (conf/config.yaml), on a local simulation.
# Extra arguments are Hydra overrides, e.g.  scripts/run.sh attack=none method.lam=0.5
# The local SuperLink that flwr starts is stopped by pid when the run ends (app/runners/launch.py).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec ditto-run "$@"
