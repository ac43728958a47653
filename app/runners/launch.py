"""The main job through Flower's own CLI: `ditto-run [--output-dir DIR] [OVERRIDE ...]`.

Runs `flwr run .` on a local simulation sized from the config (one SuperNode per device), judges the run by its
status and its results file (`flwr run --stream` exits 0 even when the run failed), prints the closing table, and
stops the local SuperLink that `flwr run` started, by pid (it would otherwise outlive the run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from app.config.compose import compose_config
from app.config.validate import check_data, check_flwr_run
from app.paths import PROJECT_DIR
from app.records.results import format_table
from app.runners.refusals import REFUSALS

FLOWER_ENV_FILE = PROJECT_DIR / "scripts" / "flower.env"  # Flower's environment, one place (scripts/env.sh reads it)


def _flower_env() -> dict[str, str]:
    lines = (line.split("#", 1)[0].strip() for line in FLOWER_ENV_FILE.read_text().splitlines())
    return dict(line.split("=", 1) for line in lines if line)


FLOWER_ENV = _flower_env()


class RunFailed(RuntimeError):
    """The Flower run did not finish with status finished:completed, or left no results.json."""


def superlink_pids(flwr_home: Path) -> set[int]:
    """Pids of the local SuperLinks that keep their state under `flwr_home`."""
    marker = str(flwr_home / "local-superlink")
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmd and marker in cmd:
            pids.add(int(proc.name))
    return pids


def session_pids(leader: int) -> set[int]:
    """`leader`, every process of its session and all their descendants (the processes a Flower process starts:
    SuperExec, which makes a session of its own, and the app processes under it)."""
    table: dict[int, tuple[int, int]] = {}  # pid -> (parent, session)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(proc.name)] = (int(fields[1]), int(fields[3]))
            except (OSError, IndexError, ValueError):
                continue
    pids = {leader} | {pid for pid, (_, session) in table.items() if session == leader}
    while more := {pid for pid, (parent, _) in table.items() if parent in pids} - pids:
        pids |= more
    return pids


def send(pids: set[int], sig: int) -> None:
    """Send `sig` to every pid of `pids` that is still there."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop(pids: set[int], grace: float = 15.0) -> None:
    """SIGTERM each pid, then SIGKILL whatever is still alive after `grace` seconds."""
    send(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    send(pids, signal.SIGKILL)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower's CLI: the variables of DESIGN.md §3, FLWR_HOME, and this venv's bin on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(flwr_home),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def run_status(run_id: str, env: dict[str, str], connection: str | None = None) -> tuple[str, str]:
    """(status, status-details) of a run, from `flwr list --format json`."""
    where = [] if connection is None else [connection]
    out = subprocess.run(
        ["flwr", "list", *where, "--run-id", run_id, "--format", "json"],
        env=env,
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        run = json.loads(out.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return "unknown", (out.stdout + out.stderr).strip()
    return run["status"], run.get("status-details", "")


def run_flwr(
    overrides: Sequence[str],
    output_dir: Path,
    *,
    flwr_home: Path | None = None,
    timeout: float | None = None,
    echo: bool = True,
    connection: str | None = None,
) -> Path:
    """Run the app with `flwr run .` and return the path of the results.json it wrote; raise RunFailed otherwise.
    Without `connection`, on a local simulation sized from the config; with it, on the SuperLink that the
    connection of that name in `flwr_home`/config.toml points at (a deployment)."""
    cfg = compose_config(overrides)  # a bad key or value stops here, before anything starts
    check_flwr_run(cfg)
    if connection is None:  # a local simulation reads the data here: bad data stops before the SuperLink starts
        check_data(cfg)  # (a deployment's data live on its SuperNodes)
    flwr_home = (flwr_home or PROJECT_DIR / ".flwr").resolve()
    output_dir = output_dir.resolve()
    env = flower_env(flwr_home)
    run_config = f"overrides={json.dumps(' '.join(overrides))} output-dir={json.dumps(str(output_dir))}"
    if connection is None:
        cmd = [
            "flwr",
            "run",
            ".",
            "--stream",
            "-c",
            run_config,
            "--federation-config",
            f"num-supernodes={cfg.num_clients} client-resources-num-cpus=1",
        ]
    else:
        cmd = ["flwr", "run", ".", connection, "--stream", "-c", run_config]
    before = superlink_pids(flwr_home)
    run_id = None
    try:
        with subprocess.Popen(
            cmd, cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            deadline = None if timeout is None else time.monotonic() + timeout
            for line in proc.stdout:
                if echo:
                    print(line, end="", flush=True)
                found = re.search(r"Successfully started run (\d+)", line)
                run_id = found.group(1) if found else run_id
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    raise RunFailed(f"flwr run did not finish within {timeout:.0f} s")
        if run_id is None:
            raise RunFailed(f"flwr run did not start a run (exit code {proc.returncode})")
        status, details = run_status(run_id, env, connection)
        if status != "finished:completed":
            raise RunFailed(f"run {run_id} ended with status {status}: {details}")
    finally:
        stop(superlink_pids(flwr_home) - before)
    results = output_dir / "results.json"
    if not results.exists():
        raise RunFailed(f"run {run_id} completed but wrote no {results}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. attack=none method.lam=0.5")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where results go (default: outputs/flwr/<timestamp>)"
    )
    args = parser.parse_args(argv)
    out = args.output_dir or PROJECT_DIR / "outputs" / "flwr" / time.strftime("%Y-%m-%d_%H-%M-%S")
    if shutil.which("flwr", path=flower_env(PROJECT_DIR)["PATH"]) is None:
        print("error: the flwr command is not installed: run scripts/run.sh, which sets up .venv", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        path = run_flwr(args.overrides, out)
    except REFUSALS:
        raise  # a bad config or bad data: the command prints it, exit status 2 (app/runners/refusals.py)
    except Exception as err:  # a failed run: one clear line, exit status 1
        print(f"error: {err}", file=sys.stderr)
        return 1
    results = json.loads(path.read_text())
    wall = time.perf_counter() - start
    print(f"\n{format_table(results['final'])}\n\nresults: {path.parent}  (wall time {wall:.0f} s)")
    return 0
