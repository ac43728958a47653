"""What a run leaves behind: results.json (config, per-round and final metrics, per-device rows), clients.csv and
a PNG of per-device accuracy, and the closing table that the entry points print after a run (format_table)."""

from __future__ import annotations

import json
import os
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.logger import log
from omegaconf import DictConfig, OmegaConf

from app.records.kinds import KINDS, LAM_TAG, model_kinds
from app.records.metrics import accuracy_summary


class RunRecorder:
    """Turns every evaluation round's per-device rows into the summary metrics and writes the run's files."""

    def __init__(self, cfg: DictConfig, malicious: frozenset[int], out_dir: Path) -> None:
        self.cfg = cfg
        self.malicious = malicious
        self.out_dir = Path(out_dir)
        self.clients: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    def evaluate(self, server_round: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Summary metrics per model kind for one evaluation round (the strategy's `evaluate_metrics_fn`)."""
        n_test = np.array([r["n_test"] for r in rows])
        flags = np.array([r["partition_id"] in self.malicious for r in rows], dtype=bool)
        kinds = model_kinds(rows[0]) if rows else list(KINDS)
        summary: dict[str, Any] = {}
        for kind in kinds:
            key = f"correct_{kind}"
            summary[kind] = (
                accuracy_summary(np.array([r[key] for r in rows]), n_test, flags) if rows and key in rows[0] else None
            )
        self.clients = [
            {
                "client_id": int(r["partition_id"]),
                "malicious": bool(flag),
                "n_train": int(r["n_train"]),
                "n_test": int(r["n_test"]),
                **{
                    f"acc_{kind}": (r[f"correct_{kind}"] / r["n_test"] if f"correct_{kind}" in r else None)
                    for kind in kinds
                },
                "lam": r.get("lam"),  # Ditto / local: the device's lam (auto: the grid value it chose most often)
                "personal_round": r.get("personal_round"),  # the round its personal model last trained in
                "personal_updates": r.get("personal_updates"),  # how many rounds it trained, restarts included
            }
            for r, flag in zip(rows, flags)
        ]
        self.final = summary
        log(INFO, "round %d evaluation over %d devices: %s", server_round, len(rows), _one_line(summary))
        return summary

    def write(
        self, rounds: list[dict[str, Any]], connected_after: float | None = None, timing: dict[str, float] | None = None
    ) -> Path:
        """Write results.json, clients.csv and per_device_accuracy.png; return the results.json path.
        `connected_after`: seconds from the server's start until every device had connected and been identified
        (the start-up inside round 1's time); `timing`: the seconds of the run's training rounds, evaluations and
        identification of the devices, as the server measured them (benchmarks/sweep.py)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        results = {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "final": self.final,
            "rounds": [{"round": r["round"], "global": None, "personal": None, **r} for r in rounds],
            "clients": self.clients,
            "malicious_clients": sorted(self.malicious),
            "rejected_updates_total": sum(r.get("rejected_updates", 0) for r in rounds),
            "failed_clients_total": sum(r.get("failed_clients", 0) for r in rounds),
            "rejected_evaluations_total": sum(r.get("rejected_evaluations", 0) for r in rounds),
            "excluded_nodes_total": sum(r.get("excluded_nodes", 0) for r in rounds),
            "connected_after_seconds": connected_after,
            "timing": timing,
        }
        path = self.out_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, path)
        _write_csv(self.clients, self.out_dir / "clients.csv")
        _plot_clients(self.clients, self.out_dir / "per_device_accuracy.png")
        log(INFO, "results written to %s", self.out_dir)
        return path


def _one_line(summary: dict[str, Any]) -> str:
    parts = []
    for kind, m in summary.items():
        if m and m["benign_acc"] is not None:
            parts.append(f"{kind} benign acc {m['benign_acc']:.3f} std {m['benign_std_acc']:.3f}")
    return "; ".join(parts)


def format_table(final: dict[str, Any]) -> str:
    """The closing table: per model kind, benign accuracy (pooled and mean), std, worst 10 %, malicious accuracy."""

    def cell(v: float | None) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    lines = ["model     benign_acc  mean_acc   std    worst10%  malicious_acc"]
    for kind in ("global", *(k for k in final if k.startswith("personal"))):
        name = "global" if kind == "global" else "ditto" + kind.removeprefix("personal").replace(LAM_TAG, " λ=")
        m = final.get(kind)
        if m:
            lines.append(
                f"{name:<9} {cell(m['benign_acc'])}      {cell(m['benign_mean_acc'])}    "
                f"{cell(m['benign_std_acc'])}  {cell(m['benign_worst10_acc'])}    {cell(m['malicious_acc'])}"
            )
    return "\n".join(lines)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)


BARS_UP_TO = 100  # devices; beyond, one bar each would be unreadable (and a figure as wide as the federation)


def _plot_clients(rows: list[dict[str, Any]], path: Path) -> None:
    """Per-device accuracy: one bar per device (malicious ones shaded) for up to BARS_UP_TO devices; beyond, each
    model's benign per-device accuracies sorted (the fairness profile: a flat curve is a fair model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = rows[0] if rows else {}
    kinds = [k.removeprefix("acc_") for k in first if k.startswith("acc_") and first[k] is not None]
    label = {k: "global" if k == "global" else "ditto (" + k.replace(LAM_TAG, ", λ=") + ")" for k in kinds}
    if len(rows) > BARS_UP_TO:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for kind in kinds:
            acc = np.sort([r[f"acc_{kind}"] for r in rows if not r["malicious"] and r["n_test"] > 0])
            ax.plot(np.linspace(0, 1, len(acc)), acc, label=label[kind])
        ax.set_xlabel(f"benign devices, sorted by accuracy (fraction of {sum(not r['malicious'] for r in rows)})")
        _save_accuracy_plot(fig, ax, path)
        return
    ids = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 3.5))
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        acc = [r[f"acc_{kind}"] for r in rows]
        ax.bar(ids + i * width, acc, width, label=label[kind])
    centres = ids + (len(kinds) - 1) * width / 2
    for c, r in zip(centres, rows):
        if r["malicious"]:
            ax.axvspan(c - 0.45, c + 0.45, color="red", alpha=0.08, lw=0)
    ax.set_xticks(centres, [str(r["client_id"]) for r in rows], fontsize=7)
    ax.set_xlabel("device (shaded: malicious)")
    _save_accuracy_plot(fig, ax, path)


def _save_accuracy_plot(fig, ax, path: Path) -> None:  # fig, ax: a matplotlib Figure and its Axes
    import matplotlib.pyplot as plt

    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
