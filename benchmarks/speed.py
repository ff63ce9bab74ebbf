#!/usr/bin/env python3
"""clintune vs Hugging Face Trainer + PEFT, side by side, in one invocation (issue 7).

Same backbone (the embedded MiniLM), same data (medical-abstracts cardiovascular-vs-rest split), same
hyperparameters: LoRA r=8, alpha=8, dropout 0.1 on query/key/value (the peer's), AdamW lr 3e-4, no
weight decay, no warm-up, linear decay, gradient clipping 1.0, batch 16, max length 256, 3 epochs,
seed 42, every dropout of the checkpoint left on, and the peer's head: BERT's pooler (dense + tanh on
[CLS], starting from the checkpoint's pooler weights) and a linear classifier initialised as
transformers does, both trained (``--head pooler --pooling cls``). The peer runs in fp32 and in bf16
(its best setting on this CPU); clintune in bf16, with its default length-bucketed batches and with
``--no-bucket`` (plain random batches: lower peak memory). Each system trains in its own process. A last row
predicts the test split again with the bf16 run's saved model and ``--quantize int8`` (the encoder's linear
layers in int8: ``clintune evaluate``, in a process of its own): the same training, another prediction; and
another with ``--quantize int8-static`` (the feed-forward activations on ranges calibrated on 256 training notes).

    python benchmarks/speed.py [--epochs 3] [--limit N] [--no-peer-fp32] [--no-lean] [--no-int8] [--work DIR]

Prints one table (train and predict samples/s, peak RSS, F1, MFU) and the ratios against the peer's
best setting, and writes WORK/speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_data as datasets  # noqa: E402

from clintune.store import write_json  # noqa: E402


def peer(train: Path, test: Path, a, bf16: bool, seed: int = 42) -> dict:
    cmd = [sys.executable, str(datasets.need_shared() / "bench" / "peer_hf_trainer.py"), "--train", str(train),
           "--test", str(test), "--method", "lora", "--epochs", str(a.epochs), "--batch-size", "16",
           "--max-length", "256", "--lr", "3e-4", "--rank", "8", "--seed", str(seed)] + (["--bf16"] if bf16 else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def clintune(train: Path, test: Path, a, work: Path, extra: tuple[str, ...] = (), seed: int = 42) -> dict:
    name = "".join(e if e.startswith("--") else "-" + e.replace(",", "+") for e in extra).replace("--", "-")
    out = work / "runs" / ("speed-clintune" + name + ("" if seed == 42 else f"-seed{seed}"))
    rec = datasets.train(out, [
        "--data", str(train), "--test-data", str(test), "--backbone", "minilm", "--method", "lora", "--head", "pooler",
        "--pooling", "cls", "--lora-r", "8", "--lora-alpha", "8", "--lora-dropout", "0.1",
        "--target-modules", "query,key,value", "--epochs", str(a.epochs), "--batch-size", "16",
        "--eval-batch-size", "64", "--max-length", "256", "--lr", "3e-4", "--weight-decay", "0",
        "--warmup-ratio", "0", "--max-grad-norm", "1", "--val-size", "0", "--patience", "0", "--seed", str(seed),
        "--precision", "bf16", *extra])
    c, m = rec["cost"], rec["metrics"]
    return {"system": "clintune", "method": "lora", "bf16": True, "n_train": rec["data"]["n_train"], "epochs": a.epochs,
            "train_seconds": c["train_seconds"], "train_samples_per_s": c["train_samples_per_s"],
            "predict_samples_per_s": c["predict_samples_per_s"], "peak_rss_mb": c["peak_rss_mb"],
            "trainable_params": c["trainable_params"], "accuracy": m["accuracy"], "f1": m["f1"],
            "auroc": m.get("auroc"), "log_loss": test_log_loss(out), "mfu": c.get("mfu"),
            "train_tflops_per_s": c.get("train_tflops_per_s"),
            "matmul_peak_tflops": c.get("matmul_peak_tflops"), "train_flops": c.get("train_flops"),
            "model_dir": str(out)}


def test_log_loss(run: Path) -> float | None:
    """Mean negative log-likelihood of the gold labels in RUN/test_predictions.csv (scikit-learn's ``log_loss``):
    it scores every predicted probability, not only which side of the argmax it falls, so it tells two
    trainings apart with fewer seeds than F1 does."""
    import pandas as pd
    from sklearn.metrics import log_loss

    path = run / "test_predictions.csv"
    if not path.exists():
        return None
    t = pd.read_csv(path, dtype={"gold": str})
    cols = [c for c in t.columns if c.startswith("prob_")]
    prob = t[cols].to_numpy()
    prob = prob / prob.sum(axis=1, keepdims=True)                  # the file's rounding: rows sum to 1 +- 1e-7
    return float(log_loss(t["gold"], prob, labels=[c[len("prob_"):] for c in cols]))


def clintune_int8(model_dir: Path, test: Path, work: Path, calibration: Path | None = None) -> dict:
    """``clintune evaluate --quantize int8`` in a process of its own; with ``calibration`` (the training file),
    ``--quantize int8-static`` calibrated on it (at load, outside the timed prediction)."""
    kind = "int8" if calibration is None else "int8-static"
    out = work / f"{kind}-evaluate.json"
    cmd = [sys.executable, "-m", "clintune", "-q", "evaluate", "--model", str(model_dir), "--data", str(test),
           "--quantize", kind, "--out", str(out)] + ([] if calibration is None else ["--calibration", str(calibration)])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    r = json.loads(out.read_text())
    return {"system": "clintune", "method": "lora", "quantize": kind, "train_samples_per_s": None,
            "predict_samples_per_s": r["cost"]["predict_samples_per_s"], "peak_rss_mb": None,
            "accuracy": r["metrics"]["accuracy"], "f1": r["metrics"]["f1"], "mfu": None}


def subsample(train: Path, test: Path, n: int, work: Path) -> tuple[Path, Path]:
    import pandas as pd

    d = work / f"medabs-{n}"
    d.mkdir(parents=True, exist_ok=True)
    pd.read_csv(train).sample(n=min(n, 10 ** 9), random_state=0).to_csv(d / "train.csv", index=False)
    pd.read_csv(test).sample(n=min(n // 2, 10 ** 9), random_state=0).to_csv(d / "test.csv", index=False)
    return d / "train.csv", d / "test.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="train on N examples (quick checks)")
    ap.add_argument("--no-peer-fp32", action="store_true")
    ap.add_argument("--no-lean", action="store_true", help="skip the clintune --no-bucket (lower memory) row")
    ap.add_argument("--no-int8", action="store_true", help="skip the --quantize int8 and int8-static prediction rows")
    ap.add_argument("--work", default="/tmp/clintune-bench")
    a = ap.parse_args()
    work = Path(a.work)
    train, test = datasets.medabs(work / "medabs")
    if a.limit:
        train, test = subsample(train, test, a.limit, work)
    from clintune.cost import matmul_peak_flops

    peak = matmul_peak_flops(torch.bfloat16) / 1e12
    rows = []
    t0 = time.time()
    if not a.no_peer_fp32:
        rows.append({**peer(train, test, a, False), "setting": "peer fp32"})
    rows.append({**peer(train, test, a, True), "setting": "peer bf16"})
    ours = {**clintune(train, test, a, work), "setting": "clintune bf16"}
    rows.append(ours)
    if not a.no_lean:
        rows.append({**clintune(train, test, a, work, ("--no-bucket",)), "setting": "  --no-bucket"})
    if not a.no_int8:
        rows.append({**clintune_int8(Path(ours["model_dir"]), test, work), "setting": "  int8 predict"})
        rows.append({**clintune_int8(Path(ours["model_dir"]), test, work, train), "setting": "  int8-static"})
    peak = matmul_peak_flops(torch.bfloat16, remeasure=True) / 1e12   # the better of start and end
    best = max((r for r in rows if r["system"] != "clintune"), key=lambda r: r["train_samples_per_s"])
    flops_per_sample = ours["train_flops"] / (ours["n_train"] * a.epochs) if ours.get("train_flops") else None
    for r in rows:  # the same model-FLOP count per sample for everyone (same encoder, same LoRA)
        if flops_per_sample and r["train_samples_per_s"] is not None:
            r["mfu"] = round(r["train_samples_per_s"] * flops_per_sample / (peak * 1e12), 4)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"bf16 matmul peak {peak:.2f} TFLOP/s; {ours['n_train']} training notes x {a.epochs} epochs")
    print(f"{'setting':<15} {'train samp/s':>12} {'predict samp/s':>14} {'peak RSS MB':>11} {'F1':>6} {'acc':>6} {'MFU':>6}")
    def cell(v, fmt: str, width: int) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:{width}{fmt}}"

    for r in rows:
        print(f"{r['setting']:<15} {cell(r['train_samples_per_s'], '.2f', 12)} {r['predict_samples_per_s']:14.2f} "
              f"{cell(r['peak_rss_mb'], '.0f', 11)} {r['f1']:6.3f} {r['accuracy']:6.3f} {cell(r['mfu'], '.1%', 6)}")

    def ratios(r: dict) -> dict:
        per = lambda k: None if r[k] is None else r[k] / best[k]  # noqa: E731
        return {"train_speed": per("train_samples_per_s"), "predict_speed": per("predict_samples_per_s"),
                "peak_rss": per("peak_rss_mb"), "f1_delta": r["f1"] - best["f1"]}

    all_ratios = {}
    for r in rows:
        if r["system"] != "clintune":
            continue
        x = all_ratios[r["setting"].strip()] = ratios(r)
        if x["train_speed"] is None:
            print(f"{r['setting'].strip()} vs the peer's best ({best['setting']}): predict {x['predict_speed']:.2f}x, "
                  f"F1 {x['f1_delta']:+.3f} (the clintune bf16 model)")
            continue
        print(f"{r['setting'].strip()} vs the peer's best ({best['setting']}): train {x['train_speed']:.2f}x, predict "
              f"{x['predict_speed']:.2f}x, peak RSS {x['peak_rss']:.2f}x, F1 {x['f1_delta']:+.3f}, MFU {r['mfu']:.1%} "
              f"of the measured bf16 peak")
    print(f"total {time.time() - t0:.0f} s")
    write_json(work / "speed.json", {"rows": rows, "ratios": all_ratios["clintune bf16"],   # atomic
                                     "ratios_by_setting": all_ratios, "peak_tflops": peak})


if __name__ == "__main__":
    main()
