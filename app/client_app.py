"""ClientApp: one device of the federation. `fit` runs the method's local round (Ditto: the global step and the
personal step on the same mini-batches, w^t fixed as the prox centre) and returns the global update; a personal model
is kept as the device's own state (app/records/persistence.py: Flower's `context.state`, or a folder on the device's
disk that survives restarts) and never leaves the device. `evaluate` scores the received global model and the
personal model on the device's own test split. What a method trains and scores is its object's hooks (app/methods/).
Malicious devices apply the configured attack."""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import NDArrays, Scalar
from omegaconf import DictConfig, OmegaConf

from app.config.compose import client_config, frozen_text
from app.data.federation import load_federation
from app.methods import METHODS
from app.records.persistence import DeviceState, DiskStore, MemoryStore, PersonalStore
from app.rng import Stream, round_generator, seed_global_rng
from app.threats.attacks import attack_rng, attack_update, attackers, corrupts_labels, run_poisoned_labels
from app.threats.rogue import rogue_client
from app.training.compute import resolve_accelerator, set_deterministic
from app.training.lam import LamPlan, device_plan
from app.training.models import dataset_model, get_weights, objective, set_weights
from app.training.steps import evaluate

DeviceTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LamPlan]
_PLACED: OrderedDict[tuple[DictConfig, int, str], DeviceTensors] = OrderedDict()
PLACED_DEVICES = 256  # devices whose tensors one process keeps on its accelerator (least recently used out)


def _prepared_data(cfg: DictConfig, partition_id: int) -> DeviceTensors:
    """Device `partition_id`'s tensors as it trains and tests on them (lam auto's hold-out, then the label poisoning
    of a malicious device, fixed for the run), on the CPU."""
    federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    data = federation.devices[partition_id]
    keeps_personal = METHODS[cfg.method.name].keeps_personal
    x_train, y_train, plan = device_plan(cfg, partition_id, data.x_train, data.y_train, keeps_personal)
    if partition_id in attackers(cfg) and corrupts_labels(cfg.attack):
        y_train = run_poisoned_labels(y_train, federation.num_classes, cfg.seed, partition_id)
    return x_train, y_train, data.x_test, data.y_test, plan


def placed_data(cfg: DictConfig, partition_id: int, accelerator: torch.device) -> DeviceTensors:
    """`_prepared_data` on `accelerator`, moved there once per process and reused by every later message (a ClientApp
    builds a new client per message): no host-to-device copy of a device's data per round or per batch."""
    key = (cfg, partition_id, str(accelerator))
    if key in _PLACED:
        _PLACED.move_to_end(key)
        return _PLACED[key]
    *tensors, plan = _prepared_data(cfg, partition_id)
    _PLACED[key] = placed = (*(t.to(accelerator) for t in tensors), plan.to(accelerator))
    while len(_PLACED) > PLACED_DEVICES:
        _PLACED.popitem(last=False)
    return placed


@lru_cache(maxsize=8)
def _initial_model(cfg: DictConfig, accelerator: str) -> torch.nn.Module:
    """The run's initial model on `accelerator`, built once per process: a message's models are copies of it (the same
    seeded initialisation, without building and initialising a model per message)."""
    federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    return dataset_model(cfg.dataset, federation.input_shape, federation.num_classes, cfg.seed).to(accelerator)


class DeviceClient(NumPyClient):
    """Device `partition_id` running the configured method (app/methods/); `store` keeps its personal state between
    rounds (app/records/persistence.py). The methods read it through `app.methods.base.Device`."""

    def __init__(self, cfg: DictConfig, partition_id: int, store: PersonalStore) -> None:
        self.cfg = cfg
        self.partition_id = partition_id
        self.store = store
        federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
        self.num_classes = federation.num_classes
        self.method = METHODS[cfg.method.name](cfg)
        self.malicious = partition_id in attackers(cfg)
        self.objective = objective(cfg.dataset)
        self.accelerator = resolve_accelerator(str(cfg.accelerator))
        self._build = lambda: copy.deepcopy(_initial_model(cfg, str(self.accelerator)))
        self.x_train, self.y_train, self.x_test, self.y_test, self.plan = placed_data(
            cfg, partition_id, self.accelerator
        )

    def generator(self, server_round: int, stream: Stream) -> torch.Generator:
        """This device's random stream `stream` of round `server_round` (Stream)."""
        return round_generator(self.cfg.seed, self.partition_id, server_round, stream)

    def _personal_models(self, state: DeviceState | None) -> list[torch.nn.Module]:
        """The stored personal models, one per entry of the lam plan (the state holds their arrays one model after
        another), each the initial global model where this device never trained."""
        count = len(self.plan.lams)
        models = [self._build() for _ in range(count)]
        if state is not None:
            n = len(state.personal) // count
            for i, model in enumerate(models):
                set_weights(model, state.personal[i * n : (i + 1) * n])
        return models

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        return {"partition_id": self.partition_id}

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        server_round = int(config["server_round"])
        seed_global_rng(self.cfg.seed, self.partition_id, server_round)
        global_model = self._build()
        set_weights(global_model, parameters)
        metrics: dict[str, Scalar] = {"partition_id": self.partition_id, **self.method.fit_metrics(self, global_model)}
        keeps = self.method.keeps_personal
        stored = self.store.load(upto=server_round - 1) if keeps else None
        personal = self._personal_models(stored)
        steps = dict(
            steps=self.cfg.local_steps,
            batch_size=self.cfg.batch_size,
            lr=float(self.cfg.lr),
            loss_fn=self.objective,
            generator=self.generator(server_round, Stream.BATCHES),
        )
        chosen = self.method.train_round(self, global_model, personal, steps)
        if keeps:
            checkpoint = config.get("checkpoint_round")
            lineage = (*(stored.trained_rounds if stored is not None else ()), server_round)
            weights = [a for m in personal for a in get_weights(m)]
            self.store.save(
                DeviceState(server_round, weights, self.method.lam_counts(self, stored, chosen), lineage),
                checkpoint_round=None if checkpoint is None else int(checkpoint),
            )
        if self.method.trains_global:
            update = [w - w0 for w, w0 in zip(get_weights(global_model), parameters)]
        else:
            update = [np.zeros_like(w0) for w0 in parameters]
        if self.malicious:
            rng = attack_rng(self.cfg.seed, self.partition_id, server_round)
            update = attack_update(self.cfg.attack, update, rng, self.cfg.clients_per_round)
        return update, len(self.y_train), metrics

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        server_round = int(config.get("server_round", 0))
        seed_global_rng(self.cfg.seed, self.partition_id, server_round, Stream.EVALUATION)
        model = self._build()
        set_weights(model, parameters)
        correct, loss = evaluate(model, self.x_test, self.y_test, self.objective)
        metrics: dict[str, Scalar] = {
            "partition_id": self.partition_id,
            "n_train": len(self.y_train),
            "n_test": len(self.y_test),
            "correct_global": correct,
            "loss_global": loss,
        }
        keeps = self.method.keeps_personal
        stored = self.store.load(upto=server_round) if keeps else None
        personal = self._personal_models(stored)
        for kind, scored in self.method.evaluated(self, model, personal, server_round).items():
            metrics[f"correct_{kind}"], metrics[f"loss_{kind}"] = evaluate(
                scored, self.x_test, self.y_test, self.objective
            )
        if keeps:  # the round its personal model last trained in (0: never), how often
            metrics["personal_round"] = 0 if stored is None else stored.round
            metrics["personal_updates"] = 0 if stored is None else len(stored.trained_rounds)
        metrics.update(self.method.report(self, stored))
        return loss, len(self.y_test), metrics


def _partition_id(context: Context, cfg: DictConfig) -> int:
    try:
        pid = int(context.node_config["partition-id"])
    except KeyError:
        raise RuntimeError(
            'this node has no partition-id: start it with --node-config "partition-id=K num-partitions=N"'
        ) from None
    if not 0 <= pid < cfg.num_clients:
        raise RuntimeError(f"partition-id={pid} is outside 0..{cfg.num_clients - 1} (num_clients={cfg.num_clients})")
    return pid


def personal_store(context: Context, cfg: DictConfig, partition_id: int, out_dir: Path | None) -> PersonalStore:
    """The device's store: Flower's context.state, or (personal_state=disk) its folder under the node's
    `state-dir` (deployment), else `state_dir`, else the run's output folder."""
    if cfg.personal_state == "memory":
        return MemoryStore(context.state)
    root = str(context.node_config.get("state-dir", "") or cfg.state_dir or "")
    if not root and out_dir is None:
        raise RuntimeError(
            'personal_state=disk needs a folder: start the node with --node-config "... '
            'state-dir=DIR", or set state_dir=DIR, or give the run an output-dir'
        )
    return DiskStore(Path(root or Path(out_dir) / "personal_state") / f"device-{partition_id}")


def make_client_fn(cfg: DictConfig | None = None, out_dir: Path | None = None):  # -> Callable[[Context], Client]
    """client_fn for a fixed config and output folder (Hydra entry) or, with None, the config and output-dir named
    by the run config (flwr run)."""

    text = None if cfg is None else OmegaConf.to_yaml(cfg, resolve=True)  # the config as the function carries it

    def client_fn(context: Context) -> Client:
        torch.set_num_threads(1)  # one Ray actor per core: no oversubscription
        overrides = str(context.run_config.get("overrides", ""))
        run_cfg = frozen_text(text) if text is not None else client_config(overrides)
        set_deterministic(bool(run_cfg.deterministic))
        run_out = out_dir if text is not None else (str(context.run_config.get("output-dir", "")).strip() or None)
        pid = _partition_id(context, run_cfg)
        client = DeviceClient(run_cfg, pid, personal_store(context, run_cfg, pid, run_out))
        rogue = str(context.node_config.get("rogue", ""))  # chaos tests: a node that lies on purpose (threats/rogue.py)
        return (rogue_client(client, rogue) if rogue else client).to_client()

    return client_fn


app = ClientApp(client_fn=make_client_fn())
