"""Optional MLflow logging (``--mlflow URI``): each finished run becomes an MLflow run.

For teams that already track experiments in MLflow. runs.db stays the source of truth; MLflow gets a
copy: the config as params, numeric metrics and cost as metrics, the record as ``record.json``, and tags
``clintune.run_id``, ``clintune.status``, ``clintune.attempt``. Nothing there holds note text.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("clintune")


def _flat_numbers(prefix: str, d: dict | None) -> dict[str, float]:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = float(v)
    return out


class MlflowTracker:
    def __init__(self, uri: str, experiment: str) -> None:
        os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
        try:
            import mlflow
        except ImportError:
            raise ConfigError("--mlflow needs MLflow: pip install 'clintune[mlflow]'") from None
        self.mlflow = mlflow
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            mlflow.set_tracking_uri(uri)
            found = mlflow.get_experiment_by_name(experiment)
            if found is None and uri.startswith("sqlite:///"):
                # a local database: keep the artifacts beside it, not in the current directory
                art = Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts"
                mlflow.create_experiment(experiment, artifact_location=art.as_uri())
            self.experiment_id = mlflow.set_experiment(experiment).experiment_id
        except Exception as e:
            raise ConfigError(f"--mlflow {uri}: cannot use this tracking server ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None

    def log_run(self, run_id: str, label: str, record: dict, attempt: int) -> None:
        """Log one finished run; a tracking failure is a warning, never a failed sweep."""
        m = self.mlflow
        try:
            params = {k: ("" if v is None else str(v))[:500] for k, v in (record.get("config") or {}).items()}
            metrics = _flat_numbers("", record.get("metrics"))
            metrics.update(_flat_numbers("cost.", record.get("cost")))
            best = (record.get("training") or {}).get("best_val_score")
            if isinstance(best, (int, float)):
                metrics["best_val_score"] = float(best)
            tags = {"clintune.run_id": run_id, "clintune.status": record.get("status", "failed"),
                    "clintune.attempt": str(attempt)}
            if record.get("error"):
                tags["clintune.error"] = str(record["error"])[:500]
            with m.start_run(experiment_id=self.experiment_id, run_name=label[:250] or run_id[:10], tags=tags):
                m.log_params(params)
                if metrics:
                    m.log_metrics(metrics)
                m.log_dict(record, "record.json")
        except Exception as e:  # pragma: no cover - depends on the server
            log.warning("mlflow: could not log run %s (%s)", run_id[:10], type(e).__name__)
