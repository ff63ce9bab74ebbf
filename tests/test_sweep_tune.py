"""`clintune tune`: Optuna trials are runs in runs.db, scored on validation AUROC, resumable, never retrained."""
import pytest

from clintune.cli import main
from clintune.sweep.spec import Point, load_spec, run_id
from clintune.sweep.store import RunStore
from clintune.sweep.tune import trial_config


@pytest.fixture
def spec(tmp_path, tiny_backbone, binary_csv):
    p = tmp_path / "spec.yaml"
    p.write_text(f"""
name: tiny-tune
data: {{data: {binary_csv}}}
settings: {{backbone: {tiny_backbone}, epochs: 1, batch_size: 16, max_length: 32, precision: fp32, seed: 5}}
search:
  trials: 2
  fixed: {{method: lora}}
  lr: [1.0e-3, 1.0e-2]
  lora_r: [2, 4]
  seed: 7
""")
    return p


def study(out):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="tiny-tune-search",
                             storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))


def study_or_create(out):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.create_study(study_name="tiny-tune-search", direction="maximize",
                               storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))


def test_tune_trials_are_runs_and_resume(spec, tmp_path, capsys):
    from optuna.trial import TrialState

    out = tmp_path / "out"
    # A tune that died with one trial running: its run registered but never finished.
    out.mkdir()
    st = study_or_create(out)
    stale = st.ask()
    cfg, label = trial_config(stale, load_spec(spec))
    with RunStore(out / "runs.db") as s:
        s.register([Point(run_id(cfg), cfg, label, "search")], source="search", trial=stale.number)
    stale.set_user_attr("run_id", run_id(cfg))

    assert main(["tune", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 of 2 trials finished" in printed and "best validation auroc" in printed
    st = study(out)
    trials = st.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["clintune_interrupted"]
    assert done[0].params == trials[0].params                       # the interrupted trial's config, run again
    with RunStore(out / "runs.db", create=False) as s:
        runs = {r.id: r for r in s.runs()}
    assert len(runs) == 2 and all(r.source == "search" and r.status == "success" for r in runs.values())
    for t in done:
        r = runs[t.user_attrs["run_id"]]
        assert r.attempts == 1
        assert r.config["val_metric"] == "auroc" and r.config["method"] == "lora"
        assert r.config["lr"] == pytest.approx(t.params["lr"]) and 1e-3 <= r.config["lr"] <= 1e-2
        assert r.config["lora_alpha"] == pytest.approx(r.config["lora_r"] * t.params["lora_alpha_ratio"])
        assert r.config["lora_dropout"] in (0.1, 0.3, 0.5)
        assert t.value == pytest.approx(r.training["best_val_score"])  # objective: validation AUROC of the run
        assert r.training["best_val_score"] <= 1.0

    # Running it again trains nothing; asking for one more trial trains exactly one more run.
    assert main(["tune", str(spec), "--out", str(out)]) == 0
    assert "2 of 2 trials finished" in capsys.readouterr().out
    assert main(["tune", str(spec), "--out", str(out), "--trials", "3"]) == 0
    with RunStore(out / "runs.db", create=False) as s:
        after = {r.id: r for r in s.runs()}
    assert len(after) == 3 and all(r.attempts == 1 for r in after.values())
    assert {k: r.finished for k, r in after.items() if k in runs} == {k: r.finished for k, r in runs.items()}

    # Another search space (or other settings) in the same directory: refused in one line, nothing trained
    # (Optuna could not continue the study with other choices, and its best trial would be the old SPEC's).
    other = tmp_path / "other.yaml"
    other.write_text(spec.read_text().replace("lora_r: [2, 4]", "lora_r: [2, 8]"))
    assert main(["tune", str(other), "--out", str(out)]) == 2
    assert "this sweep was made by another SPEC (spec.yaml, with other data, settings, grid or search than " \
           "other.yaml)" in capsys.readouterr().err
    with RunStore(out / "runs.db", create=False) as s:
        assert len(s.runs()) == 3


def test_tune_needs_a_search_section(tmp_path, capsys):
    p = tmp_path / "spec.yaml"
    p.write_text("data: notes.csv\n")
    assert main(["tune", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "no search: section" in capsys.readouterr().err
