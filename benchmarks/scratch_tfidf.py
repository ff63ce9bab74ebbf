#!/usr/bin/env python3
"""Issue 4 benchmark: scratch-small and TF-IDF on the medical-abstracts binary split and French MORFITT
(single-specialty documents), and scratch-small vs MiniLM full fine-tuning, per epoch, in one run.

    python benchmarks/scratch_tfidf.py [--work /tmp/clintune-bench] [--minilm-epochs 1]

Prints a table and writes WORK/scratch_tfidf.json. Every run is a normal `clintune train` (records in
WORK/runs/*).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_data as datasets  # noqa: E402


def train(work: Path, name: str, args: list[str]) -> dict:
    return datasets.train(work / "runs" / name, args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/clintune-bench")
    ap.add_argument("--minilm-epochs", type=int, default=1)
    a = ap.parse_args()
    work = Path(a.work)
    med_tr, med_te = datasets.medabs(work / "medabs")
    mo_tr, mo_te = datasets.morfitt_single(work / "morfitt1")
    rows = []
    for data, (tr, te) in {"medabs": (med_tr, med_te), "morfitt1": (mo_tr, mo_te)}.items():
        base = ["--data", str(tr), "--test-data", str(te), "--max-length", "256", "--seed", "13"]
        for name, extra in [("scratch-small", ["--backbone", "scratch-small", "--method", "full", "--epochs", "10"]),
                            ("tfidf", ["--method", "tfidf"])]:
            rec = train(work, f"{data}-{name}", base + extra)
            rows.append({"data": data, "model": name, "f1": rec["metrics"]["f1"], "accuracy": rec["metrics"]["accuracy"],
                         "f1_macro": rec["metrics"]["f1_macro"], "train_seconds": rec["cost"]["train_seconds"],
                         "epochs": rec["training"]["epochs_run"],
                         "train_samples_per_s": rec["cost"]["train_samples_per_s"],
                         "peak_rss_mb": rec["cost"]["peak_rss_mb"], "trainable_params": rec["cost"]["trainable_params"]})
    # per-epoch speed, same data, same settings, one run
    base = ["--data", str(med_tr), "--test-data", str(med_te), "--max-length", "256", "--seed", "13", "--patience", "0",
            "--val-size", "0"]
    speed = {}
    for name, extra in [("scratch-small", ["--backbone", "scratch-small", "--method", "full"]),
                        ("minilm-full", ["--backbone", "minilm", "--method", "full"])]:
        rec = train(work, f"speed-{name}", base + extra + ["--epochs", str(a.minilm_epochs)])
        speed[name] = rec["cost"]["train_samples_per_s"]
    ratio = speed["scratch-small"] / speed["minilm-full"]
    print(f"{'data':<9} {'model':<14} {'F1':>6} {'acc':>6} {'F1mac':>6} {'epochs':>6} {'train s':>8} {'samp/s':>8} {'RSS MB':>7}")
    for r in rows:
        print(f"{r['data']:<9} {r['model']:<14} {r['f1']:6.3f} {r['accuracy']:6.3f} {r['f1_macro']:6.3f} {r['epochs']:6d} "
              f"{r['train_seconds']:8.1f} {r['train_samples_per_s']:8.1f} {r['peak_rss_mb']:7.0f}")
    print(f"per-epoch training speed on medabs (samples/s): scratch-small {speed['scratch-small']:.1f}, "
          f"minilm full {speed['minilm-full']:.1f}, ratio {ratio:.1f}x")
    (work / "scratch_tfidf.json").write_text(json.dumps({"runs": rows, "speed": speed, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
