"""What app/runners/deploy.py's ROUND_TIMEOUT rests on, checked against the installed Flower's SuperLink state: a
message that a node pulled before it died is answered (error reply) only if the ServerApp polls while the node is
offline. A node readmitted under the same node id (node auth binds the id to the key) before such a poll never gets the
message again and no reply comes until the message's TTL passes; then the reply is an error, so a round timeout (the TTL
of a round's messages) bounds the wait. docs/maintainers/flower-1.42.md has the story and the upstream report."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate import LinkState, LinkStateFactory
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager

from app.config.compose import compose_config
from app.runners.deploy import ROUND_TIMEOUT, deployment_overrides

HEARTBEAT = 1.0  # s; the SuperLink counts a node offline after 2 missed intervals (HEARTBEAT_PATIENCE)


def _pulled_by_a_node_that_died(
    tmp_path: Path, ttl: float, monkeypatch: pytest.MonkeyPatch
) -> tuple[LinkState, int, int, str]:
    """A SuperLink state with one run and one node that pulled a train message (TTL `ttl`) and then went silent
    long enough to be counted offline; (state, run, node, message id)."""
    state = LinkStateFactory(str(tmp_path / "superlink.db"), NoOpFederationManager(), ObjectStoreFactory()).state()
    run = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, "flwr-serverapp")
    node = state.create_node("owner", "owner", b"node-key", heartbeat_interval=HEARTBEAT)
    assert state.activate_node(node, heartbeat_interval=HEARTBEAT)
    for name, value in (("_run_id", run), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 1)):  # as in a ServerApp
        monkeypatch.setattr(TaskIdentity, name, value)  # restored after the test
    msg = Message(RecordDict(), dst_node_id=node, message_type="train", ttl=ttl)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the Grid does before pushing
    mid = state.store_message_ins(msg)
    assert mid and len(state.get_message_ins(node_id=node, limit=None)) == 1
    time.sleep(2.5 * HEARTBEAT)
    return state, run, node, mid


def test_a_poll_while_the_node_is_offline_answers_its_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, run, _, mid = _pulled_by_a_node_that_died(tmp_path, 43200.0, monkeypatch)
    (reply,) = state.get_message_res({mid}, run)
    assert reply.has_error()


def test_a_node_readmitted_before_a_poll_leaves_its_message_unanswered_until_the_ttl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ttl = 15.0  # the setup takes 2.5 heartbeats and a few database writes: well inside it even on a loaded machine
    state, run, node, mid = _pulled_by_a_node_that_died(tmp_path, ttl, monkeypatch)
    assert state.activate_node(node, heartbeat_interval=30.0)  # restarted with its key: the same node id, online
    assert not state.get_message_ins(node_id=node, limit=None), "the new incarnation is not given the message"
    assert state.get_message_res({mid}, run) == [], (
        "Flower now answers a message lost with a readmitted node: ROUND_TIMEOUT in app/runners/deploy.py may go"
    )
    time.sleep(ttl)  # from now on, past the TTL counted from the message's creation
    (reply,) = state.get_message_res({mid}, run)
    assert reply.has_error(), "past its TTL the message is answered with an error: the round goes on"


def test_deployments_bound_their_rounds_unless_told_otherwise() -> None:
    assert compose_config(deployment_overrides(["num_clients=5"])).round_timeout == ROUND_TIMEOUT
    assert compose_config(deployment_overrides(["round_timeout=600"])).round_timeout == 600
    assert compose_config(deployment_overrides(["round_timeout=null"])).round_timeout is None
