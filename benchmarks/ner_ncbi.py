#!/usr/bin/env python3
"""Issue 6: NER on NCBI-disease (official train/test) with LoRA on MiniLM, clintune vs the reference run
(benchmarks/peer_ner.py: Trainer + PEFT, seqeval), same settings: LoRA r=8 alpha=8 on q/k/v, lr 3e-4,
batch 16, 3 epochs, bf16. clintune uses its default head (mlp: dense + tanh + linear per token); the
reference, Hugging Face's linear token classifier (`--head linear` is clintune's equivalent).

    python benchmarks/ner_ncbi.py [--epochs 3] [--work /tmp/clintune-bench]
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_data  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/clintune-bench")
    a = ap.parse_args()
    conll = bench_data.need_shared() / "data" / "ncbi_disease" / "conll"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = Path(a.work) / "runs" / "ncbi-ner-lora"
    rec = bench_data.train(out, ["--task", "ner", "--data", str(conll / "train.tsv"), "--val-data", str(conll / "devel.tsv"),
                                 "--test-data", str(conll / "test.tsv"), "--backbone", "minilm", "--method", "lora",
                                 "--lora-r", "8", "--lora-alpha", "8", "--lr", "3e-4", "--epochs", str(a.epochs),
                                 "--batch-size", "16", "--precision", "bf16",
                                 # the official split repeats one sentence between train and test: keep it as published
                                 "--allow-duplicates"])
    peer = subprocess.run([sys.executable, str(Path(__file__).with_name("peer_ner.py")), "--train", str(conll / "train.tsv"),
                           "--test", str(conll / "test.tsv"), "--epochs", str(a.epochs), "--bf16"],
                          check=True, capture_output=True, text=True, env=env)
    p = json.loads([l for l in peer.stdout.splitlines() if l.startswith("{")][-1])
    m, c = rec["metrics"], rec["cost"]
    print(f"{'system':<10} {'P':>6} {'R':>6} {'F1':>6} {'train samp/s':>12} {'peak RSS MB':>11}")
    print(f"{'clintune':<10} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} {c['train_samples_per_s']:12.1f} "
          f"{c['peak_rss_mb']:11.0f}   95% CI F1 {rec['metrics_ci']['f1']}")
    print(f"{'reference':<10} {p['precision']:6.3f} {p['recall']:6.3f} {p['f1']:6.3f} {p['train_samples_per_s']:12.1f} "
          f"{p['peak_rss_mb']:11.0f}")
    (Path(a.work) / "ner_ncbi.json").write_text(json.dumps({"clintune": {"metrics": m, "cost": c}, "reference": p}, indent=2))


if __name__ == "__main__":
    main()
