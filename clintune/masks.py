"""Dropout keep-masks at memory speed: a 20-line C loop, compiled once per machine, with a numpy fallback.

A mask needs one uniform number per dropped-out value: about 125 M per LoRA step of MiniLM at 16 x 256
tokens (every attention probability is dropped out). torch's CPU generator (mt19937, ``bernoulli_``)
makes about 0.2 G a second per core, numpy's SFC64 about 2 G (it calls its generator through a
pointer per 64-bit draw): 80 ms of a 600 ms step (profiled). No library offers a vectorised counter-based
generator on CPU, so this module compiles one with the system C compiler, without any headers:

    r_j = splitmix64(seed + (j + 1) * 0x9E3779B97F4A7C15),  u_{4j+i} = (int16) (r_j >> 16 i),  i = 0..3
    keep_k = [u_k >= threshold]

which is SplitMix64's own output sequence (Steele, Lea & Flood, OOPSLA 2014; it passes BigCrush), split
into four 16-bit uniforms. Each r_j depends only on (seed, j), so the loop vectorises (AVX-512/AVX2).
The shared object is cached in ``$CLINTUNE_KERNEL_DIR`` (default ``~/.cache/clintune/kernels``), keyed
on the source and this CPU's flags, and written atomically. Without a compiler (or with
``CLINTUNE_NO_KERNELS=1``) :func:`draw` takes the same uniforms from numpy's SFC64 instead: the same
distribution, other numbers. Either way the seed comes from torch's generator, so ``torch.manual_seed``
makes a run repeatable on the same machine.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from .store import atomic_path

_SOURCE = r"""
#include <stdint.h>
static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
#define KEEP(NAME, T)                                                                      \
void NAME(T *out, int64_t n, uint64_t seed, int32_t threshold) {                            \
    const int16_t t = (int16_t) threshold;                                                  \
    const int64_t full = n / 4;                                                             \
    for (int64_t j = 0; j < full; j++) {                                                    \
        uint64_t r = mix(seed + (uint64_t) (j + 1) * 0x9E3779B97F4A7C15ULL);                \
        out[4 * j] = (T) ((int16_t) r >= t);                                                \
        out[4 * j + 1] = (T) ((int16_t) (r >> 16) >= t);                                    \
        out[4 * j + 2] = (T) ((int16_t) (r >> 32) >= t);                                    \
        out[4 * j + 3] = (T) ((int16_t) (r >> 48) >= t);                                    \
    }                                                                                       \
    if (n > 4 * full) {                                                                     \
        uint64_t r = mix(seed + (uint64_t) (full + 1) * 0x9E3779B97F4A7C15ULL);             \
        for (int64_t k = 4 * full; k < n; k++, r >>= 16) out[k] = (T) ((int16_t) r >= t);   \
    }                                                                                       \
}
KEEP(keep_u8, uint8_t)
KEEP(keep_i16, int16_t)
KEEP(keep_i32, int32_t)
KEEP(keep_i64, int64_t)
"""

_FUNCS = {torch.bool: "keep_u8", torch.uint8: "keep_u8", torch.int16: "keep_i16", torch.int32: "keep_i32",
          torch.int64: "keep_i64"}
_LIB: list = []          # [ctypes library or None], once per process


def _cache_dir() -> Path:
    """$CLINTUNE_KERNEL_DIR, else clintune/kernels in the user's cache (beside, not inside, the feature cache)."""
    env = os.environ.get("CLINTUNE_KERNEL_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "clintune" / "kernels"


def _compile() -> ctypes.CDLL | None:
    from .runtime import cpu_flags

    if os.environ.get("CLINTUNE_NO_KERNELS") or os.name != "posix":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    wide = ["-mprefer-vector-width=512"] if "avx512dq" in cpu_flags() else []    # 64-bit products in zmm
    key = hashlib.sha256("\n".join([_SOURCE, cc, *flags, *wide, *sorted(cpu_flags())]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"masks-{key}.so"
    try:
        if not target.exists():
            with tempfile.TemporaryDirectory() as tmp, atomic_path(target) as obj:   # never a half-written .so
                src = Path(tmp) / "masks.c"
                src.write_text(_SOURCE)
                for extra in ([wide, []] if wide else [[]]):           # a compiler without the option: plain
                    cmd = [cc, *flags, *extra, str(src), "-o", str(obj)]
                    if subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0:
                        break
                else:
                    raise OSError(f"{cc} could not compile the mask kernel")
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    for name in set(_FUNCS.values()):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32]
        getattr(lib, name).restype = None
    return lib


def compiled() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (then :func:`draw` uses numpy)."""
    if not _LIB:
        _LIB.append(_compile())
    return _LIB[0]


def new_seed() -> int:
    """A mask seed from torch's global generator (so ``torch.manual_seed`` fixes every mask)."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


def draw(out: torch.Tensor, threshold: int, seed: int | None = None) -> torch.Tensor:
    """Fill ``out`` (contiguous CPU bool/uint8/int16/int32/int64) with [u >= threshold] for uniform 16-bit
    signed integers u from ``seed`` (default: :func:`new_seed`). The same seed, shape and threshold give the
    same mask again, so a backward pass can redraw a mask instead of keeping it."""
    if not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError("draw: out must be a contiguous CPU tensor")
    seed = new_seed() if seed is None else int(seed)
    n = out.numel()
    lib = compiled()
    if lib is not None and out.dtype in _FUNCS:
        getattr(lib, _FUNCS[out.dtype])(out.data_ptr(), n, seed, int(threshold))
        return out
    u = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]
    return torch.ge(torch.from_numpy(u).view(out.shape), threshold, out=out)


def splitmix64(words: int, seed: int) -> np.ndarray:
    """The first ``words`` outputs of SplitMix64 from state ``seed``, in numpy (uint64 wraps like C)."""
    gamma, m1, m2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, words + 1, dtype=np.uint64) * gamma
        z = (z ^ (z >> np.uint64(30))) * m1
        z = (z ^ (z >> np.uint64(27))) * m2
    return z ^ (z >> np.uint64(31))


def reference(n: int, seed: int, threshold: int) -> np.ndarray:
    """The compiled kernel's keep-mask (bool), computed in numpy: for tests."""
    return splitmix64((n + 3) // 4, seed).view(np.int16)[:n] >= threshold
