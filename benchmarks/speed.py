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
best setting; then prediction's model FLOPs, the peer's and clintune's bf16 prediction as a share of the
measured bf16 peak, and the fastest bf16 prediction that peak allows for these notes (a bound on the
prediction ratio at equal maths); and writes WORK/speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
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


def clintune(train: Path, test: Path, a, work: Path, extra: tuple[str, ...] = (), seed: int = 42,
             launcher: list[str] | None = None) -> dict:
    name = "".join(e if e.startswith("--") else "-" + e.replace(",", "+") for e in extra).replace("--", "-")
    out = work / "runs" / ("speed-clintune" + name + ("" if seed == 42 else f"-seed{seed}"))
    rec = datasets.train(out, [
        "--data", str(train), "--test-data", str(test), "--backbone", "minilm", "--method", "lora", "--head", "pooler",
        "--pooling", "cls", "--lora-r", "8", "--lora-alpha", "8", "--lora-dropout", "0.1",
        "--target-modules", "query,key,value", "--epochs", str(a.epochs), "--batch-size", "16",
        "--eval-batch-size", "64", "--max-length", "256", "--lr", "3e-4", "--weight-decay", "0",
        "--warmup-ratio", "0", "--max-grad-norm", "1", "--val-size", "0", "--patience", "0", "--seed", str(seed),
        "--precision", "bf16", *extra], launcher=launcher)
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


def clintune_evaluate(model_dir: Path, test: Path, work: Path, calibration: Path | None = None,
                      kind: str | None = None) -> dict:
    """``clintune evaluate --quantize int8`` in a process of its own; with ``calibration`` (the training file),
    ``--quantize int8-static`` calibrated on it (at load, outside the timed prediction); ``kind="none"``
    (``--quantize none``): the model's own precision, bf16 here."""
    kind = kind or ("int8" if calibration is None else "int8-static")
    out = work / f"{kind}-evaluate.json"
    cmd = [sys.executable, "-m", "clintune", "-q", "evaluate", "--model", str(model_dir), "--data", str(test),
           "--quantize", kind, "--out", str(out)] + ([] if calibration is None else ["--calibration", str(calibration)])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    r = json.loads(out.read_text())
    return {"system": "clintune", "method": "lora", "quantize": kind, "train_samples_per_s": None,
            "predict_samples_per_s": r["cost"]["predict_samples_per_s"], "peak_rss_mb": None,
            "accuracy": r["metrics"]["accuracy"], "f1": r["metrics"]["f1"], "mfu": None}


def prediction_flops(test: Path) -> dict:
    """Model FLOPs of predicting the test notes, counted by PyTorch's FLOP counter on shapes alone (the meta
    device): ``peer``, the peer's ``Trainer.predict`` (the whole classification model on batches of 64 in the
    file's order, each padded to its longest note); ``needed``, the same maths with no padding (each note
    alone) and the last layer for the first token only (all the head reads, :mod:`clintune.prune`), what
    clintune's packed prediction computes. ``needed`` over the measured bf16 peak bounds how fast any system
    can predict the notes at bf16's maths on this machine."""
    from collections import Counter

    import pandas as pd
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from clintune.backbones import _minilm_dir
    from clintune.prune import first_token_only

    path = str(_minilm_dir())
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(path)(
        pd.read_csv(test)["text"].tolist(), truncation=True, max_length=256)["input_ids"]]
    config = AutoConfig.from_pretrained(path, num_labels=2, attn_implementation="sdpa")

    def count(model, shapes) -> int:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            for b, t in shapes:
                ids = torch.zeros((b, t), dtype=torch.long, device="meta")
                model(input_ids=ids)                   # a mask changes no product's size
        return fc.get_total_flops()

    with torch.device("meta"):
        peer = AutoModelForSequenceClassification.from_config(config).eval()
        encoder = AutoModel.from_config(config, add_pooling_layer=False).eval()
    first_token_only(encoder)
    return {"notes": len(lengths), "tokens": sum(lengths),
            "peer": count(peer, [(len(lengths[i:i + 64]), max(lengths[i:i + 64])) for i in range(0, len(lengths), 64)]),
            "needed": count(encoder, [(k, n) for n, k in sorted(Counter(lengths).items())])}  # one length at once


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
        rows.append({**clintune_evaluate(Path(ours["model_dir"]), test, work), "setting": "  int8 predict"})
        rows.append({**clintune_evaluate(Path(ours["model_dir"]), test, work, train), "setting": "  int8-static"})
    peak = matmul_peak_flops(torch.bfloat16, remeasure=True) / 1e12   # the better of start and end
    best = max((r for r in rows if r["system"] != "clintune"), key=lambda r: r["train_samples_per_s"])
    flops_per_sample = ours["train_flops"] / (ours["n_train"] * a.epochs) if ours.get("train_flops") else None
    for r in rows:  # the same model-FLOP count per sample for everyone (same encoder, same LoRA)
        if flops_per_sample and r["train_samples_per_s"] is not None:
            r["mfu"] = round(r["train_samples_per_s"] * flops_per_sample / (peak * 1e12), 4)
    print(f"machine: {datasets.cpu_line()}, {torch.get_num_threads()} threads, "
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
    flops = prediction_flops(test)
    ceiling = prediction_ceiling(flops, peak, best, ours)
    print(f"prediction at bf16's maths: the peer computes {flops['peer'] / 1e12:.2f} TFLOP for the {flops['notes']} "
          f"test notes (padded batches of 64), {ceiling['peer_mfu']:.0%} of the bf16 peak at its "
          f"{best['predict_samples_per_s']:.2f} samples/s; the notes need {flops['needed'] / 1e12:.2f} TFLOP "
          f"(no padding, the last layer for [CLS] only), which at the peak itself is "
          f"{ceiling['max_samples_per_s']:.1f} samples/s, {ceiling['max_ratio']:.2f}x the peer: the most any bf16 "
          f"prediction can reach here. clintune bf16, computing just those FLOPs, runs at {ceiling['ours_mfu']:.0%} "
          f"of the peak (that bound)")
    print(f"total {time.time() - t0:.0f} s")
    write_json(work / "speed.json", {"rows": rows, "ratios": all_ratios["clintune bf16"],   # atomic
                                     "ratios_by_setting": all_ratios, "peak_tflops": peak,
                                     "prediction_flops": flops, "prediction_ceiling": ceiling})


def prediction_ceiling(flops: dict, peak_tflops: float, peer: dict, ours: dict) -> dict:
    """How close each system predicts to the bf16 peak, and the fastest prediction the peak allows: the needed
    FLOPs (:func:`prediction_flops`) at the measured bf16 matrix-product peak, in samples/s and against the
    peer (a ratio that no bf16 prediction of these notes can pass here, whatever else it does)."""
    peak = peak_tflops * 1e12
    per_note = lambda r, key: r["predict_samples_per_s"] * flops[key] / flops["notes"] / peak  # noqa: E731
    most = peak * flops["notes"] / flops["needed"]
    return {"peer_mfu": round(per_note(peer, "peer"), 4), "ours_mfu": round(per_note(ours, "needed"), 4),
            "max_samples_per_s": round(most, 2), "max_ratio": round(most / peer["predict_samples_per_s"], 3)}


if __name__ == "__main__":
    main()
