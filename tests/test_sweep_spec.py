"""The sweep SPEC: validation errors name the key in one line; grid expansion; stable run ids."""
from pathlib import Path

import pytest
import yaml

from clintune.errors import ConfigError
from clintune.sweep.spec import RUNTIME_ONLY, Spec, config_key, describe, load_spec, run_id

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def spec_of(tmp_path, text: str) -> Spec:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return load_spec(p)


BASE = """
data: {data: notes.csv}
settings: {backbone: ./bb, epochs: 1}
"""

BAD = [
    ("gird: {head: [linear]}", "spec.yaml: unknown key 'gird' (did you mean 'grid'?)"),
    ("grid: {heads: [linear]}", "spec.yaml: grid: unknown option 'heads' (did you mean 'head'?)"),
    ("grid: {head: [linear, nohead]}", "spec.yaml: grid: head: 'nohead' is not one of"),
    ("grid: [{method: lora}, {lora_r: [8, 0]}]", "spec.yaml: grid[1]: lora_r: 0 is out of range"),
    ("grid: {lora_r: [8, many]}", "spec.yaml: grid: lora_r: expected an integer, got 'many'"),
    ("grid: {head: []}", "spec.yaml: grid: head: an empty list gives no runs"),
    ("grid: {out: [a, b]}", "spec.yaml: grid: out is set by the sweep itself"),
    ("grid: {text_col: [a, b]}", "spec.yaml: grid: text_col is a data option; put it under data:"),
    ("seeds: [1, two]", "spec.yaml: seeds: seed: expected an integer, got 'two'"),
    ("train_fractions: [0.5, 1.5]", "spec.yaml: train_fractions: train_fraction: 1.5 is out of range"),
    ("search: {trials: 0}", "spec.yaml: search: trials: expected a positive integer, got 0"),
    ("search: {lr: [0.01, 0.001]}", "spec.yaml: search: lr: expected 0 < low < high <= 1"),
    ("search: {lora_dropout: [0.1, 1.5]}", "spec.yaml: search: lora_dropout: lora_dropout: 1.5 is out of range"),
    ("report: {baselines: x}", "spec.yaml: report: unknown key 'baselines' (did you mean 'baseline'?)"),
]


@pytest.mark.parametrize("extra,needle", BAD)
def test_bad_spec_is_one_line_naming_the_key(tmp_path, extra, needle):
    with pytest.raises(ConfigError) as e:
        spec_of(tmp_path, BASE + extra)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_bad_sections(tmp_path):
    for text, needle in [("settings: {epochs: 1}", "spec.yaml: data: missing"),
                         ("data: {data: x.csv, epochs: 2}", "data: epochs is not a data option"),
                         ("data: {data: x.csv}\nsettings: {text_col: t}", "settings: text_col is a data option"),
                         ("data: {data: x.csv}\nsettings: {epochs: 0}", "spec.yaml: settings: epochs: 0 is out of range"),
                         ("data: {data: x.csv}\nsettings: [1, 2]", "spec.yaml: settings: expected a mapping"),
                         ("data: {data: x.csv, val_size: 0}\nsearch: {trials: 2}", "search: the search is scored on the "
                                                                                    "validation split")]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            spec_of(tmp_path, text)


def test_grid_expansion_blocks_axes_and_order(tmp_path):
    spec = spec_of(tmp_path, BASE + """
grid:
  - method: frozen
    head: [linear, adapter]
  - method: lora
    lora_r: [4, 16]
    train_fraction: 0.5
seeds: [3, 1]
train_fractions: [0.25, 0.5]
""")
    points = spec.points()
    # block 1: 2 heads x 2 fractions; block 2: 2 ranks x 1 fraction (pinned); x 2 seeds
    assert len(points) == (2 * 2 + 2 * 1) * 2
    assert len({p.id for p in points}) == len(points)
    assert [p.config["seed"] for p in points] == [3] * 6 + [1] * 6            # seeds outermost, in SPEC order
    lora = [p for p in points if p.config["method"] == "lora"]
    assert {p.config["train_fraction"] for p in lora} == {0.5}
    assert {p.config["lora_r"] for p in lora} == {4, 16}
    first = points[0].config
    assert first["data"] == str(tmp_path / "notes.csv")                       # relative to the SPEC file
    assert first["backbone"] == str(tmp_path / "bb")
    assert first["out"] is None and first["progress"] is False
    # labels: only what varies; LoRA options only on LoRA runs
    assert points[0].label == "frozen / linear / train_fraction=0.25 / seed=3"
    assert "lora_r=16" in lora[1].label and "lora_r" not in points[1].label


def test_duplicate_points_run_once(tmp_path):
    spec = spec_of(tmp_path, BASE + "grid: [{head: linear}, {head: [linear, adapter]}]")
    assert len(spec.points()) == 2


def test_run_id_is_stable_and_ignores_runtime_fields(tmp_path):
    a = spec_of(tmp_path, BASE + "grid: {head: [linear, adapter]}\nseeds: [1]").points()
    b = spec_of(tmp_path, BASE + "grid: {head: [linear, adapter]}\nseeds: [1]\nsettings: {backbone: ./bb, epochs: 1, "
                                 "threads: 1, cache: false}").points()
    assert [p.id for p in a] == [p.id for p in b]                             # threads/cache: runtime only
    assert set(RUNTIME_ONLY) >= {"out", "threads", "cache_dir", "progress"}
    cfg = dict(a[0].config)
    assert run_id(cfg) == a[0].id
    assert run_id({**cfg, "out": "/x", "overwrite": True}) == a[0].id
    assert run_id({**cfg, "lr": 0.01}) != a[0].id
    assert run_id({**cfg, "seed": 2}) != a[0].id
    assert config_key({**cfg, "seed": 2}) == config_key(cfg)                  # seeds share a configuration
    # the id does not depend on key order or on the process (it is a content hash)
    assert run_id(dict(reversed(list(cfg.items())))) == a[0].id
    assert len(a[0].id) == 64 and int(a[0].id, 16) >= 0


def test_data_given_as_a_file_name(tmp_path):
    spec = spec_of(tmp_path, "data: builtin:icd10-circulatory\n")
    (p,) = spec.points()
    assert p.config["data"] == "builtin:icd10-circulatory"
    assert describe(p.config, []) == "minilm / lora / mlp"


@pytest.mark.parametrize("name", ["quick.yaml", "seed_grid.yaml"])
def test_shipped_examples_validate(name):
    spec = load_spec(EXAMPLES / name)
    points = spec.points()
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    assert len(points) > 10
    assert {p.config["seed"] for p in points} == set(raw["seeds"])
    if name == "seed_grid.yaml":
        combos = {(p.config["method"], p.config["head"]) for p in points}
        for head in ("linear", "adapter", "lightweight", "tinyattention", "grn"):
            assert ("full", head) in combos and ("frozen", head) in combos
        assert {"lora", "ia3"} <= {p.config["method"] for p in points}
        assert {"scratch-small", "scratch-base"} <= {p.config["backbone"] for p in points}
        assert spec.search is not None and spec.search.metric == "auroc"
