"""Each model: output shape on its dataset's input, parameter count as its architecture implies, and one SGD step
lowers the loss on a tiny batch. The SVM objective against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from app.threats.attacks import gaussian_update, scale_update
from app.training.models import MODELS, build_model, get_weights, hinge, objective, predictions, set_weights
from app.training.steps import evaluate, sgd_step


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _dense(n: int, m: int) -> int:
    return n * m + m


# (model, input shape, classes, parameter count worked out from the architecture)
CASES = [
    ("mlp", (1, 8, 8), 10, _dense(64, 64) + _dense(64, 10)),
    ("logreg", (60,), 10, _dense(60, 10)),
    ("svm", (100,), 2, _dense(100, 1)),
    ("cnn_small", (1, 8, 8), 10, _conv(1, 16, 3) + _conv(16, 32, 3) + _dense(32 * 2 * 2, 10)),
    # 28 -> pool 14 -> pool 7 (5x5 convolutions padded to keep the size)
    ("cnn_femnist", (1, 28, 28), 62, _conv(1, 16, 5) + _conv(16, 32, 5) + _dense(32 * 7 * 7, 128) + _dense(128, 62)),
    ("cnn_fmnist", (1, 28, 28), 10, _conv(1, 32, 5) + _conv(32, 64, 5) + _dense(64 * 7 * 7, 1024) + _dense(1024, 10)),
    # 32 -conv3-> 30 -pool-> 15 -conv3-> 13 -pool-> 6 -conv3-> 4
    (
        "cnn_cifar",
        (3, 32, 32),
        10,
        _conv(3, 32, 3) + _conv(32, 64, 3) + _conv(64, 64, 3) + _dense(64 * 4 * 4, 64) + _dense(64, 10),
    ),
    # pooling padded `same` as the official model: 84 -> 42 -> 21 -> 11 -> 6; batch norm adds 2 x 32 per block
    ("cnn_celeba", (3, 84, 84), 2, _conv(3, 32, 3) + 3 * _conv(32, 32, 3) + 4 * 64 + _dense(32 * 6 * 6, 2)),
    ("mean", (1,), 5, 5),  # the point estimate: one vector of the target's dimension
]


def test_every_registry_model_is_covered() -> None:
    assert {c[0] for c in CASES} == set(MODELS)


@pytest.mark.parametrize(("name", "shape", "classes", "params"), CASES, ids=[c[0] for c in CASES])
def test_shape_parameter_count_and_one_step_lowers_the_loss(name: str, shape: tuple, classes: int, params: int) -> None:
    model = build_model(name, shape, classes, seed=0)
    assert sum(p.numel() for p in model.parameters()) == params
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *shape, generator=g)
    y = torch.randn(8, classes, generator=g) if name == "mean" else torch.randint(0, classes, (8,), generator=g)
    out = model(x)
    assert out.shape == ((8, 1) if name == "svm" else (8, classes))
    assert predictions(out).shape == (8,)
    loss_fn = objective(OmegaConf.create({"model": name, "l2": 0.001}))
    model.eval()  # no dropout noise: the comparison is of the same function before and after the step
    with torch.no_grad():
        before = float(loss_fn(model, model(x), y))
    sgd_step(model, x, y, 1e-3, loss_fn)  # a small step: 0.01 overshoots the Glorot-initialised CelebA model here
    with torch.no_grad():
        after = float(loss_fn(model, model(x), y))
    assert after < before


def test_models_are_built_from_the_seed_alone() -> None:
    torch.manual_seed(123)
    a = build_model("cnn_small", (1, 8, 8), 10, seed=5)
    torch.manual_seed(456)
    b = build_model("cnn_small", (1, 8, 8), 10, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_svm_hinge_objective_and_sign_prediction() -> None:
    model = build_model("svm", (2,), 2, seed=0)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.linear.bias.fill_(0.5)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    y = torch.tensor([1, 0, 0])  # +1, -1, -1
    s = torch.tensor([1.5, -1.5, -1.5])
    expected = torch.relu(1 - torch.tensor([1.0, -1.0, -1.0]) * s).mean() + 0.01 * 5.0
    out = model(x)
    torch.testing.assert_close(out[:, 0], s)
    torch.testing.assert_close(hinge(model, out, y, l2=0.01), expected)
    assert predictions(out).tolist() == [1, 0, 0]


def test_svm_refuses_a_multiclass_dataset() -> None:
    with pytest.raises(ValueError, match="model svm is binary"):
        build_model("svm", (10,), 10, seed=0)


@pytest.mark.parametrize(("name", "shape", "classes"), [c[:3] for c in CASES], ids=[c[0] for c in CASES])
def test_what_is_federated_is_the_trainable_parameters_and_no_model_keeps_buffers(name, shape, classes) -> None:
    """The official code exchanges trainable variables only; with no buffers in any model, the parameters are the
    model's whole state, so nothing untrained (BatchNorm running statistics) travels, is attacked or is mixed."""
    model = build_model(name, shape, classes, seed=0)
    assert [tuple(a.shape) for a in get_weights(model)] == [tuple(p.shape) for p in model.parameters()]
    assert [b for b in model.buffers() if b.is_floating_point()] == []


def test_celeba_batch_norm_normalises_by_the_batch_in_evaluation_too() -> None:
    """Official `batch_normalization(training=True)`: an example's output depends on its batch, in eval mode too;
    with running statistics (the old model) eval-mode outputs would be per-example."""
    model = build_model("cnn_celeba", (3, 84, 84), 2, seed=0).eval()
    x = torch.randn(6, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone, together = model(x[:3]), model(x)[:3]
    assert not torch.allclose(alone, together)


def test_femnist_drops_out_after_the_second_pool_as_the_official_model() -> None:
    model = build_model("cnn_femnist", (1, 28, 28), 62, seed=0)
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.25, 0.5]  # keep_prob 0.75 after pool 2, 0.5 after the dense layer
    kinds = [type(m).__name__ for m in model]
    assert kinds.index("Dropout") == kinds.index("Flatten") - 1  # on the pooled maps, before the dense layer


@pytest.mark.parametrize("attack", ["gaussian", "boost"])
def test_a2_and_a3_updates_on_the_celeba_model_never_make_it_nan(attack: str) -> None:
    """A Gaussian (A2) or boosted (A3) update applied to the CelebA model: it evaluates to finite outputs (with
    running statistics in the update, a negative running variance gave NaN)."""
    model = build_model("cnn_celeba", (3, 84, 84), 2, seed=0)
    rng = np.random.default_rng(0)
    w0 = get_weights(model)
    true_update = [rng.normal(0, 0.5, size=w.shape).astype(w.dtype) for w in w0]
    update = gaussian_update(true_update, rng) if attack == "gaussian" else scale_update(true_update, 10.0)
    set_weights(model, [w + u for w, u in zip(w0, update)])
    with torch.no_grad():
        out = model.eval()(torch.rand(4, 3, 84, 84, generator=torch.Generator().manual_seed(1)) * 255)
    assert torch.isfinite(out).all()


def test_a_zero_svm_score_is_never_a_correct_prediction_as_in_the_official_count() -> None:
    """Official: tf.equal(labels, tf.sign(s)) with labels +-1, so sign(0) = 0 matches neither class."""
    out = torch.tensor([[0.0], [0.0], [2.0], [-1.0]])
    assert predictions(out).tolist() == [-1, -1, 1, 0]
    model = build_model("svm", (3,), 2, seed=0)  # zero weights and bias, as the official initialisation
    loss_fn = objective(OmegaConf.create({"model": "svm", "l2": 0.01}))
    correct, _ = evaluate(model, torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]), loss_fn)
    assert correct == 0
