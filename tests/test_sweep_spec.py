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


def test_val_data_is_resolved_like_test_data(tmp_path):
    spec = spec_of(tmp_path, "data: {data: notes.csv, test_data: t.csv, val_data: v.csv}\n")
    (p,) = spec.points()
    assert (p.config["test_data"], p.config["val_data"]) == (str(tmp_path / "t.csv"), str(tmp_path / "v.csv"))


@pytest.mark.parametrize("extra,needle", [
    ("report: {metric: nope}", "spec.yaml: report: metric: unknown metric 'nope'"),
    ("report: {metric: f1_macr}", "unknown metric 'f1_macr' (did you mean 'f1_macro'?)"),
    ("grid: {head: [linear, adapter]}\nreport: {baseline: C3}", "spec.yaml: report: baseline: C3 is not a "
                                                                "configuration of the grid (C1..C2;"),
])
def test_report_section_is_checked_at_load(tmp_path, extra, needle):
    with pytest.raises(ConfigError) as e:
        spec_of(tmp_path, BASE + extra)
    assert needle in str(e.value) and "\n" not in str(e.value)
    spec_of(tmp_path, BASE + "grid: {head: [linear, adapter]}\nreport: {baseline: C2, metric: auroc}")  # fine


def test_inputs_are_checked_before_training(tmp_path, tiny_backbone):
    (tmp_path / "notes.csv").write_text("text,label\na,0\n")
    (tmp_path / "empty").mkdir()
    ok = f"data: notes.csv\nsettings: {{backbone: {tiny_backbone}}}\n"
    spec_of(tmp_path, ok).check_inputs()
    spec_of(tmp_path, ok + "grid: {backbone: [minilm, org/some-hub-model]}").check_inputs()  # resolved by the run
    for text, needle in [
        ("data: nofile.csv\n", f"spec.yaml: data: data: {tmp_path / 'nofile.csv'}: file not found"),
        ("data: {data: notes.csv, val_data: v.csv}\n", f"spec.yaml: data: val_data: {tmp_path / 'v.csv'}: file "
                                                       "not found"),
        ("data: builtin:nope\n", "spec.yaml: data: data: 'builtin:nope' is not a built-in dataset (known: "
                                 "builtin:icd10-circulatory"),
        ("data: notes.csv\nsettings: {backbone: ./nomodel}\n", f"spec.yaml: settings: backbone: "
                                                                f"{tmp_path / 'nomodel'}: directory not found"),
        (ok + "grid: [{method: frozen}, {backbone: ./empty}]", "spec.yaml: grid[1]: backbone: "
                                                               f"{tmp_path / 'empty'}: not a Hugging Face model"),
    ]:
        with pytest.raises(ConfigError) as e:
            spec_of(tmp_path, text).check_inputs()
        assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)


def test_options_a_method_ignores_do_not_multiply_its_runs(tmp_path):
    spec = spec_of(tmp_path, BASE + "grid: {method: [frozen, lora], lora_r: [4, 16]}\nseeds: [1, 2]")
    points = spec.points()
    assert len(points) == 2 * (1 + 2)                  # per seed: one frozen run, two LoRA ranks
    assert sorted((p.config["method"], p.config["lora_r"]) for p in points if p.config["seed"] == 1) == \
        [("frozen", 8), ("lora", 4), ("lora", 16)]     # frozen keeps lora_r's default (it does not use it)


def test_digest_is_what_the_spec_computes(tmp_path):
    search = "search: {trials: 3, fixed: {method: lora}, lora_r: [4, 8]}\n"
    base = BASE + "grid: {head: [linear, adapter]}\nseeds: [1, 2]\n"
    d = spec_of(tmp_path, base + search).digest()
    same = [  # block order, runtime-only options, the number of trials and report: do not change the digest
        BASE + "grid: [{head: adapter}, {head: linear}]\nseeds: [1, 2]\n" + search,
        base.replace("epochs: 1", "epochs: 1, threads: 1") + search,
        base + search.replace("trials: 3", "trials: 9") + "report: {metric: auroc}\n",
    ]
    other = [base.replace("epochs: 1", "epochs: 1, lr: 0.01") + search,      # a setting added
             base.replace("seeds: [1, 2]", "seeds: [1]") + search,           # the grid trimmed
             base + search.replace("[4, 8]", "[4, 16]"),                     # other search choices
             base + search + "name: other\n"]                                # another study name
    assert all(spec_of(tmp_path, t).digest() == d for t in same)
    assert len({d} | {spec_of(tmp_path, t).digest() for t in other}) == 1 + len(other)
