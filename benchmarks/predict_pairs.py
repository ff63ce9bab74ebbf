#!/usr/bin/env python3
"""Prediction speed against the peer's, measured in pairs (issue 7): the peer's ``Trainer.predict`` and
``clintune evaluate`` on a trained model, alternating, each in a process of its own.

The speed run (``speed.py``) times each system's prediction once, minutes apart, so a slow or fast moment of a
shared machine lands on one side only. Here every round runs the peer (``peer_hf_trainer.py`` in bf16, its best
setting, trained for a token ``--peer-epochs``: its prediction does not depend on the weights) and then clintune
on MODEL (a directory ``speed.py`` trained: WORK/runs/speed-clintune) in bf16 and with ``--quantize
int8-static`` (calibrated on the training split, at load, outside the timed prediction), on the same 797 test
notes, and prints each round's samples/s and ratios, then their medians.

    python benchmarks/predict_pairs.py MODEL [--rounds 3] [--peer-epochs 0.02] [--work DIR]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_data as datasets  # noqa: E402
from speed import clintune_evaluate, peer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, help="a model directory speed.py trained (WORK/runs/speed-clintune)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer-epochs", type=float, default=0.02)
    ap.add_argument("--work", default="/tmp/clintune-bench")
    a = ap.parse_args()
    work = Path(a.work)
    train, test = datasets.medabs(work / "medabs")
    print(f"machine: {datasets.cpu_line()}")
    rows = []
    for i in range(a.rounds):
        p = peer(train, test, argparse.Namespace(epochs=a.peer_epochs), True)["predict_samples_per_s"]
        bf16, static = (clintune_evaluate(a.model, test, work, kind="none"),
                        clintune_evaluate(a.model, test, work, train))
        b, q = bf16["predict_samples_per_s"], static["predict_samples_per_s"]
        rows.append((p, b, q))
        print(f"round {i + 1}: peer bf16 {p:.2f} samples/s; clintune bf16 {b:.2f} ({b / p:.2f}x, F1 {bf16['f1']:.4f}), "
              f"int8-static {q:.2f} ({q / p:.2f}x, F1 {static['f1']:.4f})")
    med = [statistics.median(c) for c in zip(*rows)]
    ratios = [sorted(r[j] / r[0] for r in rows) for j in (1, 2)]
    print(f"medians: peer {med[0]:.2f}, clintune bf16 {med[1]:.2f}, int8-static {med[2]:.2f} samples/s; "
          f"ratios bf16 {ratios[0][0]:.2f}-{ratios[0][-1]:.2f}x, int8-static {ratios[1][0]:.2f}-{ratios[1][-1]:.2f}x")


if __name__ == "__main__":
    main()
