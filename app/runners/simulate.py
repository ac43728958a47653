"""Hydra entry point: `ditto-simulate key=value ...` (add -m for a multirun sweep).

Runs the same ServerApp and ClientApp as `flwr run .` on Flower's Ray-backed simulation engine, one SuperNode per
device, and writes the results into Hydra's run directory (`hydra.run.dir=...`). In a sweep (`-m`, e.g.
`+experiment=robustness -m`), each job prints "job i/N" and its progress; a job that fails writes failed.json (the
error and its overrides) and the sweep goes on: `ditto-report SWEEP_DIR` lists it. The engine is tuned for short
rounds and large federations for the length of each run (app/runners/engine.py); `ray_address=HOST:PORT` runs it on
an existing Ray cluster. The console shows one progress line per run (per job in a sweep, after its "job i/N" line),
Flower's warnings and, after a single run, the final table; `verbose=true` adds Flower's INFO lines
(app/records/progress.py). A bad config or bad data ends a single run with one line and exit status 2
(app/runners/refusals.py); in a sweep, a job's refusal is its failed.json, as any other failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from contextlib import nullcontext
from logging import ERROR
from pathlib import Path

import hydra
from flwr.client import ClientApp
from flwr.common.logger import log, update_console_handler
from flwr.simulation import run_simulation
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from app.client_app import make_client_fn
from app.config.compose import composed
from app.config.keys import EXECUTION_KEYS, differing_keys
from app.config.validate import check_data, validate
from app.errors import UserError
from app.paths import CONF_DIR
from app.records.progress import show_flower
from app.records.results import format_table
from app.runners.engine import tuned_engine
from app.runners.refusals import DEBUG_FLAG, REFUSALS, debugging, refuse
from app.runners.runtime import kept_runtime, stopped_on_signals
from app.server_app import make_server_app


def sweep_size(task_overrides: list[str], sweeper_params: dict[str, str]) -> int:
    """How many jobs a Hydra basic sweep runs: the product of the sizes of its sweep overrides (command line and
    `hydra.sweeper.params`, where the command line wins)."""
    merged = {o.split("=", 1)[0]: o for o in (f"{k}={v}" for k, v in sweeper_params.items())}
    merged.update({o.split("=", 1)[0]: o for o in task_overrides})
    parsed = OverridesParser.create().parse_overrides(list(merged.values()))
    return math.prod(len(list(o.sweep_iterator())) if o.is_sweep_override() else 1 for o in parsed)


def simulate(cfg: DictConfig, out_dir: Path, tuned: bool = True) -> dict:
    """Run one experiment on Flower's simulation engine (tuned by app/runners/engine.py unless `tuned` is false, as the
    benchmarks compare); returns its final metrics (results.json's `final`)."""
    validate(cfg)
    check_data(cfg)  # bad data or a model that cannot serve it stop here, before Ray starts (the data stay cached)
    before = show_flower(bool(cfg.verbose))
    try:
        with kept_runtime() if tuned else nullcontext(), tuned_engine() if tuned else nullcontext() as nodes:
            run_simulation(
                server_app=make_server_app(cfg, out_dir, nodes),
                client_app=ClientApp(client_fn=make_client_fn(cfg, out_dir)),
                num_supernodes=cfg.num_clients,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": float(cfg.client_num_gpus)},
                    "init_args": {} if cfg.ray_address is None else {"address": str(cfg.ray_address)},
                    # the actors' process-wide settings: a kept pool serves only runs with the same (runtime.py)
                    "process": {"deterministic": bool(cfg.deterministic), "accelerator": str(cfg.accelerator)},
                },
            )
    finally:
        update_console_handler(level=before)
    results = out_dir / "results.json"
    if not results.exists():  # run_simulation logs a failed ServerApp but does not raise
        raise RuntimeError(f"the simulation ended without writing {results}: see the log above for the error")
    return json.loads(results.read_text())["final"]


def finished(out_dir: Path, cfg: DictConfig) -> dict | None:
    """The final metrics of the run in `out_dir` when it finished with the same config as `cfg` (the keys that
    only say how it was executed aside), else None: what `skip_done` does not run again."""
    results = out_dir / "results.json"
    if not results.exists():
        return None
    record = json.loads(results.read_text())
    current = OmegaConf.to_container(cfg, resolve=True)
    return None if differing_keys(record["config"], current, EXECUTION_KEYS) else record["final"]


def clear_attempt(out_dir: Path) -> None:
    """Remove what an earlier attempt in a reused job folder left that this run would not overwrite before it ends:
    its results.json or failed.json (the report would read them if this run failed or were stopped) and its personal
    models in the default disk location (a device would start from another config's model)."""
    for name in ("results.json", "failed.json", "job.json"):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "personal_state", ignore_errors=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    if hc.mode != RunMode.MULTIRUN:
        try:
            final = simulate(cfg, out_dir)
        except UserError as err:  # bad data found once the run starts: one line, not Hydra's traceback
            sys.exit(refuse(err, debugging(sys.argv)))
        print(f"\n{format_table(final)}\n\nresults: {out_dir}", flush=True)
        return final
    multirun = OmegaConf.load(Path(hc.sweep.dir) / "multirun.yaml")
    total = sweep_size(list(multirun.hydra.overrides.task), dict(multirun.hydra.sweeper.get("params") or {}))
    overrides = list(hc.overrides.task)
    done = finished(out_dir, cfg) if cfg.skip_done else None
    if done is not None:
        print(f"[sweep] job {hc.job.num + 1}/{total}: {' '.join(overrides)}: done already (skip_done)", flush=True)
        return done
    print(f"[sweep] job {hc.job.num + 1}/{total}: {' '.join(overrides)}", flush=True)  # its progress line follows
    if not cfg.resume:
        clear_attempt(out_dir)
    began = time.perf_counter()
    try:
        final = simulate(cfg, out_dir)
    except Exception as err:  # one failed job must not stop the sweep; the collector lists it
        (out_dir / "failed.json").write_text(
            json.dumps(
                {"error": f"{type(err).__name__}: {err}", "overrides": overrides, "traceback": traceback.format_exc()},
                indent=1,
            )
        )
        log(ERROR, "[sweep] job %d/%d failed (%s): %s", hc.job.num + 1, total, " ".join(overrides), err)
        final = None
    job = {"overrides": overrides, "seconds": time.perf_counter() - began, "done": final is not None}
    (out_dir / "job.json").write_text(json.dumps(job))  # the job's time as the sweep ran it (benchmarks/sweep.py)
    return final


def first_job(argv: Sequence[str]) -> tuple[list[str], bool] | None:
    """(the overrides of a command line's first job, whether it is a sweep), or None where the command line has
    flags other than -m/--multirun for Hydra to handle itself (--help, --cfg, --config-name, ...)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None
    overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    return [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else f"{o.get_key_element()}={o.get_value_element_as_str()}"
        for o in overrides
    ], multirun


def command() -> int:
    """`ditto-simulate`: refuse a bad command line before Hydra starts, with one line and exit status 2: a single
    run's config is composed and validated; a sweep's first job is composed (its values are checked per job, each
    refusal a failed.json). `--debug` shows tracebacks (it sets HYDRA_FULL_ERROR=1 for Hydra)."""
    argv = sys.argv[1:]
    debug = debugging(argv)
    if DEBUG_FLAG in argv:
        os.environ["HYDRA_FULL_ERROR"] = "1"
        sys.argv = [sys.argv[0], *(a for a in argv if a != DEBUG_FLAG)]
        argv = sys.argv[1:]
    try:
        job = first_job(argv)
        if job is not None:
            overrides, multirun = job
            composed(overrides) if multirun else validate(composed(overrides))
    except REFUSALS as err:
        return refuse(err, debug)
    with stopped_on_signals(), kept_runtime():  # one Ray runtime and actor pool for every job, stopped at the end
        main()
    return 0
