"""Which connected node is which device, for the strategy: each node is identified once per connection
(strategies/identity.py), a refused node is left out and reported, and the first round waits until the federation
has connected."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from logging import INFO, WARNING

from flwr.common import GetPropertiesIns
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from strategies.identity import Refusal, identify, node_public_keys

SIMULATED_WAIT = 10.0  # seconds the first identification waits for the simulation's node mapping


class NodeDirectory:
    """Devices by partition id among the connected nodes. Before the first round, `devices` waits (`connect_timeout`)
    until every one of `num_clients` devices is identified, and starts with fewer only if at least `min_devices`
    are; else it stops with an error naming the missing. With `device_keys` a node is the device of the key the
    SuperLink authenticated it with. Each refusal is passed to `exclude(round, refusals)` (the strategy logs and
    counts it). `simulated` (Flower's simulation only: node id -> partition id, as its engine registered the nodes,
    filled once the engine has started) names a node's device without asking it: no message per device before the
    first round; a node it does not name is asked."""

    def __init__(
        self,
        *,
        num_clients: int,
        connect_timeout: float,
        min_devices: int,
        device_keys: dict[bytes, int] | None,
        exclude: Callable[[int, list[Refusal]], None],
        simulated: Mapping[int, int] | None = None,
    ) -> None:
        self.num_clients = num_clients
        self.connect_timeout = connect_timeout
        self.min_devices = min_devices
        self.device_keys = device_keys
        self.exclude = exclude
        self.simulated = simulated
        self.refusals: list[tuple[int, Refusal]] = []  # (round, refusal), every refusal so far
        self._partition_of: dict[str, int] = {}  # node id -> device, newest identification last
        self._identified: set[int] = set()  # partition ids seen so far
        self._asked: dict[str, ClientProxy] = {}  # node id -> the connection (proxy) it was identified on
        self._cached: tuple[frozenset, dict[int, ClientProxy]] | None = None  # connections -> their devices
        self.connected_after: float | None = None  # seconds from the start until every device was identified
        self.identification_seconds = 0.0  # how long the first round waited for the devices to be identified

    def devices(self, client_manager: ClientManager, server_round: int, start: float) -> dict[int, ClientProxy]:
        """Connected devices by partition id (`start`: the server's start on the perf_counter clock). Before the
        first round, waits for every device (see the class); later rounds go on with the devices that are connected:
        a dead node's sampled slot is lost for that round, and a restarted device, once identified again, takes its
        place (without keys: the newest node claiming it)."""
        if self.connected_after is not None:  # Flower's all() re-lists the federation; its thread does so every 5 s
            simple = isinstance(client_manager, SimpleClientManager)
            proxies = client_manager.clients if simple else client_manager.all()
            return self._identify(proxies, server_round)
        began = time.perf_counter()
        client_manager.num_available()  # lets Flower register the nodes that have joined
        deadline = time.monotonic() + self.connect_timeout
        while True:
            proxies = client_manager.all()
            devices = self._identify(proxies, server_round)
            if len(devices) >= self.num_clients or time.monotonic() >= deadline:
                break
            client_manager.wait_for(len(proxies) + 1, timeout=max(1, int(deadline - time.monotonic())))
        self.connected_after = time.perf_counter() - start
        self.identification_seconds = time.perf_counter() - began
        missing = sorted(set(range(self.num_clients)) - set(devices))
        if len(devices) < self.min_devices:
            refused = "; ".join(f"node {r.node}: {r.reason}" for at, r in self.refusals if at == server_round) or "none"
            raise RuntimeError(
                f"only {len(devices)} of num_clients={self.num_clients} devices were identified within "
                f"{self.connect_timeout:.0f} s (at least {self.min_devices} needed); missing: {missing}; refused "
                f"nodes: {refused}. Start one node per device (simulation: num-supernodes=num_clients)"
            )
        log(INFO, "%d devices connected and identified after %.1f s", len(devices), self.connected_after)
        if missing:
            log(
                WARNING,
                "starting without devices %s: they were not identified within %.0f s",
                missing,
                self.connect_timeout,
            )
        return devices

    def _simulated(self, new: dict[str, ClientProxy]) -> dict[str, int]:
        """The devices of the nodes of `new` that the simulation's engine registered (none outside simulation). The
        engine fills the mapping once it has registered every node, which may be just after the server starts: the
        first look waits for it (SIMULATED_WAIT seconds at most, then the nodes are asked)."""
        if self.simulated is None:
            return {}
        deadline = time.monotonic() + SIMULATED_WAIT
        while not self.simulated and time.monotonic() < deadline:
            time.sleep(0.005)
        return {cid: self.simulated[int(cid)] for cid in new if cid.isdigit() and int(cid) in self.simulated}

    def _record(self, accepted: dict[str, int]) -> None:
        """Take each node of `accepted` as the device it names."""
        for cid, pid in accepted.items():
            if pid in self._identified and self._partition_of.get(cid) != pid:
                log(WARNING, "device %d rejoined as node %s: it replaces the node it ran on before", pid, cid)
            self._partition_of.pop(cid, None)
            self._partition_of[cid] = pid  # newest last: it wins over an older node of the same device
            self._identified.add(pid)

    def _identify(self, proxies: dict[str, ClientProxy], server_round: int) -> dict[int, ClientProxy]:
        """Identify the nodes not yet identified on their present connection; the devices of `proxies`."""
        connections = frozenset((cid, id(p)) for cid, p in proxies.items())
        if self._cached is not None and connections == self._cached[0]:
            return self._cached[1]  # no node joined, left or reconnected since the last call
        new = {cid: p for cid, p in proxies.items() if self._asked.get(cid) is not p}
        known = self._simulated(new)
        new = {cid: p for cid, p in new.items() if cid not in known}
        if new:

            def ask(proxy: ClientProxy):  # -> GetPropertiesRes | BaseException
                try:
                    return proxy.get_properties(GetPropertiesIns({}), self.connect_timeout, 0)
                except Exception as err:  # a node that cannot answer is refused, not the run
                    return err

            with ThreadPoolExecutor(max_workers=min(32, len(new))) as pool:
                answers = dict(zip(new, pool.map(ask, new.values())))
            keys = node_public_keys(new.values()) if self.device_keys is not None else None
            accepted, refusals = identify(answers, self.num_clients, keys, self.device_keys)
            self._asked.update(new)
            self._record(accepted)
            for refusal in refusals:
                self._partition_of.pop(refusal.node, None)
            self.refusals.extend((server_round, r) for r in refusals)
            self.exclude(server_round, refusals)
        self._asked.update((cid, proxies[cid]) for cid in known)
        self._record(known)
        devices = {pid: proxies[cid] for cid, pid in self._partition_of.items() if cid in proxies}  # newest wins
        if len(devices) < self.num_clients and self.connected_after is not None:
            log(
                WARNING,
                "%d of %d devices connected; missing: %s",
                len(devices),
                self.num_clients,
                sorted(set(range(self.num_clients)) - set(devices)),
            )
        self._cached = (connections, devices)
        return devices
