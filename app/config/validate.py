"""Every key of the config checked against what the code can run: the one module that sees every registry (datasets,
models, methods, attacks, aggregators, sampling), so it stands above them all."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from app.config.keys import ConfigError
from app.data.federation import load_federation
from app.data.loaders import DATASETS, FAKE_IMAGE_SHAPES
from app.data.partition import PARTITIONERS
from app.methods import METHODS
from app.threats.attacks import ATTACKS, aggregator_f
from app.training.compute import accelerator_problem
from app.training.models import INITS, MODELS, dataset_model
from strategies.rules.registry import AGGREGATORS, check_aggregator
from strategies.rules.selection import SMALL_N
from strategies.sampling import SAMPLING


def _int(lo: int, hi: float = float("inf")) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _real(
    lo: float, hi: float = float("inf"), *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if not isinstance(v, Real) or isinstance(v, bool):
            return False
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return ok


def _host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
    value = OmegaConf.select(cfg, key, default="<missing>")
    if value == "<missing>" or not ok(value):
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed; allowed: {allowed}. Set it as {key}=VALUE.")


def _choice(cfg: DictConfig, key: str, options: Mapping[str, Any] | Sequence[str], group: str | None = None) -> None:
    names = sorted(options)
    fix = f" (choose with {group}=NAME)" if group else ""
    _check(cfg, key, lambda v: v in names, f"one of {', '.join(names)}{fix}")


def _lam(v: Any) -> bool:
    """method.lam: a number >= 0, auto, or (method=ditto) a non-empty list of distinct numbers >= 0."""
    if isinstance(v, Sequence) and not isinstance(v, str):
        return len(v) > 0 and all(_real(0)(x) for x in v) and len({float(x) for x in v}) == len(v)
    return v == "auto" or _real(0)(v)


def validate(cfg: DictConfig, *, client: bool = False) -> None:
    """Raise ConfigError naming the first key whose value cannot be used. The server's rule is tried once on a
    stack of zeros (`check_aggregator`) except in a client process (`client=True`): a client never runs, nor
    compiles, the server's aggregator."""
    _check(cfg, "seed", _int(0), "an integer >= 0")
    _check(cfg, "num_clients", _int(2), "an integer >= 2")
    _check(cfg, "num_rounds", _int(1), "an integer >= 1")
    _check(cfg, "clients_per_round", _int(1, cfg.num_clients), f"an integer from 1 to num_clients={cfg.num_clients}")
    _check(cfg, "sampling", lambda v: v in SAMPLING, " or ".join(SAMPLING))
    _check(cfg, "local_steps", _int(1), "an integer >= 1")
    _check(cfg, "batch_size", _int(1), "an integer >= 1")
    _check(cfg, "lr", _real(0, lo_open=True), "a number > 0")
    _check(cfg, "eval_every", _int(1), "an integer >= 1")
    _check(cfg, "personal_state", lambda v: v in ("memory", "disk"), "memory or disk")
    _check(cfg, "state_dir", lambda v: v is None or isinstance(v, str), "null or a folder")
    _check(cfg, "checkpoint_every", _int(0), "an integer >= 0 (0: no checkpoint)")
    _check(cfg, "resume", lambda v: isinstance(v, bool), "true or false")
    _check(cfg, "max_update_norm", lambda v: v is None or _real(0, lo_open=True)(v), "null (no bound) or a number > 0")
    _check(
        cfg,
        "ray_address",
        lambda v: v is None or (isinstance(v, str) and (v == "auto" or _host_port(v))),
        "null (a private Ray instance), auto, or the HOST:PORT of an existing Ray cluster's head",
    )
    _check(cfg, "round_timeout", lambda v: v is None or _real(0, lo_open=True)(v), "null (wait for all) or seconds > 0")
    _check(
        cfg,
        "device_keys",
        lambda v: v is None or (isinstance(v, str) and Path(v).is_absolute()),
        "null (a node is the device it says) or the absolute path of a JSON file of device keys",
    )
    _check(cfg, "client_num_gpus", _real(0), "a number >= 0 (0.25: four actors per GPU; 0: no GPU share)")
    if cfg.client_num_gpus > 0 and cfg.ray_address is None and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'client_num_gpus' = {cfg.client_num_gpus!r} is not allowed here: this machine "
            "has no CUDA device for Ray to share (the actors would wait forever). Set client_num_gpus=0."
        )
    accelerator_error = accelerator_problem(OmegaConf.select(cfg, "accelerator", default=None))
    _check(cfg, "accelerator", lambda v: accelerator_error is None, accelerator_error or "")
    _check(cfg, "deterministic", lambda v: isinstance(v, bool), "true or false")
    _check(cfg, "verbose", lambda v: isinstance(v, bool), "true or false")
    _check(cfg, "skip_done", lambda v: isinstance(v, bool), "true or false")

    _choice(cfg, "dataset.name", DATASETS, "dataset")
    _choice(cfg, "dataset.model", MODELS)
    _check(cfg, "dataset.test_fraction", _real(0, 1, lo_open=True, hi_open=True), "a number in (0, 1)")
    synthetic = cfg.dataset.name == "synthetic"
    dataset_options = {
        "partitioner": (lambda v: v in PARTITIONERS, f"one of {', '.join(PARTITIONERS)}"),
        "alpha": (_real(0), "a number >= 0") if synthetic else (_real(0, lo_open=True), "a number > 0"),
        "beta": (_real(0), "a number >= 0"),
        "classes_per_client": (_int(1), "an integer >= 1"),
        "stratified_split": (lambda v: isinstance(v, bool), "true or false"),
        "num_features": (_int(1), "an integer >= 1"),
        "num_classes": (_int(2), "an integer >= 2"),
        "l2": (_real(0), "a number >= 0"),
        "image_size": (_int(8), "an integer >= 8"),
        "path": (lambda v: v is None or isinstance(v, str), "null (the hub) or a folder"),
        "data_dir": (lambda v: v is None or isinstance(v, str), "a folder"),
        "partition_seed": (lambda v: v is None or _int(0)(v), "null (the run's seed) or an integer >= 0"),
        "preprocess": (lambda v: v in ("none", "standardize"), "none or standardize"),
        "pixels": (lambda v: v in ("raw", "unit"), "raw (0-255) or unit ([0, 1])"),
        "like": (lambda v: v in FAKE_IMAGE_SHAPES, f"one of {', '.join(FAKE_IMAGE_SHAPES)} (the image shape)"),
        "num_samples": (_int(2), "an integer >= 2"),
        "noise": (_real(0), "a number >= 0"),
        "attackers": (lambda v: v in ("variance", "shift"), "variance (the paper's) or shift"),
        "init": (lambda v: v in INITS, " or ".join(INITS) + " (official: as the official TF model)"),
        "dropout_at_eval": (lambda v: isinstance(v, bool), "true (official FEMNIST: scored with dropout on) or false"),
    }
    for option, (ok, allowed) in dataset_options.items():
        if option in cfg.dataset:
            _check(cfg, f"dataset.{option}", ok, allowed)
    if cfg.dataset.name == "gaussian_mean":
        for option in ("dim", "samples", "test_samples"):
            _check(cfg, f"dataset.{option}", _int(1), "an integer >= 1")
        for option in ("sigma", "tau", "tau_a"):
            _check(cfg, f"dataset.{option}", _real(0), "a number >= 0")
        _check(cfg, "dataset.num_attackers", _int(0, cfg.num_clients - 1), "an integer from 0 to num_clients - 1")
        _check(cfg, "dataset.model", lambda v: v == "mean", "mean (the point estimate)")
        if cfg.attack.name != "none":
            raise ConfigError(
                f"config key 'attack' = {cfg.attack.name!r} is not allowed with dataset=gaussian_mean; "
                "allowed: none (its attackers are in its data: dataset.num_attackers, dataset.tau_a). "
                "Set it as attack=none."
            )
    else:
        _check(cfg, "dataset.model", lambda v: v != "mean", "a classifier (mean is for dataset=gaussian_mean)")

    _choice(cfg, "attack.name", ATTACKS, "attack")
    _check(cfg, "attack.fraction", _real(0, 1, hi_open=True), "a number in [0, 1)")
    if "corrupt_labels" in cfg.attack:
        _check(cfg, "attack.corrupt_labels", lambda v: isinstance(v, bool), "true or false")
    if "boost" in cfg.attack:
        _check(
            cfg,
            "attack.boost",
            lambda v: v is None or _real(0, lo_open=True)(v),
            "null (= clients_per_round) or a number > 0",
        )
    if "scale" in cfg.attack:
        _check(cfg, "attack.scale", _real(0, lo_open=True), "a number > 0")
    if "z" in cfg.attack:
        _check(cfg, "attack.z", lambda v: v is None or _real(0)(v), "null (z_max from n and f) or a number >= 0")
    if "epsilon" in cfg.attack:
        _check(cfg, "attack.epsilon", _real(0, lo_open=True), "a number > 0")

    _choice(cfg, "aggregator.name", AGGREGATORS, "aggregator")
    _check(cfg, "aggregator.f", lambda v: v is None or _int(0)(v), "null (derived from the attack) or an integer >= 0")
    optional = {
        "weighted": (lambda v: isinstance(v, bool), "true or false"),
        "beta": (_real(0, 0.5, hi_open=True), "a number in [0, 0.5)"),
        "m": (lambda v: v is None or _int(1)(v), "null (n - f) or an integer >= 1"),
        "inner": (lambda v: v in AGGREGATORS and v != "norm_clip", "a registry rule other than norm_clip"),
        "max_iter": (_int(1), "an integer >= 1"),
        "iters": (_int(1), "an integer >= 1"),
        "eps": (_real(0, lo_open=True), "a number > 0"),
        "tol": (_real(0), "a number >= 0"),
        "tau": (lambda v: v is None or _real(0, lo_open=True)(v), "null (median distance) or a number > 0"),
        "small_n": (lambda v: v in SMALL_N, " or ".join(SMALL_N)),
    }
    for option, (ok, allowed) in optional.items():
        if option in cfg.aggregator:
            _check(cfg, f"aggregator.{option}", ok, allowed)
    try:
        if not client:
            check_aggregator(cfg.aggregator, cfg.clients_per_round, aggregator_f(cfg))
    except ValueError as err:
        raise ConfigError(f"config key 'aggregator' = {cfg.aggregator.name!r} cannot run here: {err}") from None

    _choice(cfg, "method.name", METHODS, "method")
    method_options = {
        "lam": (
            _lam,
            "a number >= 0 (0: local training; large: close to the global model), auto, or (method=ditto) "
            "a list of distinct numbers >= 0 such as [0.1,1]: one personal model per lam on the same global "
            "run. auto runs on its own: it holds out validation data from the global model's training too",
        ),
        "strong_attack": (lambda v: isinstance(v, bool), "true or false"),
        "val_fraction": (_real(0, 1, lo_open=True, hi_open=True), "a number in (0, 1)"),
        "val_split": (lambda v: v in ("last", "random"), "last (official) or random"),
        "steps": (lambda v: v is None or _int(0)(v), "null (the official budget) or an integer >= 0"),
        "finetune_iters": (_int(0), "an integer >= 0"),
        "decay_factor": (_real(0, lo_open=True), "a number > 0 (fine-tuning's learning rate is lr * decay_factor)"),
        "min_validation": (_int(1), "an integer >= 1 (1: the official code, which always searches)"),
        "q": (_real(0), "a number >= 0 (0: the plain mean)"),
        "alpha": (_real(0, 1), "a number in [0, 1]"),
    }
    for option, (ok, allowed) in method_options.items():
        if option in cfg.method:
            _check(cfg, f"method.{option}", ok, allowed)
    lam = cfg.method.get("lam")
    if lam is not None and not METHODS[cfg.method.name].takes_lam:
        takes = ", ".join(name for name, method in METHODS.items() if method.takes_lam)
        raise ConfigError(
            f"config key 'method.lam' = {lam!r} is not allowed with method={cfg.method.name}: it trains with no lam "
            f"(only method={takes} read it). Remove method.lam."
        )
    if isinstance(lam, Sequence) and not isinstance(lam, str) and not METHODS[cfg.method.name].lam_lists:
        takes = ", ".join(name for name, method in METHODS.items() if method.lam_lists)
        raise ConfigError(
            f"config key 'method.lam' = {list(lam)!r} is not allowed with method={cfg.method.name}: a "
            f"lam list trains one personal model per lam, which only method={takes} does. Use it, or a single lam."
        )
    if lam == "auto" and not METHODS[cfg.method.name].lam_auto:
        takes = ", ".join(name for name, method in METHODS.items() if method.lam_auto)
        raise ConfigError(
            f"config key 'method.lam' = 'auto' is not allowed with method={cfg.method.name}: lam auto chooses a "
            f"personal model's lam per step, which only method={takes} trains. Set a number >= 0."
        )
    if cfg.resume and cfg.personal_state != "disk" and METHODS[cfg.method.name].keeps_personal:
        raise ConfigError(
            "config key 'resume' = True is not allowed with personal_state='memory': personal models "
            "in memory do not outlive the run. Set personal_state=disk (before the run to resume)."
        )


def check_data(cfg: DictConfig) -> None:
    """Load the run's federation (cached for the run) and build its model once: bad or missing data (DataError,
    DataUnavailable) and a model that cannot serve the data (ModelError) stop here, before any process starts."""
    federation = load_federation(cfg.dataset, cfg.num_clients, cfg.seed)
    dataset_model(cfg.dataset, federation.input_shape, federation.num_classes, cfg.seed)


def check_flwr_run(cfg: DictConfig) -> None:
    """Refuse the keys that only the Hydra entry point can apply: under `flwr run .` Flower starts the engine
    before the app sees its config."""
    if cfg.ray_address is not None:
        raise ConfigError(
            f"config key 'ray_address' = {cfg.ray_address!r} is not allowed with flwr run: Flower "
            "starts its simulation engine before the app reads its config. Run ditto-simulate "
            "ray_address=... instead, or leave ray_address=null."
        )
    if cfg.client_num_gpus > 0:
        raise ConfigError(
            f"config key 'client_num_gpus' = {cfg.client_num_gpus!r} is not allowed with flwr run: "
            "Flower sizes its actors before the app reads its config. Pass --federation-config "
            f'"client-resources-num-gpus={cfg.client_num_gpus}" to flwr run instead, or leave '
            "client_num_gpus=0."
        )
