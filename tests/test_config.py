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


@pytest.mark.parametrize("values,needle", [
    ({"test_size": "nan"}, "--test-size: nan is not a finite number"),
    ({"val_size": "nan"}, "--val-size: nan is not a finite number"),
    ({"train_fraction": "nan"}, "--train-fraction: nan is not a finite number"),
    ({"lr": "nan"}, "--lr: nan is not a finite number"),
    ({"tfidf_c": "nan"}, "--tfidf-c: nan is not a finite number"),
    ({"weight_decay": "inf"}, "--weight-decay: inf is not a finite number"),
    ({"lora_alpha": "-inf"}, "--lora-alpha: -inf is not a finite number"),
    ({"seed": "-1"}, "--seed: -1 is out of range [0, 4294967295]"),
    ({"seed": str(2 ** 32)}, "--seed: 4294967296 is out of range"),
    ({"max_length": "1000"}, "--max-length: 1000 is more than the 512 tokens the minilm backbone reads"),
])
def test_non_finite_numbers_bad_seeds_and_too_long_inputs_are_refused(values, needle):
    with pytest.raises(ConfigError) as e:
        build(TrainConfig, overrides=values)
    assert needle in str(e.value)


def test_every_float_option_is_checked_for_nan():
    floats = [f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)]
    assert floats
    for name in floats:
        with pytest.raises(ConfigError, match="nan is not a finite number"):
            TrainConfig(**{name: float("nan")})


def test_max_length_limit_applies_to_encoders_only():
    assert TrainConfig(max_length=512).max_length == 512
    assert TrainConfig(method="tfidf", max_length=1000).max_length == 1000
    assert TrainConfig(backbone="scratch-small", method="full", max_length=1000).max_length == 1000


def test_embedded_max_length_is_the_checkpoint_s():
    import json

    from clintune.backbones import _minilm_dir
    from clintune.config import EMBEDDED_MAX_LENGTH
    from clintune.errors import BackboneError

    try:
        d = _minilm_dir()
    except BackboneError:
        pytest.skip("the embedded MiniLM package is not installed")
    assert json.loads((d / "config.json").read_text())["max_position_embeddings"] == EMBEDDED_MAX_LENGTH["minilm"]


def test_bad_yaml_values_name_the_file_and_key(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("epochs: 0\nlora-r: 4\n")
    with pytest.raises(ConfigError, match=f"^{y}: epochs: 0 is out of range"):
        TrainConfig.from_yaml(y)
    with pytest.raises(ConfigError, match="^--epochs: 0 is out of range"):     # a flag overriding the file
        build(TrainConfig, yaml_values=read_yaml(y), yaml_source=str(y), overrides={"epochs": "0"})
    assert TrainConfig.from_yaml(y, epochs=2).epochs == 2
    y.write_text("lr: .nan\n")
    with pytest.raises(ConfigError, match=f"^{y}: lr: nan is not a finite number"):
        TrainConfig.from_yaml(y)
    y.write_text("method: tfidf\ntask: multilabel\n")
    with pytest.raises(ConfigError, match=f"^{y}: method: tfidf: classification only"):
        TrainConfig.from_yaml(y)
    y.write_text("label_sep: ''\n")
    with pytest.raises(ConfigError, match=f"^{y}: label_sep: must not be empty"):
        TrainConfig.from_yaml(y)
