#!/usr/bin/env python3
"""What AMX's tiles can do on this CPU, and how far oneDNN's bf16 products at MiniLM's shapes run from it (issue 7).

MFU (``clintune/cost.py``) divides achieved FLOP/s by the measured matrix-product peak: the best single bf16
product of 1024- and 2048-square matrices, oneDNN's own. On a CPU with AMX that is not the tiles' limit. This
measures, in one process:

1. the tiles' ceiling: a loop of independent ``tdpbf16ps`` (16 x 16 x 32 bf16 products into fp32: 16,384
   multiply-adds each) on every core, the operands already in tiles; the same loop loading its four operand
   tiles from L1 before each round of four products (what a matrix kernel at least does); and ``tdpbusd``
   (int8, 16 x 16 x 64);
2. ``cost.matmul_peak_flops``, the peak MFU is measured against;
3. oneDNN's bf16 products as clintune's fast path calls them, at MiniLM's shapes: the forward linear
   (``mkldnn._linear_pointwise``, bias inside; 384 -> 1536 also with the exact GELU post-op, as prediction
   runs it) and the input gradient of training's backward (``torch.mm(g, W)``), on a training micro-batch
   (2,048 tokens: 8 x 256) and a prediction piece (8,192 tokens): TFLOP/s, and the fraction of (1) and of (2).

    python benchmarks/amx_ceiling.py [--repeats 20]

Needs Linux on x86 with AMX (AMX-BF16 and AMX-INT8) and a C compiler; it says so and stops otherwise.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

import torch
from int8_ceiling import best_seconds, compile_loop

from clintune import cost
from clintune.runtime import cpu_flags

LOOP = r"""
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
static const uint8_t TILES[64] __attribute__((aligned(64))) = {   /* palette 1; tiles 0-7: 16 rows x 64 bytes */
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0};
#define TLOAD(T, BASE) __asm__ volatile ("tileloadd (%0,%1,1), %%tmm" #T :: "r" ((const void *) (BASE)), \
                                         "r" ((int64_t) 64) : "memory")
#define TDP(C, A, B) __asm__ volatile ("tdpbf16ps %%tmm" #B ", %%tmm" #A ", %%tmm" #C ::)
#define TDPI(C, A, B) __asm__ volatile ("tdpbusd %%tmm" #B ", %%tmm" #A ", %%tmm" #C ::)
int amx_request(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }   /* ARCH_REQ_XCOMP_PERM, XTILEDATA */
/* n rounds of four independent tile products per thread (form 0: bf16, operands in tiles; 1: bf16, the four
   operand tiles loaded from L1 each round; 2: int8, operands in tiles) */
void tiles(int64_t n, int form) {
    #pragma omp parallel
    {
        static uint8_t zero[8][1024] __attribute__((aligned(64)));
        __asm__ volatile ("ldtilecfg %0" :: "m" (*(const uint8_t (*)[64]) TILES) : "memory");
        TLOAD(4, zero[0]); TLOAD(5, zero[1]); TLOAD(6, zero[2]); TLOAD(7, zero[3]);
        if (form == 0) {
            for (int64_t i = 0; i < n; i++) { TDP(0, 4, 6); TDP(1, 4, 7); TDP(2, 5, 6); TDP(3, 5, 7); }
        } else if (form == 1) {
            for (int64_t i = 0; i < n; i++) {
                const uint8_t *a = zero[(i & 1) * 4];
                TLOAD(4, a); TLOAD(5, a + 1024); TLOAD(6, a + 2048); TLOAD(7, a + 3072);
                TDP(0, 4, 6); TDP(1, 4, 7); TDP(2, 5, 6); TDP(3, 5, 7);
            }
        } else {
            for (int64_t i = 0; i < n; i++) { TDPI(0, 4, 6); TDPI(1, 4, 7); TDPI(2, 5, 6); TDPI(3, 5, 7); }
        }
        __asm__ volatile ("tilerelease" ::: "memory");
    }
}
"""


def ceiling(rounds: int = 5_000_000) -> tuple[dict[str, float], int]:
    """Tera-operations per second of each tile loop on every core (the best of three runs each), and the threads."""
    so = compile_loop(LOOP, "amx_ceiling")
    if not so.amx_request():
        sys.exit("amx_ceiling: Linux did not lend this process the tiles (arch_prctl XTILEDATA)")
    so.tiles.argtypes = [ctypes.c_int64, ctypes.c_int]
    so.tiles.restype = None
    n = so.threads()
    out = {}
    for name, form, ops in (("bf16, operands in tiles", 0, 16 * 16 * 32 * 2), ("bf16, operands loaded from L1", 1,
                                                                                16 * 16 * 32 * 2),
                            ("int8, operands in tiles", 2, 16 * 16 * 64 * 2)):
        so.tiles(rounds // 10, form)
        out[name] = n * rounds * 4 * ops / best_seconds(so.tiles, rounds, form) / 1e12
    return out, n


def products(m_rows: tuple[int, ...], repeats: int) -> list[tuple[str, int, float]]:
    """(name, tokens, median seconds) of each oneDNN bf16 product clintune's fast path makes at MiniLM's shapes;
    the products take turns within each of ``repeats`` rounds (three more to warm up)."""
    torch.manual_seed(0)
    bf = torch.bfloat16
    weights = {(n, k): ((torch.randn(n, k) * 0.05).to(bf), (torch.randn(n) * 0.1).to(bf))
               for n, k in ((384, 384), (1536, 384), (384, 1536))}
    cases = []
    for m in m_rows:
        for n, k in ((384, 384), (1536, 384), (384, 1536)):
            w, b = weights[n, k]
            x, g = torch.randn(m, k).to(bf), torch.randn(m, n).to(bf)
            cases.append((f"forward {k} -> {n}", m,
                          lambda x=x, w=w, b=b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")))
            if n == 1536:
                cases.append((f"forward {k} -> {n} + GELU", m,
                              lambda x=x, w=w, b=b: torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")))
            cases.append((f"input gradient {n} -> {k}", m, lambda g=g, w=w: torch.mm(g, w)))
    times = [[] for _ in cases]
    for r in range(repeats + 3):
        for i, (_, _, fn) in enumerate(cases):
            t = time.perf_counter()
            fn()
            if r >= 3:
                times[i].append(time.perf_counter() - t)
    return [(name, m, statistics.median(ts)) for (name, m, _), ts in zip(cases, times)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    if not sys.platform.startswith("linux") or not {"amx_bf16", "amx_int8", "amx_tile"} <= cpu_flags():
        sys.exit("amx_ceiling: this is not Linux on a CPU with AMX (amx_tile, amx_bf16, amx_int8)")
    tiles, threads = ceiling()
    for name, tops in tiles.items():
        print(f"tile ceiling, {threads} threads, {name}: {tops:.2f} {'TOPS' if 'int8' in name else 'TFLOP/s'}")
    top = tiles["bf16, operands in tiles"]
    peak = cost.matmul_peak_flops(torch.bfloat16) / 1e12
    print(f"cost.matmul_peak_flops (what MFU divides by): {peak:.2f} TFLOP/s, {peak / top:.0%} of the tiles' bf16")
    print(f"{'oneDNN bf16 product':32} {'tokens':>6} {'ms':>7} {'TFLOP/s':>8} {'of tiles':>8} {'of MFU peak':>11}")
    for name, m, dt in products((2048, 8192), a.repeats):
        k, n = (int(v) for v in name.split(" + ")[0].split()[-3::2])
        tf = 2 * m * k * n / dt / 1e12
        print(f"{name:32} {m:>6} {dt * 1e3:7.3f} {tf:8.2f} {tf / top:8.0%} {tf / peak:11.0%}")


if __name__ == "__main__":
    main()
