"""`clintune bench | runs | report` end to end on the tiny backbone: every run in a fresh worker process,
recorded once; a failing run is recorded and the sweep goes on; a re-run trains nothing; the report."""
import importlib.util
import re
import sqlite3

import pytest

from clintune.cli import main
from clintune.sweep.store import RunStore

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


def write_spec(d, backbone, data, extra="") -> str:
    p = d / "spec.yaml"
    p.write_text(f"""
name: tiny
data: {{data: {data}}}
settings: {{backbone: {backbone}, epochs: 2, batch_size: 16, max_length: 32, lr: 5.0e-3, precision: fp32}}
grid:
  - method: frozen
  - method: lora
  - backbone: nobody/no-such-model  # a Hub id not in the cache (offline): fails at run time, recorded
    seed: 1
seeds: [1, 2]
{extra}""")
    return str(p)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_backbone, binary_csv):
    d = tmp_path_factory.mktemp("sweep")
    spec = write_spec(d, tiny_backbone, binary_csv)
    out = d / "out"
    argv = ["bench", spec, "--out", str(out), "--jobs", "2"]
    if HAS_MLFLOW:
        argv += ["--mlflow", f"sqlite:///{d / 'mlflow.db'}"]
    code = main(argv)
    return {"dir": d, "spec": spec, "out": out, "code": code}


def rows(out):
    with RunStore(out / "runs.db", create=False) as s:
        return {r.id: r for r in s.runs()}


def test_every_run_recorded_once_in_its_own_process(sweep):
    assert sweep["code"] == 1                                           # one run failed: not a clean sweep
    runs = rows(sweep["out"])
    assert len(runs) == 5
    ok = [r for r in runs.values() if r.status == "success"]
    assert len(ok) == 4 and all(r.attempts == 1 for r in runs.values())
    assert {(r.config["method"], r.config["seed"]) for r in ok} == {("frozen", 1), ("frozen", 2), ("lora", 1),
                                                                     ("lora", 2)}
    pids = {r.worker.split("@")[0] for r in runs.values()}
    assert len(pids) == 5                                               # a fresh process for every run
    with RunStore(sweep["out"] / "runs.db", create=False) as s:
        for r in ok:
            assert r.metrics["f1"] is not None and r.metrics_ci["f1"][0] <= r.metrics["f1"] <= r.metrics_ci["f1"][1]
            assert r.cost["peak_rss_mb"] > 50 and r.cost["trainable_params"] > 0
            assert r.env["threads"] == 1                                # 2 cores / --jobs 2
            assert r.record["config"]["seed"] == r.config["seed"]
            preds = s.predictions(r.id)
            assert len(preds) == r.data["n_test"] and {"row", "gold", "predicted_label"} <= set(preds.columns)
    # runs of the same seed share their test split (paired tests need it)
    by_seed = {}
    for r in ok:
        by_seed.setdefault(r.config["seed"], set()).add(r.test_split_sha256)
    assert all(len(v) == 1 for v in by_seed.values()) and by_seed[1] != by_seed[2]


def test_failed_run_is_recorded_with_its_error(sweep):
    (bad,) = [r for r in rows(sweep["out"]).values() if r.status == "failed"]
    assert bad.error.startswith("BackboneError: backbone 'nobody/no-such-model' cannot be loaded")
    assert bad.record["status"] == "failed" and bad.record["config"]["backbone"] == "nobody/no-such-model"
    assert "\n" not in bad.error


def test_rerun_trains_nothing_and_retry_failed_retrains_only_failures(sweep, capsys):
    before = rows(sweep["out"])
    assert main(["bench", sweep["spec"], "--out", str(sweep["out"])]) == 1  # the failed run is still failed
    out = capsys.readouterr().out
    assert "5 already recorded; 0 to train" in out
    after = rows(sweep["out"])
    assert {k: (r.attempts, r.finished, r.status) for k, r in after.items()} == \
           {k: (r.attempts, r.finished, r.status) for k, r in before.items()}
    assert main(["bench", sweep["spec"], "--out", str(sweep["out"]), "--retry-failed"]) == 1
    assert "1 to train" in capsys.readouterr().out
    again = rows(sweep["out"])
    for k, r in again.items():
        if before[k].status == "failed":
            assert r.attempts == 2 and r.status == "failed"
        else:
            assert (r.attempts, r.finished) == (1, before[k].finished)


def test_runs_lists_the_sweep(sweep, capsys):
    assert main(["runs", str(sweep["out"])]) == 0
    out = capsys.readouterr().out
    assert out.count("success") >= 4 and "failed" in out and "BackboneError" in out
    assert "5 runs: 4 success, 1 failed" in out
    assert main(["runs", str(sweep["out"]), "--status", "failed", "--json"]) == 0
    assert capsys.readouterr().out.count('"status": "failed"') == 1


def test_report(sweep, capsys):
    assert main(["report", str(sweep["out"]), "--bootstrap", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "report written to" in printed
    page = (sweep["out"] / "report.html").read_text()
    for needle in ("Results", "Seed aggregates", "Comparisons with the baseline", "p (bootstrap)", "McNemar p",
                   "p (Holm)", "Composite efficiency", "Pareto fronts", "Failed and unfinished runs", "Environment",
                   "(baseline)", "BackboneError"):
        assert needle in page, needle
    assert re.search(r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", page)           # F1 with its CI
    assert re.search(r"[+-]\d\.\d{4} \[-?\d\.\d{4}, -?\d\.\d{4}\]", page)   # delta F1 with its CI
    assert page.count('<img alt="') == page.count('src="data:image/png;base64,') >= 4
    assert "<script" not in page and "http://" not in page and "https://" not in page  # offline, self-contained
    md = (sweep["out"] / "report.md").read_text()
    assert "| config | run | configuration | F1 [95% CI]" in md and "report_files/f1_vs_time.png" in md
    assert (sweep["out"] / "report_files" / "f1_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_bad_baseline_is_one_line(sweep, capsys):
    assert main(["report", str(sweep["out"]), "--baseline", "no-such-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clintune: error: --baseline 'no-such-config' matches no") and err.count("\n") == 1


def test_bench_refuses_changed_data(sweep, tmp_path, capsys, tiny_backbone):
    import shutil

    d = tmp_path
    data = d / "notes.csv"
    shutil.copy(rows(sweep["out"]).popitem()[1].config["data"], data)
    spec = write_spec(d, tiny_backbone, str(data))
    out = d / "out"
    with RunStore(out / "runs.db") as s:
        s.set_meta(f"data:{data}", "0" * 64)                            # as if the sweep began on other content
    assert main(["bench", spec, "--out", str(out)]) == 2
    assert "the file changed since this sweep started" in capsys.readouterr().err


def test_bench_refuses_another_spec_on_the_same_out(sweep, capsys):
    """A SPEC with another setting (or a trimmed grid) would mix its results with the first SPEC's: refused in one
    line before anything is registered or trained."""
    before = rows(sweep["out"])
    text = open(sweep["spec"]).read()
    for name, changed in (("more.yaml", text.replace("lr: 5.0e-3", "lr: 5.0e-3, weight_decay: 0.1")),
                          ("fewer.yaml", text.replace("seeds: [1, 2]", "seeds: [1]"))):
        other = sweep["dir"] / name
        other.write_text(changed)
        assert main(["bench", str(other), "--out", str(sweep["out"])]) == 2
        err = capsys.readouterr().err
        assert err == (f"clintune: error: {sweep['out']}: this sweep was made by another SPEC (spec.yaml, with other "
                       f"data, settings, grid or search than {name}); its results would mix with this one's. Use "
                       "another --out\n")
    assert {k: (r.status, r.attempts) for k, r in rows(sweep["out"]).items()} == \
        {k: (r.status, r.attempts) for k, r in before.items()}


def test_bad_inputs_are_refused_before_anything_runs(tmp_path, tiny_backbone, capsys):
    spec = write_spec(tmp_path, tiny_backbone, "nofile.csv")
    for argv in (["bench", spec, "--dry-run"], ["bench", spec, "--out", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"clintune: error: spec.yaml: data: data: {tmp_path / 'nofile.csv'}: file not found\n"
    assert not (tmp_path / "out").exists()
    spec = write_spec(tmp_path, "./nomodel", "builtin:icd10-circulatory")
    assert main(["bench", spec, "--dry-run"]) == 2
    assert capsys.readouterr().err == (f"clintune: error: spec.yaml: settings: backbone: {tmp_path / 'nomodel'}: "
                                       "directory not found\n")
    spec = write_spec(tmp_path, tiny_backbone, "builtin:icd10-circulatory")
    assert main(["bench", spec, "--out", str(tmp_path / "out"), "--address", "x"]) == 2
    assert capsys.readouterr().err == "clintune: error: --address is for --executor ray\n"
    assert not (tmp_path / "out").exists()
    assert main(["bench", spec, "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in listed[:-1]] == ["C1", "C2", "C3", "C1", "C2"]   # C numbers as in the report


def test_val_data_content_is_checked_too(tmp_path):
    from clintune.errors import ConfigError
    from clintune.sweep.runner import check_data

    val = tmp_path / "val.csv"
    val.write_text("text,label\na,0\n")
    with RunStore(tmp_path / "runs.db") as s:
        check_data(s, {"val_data": str(val)})
        check_data(s, {"val_data": str(val)})                          # unchanged: fine
        val.write_text("text,label\nb,1\n")
        with pytest.raises(ConfigError, match="the file changed since this sweep started"):
            check_data(s, {"val_data": str(val)})


@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow is not installed (pip install 'clintune[mlflow]')")
def test_runs_logged_to_mlflow(sweep):
    db = sweep["dir"] / "mlflow.db"
    con = sqlite3.connect(db)
    tags = con.execute("SELECT value FROM tags WHERE key = 'clintune.run_id'").fetchall()
    assert {t[0] for t in tags} == set(rows(sweep["out"]))
