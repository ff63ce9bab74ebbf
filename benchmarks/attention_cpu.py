#!/usr/bin/env python3
"""Which attention is fastest on this CPU? (issue 7) No training, no data: random bf16 queries, keys and values.

clintune chooses its CPU attention by the instruction set (:mod:`clintune.fast`): the compiled bf16 kernels
where they are built (AVX-512 BF16), in their AMX form where the CPU has AMX; where they are not built, PyTorch's
fused SDPA (AMX) or the chunked oneDNN products for prediction and the chunked products for training. This times
each form at the shapes of the benchmark encoders so that the choice can be checked on another CPU:

* prediction (no gradients), (B, heads, T, d) with one note of the batch half padding: the compiled bf16 kernel
  (:func:`clintune.masks.attention`; on a CPU with AMX its AMX form, and its AVX-512 form as "bf16 kernel avx512"),
  the int8 kernel (:func:`clintune.masks.attention_int8`, VNNI),
  :func:`clintune.fast._chunked_attention` (oneDNN's batched products, a cache-sized chunk at a time) and
  PyTorch's ``scaled_dot_product_attention``;
* packed notes (16 notes of 60-256 tokens end to end): the compiled kernel in one call against SDPA one note at
  a time (what :mod:`clintune.packing` would do where the kernel steps aside);
* training with attention dropout 0.1, forward and backward (:class:`clintune.fast._DropoutAttention`): with
  the compiled kernels (both forms with AMX) and with the chunked products.

Medians of ``--repeats`` calls after two warm-up calls, in ms. Forms this CPU cannot run are left out.

    python benchmarks/attention_cpu.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import cpu_line  # noqa: E402

SHAPES = [(16, 12, 256, 32), (64, 12, 256, 32), (16, 12, 512, 64), (16, 12, 128, 64)]   # MiniLM; base at 512/128
PACKED = [256] * 9 + [200, 180, 150, 120, 100, 80, 60]


def ms(f, repeats: int) -> float:
    f()
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()

    from clintune import fast, masks

    lib = masks.compiled()
    bf16_kernel = bool(lib is not None and lib.attention_bf16_available())
    int8_kernel = bool(bf16_kernel and lib.attention_int8_available())
    amx = bool(bf16_kernel and lib.attention_amx_available())           # both forms of the bf16 kernels

    def avx512(f):
        def run():
            with masks.amx_form(False):
                return f()
        return run

    print(f"{cpu_line()}, {torch.get_num_threads()} threads; clintune's choice: "
          f"{('compiled kernels, AMX form' if amx else 'compiled kernels') if fast._attention_kernels() else 'SDPA (prediction), chunked products (training)' if fast._amx() else 'chunked products'}")
    torch.manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        for b, h, t, d in SHAPES:
            q, k, v = (torch.randn(b, h, t, d).bfloat16() for _ in range(3))
            mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
            mask[3, ..., t // 2:] = False
            forms = {"chunked": lambda: fast._chunked_attention(q, k, v, mask, d ** -0.5),
                     "sdpa": lambda: sdpa(q, k, v, attn_mask=mask).transpose(1, 2).contiguous()}
            if bf16_kernel:
                forms["bf16 kernel"] = lambda: masks.attention(q, k, v, mask, d ** -0.5)
            if amx:
                forms["bf16 kernel avx512"] = avx512(forms["bf16 kernel"])
            if int8_kernel:
                forms["int8 kernel"] = lambda: masks.attention_int8(q, k, v, mask, d ** -0.5)
            print(f"predict {b} x {h} x {t} x {d}: " + ", ".join(f"{n} {ms(f, a.repeats):.2f}" for n, f in forms.items()))
        n, h, d = sum(PACKED), 12, 32
        q, k, v = (torch.randn(1, h, n, d).bfloat16() for _ in range(3))
        starts = torch.tensor([0, *torch.tensor(PACKED).cumsum(0).tolist()], dtype=torch.int64)
        bounds = starts.tolist()

        def one_at_a_time():
            return torch.cat([sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]).transpose(1, 2)
                              for s, e in zip(bounds[:-1], bounds[1:])], 1)

        forms = {"sdpa one note at a time": one_at_a_time}
        if bf16_kernel:
            forms["bf16 kernel packed"] = lambda: masks.attention(q, k, v, None, d ** -0.5, starts=starts)
        if amx:
            forms["bf16 kernel avx512 packed"] = avx512(forms["bf16 kernel packed"])
        print(f"packed {len(PACKED)} notes, {n} tokens, {h} x {d}: "
              + ", ".join(f"{name} {ms(f, a.repeats):.2f}" for name, f in forms.items()))
    b, h, t, d = SHAPES[0]
    q, k, v = (torch.randn(b, h, t, d).bfloat16() for _ in range(3))
    mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
    mask[3, ..., t // 2:] = False
    bias, padded = fast._additive(mask, torch.bfloat16, b)

    def step(kernels: bool):
        qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        fast._DropoutAttention.apply(qq, kk, vv, bias, padded, 0.1, d ** -0.5, mask, kernels).float().sum().backward()

    real = fast._attention_kernels
    out = {}
    try:
        if bf16_kernel:
            fast._attention_kernels = lambda: True                      # the kernels, AMX or not
            out["kernels"] = ms(lambda: step(True), a.repeats)
            if amx:
                out["kernels avx512"] = ms(avx512(lambda: step(True)), a.repeats)
        out["chunked"] = ms(lambda: step(False), a.repeats)
    finally:
        fast._attention_kernels = real
    print(f"train {b} x {h} x {t} x {d}, dropout 0.1, forward + backward: "
          + ", ".join(f"{n} {v:.2f}" for n, v in out.items()))


if __name__ == "__main__":
    main()
