"""Benchmark datasets prepared from ../shared (public corpora; never copied into the repository).

* ``medabs``: Medical Abstracts, cardiovascular vs rest (the seed study's task shape), de-duplicated,
  stratified 70/30, made by ../shared/bench/medabs_binary.py.
* ``morfitt1``: French MORFITT restricted to single-specialty documents (official train/test splits),
  columns text,label.
* ``morfitt``: MORFITT multi-label (official train/dev/test), labels joined by '|'.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def need_shared() -> Path:
    if not (SHARED / "data").is_dir():
        sys.exit(f"benchmarks need ../shared/data next to the repository ({SHARED} not found)")
    return SHARED


def medabs(out: Path) -> tuple[Path, Path]:
    shared = need_shared()
    if not (out / "train.csv").exists():
        subprocess.run([sys.executable, str(shared / "bench" / "medabs_binary.py"), str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out / "train.csv", out / "test.csv"


def _morfitt_rows(split: str):
    path = need_shared() / "data" / "morfitt" / f"{split}.tsv"
    csv.field_size_limit(10 ** 9)
    with open(path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f, delimiter="\t")


def morfitt_single(out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        dest = out / f"{split}.csv"
        if dest.exists():
            continue
        with open(dest, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for r in _morfitt_rows(split):
                labels = [l for l in r["specialities"].split("|") if l]
                if len(labels) == 1:
                    w.writerow([r["abstract"].strip(), labels[0]])
    return out / "train.csv", out / "test.csv"


def morfitt_multilabel(out: Path) -> tuple[Path, Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    names = {"train": "train", "dev": "dev", "test": "test"}
    for split in names:
        dest = out / f"{split}.csv"
        if dest.exists():
            continue
        with open(dest, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "labels"])
            for r in _morfitt_rows(split):
                w.writerow([r["abstract"].strip(), "|".join(l for l in r["specialities"].split("|") if l)])
    return out / "train.csv", out / "dev.csv", out / "test.csv"
