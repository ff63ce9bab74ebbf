"""Cost, measured in one place: time, throughput, memory and parameters of a run.

Every run (any backbone, method or head, and TF-IDF) reports the same keys in ``record.json``:

* ``train_seconds``: wall time of training, validation passes included (what the user waits for), less
  ``measuring_seconds``, the time spent counting FLOPs and measuring the matrix-product peak for MFU;
* ``train_samples_per_s``: training examples processed per second of *training steps* (validation
  excluded, so it is comparable with other trainers' throughput);
* ``predict_seconds`` / ``predict_samples_per_s``: wall time and throughput of predicting the test set;
* ``peak_rss_mb``: the process's peak resident memory (``getrusage``); ``peak_gpu_mb``: the peak
  memory PyTorch allocated on the GPU (``None`` on CPU);
* ``trainable_params`` / ``total_params``; ``time_to_best_s``: training time until the epoch with the
  best validation score (the time term of Taylor et al.'s composite efficiency metric);
* ``train_flops`` (model FLOPs of all training steps, counted by PyTorch's FLOP counter, padding
  excluded), ``train_tflops_per_s``, ``matmul_peak_tflops`` (this machine's measured matrix-product
  peak in the run's precision, measured in the same process) and ``mfu`` = achieved / peak (model FLOP
  utilisation).
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
        flops = self.extra.get("train_flops")
        if flops and self.seconds.get(steps):
            achieved = flops / self.seconds[steps]
            out["train_tflops_per_s"] = round(achieved / 1e12, 4)
            peak = self.extra.get("matmul_peak_tflops")
            if peak:
                out["mfu"] = round(achieved / (peak * 1e12), 4)
        out.update(self.extra)
        return out


# ----------------------------------------------------------------------------------------------
# FLOPs and model FLOP utilisation (MFU)
# ----------------------------------------------------------------------------------------------

_PEAKS: dict = {}


def matmul_peak_flops(dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None,
                      sizes: tuple[int, ...] = (1024, 2048), seconds: float = 0.25, remeasure: bool = False) -> float:
    """This machine's measured peak: the best FLOP/s of one square ``dtype`` matrix product (2 n^3 each).

    Each size repeats for about ``seconds`` and the fastest single product counts, not the mean, so a
    moment of contention on a shared machine does not lower the peak and inflate MFU (a mean over 0.25 s
    once gave half the usual peak, and an MFU of 86%). Measured once per process (about half a second),
    under the same load as the run it is compared with; ``remeasure`` measures again and keeps the
    higher of the two (training measures at its start and, when it ran a minute or more, at its end).
    """
    device = device or torch.device("cpu")
    key = (str(dtype), str(device), torch.get_num_threads())
    if key in _PEAKS and not remeasure:
        return _PEAKS[key]
    best = 0.0
    gen = torch.Generator().manual_seed(0)      # never touch the global RNG: it drives the run's dropout
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        a @ b
        spent = 0.0
        while spent < seconds:
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            spent += dt
            best = max(best, 2 * n ** 3 / max(dt, 1e-12))
    best = max(best, _PEAKS.get(key, 0.0))
    _PEAKS[key] = best
    return best


@dataclass
class FlopModel:
    """Model FLOPs of one training example of n tokens: a + b n + c n^2 (forward and backward, matmuls).

    Fitted from three probes counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts the
    matrix products and attention, the FLOPs that matter), so it follows whatever trains: LoRA's extra
    products, a frozen encoder's forward-only pass, a head on cached features. Padding is not counted.
    """

    a: float
    b: float
    c: float

    def __call__(self, lengths) -> float:
        import numpy as np

        n = np.asarray(lengths, dtype=np.float64)
        return float((self.a + self.b * n + self.c * n * n).sum())


def count_cpu_attention() -> None:
    """Teach PyTorch's FLOP counter the CPU kernel of ``scaled_dot_product_attention``.

    Its registry has the CUDA kernels (flash, efficient, cuDNN) but not ``_scaled_dot_product_flash_attention
    _for_cpu``, which it counts as 0: a run whose attention goes through SDPA on the CPU (``--no-fast``,
    ``--fast-off attention``, the TinyAttention head) would leave attention out of its FLOPs and MFU, while the
    fast path's kernels count it. Counted as model FLOPs, as the fast path's kernels are: forward 4 b h s_q s_k d
    (the two products, torch's ``sdpa_flop_count``), backward twice that (the four products of the gradients;
    torch's own backward formula adds the scores the flash kernel recomputes, which model FLOPs leave out).
    """
    from torch.utils import flop_counter as fc

    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:
        @fc.register_flop_formula(fwd)
        def _forward(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)
    if bwd is not None and bwd not in fc.flop_registry:
        @fc.register_flop_formula(bwd)
        def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
            return 2 * fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def calibrate_flops(model: torch.nn.Module, probe, runtime, lengths: tuple[int, ...]) -> FlopModel | None:
    """Count one forward+backward pass of a single example at three lengths; fit a + b n + c n^2.

    ``probe(n)`` returns model inputs for one example of n tokens. Runs in eval mode (no dropout, no
    random numbers drawn) and leaves no gradients behind.
    """
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    lengths = sorted(set(int(x) for x in lengths))
    if len(lengths) < 3:
        return None
    count_cpu_attention()
    was = model.training
    model.eval()
    counts = []
    try:
        for n in lengths:
            with FlopCounterMode(display=False) as fc:
                with runtime.autocast():
                    out = model(**{k: v.to(runtime.device) for k, v in probe(n).items()})
                out.float().sum().backward()
            counts.append(fc.get_total_flops())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    x = np.asarray(lengths, dtype=np.float64)
    a, b, c = np.linalg.lstsq(np.stack([np.ones_like(x), x, x * x], 1), np.asarray(counts, np.float64), rcond=None)[0]
    return FlopModel(float(a), float(b), float(c))
