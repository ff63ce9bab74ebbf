#!/usr/bin/env python3
"""How close int8 prediction's products run to this CPU's ceiling (issue 7).

Two measurements, each in this one process:

1. The ceiling: a loop of independent AVX-512 VNNI multiply-adds (``vpdpbusd``: 64 uint8 x int8 products
   added into 16 int32 lanes, 128 operations) on every core, and the same for bf16 (``vdpbf16ps``: 32 products,
   64 FLOP), compiled with the system C compiler. No matrix product can beat this; it is the peak that int8
   products are measured against (bf16's MFU uses the measured matrix-product peak, ``clintune/cost.py``).
2. oneDNN's int8 products as clintune's prediction calls them (``clintune.quantize.Int8Linear``: uint8 inputs
   per tensor, int8 weights per channel, bf16 output) at MiniLM's shapes, 4096 tokens (a prediction piece,
   ``training.EVAL_TOKENS_CPU``): query/key/value/output (384 -> 384), the feed-forward pair (384 -> 1536 with
   its GELU, 1536 -> 384), and rows taken 512 and 1024 at a time. On CPUs with AMX, clintune's int8 linears run
   on the tiles in a kernel of its own instead (``masks.int8_linear``); oneDNN's are measured there all the same,
   and run on the tiles too, past the VNNI loop's ceiling (``amx_ceiling.py`` measures the tiles').

    python benchmarks/int8_ceiling.py [--repeats 30]

Prints the operations per second of each and their fraction of the ceiling. Needs x86 with AVX-512 VNNI and
a C compiler (it says so and stops otherwise).
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from clintune import masks, quantize
from clintune.runtime import cpu_flags

LOOP = r"""
#include <immintrin.h>
#include <stdint.h>
/* n rounds of 16 independent multiply-adds per thread; returns a sum so nothing is optimised away */
int64_t vnni(int64_t n) {
    int64_t total = 0;
    #pragma omp parallel reduction(+:total)
    {
        __m512i acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_epi32(i);
        const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
        for (int64_t it = 0; it < n; it++) {
            #pragma GCC unroll 16
            for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
        }
        for (int i = 0; i < 16; i++) total += _mm512_reduce_add_epi32(acc[i]);
    }
    return total;
}
double bf16(int64_t n) {
    double total = 0;
    #pragma omp parallel reduction(+:total)
    {
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_ps((float) i);
        const __m512bh a = (__m512bh) _mm512_set1_epi16(0x3f80), b = (__m512bh) _mm512_set1_epi16(0x3c00);
        for (int64_t it = 0; it < n; it++) {
            #pragma GCC unroll 16
            for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        }
        for (int i = 0; i < 16; i++) total += _mm512_reduce_add_ps(acc[i]);
    }
    return total;
}
"""
THREADS = r"""
#ifdef _OPENMP
#include <omp.h>
#endif
int threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
"""


def compile_loop(source: str, who: str) -> ctypes.CDLL:
    """``source`` and a ``threads()`` function (OpenMP's threads, else 1), compiled for this CPU with OpenMP by the
    system C compiler and loaded; without a compiler, or where it fails, one line naming ``who`` and exit."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit(f"{who}: no C compiler (cc or gcc) found")
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "loop.c", Path(tmp) / "loop.so"
        src.write_text(source + THREADS)
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(lib)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{who}: {cc} could not compile the loop: {done.stderr.strip().splitlines()[-1:]}")
        return ctypes.CDLL(str(lib))


def best_seconds(run, *args) -> float:
    """The shortest of three timed calls ``run(*args)``."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def ceiling(rounds: int = 20_000_000) -> tuple[float, float, int]:
    """(int8 TOPS, bf16 TFLOP/s, threads) of the multiply-add loops, the best of three runs each."""
    so = compile_loop(LOOP, "int8_ceiling")
    so.vnni.argtypes = so.bf16.argtypes = [ctypes.c_int64]
    so.vnni.restype, so.bf16.restype = ctypes.c_int64, ctypes.c_double
    n = so.threads()
    best = {}
    for name, ops in (("vnni", 16 * 64 * 2), ("bf16", 16 * 32 * 2)):
        fn = getattr(so, name)
        fn(rounds // 10)
        best[name] = n * rounds * ops / best_seconds(fn, rounds) / 1e12
    return best["vnni"], best["bf16"], n


def products(shapes: list[tuple[int, int, bool, int]], m: int, repeats: int) -> list[float]:
    """Seconds of one int8 product of m tokens for each (k, n, gelu, rows): k -> n features, with the GELU
    post-op when ``gelu``, as ``Int8Linear`` calls oneDNN, ``rows`` tokens at a time. The shapes take turns
    within each of ``repeats`` rounds (so that a slower minute of a shared machine falls on all of them);
    the median of each."""
    torch.manual_seed(0)
    layers, inputs = {}, {}
    for k, n, _, _ in shapes:
        with masks.amx_form(False):          # oneDNN's packed weights, also where clintune's AMX kernel would run
            layers[k, n] = quantize.Int8Linear.from_linear(nn.Linear(k, n), quantize._SharedInput())
        inputs[k] = masks.quantize_u8(torch.randn(m, k).bfloat16())

    def run(k, n, gelu, rows):
        lin, (codes, scale, zero) = layers[k, n], inputs[k]
        post, algo = ("gelu", "none") if gelu else ("none", "")
        for i in range(0, m, rows):
            torch.ops.onednn.qlinear_pointwise(codes[i: i + rows], scale, zero, lin.packed, lin.scales, lin.zeros,
                                               lin.bias, 1.0, 0, torch.bfloat16, post, [], algo)
    times = [[] for _ in shapes]
    for r in range(repeats + 3):
        for i, shape in enumerate(shapes):
            t = time.perf_counter()
            run(*shape)
            if r >= 3:                                   # three warm-up rounds
                times[i].append(time.perf_counter() - t)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    if not {"avx512_vnni", "avx512_bf16"} <= cpu_flags():
        sys.exit("int8_ceiling: this CPU has no AVX-512 VNNI and BF16")
    if not quantize.int8_available():
        sys.exit("int8_ceiling: this PyTorch has no oneDNN int8 linear")
    peak, peak_bf16, threads = ceiling()
    print(f"ceiling, {threads} threads: int8 {peak:.3f} TOPS (vpdpbusd loop), bf16 {peak_bf16:.3f} TFLOP/s "
          f"(vdpbf16ps loop)")
    m = 4096
    shapes = [(k, n, gelu, rows) for k, n, gelu in ((384, 384, False), (384, 1536, True), (384, 1536, False),
                                                    (1536, 384, False)) for rows in (m, 1024, 512)]
    print(f"{'product (4096 tokens)':24} {'rows':>5} {'ms':>7} {'TOPS':>6} {'of ceiling':>10}")
    for (k, n, gelu, rows), dt in zip(shapes, products(shapes, m, a.repeats)):
        tops = 2 * m * k * n / dt / 1e12
        name = f"{k} -> {n}" + (" + GELU" if gelu else "")
        print(f"{name:24} {rows:>5} {dt * 1e3:7.3f} {tops:6.3f} {tops / peak:10.1%}")

if __name__ == "__main__":
    main()
