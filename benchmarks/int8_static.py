#!/usr/bin/env python3
"""int8 against int8-static prediction of saved models, paired in one process (issue 7).

For each model directory: the test notes predicted in bf16 (the model's precision), with ``--quantize int8``
and with ``--quantize int8-static`` calibrated on ``--calibration`` (up to 256 notes of it), the two int8 forms
alternating ``--rounds`` times on the same loaded models; prints F1, AUROC and log loss of each, how many notes
change side against int8, and the int8 timings (median). Binary classification models, labelled test file.

    python benchmarks/int8_static.py --data TEST.csv --calibration TRAIN.csv [--rounds 3] MODEL_DIR [MODEL_DIR ...]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, log_loss, roc_auc_score

import clintune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", required=True, help="labelled test file (text, label)")
    ap.add_argument("--calibration", required=True, help="notes to calibrate int8-static on (the training file)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    test = pd.read_csv(a.data)
    texts = test["text"].tolist()
    for run in a.models:
        forms = {"bf16": clintune.load(run), "int8": clintune.load(run, quantize="int8"),
                 "static": clintune.load(run, quantize="int8-static", calibration=a.calibration)}
        labels = [str(lab) for lab in forms["int8"].labels]
        gold = test["label"].astype(str).to_numpy()
        y = (gold == labels[1]).astype(int)
        probs, times = {"bf16": forms["bf16"].predict_proba(texts)}, {"int8": [], "static": []}
        for name in times:
            forms[name].predict_proba(texts[:64])            # warm: the first call's allocations
        for _ in range(a.rounds):
            for name in times:
                t = time.perf_counter()
                probs[name] = forms[name].predict_proba(texts)
                times[name].append(time.perf_counter() - t)
        print(run)
        for name, p in probs.items():
            pred = np.array(labels)[p.argmax(1)]
            timing = "" if name not in times else \
                f"  seconds {' '.join(f'{t:.2f}' for t in times[name])} (median {np.median(times[name]):.2f})"
            print(f"  {name:6} F1 {f1_score(gold, pred, pos_label=labels[1]):.4f}  AUROC "
                  f"{roc_auc_score(y, p[:, 1]):.4f}  log loss {log_loss(y, p[:, 1]):.4f}  side changes vs int8 "
                  f"{int((p.argmax(1) != probs['int8'].argmax(1)).sum())}{timing}")


if __name__ == "__main__":
    main()
