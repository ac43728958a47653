"""RobustStrategy: a Flower Strategy that samples devices reproducibly, rejects malformed updates and aggregates
the rest with any rule of the aggregator registry.

It knows nothing of Ditto (the paper's point: personalization is a client-side add-on to any global solver).
Clients send updates (w_k - w^t); the strategy sets w^{t+1} = w^t + aggregate(updates).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies.aggregators import Aggregator
from strategies.fair import Reweight
from strategies.sampling import evaluates, sample_devices

EvaluateMetricsFn = Callable[[int, list[dict[str, Any]]], dict[str, Any]]
ThreatModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_update(update: NDArrays, reference: NDArrays, max_norm: float | None = None) -> str | None:
    """Why `update` cannot be aggregated against the model `reference` (None when it can); with `max_norm`, an
    update whose Euclidean norm exceeds it is absurd (no SGD round moves a model that far) and refused too."""
    if len(update) != len(reference):
        return f"{len(update)} arrays, expected {len(reference)}"
    for i, (u, r) in enumerate(zip(update, reference)):
        if u.shape != r.shape:
            return f"array {i} has shape {u.shape}, expected {r.shape}"
        if u.dtype != r.dtype:
            return f"array {i} has dtype {u.dtype}, expected {r.dtype}"
        if not np.isfinite(u).all():
            return f"array {i} holds NaN or Inf"
    if max_norm is not None:
        norm = math.sqrt(sum(float(np.dot(u.ravel().astype(np.float64), u.ravel().astype(np.float64))) for u in update))
        if norm > max_norm:
            return f"norm {norm:.3g} exceeds max_update_norm={max_norm:g}"
    return None


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


def _is_loss(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


class RobustStrategy(Strategy):
    """Sample `clients_per_round` devices per round, validate their updates, aggregate with `aggregate`.

    Devices are addressed by partition id (asked once from each node through `get_properties`), so which devices a
    round samples depends only on (seed, round), in simulation and in deployment alike: uniformly, or with
    `sample_sizes` (the devices' training sample counts, known to the server from the config) in proportion to n_k,
    as the official code (strategies/sampling.py). Every `eval_every` rounds and
    after the last round, every device evaluates; `evaluate_metrics_fn(round, rows)` turns their metrics (one dict per
    device, sorted by partition id) into the round's metrics. `rounds` keeps one entry per round.

    `threat_model` (simulation only) receives the stacked accepted updates and a mask of the rows sent by devices in
    `malicious`, and returns the stack the aggregator sees: how omniscient attacks, which need the benign updates of
    the round, are simulated. `reweight` (fair solvers such as q-FFL) rescales the stack by the losses the devices
    report as the fit metric `train_loss` before the aggregator; an update without a finite, non-negative loss is then
    rejected, and so is an update whose norm exceeds `max_update_norm`. A round whose accepted updates the rule cannot aggregate keeps w^t (counted). With `checkpoint_every`
    > 0, each fit instruction carries the round of the server's last checkpoint (`checkpoint_round`), so devices know
    which versions of their state a resumed run may still need. The stack is built on `device` once (the server's GPU
    when it has one); the threat model, the reweighting and the rule all run there.
    """

    def __init__(
        self,
        *,
        initial_parameters: Parameters,
        aggregate: Aggregator,
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
        device: torch.device | str = "cpu",
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
        self.connect_timeout = connect_timeout
        self.checkpoint_every = checkpoint_every
        self.max_update_norm = max_update_norm
        self.sample_sizes = None if sample_sizes is None else tuple(int(n) for n in sample_sizes)
        self.device = torch.device(device)
        self.rounds: list[dict[str, Any]] = []
        self._partition_of: dict[str, int] = {}
        self._identified: set[int] = set()  # partition ids seen so far
        self._cached: tuple[set[str], dict[int, ClientProxy]] | None = None  # node ids -> their devices
        self._global: NDArrays = []
        self._start = time.perf_counter()
        self.connected_after: float | None = None  # seconds from the start until every device was identified

    def __repr__(self) -> str:
        return f"RobustStrategy(num_clients={self.num_clients}, clients_per_round={self.clients_per_round})"

    # -- device identities -------------------------------------------------------------------------------------
    def _devices(self, client_manager: ClientManager) -> dict[int, ClientProxy]:
        """Connected devices by partition id; asks new nodes for their partition id once.

        Before the first round every device must connect (within `connect_timeout`). Later rounds go on with the
        devices that are connected: a dead node's sampled slot is lost for that round, and a restarted device (a
        new node reporting the partition id of an earlier one) takes its place."""
        first = not self._partition_of
        if first:
            client_manager.num_available()  # lets Flower register the nodes that have joined
            if not client_manager.wait_for(self.num_clients, timeout=int(self.connect_timeout)):
                raise RuntimeError(
                    f"only {client_manager.num_available()} of num_clients={self.num_clients} devices connected within "
                    f"{self.connect_timeout:.0f} s: start one node per device (simulation: num-supernodes=num_clients)"
                )
            proxies = client_manager.all()
        else:  # Flower's all() re-lists every node of the federation; its own thread does so every 5 s, soon enough
            proxies = client_manager.clients if isinstance(client_manager, SimpleClientManager) else client_manager.all()
        if self._cached is not None and proxies.keys() == self._cached[0]:
            return self._cached[1]  # no node joined or left since the last call
        new = [p for cid, p in proxies.items() if cid not in self._partition_of]
        if new:
            with ThreadPoolExecutor(max_workers=min(32, len(new))) as pool:
                answers = list(pool.map(lambda p: p.get_properties(GetPropertiesIns({}), self.connect_timeout, 0), new))
            reported = [int(res.properties["partition_id"]) for res in answers]
            if len(set(reported)) < len(reported):
                raise RuntimeError("two nodes report the same partition-id: give every node its own partition-id")
            for proxy, pid in zip(new, reported):
                if not 0 <= pid < self.num_clients:
                    raise RuntimeError(
                        f"node {proxy.cid} reports partition-id={pid}, outside 0..{self.num_clients - 1}: "
                        "set each node's partition-id below num_clients"
                    )
                if pid in self._identified:
                    log(WARNING, "device %d rejoined as node %s: it replaces the node it ran on before", pid, proxy.cid)
                self._partition_of[proxy.cid] = pid
                self._identified.add(pid)
        if first:
            self.connected_after = time.perf_counter() - self._start
            log(INFO, "%d devices connected and identified after %.1f s", len(self._partition_of), self.connected_after)
        devices = {pid: proxies[cid] for cid, pid in self._partition_of.items() if cid in proxies}  # newest wins
        if len(devices) < self.num_clients:
            log(WARNING, "%d of %d devices connected; missing: %s", len(devices), self.num_clients,
                sorted(set(range(self.num_clients)) - set(devices)))
        self._cached = (set(proxies), devices)
        return devices

    def _log_round(self, server_round: int, **fields: Any) -> dict[str, Any]:
        if not self.rounds or self.rounds[-1]["round"] != server_round:
            self.rounds.append({"round": server_round})
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
        devices = self._devices(client_manager)
        chosen = sample_devices(self.seed, server_round, self.num_clients, self.clients_per_round, self.sample_sizes)
        config: dict[str, Scalar] = {"server_round": server_round}
        if self.checkpoint_every > 0:
            config["checkpoint_round"] = (server_round - 1) // self.checkpoint_every * self.checkpoint_every
        ins = FitIns(parameters, config)
        return [(devices[pid], ins) for pid in chosen if pid in devices]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        rows, weights, senders, losses, rejected = [], [], [], [], 0
        by_device = sorted(((self._partition_of.get(proxy.cid, -1), proxy, res) for proxy, res in results),
                           key=lambda item: item[0])
        for pid, proxy, res in by_device:
            try:
                update = parameters_to_ndarrays(res.parameters)
            except Exception as err:  # undecodable bytes are a malformed update like any other
                update, reason = None, f"undecodable parameters ({err})"
            else:
                reason = check_update(update, self._global, self.max_update_norm)
            if reason is None and res.num_examples <= 0:
                reason = f"num_examples={res.num_examples}"
            loss = res.metrics.get("train_loss")
            if reason is None and self.reweight is not None and not _is_loss(loss):
                reason = f"train_loss={loss!r} (a finite number >= 0 is needed by the fair solver)"
            if reason is not None:
                rejected += 1
                log(WARNING, "round %d: rejected the update of device %s: %s", server_round, pid, reason)
                continue
            rows.append(flatten(update))
            weights.append(res.num_examples)
            senders.append(pid)
            losses.append(loss)
        skipped = 0
        if rows:
            stacked = torch.from_numpy(np.stack(rows)).to(self.device)  # one copy to the device, then all work there
            if self.threat_model is not None:  # threat-model simulation: omniscient attackers' slots
                stacked = self.threat_model(stacked, torch.tensor([p in self.malicious for p in senders],
                                                                  device=self.device))
            if self.reweight is not None:
                stacked = self.reweight(stacked, torch.tensor(losses, dtype=torch.float64, device=self.device))
            try:
                delta = self.aggregate(stacked, torch.tensor(weights, dtype=torch.float64, device=self.device),
                                       self.num_malicious)
            except ValueError as err:  # too few accepted updates for the rule this round
                skipped = 1
                log(WARNING, "round %d: kept the global model, the aggregator cannot run: %s", server_round, err)
            else:
                self._global = unflatten(flatten(self._global) + delta.cpu().numpy(), self._global)
        metrics = {"accepted_updates": len(rows), "rejected_updates": rejected, "failed_clients": len(failures),
                   "skipped_aggregation": skipped}
        entry = self._log_round(server_round, **metrics)
        log(INFO, "round %d/%d: %d updates aggregated, %d rejected, %d failed (%.1f s)",
            server_round, self.num_rounds, len(rows), rejected, len(failures), entry["seconds"])
        return ndarrays_to_parameters(self._global), metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if not evaluates(server_round, self.eval_every, self.num_rounds):
            return []
        ins = EvaluateIns(parameters, {"server_round": server_round})
        return [(proxy, ins) for _, proxy in sorted(self._devices(client_manager).items())]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        rows = [dict(res.metrics, num_examples=res.num_examples, loss=res.loss) for _, res in results]
        rows.sort(key=lambda r: r.get("partition_id", -1))
        total = sum(r["num_examples"] for r in rows)
        loss = sum(r["loss"] * r["num_examples"] for r in rows) / total if total else None
        summary = self.evaluate_metrics_fn(server_round, rows) if self.evaluate_metrics_fn else {}
        self._log_round(server_round, failed_evaluations=len(failures), **summary)
        headline = ("benign_acc", "benign_std_acc")  # Flower's history keeps only scalars: the headline ones
        flat = {f"{kind}_{k}": m[k] for kind, m in summary.items() if isinstance(m, dict) for k in headline
                if isinstance(m.get(k), (int, float))}
        return loss, flat

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None  # no centralised data: every device evaluates on its own test split
