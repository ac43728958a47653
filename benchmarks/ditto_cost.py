"""Ditto's own cost: time per round of method=ditto against method=global on the same workload, one process.

    python -m benchmarks.ditto_cost                    # the overhead benchmark's workload (digits CNN, 100 devices)
    python -m benchmarks.ditto_cost dataset=synthetic  # any Hydra override of that workload

A Ditto round runs the global step and the personal step (one more forward/backward per mini-batch, plus the
proximal term) and loads and stores the personal model; a global round runs the global step only. Printed: the
median time of a training round (rounds whose time holds no evaluation: neither it nor the round before evaluates;
round 1 warms the actors up) for each method, their ratio, and the whole round loop with evaluations, where Ditto
also scores the personal model of every device.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from app.config.compose import compose_config
from app.runners.simulate import simulate
from benchmarks.overhead import WORKLOAD
from strategies.sampling import evaluates


def round_times(overrides: list[str]) -> tuple[float, float]:
    """(median seconds of a training round, seconds of the whole round loop) of one simulation."""
    cfg = compose_config([*WORKLOAD, *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        simulate(cfg, Path(tmp))
        results = json.loads((Path(tmp) / "results.json").read_text())
    ends = {r["round"]: r["seconds"] for r in results["rounds"]}
    training = [
        ends[r] - ends[r - 1]
        for r in range(3, cfg.num_rounds + 1)
        if not any(evaluates(q, cfg.eval_every, cfg.num_rounds) for q in (r, r - 1))
    ]
    return statistics.median(training), ends[cfg.num_rounds] - results["connected_after_seconds"]


def main(overrides: list[str]) -> None:
    print(f"workload: {' '.join([*WORKLOAD, *overrides])}")
    t_global, loop_global = round_times([*overrides, "method=global"])
    t_ditto, loop_ditto = round_times([*overrides, "method=ditto"])
    print(f"{'':<22}{'global':>10}{'ditto':>10}{'ditto/global':>14}")
    print(f"{'training round, s':<22}{t_global:>10.4f}{t_ditto:>10.4f}{t_ditto / t_global:>13.2f}x   (target <= 2.2)")
    print(
        f"{'all rounds, s':<22}{loop_global:>10.2f}{loop_ditto:>10.2f}{loop_ditto / loop_global:>13.2f}x   "
        "(with evaluations)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
