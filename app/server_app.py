"""ServerApp: config -> RobustStrategy -> rounds -> results on disk (and, with checkpoint_every, a checkpoint that
`resume=true` continues from)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig, SimpleClientManager
from flwr.server.history import History
from flwr.server.server import fit_clients
from omegaconf import DictConfig, OmegaConf

from app.config.compose import config_from_overrides
from app.config.keys import EXECUTION_KEYS, differing_keys, dotted
from app.config.validate import check_flwr_run
from app.data.federation import load_federation
from app.methods import METHODS
from app.records.persistence import Checkpoint, load_checkpoint, save_checkpoint
from app.records.progress import Progress, show_flower
from app.records.results import RunRecorder
from app.threats.attacks import aggregator_f, attackers, threat_model
from app.training.compute import resolve_accelerator, set_deterministic
from app.training.lam import plan_kinds, sampling_sizes
from app.training.models import dataset_model, get_weights
from strategies.identity import load_device_keys
from strategies.robust import RobustStrategy
from strategies.rules.registry import build_aggregator


class ResultsServer(Server):
    """Flower's round loop (`Server.fit`: fit, then federated evaluation, each round), with this run's additions at
    the seams it offers: `resume` restores the checkpoint of the run's folder, hands its global model to the loop
    as the strategy's initial parameters and skips the rounds it already holds; a checkpoint (every
    `checkpoint_every` rounds and after the last) and the progress line follow each round's federated evaluation,
    the last step of Flower's round; the run's results are written when the loop returns.
    tests/contracts/test_flower_seams.py checks these assumptions about Flower's loop."""

    def __init__(self, strategy: RobustStrategy, recorder: RunRecorder, cfg: DictConfig) -> None:
        super().__init__(client_manager=SimpleClientManager(), strategy=strategy)
        self.recorder = recorder
        self.cfg = cfg
        self.resumed = 0  # the round of the checkpoint this run continues from (0: a fresh run)
        self.num_rounds = int(cfg.num_rounds)
        self.progress: Progress | None = None
        self.seconds = {"fit": 0.0, "evaluate": 0.0}  # Flower's fit and evaluation phases of this run's rounds

    def _checkpoint(self, server_round: int) -> None:
        save_checkpoint(
            self.recorder.out_dir,
            Checkpoint(
                round=server_round,
                parameters=parameters_to_ndarrays(self.parameters),
                meta={
                    "config": OmegaConf.to_container(self.cfg, resolve=True),
                    "rounds": self.strategy.rounds,
                    "final": self.recorder.final,
                    "clients": self.recorder.clients,
                },
                aggregator_state=self.strategy.aggregate.state(),
            ),
        )

    def _resume(self) -> int:
        """Restore the checkpoint of the run's folder (its global model becomes the strategy's initial parameters,
        which Flower's loop starts from); returns its round."""
        ckpt = load_checkpoint(self.recorder.out_dir)
        check_resumable(ckpt.meta["config"], OmegaConf.to_container(self.cfg, resolve=True))
        self.strategy.initial_parameters = ndarrays_to_parameters(ckpt.parameters)
        self.strategy.rounds = ckpt.meta["rounds"]
        self.recorder.final, self.recorder.clients = ckpt.meta["final"], ckpt.meta["clients"]
        self.strategy.aggregate.load_state(ckpt.aggregator_state)
        log(INFO, "resumed from the checkpoint of round %d in %s", ckpt.round, self.recorder.out_dir)
        return ckpt.round

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        self.resumed = self._resume() if self.cfg.resume else 0
        self.num_rounds = num_rounds
        self.progress = Progress(self.resumed + 1, num_rounds, in_place=sys.stdout.isatty() and not self.cfg.verbose)
        try:
            history, elapsed = super().fit(num_rounds, timeout)
        finally:
            self.progress.close()
        identification = self.strategy.identification_seconds
        timing = {
            "training_seconds": self.seconds["fit"] - identification,
            "evaluation_seconds": self.seconds["evaluate"],
            "identification_seconds": identification,
        }
        self.recorder.write(self.strategy.rounds, self.strategy.connected_after, timing)
        return history, elapsed

    def fit_round(self, server_round: int, timeout: float | None):  # -> (parameters, metrics, (results, failures))
        """The round's fit phase, timed; a round the resumed checkpoint holds is skipped."""
        if server_round <= self.resumed:
            return None
        began = time.perf_counter()
        try:
            return self._fit_round(server_round, timeout)
        finally:
            self.seconds["fit"] += time.perf_counter() - began

    def _fit_round(self, server_round: int, timeout: float | None):  # -> (parameters, metrics, (results, failures))
        """Flower's `Server.fit_round` (flwr/server/server.py lines 205-249, 1.41.0-1.42.0) without its log lines, whose
        count of available nodes (`num_available()`) re-lists the whole federation through the grid every round
        (the strategy logs the round itself). A copy: tests/contracts/test_flower_seams.py fails when Flower's
        original changes."""
        instructions = self.strategy.configure_fit(
            server_round=server_round, parameters=self.parameters, client_manager=self._client_manager
        )
        if not instructions:
            return None
        results, failures = fit_clients(
            instructions, max_workers=self.max_workers, timeout=timeout, group_id=server_round
        )
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        return parameters, metrics, (results, failures)

    def evaluate_round(self, server_round: int, timeout: float | None):  # -> (loss, metrics, (results, failures))
        """Flower's federated evaluation, then the round's checkpoint (when due) and progress line."""
        if server_round <= self.resumed:
            return None
        began = time.perf_counter()
        res = super().evaluate_round(server_round, timeout)
        self.seconds["evaluate"] += time.perf_counter() - began
        every = int(self.cfg.checkpoint_every)
        if every > 0 and (server_round % every == 0 or server_round == self.num_rounds):
            self._checkpoint(server_round)
        self.progress.update(server_round, self.recorder.final)
        return res


# how a run is executed may change on resume (a checkpoint written before a key existed lacks it), and num_rounds,
# to extend a run; not where the personal models live
RESUME_MAY_CHANGE = (EXECUTION_KEYS - {"personal_state", "state_dir"}) | {"num_rounds"}


def check_resumable(saved: dict, current: dict) -> None:
    """Raise ValueError naming the keys whose values differ between the checkpoint's config and this one (only
    RESUME_MAY_CHANGE may)."""
    differ = differing_keys(saved, current, RESUME_MAY_CHANGE)
    if differ:
        a, b = dotted(saved), dotted(current)
        raise ValueError(
            "resume=true with a config that differs from the checkpoint's in: "
            + ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in differ)
            + f". Resume with the run's own config (only {', '.join(sorted(RESUME_MAY_CHANGE))} may change), or "
            "start a new run."
        )


def build_components(
    cfg: DictConfig, out_dir: Path, simulated_nodes: Mapping[int, int] | None = None
) -> ServerAppComponents:
    """The strategy and server for one run of `cfg`, writing into `out_dir`; aggregation runs on `cfg.accelerator` as
    this process resolves it (app/training/compute.py). `simulated_nodes`: Flower's simulation's node id -> partition
    id (app/runners/engine.py), which spares a message per device before round 1."""
    set_deterministic(bool(cfg.deterministic))
    federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    model = dataset_model(cfg.dataset, federation.input_shape, federation.num_classes, cfg.seed)
    malicious = attackers(cfg)
    f = aggregator_f(cfg)
    recorder = RunRecorder(cfg, malicious, out_dir)
    strategy = RobustStrategy(
        initial_parameters=ndarrays_to_parameters(get_weights(model)),
        aggregate=build_aggregator(cfg.aggregator),
        num_clients=cfg.num_clients,
        clients_per_round=cfg.clients_per_round,
        num_rounds=cfg.num_rounds,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
        num_malicious=f,
        evaluate_metrics_fn=recorder.evaluate,
        threat_model=threat_model(cfg.attack, f),
        reweight=METHODS[cfg.method.name](cfg).reweight(),
        malicious=malicious,
        checkpoint_every=cfg.checkpoint_every,
        max_update_norm=None if cfg.max_update_norm is None else float(cfg.max_update_norm),
        sample_sizes=sampling_sizes(cfg),  # the devices' training counts as each client trains on them
        device_keys=None if cfg.device_keys is None else load_device_keys(Path(cfg.device_keys), cfg.num_clients),
        evaluation_keys=METHODS[cfg.method.name].required_metrics(plan_kinds(cfg.method)),
        accelerator=resolve_accelerator(str(cfg.accelerator)),
        simulated_nodes=simulated_nodes,
    )
    return ServerAppComponents(
        server=ResultsServer(strategy, recorder, cfg),
        config=ServerConfig(num_rounds=cfg.num_rounds, round_timeout=cfg.round_timeout),
    )


def make_server_app(cfg: DictConfig, out_dir: Path, simulated_nodes: Mapping[int, int] | None = None) -> ServerApp:
    """A ServerApp for a fixed config (the Hydra entry: run_simulation gives the app an empty run config)."""
    return ServerApp(server_fn=lambda context: build_components(cfg, out_dir, simulated_nodes))


def _server_fn(context: Context) -> ServerAppComponents:
    """flwr run: the run config's `overrides` select the Hydra config; `output-dir` says where results go."""
    cfg = config_from_overrides(str(context.run_config.get("overrides", "")))
    check_flwr_run(cfg)
    show_flower(bool(cfg.verbose))  # this process is the ServerApp's, for this run alone
    out = str(context.run_config.get("output-dir", "")).strip()
    out_dir = Path(out) if out else Path.home() / "ditto-runs" / time.strftime("%Y%m%d-%H%M%S")
    return build_components(cfg, out_dir)


app = ServerApp(server_fn=_server_fn)
