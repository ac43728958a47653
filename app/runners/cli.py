"""The project's commands (`[project.scripts]` in pyproject.toml), one function each. Each imports its own module
only when it runs, so `ditto-config` does not load Flower's simulation engine; each ends a refusal (bad config or
data) with one line and exit status 2 (app/runners/refusals.py).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from app.runners.refusals import run


def installed(name: str) -> str:
    """The path of the command `name` of this environment (beside its Python, as pip installs it; else on PATH), so
    that tests and benchmarks run the commands a user runs."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"the command {name} is not installed: pip install -e . (scripts/env.sh does)")
    return found


def simulate() -> int:
    """`ditto-simulate [OVERRIDE ...] [-m]`: the Hydra entry point (app/runners/simulate.py)."""
    from app.runners import simulate as module

    return module.command()


def flwr_run() -> int:
    """`ditto-run [--output-dir DIR] [OVERRIDE ...]`: the main job through `flwr run .` (app/runners/launch.py)."""
    from app.runners import launch

    return run(launch.main)


def deploy() -> int:
    """`ditto-deploy [--tls] [OVERRIDE ...]`: SuperLink and SuperNodes on loopback (app/runners/deploy.py)."""
    from app.runners import deploy as module

    return run(module.main)


def report() -> int:
    """`ditto-report SWEEP_DIR ... | --csv DIR`: tables, statistics and figures (app/analysis/report.py)."""
    from app.analysis import report as module

    return run(module.main)


def theory() -> int:
    """`ditto-theory`: the paper's analysis of lam, closed form against simulation (app/analysis/theory.py)."""
    from app.analysis import theory as module

    return run(module.main)


def config() -> int:
    """`ditto-config KEY [OVERRIDE ...]`: print one key of the composed, validated config (for scripts)."""
    from app.config import compose

    return run(compose.main)
