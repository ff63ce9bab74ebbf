"""The config class is the single source of flags, YAML keys and the saved config."""
import argparse
import dataclasses

import pytest

from clintune.config import TrainConfig, add_arguments, build, read_yaml
from clintune.errors import ConfigError


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p, TrainConfig)
    return vars(p.parse_args(argv))


def test_every_field_is_a_flag_and_only_given_flags_are_set():
    p = argparse.ArgumentParser()
    add_arguments(p, TrainConfig)
    flags = {a.dest for a in p._actions if a.dest != "help"}
    assert flags == {f.name for f in dataclasses.fields(TrainConfig)}
    assert parse(["--lora-r", "4", "--no-progress", "--target-modules", "query,value"]) == {
        "lora_r": "4", "progress": False, "target_modules": "query,value"}


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("epochs: 5\nmethod: ia3\nlora-r: 16\ntarget_modules: [key, value]\n")
    cfg = build(TrainConfig, yaml_values=read_yaml(y), yaml_source=str(y), overrides={"epochs": "3"})
    assert (cfg.epochs, cfg.method, cfg.lora_r, cfg.target_modules) == (3, "ia3", 16, ["key", "value"])


def test_saved_config_round_trips():
    cfg = TrainConfig(method="full", lr=1e-4, target_modules=["query"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("values,needle", [
    ({"epochs": "three"}, "epochs: expected an integer"),
    ({"method": "adapterhub"}, "--method: 'adapterhub' is not one of"),
    ({"test_size": 1.5}, "--test-size: 1.5 is out of range"),
    ({"lora_dropout": 1.0}, "--lora-dropout"),
    ({"progress": "maybe"}, "expected true or false"),
    ({"head": "nope"}, "--head: 'nope'"),
    ({"text_col": ""}, "--text-col: must not be empty"),
])
def test_bad_values_name_the_option(values, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        build(TrainConfig, overrides=values)


def test_unknown_yaml_key_and_bad_yaml(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("epocks: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'epocks'.*epochs"):
        TrainConfig.from_yaml(y)
    y.write_text("epochs: [3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(y)
    with pytest.raises(ConfigError, match="config file not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_default_learning_rate_depends_on_method():
    assert TrainConfig(method="full").learning_rate == 5e-5
    assert TrainConfig(method="frozen").learning_rate == 1e-3
    assert TrainConfig(method="lora", lr=1e-4).learning_rate == 1e-4
