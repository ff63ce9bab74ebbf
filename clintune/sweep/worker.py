"""One run in a fresh process: ``python -m clintune.sweep.worker JOB.json WORKDIR``.

Every run of a sweep executes in its own process so that it measures its own peak memory (``peak_rss_mb``
is the process's lifetime peak) and so that a crash, a leak or an out-of-memory kill takes down one run,
not the sweep. The worker trains ``JOB.json``'s config with :func:`clintune.api.train` (no model is
saved: the sweep keeps records, not weights), then writes into WORKDIR

* ``predictions.parquet``: per test example ``row``, ``gold``, ``predicted_label``, ``prob_<label>``;
* ``outcome.json`` (last; written to a temporary file, fsync'ed, then renamed into place):
  ``{"id", "attempt", "record", "predictions", "n_predictions"}``.

A run that fails (bad data, a backbone that is not available, a bug) still writes ``outcome.json``, with
a failed record holding the error. A worker whose parent dies exits at once: on Linux the kernel sends
it SIGKILL (``PR_SET_PDEATHSIG``), elsewhere a watchdog thread notices within a second. Its log (stderr)
holds ids, counts and errors, never note text.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

PARENT_ENV = "CLINTUNE_SWEEP_PARENT"


def die_with_parent() -> None:
    """Exit as soon as the process that started this worker is gone (no orphan keeps training)."""
    expected = os.environ.get(PARENT_ENV)
    ppid = int(expected) if expected and expected.isdigit() else os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass
    if os.getppid() != ppid:  # the parent died before we could ask to follow it
        os._exit(137)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(137)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def failed_record(config: dict, error: str) -> dict:
    from ..record import environment, make_record

    return make_record(config, "failed", error=error, env=environment())


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:500]}" if text else type(e).__name__


def run_job(job: dict, workdir: Path) -> int:
    """Train one job; write its outcome into ``workdir``. Returns the process exit code."""
    import traceback

    from ..errors import ClintuneError
    from ..store import _json_default
    from .spec import make_config

    config = job["config"]
    preds = None
    try:
        cfg = make_config(config, f"run {job['id'][:10]}")
        from ..api import train

        res = train(cfg)
        record, preds = res.record, res.predictions
    except KeyboardInterrupt:
        return 130  # interrupted: no outcome, the sweep puts the run back to pending
    except ClintuneError as e:
        print(f"clintune: error: {e}", file=sys.stderr)
        record = failed_record(config, f"{type(e).__name__}: {e}")
    except Exception as e:  # a bug or a resource problem: the run fails, the sweep goes on
        traceback.print_exc()
        record = failed_record(config, one_line(e))
    outcome = {"id": job["id"], "attempt": job.get("attempt"), "record": record, "predictions": None,
               "n_predictions": 0}
    if preds is not None and record.get("status") == "success":
        from .store import predictions_to_bytes

        write_durable(workdir / "predictions.parquet", predictions_to_bytes(preds))
        outcome.update(predictions="predictions.parquet", n_predictions=int(len(preds)))
    write_durable(workdir / "outcome.json",
                  (json.dumps(outcome, indent=2, default=_json_default) + "\n").encode("utf-8"))
    return 0


def write_durable(path: Path, data: bytes) -> None:
    """Write ``path`` so that after a crash or power loss it is either absent or complete: a temporary file
    beside it is flushed to disk (fsync) before it is renamed into place, then the directory is flushed.
    (A sweep that died records a worker's outcome.json when it finds one, so it must never be truncated.)"""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m clintune.sweep.worker JOB.json WORKDIR", file=sys.stderr)
        return 2
    die_with_parent()
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    from ..cli import _quiet_libraries, _setup_logging

    _quiet_libraries()
    _setup_logging(quiet=False)
    print(f"clintune worker pid {os.getpid()}: run {job['id'][:10]} attempt {job.get('attempt')}", file=sys.stderr,
          flush=True)
    try:
        return run_job(job, Path(argv[1]))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
