"""Collector: `ditto-report SWEEP_DIR [SWEEP_DIR ...] [--out DIR]` turns every run of one or more sweeps
into tidy tables, statistics over seeds and the paper's pictures; `ditto-report --csv DIR [--out DIR]`
regenerates everything but the CSVs of runs from a folder of collected CSVs (runs.csv, devices.csv), such as
docs/results/.

Writes into DIR (default: the first SWEEP_DIR/report, or the --csv folder):
- runs.csv: one row per run and model kind (global / personal; a λ-list run gives one personal row per λ), every
  config key as a column (dotted names), the final metrics, and `status` (ok / failed / incomplete) with `error`:
  runs that failed or stopped early are listed, never dropped;
- devices.csv: one row per run, model kind and device (per-device accuracy, malicious flag);
- summary.csv: per setting and model, over seeds, the mean and 95 % t-interval of benign accuracy, std across
  benign devices and worst-10 % accuracy (app/analysis/summary.py, app/analysis/stats.py);
- paired.csv: per setting, Ditto model and baseline, the paired difference Ditto − baseline per seed, its mean,
  t-interval, whether it excludes 0 and which way;
- table.md: both tables in Markdown;
- claims.csv, claims.md: the paper's claim setting by setting (app/analysis/claims.py): Ditto (λ auto, tuned λ) against
the
  most accurate and the fairest baseline, significant or not, or reversed; each dataset's budget and compute time;
- scatter.png (benign accuracy vs std with intervals: fair methods are not robust, robust ones are not fair, Ditto
  is both), lambda.png (accuracy and std vs λ with bands), corruption.png (accuracy and std vs corruption level per
  attack, with bands), per_device.png (per-device accuracy distributions, global vs personal).
The figures come from app/analysis/figures.py, so notebooks/analysis.ipynb draws the same ones from the same CSV files.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from app.analysis import claims, figures
from app.analysis.summary import GLOBAL_METHODS, paired, per_seed, summarize
from app.analysis.summary import METRICS as CI_METRICS
from app.config.keys import current_names, dotted
from app.errors import UserError
from app.records.kinds import LAM_TAG
from app.records.metrics import SUMMARY_KEYS

FACETS = ["attack.name", "attack.fraction"]
GROUPS = ("dataset", "attack", "aggregator", "method")
STATISTICS = "summary.csv, paired.csv, table.md, claims.csv, claims.md"  # what regenerate writes besides figures
FIGURES = ("scatter.png", "lambda.png", "corruption.png", "per_device.png")


def run_dirs(sweep_dir: Path) -> Iterator[Path]:
    """Every job folder under `sweep_dir`: one with results.json, failed.json or Hydra's .hydra/ record."""
    seen = set()
    for marker in ("results.json", "failed.json", ".hydra/overrides.yaml"):
        for path in sweep_dir.rglob(marker):
            job = path.parent.parent if marker.startswith(".hydra") else path.parent
            if job not in seen and "report" not in job.relative_to(sweep_dir).parts:
                seen.add(job)
                yield job


def _job_config(job: Path) -> dict[str, Any]:
    """The config of a job that left no results.json: Hydra's composed .hydra/config.yaml (so a model chosen by an
    experiment arm is named too), else its overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = job / ".hydra" / "config.yaml"
    if path.exists():
        try:
            return dotted(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
        except OmegaConfBaseException:  # an interpolation that only resolves inside the job: the overrides say enough
            pass
    return _overrides(job)


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
        if method == "ditto" or (method.startswith("finetune") and lam is not None):  # fine-tuning's prox weight
            return f"{method} λ={lam} ({aggregator})"
        return f"{method} ({aggregator})"
    method = row.get("method.name", "?")
    if method in GLOBAL_METHODS:
        return f"{method} ({aggregator})"
    if method == "ditto" and row.get("method.lam") == "auto":  # trained on 90 % of the data: a global model of its own
        method = "ditto λ=auto"
    return f"{method}:global ({aggregator})"  # the global model trained alongside a personalization method


def run_seconds(rounds: list[dict[str, Any]]) -> float | None:
    """A run's time from its rounds' `seconds` (since the server's start): the last one of each sitting summed, a
    sitting ending where the clock starts again (a run resumed from its checkpoint keeps the earlier rounds)."""
    times = [r["seconds"] for r in rounds if r.get("seconds") is not None]
    if not times:
        return None
    return sum(t for t, after in zip(times, [*times[1:], -math.inf]) if after < t)


def collect(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, devices) of every job under `sweep_dir`, including failed and incomplete ones."""
    runs, devices = [], []
    for job in sorted(run_dirs(sweep_dir)):
        name = str(job.relative_to(sweep_dir)) or "."
        results, failed = job / "results.json", job / "failed.json"
        if results.exists():
            r = json.loads(results.read_text())
            config = dotted(current_names(r["config"]))
            done = len(r.get("rounds", []))
            status = "ok" if done >= int(config.get("num_rounds", done)) else "incomplete"
            error = "" if status == "ok" else f"{done} of {config.get('num_rounds')} rounds"
            for entry, final in r["final"].items():
                if final is None:
                    continue
                kind, _, lam = entry.partition(LAM_TAG)  # personal@lam=X: the personal models of lam X
                row = {
                    "run": name,
                    "status": status,
                    "error": error,
                    "kind": kind,
                    **config,
                    **({"method.lam": float(lam)} if lam else {}),
                    "rounds_done": done,
                    "seconds": run_seconds(r.get("rounds", [])),
                    **{m: final.get(m) for m in SUMMARY_KEYS},
                }
                row["label"] = label(row)
                runs.append(row)
                devices += [
                    {
                        "run": name,
                        "kind": kind,
                        "label": row["label"],
                        **{k: config.get(k) for k in FACETS},
                        "client_id": c["client_id"],
                        "malicious": c["malicious"],
                        "acc": c.get(f"acc_{entry}"),
                    }
                    for c in r.get("clients", [])
                ]
        else:
            if failed.exists():
                status, error = "failed", json.loads(failed.read_text()).get("error", "")
            else:
                status, error = "incomplete", "no results.json (still running, or the job was killed)"
            runs.append(
                {"run": name, "status": status, "error": error, "kind": None, "label": None, **_job_config(job)}
            )
    return pd.DataFrame(runs), pd.DataFrame(devices)


def collect_all(sweep_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`collect` over several sweeps; with more than one, each run's name starts with its sweep folder's name."""
    parts = [collect(d) for d in sweep_dirs]
    if len(sweep_dirs) > 1:
        for d, (runs, devices) in zip(sweep_dirs, parts):
            for df in (runs, devices):
                if not df.empty:
                    df["run"] = d.name + "/" + df["run"]
    return (pd.concat([p[0] for p in parts], ignore_index=True), pd.concat([p[1] for p in parts], ignore_index=True))


def _cell(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if pd.isna(mean):
        return ""
    return f.format(mean) + ("" if pd.isna(lo) else f" [{f.format(lo)}, {f.format(hi)}]")


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def interval_table(summary: pd.DataFrame, setting: list[str]) -> str:
    """Markdown: per setting and model, the mean over seeds [95 % t-interval] of each metric."""
    columns = figures.panel_columns(summary, setting)
    header = [*columns, "model", "seeds", *(f"{figures.LABELS[m]} [95 % CI]" for m in CI_METRICS)]
    rows = [
        [
            *(str(r[c]) for c in columns),
            r["label"],
            str(r["n_seeds"]),
            *(_cell(r[m], r[f"{m}_lo"], r[f"{m}_hi"]) for m in CI_METRICS),
        ]
        for _, r in summary.iterrows()
    ]
    return _markdown(header, rows)


def paired_table(pairs: pd.DataFrame, setting: list[str], summary: pd.DataFrame) -> str:
    """Markdown: per setting, Ditto model and baseline, the mean paired difference [95 % t-interval] of each metric
    and whether the interval excludes 0 (then: which way for Ditto)."""
    columns = figures.panel_columns(summary, setting)
    header = [*columns, "Ditto", "baseline", "seeds"]
    for m in CI_METRICS:
        header += [f"Δ {figures.LABELS[m]} [95 % CI]", "excludes 0"]
    rows = []
    for _, r in pairs.iterrows():
        row = [*(str(r[c]) for c in columns), r["ditto"], r["baseline"], str(r["n_seeds"])]
        for m in CI_METRICS:
            verdict = r[f"d_{m}_verdict"]
            row += [
                _cell(r[f"d_{m}"], r[f"d_{m}_lo"], r[f"d_{m}_hi"], signed=True),
                "no" if verdict == "n.s." else f"yes ({verdict})",
            ]
        rows.append(row)
    return _markdown(header, rows)


def statistics(runs: pd.DataFrame) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """(setting columns, summary, paired) of the completed runs (app/analysis/summary.py)."""
    if not (runs["status"] == "ok").any():
        return [], pd.DataFrame(columns=["label", *CI_METRICS]), pd.DataFrame()
    table, setting = per_seed(runs)
    return setting, summarize(table, setting), paired(table, setting)


def markdown(setting: list[str], summary: pd.DataFrame, pairs: pd.DataFrame, runs: pd.DataFrame | None = None) -> str:
    """table.md: per dataset (with `runs`: its budget, jobs and run time first) the interval table and the
    paired-difference table."""
    if summary.empty:
        return "(no completed runs)\n"
    datasets = summary["dataset.name"].unique() if "dataset.name" in summary else [None]
    text = ""
    for dataset in datasets:
        mine = summary if dataset is None else summary[summary["dataset.name"] == dataset]
        its_pairs = pairs if dataset is None or pairs.empty else pairs[pairs["dataset.name"] == dataset]
        if dataset is not None:
            text += f"# {dataset}\n\n"
        if runs is not None:
            text += claims.budget(runs if dataset is None else runs[runs["dataset.name"] == dataset]) + "\n\n"
        text += "## Mean over seeds [95 % t-interval over seeds]\n\n" + interval_table(mine, setting)
        text += "\n## Paired difference Ditto − baseline, same seeds [95 % t-interval over seeds]\n\n"
        text += paired_table(its_pairs, setting, mine) if not its_pairs.empty else "(no Ditto run with a baseline)\n"
        text += "\n"
    return text


def summary_table(runs: pd.DataFrame) -> str:
    """table.md of `runs`."""
    return markdown(*statistics(runs), runs)


def regenerate(csv_dir: Path, out_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """From collected runs.csv and devices.csv in `csv_dir`: summary.csv, paired.csv, table.md and the figures in
    `out_dir` (default: `csv_dir`); returns (summary, paired)."""
    out_dir = out_dir or csv_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("runs.csv", "devices.csv"):
        if not (csv_dir / name).exists():
            raise UserError(f"no {name} in {csv_dir}: give a folder written by ditto-report SWEEP_DIR")
    runs, devices = pd.read_csv(csv_dir / "runs.csv"), pd.read_csv(csv_dir / "devices.csv")
    setting, summary, pairs = statistics(runs)
    (out_dir / "table.md").write_text(markdown(setting, summary, pairs, runs))
    summary.to_csv(out_dir / "summary.csv", index=False)
    pairs.to_csv(out_dir / "paired.csv", index=False)
    claim_rows = claims.claims(summary, pairs, setting)
    claim_rows.to_csv(out_dir / "claims.csv", index=False)
    (out_dir / "claims.md").write_text(claims.markdown(claim_rows, runs, setting))
    figures.plot_scatter(summary, setting, out_dir / "scatter.png")
    figures.plot_lambda(summary, setting, out_dir / "lambda.png")
    figures.plot_corruption(summary, setting, out_dir / "corruption.png")
    figures.plot_per_device(devices, out_dir / "per_device.png")
    return summary, pairs


def report(sweep_dirs: Path | list[Path], out_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Collect the sweeps into runs.csv and devices.csv in `out_dir` (default: the first sweep's report/), then
    regenerate the statistics and figures from those files; returns (runs, devices)."""
    sweep_dirs = [sweep_dirs] if isinstance(sweep_dirs, Path) else list(sweep_dirs)
    out_dir = out_dir or sweep_dirs[0] / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, devices = collect_all(sweep_dirs)
    if runs.empty:
        raise UserError(
            f"no runs under {', '.join(map(str, sweep_dirs))}: give the folder of a Hydra sweep (multirun/...)"
        )
    runs.to_csv(out_dir / "runs.csv", index=False)
    devices.to_csv(out_dir / "devices.csv", index=False)
    regenerate(out_dir)
    return runs, devices


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description="Collect sweeps into runs.csv, devices.csv, statistics over seeds "
        "and figures; or (--csv) regenerate the statistics and figures from those CSVs."
    )
    parser.add_argument("sweep_dirs", type=Path, nargs="*")
    parser.add_argument("--csv", type=Path, default=None, help="a folder with runs.csv and devices.csv")
    parser.add_argument("--out", type=Path, default=None, help="default: SWEEP_DIR/report, or the --csv folder")
    args = parser.parse_args(argv)
    if (args.csv is None) == (not args.sweep_dirs):
        parser.error("give one or more SWEEP_DIRs, or --csv DIR (not both)")
    if args.csv is not None:
        regenerate(args.csv, args.out)
        print(f"wrote {STATISTICS} and {len(FIGURES)} plots to {args.out or args.csv}")
        return 0
    out = args.out or args.sweep_dirs[0] / "report"
    runs, _ = report(args.sweep_dirs, out)
    jobs = runs.drop_duplicates("run")
    bad = jobs[jobs["status"] != "ok"]
    print(
        f"{len(jobs)} runs: {int((jobs['status'] == 'ok').sum())} complete, "
        f"{int((jobs['status'] == 'failed').sum())} failed, {int((jobs['status'] == 'incomplete').sum())} incomplete"
    )
    for _, row in bad.iterrows():
        print(f"  {row['status']}: {row['run']}: {row['error']}")
    print((out / "table.md").read_text(), end="")
    print(f"wrote runs.csv, devices.csv, {STATISTICS} and {len(FIGURES)} plots to {out}")
    return 0
