"""Cost, measured in one place: time, throughput, memory and parameters of a run.

Every run (any backbone, method or head, and TF-IDF) reports the same keys in ``record.json``:

* ``train_seconds``: wall time of training, validation passes included (what the user waits for);
* ``train_samples_per_s``: training examples processed per second of *training steps* (validation
  excluded, so it is comparable with other trainers' throughput);
* ``predict_seconds`` / ``predict_samples_per_s``: wall time and throughput of predicting the test set;
* ``peak_rss_mb``: the process's peak resident memory (``getrusage``); ``peak_gpu_mb``: the peak
  memory PyTorch allocated on the GPU (``None`` on CPU);
* ``trainable_params`` / ``total_params``; ``time_to_best_s``: training time until the epoch with the
  best validation score (the time term of Taylor et al.'s composite efficiency metric).
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass, field

import torch


def peak_rss_mb() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / (1024 * 1024) if sys.platform == "darwin" else ru / 1024  # bytes on macOS, KiB on Linux


@dataclass
class CostMeter:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seconds: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def phase(self, name: str, samples: int = 0):
        """Time a phase (``train``, ``train_steps``, ``validate``, ``predict``...) and count its samples."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.samples[name] = self.samples.get(name, 0) + samples

    def add(self, name: str, seconds: float, samples: int = 0) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.samples[name] = self.samples.get(name, 0) + samples

    def set_params(self, trainable: int, total: int) -> None:
        self.extra.update(trainable_params=int(trainable), total_params=int(total))

    def rate(self, name: str) -> float | None:
        s = self.seconds.get(name, 0.0)
        return round(self.samples.get(name, 0) / s, 3) if s > 0 else None

    def summary(self) -> dict:
        gpu = None
        if self.device.type == "cuda":
            gpu = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
        steps = "train_steps" if "train_steps" in self.seconds else "train"
        out = {
            "train_seconds": round(self.seconds.get("train", 0.0), 3),
            "train_samples_per_s": self.rate(steps),
            "predict_seconds": round(self.seconds.get("predict", 0.0), 3),
            "predict_samples_per_s": self.rate("predict"),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": gpu,
        }
        if "validate" in self.seconds:
            out["validate_seconds"] = round(self.seconds["validate"], 3)
        out.update(self.extra)
        return out
