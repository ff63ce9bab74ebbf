"""Dropout keep-masks at memory speed: a 20-line C loop, compiled once per machine, with a numpy fallback.

A mask needs one uniform number per dropped-out value: about 125 M per LoRA step of MiniLM at 16 x 256
tokens (every attention probability is dropped out). torch's CPU generator (mt19937, ``bernoulli_``)
makes about 0.2 G a second per core, numpy's SFC64 about 2 G (it calls its generator through a
pointer per 64-bit draw): 80 ms of a 600 ms step (profiled). No library offers a vectorised counter-based
generator on CPU, so this module compiles one with the system C compiler (no headers beyond C's own):

    r_j = splitmix64(seed + (j + 1) * 0x9E3779B97F4A7C15),  u_{4j+i} = (int16) (r_j >> 16 i),  i = 0..3
    keep_k = [u_k >= threshold]

which is SplitMix64's own output sequence (Steele, Lea & Flood, OOPSLA 2014; it passes BigCrush), split
into four 16-bit uniforms. Each r_j depends only on (seed, j), so the loop vectorises (AVX-512/AVX2).
The shared object is cached in ``$CLINTUNE_KERNEL_DIR`` (default ``~/.cache/clintune/kernels``), keyed
on the source and this CPU's flags, and written atomically. Without a compiler (or with
``CLINTUNE_NO_KERNELS=1``) :func:`draw` takes the same uniforms from numpy's SFC64 instead: the same
distribution, other numbers. Either way the seed comes from torch's generator, so ``torch.manual_seed``
makes a run repeatable on the same machine.

The same shared object holds attention's softmax and dropout fused for bf16 (:func:`softmax_keep`,
:func:`softmax_keep_backward`): one pass over the scores makes P (softmax in fp32, rounded once) and P m,
drawing each row's mask inline (row r takes words r w .. r w + w - 1, w = ceil(T / 4), so a row starts on
a whole word: :func:`attention_keep`); one pass over dP makes dS = P (dP m - rowsum(dP m P)) and P m again.
Where PyTorch runs on GNU OpenMP (its Linux wheels), the kernels are built with ``-fopenmp`` and so split
rows over PyTorch's own threads; Python threads instead lost to the OpenMP threads spinning between
PyTorch's calls (measured: slower than one thread).
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
#include <string.h>
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

/* Attention's softmax and dropout in one pass over bf16 rows of length t (<= MAXT). Row r's keep-mask is
   words r * w .. r * w + w - 1 of the stream above, w = ceil(t / 4): keep_bits((rows, 4 w))[:, :t]. */
#define MAXT @MAX_ROW@
static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t) b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {                       /* round to nearest even (no NaN reaches here) */
    uint32_t u; memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); return (uint16_t) (u >> 16);
}
static inline float exp_neg(float x) {          /* e^x for x <= 0, -inf -> 0: 2^n 2^f, |f| <= 1/2, rel. err ~2e-7 */
    float y = x * 1.44269504088896341f;
    y = y < -126.0f ? -126.0f : y;
    float n = __builtin_rintf(y), f = y - n;
    float q = 1.5403530393381609e-4f;
    q = q * f + 1.3333558146428443e-3f;
    q = q * f + 9.6181291076284772e-3f;
    q = q * f + 5.5504108664821580e-2f;
    q = q * f + 2.4022650695910071e-1f;
    q = q * f + 6.9314718055994531e-1f;
    q = q * f + 1.0f;
    uint32_t e = (uint32_t) ((int32_t) n + 127) << 23;
    float s; memcpy(&s, &e, 4);
    return x < -87.0f ? 0.0f : q * s;
}
static inline void row_keep(uint16_t *keep, int64_t row, int64_t t, uint64_t seed, int16_t th) {
    const int64_t w = (t + 3) / 4;
    for (int64_t j = 0; j < w; j++) {
        uint64_t r = mix(seed + (uint64_t) (row * w + j + 1) * 0x9E3779B97F4A7C15ULL);
        keep[4 * j] = (uint16_t) -((int16_t) r >= th);
        keep[4 * j + 1] = (uint16_t) -((int16_t) (r >> 16) >= th);
        keep[4 * j + 2] = (uint16_t) -((int16_t) (r >> 32) >= th);
        keep[4 * j + 3] = (uint16_t) -((int16_t) (r >> 48) >= th);
    }
}
/* probs = softmax(scores) (fp32 inside, rounded once), kept = probs where kept else +0 */
void softmax_keep_bf16(const uint16_t *scores, uint16_t *probs, uint16_t *kept, int64_t rows, int64_t t,
                       int64_t row0, uint64_t seed, int32_t threshold) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float buf[MAXT] __attribute__((aligned(64)));
        uint16_t keep[MAXT + 4] __attribute__((aligned(64)));
        const uint16_t *s = scores + r * t;
        int16_t km = -32768;                   /* max over order-preserving integer keys of the bf16 bits */
        for (int64_t i = 0; i < t; i++) {
            int16_t b = (int16_t) s[i];
            int16_t key = b ^ (int16_t) ((uint16_t) (b >> 15) >> 1);
            km = key > km ? key : km;
        }
        float m = bf2f((uint16_t) (km ^ (int16_t) ((uint16_t) (km >> 15) >> 1)));
        if (m == -__builtin_inff()) m = 0.0f;                /* a fully masked row: zeros, as below */
        float acc[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= t; i += 16)
            for (int l = 0; l < 16; l++) { float e = exp_neg(bf2f(s[i + l]) - m); buf[i + l] = e; acc[l] += e; }
        for (; i < t; i++) { float e = exp_neg(bf2f(s[i]) - m); buf[i] = e; acc[0] += e; }
        float sum = 0.0f;
        for (int l = 0; l < 16; l++) sum += acc[l];
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        row_keep(keep, row0 + r, t, seed, (int16_t) threshold);
        uint16_t *p = probs + r * t, *d = kept + r * t;
        for (int64_t j = 0; j < t; j++) { uint16_t pb = f2bf(buf[j] * inv); p[j] = pb; d[j] = pb & keep[j]; }
    }
}
/* in place: dp (the gradient of the kept probabilities) -> dS = P (dP m - rowsum(dP m P)); kept = P m */
void softmax_keep_backward_bf16(uint16_t *dp, const uint16_t *probs, uint16_t *kept, int64_t rows, int64_t t,
                                int64_t row0, uint64_t seed, int32_t threshold) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t keep[MAXT + 4] __attribute__((aligned(64)));
        uint16_t *g = dp + r * t, *d = kept + r * t;
        const uint16_t *p = probs + r * t;
        row_keep(keep, row0 + r, t, seed, (int16_t) threshold);
        float acc[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= t; i += 16)
            for (int l = 0; l < 16; l++) acc[l] += bf2f(g[i + l] & keep[i + l]) * bf2f(p[i + l]);
        for (; i < t; i++) acc[0] += bf2f(g[i] & keep[i]) * bf2f(p[i]);
        float dot = 0.0f;
        for (int l = 0; l < 16; l++) dot += acc[l];
        for (int64_t j = 0; j < t; j++) {
            d[j] = p[j] & keep[j];
            g[j] = f2bf(bf2f(p[j]) * (bf2f(g[j] & keep[j]) - dot));
        }
    }
}
"""

MAX_ROW = 8192          # the fused kernels' longest row: their stack buffers (MAXT in the C source)
_SOURCE = _SOURCE.replace("@MAX_ROW@", str(MAX_ROW))

_FUNCS = {torch.bool: "keep_u8", torch.uint8: "keep_u8", torch.int16: "keep_i16", torch.int32: "keep_i32",
          torch.int64: "keep_i64"}
_LIB: list = []          # [ctypes library or None], once per process


def _cache_dir() -> Path:
    """$CLINTUNE_KERNEL_DIR, else clintune/kernels in the user's cache (beside, not inside, the feature cache)."""
    env = os.environ.get("CLINTUNE_KERNEL_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "clintune" / "kernels"


def _torch_openmp() -> bool:
    """Whether this process already runs GNU OpenMP (PyTorch's Linux wheels bundle ``libgomp.so.1``): then a
    kernel built with ``-fopenmp`` binds to that very runtime (one library per soname) and shares its threads
    instead of starting a second team that would contend with PyTorch's for the same cores."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text() and "OpenMP" in torch.__config__.parallel_info()
    except OSError:
        return False


def _compile() -> ctypes.CDLL | None:
    from .runtime import cpu_flags

    if os.environ.get("CLINTUNE_NO_KERNELS") or os.name != "posix":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    wide = ["-mprefer-vector-width=512"] if "avx512dq" in cpu_flags() else []    # 64-bit products in zmm
    omp = ["-fopenmp"] if _torch_openmp() else []
    key = hashlib.sha256("\n".join([_SOURCE, cc, *flags, *wide, *omp, *sorted(cpu_flags())]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"masks-{key}.so"
    try:
        if not target.exists():
            with tempfile.TemporaryDirectory() as tmp, atomic_path(target) as obj:   # never a half-written .so
                src = Path(tmp) / "masks.c"
                src.write_text(_SOURCE)
                # a compiler without an option: without it (one thread where OpenMP is missing)
                for extra in dict.fromkeys(map(tuple, [wide + omp, omp, wide, []])):
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
    for name in ("softmax_keep_bf16", "softmax_keep_backward_bf16"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_uint64, ctypes.c_int32]
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



def fused_softmax_available(t: int) -> bool:
    """Whether :func:`softmax_keep` and :func:`softmax_keep_backward` run here for rows of length ``t``."""
    return t <= MAX_ROW and compiled() is not None


def _rows(*tensors: torch.Tensor) -> tuple[int, int]:
    t = tensors[0].shape[-1]
    for x in tensors:
        if x.dtype != torch.bfloat16 or not x.is_contiguous() or x.device.type != "cpu" or x.shape != tensors[0].shape:
            raise ValueError("fused softmax: contiguous CPU bf16 tensors of one shape")
    if t > MAX_ROW:
        raise ValueError(f"fused softmax: rows longer than {MAX_ROW}")
    return tensors[0].numel() // t, t


def softmax_keep(scores: torch.Tensor, probs: torch.Tensor, kept: torch.Tensor, row0: int, seed: int,
                 threshold: int) -> None:
    """probs = softmax(scores) over the last dim and kept = probs * m, bf16, in one pass (both written).

    m is :func:`attention_keep`'s mask for rows ``row0, row0 + 1, ...`` of the whole tensor; the softmax is
    accumulated in fp32 and rounded once (a 2^-24-accurate exp, so an entry differs from torch's bf16 softmax
    by at most one rounding step, rarely). A row of -inf gives zeros."""
    rows, t = _rows(scores, probs, kept)
    compiled().softmax_keep_bf16(scores.data_ptr(), probs.data_ptr(), kept.data_ptr(), rows, t, row0, seed,
                                 int(threshold))


def softmax_keep_backward(grad: torch.Tensor, probs: torch.Tensor, kept: torch.Tensor, row0: int, seed: int,
                          threshold: int) -> None:
    """In place, ``grad`` (dL/d(P m)) becomes dS = P (G - rowsum(G P)) with G = grad * m (the gradient
    through dropout and softmax; fp32 sums, rounded once), and ``kept`` = P * m, the same bits as the
    forward's. The same mask as :func:`softmax_keep` for the same ``row0`` and seed."""
    rows, t = _rows(grad, probs, kept)
    compiled().softmax_keep_backward_bf16(grad.data_ptr(), probs.data_ptr(), kept.data_ptr(), rows, t, row0, seed,
                                          int(threshold))


def attention_keep(shape: tuple[int, ...], threshold: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The fused kernels' keep-mask as 0/1 integers of ``dtype``: each row of length t takes ceil(t / 4)
    whole SplitMix64 words, i.e. :func:`draw` over rows padded to a multiple of 4, cut back to t."""
    t = shape[-1]
    t4 = (t + 3) // 4 * 4
    full = draw(torch.empty((*shape[:-1], t4), dtype=dtype), threshold, seed)
    return full if t4 == t else full[..., :t].contiguous()
