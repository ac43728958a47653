"""Scale: the same small-model Ditto experiment on federations of growing size, personal models on disk.

    python -m benchmarks.scale                                   # 1,000 / 3,000 / 10,000 devices
    python -m benchmarks.scale --devices 1000 3000 --rounds 30   # other sizes, more rounds
    python -m benchmarks.scale -- method=global                  # Hydra overrides after --

Each size runs `ditto-simulate` (Synthetic(1, 1), logistic regression, 10 devices per round,
personal_state=disk, every device evaluated after the last round) in a child process, and timestamps its log lines
as they arrive: start-up (until every device has connected and been identified), the training rounds (one line
each) and the final evaluation of all devices. A sampler reads the resident memory of the driver and of its whole
process tree (Ray's GCS, raylet and workers included) every 0.2 s. Printed per size: start-up, the median time of
a training round (rounds 2..R-1: round 1 warms the actors up, round R also evaluates), the evaluation's time per
device, the driver's peak memory during the training rounds and over the whole run, and the tree's; then each
figure of the largest size as a ratio to the smallest's.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psutil

from app.paths import PROJECT_DIR
from app.runners.cli import installed

GIB = 2**30


@dataclass
class Sampler:
    """Resident memory of a process and of its process tree, sampled every `period` seconds in a thread."""

    pid: int
    period: float = 0.2
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, driver bytes, tree bytes)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        root = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        rss.append(0)
                self.samples.append((time.monotonic(), rss[0], sum(rss)))
            except psutil.Error:
                return
            self._stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float = 0.0, end: float = float("inf")) -> tuple[float, float]:
        """(driver, tree) peak GiB between two times."""
        inside = [(d, t) for s, d, t in self.samples if start <= s <= end] or [(0, 0)]
        return max(d for d, _ in inside) / GIB, max(t for _, t in inside) / GIB


def run(devices: int, rounds: int, overrides: list[str]) -> dict[str, float]:
    args = [
        "dataset=synthetic",
        f"num_clients={devices}",
        "clients_per_round=10",
        f"num_rounds={rounds}",
        f"eval_every={rounds}",
        "personal_state=disk",
        "verbose=true",
        *overrides,
    ]  # timed by its log lines
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        proc = subprocess.Popen(
            [installed("ditto-simulate"), *args, f"hydra.run.dir={tmp}"],
            cwd=PROJECT_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        marks: dict[str, float] = {}
        round_ends: dict[int, float] = {}
        tail: list[str] = []
        with Sampler(proc.pid) as sampler:
            for line in proc.stdout:
                now = time.monotonic()
                tail = (tail + [line])[-30:]
                if "devices connected and identified" in line:
                    marks["identified"] = now
                elif found := re.search(r"round (\d+)/\d+: \d+ updates aggregated", line):
                    round_ends[int(found.group(1))] = now
                elif re.search(r"round \d+ evaluation over", line):
                    marks["evaluated"] = now
            proc.wait()
        end = time.monotonic()
    if proc.returncode != 0 or len(round_ends) != rounds or "evaluated" not in marks:
        raise SystemExit(f"the run with {devices} devices failed:\n{''.join(tail)}")
    per_round = [round_ends[r] - round_ends[r - 1] for r in range(2, rounds)]
    train_driver, train_tree = sampler.peak(round_ends[1], round_ends[rounds - 1])
    all_driver, all_tree = sampler.peak()
    return {
        "start-up s": marks["identified"] - start,
        "round s": statistics.median(per_round),
        "eval ms/device": 1000 * (marks["evaluated"] - round_ends[rounds]) / devices,
        "driver GiB (rounds)": train_driver,
        "tree GiB (rounds)": train_tree,
        "driver GiB (peak)": all_driver,
        "tree GiB (peak)": all_tree,
        "wall s": end - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = parser.parse_args()
    results = {}
    for n in args.devices:
        results[n] = run(n, args.rounds, args.overrides)
        print(f"{n:>7} devices: " + "  ".join(f"{k} {v:.3f}" for k, v in results[n].items()), flush=True)
    small, large = min(results), max(results)
    print(f"\n{'figure':<22}" + "".join(f"{n:>10}" for n in results) + f"{f'{large}/{small}':>14}")
    for key in results[small]:
        ratio = results[large][key] / results[small][key] if results[small][key] else float("nan")
        print(f"{key:<22}" + "".join(f"{results[n][key]:>10.3f}" for n in results) + f"{ratio:>13.2f}x")


if __name__ == "__main__":
    main()
