"""``clintune demo``: the embedded default, end to end, on a fresh machine with no data of the user's.

Task: is an ICD-10-CM diagnosis in the circulatory-system chapter (``builtin:icd10-circulatory``,
36% positive, mirroring the seed study's cardiac-failure task). Model: LoRA on the embedded MiniLM.
Prints test metrics with 95% CIs, cost, and a few predictions on held-out diagnoses (public ICD-10-CM
descriptions, not patient notes).
"""
from __future__ import annotations

import logging

from .config import TrainConfig

log = logging.getLogger("clintune")

DEMO = dict(data="builtin:icd10-circulatory", backbone="minilm", method="lora", head="mlp",
            max_length=64, epochs=3, batch_size=32, lr=1e-3, lora_r=8, lora_alpha=16.0, seed=42)


def run_demo(out: str | None = "runs/demo", epochs: int | None = None) -> dict:
    from .api import train
    from .cli import print_train_summary

    cfg = TrainConfig(**{**DEMO, **({"epochs": epochs} if epochs is not None else {})}, out=out, overwrite=True)
    log.info("demo: LoRA on MiniLM, ICD-10-CM 'circulatory system or not' (%s)", cfg.data)
    res = train(cfg)
    print_train_summary(res.record, out)
    # A few held-out diagnoses (public ICD-10-CM text), with the model's call.
    from .data import prepare_splits

    test = prepare_splits(cfg).test
    picks = list(range(0, len(test), max(1, len(test) // 6)))[:6]
    proba = res.classifier.predict_proba([test.texts[i] for i in picks])
    print("a few held-out diagnoses (label 1 = circulatory system):")
    for j, i in enumerate(picks):
        p1 = float(proba[j, res.classifier.label_map.index_of(1)])
        print(f"  gold {test.labels[i]}  predicted {int(p1 >= 0.5)}  p(circulatory)={p1:.2f}  {test.texts[i][:70]}")
    if out:
        print(f"try: clintune predict --model {out} --data notes.csv --out predictions.csv")
    return res.record
