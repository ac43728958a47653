"""Aggregator speed and memory: ours against Flower's functions (1.42) on the same inputs, in one process.

    python -m benchmarks.aggregators            # n in {10, 50, 100} x d in {1e5, 1e6}
    python -m benchmarks.aggregators --quick    # n in {10, 50} x d = 1e5
    python -m benchmarks.aggregators --threads 1 --cap 10   # steadier ratios on a busy machine, Flower stopped at 10 s

For each rule and size it prints the time of ours and of Flower's matching function (best of the repeats), their
ratio, ours over the bare float32 Gram product `x @ x.T` of the same stack timed just before (ours/Gram: the
targets are Krum and Multi-Krum within 1.5x and Bulyan within 3x wherever the product takes 10 ms or more), and
ours' peak extra resident memory as a multiple of the stack's size (VmHWM after resetting it through
/proc/self/clear_refs, minus the resident size before the call). Flower's functions run in a forked child so that
one slower than --cap seconds can be stopped; the ratio is then a lower bound (">"). With --threads 1 every figure
is the CPU time of the process (time.process_time: all its threads, the column-block rules' small pool included),
which a shared machine does not inflate by descheduling; otherwise wall time. f = (n - 3) // 4, the largest
Bulyan allows. After the plain stack, Krum, Multi-Krum and Bulyan run again on the same stack with its first n // 10
rows scaled by 1e8 ("huge" rows: the regime robust rules exist for, where centring on the column mean spoils the
Gram route), with ours/Gram only.

The last rows of each size time bare float32 Gram products of the stack, with no bound, centring or selection, and
give Flower's Krum time over each: `x @ x.T f32` (torch's GEMM, n^2 d multiply-adds, as many as Flower's loop does
one pair at a time), the two ways to the symmetric half that torch and scipy offer, three GEMMs over half-row blocks
(3/4 of the multiply-adds) and OpenBLAS's ssyrk through scipy (1/2), and ours, `kernels.gram_f32` (the symmetric
half in 4 x 4 register tiles, float64 after every 32 products: the bounded product Krum starts from; "-" where the
compiled kernels are not available).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg
from scipy.linalg.blas import ssyrk

from strategies.rules import kernels
from strategies.rules.registry import AGGREGATORS

FLOWER: dict[str, Callable[[list, int], object]] = {
    "median": lambda results, f: aggregate_median(results),
    "trimmed_mean": lambda results, f: aggregate_trimmed_avg(results, 0.1),
    "krum": lambda results, f: aggregate_krum(results, f, 0),
    "multikrum": lambda results, f: aggregate_krum(results, f, len(results) - f),
    "bulyan": lambda results, f: aggregate_bulyan(list(results), f, aggregate_krum, to_keep=0),
}
OPTIONS = {"trimmed_mean": {"beta": 0.1}}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


CLOCK: Callable[[], float] = time.perf_counter  # time.process_time with --threads 1 (main)


def ours(name: str, stack: torch.Tensor, weights: torch.Tensor, f: int, repeats: int) -> tuple[float, float]:
    """(best seconds, peak extra memory / stack bytes) of our rule."""
    rule = AGGREGATORS[name]
    best, extra = float("inf"), 0.0
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size
        before = _status_kib("VmRSS")
        start = CLOCK()
        rule(stack, weights, f, **OPTIONS.get(name, {}))
        best = min(best, CLOCK() - start)
        extra = max(extra, (_status_kib("VmHWM") - before) * 1024 / (stack.numel() * stack.element_size()))
    return best, extra


def _half_block_gram(x: torch.Tensor) -> torch.Tensor:
    """x @ x.T from the three distinct products of its two half-row blocks (the fourth is the transpose of one)."""
    h = x.shape[0] // 2
    top, bottom = x[:h], x[h:]
    cross = top @ bottom.T
    return torch.cat([torch.cat([top @ top.T, cross], 1), torch.cat([cross.T, bottom @ bottom.T], 1)])


def _best(work: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        work()
        best = min(best, CLOCK() - start)
    return best


def _flower_child(name: str, results: list, f: int, repeats: int, conn) -> None:
    conn.send(_best(lambda: FLOWER[name](results, f), repeats))


def flower(name: str, results: list, f: int, repeats: int, cap: float) -> float | None:
    """Best seconds of Flower's function, or None when it ran past `cap` seconds (then stopped)."""
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_flower_child, args=(name, results, f, repeats, child))
    proc.start()
    if parent.poll(cap * repeats):
        seconds = parent.recv()
        proc.join()
        return seconds
    proc.kill()
    proc.join()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n in {10, 50}, d = 1e5 only")
    parser.add_argument("--cap", type=float, default=120.0, help="seconds after which a Flower function is stopped")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 keeps the ratios steady on an oversubscribed "
        "machine, where every parallel region of ours (many) and of the Gram product (one) waits "
        "for a descheduled thread",
    )
    args = parser.parse_args()
    global CLOCK
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if torch.get_num_threads() == 1:
        CLOCK = time.process_time
    widths, counts = ([10**5], [10, 50]) if args.quick else ([10**5, 10**6], [10, 50, 100])
    sizes = [(n, d) for d in widths for n in counts]
    clock = "CPU seconds (process_time)" if CLOCK is time.process_time else "wall seconds"
    print(f"torch threads: {torch.get_num_threads()}; Flower's functions are numpy (mostly one thread); {clock}")
    print(
        f"{'rule':<14}{'n':>5}{'d':>9}{'ours s':>10}{'flower s':>11}{'speed-up':>10}{'ours/Gram':>11}"
        f"{'peak mem/stack':>16}"
    )
    for n, d in sizes:
        f = (n - 3) // 4
        stack = torch.randn(n, d, generator=torch.Generator().manual_seed(n * 7 + d))
        weights = torch.ones(n, dtype=torch.float64)
        results = [([row], 1) for row in stack.numpy()]
        repeats = 3 if n * d <= 5 * 10**6 else 1  # Flower's functions and the reference products
        ours_repeats = 3
        t_plain_gram = _best(lambda: stack @ stack.T, max(repeats, 3))
        flower_seconds: dict[str, float | None] = {}
        for name in AGGREGATORS:
            t_ours, mem = ours(name, stack, weights, f, ours_repeats)
            t_ref = flower_seconds[name] = flower(name, results, f, repeats, args.cap) if name in FLOWER else None
            if name not in FLOWER:
                ref, ratio = "-", "-"
            elif t_ref is None:
                ref, ratio = f">{args.cap:.0f}", f">{args.cap / t_ours:.0f}x"
            else:
                ref, ratio = f"{t_ref:.3f}", f"{t_ref / t_ours:.1f}x"
            print(
                f"{name:<14}{n:>5}{d:>9.0e}{t_ours:>10.4f}{ref:>11}{ratio:>10}{t_ours / t_plain_gram:>10.2f}x"
                f"{mem:>15.2f}x",
                flush=True,
            )
        huge = stack.clone()
        huge[: max(1, n // 10)] *= 1e8
        t_huge_gram = _best(lambda h=huge: h @ h.T, max(repeats, 3))
        for name in ("krum", "multikrum", "bulyan"):
            t_ours, mem = ours(name, huge, weights, f, ours_repeats)
            print(
                f"{name + ' huge':<14}{n:>5}{d:>9.0e}{t_ours:>10.4f}{'-':>11}{'-':>10}{t_ours / t_huge_gram:>10.2f}x"
                f"{mem:>15.2f}x",
                flush=True,
            )
        del huge
        krum_ref = flower_seconds["krum"]
        transposed = stack.numpy().T  # d x n, Fortran-ordered: ssyrk's A^T A is the n x n Gram matrix, with no copy
        grams = {
            "x @ x.T f32": lambda: stack @ stack.T,
            "half blocks": lambda: _half_block_gram(stack),
            "ssyrk f32": lambda: ssyrk(1.0, transposed, trans=1),
        }
        if kernels.library() is not None:
            grams["ours gram_f32"] = lambda: kernels.gram_f32(stack.numpy(), None, torch.get_num_threads())
        for label, gram in grams.items():
            t_gram = _best(gram, repeats)
            ceiling = "-" if krum_ref is None else f"{krum_ref / t_gram:.1f}x"
            print(
                f"{label:<14}{n:>5}{d:>9.0e}{t_gram:>10.4f}{'':>11}{ceiling:>10}  (Flower's Krum over a bare Gram)",
                flush=True,
            )


if __name__ == "__main__":
    main()
