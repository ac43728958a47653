"""The config tree: groups mirror the registries, and bad keys or values stop with an error naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from app.config.compose import compose_config
from app.config.keys import ConfigError, current_names
from app.data.loaders import DATASETS
from app.methods import METHODS
from app.paths import CONF_DIR
from app.runners.simulate import finished
from app.threats.attacks import ATTACKS
from strategies.rules.registry import AGGREGATORS


@pytest.mark.parametrize(
    ("group", "registry"),
    [("dataset", DATASETS), ("attack", ATTACKS), ("aggregator", AGGREGATORS), ("method", METHODS)],
)
def test_config_groups_mirror_the_registries(group: str, registry: dict) -> None:
    files = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    assert files == set(registry)
    for name in files:
        extra = ["attack=none"] if (group, name) == ("dataset", "gaussian_mean") else []  # attackers in its data
        assert compose_config([f"{group}={name}", "aggregator.f=0", *extra])[group].name == name  # bulyan: 4f + 3


def test_default_experiment_is_digits_a1_half_malicious_ditto_lambda_one() -> None:
    cfg = compose_config()
    assert (cfg.dataset.name, cfg.attack.name, cfg.attack.fraction, cfg.method.name, cfg.method.lam) == (
        "digits",
        "label_poison",
        0.5,
        "ditto",
        1.0,
    )


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("clients_per_round=50", "clients_per_round", "from 1 to num_clients=20"),
        ("lr=-0.1", "lr", "a number > 0"),
        ("num_rounds=0", "num_rounds", "an integer >= 1"),
        ("attack.fraction=1.5", "attack.fraction", "[0, 1)"),
        ("method.lam=-1", "method.lam", "a number >= 0"),
        ("aggregator.weighted=maybe", "aggregator.weighted", "true or false"),
        ("dataset.partitioner=random", "dataset.partitioner", "dirichlet, iid, pathological"),
        ("dataset.model=resnet", "dataset.model", "cnn_small, logreg, mean, mlp, svm"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override: str, key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert f"'{key}'" in str(err.value) and allowed in str(err.value)


def test_an_aggregator_that_cannot_run_is_refused_at_configuration_time() -> None:
    with pytest.raises(ConfigError, match="bulyan needs n >= 4f \\+ 3.*clients_per_round >= 11"):
        compose_config(["aggregator=bulyan"])  # 5 per round, f = int(5 * 10 / 20) = 2
    assert compose_config(["aggregator=bulyan", "aggregator.f=0"]).aggregator.f == 0
    with pytest.raises(ConfigError, match="'aggregator.beta'"):
        compose_config(["aggregator=trimmed_mean", "aggregator.beta=0.5"])
    with pytest.raises(ConfigError, match="'aggregator.inner'"):
        compose_config(["aggregator=norm_clip", "aggregator.inner=norm_clip"])


def test_attack_none_has_no_attackers_whatever_the_fraction() -> None:
    from app.threats.attacks import attackers

    assert attackers(compose_config(["attack=none", "attack.fraction=0.3"])) == frozenset()
    assert len(attackers(compose_config(["attack=label_poison", "attack.fraction=0.3"]))) == 6


def test_unknown_group_option_lists_the_available_ones() -> None:
    with pytest.raises(HydraException) as err:
        compose_config(["attack=backdoor"])
    assert "backdoor" in str(err.value) and "label_poison" in str(err.value) and "gaussian_update" in str(err.value)


def test_unknown_key_is_refused() -> None:
    with pytest.raises(HydraException, match="num_client"):
        compose_config(["num_client=5"])


def test_gaussian_mean_refuses_a_configured_attack() -> None:
    with pytest.raises(ConfigError, match="Set it as attack=none"):
        compose_config(["dataset=gaussian_mean"])


def test_skip_done_reuses_a_finished_run_of_the_same_config_only(tmp_path: Path) -> None:
    cfg = compose_config(["skip_done=true"])
    assert finished(tmp_path, cfg) is None  # nothing there
    record = {"config": OmegaConf.to_container(compose_config(["verbose=true"]), resolve=True), "final": {"x": 1}}
    (tmp_path / "results.json").write_text(json.dumps(record))
    assert finished(tmp_path, cfg) == {"x": 1}  # how it was executed does not matter
    assert finished(tmp_path, compose_config(["skip_done=true", "seed=1"])) is None  # what it computes does
    assert finished(tmp_path, compose_config(["skip_done=true", "method.lam=0.5"])) is None
    # a key that one side lacks counts as null there: a record from before a key existed, or after one was dropped
    record["config"]["another_key"] = None
    (tmp_path / "results.json").write_text(json.dumps(record))
    assert finished(tmp_path, cfg) == {"x": 1}
    record["config"]["another_key"] = 3
    (tmp_path / "results.json").write_text(json.dumps(record))
    assert finished(tmp_path, cfg) is None


def test_a_run_recorded_before_a_key_was_renamed_is_the_same_config(tmp_path: Path) -> None:
    """`device` became `accelerator`: a finished job of an existing sweep is not run again, and the report files
    its rows under the current name."""
    config = OmegaConf.to_container(compose_config([]), resolve=True)
    config["device"] = config.pop("accelerator")
    (tmp_path / "results.json").write_text(json.dumps({"config": config, "final": {"x": 1}}))
    assert finished(tmp_path, compose_config(["skip_done=true"])) == {"x": 1}
    assert finished(tmp_path, compose_config(["skip_done=true", "accelerator=cpu"])) is None, "a changed value counts"
    assert current_names({"device": "cpu", "seed": 0}) == {"accelerator": "cpu", "seed": 0}


def test_lam_is_refused_for_methods_that_train_without_it() -> None:
    """local trains its personal model with lam 0, global/qffl/tilted/apfl have no lam: an added +method.lam would
    be silently ignored or change local's meaning."""
    for method in ("local", "global", "apfl", "qffl"):
        with pytest.raises(ConfigError, match=f"'method.lam'.*method={method}.*Remove method.lam"):
            compose_config([f"method={method}", "+method.lam=0.5"])
    assert compose_config(["method=finetune", "method.lam=0"]).method.lam == 0
