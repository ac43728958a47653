"""The paper's claim, setting by setting: does it hold on our seeds, and how sure are we (claims.csv, claims.md).

`RULES` says what is tested and how an outcome is named; `claims.md` adds each dataset's budget (rounds, sampled
devices, local steps), its jobs (finished, failed and why) and the compute time of its runs.
"""

from __future__ import annotations

import re

import pandas as pd

from app.analysis import figures
from app.analysis.summary import TUNED, _groups

ACC, STD = "benign_acc", "benign_std_acc"
OUTCOMES = ("holds", "partly", "n.s.", "reverses")
RULES = """The claim (Li et al., ICML 2021, Sec. 5): under attack, Ditto's personal models are more accurate and fairer
(a lower std of accuracy across benign devices) for the benign devices than the models of the robust and fair
baselines; on clean data they are at least as accurate and fair. The paper compares with the best of several
baselines and tunes λ. So, per setting and Ditto model (λ = auto, and the best fixed λ of the grid, tuned on test
as the paper does), accuracy is tested against the setting's most accurate baseline and the std against its
fairest one, each by the paired difference Ditto − baseline over seeds (same seed: same federation, attackers and
sampling) and its 95 % t-interval. Only baselines paired with Ditto on the setting's most seeds are candidates: the
mean of an arm whose sweep is unfinished is over other seeds (its comparisons are still in table.md). Outcome:

- holds: both differences favour Ditto and both intervals exclude 0;
- partly: one does, the other interval contains 0;
- n.s.: both intervals contain 0 (with one seed there is no interval and nothing is significant);
- reverses: an interval excludes 0 against Ditto (less accurate, or less fair, than the best baseline)."""
CLEAN = "none"
BUDGET_KEYS = {
    "num_rounds": "rounds",
    "clients_per_round": "devices per round",
    "num_clients": "devices",
    "local_steps": "local steps",
    "batch_size": "batch",
}


def _is_claim_model(label: str) -> bool:
    """The Ditto models the claim is tested on: λ = auto and the tuned fixed λ (not the fixed-λ grid points)."""
    return label.startswith(TUNED) or ("λ=auto" in label and ":global" not in label)


def outcome(acc_verdict: str, std_verdict: str) -> str:
    """One setting's outcome from the verdicts (better / worse / n.s.) of the accuracy and std differences."""
    verdicts = (acc_verdict, std_verdict)
    if "worse" in verdicts:
        return "reverses"
    better = verdicts.count("better")
    return "holds" if better == 2 else "partly" if better == 1 else "n.s."


def claims(summary: pd.DataFrame, pairs: pd.DataFrame, setting: list[str]) -> pd.DataFrame:
    """Per setting and claim model (λ auto, tuned λ): the most accurate and the fairest baseline, the paired
    differences against each with their intervals and verdicts, and the outcome."""
    if pairs.empty:
        return pd.DataFrame()
    rows = []
    means = summary.set_index([*setting, "label"]) if setting else summary.set_index("label")
    for key, group in _groups(pairs, setting):
        seeds = group.groupby("baseline")["n_seeds"].max()
        baselines = seeds.index[seeds == seeds.max()]  # an unfinished arm's mean is over other seeds: not comparable
        stats = means.loc[[(*key, b) if setting else b for b in baselines]].set_axis(baselines)
        if stats[ACC].isna().all() or stats[STD].isna().all():
            continue  # no baseline has a mean: nothing to compare with
        accurate, fairest = stats[ACC].idxmax(), stats[STD].idxmin()  # NaN means skipped
        for ditto in (d for d in group["ditto"].unique() if _is_claim_model(d)):
            mine = group[group["ditto"] == ditto].set_index("baseline")
            a, s = mine.loc[accurate], mine.loc[fairest]
            rows.append(
                {
                    **dict(zip(setting, key)),
                    "ditto": ditto,
                    "n_seeds": int(min(a["n_seeds"], s["n_seeds"])),
                    "acc_baseline": accurate,
                    "d_acc": a[f"d_{ACC}"],
                    "d_acc_lo": a[f"d_{ACC}_lo"],
                    "d_acc_hi": a[f"d_{ACC}_hi"],
                    "acc_verdict": a[f"d_{ACC}_verdict"],
                    "std_baseline": fairest,
                    "d_std": s[f"d_{STD}"],
                    "d_std_lo": s[f"d_{STD}_lo"],
                    "d_std_hi": s[f"d_{STD}_hi"],
                    "std_verdict": s[f"d_{STD}_verdict"],
                    "outcome": outcome(a[f"d_{ACC}_verdict"], s[f"d_{STD}_verdict"]),
                }
            )
    return pd.DataFrame(rows)


def _interval(mean: float, lo: float, hi: float) -> str:
    if pd.isna(mean):
        return "n/a (no common seed)"
    return f"{mean:+.3f}" + ("" if pd.isna(lo) else f" [{lo:+.3f}, {hi:+.3f}]")


def _reason(error: str) -> str:
    """An error without its exception class and its suggested fix: what jobs that failed alike share."""
    text = re.sub(r"^\w+(Error|Exception): ", "", error)
    return text[: text.index(")") + 1] if ")" in text else text[:120]


def budget(runs: pd.DataFrame) -> str:
    """One dataset's budget, jobs and compute time, from its rows of runs.csv."""
    per_run = runs.drop_duplicates("run")
    parts = []
    for key, name in BUDGET_KEYS.items():
        values = sorted(per_run[key].dropna().unique().tolist()) if key in per_run else []
        if values:
            parts.append(f"{name} {'/'.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}")
    seed = per_run["seed"] if "seed" in per_run else pd.Series(dtype=float)
    seeds = sorted(pd.to_numeric(seed, errors="coerce").dropna().astype(int).unique().tolist())
    status = per_run["status"].value_counts() if "status" in per_run else pd.Series(dtype=int)
    ok = per_run[per_run["status"] == "ok"] if "status" in per_run else per_run
    hours = pd.to_numeric(ok["seconds"], errors="coerce").sum() / 3600 if "seconds" in ok else 0.0
    text = (
        f"Budget: {', '.join(parts)}; seeds {', '.join(map(str, seeds))}. Jobs: {status.get('ok', 0)} finished, "
        f"{status.get('failed', 0)} failed, {status.get('incomplete', 0)} incomplete; "
        f"{hours:.1f} h of run time (server start to the last round, summed over finished jobs)."
    )
    failed = per_run[per_run["status"] != "ok"] if "status" in per_run else per_run.iloc[:0]
    if not failed.empty:
        errors = failed["error"] if "error" in failed else pd.Series("", index=failed.index)
        reasons = errors.fillna("").map(_reason).value_counts()
        text += " Not finished: " + "; ".join(
            f"{n} × {reason or 'no reason recorded'}" for reason, n in reasons.items()
        )
        text += " (every one is listed in runs.csv)."
    return text


def _attacked(rows: pd.DataFrame, runs: pd.DataFrame) -> pd.Series:
    """Per claim row, whether its setting is under attack; where every run has the same attack, attack.name is not
    a setting column and the runs say it."""
    if "attack.name" in rows:
        return rows["attack.name"] != CLEAN
    names = runs["attack.name"].dropna().unique() if "attack.name" in runs else []
    return pd.Series(not (len(names) == 1 and names[0] == CLEAN), index=rows.index)


def markdown(claim_rows: pd.DataFrame, runs: pd.DataFrame, setting: list[str]) -> str:
    """claims.md: per dataset of the runs its budget, a count of outcomes and the table of settings."""
    text = ["# The paper's claim, setting by setting\n", RULES, ""]
    # the setting columns that vary within a dataset (as table.md): a dataset's own budget keys are in its budget line
    columns = [c for c in figures.panel_columns(claim_rows, setting) if c != "dataset.name"]
    attacked = _attacked(claim_rows, runs) if not claim_rows.empty else pd.Series(dtype=bool)
    by_dataset = "dataset.name" in runs and "dataset.name" in claim_rows
    datasets = runs["dataset.name"].dropna().unique() if "dataset.name" in runs else [None]
    for dataset in datasets:
        mine = runs if dataset is None else runs[runs["dataset.name"] == dataset]
        text += [f"## {dataset or 'all runs'}\n", budget(mine), ""]
        rows = claim_rows[claim_rows["dataset.name"] == dataset] if by_dataset else claim_rows
        if rows.empty:
            text += ["(no Ditto run at λ = auto or with a λ grid that has a baseline in the same setting)", ""]
            continue
        for model, kind in ((lambda d: "λ=auto" in d, "λ = auto"), (lambda d: d.startswith(TUNED), "tuned λ")):
            picked = rows[rows["ditto"].map(model) & attacked[rows.index]]
            if len(picked):
                counts = picked["outcome"].value_counts()
                text.append(
                    f"- Ditto {kind}, {len(picked)} attacked setting{'s' * (len(picked) != 1)}: "
                    + ", ".join(f"{counts.get(o, 0)} {o}" for o in OUTCOMES)
                    + "."
                )
        text.append("")
        header = [
            *columns,
            "Ditto",
            "seeds",
            "most accurate baseline",
            "Δ benign acc [95 % CI]",
            "fairest baseline",
            "Δ std [95 % CI]",
            "outcome",
            "the paper",
        ]
        text += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for index, r in rows.iterrows():
            paper = "more accurate and fairer" if attacked[index] else "as accurate and fair (clean data)"
            cells = [
                *(str(r[c]) for c in columns),
                r["ditto"],
                str(r["n_seeds"]),
                r["acc_baseline"],
                _interval(r["d_acc"], r["d_acc_lo"], r["d_acc_hi"]),
                r["std_baseline"],
                _interval(r["d_std"], r["d_std_lo"], r["d_std_hi"]),
                r["outcome"],
                paper,
            ]
            text.append("| " + " | ".join(cells) + " |")
        text.append("")
    return "\n".join(text) + "\n"
