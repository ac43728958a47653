"""Which device a node is.

Without `device_keys` (simulation, loopback demos) a node is the device it says it is: the `partition_id` of its
`get_properties` answer. With `device_keys` (a deployment with SuperNode authentication) the operator lists each
device's public key and a node is the device whose key it holds: Flower's SuperLink (1.41 and 1.42) binds every
node id to one public key (the node signs every Fleet request with it, and `flwr supernode register` fixes the key's
node id, so a restarted device comes back with its node id) and tells the ServerApp that key through
`Grid.get_nodes()`. The node's own claim must then agree with its key. Either way a node whose answer is missing,
malformed, out of range or (without keys) claimed by another new node too is refused, never the run.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common import Code, GetPropertiesRes
from flwr.server.client_proxy import ClientProxy


@dataclass(frozen=True)
class Refusal:
    """A node refused as a device: its node id, what it claimed (None: nothing usable) and why."""

    node: str
    claimed: Any
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "claimed": self.claimed, "reason": self.reason}


def pem_public_key(openssh: str) -> bytes:
    """An OpenSSH public key line as the PEM SubjectPublicKeyInfo bytes the SuperLink stores for a node."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(openssh.strip().encode())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_device_keys(path: Path, num_clients: int) -> dict[bytes, int]:
    """The operator's list of device keys, a JSON object {"<partition id>": "<OpenSSH public key line>"} naming
    every device 0..num_clients-1 once, as {PEM public key: partition id}."""
    path = Path(path)
    try:
        listed = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f'device_keys={path} cannot be read as JSON ({err}): write {{"0": "ecdsa-sha2-nistp384 '
            'AAAA...", ...}, one OpenSSH public key per partition id'
        ) from None
    if not isinstance(listed, dict) or sorted(listed) != sorted(str(k) for k in range(num_clients)):
        named = sorted(listed) if isinstance(listed, dict) else listed
        raise ValueError(
            f"device_keys={path} must name every partition id 0..{num_clients - 1} once "
            f"(num_clients={num_clients}); it names {named}"
        )
    from cryptography.exceptions import UnsupportedAlgorithm

    keys: dict[bytes, int] = {}
    for pid, line in listed.items():
        try:
            pem = pem_public_key(str(line))
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            raise ValueError(f"device_keys={path}: the key of device {pid} is no OpenSSH public key ({err})") from None
        if pem in keys:
            raise ValueError(f"device_keys={path}: devices {keys[pem]} and {pid} have the same key; give each its own")
        keys[pem] = int(pid)
    return keys


def node_public_keys(proxies: Iterable[ClientProxy]) -> dict[str, bytes]:
    """The public key the SuperLink holds for each node (by node id as a string), asked once per Grid."""
    grids = {id(g): g for g in (getattr(p, "grid", None) for p in proxies) if g is not None}
    if not grids:
        raise RuntimeError(
            "device_keys is set but the nodes come with no Grid to ask for their keys: binding devices "
            "to keys needs a deployment (SuperLink and SuperNodes); unset device_keys in simulation"
        )
    return {str(node.node_id): bytes(node.public_key) for grid in grids.values() for node in grid.get_nodes()}


def claimed_partition(answer: GetPropertiesRes | BaseException, num_clients: int) -> tuple[int | None, str | None]:
    """The partition id a node's `get_properties` answer claims, or None and why it claims none usable."""
    if isinstance(answer, BaseException):
        return None, f"no answer to get_properties ({type(answer).__name__}: {answer})"
    if answer.status.code != Code.OK:
        return None, f"get_properties failed ({answer.status.message})"
    if "partition_id" not in answer.properties:
        return None, "its answer has no partition_id"
    value = answer.properties["partition_id"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        return None, f"partition_id={value!r} is not a whole number"
    if not 0 <= value < num_clients:
        return None, f"partition_id={int(value)} is outside 0..{num_clients - 1}"
    return int(value), None


def identify(
    answers: dict[str, GetPropertiesRes | BaseException],
    num_clients: int,
    keys: dict[str, bytes] | None = None,
    device_keys: dict[bytes, int] | None = None,
) -> tuple[dict[str, int], list[Refusal]]:
    """Partition ids of the nodes whose answers (by node id) are accepted, and the refusals.

    With `device_keys` (and `keys`, each node's authenticated key) a node is the device its key is listed for, and
    is refused if its key is not listed or its claim names another device. Without, a node is the device it claims,
    and nodes that claim the same device in one batch are all refused (nothing tells which one is genuine)."""
    claims = {node: claimed_partition(answer, num_clients) for node, answer in answers.items()}
    accepted: dict[str, int] = {}
    refusals = [Refusal(node, None, reason) for node, (pid, reason) in claims.items() if reason is not None]
    valid = {node: pid for node, (pid, reason) in claims.items() if reason is None}
    if device_keys is not None:
        for node, pid in valid.items():
            bound = device_keys.get((keys or {}).get(node, b""))
            if bound is None:
                refusals.append(Refusal(node, pid, "its key is not listed in device_keys"))
            elif bound != pid:
                refusals.append(Refusal(node, pid, f"claims device {pid} but its key is device {bound}'s"))
            else:
                accepted[node] = pid
        return accepted, refusals
    counts = Counter(valid.values())
    for node, pid in valid.items():
        if counts[pid] > 1:
            refusals.append(Refusal(node, pid, f"{counts[pid]} new nodes claim device {pid} at once"))
        else:
            accepted[node] = pid
    return accepted, refusals
