#!/usr/bin/env python3
"""Does the random stream of the fast path's dropout masks change what it learns? (issue 7)

The fast path draws every dropout mask from SplitMix64 (:mod:`clintune.masks`: r_j = mix(seed + (j + 1) G),
four 16-bit uniforms per 64-bit output); ``--no-fast`` draws torch's mt19937 masks. Over nine seeds
(``f1_seeds.py --no-fast``) the fast path's test log loss came out 0.0017 above ``--no-fast``'s, while runs that
share the fast path's masks and change only its arithmetic moved it by at most 0.0002. That leaves the stream.
This trains the fast path twice at each seed, each in a process of its own:

* ``splitmix64``: clintune as it ships;
* ``moremur``: every 64-bit output of the stream passed through a second mixer before it is split (a constant
  xor, then Evensen's moremur finaliser). Both steps are bijections of 64-bit words, so the uniforms keep their
  law, but they are other numbers. Initialisation, order and arithmetic are the same as ``splitmix64``'s.

If the stream made the gap, the two would differ by about 0.0017 seed for seed; if not, only by another draw
(about 0.002-0.003 at a seed). Prints each seed's test F1, AUROC and log loss, the paired differences with
95% t-intervals, and each stream against ``--no-fast`` at the seeds where WORK/f1_seeds.json has it.

    python benchmarks/mask_stream.py [--seeds 42,1,2,3,4,8,9,10,11] [--epochs 3] [--work DIR]

Resumable: each finished (stream, seed) result is kept in WORK/mask_stream.json with the machine and software it
came from. No timings are compared, so it may share the machine with other work.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = "--as-clintune-moremur"   # argv[1] of the child: clintune's CLI with the other stream compiled in

#: the end of SplitMix64's mixer in clintune.masks' C source, and the same end followed by the second mixer
SPLITMIX64_END = "    return z ^ (z >> 31);\n}"
MOREMUR_END = ("    z = (z ^ (z >> 31)) ^ 0x5851F42D4C957F2DULL;   /* moremur after splitmix64 */\n"
               "    z ^= z >> 27; z *= 0x3C79AC492BA7B653ULL; z ^= z >> 33; z *= 0x1C69B3F74AC4AE35ULL; z ^= z >> 27;\n"
               "    return z;\n}")
STREAMS = ("splitmix64", "moremur")
RESULTS = ("f1", "accuracy", "auroc", "log_loss")


def need_kernels(masks) -> None:
    """Exit unless the mask kernels compile here: without them both streams would be numpy's."""
    if masks.compiled() is None:
        sys.exit("mask_stream: the mask kernels are not compiled here (no C compiler, or CLINTUNE_NO_KERNELS), "
                 "so the fast path's masks would come from numpy, not SplitMix64")


def use_moremur() -> None:
    """Compile this process's mask kernels with the second mixer (before anything has compiled them), and check
    that the masks drawn are no longer SplitMix64's."""
    import torch
    from clintune import masks

    if masks._LIB or masks._SOURCE.count(SPLITMIX64_END) != 1:
        sys.exit("mask_stream: clintune.masks is not the source this benchmark patches")
    masks._SOURCE = masks._SOURCE.replace(SPLITMIX64_END, MOREMUR_END)
    need_kernels(masks)
    n, seed, threshold = 1 << 16, 12345, -26214
    drawn = masks.draw(torch.empty(n, dtype=torch.uint8), threshold, seed).numpy().astype(bool)
    agree = float((drawn == masks.reference(n, seed, threshold)).mean())
    if agree > 0.85:                                       # independent masks at keep rate 0.9 agree 82% of the time
        sys.exit(f"mask_stream: the patched kernel still draws SplitMix64's masks ({agree:.3f} agree)")


def main() -> None:
    import speed
    from f1_seeds import resumable, t_interval, where

    from clintune import masks
    from clintune.store import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="42,1,2,3,4,8,9,10,11")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/clintune-bench")
    a = ap.parse_args()
    need_kernels(masks)
    seeds, work, train, test, store, done = resumable(a, "mask_stream.json")
    launchers = {"splitmix64": None, "moremur": [sys.executable, str(Path(__file__).resolve()), CHILD]}
    for seed in seeds:
        for stream in STREAMS:
            key = f"{stream}:{seed}:{a.epochs}"
            if key in done:
                continue
            r = speed.clintune(train, test, a, work / "mask_stream" / stream, seed=seed, launcher=launchers[stream])
            done[key] = {**{k: r[k] for k in RESULTS}, **where()}
            write_json(store, done)                        # atomic: never a half-written results file
            print(f"seed {seed} {stream}: F1 {r['f1']:.4f}, test log loss {r['log_loss']:.4f}", flush=True)
    res = {s: {k: [done[f"{s}:{seed}:{a.epochs}"][k] for seed in seeds] for k in RESULTS} for s in STREAMS}
    f1_seeds = work / "f1_seeds.json"
    other = json.loads(f1_seeds.read_text()) if f1_seeds.exists() else {}
    nofast = {seed: r["log_loss"] for seed in seeds
              if (r := other.get(f"clintune-no-fast:{seed}:{a.epochs}")) and r.get("log_loss") is not None}
    print(f"{'seed':>5} {'F1 splitmix64':>14} {'F1 moremur':>11} {'log loss splitmix64':>20} {'log loss moremur':>17}"
          f" {'--no-fast':>10}")
    for i, seed in enumerate(seeds):
        nf = f"{nofast[seed]:.4f}" if seed in nofast else ""
        print(f"{seed:>5} {res['splitmix64']['f1'][i]:>14.4f} {res['moremur']['f1'][i]:>11.4f} "
              f"{res['splitmix64']['log_loss'][i]:>20.4f} {res['moremur']['log_loss'][i]:>17.4f} {nf:>10}")
    for k in ("f1", "auroc", "log_loss"):
        means = ", ".join(f"{s} {sum(res[s][k]) / len(seeds):.4f}" for s in STREAMS)
        mean, lo, hi = t_interval([u - v for u, v in zip(res["moremur"][k], res["splitmix64"][k])])
        print(f"{k}: {means}; moremur - splitmix64 {mean:+.4f} (95% t-interval {lo:+.4f} to {hi:+.4f})")
    both = [seed for seed in seeds if seed in nofast]
    if both:
        idx = [seeds.index(seed) for seed in both]
        runs = {s: [res[s]["log_loss"][i] for i in idx] for s in STREAMS}
        runs["mean of the two streams"] = [(u + v) / 2 for u, v in zip(runs["splitmix64"], runs["moremur"])]
        for name, values in runs.items():
            mean, lo, hi = t_interval([u - nofast[seed] for u, seed in zip(values, both)])
            print(f"test log loss, {name} - --no-fast over {len(both)} seeds: {mean:+.4f} "
                  f"(95% t-interval {lo:+.4f} to {hi:+.4f})")


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        use_moremur()
        from clintune.cli import main as clintune_main

        sys.exit(clintune_main(sys.argv[2:]))
    main()
