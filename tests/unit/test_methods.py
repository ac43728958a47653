"""The baselines and lam auto against their definitions: local sends nothing that moves w and equals Ditto with
lam = 0, finetune scores fine-tuned models, q-FFL / tilting by hand (q = 0 is the mean), APFL's step by hand, and
lam auto picks the grid value with the lowest validation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from app.client_app import DeviceClient
from app.config.compose import compose_config
from app.methods import METHODS
from app.methods.apfl import apfl_round, mix_into
from app.records.persistence import MemoryStore
from app.server_app import build_components
from app.training.lam import LAM_FIXED, LAM_GRID, LamSearch
from app.training.models import get_weights
from app.training.steps import auto_lam_step, evaluate
from strategies.fair import qffl, tilted
from strategies.replies import check_evaluation
from strategies.robust import RobustStrategy
from strategies.rules.registry import build_aggregator
from tests.unit.test_ditto import X, _linear, _mse
from tests.unit.test_strategy import MODEL, FakeDevice

SMALL = ["num_clients=6", "local_steps=4", "attack=none"]


def _fit(client: DeviceClient, params: list[np.ndarray], rounds: range) -> list[list[np.ndarray]]:
    return [client.fit(params, {"server_round": r})[0] for r in rounds]


def test_local_sends_zero_updates_and_matches_ditto_with_lam_zero() -> None:
    local = DeviceClient(compose_config([*SMALL, "method=local"]), 2, MemoryStore(RecordDict()))
    ditto0 = DeviceClient(compose_config([*SMALL, "method=ditto", "method.lam=0"]), 2, MemoryStore(RecordDict()))
    params = get_weights(local._build())
    for update in _fit(local, params, range(1, 4)):
        assert all(not np.any(u) for u in update), "local training must not move the global model"
    _fit(ditto0, params, range(1, 4))
    ours = local.store.load(upto=3).personal
    theirs = ditto0.store.load(upto=3).personal
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    assert any(not np.array_equal(a, b) for a, b in zip(ours, params)), "the personal model did train"


def test_finetune_scores_the_fine_tuned_global_model() -> None:
    cfg = compose_config([*SMALL, "method=finetune"])
    client = DeviceClient(cfg, 1, MemoryStore(RecordDict()))
    params = get_weights(client._build())
    _, _, metrics = client.evaluate(params, {"server_round": 5})
    assert metrics["loss_personal"] < metrics["loss_global"], "40 steps on its own data lower the device's loss"
    untuned = DeviceClient(compose_config([*SMALL, "method=finetune", "method.steps=0"]), 1, MemoryStore(RecordDict()))
    _, _, same = untuned.evaluate(params, {"server_round": 5})
    assert same["correct_personal"] == same["correct_global"] and same["loss_personal"] == same["loss_global"]
    assert client.store.load(upto=5) is None, "the fine-tuned copy is not kept"


U = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.0, 4.0]])
LOSSES = torch.tensor([0.5, 2.0, 1.0])


def test_qffl_is_the_mean_at_q_zero_and_matches_the_paper_by_hand() -> None:
    torch.testing.assert_close(qffl(U, LOSSES, q=0.0, lr=0.1).mean(0), U.mean(0))
    q, lr = 2.0, 0.1
    L = 1 / lr
    step = torch.zeros(2, dtype=torch.float64)
    h_sum = 0.0
    for u, f in zip(U.double(), LOSSES.double()):
        dw = -L * u  # L (w^t - w_k)
        step += f**q * dw
        h_sum += q * f ** (q - 1) * dw.pow(2).sum() + L * f**q
    expected = -(step / h_sum)  # w^(t+1) - w^t
    torch.testing.assert_close(qffl(U, LOSSES, q=q, lr=lr).mean(0).double(), expected)


def test_tilted_weights_updates_by_exp_q_loss() -> None:
    torch.testing.assert_close(tilted(U, LOSSES, q=0.0).mean(0), U.mean(0))
    w = torch.exp(1.5 * LOSSES)
    torch.testing.assert_close(tilted(U, LOSSES, q=1.5).mean(0), (w[:, None] * U).sum(0) / w.sum())


class LossDevice(FakeDevice):
    def __init__(self, cid: str, partition_id: int, loss: object) -> None:
        super().__init__(cid, partition_id)
        self.loss = loss

    def fit(self, ins, timeout, group_id):
        res = super().fit(ins, timeout, group_id)
        metrics = {} if self.loss is None else {"train_loss": self.loss}
        return FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=res.parameters,
            num_examples=res.num_examples,
            metrics=metrics,
        )


def _strategy_round(devices: list[FakeDevice], reweight) -> tuple[list[np.ndarray], dict]:
    strategy = RobustStrategy(
        initial_parameters=ndarrays_to_parameters(MODEL),
        aggregate=build_aggregator({"name": "mean"}),
        num_clients=len(devices),
        clients_per_round=len(devices),
        num_rounds=1,
        eval_every=10,
        seed=0,
        reweight=reweight,
        connect_timeout=5,
    )
    from flwr.server import Server

    from tests.unit.test_strategy import _manager

    server = Server(client_manager=_manager(devices), strategy=strategy)
    server.fit(num_rounds=1, timeout=None)
    return parameters_to_ndarrays(server.parameters), strategy.rounds[0]


def test_strategy_qffl_at_q_zero_equals_mean_and_rejects_updates_without_a_loss() -> None:
    devices = [LossDevice("a", 0, 0.3), LossDevice("b", 1, 1.2), LossDevice("c", 2, 0.7)]
    plain, _ = _strategy_round(devices, None)
    fair, _ = _strategy_round(devices, lambda u, f: qffl(u, f, q=0.0, lr=0.05))
    for a, b in zip(plain, fair):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    bad = [LossDevice("a", 0, 0.3), LossDevice("b", 1, None), LossDevice("c", 2, float("nan"))]
    params, entry = _strategy_round(bad, lambda u, f: qffl(u, f, q=1.0, lr=0.05))
    assert entry["rejected_updates"] == 2 and entry["accepted_updates"] == 1
    # the one accepted update u (all ones, 9 coordinates, F = 0.3), rescaled by q-FFL with n = 1, q = 1, L = 20:
    # L F u / (q L^2 |u|^2 + L F)
    expected = 20 * 0.3 / (20**2 * 9 + 20 * 0.3)
    for a in params:
        np.testing.assert_allclose(a, expected, rtol=1e-6)


def test_apfl_step_by_hand() -> None:
    y = torch.tensor([1.0, 0.0, 2.0, -1.0])
    v, w, lr, alpha = torch.tensor([0.3, -0.2]), torch.tensor([1.0, 0.5]), 0.1, 0.25

    def grad(theta: torch.Tensor) -> torch.Tensor:
        return 2 * ((X @ theta - y)[:, None] * X).mean(0)

    personal, global_model = _linear(v.tolist()), _linear(w.tolist())
    apfl_round(
        global_model,
        personal,
        X,
        y,
        steps=1,
        batch_size=4,
        lr=lr,
        alpha=alpha,
        loss_fn=_mse,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(global_model.weight[0].detach(), w - lr * grad(w))
    torch.testing.assert_close(personal.weight[0].detach(), v - lr * alpha * grad(alpha * v + (1 - alpha) * w))
    mixed = mix_into(_linear([0.0, 0.0]), personal, global_model, alpha)
    torch.testing.assert_close(
        mixed.weight[0].detach(), alpha * personal.weight[0].detach() + (1 - alpha) * global_model.weight[0].detach()
    )


@pytest.mark.parametrize(("val_target", "expected"), [("global", 2.0), ("personal", 0.1)])
def test_auto_lam_picks_the_grid_value_with_the_lowest_validation_loss(val_target: str, expected: float) -> None:
    """v sits at [3, -1], w^t at [0, 0]; the training batch has zero gradient at v. Validation data made by w^t
    reward the strongest pull towards w^t (lam = 2), data made by v the weakest (lam = 0.1)."""
    v, w_t = torch.tensor([3.0, -1.0]), torch.tensor([0.0, 0.0])
    y_train = X @ v
    y_val = X @ (w_t if val_target == "global" else v)
    model = _linear(v.tolist())
    search = LamSearch((0.1, 1.0, 2.0), X, y_val)
    lam = auto_lam_step(model, X, y_train, 0.1, _mse, [w_t[None, :]], search)
    assert lam == expected
    torch.testing.assert_close(model.weight[0].detach(), v - 0.1 * lam * (v - w_t))  # the kept candidate
    losses = {}
    for cand in search.grid:
        losses[cand] = float(_mse(None, (X @ (v - 0.1 * cand * (v - w_t)))[:, None], y_val))
    assert min(losses, key=losses.get) == expected


def test_auto_lam_on_a_device_reports_its_choice_and_small_devices_keep_the_fixed_lam() -> None:
    cfg = compose_config(["num_clients=6", "local_steps=3", "method.lam=auto", "attack=none"])
    client = DeviceClient(cfg, 0, MemoryStore(RecordDict()))
    assert isinstance(client.plan.lams[0], LamSearch) and client.plan.lams[0].grid == LAM_GRID[False]
    n_val = len(client.plan.lams[0].y_val)
    full = DeviceClient(compose_config(["num_clients=6", "attack=none"]), 0, MemoryStore(RecordDict()))
    assert len(client.y_train) + n_val == len(full.y_train) and n_val >= 4
    params = get_weights(client._build())
    client.fit(params, {"server_round": 1})
    _, _, metrics = client.evaluate(params, {"server_round": 1})
    assert metrics["lam"] in LAM_GRID[False]
    strong = DeviceClient(
        compose_config(
            [
                "num_clients=6",
                "method.lam=auto",
                "method.strong_attack=true",
                "method.val_fraction=0.005",
                "method.min_validation=4",
                "attack=none",
            ]
        ),
        0,
        MemoryStore(RecordDict()),
    )
    assert strong.plan.lams == (LAM_FIXED[True],), "fewer than 4 validation samples: the fixed lam of a strong attack"


def test_fair_methods_report_the_loss_of_the_received_model() -> None:
    client = DeviceClient(compose_config([*SMALL, "method=qffl"]), 3, MemoryStore(RecordDict()))
    params = get_weights(client._build())
    _, n, metrics = client.fit(params, {"server_round": 1})
    expected = evaluate(client._build(), client.x_train, client.y_train, client.objective)[1]
    assert metrics["train_loss"] == pytest.approx(expected) and n == len(client.y_train)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_methods_evaluation_reply_passes_the_servers_check(method: str) -> None:
    client = DeviceClient(
        compose_config(
            [*SMALL, f"method={method}", "method.steps=2"] if method == "finetune" else [*SMALL, f"method={method}"]
        ),
        1,
        MemoryStore(RecordDict()),
    )
    params = get_weights(client._build())
    client.fit(params, {"server_round": 1})
    loss, n, metrics = client.evaluate(params, {"server_round": 1})
    reply = EvaluateRes(status=Status(code=Code.OK, message=""), loss=loss, num_examples=n, metrics=metrics)
    assert check_evaluation(reply, 1, METHODS[method].required_metrics(("personal",))) is None


def test_a_lam_list_devices_evaluation_reply_passes_the_servers_check(tmp_path) -> None:
    """A lam-list run sends one personal kind per lam (personal@lam=X) and no plain `personal`: the server must ask
    for those, or it would refuse every reply of the run."""
    cfg = compose_config([*SMALL, "method.lam=[0.1,1.0]"])
    client = DeviceClient(cfg, 1, MemoryStore(RecordDict()))
    params = get_weights(client._build())
    client.fit(params, {"server_round": 1})
    loss, n, metrics = client.evaluate(params, {"server_round": 1})
    reply = EvaluateRes(status=Status(code=Code.OK, message=""), loss=loss, num_examples=n, metrics=metrics)
    required = build_components(cfg, tmp_path).server.strategy.evaluation_keys
    assert {"correct_personal@lam=0.1", "correct_personal@lam=1.0"} <= required
    assert check_evaluation(reply, 1, required) is None
