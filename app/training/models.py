"""Model registry: each model with the objective F(model; batch) it is trained on. Models are built from the seed, so
every process builds the same initial weights.

Architectures of the paper (official Ditto code and LEAF): `svm` for Vehicle (linear, hinge loss + l2 * ||W||^2,
labels +-1 stored as 0/1), `cnn_femnist`, `cnn_fmnist`, `cnn_celeba`; plus `mlp`, `logreg`, `cnn_small` (8x8 digits)
`cnn_cifar` (a small CIFAR-10 CNN) and `mean` (a point estimate, for the theory experiment).

Two options a dataset config sets for its model (`dataset_model`): `init` (`official`: the initialisation of the
official TF1 model, for the three paper CNNs built from `tf.layers` with default initializers: Glorot-uniform
kernels and zero biases; `pytorch`: PyTorch's defaults; the other models are the same under both) and
`dropout_at_eval` (the official FEMNIST model applies `tf.nn.dropout` unconditionally, so it scores, validates and
computes q's losses with dropout on: litian96/ditto flearn/models/femnist/cnn.py lines 54 and 57).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from app.errors import UserError

# F(model; x, y) given the model's output on x: (model, output, labels) -> scalar loss
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(model: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def hinge(model: nn.Module, out: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Linear SVM objective of the official Vehicle model: mean(max(0, 1 - s * y)) + l2 * ||W||^2, y in {-1, +1}
    (stored as 0/1), s the score; the bias is not penalised."""
    sign = 2.0 * y.to(out.dtype) - 1.0
    return torch.relu(1.0 - sign * out[:, 0]).mean() + l2 * model.linear.weight.pow(2).sum()


def half_mse(model: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Point estimation: 1/2 ||out - y||^2 averaged over the batch (minimised at the sample mean)."""
    return 0.5 * (out - y).pow(2).sum(dim=1).mean()


def predictions(out: torch.Tensor) -> torch.Tensor:
    """Class indices from a model's output: argmax over classes, or the sign of a single score (SVM: s > 0 is 1,
    s < 0 is 0). A score of exactly 0 predicts -1, which matches no label: the official model counts
    `labels == sign(s)` with labels +-1 (litian96/ditto flearn/models/vehicle/svm.py line 46), so a zero score is
    never correct (the all-zero initial SVM scores 0 %, not the share of the -1 class)."""
    if out.shape[1] > 1:
        return out.argmax(dim=1)
    score = out[:, 0]
    return torch.where(score > 0, 1, torch.where(score < 0, 0, -1))


class ModelError(UserError, ValueError):
    """A model that cannot serve the dataset; the message names the key and the fix."""


class LinearSVM(nn.Module):
    """One score per example; class 1 where it is positive."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)  # as the official model (tf.zeros)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class AlwaysDropout(nn.Dropout):
    """Dropout in evaluation too, as `tf.nn.dropout` in a TF1 graph (no training flag): `dropout_at_eval`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=True, inplace=self.inplace)


class Mean(nn.Module):
    """A point estimate: one learnable vector, the prediction for every input (the theory experiment's model)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v.expand(x.shape[0], -1)


Shape = tuple[int, ...]


def _flat(shape: Shape) -> int:
    return math.prod(shape)


def _mlp(shape: Shape, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(shape), 64), nn.ReLU(), nn.Linear(64, num_classes))


def _logreg(shape: Shape, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(shape), num_classes))


def _svm(shape: Shape, num_classes: int) -> nn.Module:
    if num_classes != 2:
        raise ModelError(f"model svm is binary; this dataset has {num_classes} classes: use dataset.model=logreg")
    return LinearSVM(_flat(shape))


def _conv_stack(shape: Shape, body: nn.Sequential, head: Callable[[int], list[nn.Module]]) -> nn.Module:
    """`body` then a flatten and `head(size of the flattened body output)`, sized by a dry run on `shape`."""
    with torch.no_grad():
        size = body(torch.zeros(1, *shape)).numel()
    return nn.Sequential(*body, nn.Flatten(), *head(size))


def _cnn_small(shape: Shape, num_classes: int) -> nn.Module:
    body = nn.Sequential(
        nn.Conv2d(shape[0], 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    return _conv_stack(shape, body, lambda n: [nn.Linear(n, num_classes)])


def _cnn_femnist(shape: Shape, num_classes: int) -> nn.Module:
    """conv 5x5 16 -> pool -> conv 5x5 32 -> pool -> dropout 0.25 -> dense 128 -> dropout 0.5 -> classes, as the
    official model (litian96/ditto flearn/models/femnist/cnn.py lines 40-58: keep_prob 0.75 after the second pool,
    0.5 after the dense layer)."""
    body = nn.Sequential(
        nn.Conv2d(shape[0], 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
    )
    return _conv_stack(
        shape, body, lambda n: [nn.Linear(n, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_classes)]
    )


def _cnn_fmnist(shape: Shape, num_classes: int) -> nn.Module:
    """conv 5x5 32 -> pool -> conv 5x5 64 -> pool -> dense 1024 -> classes."""
    body = nn.Sequential(
        nn.Conv2d(shape[0], 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    return _conv_stack(shape, body, lambda n: [nn.Linear(n, 1024), nn.ReLU(), nn.Linear(1024, num_classes)])


def _cnn_cifar(shape: Shape, num_classes: int) -> nn.Module:
    """3 x conv 3x3 (32, 64, 64) with two pools -> dense 64 -> classes."""
    body = nn.Sequential(
        nn.Conv2d(shape[0], 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
    )
    return _conv_stack(shape, body, lambda n: [nn.Linear(n, 64), nn.ReLU(), nn.Linear(64, num_classes)])


def _cnn_celeba(shape: Shape, num_classes: int) -> nn.Module:
    """4 x [conv 3x3 32, batch norm, max pool 2, ReLU] -> dense -> classes, as the official (LEAF) model
    (litian96/ditto flearn/models/celeba/cnn.py lines 43-49). Its batch norm runs with `training=True` in training
    and evaluation alike, so it normalises by the batch's own statistics and keeps no running statistics: here
    `track_running_stats=False`, and the model has no buffers (nothing outside the trainable parameters to exchange,
    attack or mix). Its epsilon is TF's (`tf.layers.batch_normalization` default 1e-3; PyTorch's is 1e-5). Its
    pooling pads `same`: ceil_mode, 84 -> 42 -> 21 -> 11 -> 6, a 6x6x32 flatten."""
    layers: list[nn.Module] = []
    channels = shape[0]
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.BatchNorm2d(32, eps=TF_BATCH_NORM_EPS, track_running_stats=False),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.ReLU(),
        ]
        channels = 32
    return _conv_stack(shape, nn.Sequential(*layers), lambda n: [nn.Linear(n, num_classes)])


def _mean(shape: Shape, num_outputs: int) -> nn.Module:
    return Mean(num_outputs)


TF_BATCH_NORM_EPS = 1e-3  # tf.layers.batch_normalization's default epsilon
INITS = ("official", "pytorch")


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[Shape, int], nn.Module]  # (input shape, classes or, for regression, output dimension)
    objective: str = "cross_entropy"  # "cross_entropy" | "hinge" | "half_mse"
    tf_layers: bool = False  # the official model is built from tf.layers with default initializers


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(_mlp),
    "logreg": ModelSpec(_logreg),
    "svm": ModelSpec(_svm, "hinge"),
    "cnn_small": ModelSpec(_cnn_small),
    "cnn_femnist": ModelSpec(_cnn_femnist, tf_layers=True),
    "cnn_fmnist": ModelSpec(_cnn_fmnist, tf_layers=True),
    "cnn_cifar": ModelSpec(_cnn_cifar),
    "cnn_celeba": ModelSpec(_cnn_celeba, tf_layers=True),
    "mean": ModelSpec(_mean, "half_mse"),
}


def objective(dataset: DictConfig) -> Objective:
    """The training objective of the dataset's model (the SVM's l2 coefficient is `dataset.l2`)."""
    if MODELS[dataset.model].objective == "hinge":
        return partial(hinge, l2=float(dataset.get("l2", 0.0)))
    if MODELS[dataset.model].objective == "half_mse":
        return half_mse
    return cross_entropy


def _tf_layers_init(model: nn.Module) -> None:
    """TF1's `tf.layers.conv2d` / `dense` defaults: Glorot-uniform kernels (fans as PyTorch counts them for
    `xavier_uniform_`: in and out channels times the kernel's area) and zero biases; batch norm starts at 1 and 0
    in both."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(
    name: str, input_shape: Shape, num_classes: int, seed: int, *, init: str = "official", dropout_at_eval: bool = False
) -> nn.Module:
    """The registry model `name` for inputs of `input_shape` (no batch axis), initialised from `seed` without touching
    the global torch RNG: with `init=official` as the official model (module docstring), else PyTorch's defaults;
    `dropout_at_eval` keeps its dropout on in evaluation."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
        model = MODELS[name].build(tuple(input_shape), num_classes)
        if init == "official" and MODELS[name].tf_layers:
            _tf_layers_init(model)
    if dropout_at_eval:
        for parent in list(model.modules()):
            for child_name, child in parent.named_children():
                if type(child) is nn.Dropout:
                    setattr(parent, child_name, AlwaysDropout(child.p))
    return model


def dataset_model(dataset: DictConfig, input_shape: Shape, num_classes: int, seed: int) -> nn.Module:
    """`build_model` with the dataset config's model and its options (`init`, default official; `dropout_at_eval`,
    default false)."""
    return build_model(
        str(dataset.model),
        input_shape,
        num_classes,
        seed,
        init=str(dataset.get("init", "official")),
        dropout_at_eval=bool(dataset.get("dropout_at_eval", False)),
    )


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's trainable parameters, in registration order: what is federated. The official code exchanges
    trainable variables only (`tf.trainable_variables()`, e.g. litian96/ditto flearn/models/vehicle/svm.py lines
    49-59); buffers, where a model has any, stay on the device."""
    return [p.detach().cpu().numpy().copy() for p in model.parameters()]


def set_weights(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load arrays produced by `get_weights` (of a model of the same architecture)."""
    targets = list(model.parameters())
    if len(targets) != len(arrays):
        raise ValueError(f"got {len(arrays)} arrays for a model with {len(targets)} trainable parameters")
    with torch.no_grad():
        for t, a in zip(targets, arrays):
            t.copy_(torch.from_numpy(np.asarray(a)).reshape(t.shape))
