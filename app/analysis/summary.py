"""Settings over seeds: from the collected runs (one row per run and model, app/analysis/report.py's runs.csv) to the
mean and 95 % t-interval of each model's metrics per setting, and the paired difference Ditto − baseline per seed.

A setting (`scenario_columns`) is every config key that varies across the collected runs except the seed, the
method and aggregator keys (what is compared) and the keys that only say how a run was executed; within a setting
each model is a `label` (e.g. "ditto λ=0.1 (median)", "global (krum)"). Runs repeated with the same seed are
averaged first, so each seed counts once. The best fixed λ per setting and aggregator (the highest mean benign
accuracy over seeds, chosen on the test data as the paper does) is added as "ditto λ=best (tuned on test: λ=X)".
"""

from __future__ import annotations

import math

import pandas as pd

from app.analysis.stats import paired_interval, t_interval
from app.config.keys import EXECUTION_KEYS
from app.methods import METHODS

METRICS = ("benign_acc", "benign_std_acc", "benign_worst10_acc")
HIGHER_IS_BETTER = {"benign_acc": True, "benign_std_acc": False, "benign_worst10_acc": True}
NOT_SETTING = {
    "run",
    "status",
    "error",
    "kind",
    "label",
    "rounds_done",
    "seconds",
    "seed",
    "lam_value",
    "benign_mean_acc",
    "benign_var_acc",
    "malicious_acc",
    *METRICS,
    # how a run was executed, not what it computed
    *EXECUTION_KEYS,
}
MODEL_PREFIXES = ("method.", "aggregator.")
TUNED = "ditto λ=best"


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished, with a numeric `seed` and `lam_value` (a Ditto personal model's fixed λ, else NaN)."""
    ok = runs[(runs["status"] == "ok") & runs["kind"].notna()].copy()
    ok["seed"] = pd.to_numeric(ok["seed"]).astype(int)
    is_ditto = (ok["kind"] == "personal") & (ok["method.name"] == "ditto")
    ok["lam_value"] = pd.to_numeric(ok["method.lam"].where(is_ditto), errors="coerce")
    return ok


def scenario_columns(runs: pd.DataFrame) -> list[str]:
    """The config keys that tell settings apart: those that vary across `runs`, dataset and attack first."""
    cols = [
        c
        for c in runs.columns
        if c not in NOT_SETTING and not c.startswith(MODEL_PREFIXES) and runs[c].astype(str).nunique() > 1
    ]
    first = [c for c in ("dataset.name", "attack.name", "attack.fraction") if c in runs.columns]
    return first + [c for c in cols if c not in first]


def per_seed(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per (setting, model label, seed) with the METRICS (repeated seeds averaged), and the setting
    columns."""
    ok = completed(runs)
    setting = scenario_columns(ok)
    keys = [*setting, "label", "seed"]
    carry = {c: "first" for c in ("aggregator.name", "method.name", "kind", "lam_value") if c in ok}
    table = ok.groupby(keys, dropna=False, sort=True).agg({**{m: "mean" for m in METRICS}, **carry}).reset_index()
    return _with_tuned_lam(table, setting), setting


def _with_tuned_lam(table: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """Add, per setting and aggregator with two or more fixed λ, the per-seed rows of the fixed λ with the highest
    mean benign accuracy."""
    fixed = table[table["lam_value"].notna()]
    rows = [table]
    for _, group in fixed.groupby([*setting, "aggregator.name"], dropna=False):
        means = group.groupby("lam_value")["benign_acc"].mean()
        if len(means) < 2:  # one fixed λ: nothing was tuned
            continue
        best = group[group["lam_value"] == means.idxmax()].copy()
        best["label"] = f"{TUNED} (tuned on test: λ={means.idxmax():g}) ({best['aggregator.name'].iloc[0]})"
        best["lam_value"] = math.nan  # not a point of the λ curve
        rows.append(best)
    return pd.concat(rows, ignore_index=True)


def _groups(table: pd.DataFrame, keys: list[str]):  # -> iterator of (key tuple, DataFrame)
    if not keys:
        yield (), table
        return
    for key, group in table.groupby(keys, dropna=False, sort=True):
        yield (key if isinstance(key, tuple) else (key,)), group


def summarize(table: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """Per setting and model: number of seeds and, per metric M, M (the mean), M_lo and M_hi (95 % t-interval)."""
    rows = []
    for key, group in _groups(table, [*setting, "label"]):
        row = dict(zip([*setting, "label"], key))
        first = group.iloc[0]
        row.update({c: first[c] for c in ("aggregator.name", "method.name", "kind", "lam_value") if c in group})
        row["n_seeds"] = group["seed"].nunique()
        for m in METRICS:
            ci = t_interval(group[m].to_numpy())
            row.update({m: ci.mean, f"{m}_lo": ci.lo, f"{m}_hi": ci.hi})
        rows.append(row)
    return pd.DataFrame(rows)


# methods whose only model is the global one (global, qffl, tilted)
GLOBAL_METHODS = tuple(name for name, m in METHODS.items() if not m.keeps_personal and not m.scores_personal)


def roles(group: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(Ditto's personal models, the baselines they are compared with) among the labels of one setting. Baselines:
    the global runs (method=global, qffl, tilted) and the other methods' personal models; of the global models
    trained alongside a personalization method, only a fixed-λ Ditto run's, and only where no plain global run of
    that aggregator exists (it is the same model, bit for bit; finetune's and APFL's are too, local's never trains,
    λ = auto's trains on 90 % of the data)."""
    info = group.groupby("label")[["kind", "method.name", "aggregator.name"]].first()
    personal, method = info["kind"] == "personal", info["method.name"]
    plain = set(info.loc[(method == "global") & ~personal, "aggregator.name"])
    side = ~personal & ~method.isin(GLOBAL_METHODS)
    stand_in = side & (method == "ditto") & ~info.index.str.contains("λ=auto") & ~info["aggregator.name"].isin(plain)
    ditto = personal & (method == "ditto")
    return list(info.index[ditto]), list(info.index[~ditto & (~side | stand_in)])


def paired(table: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """Per setting, Ditto model and baseline: the seeds both have, and per metric M the mean difference d_M =
    Ditto − baseline, its t-interval d_M_lo, d_M_hi, d_M_excludes_0, and d_M_verdict (better / worse / n.s. for
    Ditto, by the metric's direction)."""
    rows = []
    for key, group in _groups(table, setting):
        by_label = {label: g.set_index("seed") for label, g in group.groupby("label")}
        dittos, bases = roles(group)
        for ditto in dittos:
            for base in bases:
                row = {**dict(zip(setting, key)), "ditto": ditto, "baseline": base}
                for m in METRICS:
                    ci = paired_interval(by_label[ditto][m].to_dict(), by_label[base][m].to_dict())
                    row["n_seeds"] = ci.n
                    row.update(
                        {
                            f"d_{m}": ci.mean,
                            f"d_{m}_lo": ci.lo,
                            f"d_{m}_hi": ci.hi,
                            f"d_{m}_excludes_0": ci.excludes_zero,
                            f"d_{m}_verdict": _verdict(ci.lo, ci.hi, m),
                        }
                    )
                rows.append(row)
    return pd.DataFrame(rows)


def _verdict(lo: float, hi: float, metric: str) -> str:
    if not (lo > 0 or hi < 0):
        return "n.s."
    return "better" if (lo > 0) == HIGHER_IS_BETTER[metric] else "worse"
