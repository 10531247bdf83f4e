"""Run configuration: keys, validation, and the Flower app defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedforget.config import RunConfig, load_config, parse_assignments
from fedforget.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_every_key_with_the_dataclass_default() -> None:
    # Prepare: `flwr run --run-config` accepts only keys declared in pyproject.toml.
    with (ROOT / "pyproject.toml").open("rb") as fh:
        declared = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    # Execute
    defaults = RunConfig().to_mapping()
    # Assert: the app's own keys, and fedforget's operational keys under "fedforget."
    own = {k: v for k, v in declared.items() if k != "fedforget"}
    assert own == defaults
    from fedforget.settings import RunSettings
    assert set(declared["fedforget"]) == {f.replace("_", "-") for f in
                                          RunSettings.__dataclass_fields__}


def test_unknown_key_names_the_key_and_the_allowed_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'num-round'.*num-rounds"):
        RunConfig.from_mapping({"num-round": 3})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model", "resnet",
         r"model = 'resnet' is not allowed; expected one of 'cnn', 'logreg', 'mlp'"),
        ("codec", "int8", r"codec = 'int8' is not allowed"),
        ("num-rounds", 0, r"num-rounds = 0 is out of range; expected >= 1"),
        ("learning-rate", 0.0, r"learning-rate = 0.0 is out of range; expected > 0"),
        ("sample-fraction", 1.5, r"sample-fraction = 1.5 is out of range; expected > 0 and <= 1"),
        ("dirichlet-alpha", float("nan"), r"dirichlet-alpha = nan is out of range"),
        ("local-epochs", 1.5, r"local-epochs = 1.5: expected an integer"),
        ("history-fsync", "maybe", r"history-fsync = 'maybe': expected true or false"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({key: value})


def test_sample_count_larger_than_the_federation_is_refused() -> None:
    with pytest.raises(ConfigError, match="sample-count = 11 is larger than num-clients = 10"):
        RunConfig.from_mapping({"num-clients": 10, "sample-count": 11})


def test_clients_per_round_from_fraction_or_count() -> None:
    # 10 clients * 0.3 = 3; an explicit count wins over the fraction.
    assert RunConfig(num_clients=10, sample_fraction=0.3).clients_per_round() == 3
    assert RunConfig(num_clients=10, sample_fraction=0.3, sample_count=4).clients_per_round() == 4
    assert RunConfig(num_clients=3, sample_fraction=0.1).clients_per_round() == 1


def test_load_config_reads_flat_toml_and_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('num-rounds = 4\nmodel = "logreg"\n')
    cfg = load_config(path, **{"num-rounds": 6})
    assert (cfg.num_rounds, cfg.model) == (6, "logreg")


def test_load_config_refuses_tables_and_bad_toml(tmp_path: Path) -> None:
    tables = tmp_path / "t.toml"
    tables.write_text("[data]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"table \[data\] is not supported"):
        load_config(tables)
    broken = tmp_path / "b.toml"
    broken.write_text("num-rounds = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_parse_assignments_uses_toml_values_and_bare_strings() -> None:
    assert parse_assignments(["a=1", "b=0.5", "c=true", "d=mlp"]) == {
        "a": 1, "b": 0.5, "c": True, "d": "mlp"
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_assignments(["novalue"])


def test_shipped_simulation_configs_are_valid() -> None:
    # Run configs are flat; experiment files (with an [experiment] table) are checked by
    # tests/test_experiments.py.
    configs = [p for p in sorted((ROOT / "simulations").glob("*.toml"))
               if "[experiment]" not in p.read_text()]
    assert [p.name for p in configs] == ["demo.toml"]
    for path in configs:
        load_config(path)


def test_a_backdoor_client_outside_the_federation_is_refused() -> None:
    with pytest.raises(ConfigError, match="backdoor-clients names 'client-999', which is not a "
                                          "client of this run; expected ids "
                                          "client-000..client-009"):
        RunConfig.from_mapping({"num-clients": 10, "backdoor-clients": "client-999"})
