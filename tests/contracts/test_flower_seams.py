"""What ResultsServer (app/server_app.py) assumes of Flower's round loop, checked against the installed Flower: after
an upgrade, a failure here names what to re-check instead of the run silently diverging."""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import textwrap
from logging import DEBUG, WARNING
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import FLOWER_LOGGER, ConsoleHandler, log
from flwr.server import Server, SimpleClientManager
from omegaconf import OmegaConf

from app.records.persistence import Checkpoint, save_checkpoint
from app.records.progress import Progress
from app.server_app import ResultsServer
from strategies.rules.registry import Rule

# Flower's Server.fit_round (flwr/server/server.py lines 205-249, 1.41.0-1.42.0), docstring and log calls left out.
FIT_ROUND_SHA256 = "b1f8165a35dce2dc972eae317b42989e3ff03e352cfbde60ce84cabe9c196821"


def _mirrored(function) -> str:  # -> SHA-256 of the function's statements without its docstring and log calls
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))

    class Strip(ast.NodeTransformer):
        def visit_Expr(self, node: ast.Expr):  # noqa: N802 (ast's visitor naming)
            call = node.value
            if isinstance(call, ast.Constant) or (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "log"):
                return None
            return node

    return hashlib.sha256(ast.dump(Strip().visit(tree)).encode()).hexdigest()


def test_flowers_fit_round_is_still_the_one_results_server_copies() -> None:
    assert _mirrored(Server.fit_round) == FIT_ROUND_SHA256, (
        "Flower's Server.fit_round changed: make ResultsServer._fit_round (app/server_app.py) do what it now does "
        "(without its log lines), then set FIT_ROUND_SHA256 to the new value"
    )


class Recording(Server):
    def __init__(self, calls: list) -> None:
        strategy = SimpleNamespace(
            initialize_parameters=lambda client_manager: ndarrays_to_parameters([np.ones(2)]),
            evaluate=lambda server_round, parameters: None,
        )
        super().__init__(client_manager=SimpleClientManager(), strategy=strategy)
        self.calls = calls

    def fit_round(self, server_round: int, timeout: float | None):
        self.calls.append(("fit", server_round, parameters_to_ndarrays(self.parameters)[0].tolist()))

    def evaluate_round(self, server_round: int, timeout: float | None):
        self.calls.append(("evaluate", server_round))


def test_flowers_loop_starts_from_the_strategys_parameters_and_ends_each_round_with_the_federated_evaluation() -> None:
    calls: list = []
    Recording(calls).fit(num_rounds=2, timeout=None)
    assert calls == [("fit", 1, [1.0, 1.0]), ("evaluate", 1), ("fit", 2, [1.0, 1.0]), ("evaluate", 2)], (
        "Flower's Server.fit no longer runs fit_round then evaluate_round per round from the strategy's initial "
        "parameters: re-check where ResultsServer resumes, checkpoints and reports progress"
    )


def test_a_resumed_run_goes_through_flowers_loop_from_the_checkpoints_model_and_round(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"resume": True, "num_rounds": 4, "checkpoint_every": 0, "verbose": False})
    save_checkpoint(
        tmp_path,
        Checkpoint(
            round=2,
            parameters=[np.full(2, 7.0)],
            meta={
                "config": OmegaConf.to_container(cfg),
                "rounds": [{"round": 1}, {"round": 2}],
                "final": {},
                "clients": [],
            },
        ),
    )
    seen: list = []
    strategy = SimpleNamespace(
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
        aggregate=Rule(lambda *args: None),
        rounds=[],
        connected_after=None,
        identification_seconds=0.0,
        evaluate=lambda server_round, parameters: None,
        configure_fit=lambda server_round, parameters, client_manager: (
            seen.append(("fit", server_round, parameters_to_ndarrays(parameters)[0].tolist())) or []
        ),
        configure_evaluate=lambda server_round, parameters, client_manager: (
            seen.append(("evaluate", server_round)) or []
        ),
    )
    strategy.initialize_parameters = lambda client_manager: strategy.initial_parameters
    written: list = []
    recorder = SimpleNamespace(
        out_dir=tmp_path, final={}, clients=[], write=lambda rounds, after, timing: written.append(rounds)
    )
    ResultsServer(strategy, recorder, cfg).fit(num_rounds=4, timeout=None)
    assert seen == [("fit", 3, [7.0, 7.0]), ("evaluate", 3), ("fit", 4, [7.0, 7.0]), ("evaluate", 4)]
    assert written == [[{"round": 1}, {"round": 2}]]


def test_progress_rewrites_one_line_on_a_terminal_and_prints_plain_lines_elsewhere() -> None:
    final = {"global": {"benign_acc": 0.5}, "personal": {"benign_acc": 0.75}, "personal@lam=0.1": None}
    tty = io.StringIO()
    live = Progress(1, 3, in_place=True, stream=tty)
    for done in (1, 2, 3):
        live.update(done, final if done == 3 else {})
    live.close()
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("global 0.500  personal 0.750\x1b[K\n")
    log = io.StringIO()
    plain = Progress(11, 40, in_place=False, stream=log)
    for done in range(11, 41):
        plain.update(done, final)
    plain.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("round 11/40  0:00 elapsed  ETA ") and "\r" not in log.getvalue()
    assert lines[1].startswith("round 40/40") and "ETA 0:00  global 0.500  personal 0.750" in lines[1]


def test_a_flower_message_starts_on_a_clean_line_not_after_the_in_place_progress() -> None:
    tty = io.StringIO()
    console = next(h for h in FLOWER_LOGGER.handlers if isinstance(h, ConsoleHandler))
    live = Progress(1, 3, in_place=True, stream=tty)
    live.update(1, {})
    log(WARNING, "a node was slow")  # Flower's console handler prints it: the progress line is erased first
    assert tty.getvalue().endswith("\x1b[K\r\x1b[K") and not live.open
    live.update(2, {})
    log(DEBUG, "below the console's level")  # not printed: the line stays
    assert live.open and tty.getvalue().count("\r") == 3
    live.close()
    assert live._clear_for_message not in console.filters  # the run's filter is gone with its line
