"""Ditto in the paper's simplified setting, in closed form and simulated: `python -m app.theory [--quick]`.

Point estimation (dataset `gaussian_mean`), per coordinate: K devices, device k's mean theta_k = theta + delta_k,
delta_k ~ N(0, tau^2); the first K_a devices are attackers whose means are also shifted by tau_a (a colluding data
shift: the attack strength); every device has n samples x ~ N(theta_k, sigma^2), s^2 = sigma^2 / n. Each device's
loss is F_k(v) = 1/2 mean ||v - x||^2, minimised at its sample mean xbar_k.

Solutions. The global model (FedAvg, mean over all devices) is w* = mean_k xbar_k. Ditto's personal model
minimises F_k(v) + lam/2 ||v - w*||^2: v_k = (xbar_k + lam w*) / (1 + lam), a shrinkage of the device's own estimate
towards the global one with weight b = lam / (1 + lam).

Test error of a benign device (expected squared distance to theta_k per coordinate), with c = (K - 1) / K:
    MSE(b) = (1 - c b)^2 s^2 + b^2 B,   B = c^2 tau^2 + (K - 1)(tau^2 + s^2) / K^2 + (K_a tau_a / K)^2
(the last term is the bias the attackers put into w*). Setting dMSE/db = 0:
    lam* = c s^2 / (c tau^2 + (K_a tau_a / K)^2)          [no attack: lam* = sigma^2 / (n tau^2)]
The expected test loss is 1/2 d (MSE + sigma^2), and the variance of a benign device's test loss across devices is
1/2 d MSE^2 (a sum of d squared Gaussians): both are minimised at the same lam*. Local training is lam = 0
(MSE = s^2), the global model is b = 1 (MSE = (1 - c)^2 s^2 + B); Ditto at lam* beats both since MSE is a strict
parabola in b with its minimum inside (0, 1) whenever s^2 > 0 and tau^2 > 0.

Trends: lam* ~ 1/n -> 0 as n grows; lam* decreases in tau_a (-> 0) and in K_a; with no attack lam* decreases in
tau. As K_a grows with K_b = K - K_a benign devices fixed, lam* decreases to c s^2 / (tau^2 + tau_a^2): towards 0
only as the shift tau_a is strong (a zero-mean attack, by contrast, would average out of w*).

The simulation runs Ditto through the same client code as every experiment (`DittoClient.fit` / `evaluate`, the
registry's mean aggregator), in process, with full participation and full-batch steps (lr = 1 / (1 + lam)) so each
run converges to the closed-form solution; its lam* is the grid value with the lowest mean benign test loss over
the seeds.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict

from app.client_app import DittoClient
from app.config import compose_config
from app.models import get_weights
from app.persistence import MemoryStore
from strategies.aggregators import build_aggregator
from strategies.robust import flatten, unflatten


@dataclass(frozen=True)
class Setting:
    n: int = 10  # samples per device
    K: int = 30  # devices
    K_a: int = 0  # attackers
    tau: float = 0.5  # unrelatedness of device tasks
    tau_a: float = 2.0  # attack strength (shift per coordinate)
    sigma: float = 1.0  # sample noise
    d: int = 5  # dimension


def mse(lam: float, s: Setting) -> float:
    """Expected squared error per coordinate of a benign device's personal model at lam (inf: the global model)."""
    c, s2 = (s.K - 1) / s.K, s.sigma**2 / s.n
    b = 1.0 if math.isinf(lam) else lam / (1.0 + lam)
    B = c * c * s.tau**2 + (s.K - 1) * (s.tau**2 + s2) / s.K**2 + (s.K_a * s.tau_a / s.K) ** 2
    return (1 - c * b) ** 2 * s2 + b * b * B


def lam_star(s: Setting) -> float:
    """The lam minimising the expected test loss (and the variance of the test loss) of benign devices."""
    c, s2 = (s.K - 1) / s.K, s.sigma**2 / s.n
    return c * s2 / (c * s.tau**2 + (s.K_a * s.tau_a / s.K) ** 2)


def expected_loss(lam: float, s: Setting) -> float:
    """Expected test loss 1/2 E||v - x||^2 of a benign device."""
    return 0.5 * s.d * (mse(lam, s) + s.sigma**2)


def loss_variance(lam: float, s: Setting) -> float:
    """Variance of a benign device's test loss across devices."""
    return 0.5 * s.d * mse(lam, s) ** 2


def config(s: Setting, lam: float, seed: int, rounds: int = 10, steps: int = 10):  # -> DictConfig
    """The gaussian_mean run of setting `s` at lam (full participation, full-batch steps, lr = 1 / (1 + lam))."""
    return compose_config([
        "dataset=gaussian_mean", "attack=none", "method=ditto", f"method.lam={lam}", f"seed={seed}",
        f"num_clients={s.K}", f"clients_per_round={s.K}", f"num_rounds={rounds}", f"local_steps={steps}",
        f"batch_size={s.n}", f"lr={1.0 / (1.0 + lam)}", f"dataset.samples={s.n}", f"dataset.dim={s.d}",
        f"dataset.tau={s.tau}", f"dataset.tau_a={s.tau_a}", f"dataset.sigma={s.sigma}",
        f"dataset.num_attackers={s.K_a}",
    ])


@lru_cache(maxsize=None)
def simulate(s: Setting, lam: float, seed: int, rounds: int = 10, steps: int = 10) -> dict[str, float]:
    """Ditto on setting `s` through DittoClient: mean benign test loss of the personal and the global models, and
    the variance of the personal test loss over benign devices."""
    cfg = config(s, lam, seed, rounds, steps)
    clients = [DittoClient(cfg, k, MemoryStore(RecordDict())) for k in range(s.K)]
    aggregate = build_aggregator(cfg.aggregator)
    weights = torch.ones(s.K, dtype=torch.float64)
    w = get_weights(clients[0]._build())
    for r in range(1, rounds + 1):
        updates = np.stack([flatten(c.fit(w, {"server_round": r})[0]) for c in clients])
        w = unflatten(flatten(w) + aggregate(torch.from_numpy(updates), weights, 0).numpy(), w)
    rows = [c.evaluate(w, {"server_round": rounds})[2] for c in clients[s.K_a :]]
    personal = np.array([r["loss_personal"] for r in rows])
    return {"personal": float(personal.mean()), "global": float(np.mean([r["loss_global"] for r in rows])),
            "personal_var": float(personal.var())}


def lam_grid(center: float, points: int = 9, span: float = 4.0) -> np.ndarray:
    """Log-spaced lam values from center / span to center * span (ratio span^(2 / (points - 1)) apart)."""
    return np.geomspace(center / span, center * span, points)


def simulated_lam_star(s: Setting, grid: np.ndarray, seeds: tuple[int, ...]) -> tuple[float, dict[float, float]]:
    """The grid lam with the lowest mean benign test loss (averaged over `seeds`), and the loss curve."""
    curve = {float(lam): float(np.mean([simulate(s, float(lam), seed)["personal"] for seed in seeds]))
             for lam in grid}
    return min(curve, key=curve.get), curve


SWEEPS: dict[str, tuple[str, list]] = {
    "n": ("n", [5, 10, 20, 50]),
    "K_a": ("K_a", [0, 6, 12, 24]),
    "tau_a": ("tau_a", [0.5, 2.0, 8.0]),
    "tau": ("tau", [0.25, 0.5, 1.0, 2.0]),
}
BASE = {"n": Setting(K_a=6), "K_a": Setting(), "tau_a": Setting(K_a=6), "tau": Setting(K_a=0)}


def run(out_dir: Path, seeds: tuple[int, ...], points: int) -> list[dict]:
    """Every sweep: closed-form and simulated lam*, and the test loss of Ditto at lam*, local and global."""
    rows = []
    for sweep, (key, values) in SWEEPS.items():
        for value in values:
            s = replace(BASE[sweep], **{key: value})
            star = lam_star(s)
            grid = lam_grid(star, points)
            sim_star, _ = simulated_lam_star(s, grid, seeds)
            at_star = [simulate(s, float(grid[len(grid) // 2]), seed) for seed in seeds]  # the centre is lam*
            local = [simulate(s, 0.0, seed)["personal"] for seed in seeds]
            rows.append({
                "sweep": sweep, **asdict(s), "lam_star": star, "lam_star_sim": sim_star,
                "ratio": sim_star / star, "loss_ditto": expected_loss(star, s), "loss_local": expected_loss(0.0, s),
                "loss_global": expected_loss(math.inf, s),
                "loss_ditto_sim": float(np.mean([r["personal"] for r in at_star])),
                "loss_local_sim": float(np.mean(local)),
                "loss_global_sim": float(np.mean([r["global"] for r in at_star])),
            })
            print(f"{sweep}={value}: lam* {star:.3f} (closed form) vs {sim_star:.3f} (simulated); test loss "
                  f"Ditto {rows[-1]['loss_ditto_sim']:.4f} local {rows[-1]['loss_local_sim']:.4f} global "
                  f"{rows[-1]['loss_global_sim']:.4f}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "theory.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, out_dir / "theory.png")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SWEEPS), figsize=(4 * len(SWEEPS), 7), squeeze=False)
    for j, (sweep, (key, _)) in enumerate(SWEEPS.items()):
        mine = [r for r in rows if r["sweep"] == sweep]
        x = [r[key] for r in mine]
        ax = axes[0][j]
        ax.plot(x, [r["lam_star"] for r in mine], "o-", label="closed form")
        ax.plot(x, [r["lam_star_sim"] for r in mine], "s--", label="simulated (grid)")
        ax.set_xlabel(key)
        ax.set_ylabel("lambda*")
        ax.set_yscale("log")
        ax.legend()
        ax = axes[1][j]
        for kind, style in (("ditto", "o-"), ("local", "^-"), ("global", "v-")):
            ax.plot(x, [r[f"loss_{kind}_sim"] for r in mine], style, label=f"{kind} (simulated)")
        ax.set_xlabel(key)
        ax.set_ylabel("benign test loss")
        ax.legend()
    fig.suptitle("Ditto on point estimation: lambda* and test loss (closed form vs simulation)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/theory"))
    parser.add_argument("--seeds", type=int, default=2, help="realisations averaged per point")
    parser.add_argument("--points", type=int, default=9, help="lam grid points (log-spaced, x/4 .. x4 of lam*)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)
    run(args.out, tuple(range(args.seeds)), args.points)
    print(f"wrote {args.out / 'theory.csv'} and {args.out / 'theory.png'} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
