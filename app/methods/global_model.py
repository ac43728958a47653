"""The global model alone: the federated solver on its own (the hooks' defaults)."""

from __future__ import annotations

from app.methods.base import Method


class GlobalModel(Method):
    pass
