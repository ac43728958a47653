"""Ditto in the paper's simplified setting, in closed form and simulated: `ditto-theory`.

Point estimation (dataset `gaussian_mean`), per coordinate: K devices; benign device k's mean is theta_k = theta +
delta_k, delta_k ~ N(0, tau^2); every device has n samples x ~ N(theta_k, sigma^2), s^2 = sigma^2 / n. The first
K_a devices are attackers, in one of two models (`Setting.attackers`, `dataset.attackers`):
- `variance` (default, the paper's): their means are drawn with a larger spread, delta_k ~ N(0, tau_a^2). This is
  the official setting: litian96/ditto `point_estimation.ipynb` (commit 26d9b29; cells counted from 0, lines from
  1), cell 2, lines 12-16 (attackers' `w_underlying` ~ N(theta, tau_a), the rest ~ N(theta, tau)) and 19-22 (xbar_k ~
  N(theta_k, sigma^2 / n)).
- `shift` (a variant): a colluding shift, delta_k ~ N(0, tau^2) + tau_a in every coordinate.
Device k's loss is F_k(v) = 1/2 mean ||v - x||^2, minimised at its sample mean xbar_k.

Solutions. The global model (FedAvg, the mean over all devices) is w* = mean_k xbar_k. Ditto's personal model
minimises F_k(v) + lam/2 ||v - w*||^2: v_k = (xbar_k + lam w*) / (1 + lam), a shrinkage of the device's own estimate
towards w* by b = lam / (1 + lam) (the notebook's `Estimator.solve_mtl`, cell 1 line 12).

Derivation. A benign device's error is e_k = v_k - theta_k = (1 - b) eps_k + b (w~ - delta_k), eps_k = xbar_k -
theta_k ~ N(0, s^2), w~ = w* - theta = mean_j (delta_j + eps_j). Per coordinate, with c = (K - 1) / K and the
attackers' excess A = K_a (tau_a^2 - tau^2) / K^2 (variance model; 0 for shift), Var(w~) = (tau^2 + s^2) / K + A:
    V = Var(e_k)       = C + (1 - b)^2 s^2 + b^2 tau^2
    C = Cov(e_k, e_l)  = 2 b (1 - b) s^2 / K + b^2 (Var(w~) - 2 tau^2 / K)      (k != l, both benign)
    mu = E[e_k]        = b K_a tau_a / K under shift, else 0
MSE = V + mu^2 = (1 - c b)^2 s^2 + b^2 (c tau^2 + c s^2 / K + E), E = A (variance) or (K_a tau_a / K)^2 (shift), and
dMSE/db = 0 gives
    lam* = c s^2 / (c tau^2 + E)
which for the variance model is exactly the notebook's `optimal_lambda` = sigma^2/n K / (K tau^2 + K_a (tau_a^2 -
tau^2) / (K - 1)) (cell 2, line 4; multiply both parts by K^2 / (K - 1)), and MSE(lam*) is its `sigma_w_square`
(line 8); the figure cell marks it at 2.1333 and 1.1851 (cell 6, lines 22 and 37), our lam* of its two settings.
The issue's formula is the same. No attack: lam* = sigma^2 / (n tau^2).

Test loss of a benign device on m test points: L_k = 1/2 mean_t ||v_k - x_t||^2, E[L_k] = d (MSE + sigma^2) / 2,
minimised at lam*. Its variance across the K_b = K - K_a benign devices (population variance within one run, the
notebook's `np.var(l_vec[num_mali:])`, cell 2 line 40, averaged over runs) has expectation
    (1 - 1/K_b) d/4 [2 (V^2 - C^2) + 4 mu^2 (V - C) + 4 MSE sigma^2 / m + 2 sigma^4 / m]
(the errors are Gaussian and correlated through w*; the last two terms are the finite test set's noise). V - C =
(1 - b)^2 s^2 + b^2 tau^2 does not see the attackers and is smallest at sigma^2 / (n tau^2), so the variance's
minimiser (`lam_star_variance`) is lam* exactly with no attackers and, with attackers, lies between lam* and
sigma^2 / (n tau^2) (checked on 3,000 random settings). In the default setting it is 1.004 lam*, in the notebook's
adversarial example (cell 3, line 9) 1.17 lam*, and there the variance at lam* is within 1.1 % of its minimum: "test
accuracy and variance are jointly minimised near lam*". It is not universal: when attackers dominate w* (large K_a
tau_a, small tau) lam* is far below sigma^2 / (n tau^2) and the variance's minimiser can be far above lam*.

Trends: lam* ~ 1/n -> 0 as n grows; lam* decreases in tau_a (-> 0) and, for fixed K, in K_a (when tau_a > tau);
with no attack lam* decreases in tau. With K_b = K - K_a benign devices fixed and K_a growing, the shift model's
lam* decreases to s^2 / (tau^2 + tau_a^2) (-> 0 as tau_a grows), while the variance model's zero-mean attackers
average out of w*: A = K_a (tau_a^2 - tau^2) / K^2 peaks at K_a = K_b, and lam* returns to sigma^2 / (n tau^2).

Simulation, two ways. `monte_carlo` is the notebook's experiment vectorised: many realisations of the model, each
personal model in closed form; it gives the minimisers of the mean test loss and of its variance across devices.
`simulate` runs Ditto through the same client code as every experiment (`DeviceClient.fit` / `evaluate`, the
registry's mean aggregator), in process, with full participation and full-batch steps (lr = 1 / (1 + lam)) for as
many rounds as convergence needs (`rounds_needed`); each device's test loss then equals its realisation's
closed-form solution (`deviation`, about 1e-7), so the client code solves the problem analysed here, and averages
over a few seeds are noisy only because a few realisations are.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict

from app.client_app import DeviceClient
from app.config.compose import compose_config
from app.records.persistence import MemoryStore
from app.training.models import get_weights
from strategies.robust import flatten, unflatten
from strategies.rules.registry import build_aggregator

ATTACKERS = ("variance", "shift")


@dataclass(frozen=True)
class Setting:
    n: int = 10  # samples per device
    K: int = 30  # devices
    K_a: int = 0  # attackers
    tau: float = 0.5  # unrelatedness of device tasks
    tau_a: float = 2.0  # attack strength: the attackers' spread (variance) or shift (shift) per coordinate
    sigma: float = 1.0  # sample noise
    d: int = 5  # dimension
    m: int = 1000  # test samples per device
    attackers: str = "variance"  # the attacker model: variance (the paper's) or shift

    def __post_init__(self) -> None:
        if self.attackers not in ATTACKERS:
            raise ValueError(f"Setting.attackers = {self.attackers!r}; allowed: {', '.join(ATTACKERS)}")
        if min(self.n, self.d, self.m) < 1:
            raise ValueError(f"Setting n = {self.n}, d = {self.d}, m = {self.m}: each must be at least 1")
        if not 0 <= self.K_a < self.K:
            raise ValueError(f"Setting.K_a = {self.K_a}: needs 0 <= K_a < K = {self.K} (at least one benign device)")


def _shrink(lam: float) -> float:
    """b = lam / (1 + lam), the weight of w* in v_k (1 for lam = inf: the global model)."""
    return 1.0 if math.isinf(lam) else lam / (1.0 + lam)


def _excess(s: Setting) -> float:
    """E: what the attackers add to a benign device's squared error per unit b^2 (see the module docstring)."""
    if s.attackers == "shift":
        return (s.K_a * s.tau_a / s.K) ** 2
    return s.K_a * (s.tau_a**2 - s.tau**2) / s.K**2


def error_moments(b: float | np.ndarray, s: Setting) -> tuple:
    """(V, C, mu) per coordinate of a benign device's error at shrinkage b: its variance, its covariance with
    another benign device's error, and its mean."""
    s2, K = s.sigma**2 / s.n, s.K
    spread = s.K_a * (s.tau_a**2 - s.tau**2) if s.attackers == "variance" else 0.0
    var_w = (K * (s.tau**2 + s2) + spread) / K**2
    C = 2 * b * (1 - b) * s2 / K + b * b * (var_w - 2 * s.tau**2 / K)
    V = C + (1 - b) ** 2 * s2 + b * b * s.tau**2
    mu = b * s.K_a * s.tau_a / K if s.attackers == "shift" else 0.0
    return V, C, mu


def mse(lam: float, s: Setting) -> float:
    """Expected squared error per coordinate of a benign device's personal model at lam (inf: the global model)."""
    V, _, mu = error_moments(_shrink(lam), s)
    return V + mu * mu


def lam_star(s: Setting) -> float:
    """The lam minimising the expected test loss of benign devices: c s^2 / (c tau^2 + E)."""
    c, s2 = (s.K - 1) / s.K, s.sigma**2 / s.n
    denominator = c * s.tau**2 + _excess(s)
    return math.inf if denominator == 0 else c * s2 / denominator


def expected_loss(lam: float, s: Setting) -> float:
    """Expected test loss 1/2 E||v - x||^2 of a benign device."""
    return 0.5 * s.d * (mse(lam, s) + s.sigma**2)


def _variance_at(b: float | np.ndarray, s: Setting) -> float | np.ndarray:
    V, C, mu = error_moments(b, s)
    noise = 4 * (V + mu * mu) * s.sigma**2 / s.m + 2 * s.sigma**4 / s.m
    return (1 - 1 / (s.K - s.K_a)) * s.d / 4 * (2 * (V * V - C * C) + 4 * mu * mu * (V - C) + noise)


def loss_variance(lam: float, s: Setting) -> float:
    """Expected variance (population, within one run) of the benign devices' test losses across those devices."""
    return float(_variance_at(_shrink(lam), s))


def lam_star_variance(s: Setting, points: int = 200_001) -> float:
    """The lam minimising `loss_variance` (a quartic in b), on a log grid from lam* 1e-6 to lam* 1e6 (ratio 1.00014)."""
    if s.K - s.K_a < 2:
        raise ValueError(f"Setting K = {s.K}, K_a = {s.K_a}: a variance across benign devices needs two of them")
    lam = np.geomspace(lam_star(s) * 1e-6, lam_star(s) * 1e6, points)
    return float(lam[int(np.argmin(_variance_at(lam / (1 + lam), s)))])


def monte_carlo(s: Setting, lams: np.ndarray, reps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The notebook's experiment (cell 2, `Simulator`), vectorised: `reps` realisations of the model drawn directly,
    each personal model in closed form (v_k = (xbar_k + lam w*) / (1 + lam)) and its loss on m test points; at each
    lam, the mean over realisations of the benign test loss (`loss`) and of its variance across benign devices
    (`variance`). The same draws serve every lam."""
    rng = np.random.default_rng([seed, 0x3C])
    spread = np.full((s.K, 1), s.tau)
    if s.attackers == "variance":
        spread[: s.K_a] = s.tau_a
    delta = spread * rng.standard_normal((reps, s.K, s.d))
    if s.attackers == "shift":
        delta[:, : s.K_a] += s.tau_a
    xbar = delta + s.sigma / math.sqrt(s.n) * rng.standard_normal((reps, s.K, s.d))
    w = xbar.mean(axis=1, keepdims=True)
    benign = (reps, s.K - s.K_a)
    # the test points x_t = theta_k + eta_t enter the loss only through their mean and sum of squares
    eta = s.sigma / math.sqrt(s.m) * rng.standard_normal((*benign, s.d))
    spread_sq = rng.chisquare(s.d * (s.m - 1), benign) if s.m > 1 else np.zeros(benign)
    squares = (eta**2).sum(-1) + s.sigma**2 / s.m * spread_sq
    loss, variance = [], []
    for lam in lams:
        b = _shrink(float(lam))
        e = ((1 - b) * xbar + b * w - delta)[:, s.K_a :]
        L = 0.5 * ((e * e).sum(-1) - 2 * (e * eta).sum(-1) + squares)
        loss.append(L.mean())
        variance.append(L.var(axis=1).mean())
    return {"loss": np.array(loss), "variance": np.array(variance)}


def rounds_needed(lam: float, steps: int, tol: float = 1e-6) -> int:
    """Rounds after which the global model is within `tol` (relative) of w* when each round takes `steps` full-batch
    steps with lr = 1 / (1 + lam): each step leaves lam / (1 + lam) of the error (the personal step, of curvature
    1 + lam, is exact in one), and the personal models of the last round use the model of the round before."""
    if lam == 0:
        return 1
    return 1 + max(1, math.ceil(math.log(tol) / (steps * math.log(lam / (1.0 + lam)))))


def config(s: Setting, lam: float, seed: int, rounds: int, steps: int):  # -> DictConfig
    """The gaussian_mean run of setting `s` at lam (full participation, full-batch steps, lr = 1 / (1 + lam))."""
    return compose_config(
        [
            "dataset=gaussian_mean",
            "attack=none",
            "method=ditto",
            f"method.lam={lam}",
            f"seed={seed}",
            f"num_clients={s.K}",
            f"clients_per_round={s.K}",
            f"num_rounds={rounds}",
            f"local_steps={steps}",
            f"batch_size={s.n}",
            f"lr={1.0 / (1.0 + lam)}",
            f"dataset.samples={s.n}",
            f"dataset.dim={s.d}",
            f"dataset.tau={s.tau}",
            f"dataset.tau_a={s.tau_a}",
            f"dataset.sigma={s.sigma}",
            f"dataset.num_attackers={s.K_a}",
            f"dataset.attackers={s.attackers}",
            f"dataset.test_samples={s.m}",
        ]
    )


@lru_cache(maxsize=None)
def simulate(s: Setting, lam: float, seed: int, steps: int = 10) -> dict[str, float]:
    """Ditto on setting `s` through DeviceClient, run until it has converged (`rounds_needed`): the mean benign test
    loss of the personal and the global models, the variance of the personal test loss over benign devices, and the
    largest relative deviation of a benign device's loss from this realisation's closed-form solution."""
    rounds = rounds_needed(lam, steps)
    cfg = config(s, lam, seed, rounds, steps)
    clients = [DeviceClient(cfg, k, MemoryStore(RecordDict())) for k in range(s.K)]
    aggregate = build_aggregator(cfg.aggregator)
    weights = torch.ones(s.K, dtype=torch.float64)
    w = get_weights(clients[0]._build())
    for r in range(1, rounds + 1):
        updates = np.stack([flatten(c.fit(w, {"server_round": r})[0]) for c in clients])
        w = unflatten(flatten(w) + aggregate(torch.from_numpy(updates), weights, 0).numpy(), w)
    rows = [c.evaluate(w, {"server_round": rounds})[2] for c in clients[s.K_a :]]
    personal = np.array([r["loss_personal"] for r in rows])
    xbar = np.stack([c.y_train.double().mean(0).numpy() for c in clients])
    v = (xbar + lam * xbar.mean(0)) / (1 + lam)  # this realisation's personal models in closed form
    exact = np.array(
        [0.5 * ((v[k] - c.y_test.double().numpy()) ** 2).sum(1).mean() for k, c in enumerate(clients)][s.K_a :]
    )
    return {
        "personal": float(personal.mean()),
        "global": float(np.mean([r["loss_global"] for r in rows])),
        "personal_var": float(personal.var()),
        "deviation": float(np.max(np.abs(personal / exact - 1))),
    }


def lam_grid(center: float, points: int = 9, span: float = 4.0) -> np.ndarray:
    """Log-spaced lam values from center / span to center * span (ratio span^(2 / (points - 1)) apart)."""
    return np.geomspace(center / span, center * span, points)


def simulated_curves(s: Setting, grid: np.ndarray, seeds: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Over `grid`, the mean over `seeds` of the benign test loss (`loss`) and of its variance across benign devices
    (`variance`), simulated."""
    runs = [[simulate(s, float(lam), seed) for seed in seeds] for lam in grid]
    return {
        "loss": np.array([np.mean([r["personal"] for r in at]) for at in runs]),
        "variance": np.array([np.mean([r["personal_var"] for r in at]) for at in runs]),
    }


BASE = Setting(K_a=6)
SWEEPS: dict[str, tuple[Setting, str, list]] = {
    "n": (BASE, "n", [5, 10, 20, 50]),
    "K_a": (BASE, "K_a", [0, 6, 12, 24]),
    "tau_a": (BASE, "tau_a", [0.5, 1.0, 2.0, 4.0]),
    "tau": (BASE, "tau", [0.25, 0.5, 1.0, 2.0]),
    "tau_a (shift)": (replace(BASE, attackers="shift"), "tau_a", [0.5, 2.0, 8.0]),
}
CURVES = {"clean": Setting(), "attacked": BASE}  # loss and variance against lam on a wide grid


def grid_argmin(grid: np.ndarray, values: np.ndarray) -> float:
    """The grid value at which `values` is smallest."""
    return float(grid[int(np.argmin(values))])


def run(out_dir: Path, seeds: tuple[int, ...], points: int, reps: int) -> list[dict]:
    """Every sweep: lam* and the variance's minimiser in closed form, by Monte Carlo (`reps` realisations, 33 lam
    from lam*/4 to 4 lam*) and through DeviceClient (`seeds`, `points` lam over the same range); the test loss of
    Ditto at lam*, local and global. Then the loss and variance curves of CURVES (lam*/16 .. 16 lam*)."""
    rows = []
    for sweep, (base, key, values) in SWEEPS.items():
        for value in values:
            s = replace(base, **{key: value})
            star = lam_star(s)
            fine, grid = lam_grid(star, 33), lam_grid(star, points)
            mc, sim = monte_carlo(s, fine, reps), simulated_curves(s, grid, seeds)
            at_star = [simulate(s, float(grid[len(grid) // 2]), seed) for seed in seeds]  # the centre is lam*
            rows.append(
                {
                    "sweep": sweep,
                    **asdict(s),
                    "lam_star": star,
                    "lam_loss_mc": grid_argmin(fine, mc["loss"]),
                    "lam_loss_sim": grid_argmin(grid, sim["loss"]),
                    "lam_var": lam_star_variance(s),
                    "lam_var_mc": grid_argmin(fine, mc["variance"]),
                    "lam_var_sim": grid_argmin(grid, sim["variance"]),
                    "loss_ditto": expected_loss(star, s),
                    "loss_ditto_sim": float(np.mean([r["personal"] for r in at_star])),
                    "loss_local_sim": float(np.mean([simulate(s, 0.0, seed)["personal"] for seed in seeds])),
                    "loss_global_sim": float(np.mean([r["global"] for r in at_star])),
                    "deviation": max(simulate(s, float(lam), seed)["deviation"] for lam in grid for seed in seeds),
                }
            )
            r = rows[-1]
            print(
                f"{sweep}={value}: lam* {star:.3f}, argmin loss MC {r['lam_loss_mc']:.3f} DeviceClient "
                f"{r['lam_loss_sim']:.3f}; argmin variance {r['lam_var']:.3f}, MC {r['lam_var_mc']:.3f}, DeviceClient "
                f"{r['lam_var_sim']:.3f}; test loss Ditto {r['loss_ditto_sim']:.4f} local {r['loss_local_sim']:.4f} "
                f"global {r['loss_global_sim']:.4f}",
                flush=True,
            )
    curves = {}
    for name, s in CURVES.items():
        fine, grid = lam_grid(lam_star(s), 65, span=16.0), lam_grid(lam_star(s), 2 * points - 1, span=16.0)
        curves[name] = (s, fine, monte_carlo(s, fine, reps), grid, simulated_curves(s, grid, seeds), len(seeds))
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "theory.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, curves, out_dir / "theory.png")
    return rows


def _plot(rows: list[dict], curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SWEEPS), figsize=(4 * len(SWEEPS), 7.5), squeeze=False)
    panels = [(name, kind) for name in curves for kind in ("loss", "variance")]
    for ax, (name, kind) in zip(axes[0], panels):
        s, fine, mc, grid, sim, runs = curves[name]
        closed = expected_loss if kind == "loss" else loss_variance
        ax.plot(fine, [closed(float(lam), s) for lam in fine], "-", label="closed form")
        ax.plot(fine, mc[kind], ".", markersize=3, label="Monte Carlo (mean of many realisations)")
        ax.plot(grid, sim[kind], "o", fillstyle="none", label=f"DeviceClient (mean of {runs} realisation(s))")
        ax.axvline(lam_star(s), color="gray", linestyle="--", label="lambda*")
        ax.set_xscale("log")
        ax.set_xlabel("lambda")
        ax.set_ylabel("benign test loss" if kind == "loss" else "its variance across benign devices")
        ax.set_title(f"{name} (K_a={s.K_a}, tau_a={s.tau_a})")
        ax.legend(fontsize=7)
    axes[0][-1].axis("off")
    for ax, (sweep, (_, key, _)) in zip(axes[1], SWEEPS.items()):
        mine = [r for r in rows if r["sweep"] == sweep]
        x = [r[key] for r in mine]
        ax.plot(x, [r["lam_star"] for r in mine], "o-", label="lambda* (closed form)")
        ax.plot(x, [r["lam_loss_mc"] for r in mine], "s--", label="argmin loss (Monte Carlo)")
        ax.plot(x, [r["lam_var"] for r in mine], "x:", label="argmin variance (closed form)")
        ax.plot(x, [r["lam_var_mc"] for r in mine], "^--", label="argmin variance (Monte Carlo)")
        ax.set_xlabel(sweep)
        ax.set_ylabel("lambda")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("Ditto on point estimation: test loss and its variance across devices against lambda")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/theory"))
    parser.add_argument("--seeds", type=int, default=1, help="DeviceClient runs (realisations) averaged per point")
    parser.add_argument("--points", type=int, default=5, help="DeviceClient lam grid (log-spaced, lam*/4 .. 4 lam*)")
    parser.add_argument("--reps", type=int, default=4000, help="Monte Carlo realisations")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)
    run(args.out, tuple(range(args.seeds)), args.points, args.reps)
    print(f"wrote {args.out / 'theory.csv'} and {args.out / 'theory.png'} in {time.perf_counter() - start:.0f} s")
    return 0
