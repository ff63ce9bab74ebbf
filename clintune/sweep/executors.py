"""Executors: where a sweep's runs execute. Every run is one fresh worker process (``clintune.sweep.worker``).

* :class:`LocalExecutor` (``--executor local``, default): up to ``--jobs N`` worker processes on this
  machine, started from the sweep's main thread in the sweep's process group (so that Ctrl-C and a
  group kill reach them) and tied to the sweep's life (a worker exits when the sweep dies).
* :class:`RayExecutor` (``--executor ray``): each run is a Ray task (``--address`` of a cluster, or a
  local Ray instance) that starts the same worker process on its node and returns the outcome, so a
  Ray sweep's records are measured exactly as a local one's.

Both expose ``submit(job) -> worker``, ``poll(timeout) -> [Outcome]``, ``discard(outcome)``,
``stop() -> [Job]`` (stop everything in flight) and ``close()``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .worker import PARENT_ENV, failed_record

EXECUTORS = ("local", "ray")


@dataclass
class Job:
    id: str
    config: dict
    attempt: int
    label: str = ""
    trial: int | None = None


@dataclass
class Outcome:
    job: Job
    record: dict                        # always present: a failed record if the worker died
    predictions: bytes | None = None    # Parquet bytes of the per-example test predictions
    n_predictions: int = 0
    log: str | None = None              # the worker's log, where it is not already on this machine
    workdir: Path | None = field(default=None, repr=False)
    interrupted: bool = False           # stopped by Ctrl-C/SIGTERM: back to pending, not a failure
    lost: str | None = None             # why a remote task gave no result (node lost, cancelled, worker
                                        # interrupted there): back to pending, and the sweep goes on

    @property
    def status(self) -> str:
        return self.record.get("status", "failed")


def package_root() -> str:
    """The directory holding the clintune package this process runs (workers must import the same one)."""
    import clintune

    return str(Path(clintune.__file__).resolve().parent.parent)


def worker_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    root = package_root()
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        parts.insert(0, root)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[PARENT_ENV] = str(os.getpid())
    env.update(extra or {})
    return env


def describe_exit(code: int | None) -> str:
    if code is None:
        return "worker did not finish"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"worker was killed by {name}{why}"
    return f"worker exited with code {code} without a result"


def collect(job: Job, workdir: Path, returncode: int | None, log_hint: str = "") -> Outcome:
    """Read a finished worker's outcome (or describe how it died) from ``workdir``."""
    path = workdir / "outcome.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        err = describe_exit(returncode) + (f"; see {log_hint}" if log_hint else "")
        interrupted = returncode in (130, -signal.SIGINT, -signal.SIGTERM)
        return Outcome(job, failed_record(job.config, err), workdir=workdir, interrupted=interrupted)
    preds = None
    if data.get("predictions"):
        try:
            preds = (workdir / data["predictions"]).read_bytes()
        except OSError:
            rec = failed_record(job.config, "worker result has no predictions file")
            return Outcome(job, rec, workdir=workdir)
    return Outcome(job, data["record"], preds, int(data.get("n_predictions") or 0), workdir=workdir)


def prepare_workdir(workdir: Path, job: Job) -> Path:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    job_file = workdir / "job.json"
    job_file.write_text(json.dumps(asdict(job)), encoding="utf-8")
    return job_file


def worker_command(job_file: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "clintune.sweep.worker", str(job_file), str(workdir)]


def workdir_name(job_id: str, attempt: int) -> str:
    return f"{job_id[:16]}-{attempt}"


# ----------------------------------------------------------------------------------------------
# local processes
# ----------------------------------------------------------------------------------------------

class LocalExecutor:
    name = "local"

    def __init__(self, out_dir: str | Path, jobs: int = 1) -> None:
        self.jobs = max(1, int(jobs))
        self.work = Path(out_dir) / "work"
        self.logs = Path(out_dir) / "logs"
        self.running: dict[str, tuple[Job, subprocess.Popen, Path, object]] = {}

    @property
    def active(self) -> int:
        return len(self.running)

    def submit(self, job: Job) -> str:
        wd = self.work / workdir_name(job.id, job.attempt)
        job_file = prepare_workdir(wd, job)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{job.id[:16]}.log", "ab")
        log.write(f"=== {job.label or job.id[:10]}: attempt {job.attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode())
        log.flush()
        # Started from the main thread (PR_SET_PDEATHSIG follows the thread that forks), in our process
        # group: Ctrl-C and `kill -- -PGID` reach the workers too.
        proc = subprocess.Popen(worker_command(job_file, wd), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=worker_env())
        self.running[job.id] = (job, proc, wd, log)
        return f"{proc.pid}@{socket.gethostname()}"

    def poll(self, timeout: float = 0.5) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        while True:
            done = [jid for jid, (_, p, _, _) in self.running.items() if p.poll() is not None]
            if done or time.monotonic() >= deadline or not self.running:
                break
            time.sleep(0.05)
        out = []
        for jid in done:
            job, proc, wd, log = self.running.pop(jid)
            log.close()
            out.append(collect(job, wd, proc.returncode, str(self.logs / f"{jid[:16]}.log")))
        return out

    def discard(self, outcome: Outcome) -> None:
        """Remove a finished run's work directory (after its outcome is safely in runs.db)."""
        if outcome.workdir is not None:
            shutil.rmtree(outcome.workdir, ignore_errors=True)

    def stop(self) -> list[Job]:
        """Stop every running worker (SIGTERM, then SIGKILL); return their jobs."""
        jobs = []
        for _, proc, _, _ in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for job, proc, wd, log in self.running.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            shutil.rmtree(wd, ignore_errors=True)
            jobs.append(job)
        self.running.clear()
        return jobs

    def close(self) -> None:
        if self.running:
            self.stop()


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------

def run_blocking(job_dict: dict, env_extra: dict | None = None) -> dict:
    """Run one job in a fresh worker process here and return its outcome as a plain dict (Ray task body)."""
    import tempfile

    job = Job(**job_dict)
    with tempfile.TemporaryDirectory(prefix="clintune-run-") as d:
        wd = Path(d) / "work"
        job_file = prepare_workdir(wd, job)
        log_path = Path(d) / "worker.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(worker_command(job_file, wd), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=worker_env(env_extra))
            try:
                code = proc.wait()
            except BaseException:
                proc.kill()
                raise
        oc = collect(job, wd, code, f"the log of run {job.id[:10]}")
        log_text = log_path.read_bytes()[-1_000_000:].decode("utf-8", errors="replace")
        return {"record": oc.record, "predictions": oc.predictions, "n_predictions": oc.n_predictions,
                "interrupted": oc.interrupted, "log": f"--- on {socket.gethostname()}\n{log_text}"}


class RayExecutor:
    name = "ray"

    def __init__(self, out_dir: str | Path, jobs: int = 1, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'clintune[ray]'") from None
        import logging

        self.ray = ray
        self.jobs = max(1, int(jobs))
        self.logs = Path(out_dir) / "logs"
        self.refs: dict = {}
        local = not address or address == "local"
        self.env_extra = {"PYTHONPATH": worker_env()["PYTHONPATH"]} if local else {}
        self.started = not ray.is_initialized()
        if self.started:
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                          configure_logging=True)
            try:
                if local:
                    ray.init(address="local", num_cpus=self.jobs, object_store_memory=200 * 2 ** 20,
                             runtime_env={"env_vars": self.env_extra}, **kwargs)
                else:
                    ray.init(address=address, **kwargs)
            except Exception as e:
                raise ConfigError(f"--executor ray: cannot start or reach Ray"
                                  f"{' at ' + address if address else ''}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.task = ray.remote(num_cpus=1, max_retries=0)(run_blocking)

    @property
    def active(self) -> int:
        return len(self.refs)

    def submit(self, job: Job) -> str:
        ref = self.task.remote(asdict(job), self.env_extra)
        self.refs[ref] = job
        return "ray"

    def poll(self, timeout: float = 0.5) -> list[Outcome]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        out = []
        for ref in ready:
            job = self.refs.pop(ref)
            try:
                d = self.ray.get(ref)
            except Exception as e:  # the task itself failed (node lost, task cancelled): not the run's result
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                why = f"Ray task lost: {type(e).__name__}{': ' + msg[:300] if msg else ''}"
                out.append(Outcome(job, failed_record(job.config, why), lost=why))
                continue
            self.logs.mkdir(parents=True, exist_ok=True)
            with open(self.logs / f"{job.id[:16]}.log", "a", encoding="utf-8") as f:
                f.write(f"=== {job.label or job.id[:10]}: attempt {job.attempt} (ray)\n{d.get('log') or ''}")
            if d.get("interrupted"):  # its worker was stopped on the node (SIGTERM, Ctrl-C there)
                out.append(Outcome(job, d["record"], lost="Ray worker interrupted on its node"))
                continue
            out.append(Outcome(job, d["record"], d.get("predictions"), int(d.get("n_predictions") or 0)))
        return out

    def discard(self, outcome: Outcome) -> None:
        pass

    def stop(self) -> list[Job]:
        jobs = list(self.refs.values())
        for ref in list(self.refs):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # pragma: no cover - already finished
                pass
        self.refs.clear()
        return jobs

    def close(self) -> None:
        if self.refs:
            self.stop()
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def make_executor(kind: str, out_dir: str | Path, jobs: int = 1, address: str | None = None):
    if kind == "local":
        if address:
            raise ConfigError("--address is for --executor ray")
        return LocalExecutor(out_dir, jobs)
    if kind == "ray":
        return RayExecutor(out_dir, jobs, address)
    raise ConfigError(f"--executor: '{kind}' is not one of {', '.join(EXECUTORS)}")
