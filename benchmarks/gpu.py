"""GPU benchmark: Ditto's simulation against a plain PyTorch loop on the same accelerator, and robust aggregation on the
GPU against the CPU and Flower's functions, all measured side by side in one run.

    python -m benchmarks.gpu            # a GPU machine: the sizes of the issue (about 4 minutes on one GPU)
    python -m benchmarks.gpu --quick    # reduced sizes; runs anywhere (without CUDA: the CPU columns only)

1. Ditto on the CIFAR-shaped workload (dataset=fake_images, the paper's CNN `cnn_cifar`, 100 devices, 10 per round,
   10 local steps of batch 32): the simulation's rounds against benchmarks/overhead.py's plain loop doing the same
   SGD steps on the same accelerator (`timed_plain`, `timed_simulation`), once per GPU share per client actor
   (`client_num_gpus`), with the GPU's mean and peak utilisation (nvidia-smi, sampled every 0.2 s) over each run.
   The best share is the one with the fastest rounds.
2. Robust aggregation of an n x d float32 stack (n = 100, d = 1e7; --quick: 20 x 1e5), f = (n - 3) // 4: ours on
   the GPU, ours on the CPU and Flower's function (benchmarks/aggregators.py's, stopped after --cap seconds: then
   the speed-up is a lower bound, ">"), best of the repeats. `same` compares the GPU's result with the CPU's: Krum
   must return the very same row, the others agree to float rounding (max relative difference printed). Whether
   Flower selects the same rows is checked on a stack it finishes in time (n x 2e4) and printed below the table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading

import torch

from app.config.compose import compose_config
from benchmarks.aggregators import FLOWER, _best, flower
from benchmarks.overhead import timed_plain, timed_simulation
from strategies.rules.registry import AGGREGATORS

CUDA = torch.cuda.is_available()
WORKLOAD = [
    "dataset=fake_images",
    "dataset.like=cifar10",
    "dataset.model=cnn_cifar",
    "num_clients=100",
    "clients_per_round=10",
    "local_steps=10",
    "batch_size=32",
    "method=ditto",
    "attack=none",
    "num_rounds=20",
    "eval_every=20",
]
QUICK = ["num_clients=20", "clients_per_round=5", "dataset.num_samples=2000", "num_rounds=5", "eval_every=5"]
SHARES = (0.5, 0.25, 0.125)  # GPU share per client actor: 2, 4, 8 actors per GPU


class Utilisation:
    """The GPU's utilisation (%) sampled by nvidia-smi every 0.2 s while the block runs; empty without nvidia-smi."""

    def __enter__(self) -> Utilisation:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        if not CUDA or shutil.which("nvidia-smi") is None:
            return
        while not self._stop.wait(0.2):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            if out.isdigit():
                self.samples.append(float(out))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def __str__(self) -> str:
        if not self.samples:
            return "n/a"
        return f"{sum(self.samples) / len(self.samples):.0f}% / {max(self.samples):.0f}%"


def progress(row: str) -> str:
    """`row`, also printed at once (stderr), so a run stopped early still shows what it measured."""
    print(row, file=sys.stderr, flush=True)
    return row


def ditto_rows(quick: bool) -> list[str]:
    """Part 1: the plain loop once, then the simulation per GPU share (CPU: share 0 only)."""
    accelerator = "cuda" if CUDA else "cpu"
    base = [*WORKLOAD, *(QUICK if quick else []), f"accelerator={accelerator}"]
    print(f"workload: {' '.join(base)}", flush=True)
    threads = torch.get_num_threads()
    with Utilisation() as busy:
        t_plain, plain = timed_plain(compose_config(base))
    torch.set_num_threads(threads)  # the plain loop runs on one thread; ours on the CPU (part 2) gets them all back
    rows = [
        progress(
            f"{'plain PyTorch loop':<34}{t_plain:>9.2f}{1.0:>9.2f}{str(busy):>14}"
            f"   acc {plain['personal']['benign_acc']:.4f}"
        )
    ]
    best: tuple[float, float] | None = None
    for share in SHARES if CUDA else (0.0,):
        with Utilisation() as busy:
            sim = timed_simulation(compose_config([*base, f"client_num_gpus={share}"]))
        best = min(best or (sim["rounds"], share), (sim["rounds"], share))
        rows.append(
            progress(
                f"{f'simulation rounds, {share:g} GPU/actor':<34}{sim['rounds']:>9.2f}"
                f"{sim['rounds'] / t_plain:>9.2f}{str(busy):>14}   "
                f"acc {sim['final']['personal']['benign_acc']:.4f} (start-up {sim['startup']:.1f} s)"
            )
        )
    if CUDA and best is not None:
        rows.append(
            f"best GPU share per actor: {best[1]:g} (rounds {best[0]:.2f} s, {best[0] / t_plain:.2f}x the "
            "plain loop; target <= 1.5)"
        )
    return rows


def _timed(rule, stack: torch.Tensor, weights: torch.Tensor, f: int, repeats: int) -> tuple[float, torch.Tensor]:
    """(best seconds, result) of one rule, synchronising the GPU around each call."""
    out: list[torch.Tensor] = []

    def work() -> None:
        out.append(rule(stack, weights, f))
        if stack.is_cuda:
            torch.cuda.synchronize()

    return _best(work, repeats), out[-1]


def _times(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def aggregation_rows(quick: bool, cap: float) -> list[str]:
    """Part 2: ours on the GPU, ours on the CPU, Flower's; and Flower's selections on a stack it finishes."""
    n, d = (20, 10**5) if quick else (100, 10**7)
    f, repeats = (n - 3) // 4, 3 if quick else 2
    stack = torch.randn(n, d, generator=torch.Generator().manual_seed(11))
    stack[:f] *= 30.0  # f outliers for the robust rules to leave out
    weights = torch.ones(n, dtype=torch.float64)
    gpu_stack, gpu_weights = (stack.cuda(), weights.cuda()) if CUDA else (None, None)
    results = [([row], 1) for row in stack.numpy()]
    rows = [
        f"n = {n}, d = {d:.0e}, f = {f}, float32; Flower stopped after {cap:.0f} s",
        f"{'rule':<14}{'gpu s':>10}{'cpu s':>10}{'flower s':>10}{'flower/gpu':>12}{'cpu/gpu':>9}  same (gpu vs cpu)",
    ]
    for name in FLOWER:
        rule = AGGREGATORS[name]
        t_cpu, on_cpu = _timed(rule, stack, weights, f, repeats)
        t_gpu, same = None, "no CUDA"
        if CUDA:
            try:
                _timed(rule, gpu_stack, gpu_weights, f, 1)  # warm-up: CUDA kernels and workspaces
                t_gpu, on_gpu = _timed(rule, gpu_stack, gpu_weights, f, repeats)
            except (RuntimeError, TypeError) as err:  # a rule that cannot run on the GPU yet: say so, go on
                same = f"fails on the GPU: {str(err).splitlines()[0][:60]}"
            else:
                on_gpu = on_gpu.cpu()
                if name == "krum":
                    same = "same row" if torch.equal(on_gpu, on_cpu) else "DIFFERENT ROW"
                else:
                    diff = float((on_gpu - on_cpu).abs().max() / on_cpu.abs().max().clamp_min(1e-30))
                    same = f"max rel diff {diff:.1e}"
        t_ref = flower(name, results, f, 1, cap)
        fastest = t_gpu if t_gpu is not None else t_cpu
        ratio = f">{_times(cap / fastest)}" if t_ref is None else _times(t_ref / fastest)
        rows.append(
            progress(
                f"{name:<14}{'-' if t_gpu is None else f'{t_gpu:.4f}':>10}{t_cpu:>10.4f}"
                f"{'>' + str(int(cap)) if t_ref is None else f'{t_ref:.3f}':>10}{ratio:>12}"
                f"{'-' if t_gpu is None else _times(t_cpu / t_gpu):>9}  {same}"
            )
        )
    rows.append("(flower/gpu: over ours on the CPU where there is no GPU)")
    rows.append(flower_selections(n, f))
    return rows


def flower_selections(n: int, f: int, d: int = 2 * 10**4) -> str:
    """Whether Flower's Krum, Multi-Krum and Bulyan give what ours give (GPU where there is one) on an n x d stack
    small enough for Flower's Bulyan (it recomputes every pairwise distance at each of its n - 2f Krum picks)."""
    stack = torch.randn(n, d, generator=torch.Generator().manual_seed(12))
    stack[:f] *= 30.0
    results = [([row], 1) for row in stack.numpy()]
    ours_on = stack.cuda() if CUDA else stack
    weights = torch.ones(n, dtype=torch.float64, device=ours_on.device)
    verdicts = []
    for name in ("krum", "multikrum", "bulyan"):
        try:
            ours = AGGREGATORS[name](ours_on, weights, f).cpu()
        except (RuntimeError, TypeError) as err:
            verdicts.append(f"{name}: ours fails on {ours_on.device.type} ({str(err).splitlines()[0][:50]})")
            continue
        theirs = torch.from_numpy(FLOWER[name](results, f)[0])
        diff = float((ours - theirs).abs().max() / theirs.abs().max())
        verdicts.append(f"{name}: {'same selection' if diff < 1e-5 else 'DIFFERENT'} (max rel diff {diff:.1e})")
    return f"Flower vs ours ({ours_on.device.type}) at n = {n}, d = {d:.0e}: " + "; ".join(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes (runs on a CPU-only machine)")
    parser.add_argument("--cap", type=float, default=20.0, help="seconds after which a Flower function is stopped")
    parser.add_argument("--skip-ditto", action="store_true", help="only the aggregation part")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(0) if CUDA else "no CUDA device (CPU columns only)"
    print(f"accelerator: {name}; torch {torch.__version__}", flush=True)
    table = (
        []
        if args.skip_ditto
        else [
            "Ditto, simulation vs plain loop on the same accelerator",
            f"{'':<34}{'seconds':>9}{'ratio':>9}{'GPU mean/peak':>14}",
            *ditto_rows(args.quick),
            "",
        ]
    )
    table += ["Robust aggregation", *aggregation_rows(args.quick, args.cap)]
    print("\n" + "\n".join(table), flush=True)


if __name__ == "__main__":
    main()
