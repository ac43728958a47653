"""The compute of an evidence set before it runs: one timing job per arm kind and dataset, then the estimate.

    python -m benchmarks.budget               # time digits, Synthetic and Vehicle; BUDGET.md's table and estimate
    python -m benchmarks.budget --seeds 10    # the estimate for another number of seeds

Per dataset, one short sweep (`ditto-simulate -m +experiment=evidence_<dataset>`) runs the arm kinds whose round
costs differ: the Ditto λ grid (six personal models), λ = auto, one-model global runs (median; geomed, iterative)
and finetune, at A1 50 %, seed 0, 20 rounds (Vehicle 40) with an evaluation every half. From each job's results.json
and job.json: the median seconds of a training round (round 1 left out), of an evaluation, and the job's fixed cost.
The estimate multiplies them by the evidence experiments' jobs (conf/experiment/evidence_<dataset>.yaml: 54
robustness jobs, 15 baseline jobs and 11 clean jobs per seed) at the official round counts, each job evaluated once,
plus each sweep's own start (measured: the timing sweep's time minus its jobs').
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.sweep import run_sweep

KINDS = ("ditto_grid", "ditto_auto", "global_median", "global_geomed", "finetune")
DATASETS = {  # dataset -> (official rounds of the next set, rounds of the timing jobs)
    "digits": (150, 20),
    "synthetic": (200, 20),
    "vehicle": (600, 40),
}
# jobs per seed of each arm kind in the three evidence sweeps (robustness, baselines at 50 %, clean), by the kind
# whose round cost they share: Ditto grid; auto and APFL (two models per step); one model under a cheap rule (median,
# Krum, Multi-Krum; q-FFL, tilted, local); geomed (an iterative rule); finetune
JOBS_PER_SEED = {
    "ditto_grid": 9 + 1,
    "ditto_auto": 9 + 1 + 3 + 1,
    "global_median": 27 + 9 + 6,
    "global_geomed": 9 + 1,
    "finetune": 3 + 1,
}


def training_round(rounds: list[dict]) -> float:
    """The median seconds of a training round: the increments of the rounds' clock from round 2 on, rounds with an
    evaluation left out (round 1 of a sweep's first job also waits for the actors to start)."""
    clock = [r["seconds"] for r in rounds]
    return statistics.median(b - a for a, b, r in zip(clock, clock[1:], rounds[1:]) if not r.get("sent_evaluations"))


def time_dataset(dataset: str, rounds: int, out: Path) -> tuple[dict[str, dict[str, float]], float]:
    """({arm kind: seconds per round, per evaluation, fixed}, the sweep's own seconds outside its jobs)."""
    whole, jobs = run_sweep(
        [
            f"+experiment=evidence_{dataset}",
            f"+experiment/arm={','.join(KINDS)}",
            "attack=label_poison",
            "attack.fraction=0.5",
            "seed=0",
            f"num_rounds={rounds}",
            f"eval_every={rounds // 2}",
        ],
        out,
    )
    costs = {}
    for kind, job in zip(KINDS, jobs):
        timing = job["timing"]
        costs[kind] = {
            "round": training_round(job["rounds"]),
            "evaluation": timing["evaluation_seconds"] / 2,
            "fixed": job["seconds"] - timing["training_seconds"] - timing["evaluation_seconds"],
        }
    return costs, whole - sum(job["seconds"] for job in jobs)


def estimate(costs: dict[str, dict[str, float]], rounds: int, seeds: int, sweep_start: float) -> float:
    """Hours of the dataset's three evidence sweeps at `rounds` rounds and `seeds` seeds (one evaluation per job; the
    first job's fixed cost, which starts Ray, stands for every job's: an upper bound)."""
    fixed = sorted(c["fixed"] for c in costs.values())[len(costs) // 2]  # the median job: later jobs reuse Ray
    seconds = sum(
        JOBS_PER_SEED[kind] * seeds * (fixed + rounds * c["round"] + c["evaluation"]) for kind, c in costs.items()
    )
    return (seconds + 3 * sweep_start) / 3600


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds of the next evidence set (default 8)")
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    args = parser.parse_args(argv)
    total = 0.0
    kinds = " | ".join(KINDS)
    print(f"| dataset | s/round: {kinds} | s/evaluation: {kinds} | fixed s/job | sweep start s | rounds | jobs | h |")
    print("|---" * (6 + 2 * len(KINDS)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            rounds, timing_rounds = DATASETS[dataset]
            costs, start = time_dataset(dataset, timing_rounds, Path(tmp) / dataset)
            hours = estimate(costs, rounds, args.seeds, start)
            total += hours
            fixed = sorted(c["fixed"] for c in costs.values())[len(costs) // 2]
            jobs = sum(JOBS_PER_SEED.values()) * args.seeds
            print(
                f"| {dataset} | "
                + " | ".join(f"{costs[k]['round']:.3f}" for k in KINDS)
                + " | "
                + " | ".join(f"{costs[k]['evaluation']:.2f}" for k in KINDS)
                + f" | {fixed:.1f} | {start:.0f} | {rounds} | {jobs} | {hours:.1f} |",
                flush=True,
            )
    print(f"\ntotal: {total:.1f} hours for {args.seeds} seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
