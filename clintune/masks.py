"""Dropout keep-masks at memory speed: a 20-line C loop, compiled once per machine, with a numpy fallback;
and the fused passes over memory built on it.

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
The other passes that training makes over memory are there too, each drawing its mask inline from the same
stream: dropout itself (:func:`dropout`, both directions), a frozen linear's and LoRA's input gradients summed
through LoRA's dropout (:func:`dropout_add`), a BERT sublayer's dropout + residual + LayerNorm and its
gradient (:func:`dropout_add_norm`), and GELU with its derivative (:func:`gelu_and_grad`). Where the CPU has
AVX-512 BF16, attention is one kernel too, forward (:func:`attention`: QK^T, softmax, dropout in training, and
PV per example and head in cache, with bf16 dot-product instructions) and backward (:func:`attention_backward`);
where the CPU also has AMX and Linux lends the process its tiles, the same kernels make their products on the tiles
(16 query rows at a time; the element-wise steps are the same code, so only the order of fp32 sums differs; the
library's ``attention_amx_use(0)`` turns that form off, for tests and benchmarks: :func:`amx_form`); so do
LoRA's rank-r products (:func:`lora_input`, :func:`lora_backward`; ``lora_amx_use(0)``: :func:`amx_form`'s
``lora_only``).
For int8 prediction (:mod:`clintune.quantize`) it also codes a tensor as uint8 in two passes, its range and then
its codes (:func:`quantize_u8`: PyTorch's per-tensor scheme, without PyTorch's fp32 copy of bf16 input), and
attends with 8-bit products where the CPU has AVX-512 VNNI (:func:`attention_int8`).
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
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .arena import saved_empty
from .store import atomic_path

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define THREADS() omp_get_max_threads()
#define THREAD() omp_get_thread_num()
#else
#define THREADS() 1
#define THREAD() 0
#endif
static int lora_amx_off = 0;      /* lora_amx_use(0): LoRA's kernels in their AVX-512 form (tests, benchmarks) */
void lora_amx_use(int on) { lora_amx_off = !on; }
int lora_amx_used(void) { return !lora_amx_off; }
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
/* e^x for x <= 0, -inf -> 0 (rel. err ~2e-7): with y = x log2(e), n = rint(y) and f = y - n (|f| <= 1/2),
   e^x = 2^n 2^f and 2^f is the degree-6 polynomial below (Horner, highest coefficient first). exp_neg (one value)
   evaluates these coefficients; exp2_lanes (16 lanes of 2^y, the bf16 attention kernels) a polynomial on [0, 1). */
static const float EXP2_POLY[7] = {1.5403530393381609e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
                                   5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};
#define LOG2E 1.44269504088896341f
static inline float exp_neg(float x) {
    float y = x * LOG2E;
    y = y < -126.0f ? -126.0f : y;
    float n = __builtin_rintf(y), f = y - n, q = EXP2_POLY[0];
    for (int c = 1; c < 7; c++) q = q * f + EXP2_POLY[c];
    uint32_t e = (uint32_t) ((int32_t) n + 127) << 23;
    float s; memcpy(&s, &e, 4);
    return x < -87.0f ? 0.0f : q * s;
}
#if defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define STREAM_LANES 1
/* The stream 32 elements at a time: words w .. w + 7 (z = seed + (w + 1 + lane) GAMMA; the next 8: z + 8 GAMMA)
   mixed in 64-bit lanes, whose 16-bit lanes are then elements 4 w .. 4 w + 31 in order (little-endian, as the
   scalar loops split a word), compared with th at once: bit l of the result = element 4 w + l kept */
#define GAMMA 0x9E3779B97F4A7C15ULL
static inline __m512i stream_start(uint64_t seed, int64_t w) {
    return _mm512_add_epi64(_mm512_set1_epi64((int64_t) (seed + (uint64_t) (w + 1) * GAMMA)),
                            _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64((int64_t) GAMMA)));
}
static inline __mmask32 stream_bits(__m512i *z, __m512i th) {
    __m512i x = *z;
    *z = _mm512_add_epi64(x, _mm512_set1_epi64((int64_t) (8 * GAMMA)));
    x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 30)), _mm512_set1_epi64((int64_t) 0xBF58476D1CE4E5B9ULL));
    x = _mm512_mullo_epi64(_mm512_xor_si512(x, _mm512_srli_epi64(x, 27)), _mm512_set1_epi64((int64_t) 0x94D049BB133111EBULL));
    return _mm512_cmpge_epi16_mask(_mm512_xor_si512(x, _mm512_srli_epi64(x, 31)), th);
}
#endif
/* keep[0 .. n) = the mask of flat elements k0 .. k0 + n - 1 of the stream above (as 0xFFFF / 0, for bf16 bits) */
static inline void span_keep(uint16_t *keep, int64_t k0, int64_t n, uint64_t seed, int16_t th) {
    const int64_t w0 = k0 >> 2, off = k0 & 3, words = (off + n + 3) >> 2;
    uint16_t buf[MAXT + 40] __attribute__((aligned(64)));
#ifdef STREAM_LANES
    __m512i z = stream_start(seed, w0);
    const __m512i vth = _mm512_set1_epi16(th);
    for (int64_t j = 0; j < words; j += 8)
        _mm512_store_si512(buf + 4 * j, _mm512_movm_epi16(stream_bits(&z, vth)));
#else
    for (int64_t j = 0; j < words; j++) {
        uint64_t r = mix(seed + (uint64_t) (w0 + j + 1) * 0x9E3779B97F4A7C15ULL);
        buf[4 * j] = (uint16_t) -((int16_t) r >= th);
        buf[4 * j + 1] = (uint16_t) -((int16_t) (r >> 16) >= th);
        buf[4 * j + 2] = (uint16_t) -((int16_t) (r >> 32) >= th);
        buf[4 * j + 3] = (uint16_t) -((int16_t) (r >> 48) >= th);
    }
#endif
    memcpy(keep, buf + off, (size_t) n * sizeof(uint16_t));
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
        span_keep(keep, (row0 + r) * ((t + 3) / 4) * 4, t, seed, (int16_t) threshold);   /* whole words */
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
        span_keep(keep, (row0 + r) * ((t + 3) / 4) * 4, t, seed, (int16_t) threshold);   /* whole words */
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

/* Dropout y = x m s and its backward dx = dy m s in one pass over n values each, the mask drawn inline from the
   stream above (element k from word k / 4, as the KEEP loops: span_keep), in pieces of 4096 over the threads.
   LOADx reads a value as fp32, STOREy rounds it to y's type; a dropped value is +0. */
#define DROP_PIECE 4096
#define DROPOUT(NAME, TX, TY, LOADX, STOREY)                                                   \
void NAME(const TX *x, TY *y, int64_t n, uint64_t seed, int32_t threshold, float scale) {       \
    const int16_t th = (int16_t) threshold;                                                     \
    _Pragma("omp parallel for schedule(static)")                                                \
    for (int64_t s = 0; s < n; s += DROP_PIECE) {                                               \
        uint16_t keep[DROP_PIECE] __attribute__((aligned(64)));                                 \
        const int64_t m = s + DROP_PIECE < n ? DROP_PIECE : n - s;                              \
        span_keep(keep, s, m, seed, th);                                                        \
        const TX *xs = x + s;                                                                   \
        TY *ys = y + s;                                                                         \
        for (int64_t i = 0; i < m; i++) { float v = LOADX(xs[i]) * scale; ys[i] = keep[i] ? STOREY(v) : 0; } \
    }                                                                                           \
}
static inline float f2f(float f) { return f; }
static inline uint16_t f2bf_nan(float f) {                  /* f2bf, and NaN -> 0x7FC0 as PyTorch rounds it */
    uint32_t u; memcpy(&u, &f, 4);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t) 0x7FC0u : f2bf(f);
}
static inline float bfl(uint16_t b) { return bf2f(b); }
DROPOUT(dropout_f32_bf16, float, uint16_t, f2f, f2bf_nan)
DROPOUT(dropout_bf16_bf16, uint16_t, uint16_t, bfl, f2bf_nan)
DROPOUT(dropout_f32_f32, float, float, f2f, f2f)
DROPOUT(dropout_bf16_f32, uint16_t, float, bfl, f2f)
/* out = a + b m s in fp32 for bf16 a and b: a frozen linear's input gradient plus LoRA's through its dropout */
void dropout_add_bf16_f32(const uint16_t *a, const uint16_t *b, float *out, int64_t n, uint64_t seed,
                          int32_t threshold, float scale) {
    const int16_t th = (int16_t) threshold;
    #pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < n; s += DROP_PIECE) {
        uint16_t keep[DROP_PIECE] __attribute__((aligned(64)));
        const int64_t m = s + DROP_PIECE < n ? DROP_PIECE : n - s;
        span_keep(keep, s, m, seed, th);
        for (int64_t i = 0; i < m; i++) out[s + i] = bf2f(a[s + i]) + (keep[i] ? bf2f(b[s + i]) * scale : 0.0f);
    }
}
/* int8 prediction (clintune.quantize): a tensor's range [min(x, 0), max(x, 0)] in one pass (NaN skipped), then
   its uint8 codes q = clamp(round(x / s) + z, 0, 255) in another (ties to even; NaN -> 0), x fp32 or bf16. */
#define QUANT_PIECE 8192
#ifdef __AVX512F__
#include <immintrin.h>
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *) p)), 16));
}
/* 16 lanes at a time; vminps / vmaxps return the second operand when one is NaN: NaN is skipped */
#define RANGE_LANES(LOAD16)                                                                      \
        __m512 l16 = _mm512_setzero_ps(), h16 = _mm512_setzero_ps();                             \
        for (; i + 16 <= e; i += 16) {                                                           \
            __m512 v = LOAD16(x + i); l16 = _mm512_min_ps(v, l16); h16 = _mm512_max_ps(v, h16);  \
        }                                                                                        \
        l = _mm512_reduce_min_ps(l16); h = _mm512_reduce_max_ps(h16);
/* the codes 16 lanes at a time, as the scalar loop computes them (compilers contract its x s^-1 + z into one
   fused multiply-add, as PyTorch's own coding does: one rounding, so that a value a hair from a half step goes
   the same way), clamped in fp32 (vmaxps with 0 as its second operand turns NaN into 0), then vcvtps2dq rounds
   to nearest even (the default MXCSR) and vpmovdb narrows */
#define CODE_LANES(LOAD16)                                                                       \
        const __m512 inv16 = _mm512_set1_ps(inv_scale), z16 = _mm512_set1_ps(z);                 \
        const __m512 top16 = _mm512_set1_ps(255.0f), zero16 = _mm512_setzero_ps();               \
        for (; i + 16 <= e; i += 16) {                                                           \
            __m512 v = _mm512_fmadd_ps(LOAD16(x + i), inv16, z16);                               \
            v = _mm512_min_ps(_mm512_max_ps(v, zero16), top16);                                  \
            _mm_storeu_si128((__m128i *) (q + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));  \
        }
#else
#define RANGE_LANES(LOAD16)
#define CODE_LANES(LOAD16)
#endif
/* the codes of x[i .. e - 1] (i, e, x, q, inv_scale and z in scope): CODE_LANES, then one at a time */
#define CODE_SPAN(LOAD, LOAD16)                                                                  \
        CODE_LANES(LOAD16)                                                                       \
        for (; i < e; i++) {                                                                     \
            float v = LOAD(x[i]) * inv_scale + z;                                                \
            v = v >= 0.0f ? v : 0.0f;                                                            \
            v = v <= 255.0f ? v : 255.0f;                                                        \
            q[i] = (uint8_t) (int32_t) ((v + 12582912.0f) - 12582912.0f);   /* + 1.5 * 2^23: rounds to even */ \
        }
/* y = (z - mean) rstd w + b over a row of n, yb (not NULL) y rounded to bf16, yq (not NULL) y's uint8 codes on a
   fixed range (inv = 1 / s, zero zq: quantize_u8_f32's codes, its fused multiply-add, clamp and ties to even),
   stats (not NULL) (mean, rstd) */
static inline void norm_out(const float *zi, float mean, float rstd, const float *w, const float *b, float *yi,
                            uint16_t *ybi, uint8_t *yqi, float inv, float zq, float *stats, int64_t n) {
    int64_t j;
    for (j = 0; j < n; j++) yi[j] = (zi[j] - mean) * rstd * w[j] + b[j];
    if (ybi) for (j = 0; j < n; j++) ybi[j] = f2bf_nan(yi[j]);
    if (yqi) {                                       /* quantize_u8_f32's codes, by the same code */
        const float *x = yi, inv_scale = inv, z = zq;
        uint8_t *q = yqi;
        int64_t i = 0;
        const int64_t e = n;
        CODE_SPAN(f2f, load16_f32)
    }
    if (stats) { stats[0] = mean; stats[1] = rstd; }
}
/* The LayerNorm of a row z (n values; acc: 16 partial sums of z, zeroed here), y = (z - mean) rstd w + b (y may
   be z), yb (not NULL) y rounded to bf16, yq (not NULL) y's uint8 codes on a fixed range (inv = 1 / s, zero z:
   quantize_u8_f32's codes, its fused multiply-add, clamp and ties to even), stats (not NULL) (mean, rstd) */
static inline void norm_row(const float *zi, float *acc, const float *w, const float *b, float *yi, uint16_t *ybi,
                            uint8_t *yqi, float inv, float zq, float *stats, int64_t n, float eps) {
    float sum = 0.0f;
    for (int l = 0; l < 16; l++) { sum += acc[l]; acc[l] = 0.0f; }
    const float mean = sum / (float) n;
    int64_t j;
    for (j = 0; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) { float c = zi[j + l] - mean; acc[l] += c * c; }
    for (; j < n; j++) { float c = zi[j] - mean; acc[0] += c * c; }
    float var = 0.0f;
    for (int l = 0; l < 16; l++) var += acc[l];
    norm_out(zi, mean, 1.0f / __builtin_sqrtf(var / (float) n + eps), w, b, yi, ybi, yqi, inv, zq, stats, n);
}
#ifdef __AVX512F__
/* lane r = ((0 + v[r][0]) + v[r][1]) + ... + v[r][15]: a row's 16 partial sums added in turn, as norm_row adds
   them, for 16 rows at once (t: scratch, 16 x 16) */
static inline __m512 lane_sums16(const __m512 *v, float *t) {
    for (int r = 0; r < 16; r++) _mm512_store_ps(t + 16 * r, v[r]);
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(16));
    __m512 sum = _mm512_setzero_ps();
    for (int l = 0; l < 16; l++)
        sum = _mm512_add_ps(sum, _mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(l)), t, 4));
    return sum;
}
/* norm_row for the 16 rows z, z + n, ..., z + 15 n (acc: their partial sums, 16 each; y, yb, yq and stats likewise
   row after row), bit for bit: each row's mean and variance come from the same operations in the same order,
   but with the 16 rows' chains of dependent adds side by side in the lanes of vectors instead of one row's after
   another's (a row alone waits on four chains of 16 to 24 adds, most of its LayerNorm's time) */
static inline void norm_rows16(const float *z, const __m512 *acc, const float *w, const float *b, float *y,
                               uint16_t *yb, uint8_t *yq, float inv, float zq, float *stats, int64_t n, float eps) {
    float t[256] __attribute__((aligned(64))), mean[16] __attribute__((aligned(64))), rstd[16] __attribute__((aligned(64)));
    const __m512 vn = _mm512_set1_ps((float) n);
    _mm512_store_ps(mean, _mm512_div_ps(lane_sums16(acc, t), vn));
    __m512 sq[16];
    for (int r = 0; r < 16; r++) sq[r] = _mm512_setzero_ps();
    int64_t j;
    for (j = 0; j + 16 <= n; j += 16)
        for (int r = 0; r < 16; r++) {
            const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(z + r * n + j), _mm512_set1_ps(mean[r]));
            sq[r] = _mm512_fmadd_ps(c, c, sq[r]);
        }
    if (j < n) {                                    /* the rest into lane 0, as norm_row */
        for (int r = 0; r < 16; r++) {
            float s0 = _mm512_cvtss_f32(sq[r]);
            for (int64_t k = j; k < n; k++) { float c = z[r * n + k] - mean[r]; s0 += c * c; }
            sq[r] = _mm512_mask_mov_ps(sq[r], 1, _mm512_set1_ps(s0));
        }
    }
    const __m512 var = lane_sums16(sq, t);
    _mm512_store_ps(rstd, _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_sqrt_ps(_mm512_add_ps(_mm512_div_ps(var, vn),
                                                                                          _mm512_set1_ps(eps)))));
    for (int r = 0; r < 16; r++)
        norm_out(z + r * n, mean[r], rstd[r], w, b, y + r * n, yb ? yb + r * n : 0, yq ? yq + r * n : 0, inv, zq,
                 stats ? stats + 2 * r : 0, n);
}
#endif
/* A transformer sublayer's end, z = round(h s) m + r, y = (z - mean) rstd w + b over rows of length n
   (h bf16, the rest fp32; m the stream's mask over h's flat elements, s = 1 / (1 - p)); z and (mean, rstd)
   per row are kept for the backward pass (stats NULL: not kept; z may be y). With threshold -32768 and s = 1
   every element is kept and round(h s) = h, so no mask is drawn (prediction's own pass: add_norm_pred). */
void dropout_add_norm_bf16(const uint16_t *h, const float *r, const float *w, const float *b, float *y, float *z,
                           float *stats, int64_t rows, int64_t n, uint64_t seed, int32_t threshold, float scale,
                           float eps) {
    const int drop = threshold > -32768 || scale != 1.0f;
    #pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {                   /* 16 rows at a time (norm_rows16) */
        const int64_t nr = rows - i0 < 16 ? rows - i0 : 16;
        float acc[16][16] __attribute__((aligned(64)));     /* each row's 16 partial sums of z */
        for (int64_t i = i0; i < i0 + nr; i++) {
            uint16_t keep[MAXT] __attribute__((aligned(64)));
            if (drop) span_keep(keep, i * n, n, seed, (int16_t) threshold);
            const uint16_t *hi = h + i * n;
            const float *ri = r + i * n;
            float *zi = z + i * n, *a = acc[i - i0];
            for (int l = 0; l < 16; l++) a[l] = 0.0f;
            int64_t j = 0;
            if (drop) {          /* two loops: a test inside one made the no-dropout pass 1.5x slower */
                for (; j + 16 <= n; j += 16)
                    for (int l = 0; l < 16; l++) {
                        float v = bf2f(f2bf(bf2f(hi[j + l]) * scale) & keep[j + l]) + ri[j + l];
                        zi[j + l] = v; a[l] += v;
                    }
                for (; j < n; j++) { float v = bf2f(f2bf(bf2f(hi[j]) * scale) & keep[j]) + ri[j]; zi[j] = v; a[0] += v; }
            } else {
                for (; j + 16 <= n; j += 16)
                    for (int l = 0; l < 16; l++) { float v = bf2f(hi[j + l]) + ri[j + l]; zi[j + l] = v; a[l] += v; }
                for (; j < n; j++) { float v = bf2f(hi[j]) + ri[j]; zi[j] = v; a[0] += v; }
            }
        }
#ifdef __AVX512F__
        if (nr == 16)
            norm_rows16(z + i0 * n, (const __m512 *) acc, w, b, y + i0 * n, 0, 0, 1.0f, 0.0f, stats ? stats + 2 * i0 : 0,
                        n, eps);
        else
#endif
            for (int64_t i = i0; i < i0 + nr; i++)
                norm_row(z + i * n, acc[i - i0], w, b, y + i * n, 0, 0, 1.0f, 0.0f, stats ? stats + 2 * i : 0, n, eps);
    }
}
/* Prediction's sublayer end, y = LayerNorm(h + r) over rows of n (h bf16, r and y fp32), with y16 (not NULL) y
   rounded to bf16 and yq (not NULL) y's uint8 codes (inv = 1 / s, zero) from the same pass: the very bits of
   dropout_add_norm_bf16 with every element kept (no mask) and nothing kept for a backward pass, z = h + r held
   in a buffer of 16 rows per thread (in cache) instead of written to y and read back. Returns -1 without memory
   for the buffers (nothing written), else 0. */
int add_norm_pred(const uint16_t *h, const float *r, const float *w, const float *b, float *y, uint16_t *y16,
                  int64_t rows, int64_t n, float eps, uint8_t *yq, float inv, int32_t zero) {
    float *zs = aligned_alloc(64, ((size_t) THREADS() * 16 * n * 4 + 63) / 64 * 64);
    if (!zs) return -1;
    #pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
        const int64_t nr = rows - i0 < 16 ? rows - i0 : 16;
        float *z = zs + (int64_t) THREAD() * 16 * n;
        float acc[16][16] __attribute__((aligned(64)));     /* each row's 16 partial sums of z */
        for (int64_t i = i0; i < i0 + nr; i++) {
            const uint16_t *hi = h + i * n;
            const float *ri = r + i * n;
            float *zi = z + (i - i0) * n, *a = acc[i - i0];
            for (int l = 0; l < 16; l++) a[l] = 0.0f;
            int64_t j = 0;
            for (; j + 16 <= n; j += 16)
                for (int l = 0; l < 16; l++) { float v = bf2f(hi[j + l]) + ri[j + l]; zi[j + l] = v; a[l] += v; }
            for (; j < n; j++) { float v = bf2f(hi[j]) + ri[j]; zi[j] = v; a[0] += v; }
        }
#ifdef __AVX512F__
        if (nr == 16)
            norm_rows16(z, (const __m512 *) acc, w, b, y + i0 * n, y16 ? y16 + i0 * n : 0, yq ? yq + i0 * n : 0, inv,
                        (float) zero, 0, n, eps);
        else
#endif
            for (int64_t i = 0; i < nr; i++)
                norm_row(z + i * n, acc[i], w, b, y + (i0 + i) * n, y16 ? y16 + (i0 + i) * n : 0,
                         yq ? yq + (i0 + i) * n : 0, inv, (float) zero, 0, n, eps);
    }
    free(zs);
    return 0;
}
/* Prediction's embeddings (BERT's code), z = (word[id] + type[tt]) + pos[p] in fp32 (PyTorch's order of the two
   adds), then the LayerNorm as above, y fp32 and yb (not NULL) its bf16 rounding: the gathers, the adds and the
   LayerNorm in one pass over each token's row, yq (not NULL) its uint8 codes as norm_row writes them. types NULL:
   type row 0 for every token. Returns the number of
   rows with an id, a position or a type outside its table (those rows are left unwritten). */
int64_t embed_norm_f32(const int64_t *ids, const int64_t *pos, const int64_t *types, const float *word,
                       const float *posw, const float *typew, const float *w, const float *b, float *y,
                       uint16_t *yb, int64_t rows, int64_t n, int64_t nword, int64_t npos, int64_t ntype, float eps,
                       uint8_t *yq, float inv, int32_t zero) {
    int64_t bad = 0;
    #pragma omp parallel for schedule(static) reduction(+:bad)
    for (int64_t i = 0; i < rows; i++) {
        const int64_t id = ids[i], p = pos[i], tt = types ? types[i] : 0;
        if (id < 0 || id >= nword || p < 0 || p >= npos || tt < 0 || tt >= ntype) { bad++; continue; }
        const float *wi = word + id * n, *pi = posw + p * n, *ti = typew + tt * n;
        float *yi = y + i * n;
        float acc[16] = {0};
        int64_t j = 0;
        for (; j + 16 <= n; j += 16)
            for (int l = 0; l < 16; l++) { float v = (wi[j + l] + ti[j + l]) + pi[j + l]; yi[j + l] = v; acc[l] += v; }
        for (; j < n; j++) { float v = (wi[j] + ti[j]) + pi[j]; yi[j] = v; acc[0] += v; }
        norm_row(yi, acc, w, b, yi, yb ? yb + i * n : 0, yq ? yq + i * n : 0, inv, (float) zero, 0, n, eps);
    }
    return bad;
}
/* its gradients: dz = rstd (g - mean(g) - x mean(g x)) with g = dy w and x = (z - mean) rstd (a frozen w);
   dr = dz (when dr is not NULL), dh = round(round(dz) m s), as autograd's cast and dropout's backward make. */
void dropout_add_norm_backward_bf16(const float *dy, const float *z, const float *stats, const float *w, float *dr,
                                    uint16_t *dh, int64_t rows, int64_t n, uint64_t seed, int32_t threshold,
                                    float scale) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        uint16_t keep[MAXT] __attribute__((aligned(64)));
        span_keep(keep, i * n, n, seed, (int16_t) threshold);
        const float *dyi = dy + i * n, *zi = z + i * n;
        const float mean = stats[2 * i], rstd = stats[2 * i + 1];
        float ag[16] = {0}, agx[16] = {0};
        int64_t j = 0;
        for (; j + 16 <= n; j += 16)
            for (int l = 0; l < 16; l++) {
                float g = dyi[j + l] * w[j + l];
                ag[l] += g; agx[l] += g * ((zi[j + l] - mean) * rstd);
            }
        for (; j < n; j++) { float g = dyi[j] * w[j]; ag[0] += g; agx[0] += g * ((zi[j] - mean) * rstd); }
        float sg = 0.0f, sgx = 0.0f;
        for (int l = 0; l < 16; l++) { sg += ag[l]; sgx += agx[l]; }
        const float mg = sg / (float) n, mgx = sgx / (float) n;
        float *dri = dr ? dr + i * n : 0;
        uint16_t *dhi = dh + i * n;
        for (j = 0; j < n; j++) {
            float d = rstd * (dyi[j] * w[j] - mg - (zi[j] - mean) * rstd * mgx);
            if (dri) dri[j] = d;
            dhi[j] = f2bf(bf2f(f2bf(d)) * scale) & keep[j];
        }
    }
}
/* GELU y = x Phi(x) and its derivative d = Phi(x) + x phi(x) in one pass, bf16 in and out (fp32 inside);
   Phi(-|x|) = erfc(|x| / sqrt 2) / 2 by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), whose
   exp(-x^2 / 2) is also phi's. */
void gelu_and_grad_bf16(const uint16_t *x, uint16_t *y, uint16_t *d, int64_t n) {
    #pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < n; s += 4096) {
        const int64_t e = s + 4096 < n ? s + 4096 : n;
        for (int64_t i = s; i < e; i++) {
            float v = bf2f(x[i]);
            float a = __builtin_fabsf(v) * 0.70710678118654752f;
            float g = exp_neg(-a * a);
            float t = 1.0f / (1.0f + 0.3275911f * a);
            float p = 1.061405429f;
            p = p * t - 1.453152027f; p = p * t + 1.421413741f; p = p * t - 0.284496736f; p = p * t + 0.254829592f;
            float tail = 0.5f * t * p * g;
            float cdf = v >= 0.0f ? 1.0f - tail : tail;
            y[i] = f2bf(v * cdf);
            d[i] = f2bf(cdf + v * 0.39894228040143268f * g);
        }
    }
}
/* out = round(g d), bf16 (GELU's backward from the kept derivative) */
void mul_bf16(const uint16_t *g, const uint16_t *d, uint16_t *out, int64_t n) {
    #pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < n; s += 8192) {
        const int64_t e = s + 8192 < n ? s + 8192 : n;
        for (int64_t i = s; i < e; i++) out[i] = f2bf(bf2f(g[i]) * bf2f(d[i]));
    }
}
#define RANGE_U8(NAME, T, LOAD, LOAD16)                                                          \
void NAME(const T *x, int64_t n, float *out) {                                                   \
    float lo = 0.0f, hi = 0.0f;                                                                  \
    _Pragma("omp parallel for schedule(static) reduction(min:lo) reduction(max:hi)")            \
    for (int64_t s = 0; s < n; s += QUANT_PIECE) {                                               \
        const int64_t e = s + QUANT_PIECE < n ? s + QUANT_PIECE : n;                             \
        int64_t i = s;                                                                           \
        float l = 0.0f, h = 0.0f;                                                                \
        RANGE_LANES(LOAD16)                                                                      \
        for (; i < e; i++) { float v = LOAD(x[i]); l = v < l ? v : l; h = v > h ? v : h; }       \
        lo = l < lo ? l : lo; hi = h > hi ? h : hi;                                              \
    }                                                                                            \
    out[0] = lo; out[1] = hi;                                                                    \
}
#define QUANTIZE_U8(NAME, T, LOAD, LOAD16)                                                       \
void NAME(const T *x, uint8_t *q, int64_t n, float inv_scale, int32_t zero_point) {              \
    const float z = (float) zero_point;                                                          \
    _Pragma("omp parallel for schedule(static)")                                                 \
    for (int64_t s = 0; s < n; s += QUANT_PIECE) {                                               \
        const int64_t e = s + QUANT_PIECE < n ? s + QUANT_PIECE : n;                             \
        int64_t i = s;                                                                           \
        CODE_SPAN(LOAD, LOAD16)                                                                  \
    }                                                                                            \
}
RANGE_U8(range_f32, float, f2f, load16_f32)
RANGE_U8(range_bf16, uint16_t, bfl, load16_bf16)
QUANTIZE_U8(quantize_u8_f32, float, f2f, load16_f32)
QUANTIZE_U8(quantize_u8_bf16, uint16_t, bfl, load16_bf16)
/* LoRA's backward for rank r <= 16 over m rows, after the frozen product's input gradient gw = g W (bf16, m x k),
   for G <= LORA_GROUPS LoRA linears on one input x (G = 3: query, key and value, their frozen products one
   product of the concatenated weights W = [W_1; ..; W_G]): with g (m x G n, row stride ldg) the output gradients
   side by side, g_e its columns e n .. (e + 1) n - 1, and per linear e B_e (n x r), U_e = drop_e(x) A_e^T (m x r),
   drop_e(x) (m x k), A_e (r x k), all bf16,
       dU_e = s g_e B_e (fp32, never rounded),  dB_e = s U_e^T g_e -> db[e] (n x r),  dA_e = dU_e^T drop_e(x) -> da[e],
       dx = gw + sum_e (dU_e A_e) m_e / (1 - p) -> dx (m x k)  (dx NULL: not wanted),
   m_e the dropout's mask of linear e (seeds[e], threshold: element i k + j of drop_e(x)), sums in fp32, added in
   the order e = 0, 1, ... Two passes over each of g and drop(x) become one over the four rows at a time: the
   rank-r products as broadcasts into 16 lanes (r padded with zeros), dB and dA summed per thread (n x 16 and
   k x 16, in cache) and then over the threads in turn; dx's row once for all G. n and k multiples of 16.
   Returns -1 without memory. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
int lora_kernels_available(void) { return 1; }
#define LORA_ROWS 4
#define LORA_GROUPS 4
/* row i of dx = gw + sum_e (dU_e A_e) m_e / (1 - p) from row i's dU_e (fp32, 16 lanes, 0 past r; du[e]) and A_e
   (r x k, fp32; ap + e r k); keep: G rows of MAXT */
static inline void lora_dx_row(float *dx, const uint16_t *gw, const __m512 *du, const float *ap, int64_t i, int64_t k,
                               int64_t r, int64_t groups, const uint64_t *seeds, int16_t th, float dscale,
                               uint16_t *keep) {
    float d[LORA_GROUPS][16] __attribute__((aligned(64)));
    for (int64_t e = 0; e < groups; e++) {
        _mm512_store_ps(d[e], _mm512_mul_ps(du[e], _mm512_set1_ps(dscale)));
        span_keep(keep + e * MAXT, i * k, k, seeds[e], th);
    }
    for (int64_t j = 0; j < k; j += 16) {
        __m512 base = load16_bf16(gw + i * k + j);
        for (int64_t e = 0; e < groups; e++) {
            const float *ae = ap + e * r * k;
            __m512 v = _mm512_setzero_ps();
            for (int64_t c = 0; c < r; c++)
                v = _mm512_fmadd_ps(_mm512_set1_ps(d[e][c]), _mm512_loadu_ps(ae + c * k + j), v);
            const __mmask16 kept = _mm256_movepi16_mask(_mm256_load_si256((const __m256i *) (keep + e * MAXT + j)));
            base = _mm512_mask_add_ps(base, kept, base, v);
        }
        _mm512_storeu_ps(dx + i * k + j, base);
    }
}
/* A_e (r x k bf16, e < groups) in fp32 into ap (groups r k); B_e (n x r) per 16 lanes into bp (groups n 16), or
   none where bp is NULL */
static void lora_unpack(float *ap, float *bp, const uint16_t *const *a, const uint16_t *const *bmat, int64_t n,
                        int64_t k, int64_t r, int64_t groups) {
    for (int64_t e = 0; e < groups; e++) {
        for (int64_t i = 0; i < r * k; i++) ap[e * r * k + i] = bf2f(a[e][i]);
        if (bp)
            for (int64_t j = 0; j < n; j++)
                for (int64_t c = 0; c < 16; c++) bp[(e * n + j) * 16 + c] = c < r ? bf2f(bmat[e][j * r + c]) : 0.0f;
    }
}
/* the threads' sums in turn (part: nt areas own floats apart, linear e's at e (n + k) 16): dB_e = s (its sums) into
   db[e] (n x r), dA_e into da[e] (r x k); element (j, c) of dB^T's sums at j 16 + c, of dA's at n 16 + j 16 + c
   (amx: c n + j and n 16 + c k + j) */
static void lora_sums(const float *part, int64_t own, int nt, float *const *da, float *const *db, int64_t n, int64_t k,
                      int64_t r, int64_t groups, float scaling, int amx) {
    for (int64_t e = 0; e < groups; e++) {
        const float *s = part + e * (n + k) * 16;
        for (int64_t j = 0; j < n; j++)
            for (int64_t c = 0; c < r; c++) {
                float t = 0.0f;
                for (int p = 0; p < nt; p++) t += s[p * own + (amx ? c * n + j : j * 16 + c)];
                db[e][j * r + c] = t * scaling;
            }
        for (int64_t c = 0; c < r; c++)
            for (int64_t j = 0; j < k; j++) {
                float t = 0.0f;
                for (int p = 0; p < nt; p++) t += s[p * own + n * 16 + (amx ? c * k + j : j * 16 + c)];
                da[e][c * k + j] = t;
            }
    }
}
static int lora_backward_vec(const uint16_t *g, int64_t ldg, const uint16_t *const *bmat, const uint16_t *const *u,
                             const uint16_t *const *dropped, int64_t ldd, const uint16_t *const *a, const uint16_t *gw,
                             float *const *da, float *const *db, float *dx, int64_t m, int64_t n, int64_t k, int64_t r,
                             int64_t groups, float scaling, const uint64_t *seeds, int32_t threshold, float dscale) {
    const int nt = THREADS();
    /* a thread's floats: its sums (x 16), four rows of g and of drop(x) in fp32, the G masks' rows (MAXT each) */
    const int64_t own = groups * (n + k) * 16 + (n + k) * LORA_ROWS + groups * MAXT / 2;
    float *bp = aligned_alloc(64, (size_t) (groups * (n * 16 + r * k) + nt * own) * 4);
    if (!bp) return -1;
    float *ap = bp + groups * n * 16, *part = ap + groups * r * k;
    lora_unpack(ap, bp, a, bmat, n, k, r, groups);
    memset(part, 0, (size_t) nt * own * 4);
    const int16_t th = (int16_t) threshold;
    #pragma omp parallel
    {
        float *sums = part + (int64_t) THREAD() * own, *gf = sums + groups * (n + k) * 16, *df = gf + LORA_ROWS * n;
        uint16_t *keep = (uint16_t *) (df + LORA_ROWS * k);
        #pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < m; i0 += LORA_ROWS) {
            __m512 du[LORA_ROWS][LORA_GROUPS];
            for (int64_t e = 0; e < groups; e++) {
                float *pdb = sums + e * (n + k) * 16, *pda = pdb + n * 16;
                const float *be = bp + e * n * 16;
                __m512 uv[LORA_ROWS];
                for (int q = 0; q < LORA_ROWS; q++) {  /* the rows in fp32 (broadcast from memory below); past m: 0 */
                    float uq[16] __attribute__((aligned(64))) = {0};
                    if (i0 + q < m) {
                        const uint16_t *gq = g + (i0 + q) * ldg + e * n, *dq = dropped[e] + (i0 + q) * ldd;
                        for (int64_t j = 0; j < n; j += 16) _mm512_store_ps(gf + q * n + j, load16_bf16(gq + j));
                        for (int64_t j = 0; j < k; j += 16) _mm512_store_ps(df + q * k + j, load16_bf16(dq + j));
                        for (int64_t c = 0; c < r; c++) uq[c] = bf2f(u[e][(i0 + q) * r + c]);
                    } else {
                        memset(gf + q * n, 0, (size_t) n * 4);
                        memset(df + q * k, 0, (size_t) k * 4);
                    }
                    uv[q] = _mm512_load_ps(uq);
                    du[q][e] = _mm512_setzero_ps();
                }
                for (int64_t j = 0; j < n; j++) {           /* dU rows (4 chains), dB^T += U^T g */
                    const __m512 bj = _mm512_load_ps(be + j * 16);
                    __m512 acc = _mm512_load_ps(pdb + j * 16);
                    for (int q = 0; q < LORA_ROWS; q++) {
                        const __m512 gq = _mm512_set1_ps(gf[q * n + j]);
                        du[q][e] = _mm512_fmadd_ps(gq, bj, du[q][e]);
                        acc = _mm512_fmadd_ps(gq, uv[q], acc);
                    }
                    _mm512_store_ps(pdb + j * 16, acc);
                }
                for (int q = 0; q < LORA_ROWS; q++) du[q][e] = _mm512_mul_ps(du[q][e], _mm512_set1_ps(scaling));
                for (int64_t j = 0; j < k; j++) {           /* dA^T += drop(x)^T dU */
                    __m512 acc = _mm512_load_ps(pda + j * 16);
                    for (int q = 0; q < LORA_ROWS; q++)
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(df[q * k + j]), du[q][e], acc);
                    _mm512_store_ps(pda + j * 16, acc);
                }
            }
            if (!dx) continue;
            for (int q = 0; q < LORA_ROWS && i0 + q < m; q++)
                lora_dx_row(dx, gw, du[q], ap, i0 + q, k, r, groups, seeds, th, dscale, keep);
        }
    }
    lora_sums(part, own, nt, da, db, n, k, r, groups, scaling, 0);
    free(bp);
    return 0;
}
/* LoRA's forward around the frozen product (rank r <= 16, k and n multiples of 16), m rows of fp32 x (m x k), for
   G linears on x as lora_backward_bf16's:
   lora_input: xb = bf16(x) (the product's input), drop_e(x) = bf16(x / (1 - p)) m_e (dropped[e], m_e from
   seeds[e]; dropped NULL when p = 0, where drop_e(x) is xb) and U_e = drop_e(x) A_e^T (u[e], m x r, fp32 sums
   rounded once), four rows at a time in one pass over x;
   lora_output: y = bf16(y + s U B^T) in place over one linear's bf16 product y (m x n), the update summed in fp32
   and added before the one rounding (G linears fold theirs into one product: lora_input's ldx) */
/* row i of xb = bf16(x) (xb NULL: not written) and of drop(x) (NULL: no dropout, drop(x) is xb), and drop(x)'s
   row in fp32 into df */
static inline void lora_input_row(const float *x, uint16_t *xb, int64_t ldx, uint16_t *dropped, float *df, int64_t i,
                                  int64_t k, uint64_t seed, int16_t th, float dscale, uint16_t *keep) {
    const float *xi = x + i * k;
    uint16_t *bi = xb ? xb + i * ldx : NULL, *di = dropped ? dropped + i * k : bi;
    if (dropped) span_keep(keep, i * k, k, seed, th);
    for (int64_t j = 0; j < k; j += 16) {
        const __m512 v = _mm512_loadu_ps(xi + j);
        __m256i h = (__m256i) _mm512_cvtneps_pbh(v);
        if (bi) _mm256_storeu_si256((__m256i *) (bi + j), h);
        if (dropped) {
            const __mmask16 kept = _mm256_movepi16_mask(_mm256_load_si256((const __m256i *) (keep + j)));
            h = _mm256_maskz_mov_epi16(kept, (__m256i) _mm512_cvtneps_pbh(_mm512_mul_ps(v, _mm512_set1_ps(dscale))));
            _mm256_storeu_si256((__m256i *) (di + j), h);
        }
        if (df) _mm512_store_ps(df + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
}
/* rows i0 .. i0 + rows - 1 of linear e's input side: of xb only for e = 0, of drop_e(x) where there is dropout
   (without, linear e > 0 reads xb, which e = 0 wrote) */
static inline void lora_group_rows(const float *x, uint16_t *xb, int64_t ldx, uint16_t *const *dropped, float *df,
                                  int64_t e, int64_t i0, int64_t rows, int64_t k, const uint64_t *seeds, int16_t th,
                                  float dscale, uint16_t *keep) {
    if (e > 0 && !dropped) return;
    for (int64_t q = 0; q < rows; q++)
        lora_input_row(x, e == 0 ? xb : NULL, ldx, dropped ? dropped[e] : NULL, df ? df + q * k : NULL, i0 + q, k,
                       seeds[e], th, dscale, keep);
}
/* row i of U_e (fp32 sums t, rounded once) into u[e] and, where xb's rows are wider than x's (ldx > k), into xb's
   columns k + e r .. k + (e + 1) r - 1 too, the columns past all G zeroed with the last: [xb | U_1 .. U_G | 0],
   the frozen product's input with the updates folded in */
static inline void lora_u_row(const float *t, uint16_t *const *u, uint16_t *xb, int64_t ldx, int64_t i, int64_t k,
                              int64_t r, int64_t e, int64_t groups) {
    for (int64_t c = 0; c < r; c++) u[e][i * r + c] = f2bf(t[c]);
    if (ldx == k) return;
    uint16_t *row = xb + i * ldx + k;
    memcpy(row + e * r, u[e] + i * r, (size_t) r * 2);
    if (e == groups - 1) memset(row + groups * r, 0, (size_t) (ldx - k - groups * r) * 2);
}
static int lora_input_vec(const float *x, const uint16_t *const *a, uint16_t *xb, int64_t ldx, uint16_t *const *dropped,
                          uint16_t *const *u, int64_t m, int64_t k, int64_t r, int64_t groups, const uint64_t *seeds,
                          int32_t threshold, float dscale) {
    float *at = aligned_alloc(64, (size_t) (groups * k * 16 + THREADS() * LORA_ROWS * k) * 4);
    if (!at) return -1;
    for (int64_t e = 0; e < groups; e++)
        for (int64_t j = 0; j < k; j++)
            for (int64_t c = 0; c < 16; c++) at[(e * k + j) * 16 + c] = c < r ? bf2f(a[e][c * k + j]) : 0.0f;
    const int16_t th = (int16_t) threshold;
    #pragma omp parallel
    {
        uint16_t keep[MAXT] __attribute__((aligned(64)));
        float *df = at + groups * k * 16 + (int64_t) THREAD() * LORA_ROWS * k;   /* drop(x)'s rows in fp32; past m: 0 */
        #pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < m; i0 += LORA_ROWS) {
            const int64_t rows = m - i0 < LORA_ROWS ? m - i0 : LORA_ROWS;
            if (rows < LORA_ROWS) memset(df + rows * k, 0, (size_t) (LORA_ROWS - rows) * k * 4);
            for (int64_t e = 0; e < groups; e++) {
                lora_group_rows(x, xb, ldx, dropped, df, e, i0, rows, k, seeds, th, dscale, keep);
                const float *ae = at + e * k * 16;
                __m512 acc[LORA_ROWS];
                for (int q = 0; q < LORA_ROWS; q++) acc[q] = _mm512_setzero_ps();
                for (int64_t j = 0; j < k; j++) {            /* U rows: four chains of broadcasts from memory */
                    const __m512 aj = _mm512_load_ps(ae + j * 16);
                    for (int q = 0; q < LORA_ROWS; q++)
                        acc[q] = _mm512_fmadd_ps(_mm512_set1_ps(df[q * k + j]), aj, acc[q]);
                }
                for (int q = 0; q < rows; q++) {
                    float t[16] __attribute__((aligned(64)));
                    _mm512_store_ps(t, acc[q]);
                    lora_u_row(t, u, xb, ldx, i0 + q, k, r, e, groups);
                }
            }
        }
    }
    free(at);
    return 0;
}
int lora_output_bf16(uint16_t *y, const uint16_t *u, const uint16_t *b, int64_t m, int64_t n, int64_t r,
                     float scaling) {
    float *bt = aligned_alloc(64, (size_t) r * n * 4);
    if (!bt) return -1;
    for (int64_t c = 0; c < r; c++)
        for (int64_t j = 0; j < n; j++) bt[c * n + j] = bf2f(b[j * r + c]);
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; i++) {
        float uc[16];
        for (int64_t c = 0; c < r; c++) uc[c] = bf2f(u[i * r + c]);
        uint16_t *yi = y + i * n;
        for (int64_t j = 0; j < n; j += 16) {
            __m512 v = _mm512_setzero_ps();
            for (int64_t c = 0; c < r; c++) v = _mm512_fmadd_ps(_mm512_set1_ps(uc[c]), _mm512_load_ps(bt + c * n + j), v);
            _mm256_storeu_si256((__m256i *) (yi + j), (__m256i) _mm512_cvtneps_pbh(
                _mm512_fmadd_ps(v, _mm512_set1_ps(scaling), load16_bf16(yi + j))));
        }
    }
    free(bt);
    return 0;
}
#else                                 /* never called: lora_kernels_available() says so */
int lora_kernels_available(void) { return 0; }
int lora_output_bf16(void) { return -1; }
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#include <stdlib.h>
int attention_bf16_available(void) { return 1; }
/* keys j0..j0+15 that row mask m lets be attended (m NULL: all) and that exist (j < t), as a lane mask */
static inline __mmask16 attended16(const uint8_t *m, int64_t j0, int64_t t) {
    const int64_t left = t - j0;
    __mmask16 keep = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16) ((1u << left) - 1) : 0;
    if (m) { __m128i mb = _mm_maskz_loadu_epi8(keep, m + j0); keep &= _mm_test_epi8_mask(mb, mb); }
    return keep;
}
/* The blocks both attention kernels are made of. pack_keys lays out rows 0..t-1 of x (row stride ld, d wide) so
   that one AVX-512 BF16 dot product (vdpbf16ps) makes 16 rows' partial dot products with a pair of dimensions of a
   broadcast row: xp[(j / 16) (d / 2) 16 + c 16 + j % 16] = dimensions (2c, 2c + 1) of row j. pack_pairs lays them
   out so that one makes 16 dimensions of a weighted sum of two rows: xp[jp d + c] = x[2 jp, c] | x[2 jp + 1, c] << 16.
   Both write zeros for the rows t..tp-1. */
/* rows 0..rows-1 of x (ld apart, d wide) into a block of R rows, d apart; the block's rows past them 0 */
static inline void gather_rows(uint16_t *block, const uint16_t *x, int64_t rows, int64_t R, int64_t ld, int64_t d) {
    memset(block, 0, (size_t) R * d * 2);
    for (int64_t r = 0; r < rows; r++) memcpy(block + r * d, x + r * ld, d * 2);
}
static void pack_keys(uint32_t *xp, const uint16_t *x, int64_t t, int64_t tp, int64_t ld, int64_t d) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int32_t) ld));       /* 16 rows' offsets, bf16s */
    for (int64_t j0 = 0; j0 < tp; j0 += 16) {            /* one gather a pair of dimensions: 16 rows' words */
        const __mmask16 real = attended16(0, j0, t);
        const uint16_t *x0 = x + j0 * ld;
        for (int64_t c = 0; c < d / 2; c++)
            _mm512_storeu_si512(xp + (j0 / 16) * (d / 2) * 16 + c * 16, _mm512_mask_i32gather_epi32(
                _mm512_setzero_si512(), real, _mm512_add_epi32(rows, _mm512_set1_epi32((int32_t) (2 * c))), x0, 2));
    }
}
static void pack_pairs(uint32_t *xp, const uint16_t *x, int64_t t, int64_t tp, int64_t ld, int64_t d) {
    for (int64_t jp = 0; jp < tp / 2; jp++)                 /* two rows' 16 dimensions interleaved at a time */
        for (int64_t c = 0; c < d; c += 16) {
            const __m256i z = _mm256_setzero_si256();
            __m256i lo = 2 * jp < t ? _mm256_loadu_si256((const __m256i *) (x + 2 * jp * ld + c)) : z;
            __m256i hi = 2 * jp + 1 < t ? _mm256_loadu_si256((const __m256i *) (x + (2 * jp + 1) * ld + c)) : z;
            _mm512_storeu_si512(xp + jp * d + c, _mm512_or_si512(_mm512_cvtepu16_epi32(lo),
                                                                 _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16)));
        }
}
/* ROWS_DOT: S[r, j] = MULT sum_c A[r, c] X[j, c] in fp32 for R rows A (R x D bf16) and XP = pack_keys(X), j < TP.
   ROWS_TIMES: O[r][u] += sum_j W[r, j] Y[j, 16 u ..] in fp32 registers for R rows W (R x TP bf16) and
   YP = pack_pairs(Y). */
#define ROWS_DOT(D, R, S, A, XP, TP, MULT)                                                                    \
    for (int64_t j0 = 0; j0 < (TP); j0 += 16) {                                                              \
        __m512 acc_[R];                                                                                      \
        for (int r = 0; r < R; r++) acc_[r] = _mm512_setzero_ps();                                           \
        const uint32_t *xc_ = (XP) + (j0 / 16) * (D / 2) * 16;                                               \
        for (int64_t c = 0; c < D / 2; c++) {                                                                \
            __m512bh xv_ = (__m512bh) _mm512_load_si512(xc_ + c * 16);                                       \
            for (int r = 0; r < R; r++) {                                                                    \
                int32_t a_; memcpy(&a_, (A) + r * D + 2 * c, 4);                                             \
                acc_[r] = _mm512_dpbf16_ps(acc_[r], (__m512bh) _mm512_set1_epi32(a_), xv_);                 \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < R; r++) _mm512_store_ps((S) + r * (TP) + j0, _mm512_mul_ps(acc_[r], _mm512_set1_ps(MULT))); \
    }
#define ROWS_TIMES(D, R, O, W, YP, TP)                                                                        \
    for (int r = 0; r < R; r++) for (int u = 0; u < D / 16; u++) O[r][u] = _mm512_setzero_ps();              \
    for (int64_t jp = 0; jp < (TP) / 2; jp++) {                                                              \
        __m512bh yv_[D / 16];                                                                                \
        for (int u = 0; u < D / 16; u++) yv_[u] = (__m512bh) _mm512_load_si512((YP) + jp * D + u * 16);      \
        for (int r = 0; r < R; r++) {                                                                        \
            int32_t w_; memcpy(&w_, (W) + r * (TP) + 2 * jp, 4);                                             \
            __m512bh wb_ = (__m512bh) _mm512_set1_epi32(w_);                                                 \
            for (int u = 0; u < D / 16; u++) O[r][u] = _mm512_dpbf16_ps(O[r][u], wb_, yv_[u]);              \
        }                                                                                                    \
    }
/* Attention, one (example, head) per task: K packed so that one AVX-512 BF16 dot product
   (vdpbf16ps) makes 16 keys' partial scores for a pair of dimensions of a broadcast query, V packed so that one
   makes 16 output dimensions for a pair of keys. S = Q K^T * scale in fp32 for R query rows at a time (in L1),
   masked (mask[b, i, j] == 0 -> -inf), softmax in fp32 (softmax_row) rounded once to bf16 P, O = P V in fp32
   rounded once; written to out[b, i, h, :]. Prediction: P holds the unnormalised weights e, and O's row is
   scaled by 1 / sum e before its rounding. Training (probs given): P is also written to probs, and O is made
   from P m (dropout, softmax_keep's mask) and scaled by dscale = 1 / (1 - p) before its rounding. */
/* Example b: t tokens (tp: t rounded up to 16), its q, k and v rows from elements qo, ko and vo on (rows st[2],
   st[5], st[8] apart), its output rows from row o0 of out (B T, h, d) on. starts NULL: B examples of tmax tokens
   each (q's examples st[0] apart, k's st[3], v's st[6]). starts (B + 1 offsets; prediction, no mask): B sequences
   packed one after another in a single example, sequence b its rows starts[b] .. starts[b + 1] - 1. */
#define SEQUENCE_OF(b)                                                                                       \
    const int64_t t = starts ? starts[b + 1] - starts[b] : tmax, tp = (t + 15) / 16 * 16;                    \
    const int64_t o0 = starts ? starts[b] : b * tmax;                                                        \
    const int64_t qo = starts ? starts[b] * st[2] : b * st[0], ko = starts ? starts[b] * st[5] : b * st[3],  \
                  vo = starts ? starts[b] * st[8] : b * st[6];
#define MAXA @MAX_ATT@
/* The element-wise steps of the attention kernels, per query row (the products around them differ: AVX-512 BF16
   dot products or AMX tiles). softmax_row: scores s (fp32, keys 0..tp-1) times mult (> 0) -> p, the softmax over
   the keys that exist (j < t) and that row mask mr lets be attended (NULL: all), in fp32, e_j = 2^(c s_j - c m)
   with c = mult log2(e) and m the largest score (exp2_lanes), rounded once to bf16, 0 elsewhere; a row with
   nothing to attend gives zeros. Training (probs_row given): p = e / sum e, kept there, and p becomes P m
   (span_keep's mask from key keep0 on). Prediction (inv given): p = e itself, and *inv = 1 / sum e, by which the
   caller scales the row of P V (the normalisation deferred, as flash attention does: one pass over the row fewer,
   and bf16(e) / sum e has bf16(e / sum e)'s relative rounding). grad_row: g = dP times mult (fp32) -> G = g m,
   then ds = P (G - rowsum(G P)) rounded once and pm = P m, both 0 from t to tp. */
/* 2^f on [0, 1), degree 5 (near-minimax in relative error, Horner, highest first): 1.6e-7 relative error in fp32
   Horner, as EXP2_POLY's on [-1/2, 1/2] */
static const float EXP2_UNIT[6] = {1.877576345577836e-3f, 8.989346213638783e-3f, 5.582630634307861e-2f,
                                   2.4015362560749054e-1f, 6.931530833244324e-1f, 9.999999403953552e-1f};
/* 2^y (y <= 0) in lanes k where y >= -125, else 0: f = y - floor(y) by vreduceps, 2^f by EXP2_UNIT, and vscalefps
   multiplies by 2^floor(y) itself (it floors its exponent operand): three operations besides the polynomial */
static inline __m512 exp2_lanes(__m512 y, __mmask16 k) {
    k = _mm512_mask_cmp_ps_mask(k, y, _mm512_set1_ps(-125.0f), _CMP_GE_OQ);
    const __m512 f = _mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 q = _mm512_set1_ps(EXP2_UNIT[0]);
    for (int c = 1; c < 6; c++) q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(EXP2_UNIT[c]));
    return _mm512_maskz_scalef_ps(k, q, y);
}
/* e_j = 2^(c s_j - c m) for the keys attended (exp2_lanes; 0 for the others and from t on) over keys 0..tp-1, into p
   rounded to bf16 (to_p) or back into s in fp32; returns their lane-wise sums (m = -inf, nothing attended: 0) */
static inline __m512 exp_row(float *s, uint16_t *p, int64_t t, int64_t tp, const uint8_t *mr, float c, float m,
                             int to_p) {
    const __m512 vc = _mm512_set1_ps(c), vb = _mm512_set1_ps(m == -__builtin_inff() ? 0.0f : -m * c);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < tp; j0 += 16) {     /* keys past t or masked out (a fully masked row: all): 0 */
        __m512 e = exp2_lanes(_mm512_fmadd_ps(_mm512_load_ps(s + j0), vc, vb), attended16(mr, j0, t));
        vsum = _mm512_add_ps(vsum, e);
        if (to_p) _mm256_store_si256((__m256i *) (p + j0), (__m256i) _mm512_cvtneps_pbh(e));
        else _mm512_store_ps(s + j0, e);
    }
    return vsum;
}
/* Lane r = OP over the 16 lanes of v[r], r = 0..15, pairing lanes as GCC's _mm512_reduce_OP_ps does (the upper
   half with the lower, OP(i + 8, i) then OP(i + 4, i), then OP(i, i + 2) and OP(i, i + 1): each lane is bit for
   bit that reduction of its row, signed zeros included for max), but 16 rows at a time: each level combines two
   vectors' halves, so 15 pairs of two-source permutes replace 16 reductions' chains */
#define REDUCE16(NAME, OP)                                                                                     \
static inline __m512 NAME(const __m512 *v) {                                                                 \
    const __m512i a1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),           \
                  a2 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),          \
                  a3 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),          \
                  a4 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);         \
    const __m512i b1 = _mm512_add_epi32(a1, _mm512_set1_epi32(8)), b2 = _mm512_add_epi32(a2, _mm512_set1_epi32(4)), \
                  b3 = _mm512_add_epi32(a3, _mm512_set1_epi32(2)), b4 = _mm512_add_epi32(a4, _mm512_set1_epi32(1)); \
    __m512 w[8], x[4], y[2];                                                                                 \
    for (int k = 0; k < 8; k++)              /* rows 2k, 2k + 1: lanes i and i + 8, 8 lanes each */          \
        w[k] = OP(_mm512_permutex2var_ps(v[2 * k], b1, v[2 * k + 1]), _mm512_permutex2var_ps(v[2 * k], a1, v[2 * k + 1])); \
    for (int k = 0; k < 4; k++)              /* rows 4k .. 4k + 3: and i + 4, 4 lanes each */                \
        x[k] = OP(_mm512_permutex2var_ps(w[2 * k], b2, w[2 * k + 1]), _mm512_permutex2var_ps(w[2 * k], a2, w[2 * k + 1])); \
    for (int k = 0; k < 2; k++)              /* rows 8k .. 8k + 7: and i + 2, 2 lanes each */                \
        y[k] = OP(_mm512_permutex2var_ps(x[2 * k], a3, x[2 * k + 1]), _mm512_permutex2var_ps(x[2 * k], b3, x[2 * k + 1])); \
    return OP(_mm512_permutex2var_ps(y[0], a4, y[1]), _mm512_permutex2var_ps(y[0], b4, y[1]));             \
}
REDUCE16(reduce16_add, _mm512_add_ps)
REDUCE16(reduce16_max, _mm512_max_ps)
/* For the tests: how many of the 16 rows of v (16 x 16) reduce16_add and reduce16_max give other bits than GCC's
   _mm512_reduce_add_ps / _mm512_reduce_max_ps of the row */
int reduce16_mismatches(const float *v) {
    __m512 rows[16];
    float add[16], max[16];
    for (int r = 0; r < 16; r++) rows[r] = _mm512_loadu_ps(v + 16 * r);
    _mm512_storeu_ps(add, reduce16_add(rows));
    _mm512_storeu_ps(max, reduce16_max(rows));
    int bad = 0;
    for (int r = 0; r < 16; r++) {
        const float a = _mm512_reduce_add_ps(rows[r]), m = _mm512_reduce_max_ps(rows[r]);
        bad += memcmp(&a, add + r, 4) != 0 || memcmp(&m, max + r, 4) != 0;
    }
    return bad;
}
static inline void softmax_row(float *s, uint16_t *p, int64_t t, int64_t tp, const uint8_t *mr, float mult,
                               uint16_t *probs_row, int64_t keep0, uint64_t seed, int16_t th, float *inv) {
    __m512 vm = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j0 = 0; j0 < tp; j0 += 16)                      /* the largest score attended */
        vm = _mm512_mask_max_ps(vm, attended16(mr, j0, t), vm, _mm512_load_ps(s + j0));
    const __m512 vsum = exp_row(s, p, t, tp, mr, mult * LOG2E, _mm512_reduce_max_ps(vm), inv != 0);
    const float sum = _mm512_reduce_add_ps(vsum);
    if (inv) { *inv = sum > 0.0f ? 1.0f / sum : 0.0f; return; }
    const __m512 vinv = _mm512_set1_ps(sum > 0.0f ? 1.0f / sum : 0.0f);
#ifdef STREAM_LANES
    if (probs_row) {         /* training: P (rounded to nearest even, as f2bf) kept for the backward pass, P m in p */
        __m512i z = stream_start(seed, keep0 >> 2);                /* keep0: a row's first element, whole words */
        const __m512i vth = _mm512_set1_epi16(th);
        for (int64_t j0 = 0; j0 < tp; j0 += 32) {
            const __mmask32 kept = stream_bits(&z, vth);
            for (int64_t j = j0; j < j0 + 32 && j < tp; j += 16) {
                const __m256i pb = (__m256i) _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(s + j), vinv));
                _mm256_mask_storeu_epi16(probs_row + j, attended16(0, j, t), pb);
                _mm256_storeu_si256((__m256i *) (p + j), _mm256_maskz_mov_epi16((__mmask16) (kept >> (j - j0)), pb));
            }
        }
        return;
    }
#endif
    for (int64_t j0 = 0; j0 < tp; j0 += 16)                      /* round to nearest even, as f2bf */
        _mm256_storeu_si256((__m256i *) (p + j0), (__m256i) _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(s + j0), vinv)));
    if (probs_row) {                                 /* training: keep P for the backward pass, then drop out */
        uint16_t keep[MAXA + 8] __attribute__((aligned(64)));
        memcpy(probs_row, p, t * 2);
        span_keep(keep, keep0, t, seed, th);
        for (int64_t j = 0; j < t; j++) p[j] &= keep[j];
    }
}
static inline void grad_row(float *g, const uint16_t *pr, uint16_t *ds, uint16_t *pm, int64_t t, int64_t tp,
                            float mult, int64_t keep0, uint64_t seed, int16_t th) {
#ifdef STREAM_LANES
    /* the same operations as below in each lane, on the mask's bits: acc lane l sums keys l, l + 16, ... by fma */
    uint32_t bits[MAXA / 32 + 1];
    __m512i z = stream_start(seed, keep0 >> 2);
    const __m512i vth = _mm512_set1_epi16(th);
    for (int64_t c = 0; 32 * c < t; c++) bits[c] = stream_bits(&z, vth);
    const __m512 vmult = _mm512_set1_ps(mult);
    __m512 vacc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= t; j += 16) {
        const __m512 gj = _mm512_maskz_mul_ps((__mmask16) (bits[j / 32] >> (j % 32)), _mm512_load_ps(g + j), vmult);
        _mm512_store_ps(g + j, gj);
        vacc = _mm512_fmadd_ps(gj, load16_bf16(pr + j), vacc);
    }
    float acc[16] __attribute__((aligned(64)));
    _mm512_store_ps(acc, vacc);
    for (; j < t; j++) {
        const float gj = bits[j / 32] >> (j % 32) & 1 ? g[j] * mult : 0.0f;
        g[j] = gj; acc[0] = __builtin_fmaf(gj, bf2f(pr[j]), acc[0]);
    }
    float dot = 0.0f;
    for (int l = 0; l < 16; l++) dot += acc[l];
    const __m512 vdot = _mm512_set1_ps(dot);
    for (j = 0; j < tp; j += 16) {                                 /* from t to tp: 0 */
        const __mmask16 real = attended16(0, j, t);
        const __m256i pb = _mm256_maskz_loadu_epi16(real, pr + j);
        const __m512 pj = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(pb), 16));
        _mm256_store_si256((__m256i *) (ds + j), _mm256_maskz_mov_epi16(real, (__m256i) _mm512_cvtneps_pbh(
            _mm512_mul_ps(pj, _mm512_sub_ps(_mm512_load_ps(g + j), vdot)))));
        _mm256_store_si256((__m256i *) (pm + j), _mm256_maskz_mov_epi16(real & (__mmask16) (bits[j / 32] >> (j % 32)), pb));
    }
#else
    uint16_t keep[MAXA + 16] __attribute__((aligned(64)));
    span_keep(keep, keep0, t, seed, th);
    float acc[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= t; j += 16)
        for (int l = 0; l < 16; l++) {
            float gj = keep[j + l] ? g[j + l] * mult : 0.0f; g[j + l] = gj; acc[l] += gj * bf2f(pr[j + l]);
        }
    for (; j < t; j++) { float gj = keep[j] ? g[j] * mult : 0.0f; g[j] = gj; acc[0] += gj * bf2f(pr[j]); }
    float dot = 0.0f;
    for (int l = 0; l < 16; l++) dot += acc[l];
    for (j = 0; j < t; j++) { ds[j] = f2bf(bf2f(pr[j]) * (g[j] - dot)); pm[j] = pr[j] & keep[j]; }
    for (; j < tp; j++) { ds[j] = 0; pm[j] = 0; }
#endif
}
/* R query rows from i0 on of example b, head h (rows: those of them that exist) through softmax_row / grad_row,
   S's rows tp apart (attention_##D's and attention_backward_##D's locals) */
#define SOFTMAX_ROWS(R, S, P, TP, MULT, RS)                                                                    \
    for (int64_t r = 0; r < R; r++) {                                                                        \
        RS[r] = 1.0f;                                                                                        \
        if (r >= rows) { memset(P + r * (TP), 0, (TP) * 2); continue; }                                      \
        const int64_t row = (b * nh + h) * t + i0 + r;                                                       \
        softmax_row(S + r * (TP), P + r * (TP), t, TP, ROW_MASK(r), MULT, probs ? probs + row * t : 0,        \
                    row * ((t + 3) / 4) * 4, seed, th, probs ? 0 : RS + r);                                  \
    }
#define ROW_MASK(r) (mask ? mask + b * st[9] + (i0 + (r)) * st[10] : 0)     /* query row i0 + r's mask (NULL: all) */
#define GRAD_ROWS(R, S, DS, PM, TP, MULT)                                                                      \
    for (int64_t r = 0; r < R; r++) {                                                                        \
        if (r >= rows) { memset(DS + r * (TP), 0, (TP) * 2); memset(PM + r * (TP), 0, (TP) * 2); continue; }  \
        const int64_t row = bh * t + i0 + r;                                                                 \
        grad_row(S + r * (TP), probs + row * t, DS + r * (TP), PM + r * (TP), t, TP, MULT, row * ((t + 3) / 4) * 4, \
                 seed, th);                                                                                  \
    }
#define ATTENTION(D, R)                                                                                       \
static int attention_##D(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,           \
                         uint16_t *out, int64_t nb, int64_t nh, int64_t tmax, const int64_t *st, float scale, \
                         uint16_t *probs, uint64_t seed, int16_t th, float dscale, const int64_t *starts) {  \
    const int64_t tpm = (tmax + 15) / 16 * 16, dp = D / 2, words = tpm * dp + tpm / 2 * D; /* packed K, V */ \
    uint32_t *packed = aligned_alloc(64, (size_t) THREADS() * words * 4);       /* one K, V pair per thread */ \
    if (!packed) return -1;                                                                                  \
    _Pragma("omp parallel for schedule(static, 1) collapse(2)")           /* heads dealt out in turn */      \
    for (int64_t b = 0; b < nb; b++)                                                                         \
    for (int64_t h = 0; h < nh; h++) {                                                                       \
        SEQUENCE_OF(b)                                                                                       \
        uint32_t *kp = packed + THREAD() * words, *vp = kp + tp * dp;                                        \
        float S[R * MAXA] __attribute__((aligned(64)));                                                      \
        uint16_t P[R * MAXA] __attribute__((aligned(64))), qt[R * D] __attribute__((aligned(64)));           \
        const uint16_t *qb = q + qo + h * st[1], *kb = k + ko + h * st[4], *vb = v + vo + h * st[7];         \
        pack_keys(kp, kb, t, tp, st[5], D);                                                                  \
        pack_pairs(vp, vb, t, tp, st[8], D);                                                                 \
        for (int64_t i0 = 0; i0 < t; i0 += R) {                                                              \
            const int64_t rows = t - i0 < R ? t - i0 : R;                                                    \
            gather_rows(qt, qb + i0 * st[2], rows, R, st[2], D);                                             \
            ROWS_DOT(D, R, S, qt, kp, tp, scale)                      /* S = Q K^T * scale */                \
            float rs[R];                                              /* 1 / sum e per row (prediction) */   \
            SOFTMAX_ROWS(R, S, P, tp, 1.0f, rs)                                                              \
            __m512 o[R][D / 16];                                                                             \
            ROWS_TIMES(D, R, o, P, vp, tp)                            /* O = P V (P m V in training) */      \
            for (int64_t r = 0; r < rows; r++) {                                                             \
                uint16_t *dst = out + ((o0 + i0 + r) * nh + h) * D;                                          \
                const __m512 vds = _mm512_set1_ps(dscale * rs[r]);                                           \
                for (int u = 0; u < D / 16; u++)                                                             \
                    _mm256_storeu_si256((__m256i *) (dst + u * 16),                                          \
                                        (__m256i) _mm512_cvtneps_pbh(_mm512_mul_ps(o[r][u], vds)));          \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    free(packed);                                                                                            \
    return 0;                                                                                                \
}
ATTENTION(32, 8)
ATTENTION(64, 4)
/* The backward pass of training's attention (attention_##D with probs), one (example, head) per task with its
   operands in cache. For R query rows at a time, with G = dP m and dO' = dO / (1 - p):
     dP = dO' V^T in fp32 (V packed as the forward packs K), G = dP m, dS = P (G - rowsum(G P)) rounded once,
     dQ = dS K * scale (K packed in pairs of keys, as the forward packs V), and over all the rows
     dV += (P m)^T dO', dK += dS^T Q' (pairs of rows of P m / dS times pairs of rows of dO' / Q', fp32).
   q, k, v, probs contiguous; dO's (b, h, t) strides in so, dQ's, dK's and dV's (the same for all three) in sg
   (their last dims contiguous). */
#define ATTENTION_BACKWARD(D, R)                                                                              \
static int attention_backward_##D(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *dout, \
                                  const uint16_t *probs, uint16_t *dq, uint16_t *dk, uint16_t *dv, int64_t nb,  \
                                  int64_t nh, int64_t t, const int64_t *so, const int64_t *sg, float scale,      \
                                  uint64_t seed, int16_t th, float dscale) {                                  \
    const int64_t tp = (t + 15) / 16 * 16, dp = D / 2, words = tp * dp + tp / 2 * D + 2 * tp * D;           \
    uint32_t *heap = aligned_alloc(64, (size_t) THREADS() * words * 4);   /* packed V and K, dV and dK sums */ \
    if (!heap) return -1;                                                                                    \
    _Pragma("omp parallel for schedule(static) collapse(2)")                                                   \
    for (int64_t b = 0; b < nb; b++)                                                                         \
    for (int64_t h = 0; h < nh; h++) {                                                                       \
        uint32_t *vk = heap + THREAD() * words, *kv = vk + tp * dp;                                          \
        float *accv = (float *) (kv + tp / 2 * D), *acck = accv + tp * D;                                    \
        float S[R * MAXA] __attribute__((aligned(64)));                                                      \
        uint16_t DS[R * MAXA] __attribute__((aligned(64))), PM[R * MAXA] __attribute__((aligned(64)));       \
        uint16_t ot[R * D] __attribute__((aligned(64))), qt[R * D] __attribute__((aligned(64)));             \
        uint32_t op[R / 2 * D] __attribute__((aligned(64))), qp[R / 2 * D] __attribute__((aligned(64)));     \
        uint32_t pw[R / 2 * MAXA] __attribute__((aligned(64))), sw[R / 2 * MAXA] __attribute__((aligned(64))); \
        const int64_t bh = b * nh + h;                                                                       \
        const uint16_t *qb = q + bh * t * D, *kb = k + bh * t * D, *vb = v + bh * t * D;                     \
        const uint16_t *ob = dout + b * so[0] + h * so[1];                                                   \
        const int64_t gb = b * sg[0] + h * sg[1], gt = sg[2];       /* (b, h)'s dQ, dK, dV rows: gb + i gt */ \
        pack_keys(vk, vb, t, tp, D, D);                                                                      \
        pack_pairs(kv, kb, t, tp, D, D);                                                                     \
        memset(accv, 0, (size_t) tp * D * 8);                                                                \
        for (int64_t i0 = 0; i0 < t; i0 += R) {                                                              \
            const int64_t rows = t - i0 < R ? t - i0 : R;                                                    \
            gather_rows(ot, ob + i0 * so[2], rows, R, so[2], D);                                             \
            gather_rows(qt, qb + i0 * D, rows, R, D, D);                                                     \
            for (int r = 0; r < R / 2; r++)                                                                  \
                for (int c = 0; c < D; c++) {                                                                \
                    op[r * D + c] = ot[2 * r * D + c] | (uint32_t) ot[(2 * r + 1) * D + c] << 16;            \
                    qp[r * D + c] = qt[2 * r * D + c] | (uint32_t) qt[(2 * r + 1) * D + c] << 16;            \
                }                                                                                            \
            ROWS_DOT(D, R, S, ot, vk, tp, dscale)                     /* dP = dO' V^T, fp32 */               \
            GRAD_ROWS(R, S, DS, PM, tp, 1.0f)                         /* dS = P (G - rowsum(G P)), P m */     \
            __m512 o[R][D / 16];                                                                             \
            ROWS_TIMES(D, R, o, DS, kv, tp)                           /* dQ = dS K * scale */                \
            const __m512 vs = _mm512_set1_ps(scale);                                                         \
            for (int64_t r = 0; r < rows; r++)                                                               \
                for (int u = 0; u < D / 16; u++)                                                             \
                    _mm256_storeu_si256((__m256i *) (dq + gb + (i0 + r) * gt + u * 16),                      \
                                        (__m256i) _mm512_cvtneps_pbh(_mm512_mul_ps(o[r][u], vs)));           \
            for (int r = 0; r < R / 2; r++)                           /* pairs of rows of P m and of dS */   \
                for (int64_t j = 0; j < t; j++) {                                                            \
                    pw[r * tp + j] = PM[2 * r * tp + j] | (uint32_t) PM[(2 * r + 1) * tp + j] << 16;         \
                    sw[r * tp + j] = DS[2 * r * tp + j] | (uint32_t) DS[(2 * r + 1) * tp + j] << 16;         \
                }                                                                                            \
            for (int64_t j = 0; j < t; j++) {                         /* dV += (P m)^T dO', dK += dS^T Q' */  \
                __m512 av[D / 16], ak[D / 16];                                                               \
                for (int u = 0; u < D / 16; u++) {                                                           \
                    av[u] = _mm512_load_ps(accv + j * D + u * 16); ak[u] = _mm512_load_ps(acck + j * D + u * 16); \
                }                                                                                            \
                for (int r = 0; r < R / 2; r++) {                                                            \
                    __m512bh wp = (__m512bh) _mm512_set1_epi32(pw[r * tp + j]);                              \
                    __m512bh ws = (__m512bh) _mm512_set1_epi32(sw[r * tp + j]);                              \
                    for (int u = 0; u < D / 16; u++) {                                                       \
                        av[u] = _mm512_dpbf16_ps(av[u], wp, (__m512bh) _mm512_load_si512(op + r * D + u * 16)); \
                        ak[u] = _mm512_dpbf16_ps(ak[u], ws, (__m512bh) _mm512_load_si512(qp + r * D + u * 16)); \
                    }                                                                                        \
                }                                                                                            \
                for (int u = 0; u < D / 16; u++) {                                                           \
                    _mm512_store_ps(accv + j * D + u * 16, av[u]); _mm512_store_ps(acck + j * D + u * 16, ak[u]); \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        const __m512 vds = _mm512_set1_ps(dscale);                                                           \
        for (int64_t j = 0; j < t; j++)                                                                      \
            for (int u = 0; u < D / 16; u++) {                                                               \
                _mm256_storeu_si256((__m256i *) (dv + gb + j * gt + u * 16),                                 \
                                    (__m256i) _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(accv + j * D + u * 16), vds))); \
                _mm256_storeu_si256((__m256i *) (dk + gb + j * gt + u * 16),                                 \
                                    (__m256i) _mm512_cvtneps_pbh(_mm512_load_ps(acck + j * D + u * 16)));    \
            }                                                                                                \
    }                                                                                                        \
    free(heap);                                                                                              \
    return 0;                                                                                                \
}
ATTENTION_BACKWARD(32, 8)
ATTENTION_BACKWARD(64, 4)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
/* The same two kernels with their products on AMX tiles (Intel Sapphire Rapids and later), where oneDNN's own
   products run: 16 query rows at a time, every tile 16 rows x 64 bytes (a 16 x 32 bf16 operand, a 16 x 16 pair
   operand or a 16 x 16 fp32 result). The packings are the AVX-512 kernels' (pack_keys' 16-key blocks of dimension
   pairs and pack_pairs' key pairs are the tiles' pair layout), with t rounded up to 32 keys (tq); the element-wise
   steps are the same functions, so only the order of the fp32 sums differs. The tile instructions are written
   out (the compiler's intrinsics are asm statements that tell it nothing of the memory they read and write). */
#define TLOAD(T, BASE, STRIDE) __asm__ volatile ("tileloadd (%0,%1,1), %%tmm" #T :: "r" ((const void *) (BASE)), \
                                                 "r" ((int64_t) (STRIDE)) : "memory")
#define TSTORE(T, BASE, STRIDE) __asm__ volatile ("tilestored %%tmm" #T ", (%0,%1,1)" :: "r" ((void *) (BASE)),  \
                                                  "r" ((int64_t) (STRIDE)) : "memory")
#define TZERO(T) __asm__ volatile ("tilezero %%tmm" #T ::)
#define TDP(C, A, B) __asm__ volatile ("tdpbf16ps %%tmm" #B ", %%tmm" #A ", %%tmm" #C ::)   /* C += A B */
static const uint8_t TILES[64] __attribute__((aligned(64))) = {   /* palette 1; tiles 0-7: 16 rows x 64 bytes */
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0};
#define TCONFIG() __asm__ volatile ("ldtilecfg %0" :: "m" (*(const uint8_t (*)[64]) TILES) : "memory")
#define TRELEASE() __asm__ volatile ("tilerelease" ::: "memory")
static int amx_state = 0;                                  /* 0: not asked yet, 1: the tiles are ours, -1: refused */
static int amx_off = 0;
/* Whether the AMX kernels run: Linux lends a process the tiles' state on request (arch_prctl ARCH_REQ_XCOMP_PERM,
   XFEATURE_XTILEDATA; PyTorch's oneDNN asks the same), unless attention_amx_use(0) turned them off. */
int attention_amx_available(void) {
    if (!amx_state) amx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return amx_state > 0 && !amx_off;
}
void attention_amx_use(int on) { amx_off = !on; }
/* S[0..15][0..tq-1] = A (16 x D rows of AT, D apart) times the keys XP (pack_keys) transposed, fp32 */
#define TILES_DOT(D, S, AT, XP, TQ) TILES_DOT_THEN(D, S, AT, XP, TQ, )
/* TILES_DOT, and THEN after each 16 x 16 block of S is stored (at keys j0 .. j0 + 15, while the tiles make the
   next): TOP_OF reads the block back from L1 for the rows' largest attended scores (prediction) */
#define TILES_DOT_THEN(D, S, AT, XP, TQ, THEN)                                                                 \
    TLOAD(1, AT, D * 2);                                                                                     \
    if (D == 64) TLOAD(3, (AT) + 32, D * 2);                                                                 \
    for (int64_t j0 = 0; j0 < (TQ); j0 += 16) {                                                              \
        const uint32_t *xc_ = (XP) + (j0 / 16) * (D / 2) * 16;                                               \
        TZERO(0); TLOAD(2, xc_, 64); TDP(0, 1, 2);                                                           \
        if (D == 64) { TLOAD(4, xc_ + 256, 64); TDP(0, 3, 4); }                                              \
        TSTORE(0, (S) + j0, (TQ) * 4);                                                                       \
        THEN                                                                                                 \
    }
/* TOP[r] = max(TOP[r], the attended scores among S[r, J0 .. J0 + 15]) lane-wise, for the rows that exist */
#define TOP_OF(TOP, S, J0, TQ)                                                                                 \
    for (int r_ = 0; r_ < rows; r_++)                                                                        \
        TOP[r_] = _mm512_mask_max_ps(TOP[r_], attended16(ROW_MASK(r_), J0, t), TOP[r_],                      \
                                     _mm512_load_ps((S) + r_ * (TQ) + (J0)));
/* O (16 x D fp32, D apart) = W (16 x TQ bf16, TQ apart) times the rows YP (pack_pairs) */
#define TILES_TIMES(D, O, W, YP, TQ)                                                                           \
    TZERO(4); TZERO(5);                                                                                      \
    if (D == 64) { TZERO(6); TZERO(7); }                                                                     \
    for (int64_t j0 = 0; j0 < (TQ); j0 += 32) {                                                              \
        const uint32_t *yc_ = (YP) + (j0 / 2) * D;                                                           \
        TLOAD(0, (W) + j0, (TQ) * 2);                                                                        \
        TLOAD(1, yc_, D * 4); TDP(4, 0, 1); TLOAD(2, yc_ + 16, D * 4); TDP(5, 0, 2);                          \
        if (D == 64) { TLOAD(1, yc_ + 32, D * 4); TDP(6, 0, 1); TLOAD(2, yc_ + 48, D * 4); TDP(7, 0, 2); }    \
    }                                                                                                        \
    TSTORE(4, O, D * 4); TSTORE(5, (O) + 16, D * 4);                                                         \
    if (D == 64) { TSTORE(6, (O) + 32, D * 4); TSTORE(7, (O) + 48, D * 4); }
/* xt (d x tq, tq apart) = rows 0..t-1 of x (ld apart, d wide) transposed, 0 from t to tq: a gather of 16 rows'
   dimensions (2c, 2c + 1) as words, split into their two 16-bit halves */
static void transpose_rows(uint16_t *xt, const uint16_t *x, int64_t t, int64_t tq, int64_t ld, int64_t d) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int32_t) ld));
    for (int64_t i0 = 0; i0 < tq; i0 += 16) {
        const __mmask16 real = attended16(0, i0, t);
        for (int64_t c = 0; c < d; c += 2) {
            const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real,
                                                          _mm512_add_epi32(rows, _mm512_set1_epi32((int32_t) c)), x + i0 * ld, 2);
            _mm256_storeu_si256((__m256i *) (xt + c * tq + i0), _mm512_cvtepi32_epi16(w));
            _mm256_storeu_si256((__m256i *) (xt + (c + 1) * tq + i0), _mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
        }
    }
}
/* out[j] = a[j] | b[j] << 16 for j < n (a multiple of 32): two rows in the pair layout */
static inline void interleave_rows(uint32_t *out, const uint16_t *a, const uint16_t *b, int64_t n) {
    const __m512i lo = _mm512_setr_epi32(0x00200000, 0x00210001, 0x00220002, 0x00230003, 0x00240004, 0x00250005,
                                         0x00260006, 0x00270007, 0x00280008, 0x00290009, 0x002A000A, 0x002B000B,
                                         0x002C000C, 0x002D000D, 0x002E000E, 0x002F000F);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t j = 0; j < n; j += 32) {
        const __m512i x = _mm512_loadu_si512(a + j), y = _mm512_loadu_si512(b + j);
        _mm512_storeu_si512(out + j, _mm512_permutex2var_epi16(x, lo, y));
        _mm512_storeu_si512(out + j + 16, _mm512_permutex2var_epi16(x, hi, y));
    }
}
#define ATTENTION_AMX(D)                                                                                      \
static int attention_amx_##D(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,       \
                             uint16_t *out, int64_t nb, int64_t nh, int64_t tmax, const int64_t *st, float scale, \
                             uint16_t *probs, uint64_t seed, int16_t th, float dscale, const int64_t *starts) { \
    const int64_t tqm = (tmax + 31) / 32 * 32, dp = D / 2, words = tqm * dp + tqm / 2 * D;                  \
    uint32_t *packed = aligned_alloc(64, (size_t) THREADS() * words * 4);                                    \
    if (!packed) return -1;                                                                                  \
    _Pragma("omp parallel for schedule(static, 1) collapse(2)")                                               \
    for (int64_t b = 0; b < nb; b++)                                                                         \
    for (int64_t h = 0; h < nh; h++) {                                                                       \
        SEQUENCE_OF(b)                                                                                       \
        const int64_t tq = (t + 31) / 32 * 32;                                                               \
        (void) tp;                                                                                           \
        uint32_t *kp = packed + THREAD() * words, *vp = kp + tq * dp;                                        \
        float S[16 * MAXA] __attribute__((aligned(64))), O[16 * D] __attribute__((aligned(64)));              \
        uint16_t P[16 * MAXA] __attribute__((aligned(64))), qt[16 * D] __attribute__((aligned(64)));         \
        const uint16_t *qb = q + qo + h * st[1], *kb = k + ko + h * st[4], *vb = v + vo + h * st[7];         \
        pack_keys(kp, kb, t, tq, st[5], D);                                                                  \
        pack_pairs(vp, vb, t, tq, st[8], D);                                                                 \
        TCONFIG();                                                                                           \
        for (int64_t i0 = 0; i0 < t; i0 += 16) {                                                             \
            const int64_t rows = t - i0 < 16 ? t - i0 : 16;                                                  \
            gather_rows(qt, qb + i0 * st[2], rows, 16, st[2], D);                                            \
            float rs[16];                                             /* 1 / sum e per row (prediction) */   \
            if (probs) {                                                                                     \
                TILES_DOT(D, S, qt, kp, tq)                           /* S = Q K^T */                        \
                SOFTMAX_ROWS(16, S, P, tq, scale, rs)                                                        \
            } else {                              /* the rows' largest scores as the tiles make S, then e */ \
                __m512 top[16], sums[16];                                                                    \
                float mx[16] __attribute__((aligned(64)));                                                   \
                for (int r = 0; r < 16; r++) top[r] = _mm512_set1_ps(-__builtin_inff());                      \
                TILES_DOT_THEN(D, S, qt, kp, tq, TOP_OF(top, S, j0, tq))                                     \
                _mm512_store_ps(mx, reduce16_max(top));                                                      \
                for (int64_t r = 0; r < 16; r++)                                                             \
                    if (r < rows) sums[r] = exp_row(S + r * tq, P + r * tq, t, tq, ROW_MASK(r), scale * LOG2E, mx[r], 1); \
                    else { sums[r] = _mm512_setzero_ps(); memset(P + r * tq, 0, tq * 2); }                   \
                _mm512_store_ps(rs, reduce16_add(sums));                                                     \
                for (int r = 0; r < 16; r++) rs[r] = rs[r] > 0.0f ? 1.0f / rs[r] : 0.0f;                      \
            }                                                                                                \
            TILES_TIMES(D, O, P, vp, tq)                              /* O = P V (P m V in training) */      \
            for (int64_t r = 0; r < rows; r++) {                                                             \
                uint16_t *dst = out + ((o0 + i0 + r) * nh + h) * D;                                          \
                for (int u = 0; u < D / 16; u++)                                                             \
                    _mm256_storeu_si256((__m256i *) (dst + u * 16), (__m256i) _mm512_cvtneps_pbh(            \
                        _mm512_mul_ps(_mm512_load_ps(O + r * D + u * 16), _mm512_set1_ps(dscale * rs[r]))));  \
            }                                                                                                \
        }                                                                                                    \
        TRELEASE();                                                                                          \
    }                                                                                                        \
    free(packed);                                                                                            \
    return 0;                                                                                                \
}
ATTENTION_AMX(32)
ATTENTION_AMX(64)
/* attention_backward_##D on tiles. Per 16 query rows: dP = dO V^T (V packed as keys), G, dS and P m (grad_row),
   dQ = dS K * scale (K in pairs); P m and dS are also kept for the whole sequence in pairs of query rows (pw, sw:
   the pair layout over queries), so that at the end dV^T = dO'^T (P m) and dK^T = Q'^T dS come out tile by tile
   from dO and Q' transposed (ot, qt: D x tq). */
#define ATTENTION_BACKWARD_AMX(D)                                                                             \
static int attention_backward_amx_##D(const uint16_t *q, const uint16_t *k, const uint16_t *v,                  \
                                      const uint16_t *dout, const uint16_t *probs, uint16_t *dq, uint16_t *dk,  \
                                      uint16_t *dv, int64_t nb, int64_t nh, int64_t t, const int64_t *so,        \
                                      const int64_t *sg, float scale, uint64_t seed, int16_t th, float dscale) { \
    const int64_t tq = (t + 31) / 32 * 32, dp = D / 2;                                                       \
    const int64_t words = tq * dp + tq / 2 * D + 2 * (tq / 2) * tq + D * tq;                                 \
    uint32_t *heap = aligned_alloc(64, (size_t) THREADS() * words * 4);                                      \
    if (!heap) return -1;                                                                                    \
    _Pragma("omp parallel for schedule(static) collapse(2)")                                                   \
    for (int64_t b = 0; b < nb; b++)                                                                         \
    for (int64_t h = 0; h < nh; h++) {                                                                       \
        uint32_t *vk = heap + THREAD() * words, *kv = vk + tq * dp, *pw = kv + tq / 2 * D, *sw = pw + tq / 2 * tq; \
        uint16_t *otr = (uint16_t *) (sw + tq / 2 * tq), *qtr = otr + D * tq;                                \
        float S[16 * MAXA] __attribute__((aligned(64))), O[16 * D] __attribute__((aligned(64)));              \
        float C[2][256] __attribute__((aligned(64)));                                                        \
        uint16_t DS[16 * MAXA] __attribute__((aligned(64))), PM[16 * MAXA] __attribute__((aligned(64)));     \
        uint16_t ot[16 * D] __attribute__((aligned(64)));                                                    \
        const int64_t bh = b * nh + h;                                                                       \
        const uint16_t *qb = q + bh * t * D, *kb = k + bh * t * D, *vb = v + bh * t * D;                     \
        const uint16_t *ob = dout + b * so[0] + h * so[1];                                                   \
        const int64_t gb = b * sg[0] + h * sg[1], gt = sg[2];       /* (b, h)'s dQ, dK, dV rows: gb + i gt */ \
        pack_keys(vk, vb, t, tq, D, D);                                                                      \
        pack_pairs(kv, kb, t, tq, D, D);                                                                     \
        transpose_rows(otr, ob, t, tq, so[2], D);                     /* dO and Q' transposed, 0 past t */   \
        transpose_rows(qtr, qb, t, tq, D, D);                                                                \
        const int64_t made = (t + 15) / 16 * 8;           /* query pairs the 16-row blocks write; the rest 0 */ \
        memset(pw + made * tq, 0, (size_t) (tq / 2 - made) * tq * 4);                                        \
        memset(sw + made * tq, 0, (size_t) (tq / 2 - made) * tq * 4);                                        \
        TCONFIG();                                                                                           \
        for (int64_t i0 = 0; i0 < t; i0 += 16) {                                                             \
            const int64_t rows = t - i0 < 16 ? t - i0 : 16;                                                  \
            gather_rows(ot, ob + i0 * so[2], rows, 16, so[2], D);                                            \
            TILES_DOT(D, S, ot, vk, tq)                               /* dP = dO V^T */                      \
            GRAD_ROWS(16, S, DS, PM, tq, dscale)                      /* G = dP' m, dS, P m */               \
            TILES_TIMES(D, O, DS, kv, tq)                             /* dQ = dS K * scale */                \
            for (int64_t r = 0; r < rows; r++)                                                               \
                for (int u = 0; u < D / 16; u++)                                                             \
                    _mm256_storeu_si256((__m256i *) (dq + gb + (i0 + r) * gt + u * 16), (__m256i)            \
                        _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(O + r * D + u * 16), _mm512_set1_ps(scale)))); \
            for (int64_t r = 0; r < 16; r += 2) {        /* pairs of rows of P m and dS (rows past t: 0) */ \
                uint32_t *pwr = pw + ((i0 + r) / 2) * tq, *swr = sw + ((i0 + r) / 2) * tq;                   \
                const uint16_t *pm0 = PM + r * tq, *pm1 = pm0 + tq, *ds0 = DS + r * tq, *ds1 = ds0 + tq;     \
                interleave_rows(pwr, pm0, pm1, tq); interleave_rows(swr, ds0, ds1, tq);                      \
            }                                                                                                \
        }                                                                                                    \
        for (int64_t j0 = 0; j0 < t; j0 += 16)                        /* dV^T = dO'^T P m, dK^T = Q'^T dS */ \
            for (int u = 0; u < D / 16; u++) {                                                               \
                TZERO(0); TZERO(1);                                                                          \
                for (int64_t i0 = 0; i0 < tq; i0 += 32) {                                                    \
                    TLOAD(2, otr + u * 16 * tq + i0, tq * 2); TLOAD(3, pw + (i0 / 2) * tq + j0, tq * 4);      \
                    TDP(0, 2, 3);                                                                            \
                    TLOAD(4, qtr + u * 16 * tq + i0, tq * 2); TLOAD(5, sw + (i0 / 2) * tq + j0, tq * 4);      \
                    TDP(1, 4, 5);                                                                            \
                }                                                                                            \
                TSTORE(0, C[0], 64); TSTORE(1, C[1], 64);                                                    \
                for (int64_t n = 0; n < 16 && j0 + n < t; n++) {           /* column n of C: key j0 + n */  \
                    const __m512i col = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_setr_epi32(               \
                        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(16)), _mm512_set1_epi32((int) n)); \
                    _mm256_storeu_si256((__m256i *) (dv + gb + (j0 + n) * gt + u * 16), (__m256i) _mm512_cvtneps_pbh( \
                        _mm512_mul_ps(_mm512_i32gather_ps(col, C[0], 4), _mm512_set1_ps(dscale))));        \
                    _mm256_storeu_si256((__m256i *) (dk + gb + (j0 + n) * gt + u * 16),                      \
                                        (__m256i) _mm512_cvtneps_pbh(_mm512_i32gather_ps(col, C[1], 4)));     \
                }                                                                                            \
            }                                                                                                \
        TRELEASE();                                                                                          \
    }                                                                                                        \
    free(heap);                                                                                              \
    return 0;                                                                                                \
}
ATTENTION_BACKWARD_AMX(32)
ATTENTION_BACKWARD_AMX(64)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#define LORA_AMX 1
/* A rank-r matrix (kd x r, r <= 16; element (j, c) at w[j sj + c sc]) in the tiles' pair layout, for tiles_32x16:
   kd / 32 tiles of 16 pairs of rows x 16 columns, 0 past r */
static void pack_rank_pairs(uint32_t *out, const uint16_t *w, int64_t kd, int64_t r, int64_t sj, int64_t sc) {
    for (int64_t j = 0; j < kd; j += 2)
        for (int64_t c = 0; c < 16; c++)
            out[(j / 32) * 256 + (j % 32) / 2 * 16 + c] =
                c < r ? (uint32_t) w[j * sj + c * sc] | (uint32_t) w[(j + 1) * sj + c * sc] << 16 : 0u;
}
/* out (32 x 16 fp32) = 32 bf16 rows x (ld apart, kd wide: a multiple of 32) times pack_rank_pairs' w */
static inline void tiles_32x16(float *out, const uint16_t *x, int64_t ld, const uint32_t *w, int64_t kd) {
    TZERO(0); TZERO(1);
    for (int64_t j = 0; j < kd; j += 32) {
        TLOAD(4, w + (j / 32) * 256, 64);
        TLOAD(2, x + j, ld * 2); TDP(0, 2, 4);
        TLOAD(3, x + 16 * ld + j, ld * 2); TDP(1, 3, 4);
    }
    TSTORE(0, out, 64); TSTORE(1, out + 256, 64);
}
/* the 32 rows at src (ld apart, w wide) where all exist, else the rows that do copied into tail (w apart), then
   zeros; *ldo: the rows' distance in what it returns */
static inline const uint16_t *rows32(uint16_t *tail, const uint16_t *src, int64_t rows, int64_t ld, int64_t w,
                                     int64_t *ldo) {
    *ldo = ld;
    if (rows == 32) return src;
    memset(tail, 0, (size_t) 32 * w * 2);
    for (int64_t q = 0; q < rows; q++) memcpy(tail + q * w, src + q * ld, (size_t) w * 2);
    *ldo = w;
    return tail;
}
/* lora_backward_bf16 with its rank-r products on the tiles (n and k multiples of 32), 32 rows at a time and per
   linear e: dU = s g B from g's rows as they lie and B in pairs (fp32, two 16 x 16 results), then dB^T += U^T g and
   dA += dU^T drop(x) per 16 columns, g's and drop(x)'s 32 rows interleaved in pairs (interleave_rows) and U^T, dU^T
   as 16 x 32 bf16 operands (r padded with zeros). dU is split into three bf16 parts, hi = bf16(dU),
   mid = bf16(dU - hi) and lo = bf16(dU - hi - mid), which hold its fp32 bits, and dA made from all three: as
   accurate as the AVX-512 form's from the fp32 dU (against float64 at 4,096 x 384 x rank 8, the largest error
   3.5e-7 of dA's largest value, that form's 1.3e-6; from hi alone, 1.7e-3). dB^T and dA are summed per thread
   (16 x n, 16 x k fp32, in cache) and then over the threads in turn; dx from the fp32 dU_e row by row as that
   form's (lora_dx_row). */
static int lora_backward_amx(const uint16_t *g, int64_t ldg, const uint16_t *const *bmat, const uint16_t *const *u,
                             const uint16_t *const *dropped, int64_t ldd, const uint16_t *const *a, const uint16_t *gw,
                             float *const *da, float *const *db, float *dx, int64_t m, int64_t n, int64_t k, int64_t r,
                             int64_t groups, float scaling, const uint64_t *seeds, int32_t threshold, float dscale) {
    const int nt = THREADS();
    /* a thread's words: the G dB^T and dA sums, g's and drop(x)'s rows in pairs, a zero-padded last block
       (32 x (n + k)), dU's 32 rows per linear, the G masks' rows (MAXT each) */
    const int64_t own = 16 * (n + k) * (groups + 2) + 32 * 16 * groups + groups * MAXT / 2;
    uint32_t *bp = aligned_alloc(64, (size_t) (groups * (8 * n + r * k) + nt * own) * 4);
    if (!bp) return -1;
    float *ap = (float *) (bp + groups * 8 * n), *part = ap + groups * r * k;
    for (int64_t e = 0; e < groups; e++) pack_rank_pairs(bp + e * 8 * n, bmat[e], n, r, r, 1);     /* B_e (n x r) */
    lora_unpack(ap, NULL, a, NULL, n, k, r, groups);
    const int16_t th = (int16_t) threshold;
    #pragma omp parallel
    {
        float *sums = part + (int64_t) THREAD() * own;
        uint32_t *gp = (uint32_t *) (sums + 16 * (n + k) * groups), *dp = gp + 16 * n;
        uint16_t *tail = (uint16_t *) (dp + 16 * k);
        float *du = (float *) (tail + 32 * (n + k));
        uint16_t *keep = (uint16_t *) (du + 32 * 16 * groups);
        uint16_t ut[16 * 32] __attribute__((aligned(64))), dut[3][16 * 32] __attribute__((aligned(64)));
        memset(sums, 0, (size_t) 16 * (n + k) * groups * 4);
        TCONFIG();
        #pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < m; i0 += 32) {
            const int64_t rows = m - i0 < 32 ? m - i0 : 32;
            for (int64_t e = 0; e < groups; e++) {
                float *pdb = sums + 16 * (n + k) * e, *pda = pdb + 16 * n, *due = du + 32 * 16 * e;
                int64_t lg, ld;
                const uint16_t *gs = rows32(tail, g + i0 * ldg + e * n, rows, ldg, n, &lg);
                const uint16_t *ds = rows32(tail + 32 * n, dropped[e] + i0 * ldd, rows, ldd, k, &ld);
                tiles_32x16(due, gs, lg, bp + e * 8 * n, n);                 /* dU = g B */
                memset(ut, 0, sizeof ut);
                for (int64_t q = 0; q < 32; q++) {
                    _mm512_store_ps(due + q * 16, _mm512_mul_ps(_mm512_load_ps(due + q * 16), _mm512_set1_ps(scaling)));
                    for (int64_t c = 0; c < 16; c++) {
                        const float x = due[q * 16 + c];
                        const uint16_t hi = f2bf(x), mid = f2bf(x - bf2f(hi));
                        dut[0][c * 32 + q] = hi;
                        dut[1][c * 32 + q] = mid;
                        dut[2][c * 32 + q] = f2bf(x - bf2f(hi) - bf2f(mid));
                    }
                    if (q < rows) for (int64_t c = 0; c < r; c++) ut[c * 32 + q] = u[e][(i0 + q) * r + c];
                }
                for (int64_t p = 0; p < 16; p++) {
                    interleave_rows(gp + p * n, gs + 2 * p * lg, gs + (2 * p + 1) * lg, n);
                    interleave_rows(dp + p * k, ds + 2 * p * ld, ds + (2 * p + 1) * ld, k);
                }
                TLOAD(5, ut, 64);
                for (int64_t j = 0; j < n; j += 16) {                  /* dB^T += U^T g */
                    TLOAD(0, pdb + j, n * 4); TLOAD(6, gp + j, n * 4); TDP(0, 5, 6); TSTORE(0, pdb + j, n * 4);
                }
                TLOAD(7, dut[0], 64); TLOAD(5, dut[1], 64); TLOAD(2, dut[2], 64);
                for (int64_t j = 0; j < k; j += 16) {                  /* dA += (hi + mid + lo)^T drop(x) */
                    TLOAD(1, pda + j, k * 4); TLOAD(4, dp + j, k * 4);
                    TDP(1, 2, 4); TDP(1, 5, 4); TDP(1, 7, 4);
                    TSTORE(1, pda + j, k * 4);
                }
            }
            if (dx)
                for (int64_t q = 0; q < rows; q++) {
                    __m512 dq[LORA_GROUPS];
                    for (int64_t e = 0; e < groups; e++) dq[e] = _mm512_load_ps(du + 32 * 16 * e + q * 16);
                    lora_dx_row(dx, gw, dq, ap, i0 + q, k, r, groups, seeds, th, dscale, keep);
                }
        }
        TRELEASE();
    }
    lora_sums(part, own, nt, da, db, n, k, r, groups, scaling, 1);
    free(bp);
    return 0;
}
/* lora_input_bf16 with U = drop(x) A^T on the tiles (k a multiple of 32): 32 rows of xb and drop_e(x) as
   lora_input_row writes them, then U_e's 32 x 16 block from drop_e(x)'s rows as they lie and A_e^T in pairs */
static int lora_input_amx(const float *x, const uint16_t *const *a, uint16_t *xb, int64_t ldx, uint16_t *const *dropped,
                          uint16_t *const *u, int64_t m, int64_t k, int64_t r, int64_t groups, const uint64_t *seeds,
                          int32_t threshold, float dscale) {
    uint32_t *at = aligned_alloc(64, (size_t) (groups * 8 * k + THREADS() * 16 * k) * 4);
    if (!at) return -1;
    for (int64_t e = 0; e < groups; e++) pack_rank_pairs(at + e * 8 * k, a[e], k, r, 1, k);     /* A_e^T (k x r) */
    const int16_t th = (int16_t) threshold;
    #pragma omp parallel
    {
        uint16_t *tail = (uint16_t *) (at + groups * 8 * k + (int64_t) THREAD() * 16 * k);   /* 32 rows, zero-padded */
        uint16_t keep[MAXT] __attribute__((aligned(64)));
        float ub[32 * 16] __attribute__((aligned(64)));
        TCONFIG();
        #pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < m; i0 += 32) {
            const int64_t rows = m - i0 < 32 ? m - i0 : 32;
            for (int64_t e = 0; e < groups; e++) {
                lora_group_rows(x, xb, ldx, dropped, NULL, e, i0, rows, k, seeds, th, dscale, keep);
                int64_t ld;
                const uint16_t *src = dropped ? rows32(tail, dropped[e] + i0 * k, rows, k, k, &ld)
                                              : rows32(tail, xb + i0 * ldx, rows, ldx, k, &ld);
                tiles_32x16(ub, src, ld, at + e * 8 * k, k);                                 /* U_e */
                for (int64_t q = 0; q < rows; q++) lora_u_row(ub + q * 16, u, xb, ldx, i0 + q, k, r, e, groups);
            }
        }
        TRELEASE();
    }
    free(at);
    return 0;
}
#endif
#if defined(__AMX_INT8__)
/* int8 linears on AMX tiles (tdpbusd: uint8 x int8 sums in int32): y = x W^T + b for uint8 codes x (m x k,
   x ~ sx (qx - zx)) and an int8 weight W (n x k, per-row scales sw) packed by linear_u8_pack into 16-column x
   64-deep tiles; per element y = (acc - zx colsum[j]) (sx sw[j]) + b[j] in fp32 (scale[j] = sx sw[j], comp[j] =
   zx colsum[j]: exact in int32, and in fp32 up to 2^24), then GELU(y) where asked, written in fp32, bf16 or as
   uint8 codes q = clamp(round(y / s + z), 0, 255), ties to even. oneDNN's product costs about a third more on
   BERT's shapes, and its exact-GELU post-op as much as the product itself. GELU(y) = max(y, 0) - H(|y|) with
   H(a) = a (1 - Phi(a)) (x Phi(x) for either sign: GELU(-a) = a Phi(a) - a), H by 32 polynomials of degree 4 on
   [0, 6) in steps of 3/16 (GELU_H: Chebyshev-node least squares in float64, rounded to fp32; within 1.8e-8 of
   H; H = 0 beyond 6, where H < 6e-9), each found by a two-source permute on the step's index: 18 operations per
   16 values. Blocks of 32 rows x 32 columns (four accumulator tiles, two row tiles, two weight tiles: all eight);
   the tiles of one block are made while the outputs of the one before are written. */
static const float GELU_H[5][32] __attribute__((aligned(64))) = {
    {8.04039955e-05f, 6.80589947e-05f, 4.61445998e-05f, 1.94022778e-05f, -6.79179175e-06f, -2.78234238e-05f, -4.08623964e-05f, -4.52470376e-05f,
     -4.22190387e-05f, -3.42109088e-05f, -2.3991186e-05f, -1.39470203e-05f, -5.66889503e-06f, 1.37220809e-07f, 3.49170341e-06f, 4.86473027e-06f,
     4.89838749e-06f, 4.20069637e-06f, 3.23511381e-06f, 2.29237617e-06f, 1.51453241e-06f, 9.40607208e-07f, 5.52109555e-07f, 3.07455082e-07f,
     1.62888654e-07f, 8.22763226e-08f, 3.96875457e-08f, 1.83064817e-08f, 8.0834317e-09f, 3.4199128e-09f, 1.38735767e-09f, 0.0f},
    {2.06677078e-06f, 0.000327345391f, 0.000601970532f, 0.000787229219f, 0.000863840745f, 0.000834439008f, 0.000720348733f, 0.000554227794f,
     0.0003712076f, 0.000201182629f, 6.40514409e-05f, -3.15486759e-05f, -8.66074115e-05f, -0.000108458145f, -0.00010718064f, -9.26784051e-05f,
     -7.28938612e-05f, -5.31502774e-05f, -3.63181098e-05f, -2.34152849e-05f, -1.43095585e-05f, -8.31607122e-06f, -4.60702859e-06f, -2.43743216e-06f,
     -1.233327e-06f, -5.97528242e-07f, -2.77447668e-07f, -1.23561662e-07f, -5.28140731e-08f, -2.16779963e-08f, -8.54866045e-09f, 0.0f},
    {-0.0140261417f, -0.0135413231f, -0.0121576907f, -0.0100831632f, -0.00761315459f, -0.00506889308f, -0.00273656799f, -0.000822079484f,
     0.000570030359f, 0.00143279403f, 0.00183422584f, 0.00188553904f, 0.00170977926f, 0.00141775224f, 0.00109425245f, 0.000794097199f,
     0.000545269228f, 0.000355767057f, 0.000221223614f, 0.000131388253f, 7.46549122e-05f, 4.06344188e-05f, 2.1208285e-05f, 1.06230709e-05f,
     5.10999826e-06f, 2.36189999e-06f, 1.04948833e-06f, 4.48480733e-07f, 1.84378337e-07f, 7.29467189e-08f, 2.77807857e-08f, 0.0f},
    {0.0937501118f, 0.0660258383f, 0.0401975885f, 0.017872734f, 0.000145651371f, -0.0125164203f, -0.0202623308f, -0.0237380117f,
     -0.0239005834f, -0.0218158364f, -0.0184835587f, -0.0147188995f, -0.0110982172f, -0.00796111207f, -0.00545039494f, -0.00356943696f,
     -0.00223980146f, -0.0013483431f, -0.000779455469f, -0.000433024106f, -0.000231327314f, -0.000118891461f, -5.88112343e-05f, -2.80093736e-05f,
     -1.2847072e-05f, -5.67633742e-06f, -2.41649627e-06f, -9.91370598e-07f, -3.91999976e-07f, -1.4941547e-07f, -5.49056551e-08f, 0.0f},
    {-2.16798135e-09f, 0.0798064247f, 0.132686332f, 0.161374316f, 0.169970512f, 0.163360029f, 0.146581322f, 0.124261916f,
     0.100210801f, 0.0772092491f, 0.0569931827f, 0.0403839163f, 0.0275050662f, 0.018024357f, 0.011372678f, 0.00691284752f,
     0.00404969417f, 0.00228716573f, 0.0012456394f, 0.0006543239f, 0.000331564574f, 0.000162096723f, 7.64639262e-05f, 3.48058747e-05f,
     1.52894881e-05f, 6.48191644e-06f, 2.65219478e-06f, 1.04741071e-06f, 3.99257857e-07f, 1.46902025e-07f, 5.21736325e-08f, 0.0f}};
static inline __m512 gelu_lanes(__m512 y) {
    const __m512 a = _mm512_abs_ps(y), t = _mm512_mul_ps(a, _mm512_set1_ps(32.0f / 6.0f));
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);       /* t - floor(t) */
    const __m512i i = _mm512_min_epu32(_mm512_cvttps_epi32(t), _mm512_set1_epi32(31));     /* NaN, huge: 31 */
    __m512 h = _mm512_permutex2var_ps(_mm512_load_ps(GELU_H[0]), i, _mm512_load_ps(GELU_H[0] + 16));
    for (int c = 1; c < 5; c++)
        h = _mm512_fmadd_ps(h, f, _mm512_permutex2var_ps(_mm512_load_ps(GELU_H[c]), i, _mm512_load_ps(GELU_H[c] + 16)));
    return _mm512_sub_ps(_mm512_max_ps(y, _mm512_setzero_ps()), h);
}
/* For the tests: GELU of n fp32 values (n a multiple of 16) as the kernel computes it */
void gelu_lanes_f32(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(y + i, gelu_lanes(_mm512_loadu_ps(x + i)));
}
#define TDPI(C, A, B) __asm__ volatile ("tdpbusd %%tmm" #B ", %%tmm" #A ", %%tmm" #C ::)   /* C += A B, u8 s8 */
int linear_u8_available(void) { return attention_amx_available(); }
/* wp[((jb (k / 64) + kc) 16 + kk) 64 + 4 j + i] = w[(16 jb + j) k + 64 kc + 4 kk + i]: per 16 rows of w (output
   columns) and 64 of its columns, the 16 x 64-byte tile tdpbusd takes (four consecutive k per 32-bit lane) */
void linear_u8_pack(const int8_t *w, int64_t n, int64_t k, int8_t *wp) {
    for (int64_t jb = 0; jb < n / 16; jb++)
        for (int64_t kc = 0; kc < k / 64; kc++)
            for (int kk = 0; kk < 16; kk++)
                for (int j = 0; j < 16; j++)
                    memcpy(wp + ((jb * (k / 64) + kc) * 16 + kk) * 64 + j * 4, w + (jb * 16 + j) * k + kc * 64 + kk * 4, 4);
}
/* Rows 0 .. rows - 1 of a 32 x 32 block of sums C, columns j0 .. j0 + 31 of out (n wide): mode 0 uint8 codes (inv
   = 1 / s, zero zo), 1 bf16, 2 fp32; GELU first where gelu (constants where it is inlined: one loop per form) */
static inline __attribute__((always_inline)) void linear_out(const int32_t *C, int64_t rows, int64_t j0,
        const float *scale, const float *bias, const int32_t *comp, const int gelu, const int mode, float inv,
        float zo, void *out, int64_t n) {
    for (int hf = 0; hf < 2; hf++) {
        const int64_t j = j0 + 16 * hf;
        const __m512 sc = _mm512_loadu_ps(scale + j), bi = _mm512_loadu_ps(bias + j);
        const __m512i cp = _mm512_loadu_si512(comp + j);
        for (int64_t r = 0; r < rows; r++) {
            __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(C + r * 32 + 16 * hf), cp)),
                                       sc, bi);
            if (gelu) y = gelu_lanes(y);
            if (mode == 0) {
                const __m512i q = _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_fmadd_ps(y, _mm512_set1_ps(inv),
                                                                                     _mm512_set1_ps(zo))), _mm512_setzero_si512());
                _mm_storeu_si128((__m128i *) ((uint8_t *) out + r * n + j), _mm512_cvtusepi32_epi8(q));   /* <= 255 */
            } else if (mode == 1) {
                _mm256_storeu_si256((__m256i *) ((uint16_t *) out + r * n + j), (__m256i) _mm512_cvtneps_pbh(y));
            } else {
                _mm512_storeu_ps((float *) out + r * n + j, y);
            }
        }
    }
}
/* out (m x n: mode 0 uint8, 1 bf16, 2 fp32) = the linear above; k a multiple of 64, n of 32. Returns -1 without
   memory, else 0. */
int linear_u8(const uint8_t *x, int64_t m, int64_t k, const int8_t *wp, int64_t n, const float *scale,
              const float *bias, const int32_t *comp, int gelu, int mode, float inv, int32_t zo, void *out) {
    const int64_t kcs = k / 64, blocks = (m + 31) / 32, size = mode == 0 ? 1 : mode == 1 ? 2 : 4;
    const int form = 3 * !!gelu + mode;
    uint8_t *tails = aligned_alloc(64, (size_t) THREADS() * 32 * k);
    if (!tails) return -1;
    #pragma omp parallel
    {
        TCONFIG();
        int32_t C[2][32 * 32] __attribute__((aligned(64)));
        uint8_t *tail = tails + (size_t) THREAD() * 32 * k;
        #pragma omp for schedule(static)
        for (int64_t bk = 0; bk < blocks; bk++) {
            const int64_t m0 = bk * 32, rows = m - m0 < 32 ? m - m0 : 32;
            const uint8_t *xa = x + m0 * k;
            void *o = (uint8_t *) out + m0 * n * size;
            if (rows < 32) {                              /* the last rows, padded to two whole tiles */
                memset(tail, 0, 32 * k);
                memcpy(tail, xa, rows * k);
                xa = tail;
            }
            for (int64_t j0 = 0; j0 <= n; j0 += 32) {     /* block j0's tiles while block j0 - 32 is written */
                if (j0 < n) {
                    const int8_t *w0 = wp + (j0 / 16) * kcs * 1024, *w1 = w0 + kcs * 1024;
                    TZERO(0); TZERO(1); TZERO(2); TZERO(3);
                    for (int64_t kc = 0; kc < kcs; kc++) {
                        TLOAD(4, xa + kc * 64, k); TLOAD(5, xa + 16 * k + kc * 64, k);
                        TLOAD(6, w0 + kc * 1024, 64); TLOAD(7, w1 + kc * 1024, 64);
                        TDPI(0, 4, 6); TDPI(1, 4, 7); TDPI(2, 5, 6); TDPI(3, 5, 7);
                    }
                }
                if (j0 > 0) {
                    const int32_t *c = C[(j0 / 32 - 1) & 1];
                    const float zf = (float) zo;
                    switch (form) {
                        case 0: linear_out(c, rows, j0 - 32, scale, bias, comp, 0, 0, inv, zf, o, n); break;
                        case 1: linear_out(c, rows, j0 - 32, scale, bias, comp, 0, 1, inv, zf, o, n); break;
                        case 2: linear_out(c, rows, j0 - 32, scale, bias, comp, 0, 2, inv, zf, o, n); break;
                        case 3: linear_out(c, rows, j0 - 32, scale, bias, comp, 1, 0, inv, zf, o, n); break;
                        case 4: linear_out(c, rows, j0 - 32, scale, bias, comp, 1, 1, inv, zf, o, n); break;
                        default: linear_out(c, rows, j0 - 32, scale, bias, comp, 1, 2, inv, zf, o, n); break;
                    }
                }
                if (j0 < n) {
                    int32_t *c = C[(j0 / 32) & 1];
                    TSTORE(0, c, 128); TSTORE(1, c + 16, 128); TSTORE(2, c + 512, 128); TSTORE(3, c + 528, 128);
                }
            }
        }
        TRELEASE();
    }
    free(tails);
    return 0;
}
#else
int linear_u8_available(void) { return 0; }
#endif
#define AMX_ON() attention_amx_available()
#else
int attention_amx_available(void) { return 0; }
int linear_u8_available(void) { return 0; }
void attention_amx_use(int on) { (void) on; }
#define AMX_ON() 0
#define attention_amx_32 attention_32
#define attention_amx_64 attention_64
#define attention_backward_amx_32 attention_backward_32
#define attention_backward_amx_64 attention_backward_64
#endif
/* LoRA's backward (lora_backward_vec): its products on the tiles where they run and n and k are multiples of 32 */
int lora_backward_bf16(const uint16_t *g, int64_t ldg, const uint16_t *const *bmat, const uint16_t *const *u,
                       const uint16_t *const *dropped, int64_t ldd, const uint16_t *const *a, const uint16_t *gw,
                       float *const *da, float *const *db, float *dx, int64_t m, int64_t n, int64_t k, int64_t r,
                       int64_t groups, float scaling, const uint64_t *seeds, int32_t threshold, float dscale) {
    if (groups < 1 || groups > LORA_GROUPS) return -2;
#ifdef LORA_AMX
    if (AMX_ON() && !lora_amx_off && n % 32 == 0 && k % 32 == 0)
        return lora_backward_amx(g, ldg, bmat, u, dropped, ldd, a, gw, da, db, dx, m, n, k, r, groups, scaling, seeds,
                                 threshold, dscale);
#endif
    return lora_backward_vec(g, ldg, bmat, u, dropped, ldd, a, gw, da, db, dx, m, n, k, r, groups, scaling, seeds,
                             threshold, dscale);
}
/* LoRA's input side (lora_input_vec): U's product on the tiles where they run and k is a multiple of 32 */
int lora_input_bf16(const float *x, const uint16_t *const *a, uint16_t *xb, int64_t ldx, uint16_t *const *dropped,
                    uint16_t *const *u, int64_t m, int64_t k, int64_t r, int64_t groups, const uint64_t *seeds,
                    int32_t threshold, float dscale) {
    if (groups < 1 || groups > LORA_GROUPS || (ldx != k && ldx < k + groups * r)) return -2;
#ifdef LORA_AMX
    if (AMX_ON() && !lora_amx_off && k % 32 == 0)
        return lora_input_amx(x, a, xb, ldx, dropped, u, m, k, r, groups, seeds, threshold, dscale);
#endif
    return lora_input_vec(x, a, xb, ldx, dropped, u, m, k, r, groups, seeds, threshold, dscale);
}
int attention_backward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *dout,
                            const uint16_t *probs, uint16_t *dq, uint16_t *dk, uint16_t *dv, int64_t nb, int64_t nh,
                            int64_t t, int64_t d, const int64_t *so, const int64_t *sg, float scale, uint64_t seed,
                            int32_t th, float dscale) {                                         /* -1: no memory */
    if (AMX_ON())
        return d == 32 ? attention_backward_amx_32(q, k, v, dout, probs, dq, dk, dv, nb, nh, t, so, sg, scale, seed,
                                                   (int16_t) th, dscale)
                       : attention_backward_amx_64(q, k, v, dout, probs, dq, dk, dv, nb, nh, t, so, sg, scale, seed,
                                                   (int16_t) th, dscale);
    return d == 32 ? attention_backward_32(q, k, v, dout, probs, dq, dk, dv, nb, nh, t, so, sg, scale, seed,
                                           (int16_t) th, dscale)
                   : attention_backward_64(q, k, v, dout, probs, dq, dk, dv, nb, nh, t, so, sg, scale, seed,
                                           (int16_t) th, dscale);
}
/* st: q's (b, h, t) strides, k's, v's, then the mask's (b, i) strides (elements; the last dims are contiguous).
   probs NULL: prediction. Otherwise training: P is also written to probs (B, h, T, T), and P V is made with P m
   (softmax_keep's mask for the same seed and threshold, rows numbered over (B, h, T)), times dscale = 1 / (1 - p) */
int attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                   int64_t nb, int64_t nh, int64_t t, int64_t d, const int64_t *st, float scale,
                   uint16_t *probs, uint64_t seed, int32_t th, float dscale, const int64_t *starts) { /* -1: no memory */
    if (AMX_ON())
        return d == 32 ? attention_amx_32(q, k, v, mask, out, nb, nh, t, st, scale, probs, seed, (int16_t) th, dscale, starts)
                       : attention_amx_64(q, k, v, mask, out, nb, nh, t, st, scale, probs, seed, (int16_t) th, dscale, starts);
    return d == 32 ? attention_32(q, k, v, mask, out, nb, nh, t, st, scale, probs, seed, (int16_t) th, dscale, starts)
                   : attention_64(q, k, v, mask, out, nb, nh, t, st, scale, probs, seed, (int16_t) th, dscale, starts);
}
/* int8 attention for prediction (clintune.quantize, --quantize int8): the steps of attention_##D with 8-bit
   products, AVX-512 VNNI's vpdpbusd (four u8 x s8 products per 32-bit lane, where vdpbf16ps makes two bf16
   ones). Per (example, head), each coded symmetrically from its own range (as the int8 linears code weights):
     key row j:      k_j ~ s_k[j] (c_j - 128), c_j u8 in [1, 255], s_k[j] = max_c |k_j[c]| / 127;
     query row i:    q_i ~ s_q[i] a_i, a_i s8;             value column c: v[:, c] ~ s_v[c] w[:, c], w s8;
     S[i, j] = scale s_q[i] s_k[j] (sum_c c_j[c] a_i[c] - 128 sum_c a_i[c])        (exact integer sums)
   then the masked softmax in fp32 up to its normalisation, e = exp(S - max_j S) in [0, 1], coded u = round(255 e)
   (u8; the row's largest is 255), and O[i, c] = s_v[c] sum_j u[i, j] w[j, c] / sum_j u[i, j], rounded once to
   bf16. The sums stay below 2^31 (T <= 512, d <= 64). */
#if defined(__AVX512VNNI__)
int attention_int8_available(void) { return 1; }
static inline __m512i code16(const uint16_t *x, __m512 inv) {   /* round(x inv) of 16 bf16, nearest even */
    return _mm512_cvtps_epi32(_mm512_mul_ps(load16_bf16(x), inv));
}
static inline float amax_bf16(const uint16_t *x, int64_t d) {   /* max |x[c]|, d a multiple of 16 */
    __m512 m = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(load16_bf16(x + c)));
    return _mm512_reduce_max_ps(m);
}
/* 255 2^x for x <= 0 (-inf -> 255 2^-64, nothing to a sum): 2^x = 2^n 2^f, n = rint(x), 2^f by a degree-3
   polynomial exact at f = 0 (so the row's largest is 255 exactly; relative error 1.0e-4 on |f| <= 1/2, under 0.03
   of a code), x clamped at -64 */
static const float EXP2_255[4] = {255.0f * 0.05500893f, 255.0f * 0.242211f, 255.0f * 0.69328296f, 255.0f};
static inline __m512 exp2_255(__m512 x) {
    const __m512 y = _mm512_max_ps(x, _mm512_set1_ps(-64.0f));
    const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(y, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP2_255[0]), f, _mm512_set1_ps(EXP2_255[1]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_255[2]));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_255[3]));
    return _mm512_scalef_ps(p, n);
}
/* a row's codes: round(x 127 / max|x|) (s8, in 32-bit lanes: the caller packs), its scale max|x| / 127 */
static inline float code_row(const uint16_t *x, int64_t d, __m512i *codes) {
    const float a = amax_bf16(x, d);
    const __m512 inv = _mm512_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
    for (int64_t u = 0; u < d / 16; u++) codes[u] = code16(x + 16 * u, inv);
    return a / 127.0f;
}
/* keys: kp[(j / 16) (d / 4) 16 + c 16 + j % 16] = c_j[4c .. 4c + 3] (u8), so that one vpdpbusd makes 16 keys'
   partial sums with four dimensions of a broadcast query; sk[j] = s_k[j]. Rows t..tp-1: code 128 (zero), scale 0 */
static void pack_keys_i8(uint32_t *kp, float *sk, const uint16_t *x, int64_t t, int64_t tp, int64_t ld, int64_t d) {
    for (int64_t j = 0; j < tp; j++) {
        uint8_t row[64] __attribute__((aligned(64)));
        if (j < t) {
            __m512i codes[4];
            sk[j] = code_row(x + j * ld, d, codes);
            for (int64_t u = 0; u < d / 16; u++)
                _mm_store_si128((__m128i *) (row + 16 * u),
                                _mm512_cvtepi32_epi8(_mm512_add_epi32(codes[u], _mm512_set1_epi32(128))));
        } else {
            memset(row, 128, d);
            sk[j] = 0.0f;
        }
        uint32_t *dst = kp + (j / 16) * (d / 4) * 16 + j % 16;
        for (int64_t c = 0; c < d / 4; c++) memcpy(dst + c * 16, row + 4 * c, 4);
    }
}
/* values: vp[(j / 4) d + c] = w[4 (j / 4) .. + 3, c] (s8, byte r from row 4 (j / 4) + r), so that one vpdpbusd
   makes 16 dimensions of a weighted sum of four rows. Only the keys with bias[j] == 0 (bias NULL: all t) count:
   s_v from their range, vbar[c] their mean; the others (padding: weight 0) and rows t..tp-1 are coded 0. */
static void pack_values_i8(uint32_t *vp, float *sv, float *vbar, const uint16_t *x, int64_t t, int64_t tp, int64_t ld,
                           int64_t d, const float *bias) {
    __m512 m[4], inv[4], sum[4];
    int64_t n = 0;
    for (int64_t u = 0; u < d / 16; u++) m[u] = sum[u] = _mm512_setzero_ps();
    for (int64_t j = 0; j < t; j++) {
        const int in = !bias || bias[j] == 0.0f;
        n += in;
        for (int64_t u = 0; u < d / 16 && in; u++) {
            const __m512 y = load16_bf16(x + j * ld + 16 * u);
            m[u] = _mm512_max_ps(m[u], _mm512_abs_ps(y));
            sum[u] = _mm512_add_ps(sum[u], y);
        }
    }
    for (int64_t u = 0; u < d / 16; u++) {
        _mm512_storeu_ps(vbar + 16 * u, _mm512_mul_ps(sum[u], _mm512_set1_ps(n ? 1.0f / (float) n : 0.0f)));
        _mm512_storeu_ps(sv + 16 * u, _mm512_div_ps(m[u], _mm512_set1_ps(127.0f)));
        inv[u] = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(m[u], _mm512_setzero_ps(), _CMP_GT_OQ),
                                     _mm512_set1_ps(127.0f), m[u]);
    }
    const __m512i low = _mm512_set1_epi32(0xFF);
    for (int64_t j0 = 0; j0 < tp; j0 += 4)
        for (int64_t u = 0; u < d / 16; u++) {
            __m512i w = _mm512_setzero_si512();
            for (int64_t r = 0; r < 4 && j0 + r < t; r++) {
                if (bias && bias[j0 + r] != 0.0f) continue;
                const __m512i c = _mm512_and_si512(code16(x + (j0 + r) * ld + 16 * u, inv[u]), low);
                w = _mm512_or_si512(w, _mm512_slli_epi32(c, (unsigned) (8 * r)));
            }
            _mm512_store_si512(vp + j0 / 4 * d + 16 * u, w);
        }
}
/* bias[j] = 0 where row mask m lets key j be attended (m NULL: every key), -inf where not and for j = t..tp-1 */
static void mask_bias(float *bias, const uint8_t *m, int64_t t, int64_t tp) {
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j0 = 0; j0 < tp; j0 += 16)
        _mm512_store_ps(bias + j0, _mm512_maskz_mov_ps((__mmask16) ~attended16(m, j0, t), ninf));
}
#define ATTENTION_INT8(D, R)                                                                                  \
static int attention_int8_##D(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,      \
                              uint16_t *out, int64_t nb, int64_t nh, int64_t tmax, const int64_t *st, float scale, \
                              const int64_t *starts) {                                                       \
    const int64_t tpm = (tmax + 15) / 16 * 16, words = tpm * D / 2 + tpm * (2 + R) + 2 * D; /* K, V, sk, ... */ \
    uint32_t *packed = aligned_alloc(64, (size_t) THREADS() * words * 4);                                    \
    if (!packed) return -1;                                                                                  \
    const float l2 = scale * LOG2E;                                        /* scores in base 2 */             \
    _Pragma("omp parallel for schedule(static, 1) collapse(2)")           /* heads dealt out in turn */      \
    for (int64_t b = 0; b < nb; b++)                                                                         \
    for (int64_t h = 0; h < nh; h++) {                                                                       \
        SEQUENCE_OF(b)                                                                                       \
        uint32_t *kp = packed + THREAD() * words, *vp = kp + tp * D / 4;                                     \
        float *sk = (float *) (vp + tp * D / 4), *bias = sk + tp, *sv = bias + tp * (1 + R);                 \
        float S[R * MAXA] __attribute__((aligned(64))), sq[R], inv[R], rest[R], *vbar = sv + D;               \
        uint8_t P[R * MAXA] __attribute__((aligned(64)));                                                    \
        int8_t qa[R * D] __attribute__((aligned(64)));                                                       \
        int32_t qs[R];                                                                                       \
        const float *rb[R];                                                 /* each row's additive mask */    \
        const uint16_t *qb = q + qo + h * st[1];                                                             \
        const uint8_t *mb = mask ? mask + b * st[9] : 0;                                                     \
        pack_keys_i8(kp, sk, k + ko + h * st[4], t, tp, st[5], D);                                           \
        const int each_row = mb && st[10];                          /* a mask that differs between rows */  \
        if (each_row) {                                      /* then bias: the keys that some row attends */ \
            uint8_t any[MAXA];                                                                               \
            memset(any, 0, t);                                                                               \
            for (int64_t i = 0; i < t; i++) for (int64_t j = 0; j < t; j++) any[j] |= mb[i * st[10] + j];    \
            mask_bias(bias, any, t, tp);                                                                     \
        } else mask_bias(bias, mb, t, tp);                                  /* the same for every row */      \
        pack_values_i8(vp, sv, vbar, v + vo + h * st[7], t, tp, st[8], D, bias);                             \
        __m512 svv[D / 16], vbv[D / 16];                                                                     \
        for (int u = 0; u < D / 16; u++) { svv[u] = _mm512_loadu_ps(sv + 16 * u); vbv[u] = _mm512_loadu_ps(vbar + 16 * u); } \
        for (int64_t i0 = 0; i0 < t; i0 += R) {                                                              \
            const int64_t rows = t - i0 < R ? t - i0 : R;                                                    \
            for (int64_t r = 0; r < R; r++) {                                /* the query rows' codes */      \
                rb[r] = bias;                                                                                \
                if (r >= rows) { memset(qa + r * D, 0, D); sq[r] = 0.0f; qs[r] = 0; continue; }              \
                if (each_row) {                                               /* this row's own mask */      \
                    float *own = bias + (1 + r) * tp;                                                        \
                    mask_bias(own, mb + (i0 + r) * st[10], t, tp);                                           \
                    rb[r] = own;                                                                             \
                }                                                                                            \
                __m512i codes[D / 16], sum = _mm512_setzero_si512();                                         \
                sq[r] = code_row(qb + (i0 + r) * st[2], D, codes) * l2;                                      \
                for (int u = 0; u < D / 16; u++) {                                                           \
                    sum = _mm512_add_epi32(sum, codes[u]);                                                   \
                    _mm_store_si128((__m128i *) (qa + r * D + 16 * u), _mm512_cvtepi32_epi8(codes[u]));      \
                }                                                                                            \
                qs[r] = -128 * _mm512_reduce_add_epi32(sum);                                                 \
            }                                                                                                \
            __m512 vm[R];                                                                                    \
            for (int r = 0; r < R; r++) vm[r] = _mm512_set1_ps(-__builtin_inff());                           \
            for (int64_t j0 = 0; j0 < tp; j0 += 16) {          /* S = Q K^T scale log2(e) + mask, row max */  \
                __m512i acc[R];                                                                              \
                for (int r = 0; r < R; r++) acc[r] = _mm512_set1_epi32(qs[r]);                               \
                const uint32_t *kc = kp + (j0 / 16) * (D / 4) * 16;                                          \
                for (int64_t c = 0; c < D / 4; c++) {                                                        \
                    const __m512i kv = _mm512_load_si512(kc + c * 16);                                       \
                    for (int r = 0; r < R; r++) {                                                            \
                        int32_t a_; memcpy(&a_, qa + r * D + 4 * c, 4);                                      \
                        acc[r] = _mm512_dpbusd_epi32(acc[r], kv, _mm512_set1_epi32(a_));                    \
                    }                                                                                        \
                }                                                                                            \
                const __m512 skv = _mm512_load_ps(sk + j0);                                                  \
                for (int r = 0; r < R; r++) {                                                                \
                    const __m512 x = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_mul_ps(skv, _mm512_set1_ps(sq[r])), \
                                                     _mm512_load_ps(rb[r] + j0));                            \
                    vm[r] = _mm512_max_ps(vm[r], x);                                                         \
                    _mm512_store_ps(S + r * tp + j0, x);                                                     \
                }                                                                                            \
            }                                                                                                \
            for (int64_t r = 0; r < R; r++) {                  /* u = round(255 e), e = 2^(S - max S) */      \
                const float *s = S + r * tp;                                                                 \
                uint8_t *p = P + r * tp;                                                                     \
                if (r >= rows) { memset(p, 0, tp); continue; }                                               \
                float m = _mm512_reduce_max_ps(vm[r]);                                                       \
                if (m == -__builtin_inff()) m = 0.0f;          /* a fully masked row: zeros */                \
                const __m512 vmax = _mm512_set1_ps(m);                                                       \
                __m512i vsum = _mm512_setzero_si512();                                                       \
                __m512 fsum = _mm512_setzero_ps();                                                           \
                for (int64_t j0 = 0; j0 < tp; j0 += 16) {                                                    \
                    const __m512 e = exp2_255(_mm512_sub_ps(_mm512_load_ps(s + j0), vmax));                  \
                    const __m512i u = _mm512_cvtps_epi32(e);                                                 \
                    fsum = _mm512_add_ps(fsum, e);                                                           \
                    vsum = _mm512_add_epi32(vsum, u);                                                        \
                    _mm_store_si128((__m128i *) (p + j0), _mm512_cvtepi32_epi8(u));                          \
                }                                                                                            \
                const float sum = _mm512_reduce_add_ps(fsum);                                                \
                const int32_t usum = _mm512_reduce_add_epi32(vsum);                                          \
                inv[r] = usum > 0 ? 1.0f / sum : 0.0f;                                                       \
                rest[r] = usum > 0 ? sum - (float) usum : 0.0f;       /* the weight the codes left out */     \
            }                                                                                                \
            __m512i o[R][D / 16];                                            /* O = P V */                   \
            for (int r = 0; r < R; r++) for (int u = 0; u < D / 16; u++) o[r][u] = _mm512_setzero_si512();    \
            for (int64_t jq = 0; jq < tp / 4; jq++) {                                                        \
                __m512i yv[D / 16];                                                                          \
                for (int u = 0; u < D / 16; u++) yv[u] = _mm512_load_si512(vp + jq * D + u * 16);            \
                for (int r = 0; r < R; r++) {                                                                \
                    int32_t w_; memcpy(&w_, P + r * tp + 4 * jq, 4);                                         \
                    const __m512i wb = _mm512_set1_epi32(w_);                                                \
                    for (int u = 0; u < D / 16; u++) o[r][u] = _mm512_dpbusd_epi32(o[r][u], wb, yv[u]);      \
                }                                                                                            \
            }                                                                                                \
            for (int64_t r = 0; r < rows; r++) {                                                             \
                uint16_t *dst = out + ((o0 + i0 + r) * nh + h) * D;                                          \
                const __m512 vi = _mm512_set1_ps(inv[r]), vr = _mm512_set1_ps(rest[r]);                      \
                for (int u = 0; u < D / 16; u++)                                                             \
                    _mm256_storeu_si256((__m256i *) (dst + u * 16), (__m256i) _mm512_cvtneps_pbh(_mm512_mul_ps( \
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(o[r][u]), svv[u], _mm512_mul_ps(vr, vbv[u])), vi))); \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    free(packed);                                                                                            \
    return 0;                                                                                                \
}
ATTENTION_INT8(32, 8)
ATTENTION_INT8(64, 4)
/* attention_bf16's arguments, prediction only */
int attention_int8(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                   int64_t nb, int64_t nh, int64_t t, int64_t d, const int64_t *st, float scale,
                   const int64_t *starts) {                                                   /* -1: no memory */
    return d == 32 ? attention_int8_32(q, k, v, mask, out, nb, nh, t, st, scale, starts)
                   : attention_int8_64(q, k, v, mask, out, nb, nh, t, st, scale, starts);
}
#else
int attention_int8_available(void) { return 0; }
#endif
#else
int lora_backward_bf16(void) { return -1; }        /* never called: lora_kernels_available() says so */
int lora_input_bf16(void) { return -1; }
int attention_bf16_available(void) { return 0; }
int reduce16_mismatches(const float *v) { (void) v; return -1; }
int attention_int8_available(void) { return 0; }
int attention_amx_available(void) { return 0; }
void attention_amx_use(int on) { (void) on; }
int linear_u8_available(void) { return 0; }
#endif
"""

_DROPOUT_TYPES = (("f32", "bf16"), ("bf16", "bf16"), ("f32", "f32"), ("bf16", "f32"))   # (x, y) of dropout_x_y
MAX_ROW = 8192          # the fused kernels' longest row: their stack buffers (MAXT in the C source)
LORA_GROUPS = 4         # the most LoRA linears on one input the LoRA kernels take at once (LORA_GROUPS in C)
ATTENTION_MAX_T = 512   # attention()'s longest sequence (BERT-family encoders' limit; MAXA in the C source)
ATTENTION_HEAD_SIZES = (32, 64)   # the head sizes the attention kernels are compiled for
_SOURCE = _SOURCE.replace("@MAX_ROW@", str(MAX_ROW)).replace("@MAX_ATT@", str(ATTENTION_MAX_T))

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


def build_library(target: Path, filename: str, source: str, commands: list[list[str]],
                  timeout: float = 300) -> ctypes.CDLL | None:
    """``target`` (a shared library in the kernel cache) loaded, built first if missing: ``source`` written to
    ``filename`` in a temporary directory and each command tried in turn until one succeeds ("{src}" and "{obj}"
    stand for the source and the output), the result renamed into place (never a half-written .so). None where
    no command builds it or it does not load."""
    try:
        if not target.exists():
            with tempfile.TemporaryDirectory() as tmp, atomic_path(target) as obj:
                src = Path(tmp) / filename
                src.write_text(source)
                for cmd in commands:
                    cmd = [str(src) if a == "{src}" else str(obj) if a == "{obj}" else a for a in cmd]
                    if subprocess.run(cmd, capture_output=True, timeout=timeout).returncode == 0:
                        break
                else:
                    raise OSError(f"{commands[0][0]} could not compile {filename}")
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None


def _compile(arch: tuple[str, ...] = ("-march=native",)) -> ctypes.CDLL | None:
    """The kernels built for ``arch`` (this CPU by default; the tests also build them for CPUs without AVX-512,
    whose library must still load and declare every function) and loaded, each function's signature declared."""
    from .runtime import cpu_flags

    if os.environ.get("CLINTUNE_NO_KERNELS") or os.name != "posix":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    flags = ["-O3", *arch, "-shared", "-fPIC"]
    wide = ["-mprefer-vector-width=512"] if "avx512dq" in cpu_flags() else []    # 64-bit products in zmm
    omp = ["-fopenmp"] if _torch_openmp() else []
    key = hashlib.sha256("\n".join([_SOURCE, cc, *flags, *wide, *omp, *sorted(cpu_flags())]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"masks-{key}.so"
    # a compiler without an option: without it (one thread where OpenMP is missing)
    variants = dict.fromkeys(map(tuple, [wide + omp, omp, wide, []]))
    lib = build_library(target, "masks.c", _SOURCE, [[cc, *flags, *extra, "{src}", "-o", "{obj}"] for extra in variants])
    if lib is None:
        return None
    for name in set(_FUNCS.values()):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32]
        getattr(lib, name).restype = None
    p, i64, u64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_float
    signatures = {"softmax_keep_bf16": [p] * 3 + [i64] * 3 + [u64, i32],
                  "softmax_keep_backward_bf16": [p] * 3 + [i64] * 3 + [u64, i32],
                  "dropout_add_norm_bf16": [p] * 7 + [i64] * 2 + [u64, i32, f32, f32],
                  "dropout_add_norm_backward_bf16": [p] * 6 + [i64] * 2 + [u64, i32, f32],
                  "add_norm_pred": [p] * 6 + [i64] * 2 + [f32, p, f32, i32],
                  "gelu_and_grad_bf16": [p] * 3 + [i64],
                  "embed_norm_f32": [p] * 10 + [i64] * 5 + [f32, p, f32, i32],
                  **{f"dropout_{a}_{b}": [p, p, i64, u64, i32, f32] for a, b in _DROPOUT_TYPES},
                  "dropout_add_bf16_f32": [p] * 3 + [i64, u64, i32, f32],
                  "mul_bf16": [p] * 3 + [i64],
                  "lora_backward_bf16": [p, i64] + [p] * 3 + [i64] + [p] * 5 + [i64] * 5 + [f32, p, i32, f32],
                  "lora_input_bf16": [p] * 3 + [i64] + [p] * 2 + [i64] * 4 + [p, i32, f32],
                  "lora_output_bf16": [p] * 3 + [i64] * 3 + [f32],
                  **{f"range_{t}": [p, i64, p] for t in ("f32", "bf16")},
                  **{f"quantize_u8_{t}": [p, p, i64, f32, i32] for t in ("f32", "bf16")}}
    for name, args in signatures.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    lib.embed_norm_f32.restype = ctypes.c_int64
    lib.lora_backward_bf16.restype = ctypes.c_int
    lib.lora_kernels_available.restype = ctypes.c_int
    for name in ("lora_input_bf16", "lora_output_bf16"):
        getattr(lib, name).restype = ctypes.c_int
    lib.add_norm_pred.restype = ctypes.c_int
    lib.attention_bf16_available.restype = ctypes.c_int
    lib.reduce16_mismatches.argtypes = [p]
    lib.reduce16_mismatches.restype = ctypes.c_int
    if lib.attention_bf16_available():
        lib.attention_bf16.argtypes = [p] * 5 + [i64] * 4 + [p, f32, p, u64, i32, f32, p]
        lib.attention_bf16.restype = ctypes.c_int
        lib.attention_backward_bf16.argtypes = [p] * 8 + [i64] * 4 + [p, p, f32, u64, i32, f32]
        lib.attention_backward_bf16.restype = ctypes.c_int
    lib.attention_amx_available.restype = ctypes.c_int
    lib.attention_amx_use.argtypes = [ctypes.c_int]
    lib.attention_amx_use.restype = None
    lib.lora_amx_use.argtypes = [ctypes.c_int]
    lib.lora_amx_use.restype = None
    lib.lora_amx_used.restype = ctypes.c_int
    lib.attention_int8_available.restype = ctypes.c_int
    if lib.attention_int8_available():
        lib.attention_int8.argtypes = [p] * 5 + [i64] * 4 + [p, f32, p]
        lib.attention_int8.restype = ctypes.c_int
    lib.linear_u8_available.restype = ctypes.c_int
    if hasattr(lib, "linear_u8"):                       # compiled with AMX-INT8 (whether Linux lends the tiles or not)
        lib.linear_u8_pack.argtypes = [p, i64, i64, p]
        lib.linear_u8_pack.restype = None
        lib.linear_u8.argtypes = [p, i64, i64, p, i64, p, p, p, ctypes.c_int, ctypes.c_int, f32, i32, p]
        lib.linear_u8.restype = ctypes.c_int
        lib.gelu_lanes_f32.argtypes = [p, p, i64]
        lib.gelu_lanes_f32.restype = None
    return lib


@contextmanager
def amx_form(on: bool, lora_only: bool = False):
    """Inside the block the bf16 kernels (attention, the int8 linears, LoRA's; with ``lora_only``, LoRA's alone) use
    their AMX form (``on``, where the CPU has AMX and Linux lends the tiles) or their AVX-512 form; the form in use
    before comes back after it. For tests and benchmarks, which check and time both forms on one CPU (the kernels
    choose AMX wherever it runs)."""
    lib = compiled()
    if lib is None:
        yield
        return
    use, used = ((lib.lora_amx_use, lib.lora_amx_used) if lora_only
                 else (lib.attention_amx_use, lib.attention_amx_available))
    before = bool(used())
    use(int(on))
    try:
        yield
    finally:
        use(int(before))


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



def _attention_lib(d: int, t: int) -> ctypes.CDLL | None:
    """The compiled kernels where :func:`attention` and :func:`attention_backward` run for head size ``d`` and
    ``t`` tokens (AVX-512 BF16, d = 32 or 64, t <= ATTENTION_MAX_T), else None."""
    lib = compiled()
    if lib is None or not lib.attention_bf16_available() or d not in ATTENTION_HEAD_SIZES or t > ATTENTION_MAX_T:
        return None
    return lib


def _packed(q: torch.Tensor, mask: torch.Tensor | None, starts: torch.Tensor | None) -> tuple[int, int]:
    """(sequences, longest) of q's packed layout: ``starts`` (B + 1,) int64 from 0 to q's T, nondecreasing, with q
    (1, h, T, d) and no mask (see :func:`attention`); (B, T) of q itself when ``starts`` is None."""
    if starts is None:
        return q.shape[0], q.shape[2]
    if (q.shape[0] != 1 or mask is not None or starts.dtype != torch.int64 or starts.dim() != 1
            or len(starts) < 2 or not starts.is_contiguous() or starts.device.type != "cpu"):
        raise ValueError("attention: packed sequences need q, k, v of one example, no mask and (B + 1,) int64 "
                         "CPU starts")
    lengths = starts[1:] - starts[:-1]
    if int(starts[0]) != 0 or int(starts[-1]) != q.shape[2] or bool((lengths < 0).any()):
        raise ValueError(f"attention: starts must rise from 0 to the {q.shape[2]} packed tokens")
    return len(lengths), int(lengths.max())


def _attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, t: int):
    """(library, mask with a contiguous last dim, the kernel's 11 strides) for the attention kernels' inputs
    (``t``: the longest sequence), or None where they cannot take them: no kernel here, other sizes, dtypes or
    devices, a mask of another form."""
    b, h, _, d = q.shape
    lib = _attention_lib(d, t)
    if (lib is None or k.shape != q.shape or v.shape != q.shape
            or any(x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.stride(-1) != 1 for x in (q, k, v))):
        return None
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], 0, 0]
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, b) \
                or mask.shape[2] not in (1, t) or mask.shape[3] != t:
            return None
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        strides[9] = mask.stride(0) if mask.shape[0] > 1 else 0
        strides[10] = mask.stride(2) if mask.shape[2] > 1 else 0
    return lib, mask, (ctypes.c_int64 * 11)(*strides)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, *,
              probs: torch.Tensor | None = None, seed: int = 0, threshold: int = -32768,
              dropout_scale: float = 1.0, starts: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(Q K^T * scale + bias) V for bf16 (B, h, T, d) q, k, v (d = 32 or 64, T <= 512) on CPU,
    as (B, T, h, d); None where the compiled kernel cannot do it (no AVX-512 BF16, other sizes).

    ``mask``: bool, broadcastable to (B, 1, T, T), True = attend (``sdpa_mask``'s form). One pass per (example,
    head) with everything in cache: S = Q K^T * scale accumulated in fp32 by AVX-512 BF16 dot products, the
    masked softmax in fp32 rounded once to bf16 P, O = P V accumulated in fp32 and rounded once, written
    straight into the (B, T, h, d) layout the output projection reads. In prediction P holds the weights before
    the softmax's normalisation, e = exp(S - max S), and O's row is divided by sum e in fp32 before its rounding
    (one pass over the scores fewer; as accurate: 1.9e-3 relative error against float64 where P = bf16(e / sum
    e) gave 2.3e-3, 16 x 12 x 256 x 32). Unlike the unfused form, the scores are
    not rounded to bf16 before the softmax (as in PyTorch's fused kernel, and in its math kernel, which
    computes in fp32, under dropout). A row with no key to attend gives 0.

    Training's forward (dropout p): with ``probs`` (contiguous bf16 (B, h, T, T)) the kernel also writes P there
    for the backward pass and multiplies V by P m instead, m :func:`softmax_keep`'s mask for ``seed`` and
    ``threshold`` (rows numbered over (B, h, T) from 0), and O by ``dropout_scale`` = 1 / (1 - p) before its one
    rounding: O = (P m) V / (1 - p).

    Packed sequences (prediction): with ``starts``, (B + 1,) int64 offsets from 0 to T, q, k and v are (1, h, T,
    d) holding B sequences one after another, sequence b the rows starts[b] .. starts[b + 1] - 1, each attending
    only to itself; no mask, no ``probs``; the output is (1, T, h, d). The same numbers as the sequences padded
    into a batch, without the padding's work.
    """
    nb, t = _packed(q, mask, starts)
    args = _attention_args(q, k, v, mask, t)
    if args is None:
        return None
    lib, mask, st = args
    _, h, n, d = q.shape
    if probs is not None:
        if starts is not None:
            raise ValueError("attention: packed sequences are for prediction (no probs)")
        _check({"probs": (probs, torch.bfloat16)}, (nb, h, t, t))
    out = torch.empty((q.shape[0], n, h, d), dtype=torch.bfloat16)
    if lib.attention_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if mask is None else mask.data_ptr(),
                          out.data_ptr(), nb, h, t, d, st, float(scale), None if probs is None else probs.data_ptr(),
                          seed, int(threshold), float(dropout_scale), None if starts is None else starts.data_ptr()):
        raise MemoryError("attention kernel: no memory for its packed keys and values")
    return out


def int8_linear_available(k: int, n: int) -> bool:
    """Whether :func:`int8_linear` runs here for a k -> n linear: AMX tiles with int8 products (Sapphire Rapids and
    later, the tiles lent by Linux, not turned off by :func:`amx_form`), k a multiple of 64, n of 32."""
    lib = compiled()
    return (lib is not None and hasattr(lib, "linear_u8") and bool(lib.linear_u8_available())
            and k > 0 and k % 64 == 0 and n > 0 and n % 32 == 0)


def int8_tiles(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 weight (n, k) as :func:`int8_linear` reads it: (its tiles, 16 output columns by 64 inputs each in
    tdpbusd's layout; its rows' sums, int32), made once per model."""
    n, k = q.shape
    if q.dtype != torch.int8 or not int8_linear_available(k, n):
        raise ValueError("int8_tiles: an int8 (n, k) weight with k % 64 == 0 and n % 32 == 0, where AMX runs")
    q = q.contiguous()
    tiles = torch.empty(n * k, dtype=torch.int8)
    compiled().linear_u8_pack(q.data_ptr(), n, k, tiles.data_ptr())
    return tiles, q.sum(1, dtype=torch.int32)


def int8_linear(x: torch.Tensor, x_scale: float, x_zero: int, tiles: tuple[torch.Tensor, torch.Tensor],
                w_scales: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool = False,
                out: torch.dtype = torch.float32, codes: tuple[float, int] | None = None) -> torch.Tensor:
    """y = x_scale w_scales[j] sum_i (x[., i] - x_zero) q[j, i] + bias[j] on AMX tiles for uint8 codes x (m, k) and
    the int8 weight q (n, k) packed by :func:`int8_tiles`, then the exact GELU where ``gelu``; (m, n) in ``out``
    (fp32 or bf16), or with ``codes`` = (s, z) y's uint8 codes on that range. oneDNN's ``qlinear_pointwise``
    computes the same function: on the Xeon with AMX (8,192 rows), 384 -> 384 in 0.58 ms against 0.87, 1,536 ->
    384 in 2.14 against 2.46, 384 -> 1,536 with the GELU into codes in 3.6 against 5.0-5.3 (oneDNN's GELU
    post-op about as dear as its product); the codes within 1 of oneDNN's and 1.5e-6 of them other (float64
    rounding's: 2.0e-6 other, oneDNN's 1.6e-6), bf16 outputs one rounding step apart in 2e-5 of them. The GELU
    is x Phi(x) to 1.8e-8 (the C source's GELU_H)."""
    packed, colsum = tiles
    m, k = x.shape
    n = colsum.shape[0]
    if x.dtype != torch.uint8 or not x.is_contiguous() or packed.numel() != n * k:
        raise ValueError("int8_linear: contiguous uint8 codes (m, k) and the tiles of a (n, k) weight")
    if codes is None and out not in (torch.float32, torch.bfloat16):
        raise ValueError(f"int8_linear: fp32, bf16 or uint8 codes out, not {out}")
    scale = (w_scales.float() * float(x_scale)).contiguous()
    comp = (colsum * int(x_zero)).to(torch.int32).contiguous()
    bias = torch.zeros(n) if bias is None else bias.float().contiguous()
    mode, inv, zero = (0, float(1.0 / codes[0]), int(codes[1])) if codes is not None else \
        (1 if out == torch.bfloat16 else 2, 1.0, 0)
    y = torch.empty((m, n), dtype=(torch.uint8, torch.bfloat16, torch.float32)[mode])
    if compiled().linear_u8(x.data_ptr(), m, k, packed.data_ptr(), n, scale.data_ptr(), bias.data_ptr(),
                            comp.data_ptr(), int(gelu), mode, inv, zero, y.data_ptr()):
        raise MemoryError("int8_linear: no memory for its row buffers")
    return y


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, *, starts: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`attention` for prediction with 8-bit products (``--quantize int8``): (B, T, h, d) bf16, or None
    where the kernel cannot run (no AVX-512 VNNI, or where :func:`attention` cannot).

    Per (example, head), each key and query row, and each value column over the attended keys, is coded in int8
    from its own range (symmetric: x ~ s round(x / s), s = max|x| / 127); the scores come from exact integer sums
    of products (AVX-512 VNNI: four 8-bit products per 32-bit lane, where bf16 makes two); the masked softmax is
    computed in fp32 up to its normalisation, e = exp(S - max S) in [0, 1] coded as u = round(255 e); and
        O = (s_v sum_j u_j w_j + r vbar) / sum_j 255 e_j,   r = sum_j (255 e_j - u_j),
    rounded once to bf16: r is the weight the codes left out (mostly small weights rounded to 0; dropping it
    sharpened attention), given to vbar, the attended keys' mean value row. Each score's error is a few
    thousandths of its row's largest |q| |k| products, each weight's at most 1/510 of the row's largest; as with
    the int8 linears, check the metrics before relying on it. The same kernel layout as :func:`attention`, packed
    sequences (``starts``) included.
    """
    nb, t = _packed(q, mask, starts)
    args = _attention_args(q, k, v, mask, t)
    if args is None or not args[0].attention_int8_available():
        return None
    lib, mask, st = args
    _, h, n, d = q.shape
    out = torch.empty((q.shape[0], n, h, d), dtype=torch.bfloat16)
    if lib.attention_int8(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if mask is None else mask.data_ptr(),
                          out.data_ptr(), nb, h, t, d, st, float(scale), None if starts is None else starts.data_ptr()):
        raise MemoryError("attention kernel: no memory for its packed keys and values")
    return out


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d_out: torch.Tensor, probs: torch.Tensor,
                       seed: int, threshold: int, dropout_scale: float, scale: float, out=None):
    """The gradients (dQ, dK, dV) of :func:`attention`'s training forward, O = (P m) V / (1 - p) with
    P = softmax(Q' K^T + bias), for contiguous bf16 (B, h, T, d) ``q`` (Q' = Q * scale, as the forward was given),
    ``k``, ``v``, the (B, h, T, T) ``probs`` the forward kept and ``d_out`` = dL/dO (any strides with a
    contiguous last dim); None where the kernel is absent. One pass per (example, head) with everything in cache:
        dP = dO V^T / (1 - p) (fp32), G = dP m, dS = P (G - rowsum(G P)) (rounded once to bf16),
        dQ = dS K * scale, dK = dS^T Q', dV = (P m)^T dO / (1 - p),
    each product by AVX-512 BF16 dot products accumulated in fp32 and rounded once, m redrawn from ``seed``
    (:func:`softmax_keep`'s mask). Unlike the unfused backward, dP and dO / (1 - p) are not rounded to bf16.
    ``out``: (dQ, dK, dV) written there instead, bf16 (B, h, T, d) tensors of any one set of strides with a
    contiguous last dim (e.g. views of one (B, T, 3, h, d) tensor: the input gradients of query, key and value
    side by side, :class:`fast._LoraLinears`).
    """
    b, h, t, d = q.shape
    lib = _attention_lib(d, t)
    if lib is None:
        return None
    _check({"q": (q, torch.bfloat16), "k": (k, torch.bfloat16), "v": (v, torch.bfloat16)}, (b, h, t, d))
    _check({"probs": (probs, torch.bfloat16)}, (b, h, t, t))
    if d_out.shape != q.shape or d_out.device.type != "cpu":
        raise ValueError(f"attention_backward: d_out must be a CPU tensor of shape {tuple(q.shape)}")
    d_out = d_out.to(torch.bfloat16)
    if d_out.stride(-1) != 1:
        d_out = d_out.contiguous()
    if out is None:
        out = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dq, dk, dv = out
    strides = dq.stride()
    if any(x.shape != q.shape or x.dtype != torch.bfloat16 or x.stride() != strides or x.device.type != "cpu"
           for x in out) or strides[-1] != 1:
        raise ValueError("attention_backward: out must be three bf16 tensors of q's shape with one set of strides")
    so = (ctypes.c_int64 * 3)(*d_out.stride()[:3])
    sg = (ctypes.c_int64 * 3)(*strides[:3])
    if lib.attention_backward_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), d_out.data_ptr(), probs.data_ptr(),
                                   dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), b, h, t, d, so, sg, float(scale), seed,
                                   int(threshold), float(dropout_scale)):
        raise MemoryError("attention kernel: no memory for its packed keys and values")
    return dq, dk, dv


def fused_softmax_available(t: int) -> bool:
    """Whether :func:`softmax_keep` and :func:`softmax_keep_backward` run here for rows of length ``t``."""
    return t <= MAX_ROW and compiled() is not None


def _rows(**tensors: torch.Tensor) -> tuple[int, int]:
    """(rows, row length) of the fused softmax's bf16 tensors, all of the first one's shape (:func:`_check`)."""
    shape = next(iter(tensors.values())).shape
    _check({name: (x, torch.bfloat16) for name, x in tensors.items()}, shape)
    if shape[-1] > MAX_ROW:
        raise ValueError(f"fused softmax: rows longer than {MAX_ROW}")
    return shape.numel() // shape[-1], shape[-1]


def softmax_keep(scores: torch.Tensor, probs: torch.Tensor, kept: torch.Tensor, row0: int, seed: int,
                 threshold: int) -> None:
    """probs = softmax(scores) over the last dim and kept = probs * m, bf16, in one pass (both written).

    m is :func:`attention_keep`'s mask for rows ``row0, row0 + 1, ...`` of the whole tensor; the softmax is
    accumulated in fp32 and rounded once (a 2^-24-accurate exp, so an entry differs from torch's bf16 softmax
    by at most one rounding step, rarely). A row of -inf gives zeros."""
    rows, t = _rows(scores=scores, probs=probs, kept=kept)
    compiled().softmax_keep_bf16(scores.data_ptr(), probs.data_ptr(), kept.data_ptr(), rows, t, row0, seed,
                                 int(threshold))


def softmax_keep_backward(grad: torch.Tensor, probs: torch.Tensor, kept: torch.Tensor, row0: int, seed: int,
                          threshold: int) -> None:
    """In place, ``grad`` (dL/d(P m)) becomes dS = P (G - rowsum(G P)) with G = grad * m (the gradient
    through dropout and softmax; fp32 sums, rounded once), and ``kept`` = P * m, the same bits as the
    forward's. The same mask as :func:`softmax_keep` for the same ``row0`` and seed."""
    rows, t = _rows(grad=grad, probs=probs, kept=kept)
    compiled().softmax_keep_backward_bf16(grad.data_ptr(), probs.data_ptr(), kept.data_ptr(), rows, t, row0, seed,
                                          int(threshold))


def attention_keep(shape: tuple[int, ...], threshold: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The fused kernels' keep-mask as 0/1 integers of ``dtype``: each row of length t takes ceil(t / 4)
    whole SplitMix64 words, i.e. :func:`draw` over rows padded to a multiple of 4, cut back to t."""
    t = shape[-1]
    t4 = (t + 3) // 4 * 4
    full = draw(torch.empty((*shape[:-1], t4), dtype=dtype), threshold, seed)
    return full if t4 == t else full[..., :t].contiguous()


def _check(tensors: dict[str, tuple[torch.Tensor, torch.dtype]], shape: tuple[int, ...]) -> None:
    for name, (x, dtype) in tensors.items():
        if x.dtype != dtype or not x.is_contiguous() or x.device.type != "cpu" or tuple(x.shape) != tuple(shape):
            raise ValueError(f"fused kernel: {name} must be a contiguous CPU {_TYPE_NAMES.get(dtype, dtype)} tensor "
                             f"of shape {tuple(shape)}")


def fused_rows_available(n: int) -> bool:
    """Whether :func:`dropout_add_norm` runs here for rows of length ``n``."""
    return 0 < n <= MAX_ROW and compiled() is not None


def dropout_add_norm(h: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     seed: int, threshold: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = LayerNorm(round(h * scale) * m + r) over the last dim in one pass: h bf16, r and the LayerNorm's
    weight and bias fp32; m is :func:`draw`'s mask over h's flat elements for ``seed`` (the mask
    ``keep_bits(h.shape, ...)`` gives), and round(h * scale) * m is exactly dropout's bf16 output.
    Returns (y, z, stats): z the LayerNorm's fp32 input and stats each row's (mean, 1 / std), for
    :func:`dropout_add_norm_backward` (prediction, which keeps nothing: :func:`add_norm`)."""
    n = h.shape[-1]
    _check({"h": (h, torch.bfloat16), "r": (r, torch.float32)}, h.shape)
    _check({"weight": (weight, torch.float32), "bias": (bias, torch.float32)}, (n,))
    if not fused_rows_available(n):
        raise ValueError(f"dropout_add_norm: rows of 1 to {MAX_ROW} values, where the kernels are compiled")
    rows = h.numel() // n
    y, z, stats = torch.empty(h.shape), saved_empty(h.shape), saved_empty((rows, 2))
    compiled().dropout_add_norm_bf16(h.data_ptr(), r.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                     z.data_ptr(), stats.data_ptr(), rows, n, seed, int(threshold), float(scale),
                                     float(eps))
    return y, z, stats


def _code_args(yq: torch.Tensor | None, codes: tuple[float, int] | None) -> tuple:
    """The kernels' (yq, 1 / s, z) arguments: NULL, 1, 0 without codes; 1 / s rounded to fp32 as
    :func:`quantize_u8` passes it."""
    if yq is None:
        return None, 1.0, 0
    scale, zero = codes
    if not (scale > 0 and 0 <= int(zero) <= 255):
        raise ValueError(f"uint8 codes: scale > 0 and zero point 0-255, not {codes}")
    return yq.data_ptr(), float(1.0 / scale), int(zero)


#: the attribute on a prediction LayerNorm's fp32 output that carries its uint8 codes on a calibrated range,
#: (codes, (s, z)) (:func:`add_norm`, :func:`embed_norm` with ``codes``), for int8-static's products
#: (:class:`clintune.quantize.Int8Linear`)
U8_CODES = "_clintune_u8"


def add_norm(h: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
             bf16_copy: bool = False, codes: tuple[float, int] | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = LayerNorm(h + r) over the last dim in one pass, for prediction (h bf16; r, the LayerNorm's weight and
    bias fp32; y fp32): :func:`dropout_add_norm` with every element kept (no mask drawn) and nothing kept for a
    backward pass, its very bits, with z = h + r held in cache instead of written to y and read back. PyTorch
    takes two passes (the add, then ``native_layer_norm``); the sum is the same fp32 sum and the LayerNorm within
    fp32 rounding of PyTorch's. ``bf16_copy``: (y, y rounded to bf16), the second from the same pass (what the
    next layer's bf16 products read, instead of a cast of y for each of them). ``codes`` (s, z): (y, y's uint8
    codes on that fixed range), likewise (what int8-static products read, :mod:`clintune.quantize`, instead of a
    coding pass of their own); not with ``bf16_copy``."""
    if bf16_copy and codes is not None:
        raise ValueError("add_norm: a bf16 copy or uint8 codes, not both")
    n = h.shape[-1]
    _check({"h": (h, torch.bfloat16), "r": (r, torch.float32)}, h.shape)
    _check({"weight": (weight, torch.float32), "bias": (bias, torch.float32)}, (n,))
    if not fused_rows_available(n):
        raise ValueError(f"add_norm: rows of 1 to {MAX_ROW} values, where the kernels are compiled")
    y = torch.empty(h.shape)
    yb = torch.empty(h.shape, dtype=torch.bfloat16) if bf16_copy else None
    yq = torch.empty(h.shape, dtype=torch.uint8) if codes is not None else None
    if compiled().add_norm_pred(h.data_ptr(), r.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                None if yb is None else yb.data_ptr(), h.numel() // n, n, float(eps),
                                *_code_args(yq, codes)):
        raise MemoryError("add_norm: no memory for its row buffers")
    return (y, yb) if bf16_copy else (y, yq) if codes is not None else y


def embed_norm(ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor | None, word: torch.Tensor,
               pos: torch.Tensor, typ: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               bf16_copy: bool = False, codes: tuple[float, int] | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """BERT's embeddings for prediction in one pass: y = LayerNorm((word[ids] + typ[types]) + pos[positions]) over
    the last dim (ids, positions and types int64 of one shape, types None: row 0 of ``typ`` everywhere; the
    tables, weight and bias fp32; y fp32 of shape ids.shape + (n,)). PyTorch takes three gathers, two adds and
    ``native_layer_norm``; the sum is the same fp32 sum (the same order) and the LayerNorm within fp32 rounding of
    PyTorch's. ``bf16_copy``: (y, y rounded to bf16), ``codes``: (y, its uint8 codes), as :func:`add_norm`. None
    where an id, a position or a type
    falls outside its table (nothing is returned half-written: the caller's PyTorch path raises its own error)."""
    n = word.shape[-1]
    shape = ids.shape
    _check({"positions": (positions, torch.int64), **({} if types is None else {"types": (types, torch.int64)})},
           shape)
    _check({"ids": (ids, torch.int64)}, shape)
    for name, table in (("word", word), ("pos", pos), ("typ", typ)):
        if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != n or not table.is_contiguous():
            raise ValueError(f"embed_norm: {name} must be a contiguous fp32 (rows, {n}) table")
    _check({"weight": (weight, torch.float32), "bias": (bias, torch.float32)}, (n,))
    if not fused_rows_available(n):
        raise ValueError(f"embed_norm: rows of 1 to {MAX_ROW} values, where the kernels are compiled")
    if bf16_copy and codes is not None:
        raise ValueError("embed_norm: a bf16 copy or uint8 codes, not both")
    y = torch.empty(*shape, n)
    yb = torch.empty(*shape, n, dtype=torch.bfloat16) if bf16_copy else None
    yq = torch.empty(*shape, n, dtype=torch.uint8) if codes is not None else None
    bad = compiled().embed_norm_f32(ids.data_ptr(), positions.data_ptr(), None if types is None else types.data_ptr(),
                                    word.data_ptr(), pos.data_ptr(), typ.data_ptr(), weight.data_ptr(),
                                    bias.data_ptr(), y.data_ptr(), None if yb is None else yb.data_ptr(),
                                    ids.numel(), n, word.shape[0], pos.shape[0], typ.shape[0], float(eps),
                                    *_code_args(yq, codes))
    if bad:
        return None
    return (y, yb) if bf16_copy else (y, yq) if codes is not None else y


def dropout_add_norm_backward(dy: torch.Tensor, z: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor, seed: int,
                              threshold: int, scale: float, need_residual: bool = True):
    """The gradients of :func:`dropout_add_norm` for a frozen LayerNorm: (dh bf16, dr fp32 or None).
    dr = dz = rstd (g - mean(g) - x mean(g x)), g = dy * weight, x = (z - mean) * rstd; dh = dz rounded to
    bf16 (autograd's cast at the add), times m and ``scale`` (dropout's backward), rounded again."""
    n = z.shape[-1]
    _check({"dy": (dy, torch.float32), "z": (z, torch.float32)}, z.shape)
    _check({"weight": (weight, torch.float32)}, (n,))
    rows = z.numel() // n
    _check({"stats": (stats, torch.float32)}, (rows, 2))
    dh = torch.empty(z.shape, dtype=torch.bfloat16)
    dr = torch.empty(z.shape) if need_residual else None
    compiled().dropout_add_norm_backward_bf16(dy.data_ptr(), z.data_ptr(), stats.data_ptr(), weight.data_ptr(),
                                              0 if dr is None else dr.data_ptr(), dh.data_ptr(), rows, n, seed,
                                              int(threshold), float(scale))
    return dh, dr


def gelu_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(x), GELU'(x)) for bf16 ``x`` in one pass: x Phi(x) and Phi(x) + x phi(x) with the exact normal
    CDF (erf form, 1.5e-7 absolute error), computed in fp32 and rounded to bf16 once each."""
    _check({"x": (x, torch.bfloat16)}, x.shape)
    y, d = torch.empty_like(x), saved_empty(x.shape, x.dtype)
    compiled().gelu_and_grad_bf16(x.data_ptr(), y.data_ptr(), d.data_ptr(), x.numel())
    return y, d


def mul(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """g * d for bf16 tensors of one shape, in fp32 and rounded once (as torch's bf16 product)."""
    _check({"g": (g, torch.bfloat16), "d": (d, torch.bfloat16)}, g.shape)
    out = torch.empty_like(g)
    compiled().mul_bf16(g.data_ptr(), d.data_ptr(), out.data_ptr(), g.numel())
    return out


_TYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def dropout_available(x_dtype: torch.dtype, y_dtype: torch.dtype) -> bool:
    """Whether :func:`dropout` runs here from ``x_dtype`` to ``y_dtype``."""
    return ((_TYPE_NAMES.get(x_dtype), _TYPE_NAMES.get(y_dtype)) in _DROPOUT_TYPES
            and compiled() is not None)


def dropout(x: torch.Tensor, y: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:
    """y = x * m * scale in one pass (computed in fp32, rounded to y's type; dropped values +0), m the
    mask :func:`draw` makes over x's flat elements for ``seed`` and ``threshold``. Also dropout's backward
    (x the gradient). Contiguous CPU fp32 / bf16 tensors of one shape; returns y."""
    if not (x.is_contiguous() and y.is_contiguous() and x.device.type == y.device.type == "cpu"
            and x.shape == y.shape and dropout_available(x.dtype, y.dtype)):
        raise ValueError("dropout kernel: contiguous CPU fp32/bf16 tensors of one shape")
    getattr(compiled(), f"dropout_{_TYPE_NAMES[x.dtype]}_{_TYPE_NAMES[y.dtype]}")(
        x.data_ptr(), y.data_ptr(), x.numel(), seed, int(threshold), float(scale))
    return y


def dropout_add(a: torch.Tensor, b: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:
    """a + b * m * scale in fp32 for bf16 ``a`` and ``b`` of one shape, m :func:`draw`'s mask for ``seed``: the
    input gradient of a frozen linear (a) and of LoRA's branch through its dropout (b), summed in one pass."""
    _check({"a": (a, torch.bfloat16), "b": (b, torch.bfloat16)}, a.shape)
    out = torch.empty(a.shape)
    compiled().dropout_add_bf16_f32(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), seed, int(threshold),
                                    float(scale))
    return out


def lora_kernels_available(n: int, k: int, r: int) -> bool:
    """Whether :func:`lora_backward`, :func:`lora_input` and :func:`lora_output` run here: AVX-512 with BF16, n and k
    multiples of 16 and at most MAX_ROW, rank 1 to 16."""
    lib = compiled()
    return lib is not None and bool(lib.lora_kernels_available()) and n % 16 == 0 and k % 16 == 0 \
        and 0 < r <= 16 and max(n, k) <= MAX_ROW


def _pointers(tensors) -> ctypes.Array:
    """The data pointers of ``tensors`` as a C array (the LoRA kernels' per-linear arguments)."""
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _linears(*args):
    """(G, each argument as a list): one LoRA linear's tensors (and seed) or G linears' sequences of them."""
    if not isinstance(args[0], (list, tuple)):
        return 1, [[x] for x in args]
    groups = len(args[0])
    if not 1 <= groups <= LORA_GROUPS or any(len(x) != groups for x in args):
        raise ValueError(f"LoRA kernels: 1 to {LORA_GROUPS} linears, each with all of its tensors")
    return groups, [list(x) for x in args]


def lora_backward(g: torch.Tensor, b, u, dropped, a, gw: torch.Tensor | None, scaling: float, seed, threshold: int,
                  dscale: float):
    """LoRA's gradients from one pass over the rows, for bf16 2-D ``g`` (m, n) = dL/dy, ``b`` = B (n, r),
    ``u`` = U = drop(x) A^T (m, r), ``dropped`` = drop(x) (m, k), ``a`` = A (r, k) and ``gw`` = g W (m, k; None:
    no input gradient wanted): (dA (r, k), dB (n, r), dx (m, k) or None), fp32, with dU = s g B in fp32,
    dB = s U^T g, dA = dU^T drop(x), dx = gw + (dU A) m / (1 - p), m the dropout's mask for ``seed`` and
    ``threshold`` (:func:`draw`'s over drop(x)'s elements) and ``dscale`` = 1 / (1 - p). Where AMX tiles run
    (:func:`amx_form`) and n and k are multiples of 32, dU, dB and dA are made on the tiles, dA from dU's fp32 bits
    in three bf16 parts (as accurate as the AVX-512 form's fp32 dU). ``dropped`` may be the first k columns of a
    wider tensor (:func:`lora_input`'s ``width``).

    G LoRA linears on one input (query, key and value; up to :data:`LORA_GROUPS`): ``b``, ``u``, ``dropped``,
    ``a`` and ``seed`` sequences of G, ``g`` (m, G n) their output gradients side by side, ``gw`` = g W for
    their frozen weights stacked (W_1; ..; W_G): ([dA_e], [dB_e], dx) with dx = gw + sum_e (dU_e A_e) m_e / (1 - p)
    summed in one pass, e in turn."""
    single = not isinstance(b, (list, tuple))
    groups, (b, u, dropped, a, seed) = _linears(b, u, dropped, a, seed)
    m, gn = g.shape
    r, k = a[0].shape
    n = gn // groups
    if n * groups != gn:
        raise ValueError(f"lora_backward: g must be a contiguous (m, {groups} n) bf16 tensor")
    _check({"g": (g, torch.bfloat16)}, (m, gn))
    ldd = dropped[0].stride(0)
    for e in range(groups):
        _check({"b": (b[e], torch.bfloat16)}, (n, r))
        _check({"u": (u[e], torch.bfloat16)}, (m, r))
        _check({"a": (a[e], torch.bfloat16)}, (r, k))
        d = dropped[e]
        if d.dtype != torch.bfloat16 or d.shape != (m, k) or d.stride() != (ldd, 1) or ldd < k or d.device.type != "cpu":
            raise ValueError(f"lora_backward: dropped must be bf16 ({m}, {k}) CPU tensors of rows one stride apart")
    if gw is not None:
        _check({"gw": (gw, torch.bfloat16)}, (m, k))
    da, db = [torch.empty((r, k)) for _ in a], [torch.empty((n, r)) for _ in b]
    dx = None if gw is None else torch.empty((m, k))
    seeds = (ctypes.c_uint64 * groups)(*(int(x) for x in seed))
    if compiled().lora_backward_bf16(g.data_ptr(), gn, _pointers(b), _pointers(u), _pointers(dropped), ldd, _pointers(a),
                                     None if gw is None else gw.data_ptr(), _pointers(da), _pointers(db),
                                     None if dx is None else dx.data_ptr(), m, n, k, r, groups, float(scaling), seeds,
                                     int(threshold), float(dscale)):
        raise MemoryError("LoRA backward kernel: no memory for its sums")
    return (da[0], db[0], dx) if single else (da, db, dx)


def lora_input(x: torch.Tensor, a, seed, threshold: int, dscale: float, dropout: bool, width: int | None = None):
    """LoRA's input side in one pass over fp32 ``x`` (..., k), for A (r, k) bf16 (:func:`lora_kernels_available`'s
    sizes): (xb, drop(x), U) with xb = bf16(x) for the frozen product, drop(x) = bf16(x * ``dscale``) m (the
    :func:`dropout` kernel's bits: m :func:`draw`'s mask over x's elements; xb itself without ``dropout``) and
    U = drop(x) A^T (..., r), its fp32 sums rounded once (on AMX tiles where they run and k is a multiple of 32).
    ``a`` and ``seed`` sequences of G (LoRA linears on the one x: query, key and value): (xb, [drop_e(x)], [U_e]),
    xb once, each linear's own mask. ``width`` (at least k + G r): xb is (..., width), [bf16(x) | U_1 .. U_G | 0],
    the input of one frozen product with the updates folded in (the weight [W | s B ...], :class:`fast._LoraLinears`);
    without dropout drop_e(x) is then its first k columns."""
    single = not isinstance(a, (list, tuple))
    groups, (a, seed) = _linears(a, seed)
    r, k = a[0].shape
    _check({"x": (x, torch.float32)}, (*x.shape[:-1], k))
    for e in range(groups):
        _check({"a": (a[e], torch.bfloat16)}, (r, k))
    m = x.numel() // k
    width = k if width is None else width
    if width != k and width < k + groups * r:
        raise ValueError(f"lora_input: width {width} holds neither x alone nor x and the {groups} U side by side")
    shape = (*x.shape[:-1], width)
    xb = torch.empty(shape, dtype=torch.bfloat16) if dropout else saved_empty(shape, torch.bfloat16)
    # kept for the backward pass, as U is; without dropout drop(x) is xb (its first k columns)
    dropped = ([saved_empty(x.shape, torch.bfloat16) for _ in a] if dropout
               else [xb if width == k else xb[..., :k]] * groups)
    u = [saved_empty((*x.shape[:-1], r), torch.bfloat16) for _ in a]
    seeds = (ctypes.c_uint64 * groups)(*(int(s) for s in seed))
    if compiled().lora_input_bf16(x.data_ptr(), _pointers(a), xb.data_ptr(), width,
                                  _pointers(dropped) if dropout else None, _pointers(u), m, k, r, groups, seeds,
                                  int(threshold), float(dscale)):
        raise MemoryError("LoRA input kernel: no memory")
    return (xb, dropped[0], u[0]) if single else (xb, dropped, u)


def lora_output(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """In place: y = bf16(y + ``scaling`` U B^T) for the frozen product's bf16 ``y`` (..., n), U (..., r) and B (n, r)
    bf16, the update summed in fp32 and added before y's one rounding (as ``addmm_`` with ``alpha``)."""
    n, r = b.shape
    _check({"y": (y, torch.bfloat16)}, (*y.shape[:-1], n))
    _check({"u": (u, torch.bfloat16)}, (*y.shape[:-1], r))
    _check({"b": (b, torch.bfloat16)}, (n, r))
    if compiled().lora_output_bf16(y.data_ptr(), u.data_ptr(), b.data_ptr(), y.numel() // n, n, r, float(scaling)):
        raise MemoryError("LoRA output kernel: no memory")
    return y


def affine_u8(lo: float, hi: float) -> tuple[float, int]:
    """(s, z) of the uint8 codes of values in [lo, hi], x ~ s (q - z): the range widened to hold 0 (so that 0
    has an exact code), s = (max(hi, 0) - min(lo, 0)) / 255 rounded to fp32 (1 for an all-zero range) and
    z = round(-min(lo, 0) / s) in [0, 255]. :func:`quantize_u8` takes each tensor's own range; int8-static
    prediction (:mod:`clintune.quantize`) a range calibrated beforehand."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32((hi - lo) / 255.0)) or 1.0
    return scale, int(min(255, max(0, round(-lo / scale))))


def quantize_u8(x: torch.Tensor, codes: tuple[float, int] | None = None) -> tuple[torch.Tensor, float, int]:
    """(q, s, z): x's values as uint8 codes with x ~ s (q - z), for a contiguous CPU fp32 or bf16 ``x``.

    The range is widened to hold 0 (so that 0 has an exact code, as padding and ReLU-like zeros need):
    lo = min(min x, 0), hi = max(max x, 0), s = (hi - lo) / 255, z = round(-lo / s), and
    q = round(clamp(x s^-1 + z, 0, 255)), with x s^-1 + z rounded once to fp32 (a fused multiply-add: a value a
    hair from a half step goes the way PyTorch sends it) and ties to even: PyTorch's asymmetric per-tensor scheme
    (``torch.quantize_per_tensor_dynamic``), in two passes over x (its range, then its codes) without the
    fp32 copy and the quantized tensor's own copy that path makes for bf16 input. The error is at most s / 2
    per value. Without the compiled kernels, PyTorch's own passes do the same. ``codes`` (s, z): on that fixed
    range instead (int8-static's calibrated ranges, :func:`affine_u8`), in one pass; values beyond it clip."""
    name = _TYPE_NAMES.get(x.dtype)
    if name is None or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError("quantize_u8: a contiguous CPU fp32 or bf16 tensor")
    lib = compiled()
    if codes is not None:
        scale, zero = codes
    elif lib is None:
        xf = x.float()
        xf = xf[~xf.isnan()]                               # NaN skipped, as the kernel's vminps / vmaxps do
        lo, hi = (float(v) for v in torch.aminmax(xf)) if xf.numel() else (0.0, 0.0)
    else:
        out = np.zeros(2, dtype=np.float32)
        getattr(lib, f"range_{name}")(x.data_ptr(), x.numel(), out.ctypes.data)
        lo, hi = float(out[0]), float(out[1])
    if codes is None:
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("quantize_u8: x holds an infinite value")
        scale, zero = affine_u8(lo, hi)                    # the range widened to hold 0 there
    if lib is None:
        # x s^-1 + z rounded once to fp32, as the kernel's fused multiply-add (exact in fp64 first)
        v = (x.double() * float(np.float32(1.0 / scale)) + zero).float()
        q = torch.round(v.clamp_(0, 255)).nan_to_num_(0.0).to(torch.uint8)
    else:
        q = torch.empty(x.shape, dtype=torch.uint8)
        getattr(lib, f"quantize_u8_{name}")(x.data_ptr(), q.data_ptr(), x.numel(), float(1.0 / scale), zero)
    return q, scale, zero
