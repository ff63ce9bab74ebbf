"""Benchmark datasets prepared from ../shared (public corpora; never copied into the repository).

* ``medabs``: Medical Abstracts, cardiovascular vs rest (the seed study's task shape), de-duplicated,
  stratified 70/30, made by ../shared/bench/medabs_binary.py.
* ``morfitt1``: French MORFITT restricted to single-specialty documents (official train/test splits),
  columns text,label.
* ``morfitt``: MORFITT multi-label (official train/dev/test), labels joined by '|'.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def cpu_line() -> str:
    """The CPU's name and the instruction sets that decide clintune's CPU paths (bf16, VNNI, AMX)."""
    from clintune.runtime import cpu_flags, cpu_name

    isa = ", ".join(f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16") if f in cpu_flags()) or "no AVX-512 bf16"
    return f"{cpu_name() or 'unknown CPU'} ({isa})"


def need_shared() -> Path:
    if not (SHARED / "data").is_dir():
        sys.exit(f"benchmarks need ../shared/data next to the repository ({SHARED} not found)")
    return SHARED


def train(out: Path, args: list[str], env: dict | None = None, launcher: list[str] | None = None) -> dict:
    """Run ``clintune train ARGS --out OUT`` in its own process (offline, quiet) and return its record.json.
    ``launcher`` replaces ``python -m clintune`` (a benchmark that changes clintune in the child first)."""
    cmd = [*(launcher or [sys.executable, "-m", "clintune"]), "-q", "train", *args, "--out", str(out), "--overwrite",
           "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return json.loads((out / "record.json").read_text())


def medabs(out: Path) -> tuple[Path, Path]:
    shared = need_shared()
    if not ((out / "train.csv").exists() and (out / "test.csv").exists()):
        subprocess.run([sys.executable, str(shared / "bench" / "medabs_binary.py"), str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out / "train.csv", out / "test.csv"


def _morfitt_rows(split: str):
    path = need_shared() / "data" / "morfitt" / f"{split}.tsv"
    csv.field_size_limit(10 ** 9)
    with open(path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f, delimiter="\t")


def _write_morfitt(out: Path, splits: tuple[str, ...], header: list[str], row) -> list[Path]:
    """Write each MORFITT split as OUT/SPLIT.csv (``row(r)``: a CSV row or None to skip), atomically: a file
    that exists is complete, so it is reused."""
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        dest = out / f"{split}.csv"
        if dest.exists():
            continue
        tmp = dest.with_suffix(".csv.partial")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(x for x in map(row, _morfitt_rows(split)) if x is not None)
        tmp.replace(dest)
    return [out / f"{split}.csv" for split in splits]


def _specialities(r: dict) -> list[str]:
    return [l for l in r["specialities"].split("|") if l]


def morfitt_single(out: Path) -> tuple[Path, Path]:
    """MORFITT restricted to single-specialty documents: text, label."""
    def row(r):
        labels = _specialities(r)
        return [r["abstract"].strip(), labels[0]] if len(labels) == 1 else None
    train, test = _write_morfitt(out, ("train", "test"), ["text", "label"], row)
    return train, test


def morfitt_multilabel(out: Path) -> tuple[Path, Path, Path]:
    """MORFITT as multi-label: text, labels ('A|B'), official train/dev/test."""
    train, dev, test = _write_morfitt(out, ("train", "dev", "test"), ["text", "labels"],
                                      lambda r: [r["abstract"].strip(), "|".join(_specialities(r))])
    return train, dev, test
