"""The resumable sweep: register every grid point in runs.db, train what is not finished, record each result.

``bench(spec, out)``, after checking that the SPEC's data files and backbone directories exist:

1. takes ``DIR/.lock`` (one sweep per DIR) and opens ``DIR/runs.db``;
2. checks that DIR was made by this SPEC (:func:`check_spec`: another SPEC's results would mix with
   this one's) and that the data files still have the content the sweep started with;
3. registers the grid (``INSERT OR IGNORE`` by run id: points already there keep their state);
4. recovers runs left ``running`` by a sweep that died after its worker had written the result (the
   result is recorded, not retrained); every other ``running`` row is trained again;
5. trains each ``pending`` run (``failed`` ones too with ``retry_failed``) through the executor, at most
   ``jobs`` at a time, recording each result in one transaction as soon as it arrives;
6. on Ctrl-C stops the workers and puts their runs back to ``pending``.

A finished (``success`` or ``failed``) run is never trained again, so running the same command after a
crash, a kill or Ctrl-C continues where the sweep stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ClintuneError, ConfigError
from .executors import Job, Outcome, make_executor, workdir_name
from .spec import DATA_FILES, Point, Spec
from .store import DB_NAME, Run, RunStore, sweep_lock

log = logging.getLogger("clintune")


class SweepInterrupted(ClintuneError):
    """Ctrl-C: the sweep stopped cleanly; running it again continues."""

    exit_code = 130


@dataclass
class SweepSummary:
    total: int
    trained: int
    recovered: int
    counts: dict


def default_threads(jobs: int) -> int:
    """Threads for each of ``jobs`` runs at a time: the cores this process may use (its affinity and any
    cgroup CPU limit, :func:`clintune.runtime.usable_cpus`) shared out, at least one each."""
    from ..runtime import usable_cpus

    return max(1, usable_cpus() // max(1, jobs))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_spec(store: RunStore, spec: Spec) -> None:
    """Refuse to continue a sweep with another SPEC (its results would mix with this one's).

    The first ``bench``/``tune`` on a directory records :meth:`Spec.digest` (the set of grid run ids and the
    search); a later one must have the same digest. Only ``search: trials`` (how many trials to finish),
    ``report:`` and runtime-only options (``threads``, ``cache``...) may change. A store from before digests
    were kept is accepted if every grid run it holds is one of this SPEC's.
    """
    digest = spec.digest()
    seen = store.get_meta("spec_digest")
    if seen is None:
        ids = {p.id for p in spec.points()}
        if any(r.id not in ids for r in store.runs(source="grid")):
            seen = "legacy"
        else:
            store.set_meta("spec_digest", digest)
            store.set_meta("spec_source", spec.source)
            return
    if seen != digest:
        made_by = store.get_meta("spec_source")
        made_by = f"{made_by}, " if made_by else ""
        raise ConfigError(f"{store.path.parent}: this sweep was made by another SPEC ({made_by}with other data, "
                          f"settings, grid or search than {spec.source}); its results would mix with this one's. "
                          "Use another --out")


def check_data(store: RunStore, data: dict) -> None:
    """Refuse to continue a sweep whose data files changed since it started (results would mix)."""
    for key in DATA_FILES:
        value = data.get(key)
        if not value or str(value).startswith("builtin:") or not Path(value).is_file():
            continue
        digest = _file_sha256(Path(value))
        seen = store.get_meta(f"data:{value}")
        if seen is None:
            store.set_meta(f"data:{value}", digest)
        elif seen != digest:
            raise ConfigError(f"{value}: the file changed since this sweep started in {store.path.parent} "
                              "(its results would mix two versions of the data); use another --out")


def format_outcome(i: int, n: int, run: Run) -> str:
    head = f"[{i}/{n}] {run.short_id} {run.label}"
    if run.status == "success":
        m, c = run.metrics or {}, run.cost or {}
        bits = [f"{k} {m[k]:.4f}" for k in ("f1", "auroc") if isinstance(m.get(k), (int, float))]
        if c.get("wall_seconds") is not None:
            bits.append(f"{c['wall_seconds']:.1f} s")
        return f"{head}: success  " + "  ".join(bits)
    return f"{head}: FAILED  {run.error or ''}"


def drive(store: RunStore, executor, next_job: Callable[[], Job | None],
          on_done: Callable[[Job, Run], None] | None = None) -> int:
    """Keep up to ``executor.jobs`` runs in flight until ``next_job`` has no more; return runs finished.

    Each result is recorded in runs.db (one transaction) before the next run is started. Ctrl-C stops
    the workers, puts their runs back to pending and raises :class:`SweepInterrupted`. A run whose remote
    task was lost (``Outcome.lost``) goes back to pending and the others go on.
    """
    finished = 0
    exhausted = False
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a scheduler, `kill`) stops the sweep as cleanly as Ctrl-C does
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            while not exhausted and executor.active < executor.jobs:
                job = next_job()
                if job is None:
                    exhausted = True
                    break
                worker = executor.submit(job)
                store.set_worker(job.id, worker)
            if not executor.active:
                break
            for oc in executor.poll(0.5):
                if oc.interrupted:
                    # Its worker got Ctrl-C (or SIGTERM): not a result. Ctrl-C reaches the whole process
                    # group, so stop the sweep even if our own KeyboardInterrupt has not been raised (yet).
                    store.release(oc.job.id, "interrupted")
                    executor.discard(oc)
                    raise KeyboardInterrupt
                if oc.lost:
                    # a remote task that gave no result (node lost, cancelled): not the run's failure, so it is
                    # trained again by the next bench, as an interrupted local run is
                    store.release(oc.job.id, f"{oc.lost}; put back to pending")
                    executor.discard(oc)
                    continue
                record_outcome(store, oc)
                executor.discard(oc)
                finished += 1
                if on_done is not None:
                    on_done(oc.job, store.get(oc.job.id))
    except KeyboardInterrupt:
        stopped = executor.stop()
        for job in stopped:
            store.release(job.id, "interrupted")
        raise SweepInterrupted(f"interrupted; {len(stopped)} run(s) in flight put back to pending. Run the same "
                               "command again to continue") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return finished


def record_outcome(store: RunStore, oc: Outcome) -> bool:
    rec = oc.record
    if rec.get("status") == "success" and oc.predictions is None:
        rec = {**rec, "status": "failed", "error": "worker returned no test predictions"}
    return store.finish(oc.job.id, rec, oc.predictions if rec.get("status") == "success" else None,
                        oc.n_predictions)


def recover(store: RunStore, out: Path) -> int:
    """Record results that workers of a dead sweep wrote but the sweep did not record; tidy work/."""
    from .executors import collect

    work = out / "work"
    n = 0
    for run in store.runs(status="running"):
        wd = work / workdir_name(run.id, run.attempts)
        if (wd / "outcome.json").is_file():
            oc = collect(Job(run.id, run.config, run.attempts, run.label), wd, 0)
            if record_outcome(store, oc):
                n += 1
    if work.is_dir():
        for d in work.iterdir():
            shutil.rmtree(d, ignore_errors=True)
    return n


class Sweep:
    """A sweep directory: the lock, runs.db, the executor and the optional MLflow tracker."""

    def __init__(self, out: str | Path, *, executor: str = "local", jobs: int = 1, address: str | None = None,
                 mlflow: str | None = None, experiment: str = "clintune", echo: Callable[[str], None] = print):
        if jobs < 1:
            raise ConfigError(f"--jobs: {jobs} is out of range [1, inf]")
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out}: exists and is not a directory")
        self.kind, self.jobs, self.address = executor, jobs, address
        self.mlflow_uri, self.experiment = mlflow, experiment
        self.echo = echo
        if executor not in ("local", "ray"):
            raise ConfigError(f"--executor: '{executor}' is not one of local, ray")
        if address and executor != "ray":
            raise ConfigError("--address is for --executor ray")

    def __enter__(self) -> "Sweep":
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = sweep_lock(self.out)
        self._lock.__enter__()
        try:
            self.store = RunStore(self.out / DB_NAME)
            self.tracker = None
            if self.mlflow_uri:
                from .tracking import MlflowTracker

                self.tracker = MlflowTracker(self.mlflow_uri, self.experiment)
            self.executor = None
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.executor is not None:
                self.executor.close()
            self.store.close()
        finally:
            self._lock.__exit__(None, None, None)

    def ensure_executor(self):
        if self.executor is None:
            self.executor = make_executor(self.kind, self.out, self.jobs, self.address)
        return self.executor

    def job_for(self, point: Point | Run, attempt: int, trial: int | None = None) -> Job:
        config = dict(point.config)
        if config.get("threads") is None and not (self.kind == "ray" and self.address):
            # share this machine's cores between the runs in flight (a Ray cluster's nodes keep their own)
            config["threads"] = default_threads(self.jobs)
        return Job(point.id, config, attempt, point.label, trial)

    def log_to_tracker(self, run: Run) -> None:
        if self.tracker is not None and run is not None and run.record is not None:
            self.tracker.log_run(run.id, run.label, run.record, run.attempts)


def bench(spec: Spec, out: str | Path, *, executor: str = "local", jobs: int = 1, address: str | None = None,
          retry_failed: bool = False, mlflow: str | None = None, echo: Callable[[str], None] = print) -> SweepSummary:
    """Run ``spec``'s grid into ``out`` (resumable); then its search section, if any."""
    spec.check_inputs()
    points = spec.points()
    with Sweep(out, executor=executor, jobs=jobs, address=address, mlflow=mlflow, experiment=spec.name,
               echo=echo) as sw:
        store = sw.store
        check_spec(store, spec)
        check_data(store, spec.data)
        if store.get_meta("name") is None:
            store.set_meta("name", spec.name)
        store.set_meta("spec", json.dumps({"name": spec.name, "data": spec.data, "settings": spec.settings,
                                           "report": spec.report}, default=str))
        new = store.register(points)
        recovered = recover(store, sw.out)
        status = {r.id: r.status for r in store.runs()}
        todo_states = ("pending", "running", "failed") if retry_failed else ("pending", "running")
        todo = [p for p in points if status[p.id] in todo_states]
        done = len(points) - len(todo)
        echo(f"{spec.name}: {len(points)} runs in the grid ({new} new); {done} already recorded"
             f"{f', {recovered} recovered' if recovered else ''}; {len(todo)} to train "
             f"({executor}, {jobs} at a time); results in {Path(out) / DB_NAME}")
        queue = list(todo)
        n_total = len(todo)
        counter = {"i": 0}

        def next_job() -> Job | None:
            if not queue:
                return None
            p = queue.pop(0)
            attempt = store.start(p.id, "starting")
            return sw.job_for(p, attempt)

        def on_done(job: Job, run: Run) -> None:
            counter["i"] += 1
            echo(format_outcome(counter["i"], n_total, run))
            sw.log_to_tracker(run)

        trained = 0
        if todo:
            sw.ensure_executor()
            trained = drive(store, sw.executor, next_job, on_done)
        if spec.search is not None:
            from .tune import run_search

            run_search(sw, spec, retry_failed=retry_failed)
        counts = store.counts()
    summary = SweepSummary(len(points), trained, recovered, counts)
    echo(f"{spec.name}: {counts['success']} success, {counts['failed']} failed, "
         f"{counts['pending'] + counts['running']} not finished ({trained} grid run(s) trained now). "
         f"Next: clintune report {out}")
    return summary
