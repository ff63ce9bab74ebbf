#!/usr/bin/env python3
"""Where a LoRA training's time goes on this machine, by PyTorch's profiler (issue 7: profile before optimising).

Trains the speed run's LoRA (``train_pairs.py``'s settings: MiniLM, rank 8 on query, key and value, batch 16, max
length 256, bf16) on the first ``--notes`` medical-abstracts training notes once to warm up, then once under
``torch.profiler``, and prints:

* the matrix products by kind and shape (oneDNN's forward ``_linear_pointwise``, ``mm`` in the backward, ...):
  calls, milliseconds, TFLOP and TFLOP/s (2 m k n each);
* the time inside each of clintune's fused steps (``clintune.fast``'s autograd functions, forward and backward),
  less the products they call; and what is left (Python, autograd, PyTorch's other operators);
* each as a share of the profiled wall time, with the training's FLOP/s over the products' FLOPs.

The profiler adds its own cost (a few percent), so compare shares, not seconds, with unprofiled runs.

    python benchmarks/train_profile.py [--notes 320] [--epochs 1] [--micro-batch-tokens N]
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PRODUCTS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def flops(name: str, shapes: list) -> int:
    """2 m k n of one product from its recorded input shapes (0 where they do not say)."""
    try:
        if name == "mkldnn::_linear_pointwise":                  # x (..., k), weight (n, k)
            m = 1
            for d in shapes[0][:-1]:
                m *= d
            return 2 * m * shapes[1][0] * shapes[1][1]
        if name == "aten::mm":
            return 2 * shapes[0][0] * shapes[0][1] * shapes[1][1]
        if name == "aten::addmm":                                # bias, a (m, k), b (k, n)
            return 2 * shapes[1][0] * shapes[1][1] * shapes[2][1]
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = shapes[-2], shapes[-1]
            return 2 * a[0] * a[1] * a[2] * b[2]
    except (IndexError, TypeError):
        pass
    return 0


def product_time(event) -> float:
    """Microseconds of the products called under a profiler event, at any depth."""
    return sum(c.cpu_time_total if c.name in PRODUCTS else product_time(c) for c in event.cpu_children)


def main() -> None:
    from bench_data import cpu_line
    from torch.profiler import ProfilerActivity, profile
    from train_pairs import lora_args, lora_sample

    import clintune

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notes", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--work", default="/tmp/clintune-bench")
    ap.add_argument("--micro-batch-tokens", type=int, default=None, help="clintune's --micro-batch-tokens (default: its own)")
    a = ap.parse_args()
    args = lora_args(lora_sample(Path(a.work), a.notes), Path(tempfile.mkdtemp(prefix="train-profile-")), a.epochs)
    if a.micro_batch_tokens is not None:
        args["micro_batch_tokens"] = a.micro_batch_tokens
    print(f"{cpu_line()}; {a.notes} notes x {a.epochs} epoch(s); micro-batches of at most "
          f"{args.get('micro_batch_tokens', 'the default')} tokens")
    warm = clintune.train(**args).cost["train_seconds"]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        res = clintune.train(**args)
        wall = time.perf_counter() - t0
    train_s = res.cost["train_seconds"]
    print(f"train seconds: {warm:.2f} unprofiled, {train_s:.2f} profiled (the whole call {wall:.2f} s)")

    products = collections.defaultdict(lambda: [0, 0.0, 0])      # (kind, shape) -> calls, ms, FLOP
    fused = collections.defaultdict(lambda: [0, 0.0])             # function -> calls, ms less its products
    events = list(prof.events())
    for e in events:
        if e.name in PRODUCTS:
            shapes = e.input_shapes
            shape = "x".join(str(d) for d in (shapes[1] if e.name == "mkldnn::_linear_pointwise" else shapes[-1]))
            key = (e.name.split("::")[1], shape)
            products[key][0] += 1
            products[key][1] += e.cpu_time_total / 1e3
            products[key][2] += flops(e.name, shapes)
    for e in events:
        if e.name.startswith("_") and e.name[1:2].isupper():      # clintune.fast's autograd functions
            inner = product_time(e)
            fused[e.name][0] += 1
            fused[e.name][1] += (e.cpu_time_total - inner) / 1e3
    total_ms = train_s * 1e3
    print(f"\n{'product':22} {'weight / B':>12} {'calls':>6} {'ms':>8} {'share':>6} {'TFLOP':>7} {'TFLOP/s':>8}")
    p_ms = p_fl = 0.0
    for (kind, shape), (n, ms, fl) in sorted(products.items(), key=lambda kv: -kv[1][1]):
        p_ms, p_fl = p_ms + ms, p_fl + fl
        if ms >= 0.002 * total_ms:
            print(f"{kind:22} {shape:>12} {n:6d} {ms:8.0f} {ms / total_ms:6.1%} {fl / 1e12:7.3f} "
                  f"{fl / ms / 1e9 if ms else 0:8.2f}")
    print(f"{'all products':35} {p_ms:15.0f} {p_ms / total_ms:6.1%} {p_fl / 1e12:7.3f} {p_fl / p_ms / 1e9:8.2f}")
    print(f"\n{'fused step (less its products)':40} {'calls':>6} {'ms':>8} {'share':>6}")
    f_ms = 0.0
    for name, (n, ms) in sorted(fused.items(), key=lambda kv: -kv[1][1]):
        f_ms += ms
        print(f"{name:40} {n:6d} {ms:8.0f} {ms / total_ms:6.1%}")
    rest = total_ms - p_ms - f_ms
    print(f"{'everything else':40} {'':6} {rest:8.0f} {rest / total_ms:6.1%}")
    print(f"\ntraining at {p_fl / train_s / 1e12:.3f} TFLOP/s of products over the profiled {train_s:.2f} s; "
          f"the products alone at {p_fl / p_ms / 1e9:.2f}")


if __name__ == "__main__":
    main()
