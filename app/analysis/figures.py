"""The report's pictures, drawn from the per-setting summary over seeds (app/analysis/summary.py: mean and 95 %
t-interval of each metric) and the per-device rows, so app/analysis/report.py and notebooks/analysis.ipynb draw the same
figures from the same CSV files. Error bars and bands are the 95 % t-intervals over seeds (none with one seed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from app.analysis.summary import TUNED

LABELS = {
    "benign_acc": "benign accuracy",
    "benign_std_acc": "std of benign per-device accuracy",
    "benign_worst10_acc": "worst-10 % benign accuracy",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, axes, path: Path, fontsize: int = 7) -> None:  # fig: a matplotlib Figure; axes: its Axes
    """Legends where something is drawn, then save and close."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def _err(df: pd.DataFrame, metric: str) -> np.ndarray:
    """Matplotlib's (2, n) error-bar lengths from the interval columns (0 where there is no interval)."""
    return np.nan_to_num(np.vstack([df[metric] - df[f"{metric}_lo"], df[f"{metric}_hi"] - df[metric]]))


def panel_columns(summary: pd.DataFrame, setting: list[str]) -> list[str]:
    """The setting columns worth a title: the dataset and what varies within a dataset (attack, level, ...)."""
    if "dataset.name" not in summary or summary.empty:
        return [c for c in setting if c in summary]
    within = summary.groupby("dataset.name", dropna=False)
    return ["dataset.name", *(c for c in setting if c != "dataset.name" and within[c].nunique(dropna=False).max() > 1)]


def _title(columns: list[str], key: tuple) -> str:
    return " ".join(f"{c.split('.')[0]}={v}" if c != "dataset.name" else str(v) for c, v in zip(columns, key))


def _grid(n: int, cols: int = 4, size: tuple[float, float] = (5, 4.5)):  # -> (Figure, list of Axes)
    plt = _plt()
    cols = min(cols, max(1, n))
    rows = -(-max(1, n) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _distinct(df: pd.DataFrame) -> pd.DataFrame:
    """Without a personalization method's global model where the aggregator's global run exists (the same model)."""
    return df[[not (":global (" in name and name.split(":", 1)[1] in set(df["label"])) for name in df["label"]]]


def plot_scatter(summary: pd.DataFrame, setting: list[str], path: Path) -> None:
    """Benign accuracy (robustness) against the std of per-device accuracy (fairness), one point per model and
    setting, with the 95 % intervals over seeds as error bars on both axes."""
    columns = panel_columns(summary, setting)
    groups = list(summary.groupby(columns, dropna=False)) if columns else [((), summary)]
    fig, axes = _grid(len(groups))
    for ax, (key, df) in zip(axes, groups):
        shown = _distinct(df)
        if shown["label"].str.startswith(TUNED).any():  # the fixed λ are on the λ curve; the best one stays here
            shown = shown[shown["lam_value"].isna()]
        for _, p in shown.iterrows():
            one = shown[shown["label"] == p["label"]]
            marker = "*" if p["label"].startswith("ditto λ=") else "o"
            ax.errorbar(
                one["benign_std_acc"],
                one["benign_acc"],
                xerr=_err(one, "benign_std_acc"),
                yerr=_err(one, "benign_acc"),
                fmt=marker,
                ms=11 if marker == "*" else 6,
                capsize=2,
                lw=0.8,
            )
            ax.annotate(
                p["label"],
                (p["benign_std_acc"], p["benign_acc"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel("std of benign per-device accuracy (fairness: lower is better)")
        ax.set_ylabel("benign accuracy (robustness)")
        ax.set_title(_title(columns, key if isinstance(key, tuple) else (key,)) or "all runs", fontsize=9)
    _save(fig, [], path)


def plot_corruption(summary: pd.DataFrame, setting: list[str], path: Path) -> None:
    """Benign accuracy (top) and its std across devices (bottom) against the fraction of malicious devices, one
    column per dataset and attack, one line per model with its 95 % band over seeds; the clean runs of the same
    dataset (attack=none) are the points at 0."""
    plt = _plt()
    attacked = summary["attack.name"] != "none" if "attack.name" in summary else summary.index < 0
    df, clean = summary[attacked], summary[~attacked].assign(**{"attack.fraction": 0.0})
    keys = [c for c in ("dataset.name", "attack.name") if c in df]
    panels = list(df.groupby(keys, dropna=False)) if keys and not df.empty else []
    fig, axes = plt.subplots(2, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 8), squeeze=False)
    for col, (key, g) in enumerate(panels):
        if "dataset.name" in keys:
            g = pd.concat([clean[clean["dataset.name"] == g["dataset.name"].iloc[0]], g])
        for row, metric in enumerate(("benign_acc", "benign_std_acc")):
            ax = axes[row][col]
            for name, line in _distinct(g).groupby("label"):
                line = line.sort_values("attack.fraction")
                ax.plot(line["attack.fraction"], line[metric], "o-", ms=3, label=name)
                ax.fill_between(line["attack.fraction"], line[f"{metric}_lo"], line[f"{metric}_hi"], alpha=0.15)
            ax.set_title(" ".join(str(k) for k in (key if isinstance(key, tuple) else (key,))), fontsize=9)
            ax.set_xlabel("fraction of malicious devices")
            ax.set_ylabel(LABELS[metric])
    _save(fig, axes[0][:1], path, fontsize=5)


def plot_lambda(summary: pd.DataFrame, setting: list[str], path: Path) -> None:
    """Ditto's personal models against λ (the fixed values), benign accuracy and its std across devices, one line
    per setting and aggregator with its 95 % band over seeds; λ = auto, where run, as a dashed level of the same
    colour."""
    plt = _plt()
    df = summary[summary["lam_value"].notna()] if "lam_value" in summary else summary.iloc[0:0]
    columns = [*panel_columns(summary, setting), "aggregator.name"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, curve in df.groupby(columns, dropna=False) if not df.empty else []:
        curve = curve.sort_values("lam_value")
        key = key if isinstance(key, tuple) else (key,)
        auto = summary[summary["label"] == f"ditto λ=auto ({key[-1]})"]
        for c, v in zip(columns, key):
            auto = auto[auto[c].astype(str) == str(v)]
        name = _title(columns, key)
        for ax, metric in zip(axes, ("benign_acc", "benign_std_acc")):
            (line,) = ax.plot(curve["lam_value"], curve[metric], "o-", ms=3, label=name)
            ax.fill_between(
                curve["lam_value"], curve[f"{metric}_lo"], curve[f"{metric}_hi"], alpha=0.15, color=line.get_color()
            )
            if not auto.empty:
                ax.axhline(auto[metric].iloc[0], ls="--", lw=0.8, color=line.get_color())
    for ax, metric in zip(axes, ("benign_acc", "benign_std_acc")):
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("λ (dashed: λ = auto)")
        ax.set_ylabel(LABELS[metric])
    _save(fig, axes[:1], path, fontsize=5)


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
    _save(fig, [], path)
