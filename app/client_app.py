"""ClientApp: one device of the federation. `fit` runs the Ditto round (global step + personal step on the same
mini-batches, w^t fixed as the prox centre) and returns the global update; the personal model is kept as stored
client state (`context.state`) and never leaves the device. `evaluate` scores the received global model and the
personal model on the device's own test split. Malicious devices apply the configured attack."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import NDArrays, Scalar
from omegaconf import DictConfig

from app import ditto
from app.attacks import attack_update, attackers, corrupts_labels, poison_labels
from app.config import config_from_overrides
from app.data import DeviceData, load_federation
from app.models import build_model, get_weights, set_weights

PERSONAL_KEY = "ditto.personal"


class DittoClient(NumPyClient):
    """Device `partition_id`; `state` is the node's persistent RecordDict (Flower's context.state)."""

    def __init__(self, cfg: DictConfig, partition_id: int, state: RecordDict) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.state = state
        federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
        self.num_classes = federation.num_classes
        self.data: DeviceData = federation.devices[partition_id]
        self.malicious = partition_id in attackers(cfg)
        self.personalized = ditto.METHODS[cfg.method.name]
        self._build = lambda: build_model(cfg.dataset.model, federation.num_features, federation.num_classes, cfg.seed)

    def _generator(self, server_round: int, stream: int) -> torch.Generator:
        """A torch RNG that depends only on (seed, device, round, stream): results do not depend on scheduling."""
        seed = np.random.SeedSequence([self.cfg.seed, self.partition_id, server_round, stream]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    def _train_labels(self) -> torch.Tensor:
        if self.malicious and corrupts_labels(self.cfg.attack):
            return poison_labels(self.data.y_train, self.num_classes, self._generator(0, 1))
        return self.data.y_train

    def _personal_model(self) -> torch.nn.Module:
        """v_k: the stored personal model, or the initial global model if this device never trained."""
        model = self._build()
        if PERSONAL_KEY in self.state:
            set_weights(model, self.state[PERSONAL_KEY].to_numpy_ndarrays())
        return model

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        return {"partition_id": self.partition_id}

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        server_round = int(config["server_round"])
        global_model = self._build()
        set_weights(global_model, parameters)
        personal = self._personal_model() if self.personalized else None
        ditto.local_round(
            global_model,
            personal,
            self.data.x_train,
            self._train_labels(),
            steps=self.cfg.local_steps,
            batch_size=self.cfg.batch_size,
            lr=float(self.cfg.lr),
            lam=float(self.cfg.method.get("lam", 0.0)),
            loss_fn=F.cross_entropy,
            generator=self._generator(server_round, 0),
        )
        if personal is not None:
            self.state[PERSONAL_KEY] = ArrayRecord(numpy_ndarrays=get_weights(personal))
        update = [w - w0 for w, w0 in zip(get_weights(global_model), parameters)]
        if self.malicious:
            rng = np.random.default_rng([self.cfg.seed, self.partition_id, server_round, 2])
            update = attack_update(self.cfg.attack, update, rng, self.cfg.clients_per_round)
        return update, len(self.data.y_train), {"partition_id": self.partition_id}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        model = self._build()
        set_weights(model, parameters)
        x, y = self.data.x_test, self.data.y_test
        correct, loss = ditto.evaluate(model, x, y, F.cross_entropy)
        metrics: dict[str, Scalar] = {
            "partition_id": self.partition_id,
            "n_train": len(self.data.y_train),
            "n_test": len(y),
            "correct_global": correct,
            "loss_global": loss,
        }
        if self.personalized:
            metrics["correct_personal"], metrics["loss_personal"] = ditto.evaluate(
                self._personal_model(), x, y, F.cross_entropy
            )
        return loss, len(y), metrics


def _partition_id(context: Context, cfg: DictConfig) -> int:
    try:
        pid = int(context.node_config["partition-id"])
    except KeyError:
        raise RuntimeError(
            "this node has no partition-id: start it with --node-config \"partition-id=K num-partitions=N\""
        ) from None
    if not 0 <= pid < cfg.num_clients:
        raise RuntimeError(f"partition-id={pid} is outside 0..{cfg.num_clients - 1} (num_clients={cfg.num_clients})")
    return pid


def make_client_fn(cfg: DictConfig | None = None):  # -> Callable[[Context], Client]
    """client_fn for a fixed config (Hydra entry) or, with None, the config named by the run config (flwr run)."""

    def client_fn(context: Context) -> Client:
        torch.set_num_threads(1)  # one Ray actor per core: no oversubscription
        run_cfg = cfg if cfg is not None else config_from_overrides(str(context.run_config.get("overrides", "")))
        return DittoClient(run_cfg, _partition_id(context, run_cfg), context.state).to_client()

    return client_fn


app = ClientApp(client_fn=make_client_fn())
