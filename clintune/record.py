"""The run record (``record.json``): a self-describing account of one run.

    {"config": {...resolved TrainConfig...}, "status": "success" | "failed",
     "metrics": {"accuracy", "precision", "recall", "f1", "auroc", ...}, "metrics_ci": {name: [lo, hi]},
     "cost": {"train_seconds", "train_samples_per_s", "predict_samples_per_s", "peak_rss_mb",
              "peak_gpu_mb", "trainable_params", "total_params", ...},
     "data": {split sizes, label counts, content hashes}, "env": {versions, git sha, device, threads},
     "created": ISO time, "error": "..." (failed runs only)}

The key names above are a contract: sweeps, reports and other tools read them.
"""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("clintune", "torch", "transformers", "peft", "tokenizers", "safetensors", "scikit-learn",
            "numpy", "pandas")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The clintune source checkout's commit (with ``-dirty`` if modified), or None if not a checkout."""
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(runtime=None) -> dict:
    from .runtime import cpu_has_native_bf16, cpu_name

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "packages": {p: _version(p) for p in PACKAGES}, "git_sha": git_sha(),
           "threads": torch.get_num_threads(), "cpu": cpu_name(), "cpu_bf16": cpu_has_native_bf16()}
    if runtime is not None:
        env.update(device=runtime.device.type, device_name=runtime.device_name, precision=runtime.precision,
                   processes=runtime.world, threads_from=runtime.threads_from)
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_record(config: dict, status: str, *, metrics: dict | None = None, metrics_ci: dict | None = None,
                cost: dict | None = None, data: dict | None = None, env: dict | None = None,
                error: str | None = None, **extra) -> dict:
    rec = {"config": config, "status": status, "metrics": metrics or {}, "metrics_ci": metrics_ci or {},
           "cost": cost or {}, "data": data or {}, "env": env or environment(), "created": now()}
    if error is not None:
        rec["error"] = error
    rec.update(extra)
    return rec
