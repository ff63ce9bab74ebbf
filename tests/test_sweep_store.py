"""runs.db: round trip, exactly-once state changes, the sweep lock, recovering a dead sweep's results."""
import json
import multiprocessing
import sqlite3

import pandas as pd
import pytest

from clintune.errors import ConfigError
from clintune.sweep.executors import Job, workdir_name
from clintune.sweep.runner import recover
from clintune.sweep.spec import Point, run_id
from clintune.sweep.store import RunStore, predictions_to_bytes, sweep_lock


def point(i: int) -> Point:
    cfg = {"data": "x.csv", "backbone": "bb", "seed": i, "method": "lora"}
    return Point(run_id(cfg), cfg, f"run {i}")


def record(cfg, status="success", f1=0.5):
    rec = {"config": cfg, "status": status, "metrics": {"f1": f1, "auroc": 0.7}, "metrics_ci": {"f1": [0.4, 0.6]},
           "cost": {"train_seconds": 1.5, "peak_rss_mb": 300.0}, "data": {"test_split_sha256": "abc", "n_test": 3},
           "training": {"best_val_score": 0.8}, "env": {"python": "3.11"}, "created": "now"}
    if status == "failed":
        rec["error"] = "BackboneError: nope"
    return rec


PREDS = pd.DataFrame({"row": [3, 1, 2], "gold": [1, 0, 1], "predicted_label": [1, 1, 0],
                      "prob_0": [0.1, 0.6, 0.7], "prob_1": [0.9, 0.4, 0.3]})


def test_round_trip_and_exactly_once(tmp_path):
    db = tmp_path / "runs.db"
    p1, p2 = point(1), point(2)
    with RunStore(db) as s:
        assert s.register([p1, p2]) == 2
        assert s.register([p1, p2, point(3)]) == 1                     # by id: existing rows untouched
        assert [r.status for r in s.runs()] == ["pending"] * 3
        assert s.start(p1.id, "1@host") == 1
        assert s.finish(p1.id, record(p1.config), predictions_to_bytes(PREDS), 3)
        assert not s.finish(p1.id, record(p1.config, f1=0.1), predictions_to_bytes(PREDS), 3)  # never twice
        with pytest.raises(ConfigError, match="already succeeded"):
            s.start(p1.id, "2@host")                                    # a finished run is never retrained
        assert s.start(p2.id, "1@host") == 1
        assert s.finish(p2.id, record(p2.config, "failed"))
    with RunStore(db, create=False) as s:                               # reopened: everything persisted
        r1, r2, r3 = s.runs()
        assert (r1.status, r1.attempts, r1.metrics["f1"], r1.cost["train_seconds"]) == ("success", 1, 0.5, 1.5)
        assert r1.record["training"]["best_val_score"] == 0.8 and r1.config == p1.config
        assert r1.test_split_sha256 == "abc" and r1.finished and r1.started and r1.worker == "1@host"
        pd.testing.assert_frame_equal(s.predictions(p1.id), PREDS)
        assert (r2.status, r2.error) == ("failed", "BackboneError: nope")
        assert s.predictions(p2.id) is None and r3.status == "pending"
        assert s.counts() == {"pending": 1, "running": 0, "success": 1, "failed": 1}
        # a failed run may be retried (--retry-failed): one more attempt
        assert s.start(p2.id, "3@host") == 2
        s.release(p2.id, "interrupted")
        assert s.get(p2.id).status == "pending" and s.get(p2.id).attempts == 2
    rows = sqlite3.connect(db).execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM runs").fetchone()
    assert rows == (3, 3)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_success_needs_predictions(tmp_path):
    with RunStore(tmp_path / "runs.db") as s:
        p = point(1)
        s.register([p])
        s.start(p.id, "w")
        with pytest.raises(ValueError):
            s.finish(p.id, record(p.config))
        assert s.get(p.id).status == "running"                         # nothing half-written


def test_not_a_store(tmp_path):
    bad = tmp_path / "runs.db"
    bad.write_text("not sqlite at all " * 100)
    with pytest.raises(ConfigError, match="not a clintune results store"):
        RunStore(bad)
    with pytest.raises(ConfigError, match="no results store here"):
        RunStore(tmp_path / "missing" / "runs.db", create=False)


def _hold_lock(d, ready, release):
    with sweep_lock(d):
        ready.set()
        release.wait(30)


def test_one_sweep_per_directory(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    proc.start()
    try:
        assert ready.wait(60)
        with pytest.raises(ConfigError, match=f"a sweep \\(pid {proc.pid}\\) is already running"):
            with sweep_lock(tmp_path):
                pass
    finally:
        release.set()
        proc.join(60)
    with sweep_lock(tmp_path):                                          # free again once the holder is gone
        pass


def test_recover_records_a_finished_workers_result(tmp_path):
    """A sweep killed after its worker wrote the outcome but before recording it: recorded, not retrained."""
    p, q = point(1), point(2)
    with RunStore(tmp_path / "runs.db") as s:
        s.register([p, q])
        attempt = s.start(p.id, "w")
        s.start(q.id, "w")
        wd = tmp_path / "work" / workdir_name(p.id, attempt)
        wd.mkdir(parents=True)
        PREDS.to_parquet(wd / "predictions.parquet", index=False)
        (wd / "outcome.json").write_text(json.dumps({"id": p.id, "attempt": attempt, "record": record(p.config),
                                                     "predictions": "predictions.parquet", "n_predictions": 3}))
        assert recover(s, tmp_path) == 1
        assert s.get(p.id).status == "success" and s.get(p.id).attempts == 1
        assert s.get(q.id).status == "running"                          # no result: trained again by the sweep
        assert not any((tmp_path / "work").iterdir())
    assert Job(p.id, p.config, 1).attempt == 1


class _FakeRay:
    """Just what RayExecutor.poll uses: wait() hands back every ref, get() raises for a lost task."""

    class TaskLost(Exception):
        pass

    def __init__(self, results):
        self.results = results

    def wait(self, refs, num_returns, timeout):
        return list(refs), []

    def get(self, ref):
        res = self.results[ref]
        if isinstance(res, Exception):
            raise res
        return res


def test_lost_or_interrupted_ray_tasks_go_back_to_pending(tmp_path):
    """A Ray task that gives no result (node lost, cancelled, its worker interrupted on the node) is not the run's
    failure: the run goes back to pending, the others are recorded as usual, and the sweep goes on."""
    from clintune.sweep.executors import RayExecutor
    from clintune.sweep.runner import drive

    p_lost, p_int, p_ok = point(1), point(2), point(3)
    ex = RayExecutor.__new__(RayExecutor)                    # no Ray needed: poll() with a stand-in
    ex.jobs, ex.logs = 3, tmp_path / "logs"
    ex.ray = _FakeRay({"r1": _FakeRay.TaskLost("node died"),
                       "r2": {"record": {"status": "failed", "error": "worker exited"}, "interrupted": True},
                       "r3": {"record": record(p_ok.config), "predictions": predictions_to_bytes(PREDS),
                              "n_predictions": 3}})
    queue = [("r1", p_lost), ("r2", p_int), ("r3", p_ok)]
    with RunStore(tmp_path / "runs.db") as s:
        s.register([p_lost, p_int, p_ok])

        def next_job():
            if not queue:
                return None
            ref, p = queue.pop(0)
            ex.refs[ref] = job = Job(p.id, p.config, s.start(p.id, "w"))
            return job

        ex.refs = {}
        ex.submit = lambda job: "ray"
        assert drive(s, ex, next_job) == 1                     # one result recorded; the other two not results
        assert s.get(p_ok.id).status == "success"
        lost, interrupted = s.get(p_lost.id), s.get(p_int.id)
        assert (lost.status, lost.attempts) == ("pending", 1)
        assert lost.error == "Ray task lost: TaskLost: node died; put back to pending"
        assert (interrupted.status, interrupted.error) == ("pending", "Ray worker interrupted on its node; put back "
                                                                      "to pending")


def test_worker_outcome_is_written_whole(tmp_path):
    from clintune.sweep.worker import write_durable

    write_durable(tmp_path / "outcome.json", b'{"id": "x"}\n')
    assert [f.name for f in tmp_path.iterdir()] == ["outcome.json"]      # no temporary file left behind
    assert json.loads((tmp_path / "outcome.json").read_text()) == {"id": "x"}


def test_check_spec_records_the_digest_and_refuses_another(tmp_path):
    from clintune.sweep.runner import check_spec
    from clintune.sweep.spec import Spec

    a = Spec.from_dict({"data": "x.csv", "grid": {"head": ["linear", "adapter"]}}, source="a.yaml")
    b = Spec.from_dict({"data": "x.csv", "grid": {"head": ["linear"]}}, source="b.yaml")
    with RunStore(tmp_path / "new" / "runs.db") as s:
        check_spec(s, a)
        check_spec(s, a)                                                 # the same SPEC again: fine
        assert s.get_meta("spec_digest") == a.digest() and s.get_meta("spec_source") == "a.yaml"
        with pytest.raises(ConfigError, match=r"made by another SPEC \(a\.yaml, with other .* than b\.yaml\)"):
            check_spec(s, b)
    # a store from before digests: accepted when its grid runs are all this SPEC's, refused otherwise
    with RunStore(tmp_path / "old" / "runs.db") as s:
        s.register(a.points())
        with pytest.raises(ConfigError, match=r"made by another SPEC \(with other"):
            check_spec(s, b)
        check_spec(s, a)
        assert s.get_meta("spec_digest") == a.digest()
