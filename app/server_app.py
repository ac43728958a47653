"""ServerApp: config -> RobustStrategy -> rounds -> results on disk."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import Server, ServerApp, ServerAppComponents, ServerConfig, SimpleClientManager
from flwr.server.history import History
from omegaconf import DictConfig

from app.attacks import aggregator_f, attackers, threat_model
from app.config import config_from_overrides
from app.data import load_federation
from app.methods import METHODS
from app.models import build_model, get_weights
from app.results import RunRecorder
from strategies import RobustStrategy, build_aggregator
from strategies.fair import build_reweight


class ResultsServer(Server):
    """Flower's round loop, followed by writing the run's results."""

    def __init__(self, strategy: RobustStrategy, recorder: RunRecorder) -> None:
        super().__init__(client_manager=SimpleClientManager(), strategy=strategy)
        self.recorder = recorder

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        history, elapsed = super().fit(num_rounds, timeout)
        self.recorder.write(self.strategy.rounds)
        return history, elapsed


def build_components(cfg: DictConfig, out_dir: Path) -> ServerAppComponents:
    """The strategy and server for one run of `cfg`, writing into `out_dir`."""
    federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    model = build_model(cfg.dataset.model, federation.input_shape, federation.num_classes, cfg.seed)
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
        reweight=build_reweight(METHODS[cfg.method.name].server_rule, float(cfg.method.get("q", 0.0)), float(cfg.lr)),
        malicious=malicious,
    )
    return ServerAppComponents(server=ResultsServer(strategy, recorder), config=ServerConfig(num_rounds=cfg.num_rounds))


def make_server_app(cfg: DictConfig, out_dir: Path) -> ServerApp:
    """A ServerApp for a fixed config (the Hydra entry: run_simulation gives the app an empty run config)."""
    return ServerApp(server_fn=lambda context: build_components(cfg, out_dir))


def _server_fn(context: Context) -> ServerAppComponents:
    """flwr run: the run config's `overrides` select the Hydra config; `output-dir` says where results go."""
    cfg = config_from_overrides(str(context.run_config.get("overrides", "")))
    out = str(context.run_config.get("output-dir", "")).strip()
    out_dir = Path(out) if out else Path.home() / "ditto-runs" / time.strftime("%Y%m%d-%H%M%S")
    return build_components(cfg, out_dir)


app = ServerApp(server_fn=_server_fn)
