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


@dataclass
class Runtime:
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    rank: int = 0   # this process among ``world`` (torchrun / accelerate launch); 0 and 1 otherwise
    world: int = 1

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
    return Runtime(dev, precision, rank, world)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
