"""Hyperparameter search with Optuna, as in Taylor et al. (arXiv 2402.10597; code: nlpie-research/efficient-ml).

Search space (``search:`` in the SPEC, defaults from the paper): learning rate log-uniform in
[1e-5, 1e-3]; for LoRA, alpha = rank x {0.3, 0.5, 1} and dropout in {0.1, 0.3, 0.5} (and the rank from
``lora_r`` choices, the paper's outer loop). Objective: the run's best validation score with
``val_metric: auroc`` (validation macro AUROC; binary AUROC equals the macro one), maximised by TPE.
The test set never steers the search.

Every trial is a run like any other: registered in runs.db (``source = 'search'``, its trial number),
trained in a fresh worker by the sweep's executor, recorded once. The study lives in
``DIR/optuna.journal`` (Optuna's append-only journal storage), so tuning resumes too: trials left running
by a killed tune are closed and their parameters queued again, and a trial whose config was already
trained (same run id) is answered from runs.db instead of being trained twice. A directory holds one
SPEC's study: tuning another SPEC (other settings, search space or name) into it is refused
(:func:`~clintune.sweep.runner.check_spec`), as are changed choices Optuna could not continue with.
"""
from __future__ import annotations

import math

from ..errors import ConfigError
from .executors import Job
from .runner import Sweep, check_data, check_spec, drive
from .spec import MANAGED, Point, Spec, make_config, run_id
from .store import Run

INTERRUPTED = "clintune_interrupted"


def _objective(run: Run) -> float | None:
    if run.status != "success":
        return None
    v = (run.training or {}).get("best_val_score")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _tell(study, number: int, run: Run) -> None:
    from optuna.trial import TrialState

    value = _objective(run)
    if value is None:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    else:
        study.tell(number, value, skip_if_finished=True)


def trial_config(trial, spec: Spec) -> tuple[dict, str]:
    """The run config of an Optuna trial (its sampled values on top of the SPEC's settings)."""
    s = spec.search
    base = {**spec.base_config(), **s.fixed, "val_metric": s.metric}
    method = make_config(base, f"{spec.source}: search").method
    values: dict = {"lr": trial.suggest_float("lr", s.lr[0], s.lr[1], log=True)}
    parts = [f"lr={values['lr']:.3g}"]
    if method == "lora":
        r = trial.suggest_categorical("lora_r", s.lora_r)
        ratio = trial.suggest_categorical("lora_alpha_ratio", s.lora_alpha_ratio)
        drop = trial.suggest_categorical("lora_dropout", s.lora_dropout)
        values.update(lora_r=int(r), lora_alpha=float(r) * float(ratio), lora_dropout=float(drop))
        parts += [f"lora_r={r}", f"lora_alpha={float(r) * float(ratio):g}", f"lora_dropout={drop:g}"]
    cfg = make_config({**base, **values}, f"{spec.source}: search").to_dict()
    return {**cfg, **MANAGED}, f"trial {trial.number}: " + ", ".join(parts)


def _finished(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
               if not t.user_attrs.get(INTERRUPTED))


def run_search(sw: Sweep, spec: Spec, *, trials: int | None = None, retry_failed: bool = False):
    """Run (or continue) ``spec``'s search until ``trials`` trials have finished; return the study."""
    if spec.search is None:
        raise ConfigError(f"{spec.source}: no search: section to tune (see examples/seed_grid.yaml)")
    try:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from optuna.trial import TrialState
    except ImportError:  # pragma: no cover - a dependency
        raise ConfigError("tuning needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s, store, echo = spec.search, sw.store, sw.echo
    n = trials or s.trials
    storage = JournalStorage(JournalFileBackend(str(sw.out / "optuna.journal")))
    study = optuna.create_study(study_name=f"{spec.name}-search", storage=storage, direction="maximize",
                                load_if_exists=True)
    # Seeded, and offset by the trials already there: a resumed search draws new points instead of
    # replaying the first session's random sequence.
    study.sampler = optuna.samplers.TPESampler(seed=s.seed + len(study.get_trials(deepcopy=False)))

    # Trials left RUNNING belong to a tune that died (we hold the lock): close them, and queue the
    # parameters of those whose run did not finish, so that exactly those configs are trained.
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        rid = t.user_attrs.get("run_id")
        run = store.get(rid) if rid else None
        if run is not None and run.status in ("success", "failed"):
            _tell(study, t.number, run)
            continue
        study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)  # not counted as a finished trial
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if t.params:
            study.enqueue_trial(t.params)

    inflight: dict[int, str] = {}
    done0 = _finished(study)
    echo(f"{spec.name} search: {done0} of {n} trials finished; objective: validation {s.metric} (maximised)")
    counter = {"i": done0}

    def next_job() -> Job | None:
        while _finished(study) + len(inflight) < n:
            trial = study.ask()
            cfg, label = trial_config(trial, spec)
            point = Point(run_id(cfg), cfg, label, "search")
            store.register([point], source="search", trial=trial.number)
            trial.set_user_attr("run_id", point.id)
            run = store.get(point.id)
            if run.status == "success" or (run.status == "failed" and not retry_failed):
                _tell(study, trial.number, run)
                counter["i"] += 1
                echo(f"[trial {trial.number}] {label}: same config as run {run.short_id} ({run.status}); not retrained")
                continue
            attempt = store.start(point.id, "starting")
            inflight[trial.number] = point.id
            return sw.job_for(run, attempt, trial=trial.number)
        return None

    def on_done(job: Job, run: Run) -> None:
        inflight.pop(job.trial, None)
        _tell(study, job.trial, run)
        counter["i"] += 1
        value = _objective(run)
        shown = f"validation {s.metric} {value:.4f}" if value is not None else f"FAILED {run.error or ''}"
        echo(f"[trial {job.trial}, {counter['i']}/{n}] {run.short_id} {job.label}: {shown}")
        sw.log_to_tracker(run)

    if _finished(study) < n:
        sw.ensure_executor()
        drive(store, sw.executor, next_job, on_done)
    try:
        best = study.best_trial
        echo(f"{spec.name} search: best validation {s.metric} {best.value:.4f} (trial {best.number}, run "
             f"{str(best.user_attrs.get('run_id', ''))[:10]}: {', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in best.params.items())})")
    except ValueError:
        echo(f"{spec.name} search: no trial finished successfully")
    return study


def tune(spec: Spec, out, *, trials: int | None = None, executor: str = "local", jobs: int = 1,
         address: str | None = None, retry_failed: bool = False, mlflow: str | None = None, echo=print):
    """``clintune tune``: run only the SPEC's search section into ``out``."""
    if spec.search is None:
        raise ConfigError(f"{spec.source}: no search: section to tune")
    spec.check_inputs()
    with Sweep(out, executor=executor, jobs=jobs, address=address, mlflow=mlflow, experiment=spec.name,
               echo=echo) as sw:
        check_spec(sw.store, spec)
        check_data(sw.store, spec.data)
        if sw.store.get_meta("name") is None:
            sw.store.set_meta("name", spec.name)
        from .runner import recover

        recover(sw.store, sw.out)
        study = run_search(sw, spec, trials=trials, retry_failed=retry_failed)
        counts = sw.store.counts()
    echo(f"{spec.name}: {counts['success']} success, {counts['failed']} failed in {out}. Next: clintune report {out}")
    return study
