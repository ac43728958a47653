"""RobustStrategy: a Flower Strategy that samples devices reproducibly, rejects malformed updates and aggregates
the rest with any rule of the aggregator registry.

It knows nothing of Ditto (the paper's point: personalization is a client-side add-on to any global solver).
Clients send updates (w_k - w^t); the strategy sets w^{t+1} = w^t + aggregate(updates).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies.fair import Reweight
from strategies.identity import Refusal
from strategies.nodes import NodeDirectory
from strategies.replies import check_evaluation, check_fit
from strategies.rules.registry import Rule
from strategies.sampling import evaluates, sample_devices

EvaluateMetricsFn = Callable[[int, list[dict[str, Any]]], dict[str, Any]]
ThreatModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flatten(arrays: NDArrays) -> np.ndarray:
    """All arrays as one vector."""
    return np.concatenate([a.ravel() for a in arrays])


def unflatten(vector: np.ndarray, like: NDArrays) -> NDArrays:
    """Split `vector` into arrays shaped and typed as `like`."""
    out, start = [], 0
    for a in like:
        out.append(vector[start : start + a.size].reshape(a.shape).astype(a.dtype, copy=False))
        start += a.size
    return out


class RobustStrategy(Strategy):
    """Sample `clients_per_round` devices per round, validate their updates, aggregate with `aggregate`.

    Devices are addressed by partition id, so which devices a round samples depends only on (seed, round), in
    simulation and in deployment alike: uniformly, or with `sample_sizes` (the devices' training sample counts, known
    to the server from the config) in proportion to n_k, as the official code (strategies/sampling.py). Each node
    is identified once per connection by the strategy's `nodes` (strategies/nodes.py; strategies/identity.py:
    its own claim, or with `device_keys` the key the SuperLink authenticated it with); a node refused as a device is
    logged, counted (`excluded_nodes`, the reasons in `exclusions`) and left out, and the run goes on without it.
    Before the first round the strategy waits (`connect_timeout`) until every device is identified, and starts with
    fewer only if at least `min_devices` (default: `clients_per_round`) are; else it stops with an error naming the
    missing. In Flower's simulation, `simulated_nodes` (node id -> partition id, as the engine registered them)
    names each node's device without a message (strategies/nodes.py).

    Every `eval_every` rounds and after the last round, every device evaluates. A reply counts for the device the
    request was sent to, never for what it says, and only if `check_evaluation` accepts it (with the metrics
    `evaluation_keys`); refused replies are logged and counted (`rejected_evaluations`). `evaluate_metrics_fn(round,
    rows)` turns the accepted rows (one dict per device, sorted by partition id) into the round's metrics. `rounds`
    keeps one entry per round, with what was sent, accepted, rejected and failed.

    `threat_model` (simulation only) receives the stacked accepted updates and a mask of the rows sent by devices in
    `malicious`, and returns the stack the aggregator sees: how omniscient attacks, which need the benign updates of
    the round, are simulated. `reweight` (fair solvers such as q-FFL) rescales the stack by the losses the devices
    report as the fit metric `train_loss` before the aggregator; an update without a finite, non-negative loss is then
    rejected, and so is an update whose norm exceeds `max_update_norm`. A round whose accepted updates the rule cannot
    aggregate keeps w^t (counted). With `checkpoint_every` > 0, each fit instruction carries the round of the server's
    last checkpoint (`checkpoint_round`), so devices know which versions of their state a resumed run may still need.
    The stack is built on `accelerator` once (the server's GPU when it has one); the threat model, the reweighting and
    the rule all run there.
    """

    def __init__(
        self,
        *,
        initial_parameters: Parameters,
        aggregate: Rule,
        num_clients: int,
        clients_per_round: int,
        num_rounds: int,
        eval_every: int,
        seed: int,
        num_malicious: int = 0,
        evaluate_metrics_fn: EvaluateMetricsFn | None = None,
        threat_model: ThreatModel | None = None,
        reweight: Reweight | None = None,
        malicious: frozenset[int] = frozenset(),
        connect_timeout: float = 300.0,
        checkpoint_every: int = 0,
        max_update_norm: float | None = None,
        sample_sizes: Sequence[int] | None = None,
        device_keys: dict[bytes, int] | None = None,
        min_devices: int | None = None,
        evaluation_keys: frozenset[str] = frozenset(),
        accelerator: torch.device | str = "cpu",
        simulated_nodes: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.initial_parameters = initial_parameters
        self.aggregate = aggregate
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.num_rounds = num_rounds
        self.eval_every = eval_every
        self.seed = seed
        self.num_malicious = num_malicious
        self.evaluate_metrics_fn = evaluate_metrics_fn
        self.threat_model = threat_model
        self.reweight = reweight
        self.malicious = malicious
        self.checkpoint_every = checkpoint_every
        self.max_update_norm = max_update_norm
        self.sample_sizes = None if sample_sizes is None else tuple(int(n) for n in sample_sizes)
        self.evaluation_keys = evaluation_keys
        self.accelerator = torch.device(accelerator)
        self.nodes = NodeDirectory(
            num_clients=num_clients,
            connect_timeout=connect_timeout,
            min_devices=clients_per_round if min_devices is None else min_devices,
            device_keys=device_keys,
            exclude=self._exclude,
            simulated=simulated_nodes,
        )
        self.rounds: list[dict[str, Any]] = []
        self._global: NDArrays = []
        self._sent_to: dict[int, int] = {}  # id of each node asked this phase -> the device it was asked as
        self._start = time.perf_counter()

    def __repr__(self) -> str:
        return f"RobustStrategy(num_clients={self.num_clients}, clients_per_round={self.clients_per_round})"

    # -- device identities -------------------------------------------------------------------------------------
    def _devices(self, client_manager: ClientManager, server_round: int) -> dict[int, ClientProxy]:
        """Connected devices by partition id (strategies/nodes.py)."""
        return self.nodes.devices(client_manager, server_round, self._start)

    @property
    def identification_seconds(self) -> float:
        """How long the first round waited for the devices to be identified."""
        return self.nodes.identification_seconds

    @property
    def connected_after(self) -> float | None:
        """Seconds from the start until every device was identified (None: not yet)."""
        return self.nodes.connected_after

    def _exclude(self, server_round: int, refusals: list[Refusal]) -> None:
        entry = self._log_round(server_round)
        for refusal in refusals:
            log(
                WARNING,
                "round %d: node %s is refused as a device (claimed %s): %s",
                server_round,
                refusal.node,
                refusal.claimed,
                refusal.reason,
            )
            entry["exclusions"].append(refusal.as_dict())
        entry["excluded_nodes"] = len(entry["exclusions"])

    def _log_round(self, server_round: int, **fields: Any) -> dict[str, Any]:
        if not self.rounds or self.rounds[-1]["round"] != server_round:
            self.rounds.append({"round": server_round, "excluded_nodes": 0, "exclusions": []})
        entry = self.rounds[-1]
        entry.update(fields, seconds=round(time.perf_counter() - self._start, 3))
        return entry

    # -- Strategy API ------------------------------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        self._start = time.perf_counter()
        return self.initial_parameters

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)
        devices = self._devices(client_manager, server_round)
        chosen = sample_devices(self.seed, server_round, self.num_clients, self.clients_per_round, self.sample_sizes)
        config: dict[str, Scalar] = {"server_round": server_round}
        if self.checkpoint_every > 0:
            config["checkpoint_round"] = (server_round - 1) // self.checkpoint_every * self.checkpoint_every
        ins = FitIns(parameters, config)
        return self._send(server_round, "sent_updates", [(pid, devices[pid]) for pid in chosen if pid in devices], ins)

    def _send(self, server_round: int, counter: str, targets: list[tuple[int, ClientProxy]], ins: Any) -> list:
        """The instructions to `targets` (device, node), remembering which device each node was asked as."""
        self._sent_to = {id(proxy): pid for pid, proxy in targets}
        self._log_round(server_round, **{counter: len(targets)})
        return [(proxy, ins) for _, proxy in targets]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        rows, weights, senders, losses, rejected = [], [], [], [], 0
        by_device = sorted(
            ((self._sent_to.get(id(proxy), -1), proxy, res) for proxy, res in results), key=lambda item: item[0]
        )
        for pid, proxy, res in by_device:
            update, reason = check_fit(res, self._global, self.max_update_norm, needs_loss=self.reweight is not None)
            if reason is not None:
                rejected += 1
                log(WARNING, "round %d: rejected the update of device %s: %s", server_round, pid, reason)
                continue
            rows.append(flatten(update))
            weights.append(res.num_examples)
            senders.append(pid)
            losses.append(res.metrics.get("train_loss"))
        skipped = 0
        if rows:
            stacked = torch.from_numpy(np.stack(rows)).to(self.accelerator)  # one copy there, then all work there
            if self.threat_model is not None:  # threat-model simulation: omniscient attackers' slots
                stacked = self.threat_model(
                    stacked, torch.tensor([p in self.malicious for p in senders], device=self.accelerator)
                )
            if self.reweight is not None:
                stacked = self.reweight(stacked, torch.tensor(losses, dtype=torch.float64, device=self.accelerator))
            try:
                delta = self.aggregate(
                    stacked, torch.tensor(weights, dtype=torch.float64, device=self.accelerator), self.num_malicious
                )
            except ValueError as err:  # too few accepted updates for the rule this round
                skipped = 1
                log(WARNING, "round %d: kept the global model, the aggregator cannot run: %s", server_round, err)
            else:
                self._global = unflatten(flatten(self._global) + delta.cpu().numpy(), self._global)
        metrics = {
            "accepted_updates": len(rows),
            "rejected_updates": rejected,
            "failed_clients": len(failures),
            "skipped_aggregation": skipped,
        }
        entry = self._log_round(server_round, **metrics)
        log(
            INFO,
            "round %d/%d: %d updates aggregated, %d rejected, %d failed (%.1f s)",
            server_round,
            self.num_rounds,
            len(rows),
            rejected,
            len(failures),
            entry["seconds"],
        )
        return ndarrays_to_parameters(self._global), metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if not evaluates(server_round, self.eval_every, self.num_rounds):
            return []
        ins = EvaluateIns(parameters, {"server_round": server_round})
        return self._send(
            server_round, "sent_evaluations", sorted(self._devices(client_manager, server_round).items()), ins
        )

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        rows, rejected = [], 0
        for proxy, res in results:
            pid = self._sent_to.get(id(proxy))
            reason = (
                "a reply from a node no evaluation was sent to"
                if pid is None
                else check_evaluation(res, pid, self.evaluation_keys)
            )
            if reason is not None:
                rejected += 1
                log(WARNING, "round %d: rejected the evaluation of device %s: %s", server_round, pid, reason)
                continue
            rows.append(dict(res.metrics, partition_id=pid, num_examples=res.num_examples, loss=res.loss))
        rows.sort(key=lambda r: r["partition_id"])
        total = sum(r["num_examples"] for r in rows)
        loss = sum(r["loss"] * r["num_examples"] for r in rows) / total if total else None
        summary = self.evaluate_metrics_fn(server_round, rows) if self.evaluate_metrics_fn else {}
        self._log_round(
            server_round,
            evaluations=len(rows),
            rejected_evaluations=rejected,
            failed_evaluations=len(failures),
            **summary,
        )
        headline = ("benign_acc", "benign_std_acc")  # Flower's history keeps only scalars: the headline ones
        flat = {
            f"{kind}_{k}": m[k]
            for kind, m in summary.items()
            if isinstance(m, dict)
            for k in headline
            if isinstance(m.get(k), (int, float))
        }
        return loss, flat

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None  # no centralised data: every device evaluates on its own test split
