"""Overhead against the limit: our Flower simulation against a plain single-process PyTorch loop doing the same SGD.

    python -m benchmarks.overhead                      # digits, cnn_small, 100 devices, 10 per round, 50 rounds
    python -m benchmarks.overhead num_rounds=10        # any Hydra override of the experiment
    python -m benchmarks.overhead --stock              # also on Flower's engine as it ships, in the same run

The reference loop keeps every model in memory and performs exactly the simulation's SGD steps: the same sampled
devices (strategies/sampling.py), mini-batches and label poisoning (app/training/steps.py's round_generator streams),
the same Ditto round (app/training/steps.py's local_round), the same aggregator and the same evaluations, with no
Flower, no Ray, no messages and no stored state. It prints both times, their ratio and both runs' final metrics (which
agree). The simulation's time is split into start-up and shutdown (Ray, Flower, the actors, until every device has
connected and been identified by the strategy, plus everything after the last round) and the rounds. The reference
runs first, on one torch thread (its tensors are tiny: more threads only add synchronisation); then the simulation,
with one Ray actor per core, one torch thread each. Both compute on `accelerator` (app/training/compute.py: the GPU
where there is one), the reference with every device's data placed there once, as the simulation's clients do;
benchmarks/gpu.py reuses `timed_plain` and `timed_simulation` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from app.config.compose import compose_config
from app.data.federation import load_federation
from app.records.metrics import accuracy_summary
from app.rng import Stream, round_generator, seed_global_rng
from app.threats.attacks import aggregator_f, attack_rng, attack_update, attackers, corrupts_labels, run_poisoned_labels
from app.training.compute import resolve_accelerator
from app.training.lam import sampling_sizes
from app.training.models import dataset_model, get_weights, objective, set_weights
from app.training.steps import evaluate, local_round
from strategies.robust import flatten, unflatten
from strategies.rules.registry import build_aggregator
from strategies.sampling import evaluates, sample_devices

WORKLOAD = [
    "dataset.model=cnn_small",
    "dataset.partitioner=pathological",
    "num_clients=100",
    "clients_per_round=10",
    "num_rounds=50",
    "eval_every=25",
    "method=ditto",
]
SUPPORTED = "method=ditto with a fixed lam, an attack that acts on the device (not alie/ipm)"


def plain_ditto(cfg: DictConfig) -> dict:
    """The experiment `cfg` as one PyTorch loop: {global, personal} summaries of the last evaluation."""
    if cfg.method.name != "ditto" or cfg.method.lam == "auto" or cfg.attack.name in ("alie", "ipm"):
        raise SystemExit(f"the reference loop covers {SUPPORTED}")
    fed = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    malicious = attackers(cfg)
    loss_fn, lam, f = objective(cfg.dataset), float(cfg.method.lam), aggregator_f(cfg)
    aggregate = build_aggregator(cfg.aggregator)
    accelerator = resolve_accelerator(str(cfg.accelerator))

    def build() -> torch.nn.Module:
        return dataset_model(cfg.dataset, fed.input_shape, fed.num_classes, cfg.seed).to(accelerator)

    labels = [
        (
            run_poisoned_labels(d.y_train, fed.num_classes, cfg.seed, k)
            if k in malicious and corrupts_labels(cfg.attack)
            else d.y_train
        ).to(accelerator)
        for k, d in enumerate(fed.devices)
    ]
    inputs = [d.x_train.to(accelerator) for d in fed.devices]
    tests = [(d.x_test.to(accelerator), d.y_test.to(accelerator)) for d in fed.devices]
    weights = get_weights(build())
    work, personal = build(), {}
    summary: dict = {}
    sizes = sampling_sizes(cfg)  # as the server samples (sampling=size: each device's training count)
    for r in range(1, cfg.num_rounds + 1):
        updates, counts = [], []
        for k in sample_devices(cfg.seed, r, cfg.num_clients, cfg.clients_per_round, sizes):
            seed_global_rng(cfg.seed, k, r)
            set_weights(work, weights)
            local_round(
                work,
                personal.setdefault(k, build()),
                inputs[k],
                labels[k],
                steps=cfg.local_steps,
                batch_size=cfg.batch_size,
                lr=float(cfg.lr),
                lam=lam,
                loss_fn=loss_fn,
                generator=round_generator(cfg.seed, k, r, Stream.BATCHES),
            )
            update = [w - w0 for w, w0 in zip(get_weights(work), weights)]
            if k in malicious:
                update = attack_update(cfg.attack, update, attack_rng(cfg.seed, k, r), cfg.clients_per_round)
            updates.append(flatten(update))
            counts.append(len(labels[k]))
        delta = aggregate(
            torch.from_numpy(np.stack(updates)).to(accelerator),
            torch.tensor(counts, dtype=torch.float64, device=accelerator),
            f,
        )
        weights = unflatten(flatten(weights) + delta.cpu().numpy(), weights)
        if evaluates(r, cfg.eval_every, cfg.num_rounds):
            set_weights(work, weights)
            initial = build()
            rows = []
            for k, (x, y) in enumerate(tests):
                seed_global_rng(cfg.seed, k, r, Stream.EVALUATION)  # as the client: dropout at evaluation, if any
                rows.append(
                    (evaluate(work, x, y, loss_fn)[0], evaluate(personal.get(k, initial), x, y, loss_fn)[0], len(y))
                )
            correct_g, correct_p, n_test = (np.array(c) for c in zip(*rows))
            flags = np.array([k in malicious for k in range(cfg.num_clients)])
            summary = {
                "global": accuracy_summary(correct_g, n_test, flags),
                "personal": accuracy_summary(correct_p, n_test, flags),
            }
    return summary


def timed_plain(cfg: DictConfig) -> tuple[float, dict]:
    """(seconds, final summaries) of `plain_ditto`, on one torch thread, with the data already loaded."""
    load_federation(cfg.dataset, cfg.num_clients, cfg.seed)  # both runs start with the data in memory
    torch.set_num_threads(1)
    start = time.perf_counter()
    plain = plain_ditto(cfg)
    return time.perf_counter() - start, plain


def timed_simulation(cfg: DictConfig, tuned: bool = True) -> dict:
    """The simulation of `cfg` (on the engine tuned by app/runners/engine.py, or as Flower ships it), timed: `whole`,
    `startup` (start-up and shutdown: Ray, Flower, the actors, until every device is identified, and everything after
    the last round), `rounds` (all rounds), `first` (round 1, the actors' first fit), seconds; `final`, its final
    metrics."""
    from app.runners.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        final = simulate(cfg, Path(tmp), tuned=tuned)
        whole = time.perf_counter() - start
        results = json.loads((Path(tmp) / "results.json").read_text())
    loop, connected = results["rounds"][-1]["seconds"], results["connected_after_seconds"]
    return {
        "whole": whole,
        "startup": whole - loop + connected,
        "rounds": loop - connected,
        "first": results["rounds"][0]["seconds"] - connected,
        "final": final,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stock",
        action="store_true",
        help="also run the simulation on Flower's engine as it ships (without app/runners/engine.py)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the workload")
    args = parser.parse_args(argv)
    cfg = compose_config([*WORKLOAD, *args.overrides])
    print(f"workload: {' '.join([*WORKLOAD, *args.overrides])} ({cfg.local_steps} steps, batch {cfg.batch_size})")
    t_plain, plain = timed_plain(cfg)
    runs = {"simulation, tuned engine": timed_simulation(cfg)}
    if args.stock:
        runs["simulation, Flower's engine"] = timed_simulation(cfg, tuned=False)
    print(f"{'plain PyTorch loop':<36}{t_plain:8.1f} s")
    for name, t in runs.items():
        print(f"{name + ', whole':<36}{t['whole']:8.1f} s")
        print(f"{'  start-up and shutdown':<36}{t['startup']:8.1f} s   (Ray, Flower, actors, every device identified)")
        print(f"{f'  the {cfg.num_rounds} rounds':<36}{t['rounds']:8.1f} s   (of which round 1: {t['first']:.1f} s)")
        print(f"{'  ratio, rounds / plain':<36}{t['rounds'] / t_plain:8.2f}   (target <= 1.5)")
        print(f"{'  ratio, rounds 2.. / plain':<36}{(t['rounds'] - t['first']) / t_plain:8.2f}   (the steady state)")
        print(f"{'  ratio, whole / plain':<36}{t['whole'] / t_plain:8.2f}")
    if args.stock:
        tuned, stock = runs.values()
        print(f"{'ratio, rounds: Flower engine / tuned':<36}{stock['rounds'] / tuned['rounds']:8.2f}")
    for kind in ("global", "personal"):
        a = plain[kind]
        print(
            f"{kind:<9} benign acc / std: plain {a['benign_acc']:.4f} / {a['benign_std_acc']:.4f}"
            + "".join(
                f"   {name} {t['final'][kind]['benign_acc']:.4f} / {t['final'][kind]['benign_std_acc']:.4f}"
                for name, t in runs.items()
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
