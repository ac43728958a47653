"""The Ditto round against its formula: v <- v - lr (grad F(v; b) + lam (v - w^t)), w <- w - lr grad F(w; b)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.rng import Stream, round_generator
from app.threats.attacks import attack_rng
from app.training.models import cross_entropy
from app.training.steps import evaluate, local_round, minibatches, sgd_step


def _linear(weight: list[float]) -> nn.Module:
    model = nn.Linear(len(weight), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight]))
    return model


def _mse(model: nn.Module, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.squeeze(-1), y)


X = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0], [-1.0, 1.0]])
Y = torch.tensor([1.0, 0.0, 2.0, -1.0])


def _grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of mean((x w - y)^2) by hand."""
    return 2 * ((x @ w - y)[:, None] * x).mean(0)


def test_one_personal_step_matches_the_formula_by_hand() -> None:
    v, w_t, lr, lam = torch.tensor([0.3, -0.2]), torch.tensor([1.0, 0.5]), 0.1, 0.7
    model = _linear(v.tolist())
    sgd_step(model, X, Y, lr, _mse, prox_center=[w_t[None, :]], lam=lam)
    expected = v - lr * (_grad(v, X, Y) + lam * (v - w_t))
    torch.testing.assert_close(model.weight.detach()[0], expected)


def test_global_step_is_plain_sgd() -> None:
    w = torch.tensor([0.3, -0.2])
    model = _linear(w.tolist())
    sgd_step(model, X, Y, 0.1, _mse)
    torch.testing.assert_close(model.weight.detach()[0], w - 0.1 * _grad(w, X, Y))


def _round(global_w: list[float], personal_w: list[float], lam: float, steps: int, lr: float = 0.1):
    g, p = _linear(global_w), _linear(personal_w)
    local_round(
        g, p, X, Y, steps=steps, batch_size=2, lr=lr, lam=lam, loss_fn=_mse, generator=torch.Generator().manual_seed(0)
    )
    return g.weight.detach()[0], p.weight.detach()[0]


def test_prox_centre_is_the_received_model_even_as_the_global_copy_moves() -> None:
    w_t, v0, lr, lam, steps = torch.tensor([1.0, 0.5]), torch.tensor([0.3, -0.2]), 0.1, 0.7, 4
    g, p = _round(w_t.tolist(), v0.tolist(), lam, steps, lr)
    # replay the same batches by hand, once with the fixed centre w^t and once with the moving w_k
    batches = list(minibatches(len(Y), 2, steps, torch.Generator().manual_seed(0)))
    v_fixed, v_moving, w = v0.clone(), v0.clone(), w_t.clone()
    for idx in batches:
        xb, yb = X[idx], Y[idx]
        v_fixed = v_fixed - lr * (_grad(v_fixed, xb, yb) + lam * (v_fixed - w_t))
        v_moving = v_moving - lr * (_grad(v_moving, xb, yb) + lam * (v_moving - w))
        w = w - lr * _grad(w, xb, yb)
    torch.testing.assert_close(p, v_fixed)
    torch.testing.assert_close(g, w)
    assert not torch.allclose(p, v_moving), "the test cannot tell the two centres apart"


def test_lambda_zero_is_local_sgd() -> None:
    _, p = _round([1.0, 0.5], [0.3, -0.2], lam=0.0, steps=5)
    local = _linear([0.3, -0.2])
    for idx in minibatches(len(Y), 2, 5, torch.Generator().manual_seed(0)):
        sgd_step(local, X[idx], Y[idx], 0.1, _mse)
    torch.testing.assert_close(p, local.weight.detach()[0])


def test_large_lambda_keeps_the_personal_model_near_the_global_model() -> None:
    w_t = torch.tensor([4.0, -3.0])  # far from the local least-squares solution (about [0.95, 0.09])
    _, p_free = _round(w_t.tolist(), w_t.tolist(), lam=0.0, steps=60)
    _, p_tied = _round(w_t.tolist(), w_t.tolist(), lam=9.0, steps=60)  # lr * (lam + curvature) < 2: stable
    assert (p_free - w_t).norm() > 3.0  # without the prox term v leaves w^t for the local solution
    assert (p_tied - w_t).norm() < 0.35 * (p_free - w_t).norm()


def test_minibatches_walk_through_the_data_before_repeating() -> None:
    batches = list(minibatches(10, 3, 6, torch.Generator().manual_seed(1)))
    assert [len(b) for b in batches] == [3] * 6
    first_pass = torch.cat(batches[:3])
    assert len(set(first_pass.tolist())) == 9  # no index twice within a pass
    small = list(minibatches(2, 5, 3, torch.Generator().manual_seed(1)))
    assert all(sorted(b.tolist()) == [0, 1] for b in small)  # batch larger than the data: the whole data


def test_evaluate_counts_correct_predictions() -> None:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    correct, _ = evaluate(copy.deepcopy(model), x, torch.tensor([0, 0, 0]), cross_entropy)
    assert correct == 2


def test_the_named_random_streams_keep_the_values_every_result_was_drawn_with() -> None:
    """Renaming is free, renumbering is not: each stream's value seeds every run's draws of that purpose."""
    assert {s.name: s.value for s in Stream} == {
        "BATCHES": 0,
        "LABEL_POISON": 1,
        "UPDATE_ATTACK": 2,
        "DROPOUT": 3,
        "FINETUNE": 4,
        "VALIDATION_SPLIT": 5,
        "EVALUATION": 6,
    }
    state = np.random.SeedSequence([7, 3, 5, 0]).generate_state(1)[0]
    assert round_generator(7, 3, 5, Stream.BATCHES).initial_seed() == int(state)
    assert attack_rng(7, 3, 5).random() == np.random.default_rng([7, 3, 5, 2]).random()
