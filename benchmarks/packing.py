#!/usr/bin/env python3
"""Prediction packed without padding against padded batches, paired in one process, by encoder code (issue 7).

For each encoder: a LoRA classifier trained for one short epoch (the weights do not change the timing), then
the same loaded model predicts the test notes packed and padded, alternating in ABBA order ``--rounds`` times
after a warm-up call of each; prints the medians, the speed-up, the largest change in a probability, and the
share of padding the packed form leaves out (the sorted pieces' padded tokens that are not a note's). On a CPU with
AMX, a third arm predicts padded through PyTorch's SDPA (the compiled kernels turned off: what AMX CPUs predicted
with before the kernels' AMX form; bf16 only), and the order is ABCCBA.
``--quantize int8|int8-static`` loads the same model in an int8 form (int8-static calibrated on the training
notes). ``--first-pass`` times instead what the warm-up above leaves out: a process's first prediction, where
oneDNN builds a product for every row count it has not seen, with the packed sequences padded to a few lengths
(``packing.rounded_rows``, as bf16 prediction ships) and without; each arm in a process of its own, ABBA
``--rounds`` times, its first and second call over the ``--notes`` test notes (0: all). Encoders:

* ``minilm``: the embedded MiniLM-L6 (BERT's code, 6 x 384, head size 32), as trained in ``speed.py``;
* ``roberta-base``: RoBERTa's code at CamemBERT-base's (and CamemBERT-bio's, DrBERT's) size, 12 x 768, head
  size 64, random weights with MiniLM's tokenizer (positions from padding_idx + 1);
* ``distilbert-base``: DistilBERT's code at distilbert-base's size, 6 x 768, random weights likewise.

    python benchmarks/packing.py [--encoders minilm,roberta-base,distilbert-base] [--notes 200] [--rounds 3]
                                 [--quantize int8|int8-static] [--first-pass]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import medabs, train  # noqa: E402


def _random_encoder(kind: str, d: Path) -> str:
    """A base-size encoder of ``kind``'s code with random weights and MiniLM's tokenizer, saved in ``d``."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    from clintune.backbones import _minilm_dir

    if (d / "config.json").exists():
        return str(d)
    d.mkdir(parents=True, exist_ok=True)
    for f in _minilm_dir().iterdir():
        if "token" in f.name or f.name.startswith("vocab"):
            shutil.copy(f, d / f.name)
    torch.manual_seed(0)
    if kind == "roberta-base":
        model = RobertaModel(RobertaConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                           num_attention_heads=12, intermediate_size=3072,
                                           max_position_embeddings=514, type_vocab_size=1, pad_token_id=0))
    else:
        model = DistilBertModel(DistilBertConfig(vocab_size=30522, dim=768, n_layers=6, n_heads=12,
                                                 hidden_dim=3072, pad_token_id=0))
    model.save_pretrained(d)
    return str(d)


def first_pass_child(model: str, test_csv: str, notes: int, rounded: bool, probs_out: str) -> None:
    """One arm of ``--first-pass`` in this process: load, predict twice, print the two times as JSON."""
    import clintune

    texts = pd.read_csv(test_csv)["text"].tolist()
    texts = texts[:notes] if notes else texts
    clf = clintune.load(model)
    clf.model.round_rows = rounded and clf.model.packed
    seconds = []
    for _ in range(2):
        t = time.perf_counter()
        p = clf.predict_proba(texts)
        seconds.append(time.perf_counter() - t)
        if len(seconds) == 1:
            np.save(probs_out, p)
    print(json.dumps({"rounded": clf.model.round_rows, "packed": clf.model.packed, "seconds": seconds}))


def first_pass(name: str, out: Path, test_csv: Path, work: Path, a) -> None:
    """``--first-pass``: the rounded and unrounded arms, each in a fresh process, ABBA."""
    times: dict[bool, list] = {True: [], False: []}
    for arm in [True, False, False, True] * a.rounds:
        probs = work / f"first-pass-{name}-{int(arm)}.npy"
        r = subprocess.run([sys.executable, __file__, "--child-first-pass", str(out), str(test_csv), str(a.notes),
                            str(int(arm)), str(probs)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{name}: the first-pass child failed:\n{r.stderr[-2000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        if not row["packed"]:
            print(f"{name}: does not pack here (no attention kernels on this CPU, or an encoder packing does not take)")
            return
        times[arm].append(row["seconds"])
    n = len(pd.read_csv(test_csv)) if not a.notes else a.notes
    p1, p0 = (np.load(work / f"first-pass-{name}-{i}.npy") for i in (1, 0))
    med = {arm: [statistics.median(s[i] for s in times[arm]) for i in (0, 1)] for arm in times}
    print(f"{name}: {n} notes, first call (medians of {2 * a.rounds} processes each): rounded {n / med[True][0]:.1f} "
          f"samples/s, not rounded {n / med[False][0]:.1f} ({med[False][0] / med[True][0]:.3f}x); second call "
          f"{n / med[True][1]:.1f} against {n / med[False][1]:.1f} ({med[False][1] / med[True][1]:.3f}x); largest "
          f"|p rounded - p not| {float(np.abs(p1 - p0).max()):.1e}, argmax changes {int((p1.argmax(1) != p0.argmax(1)).sum())}")


def main() -> None:
    if sys.argv[1:2] == ["--child-first-pass"]:
        model, test_csv, notes, rounded, probs = sys.argv[2:7]
        return first_pass_child(model, test_csv, int(notes), rounded == "1", probs)
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoders", default="minilm,roberta-base,distilbert-base")
    ap.add_argument("--notes", type=int, default=200, help="test notes predicted per call")
    ap.add_argument("--train-notes", type=int, default=64, help="notes of the short training run")
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds (each: packed, padded, padded, packed)")
    ap.add_argument("--quantize", choices=["int8", "int8-static"], default=None,
                    help="predict with the int8 forms (the same model, loaded quantised)")
    ap.add_argument("--first-pass", action="store_true",
                    help="time each process's first prediction, packed sequences rounded to a few lengths and not")
    ap.add_argument("--work", default="/tmp/clintune-bench/packing")
    a = ap.parse_args()
    if a.first_pass and a.quantize:
        ap.error("--first-pass times bf16 prediction (the int8 forms do not round their sequences)")

    import clintune
    from clintune import fast, modeling
    from clintune.packing import first_position

    work = Path(a.work)
    train_csv, test_csv = medabs(work / "medabs")
    small = work / f"train{a.train_notes}.csv"
    pd.read_csv(train_csv).sample(a.train_notes, random_state=0).to_csv(small, index=False)
    texts = pd.read_csv(test_csv)["text"].tolist()[: a.notes or None]
    amx = fast._amx()
    load = ({"quantize": a.quantize, "calibration": pd.read_csv(small)["text"].tolist()} if a.quantize == "int8-static"
            else {"quantize": a.quantize} if a.quantize else {})
    for name in a.encoders.split(","):
        backbone = "minilm" if name == "minilm" else _random_encoder(name, work / name)
        out = work / f"run-{name}"
        train(out, ["--data", str(small), "--backbone", backbone, "--method", "lora", "--head", "pooler",
                    "--pooling", "cls", "--epochs", "1", "--batch-size", "16", "--max-length", "256",
                    "--precision", "bf16", "--val-size", "0", "--patience", "0", "--seed", "42"])
        if a.first_pass:
            first_pass(name, out, test_csv, work, a)
            continue
        clf = clintune.load(out, **load)
        first = first_position(clf.model.encoder)
        if first is None or not clf.model.packed:
            print(f"{name}: does not pack here (no attention kernels on this CPU, or an encoder packing does not take)")
            continue
        clf.model.first_position = first
        sdpa = amx and not a.quantize          # the int8 forms attend through the int8 kernel either way
        arms = ["packed", "padded"] + (["sdpa"] if sdpa else [])   # sdpa: padded, AMX's previous attention
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        probs, seen, real_pack, real_kernels = {}, [], modeling.pack, fast._attention_kernels

        def counting(ids, mask, *rest):                 # the pieces' padded and real token counts
            seen.append((mask.numel(), int(mask.sum())))
            return real_pack(ids, mask, *rest)

        def predict(arm: str):
            clf.model.packed = arm == "packed"
            fast._attention_kernels = (lambda: False) if arm == "sdpa" else real_kernels
            try:
                return clf.predict_proba(texts)
            finally:
                fast._attention_kernels = real_kernels

        modeling.pack = counting
        probs["packed"] = predict("packed")                         # warm-up: the first call's allocations
        modeling.pack = real_pack
        for arm in arms[1:]:
            probs[arm] = predict(arm)
        padded, real = map(sum, zip(*seen))
        for _ in range(a.rounds):
            for arm in arms + arms[::-1]:
                t = time.perf_counter()
                predict(arm)
                times[arm].append(time.perf_counter() - t)
        on, off = statistics.median(times["packed"]), statistics.median(times["padded"])
        config = clf.model.encoder.get_base_model().config if hasattr(clf.model.encoder, "get_base_model") \
            else clf.model.encoder.config
        print(f"{name} ({config.model_type}{', ' + a.quantize if a.quantize else ''}, first position "
              f"{clf.model.first_position}): {len(texts)} notes, "
              f"{real} tokens in {padded} padded ({1 - real / padded:.1%} padding); padded {off:.2f} s, packed {on:.2f} s "
              f"(medians of {a.rounds * 2}): {off / on:.3f}x; largest |p packed - p padded| "
              f"{float(np.abs(probs['packed'] - probs['padded']).max()):.1e}; argmax changes "
              f"{int((probs['packed'].argmax(1) != probs['padded'].argmax(1)).sum())}")
        if sdpa:
            old = statistics.median(times["sdpa"])
            print(f"  AMX: padded through SDPA {old:.2f} s, through the kernel {off:.2f} s ({old / off:.3f}x), "
                  f"packed {on:.2f} s ({old / on:.3f}x against SDPA); largest |p kernel - p SDPA| "
                  f"{float(np.abs(probs['padded'] - probs['sdpa']).max()):.1e}; argmax changes "
                  f"{int((probs['padded'].argmax(1) != probs['sdpa'].argmax(1)).sum())}")


if __name__ == "__main__":
    main()
