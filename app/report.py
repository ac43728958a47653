"""Collector: `python -m app.report SWEEP_DIR [--out DIR]` turns every run of a sweep into one tidy table and the
paper's pictures.

Writes into DIR (default SWEEP_DIR/report):
- runs.csv: one row per run and model kind (global / personal), every config key as a column (dotted names), the
  final metrics, and `status` (ok / failed / incomplete) with `error`: runs that failed or stopped early are listed,
  never dropped;
- devices.csv: one row per run, model kind and device (per-device accuracy, malicious flag);
- table.md: benign accuracy ± std of accuracy per attack and corruption level, per model, averaged over seeds;
- scatter.png (benign accuracy vs std: fair methods are not robust, robust ones are not fair, Ditto is both),
  lambda.png (accuracy and std vs lambda), corruption.png (accuracy vs corruption level per attack),
  per_device.png (per-device accuracy distributions, global vs personal).
The plotting functions take the DataFrames, so notebooks/analysis.ipynb draws the same figures from the CSV files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

METRICS = ("benign_acc", "benign_mean_acc", "benign_std_acc", "benign_var_acc", "benign_worst10_acc", "malicious_acc")
FACETS = ["attack.name", "attack.fraction"]
GROUPS = ("dataset", "attack", "aggregator", "method")


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_dirs(sweep_dir: Path) -> Iterator[Path]:
    """Every job folder under `sweep_dir`: one with results.json, failed.json or Hydra's .hydra/ record."""
    seen = set()
    for marker in ("results.json", "failed.json", ".hydra/overrides.yaml"):
        for path in sweep_dir.rglob(marker):
            job = path.parent.parent if marker.startswith(".hydra") else path.parent
            if job not in seen and "report" not in job.relative_to(sweep_dir).parts:
                seen.add(job)
                yield job


def _overrides(job: Path) -> dict[str, Any]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    out = {}
    for override in OmegaConf.load(path):
        key, _, value = str(override).lstrip("+").partition("=")
        out[f"{key}.name" if key in GROUPS else key] = value  # a group choice is its option's name
    return out


def label(row: dict[str, Any]) -> str:
    """What a point in the pictures is: the personal models of a method, or a global model, with its aggregator."""
    aggregator = row.get("aggregator.name", "?")
    if row["kind"] == "personal":
        method = row.get("method.name", "?")
        lam = row.get("method.lam")
        return f"{method} λ={lam} ({aggregator})" if method == "ditto" else f"{method} ({aggregator})"
    method = row.get("method.name", "?")
    if method in ("global", "qffl", "tilted"):
        return f"{method} ({aggregator})"
    return f"{method}:global ({aggregator})"  # the global model trained alongside a personalization method


def collect(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, devices) of every job under `sweep_dir`, including failed and incomplete ones."""
    runs, devices = [], []
    for job in sorted(run_dirs(sweep_dir)):
        name = str(job.relative_to(sweep_dir)) or "."
        results, failed = job / "results.json", job / "failed.json"
        if results.exists():
            r = json.loads(results.read_text())
            config = _flat(r["config"])
            done = len(r.get("rounds", []))
            status = "ok" if done >= int(config.get("num_rounds", done)) else "incomplete"
            error = "" if status == "ok" else f"{done} of {config.get('num_rounds')} rounds"
            for kind in ("global", "personal"):
                final = r["final"].get(kind)
                if final is None:
                    continue
                row = {"run": name, "status": status, "error": error, "kind": kind, **config,
                       "rounds_done": done, **{m: final.get(m) for m in METRICS}}
                row["label"] = label(row)
                runs.append(row)
                devices += [{"run": name, "kind": kind, "label": row["label"], **{k: config.get(k) for k in FACETS},
                             "client_id": c["client_id"], "malicious": c["malicious"], "acc": c.get(f"acc_{kind}")}
                            for c in r.get("clients", [])]
        else:
            if failed.exists():
                status, error = "failed", json.loads(failed.read_text()).get("error", "")
            else:
                status, error = "incomplete", "no results.json (still running, or the job was killed)"
            runs.append({"run": name, "status": status, "error": error, "kind": None, "label": None,
                         **_overrides(job)})
    return pd.DataFrame(runs), pd.DataFrame(devices)


def summary_table(runs: pd.DataFrame) -> str:
    """Markdown: benign accuracy ± std per (attack, corruption level) and model, mean over seeds."""
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        return "(no completed runs)\n"
    facets = [f for f in FACETS if f in ok]
    grouped = ok.groupby([*facets, "label"])[["benign_acc", "benign_std_acc"]].mean().reset_index()
    grouped["cell"] = grouped.apply(lambda r: f"{r['benign_acc']:.3f} ± {r['benign_std_acc']:.3f}", axis=1)
    table = grouped.pivot_table(index=facets, columns="label", values="cell", aggfunc="first")
    lines = ["| " + " | ".join([*facets, *table.columns]) + " |", "|" + "---|" * (len(facets) + len(table.columns))]
    for index, row in table.iterrows():
        keys = index if isinstance(index, tuple) else (index,)
        lines.append("| " + " | ".join([*(str(k) for k in keys), *(str(v) if pd.notna(v) else "" for v in row)]) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, axes, path: Path, fontsize: int = 7) -> None:  # axes: iterable of matplotlib Axes
    """Legends where something is drawn, then save and close."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()


def _facets(ok: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    facets = [f for f in FACETS if f in ok]
    return list(ok.groupby(facets)) if facets else [((), ok)]


def plot_scatter(runs: pd.DataFrame, path: Path) -> None:
    """Benign accuracy (robustness) against the std of per-device accuracy (fairness), one point per model."""
    plt = _plt()
    groups = _facets(runs[runs["status"] == "ok"])
    cols = min(4, max(1, len(groups)))
    rows = -(-max(1, len(groups)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (key, df) in zip(axes.flat, groups):
        points = df.groupby("label")[["benign_acc", "benign_std_acc"]].mean()
        # a personalization method's global model is the aggregator's: drawn once where the global run exists
        points = points[[not (":global (" in name and name.split(":", 1)[1] in points.index) for name in points.index]]
        for name, p in points.iterrows():
            marker = "*" if name.startswith("ditto") else "o"
            ax.scatter(p["benign_std_acc"], p["benign_acc"], marker=marker, s=120 if marker == "*" else 40)
            ax.annotate(name, (p["benign_std_acc"], p["benign_acc"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("std of benign per-device accuracy (fairness: lower is better)")
        ax.set_ylabel("benign accuracy (robustness)")
        ax.set_title(" ".join(str(k) for k in key) if key else "all runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lambda(runs: pd.DataFrame, path: Path) -> None:
    """Ditto's personal models: benign accuracy and its std against lambda, one line per attack."""
    plt = _plt()
    df = runs[(runs["status"] == "ok") & (runs["kind"] == "personal") & (runs.get("method.name") == "ditto")].copy()
    df["lam"] = pd.to_numeric(df.get("method.lam"), errors="coerce")
    df = df.dropna(subset=["lam"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, g in _facets(df):
        curve = g.groupby("lam")[["benign_acc", "benign_std_acc"]].mean()
        for ax, metric in zip(axes, ("benign_acc", "benign_std_acc")):
            ax.plot(curve.index, curve[metric], "o-", label=" ".join(str(k) for k in key))
    for ax, metric in zip(axes, ("benign accuracy", "std of benign per-device accuracy")):
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("λ")
        ax.set_ylabel(metric)
    _finish(fig, axes, path)
    plt.close(fig)


def plot_corruption(runs: pd.DataFrame, path: Path) -> None:
    """Benign accuracy against the fraction of malicious devices, one panel per attack, one line per model."""
    plt = _plt()
    ok = runs[runs["status"] == "ok"]
    attacks = sorted(ok["attack.name"].unique()) if "attack.name" in ok else []
    fig, axes = plt.subplots(1, max(1, len(attacks)), figsize=(5 * max(1, len(attacks)), 4), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        df = ok[ok["attack.name"] == attack]
        for name, g in df.groupby("label"):
            curve = g.groupby("attack.fraction")["benign_acc"].mean()
            ax.plot(curve.index, curve.values, "o-", label=name)
        ax.set_title(attack)
        ax.set_xlabel("fraction of malicious devices")
        ax.set_ylabel("benign accuracy")
    _finish(fig, axes[0], path, fontsize=6)
    plt.close(fig)


def plot_per_device(devices: pd.DataFrame, path: Path) -> None:
    """Distribution of benign devices' accuracy per model (global models vs personal models), pooled over runs."""
    plt = _plt()
    benign = devices[~devices["malicious"].astype(bool)] if not devices.empty else devices
    labels = sorted(benign["label"].unique()) if not benign.empty else []
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.5))
    if labels:
        ax.boxplot([benign[benign["label"] == name]["acc"].dropna() for name in labels])
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("benign per-device accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(sweep_dir: Path, out_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Collect `sweep_dir` and write the CSV files, the table and the plots into `out_dir`."""
    out_dir = out_dir or sweep_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, devices = collect(sweep_dir)
    if runs.empty:
        raise SystemExit(f"no runs under {sweep_dir}: give the folder of a Hydra sweep (multirun/...)")
    runs.to_csv(out_dir / "runs.csv", index=False)
    devices.to_csv(out_dir / "devices.csv", index=False)
    (out_dir / "table.md").write_text(summary_table(runs))
    plot_scatter(runs, out_dir / "scatter.png")
    plot_lambda(runs, out_dir / "lambda.png")
    plot_corruption(runs, out_dir / "corruption.png")
    plot_per_device(devices, out_dir / "per_device.png")
    return runs, devices


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Collect a sweep's results into runs.csv, devices.csv and plots.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: SWEEP_DIR/report")
    args = parser.parse_args(argv)
    runs, _ = report(args.sweep_dir, args.out)
    jobs = runs.drop_duplicates("run")
    bad = jobs[jobs["status"] != "ok"]
    print(f"{len(jobs)} runs: {int((jobs['status'] == 'ok').sum())} complete, "
          f"{int((jobs['status'] == 'failed').sum())} failed, {int((jobs['status'] == 'incomplete').sum())} incomplete")
    for _, row in bad.iterrows():
        print(f"  {row['status']}: {row['run']}: {row['error']}")
    print(summary_table(runs), end="")
    print(f"wrote runs.csv, devices.csv, table.md and 4 plots to {args.out or args.sweep_dir / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
