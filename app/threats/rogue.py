"""Nodes that lie on purpose, to test what a deployment's server refuses (chaos tests; docs/deployment.md).

A SuperNode started with `--node-config "... rogue=\"NAME\""` runs its device honestly except for the lie NAME:
- `forge-evaluation`: evaluation replies claim one more correct answer than the device has test samples.
"""

from __future__ import annotations

from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

ROGUES = ("forge-evaluation",)


class ForgedEvaluation(NumPyClient):
    """`honest` in every call but evaluate, whose correct counts exceed the test samples."""

    def __init__(self, honest: NumPyClient) -> None:
        self.honest = honest

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        return self.honest.get_properties(config)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return self.honest.fit(parameters, config)

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        loss, n_test, metrics = self.honest.evaluate(parameters, config)
        return loss, n_test, {k: n_test + 1 if k.startswith("correct_") else v for k, v in metrics.items()}


def rogue_client(honest: NumPyClient, name: str) -> NumPyClient:
    """`honest` with the lie `name` (one of ROGUES)."""
    if name not in ROGUES:
        raise ValueError(f"node config rogue={name!r} is unknown; allowed: {', '.join(ROGUES)}")
    return ForgedEvaluation(honest)
