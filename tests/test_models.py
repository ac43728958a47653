"""Each model: output shape on its dataset's input, parameter count as its architecture implies, and one SGD step
lowers the loss on a tiny batch. The SVM objective against its formula."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from app.ditto import sgd_step
from app.models import MODELS, build_model, hinge, objective, predictions


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
    ("cnn_cifar", (3, 32, 32), 10, _conv(3, 32, 3) + _conv(32, 64, 3) + _conv(64, 64, 3) + _dense(64 * 4 * 4, 64)
     + _dense(64, 10)),
    # 84 -> 42 -> 21 -> 10 -> 5; batch norm adds 2 x 32 parameters per block
    ("cnn_celeba", (3, 84, 84), 2, _conv(3, 32, 3) + 3 * _conv(32, 32, 3) + 4 * 64 + _dense(32 * 5 * 5, 2)),
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
    sgd_step(model, x, y, 0.01, loss_fn)
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
