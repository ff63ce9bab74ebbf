"""Device, precision, threads and seeding: decided once per run, used everywhere.

``--precision auto`` picks bf16 mixed precision where the hardware computes bf16 natively (CUDA GPUs
with bf16, CPUs with AVX512-BF16 or AMX), fp16 with loss scaling on older CUDA GPUs, and fp32
otherwise. Mixed precision keeps trainable weights and optimizer state in fp32 (autocast computes
matrix products in the low precision), which keeps accuracy (see benchmarks/).
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def _cgroup_quota_files(mountinfo: str, cgroup: str) -> list[tuple[str, str, str]]:
    """(directory, kind, mount point) of this process's CPU cgroup in each hierarchy that has the CPU controller
    (kind "v2": cgroup2; "v1": cgroup v1's cpu controller), from /proc/self/mountinfo and /proc/self/cgroup."""
    paths = {}                                  # "v2" / "v1" -> the process's cgroup path in that hierarchy
    with open(cgroup, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            if parts[0] == "0" and parts[1] == "":
                paths["v2"] = parts[2]
            elif "cpu" in parts[1].split(","):
                paths["v1"] = parts[2]
    found = []
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            root, point, fstype, options = fields[3], fields[4], tail[0], tail[2].split(",")
            kind = "v2" if fstype == "cgroup2" else "v1" if fstype == "cgroup" and "cpu" in options else None
            if kind is None or kind not in paths:
                continue
            path = paths[kind]
            if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
                continue                        # the process's cgroup is outside what this mount shows
            rel = path[len(root):] if root != "/" else path
            found.append((os.path.join(point, rel.lstrip("/")), kind, point))
    return found


def _quota(directory: str, kind: str) -> float | None:
    """One cgroup directory's CPU limit (quota / period), or None: none set, unreadable or malformed."""
    def read(name: str) -> list[str]:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            return f.read().split()

    try:
        if kind == "v2":
            quota, period = (read("cpu.max") + ["", ""])[:2]
            if quota == "max":
                return None
        else:
            quota, period = read("cpu.cfs_quota_us")[0], read("cpu.cfs_period_us")[0]
        quota, period = float(quota), float(period)
    except (OSError, ValueError, IndexError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(mountinfo: str = "/proc/self/mountinfo", cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPUs this process may use under a cgroup CPU bandwidth limit (``docker run --cpus``, Kubernetes CPU
    limits, systemd's CPUQuota), or None where there is none or it cannot be read.

    The limit is quota / period: cgroup v2's ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD" for none), cgroup v1's
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` (quota -1 for none); the smallest along the process's cgroup and its
    parents up to the hierarchy's mount, since each of them caps the ones below it."""
    try:
        places = _cgroup_quota_files(mountinfo, cgroup)
    except OSError:
        return None
    limits = []
    for directory, kind, point in places:
        d, top = os.path.normpath(directory), os.path.normpath(point)
        while True:
            limits.append(_quota(d, kind))
            if len(d) <= len(top):          # the mount point: the top of what this process can see
                break
            d = os.path.dirname(d)
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def usable_cpus() -> int:
    """The cores this process can keep busy: those it may run on (its affinity), capped by a cgroup CPU limit
    (rounded down, at least 1). PyTorch starts one thread per core of the machine, and a container limited to
    two CPUs on a 64-core host would otherwise run 32-64 threads that the kernel throttles in turn."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, int(limit)))
    return max(1, n)


def auto_threads() -> tuple[int, str]:
    """(threads, why) for a run that did not say (``--threads``): OMP_NUM_THREADS when set (PyTorch reads it, as
    torchrun's one thread per process), else PyTorch's own (one per core) unless :func:`usable_cpus` is fewer
    ("usable cores": a cgroup CPU limit or the process's affinity)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    n = usable_cpus()
    if n < torch.get_num_threads():
        return n, "usable cores"
    return torch.get_num_threads(), "PyTorch default"


@dataclass
class Runtime:
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    rank: int = 0   # this process among ``world`` (torchrun / accelerate launch); 0 and 1 otherwise
    world: int = 1
    threads_from: str = "PyTorch default"  # where the CPU thread count came from (--threads, OMP_NUM_THREADS, ...)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return cpu_name()


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun, accelerate launch)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_runtime(device: str = "auto", precision: str = "auto", threads: int | None = None,
                    allow_distributed: bool = True) -> Runtime:
    """Device, precision and, under ``torchrun``/``accelerate launch``, the process group (one per run).

    Several processes train one model with DistributedDataParallel: NCCL between GPUs (each process
    takes the GPU of its LOCAL_RANK), gloo between CPU processes.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available to PyTorch on this machine")
    rank, world, local = distributed() if allow_distributed else (0, 1, 0)
    if world > 1:
        import torch.distributed as dist

        if device == "cuda":
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    dev = torch.device(device)
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise ConfigError("--precision fp16: not supported for training on CPU; use bf16 or fp32")
    if threads:
        torch.set_num_threads(threads)
        source = "--threads"
    else:
        n, source = auto_threads()
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
    # the Rust tokenizer's thread pool (rayon), if it has not started yet: as many threads as PyTorch's
    os.environ.setdefault("RAYON_NUM_THREADS", str(torch.get_num_threads()))
    return Runtime(dev, precision, rank, world, source)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
