#!/usr/bin/env python3
"""Do length-bucketed batches cost accuracy? (issue 7)

clintune trains on length-bucketed batches (:func:`clintune.batching.train_batches`: the epoch's shuffled order
cut into chunks of 64 batches, each chunk sorted by length and cut into batches, the batches shuffled). On the
medical-abstracts split that leaves 3.7% of the training tokens as padding, against 14.9% for plain random
batches, and trains some 13% faster. The peer (Trainer + PEFT) draws plain random batches. Bucketing is the one
part of clintune's training that differs from the peer's in kind rather than in random numbers, and even
``--no-fast`` (which keeps it) came out 0.0034 F1 below the peer over nine seeds (``f1_seeds.py``). This trains
the fast path with ``--no-bucket`` at each seed and compares it with the fast path as it ships:

* ``bucket``: clintune as it ships. A seed's run is taken from WORK/mask_stream.json's ``splitmix64`` arm
  where that benchmark has it (the same command, the same system), and trained here otherwise;
* ``no-bucket``: the same with ``--no-bucket`` (batches of 16 in the epoch's shuffled order).

Both start from the same initialisation at a seed and see the notes in different batches, so a seed pairs them
loosely; the paired t-interval over seeds holds all the same. Prints each seed's test F1, AUROC and log loss,
the mean differences with 95% t-intervals, and both arms against the peer's F1 at the seeds where
WORK/f1_seeds.json has it.

    python benchmarks/bucketing.py [--seeds 42,1,2,3,4,8,9,10,11] [--epochs 3] [--work DIR]

Resumable: each finished (arm, seed) result is kept in WORK/bucketing.json with the machine and software it came
from. No timings are compared, so it may share the machine with other work.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ARMS = {"bucket": (), "no-bucket": ("--no-bucket",)}
RESULTS = ("f1", "accuracy", "auroc", "log_loss")


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    import speed
    from f1_seeds import resumable, t_interval, where

    from clintune.store import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="42,1,2,3,4,8,9,10,11")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/clintune-bench")
    a = ap.parse_args()
    seeds, work, train, test, store, done = resumable(a, "bucketing.json")
    shipped = read(work / "mask_stream.json")                 # its splitmix64 arm is clintune as it ships
    here = where()
    for seed in seeds:
        for arm, extra in ARMS.items():
            key = f"{arm}:{seed}:{a.epochs}"
            if key in done:
                continue
            kept = shipped.get(f"splitmix64:{seed}:{a.epochs}") if arm == "bucket" else None
            if kept and all(kept.get(k) == v for k, v in here.items()):
                done[key] = {**kept, "from": "mask_stream.json"}
            else:
                r = speed.clintune(train, test, a, work / "bucketing" / arm, seed=seed, extra=extra)
                done[key] = {**{k: r[k] for k in RESULTS}, **here}
            write_json(store, done)                            # atomic: never a half-written results file
            print(f"seed {seed} {arm}: F1 {done[key]['f1']:.4f}, test log loss {done[key]['log_loss']:.4f}",
                  flush=True)
    res = {arm: {k: [done[f"{arm}:{seed}:{a.epochs}"][k] for seed in seeds] for k in RESULTS} for arm in ARMS}
    peer = {seed: r["f1"] for seed in seeds if (r := read(work / "f1_seeds.json").get(f"peer:{seed}:{a.epochs}"))}
    print(f"{'seed':>5} {'F1 bucket':>10} {'F1 no-bucket':>13} {'log loss bucket':>16} {'log loss no-bucket':>19}"
          f" {'peer F1':>8}")
    for i, seed in enumerate(seeds):
        p = f"{peer[seed]:.4f}" if seed in peer else ""
        print(f"{seed:>5} {res['bucket']['f1'][i]:>10.4f} {res['no-bucket']['f1'][i]:>13.4f} "
              f"{res['bucket']['log_loss'][i]:>16.4f} {res['no-bucket']['log_loss'][i]:>19.4f} {p:>8}")
    for k in ("f1", "auroc", "log_loss"):
        means = ", ".join(f"{arm} {sum(res[arm][k]) / len(seeds):.4f}" for arm in ARMS)
        mean, lo, hi = t_interval([u - v for u, v in zip(res["no-bucket"][k], res["bucket"][k])])
        print(f"{k}: {means}; no-bucket - bucket {mean:+.4f} (95% t-interval {lo:+.4f} to {hi:+.4f})")
    both = [seed for seed in seeds if seed in peer]
    for arm in ARMS if both else ():
        mean, lo, hi = t_interval([res[arm]["f1"][seeds.index(seed)] - peer[seed] for seed in both])
        print(f"F1, {arm} - peer over {len(both)} seeds: {mean:+.4f} (95% t-interval {lo:+.4f} to {hi:+.4f})")


if __name__ == "__main__":
    main()
