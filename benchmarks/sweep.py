"""Sweeps against the limit: a Hydra multirun as a user runs it, against a plain single-process PyTorch loop doing the
same SGD for every job back to back (benchmarks/overhead.py's reference loop, one job after another).

    python -m benchmarks.sweep                                  # digits (20 jobs x 100 rounds), Vehicle (8 x 600)
    python -m benchmarks.sweep --suite digits --jobs 6 --rounds 5    # a smaller sweep
    python -m benchmarks.sweep --suite vehicle attack=none      # any Hydra override of every job

A suite's jobs are its seeds 0..jobs-1. The sweep runs as `ditto-simulate -m ... seed=0,1,... hydra.sweep.dir=TMP`
in a subprocess; the plain loop runs first, in this process, on one torch thread, with each job's data loaded before
its timer starts. Printed per job: its time in the sweep (job.json, written by the sweep), the server's training and
evaluation time (results.json's `timing`) and its fixed cost, the rest: the Ray runtime and actors (first job only:
they are kept for the sweep, app/runners/runtime.py), the devices' data, the results written. Then the whole sweep:
its time, its fixed cost per job including what runs outside the jobs (the process, imports, Hydra, Ray's shutdown),
the plain loop's time and the ratio of the two, and whether every job's final metrics equal the plain loop's. The
machine's load average is printed before and after: the machines here are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.config.compose import compose_config
from app.runners.cli import installed
from benchmarks.overhead import timed_plain

SUITES = {  # name -> (overrides, jobs, rounds): the sizes issue 33 asks for
    "digits": (["dataset=digits"], 20, 100),
    "vehicle": (["dataset=vehicle"], 8, 600),
}
TARGETS = {"ratio": 1.3, "fixed_digits": 2.0}


def plain_jobs(overrides: list[str], seeds: list[int]) -> tuple[list[float], list[dict]]:
    """(seconds, final summaries) of the plain loop for each seed, one after another."""
    times, finals = [], []
    for seed in seeds:
        seconds, final = timed_plain(compose_config([*overrides, f"seed={seed}"]))
        times.append(seconds)
        finals.append(final)
    return times, finals


def run_sweep(overrides: list[str], sweep_dir: Path) -> tuple[float, list[dict]]:
    """(seconds, per job in order: its job.json and results.json merged) of `ditto-simulate -m OVERRIDES` in
    `sweep_dir`, as a user runs it; a failed sweep or job ends the benchmark with its error."""
    began = time.perf_counter()
    proc = subprocess.run(
        [installed("ditto-simulate"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True
    )
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    jobs = []
    for folder in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        results, failed = folder / "results.json", folder / "failed.json"
        if not results.exists():
            why = failed.read_text() if failed.exists() else proc.stderr
            raise SystemExit(f"job {folder.name} wrote no results: {why}")
        jobs.append({**json.loads((folder / "job.json").read_text()), **json.loads(results.read_text())})
    return seconds, jobs


def agree(plain: dict, final: dict) -> float:
    """The largest difference between two runs' final benign accuracies and stds (global and personal)."""
    return max(
        abs(plain[kind][key] - final[kind][key])
        for kind in ("global", "personal")
        for key in ("benign_acc", "benign_std_acc")
    )


def run_suite(name: str, overrides: list[str], jobs: int, rounds: int) -> dict:
    base = [*overrides, f"num_rounds={rounds}"]
    seeds = list(range(jobs))
    print(f"\n== {name}: {jobs} jobs x {rounds} rounds ({' '.join(base)}), seeds 0..{jobs - 1}", flush=True)
    load = os.getloadavg()[0]
    plain_times, plain_finals = plain_jobs(base, seeds)
    with tempfile.TemporaryDirectory() as tmp:
        whole, swept = run_sweep([*base, f"seed={','.join(map(str, seeds))}"], Path(tmp) / "sweep")
    print(f"{'job':>4} {'in sweep':>9} {'training':>9} {'evaluation':>11} {'fixed':>7} {'plain':>7}   (seconds)")
    fixed = []
    for num, (job, plain) in enumerate(zip(swept, plain_times)):
        t = job["timing"]
        fixed.append(job["seconds"] - t["training_seconds"] - t["evaluation_seconds"])
        print(
            f"{num:>4} {job['seconds']:9.2f} {t['training_seconds']:9.2f} {t['evaluation_seconds']:11.2f} "
            f"{fixed[-1]:7.2f} {plain:7.2f}"
        )
    work = sum(j["timing"]["training_seconds"] + j["timing"]["evaluation_seconds"] for j in swept)
    per_job = (whole - work) / jobs
    ratio = whole / sum(plain_times)
    difference = max(agree(p, j["final"]) for p, j in zip(plain_finals, swept))
    after = os.getloadavg()[0]
    print(f"sweep, whole                 {whole:9.1f} s   (load average {load:.2f} before, {after:.2f} after)")
    print(f"plain loop, every job        {sum(plain_times):9.1f} s")
    print(f"ratio, sweep / plain         {ratio:9.2f}     (target <= {TARGETS['ratio']})")
    print(f"ratio, training+evaluation / plain {work / sum(plain_times):.2f}")
    later = statistics.median(fixed[1:] or fixed)
    print(f"fixed cost per job, median   {statistics.median(fixed):9.2f} s   (jobs 2..: {later:.2f} s)")
    print(f"fixed cost per job, all in  {per_job:9.2f} s   (the sweep's whole time minus every job's rounds, per job)")
    print(f"largest difference of final benign accuracy/std, sweep vs plain: {difference:.2e}")
    return {"suite": name, "ratio": ratio, "fixed": per_job, "difference": difference}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=[*SUITES, "both"], default="both")
    parser.add_argument("--jobs", type=int, help="jobs per suite (default: the suite's)")
    parser.add_argument("--rounds", type=int, help="rounds per job (default: the suite's)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every job")
    args = parser.parse_args(argv)
    results = []
    for name in SUITES if args.suite == "both" else [args.suite]:
        overrides, jobs, rounds = SUITES[name]
        results.append(run_suite(name, [*overrides, *args.overrides], args.jobs or jobs, args.rounds or rounds))
    print()
    for r in results:
        fixed = f", fixed cost per job {r['fixed']:.2f} s" + (
            f" (target <= {TARGETS['fixed_digits']})" if r["suite"] == "digits" else ""
        )
        print(f"{r['suite']}: sweep / plain {r['ratio']:.2f} (target <= {TARGETS['ratio']}){fixed}")


if __name__ == "__main__":
    main(sys.argv[1:])
