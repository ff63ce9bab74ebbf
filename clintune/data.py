"""Load, validate and split labelled notes.

The flow is ``read_table`` (any supported file -> DataFrame) -> ``load_examples`` (columns checked,
texts and labels validated, row numbers kept for messages) -> ``prepare_splits`` (train / validation /
test, stratified and grouped by identical text so that no text sits on both sides of a split).

Every problem is a :class:`~clintune.errors.DataError` naming the file, the column and the 1-based
data row (the header is not counted). No message ever contains note text.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import DataError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSION = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}
BUILTIN_PREFIX = "builtin:"
_INT_RE = re.compile(r"^[+-]?\d+$")


def detect_format(path: str | Path) -> tuple[str, str | None]:
    """Return (format, compression suffix or None) from the file name."""
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    comp = None
    if suffixes and suffixes[-1] in _COMPRESSION:
        comp = suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    fmt = FORMATS.get(ext)
    if fmt is None:
        shown = f"'{ext}'" if ext else "no extension"
        raise DataError(f"{p}: unknown format ({shown}); use .csv, .tsv, .jsonl or .parquet "
                        "(optionally .gz/.bz2/.xz compressed)")
    if fmt == "parquet" and comp:
        raise DataError(f"{p}: Parquet files carry their own compression; drop the '{comp}' suffix")
    return fmt, comp


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: not valid UTF-8 at line {line} (byte offset {e.start}); "
                        "save the file as UTF-8") from None


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, TSV, JSONL or Parquet file into a DataFrame (text formats: every cell a str)."""
    p = Path(path)
    if str(path).startswith(BUILTIN_PREFIX):
        from .builtin import load_builtin
        return load_builtin(str(path)[len(BUILTIN_PREFIX):])
    fmt, comp = detect_format(p)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a data file")
    if fmt == "parquet":
        if p.stat().st_size == 0:
            raise DataError(f"{p}: file is empty")
        try:
            return pd.read_parquet(p)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{p}: cannot read as Parquet ({type(e).__name__})") from None
    raw = p.read_bytes()
    if comp:
        try:
            raw = _COMPRESSION[comp](raw)
        except Exception:
            raise DataError(f"{p}: cannot decompress ({comp})") from None
    if not raw.strip():
        raise DataError(f"{p}: file is empty")
    text = _decode(p, raw)
    if fmt == "jsonl":
        return _read_jsonl(p, text)
    sep = "," if fmt == "csv" else "\t"
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{p}: file is empty") from None
    except pd.errors.ParserError as e:
        msg = str(e).strip().splitlines()[-1]
        raise DataError(f"{p}: cannot parse as {fmt.upper()}: {msg}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _read_jsonl(p: Path, text: str) -> pd.DataFrame:
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {i} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}: line {i} is not a JSON object")
        records.append(obj)
    if not records:
        raise DataError(f"{p}: file is empty")
    return pd.DataFrame.from_records(records)


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and np.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _rows_phrase(rows: Sequence[int]) -> str:
    rows = list(rows)
    more = f" and {len(rows) - 1} more" if len(rows) > 1 else ""
    return f"row {rows[0]}{more}"


def normalise_text(t: str) -> str:
    """The text key used for duplicate and leakage checks: whitespace-insensitive, case-sensitive."""
    return " ".join(t.split())


def _normalise_labels(values: Sequence[Any], source: str, col: str) -> list:
    """Labels as ints when every label is an integer, else as stripped strings."""
    out: list[Any] = []
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            out.append(int(v))
        elif isinstance(v, (int, np.integer)):
            out.append(int(v))
        elif isinstance(v, (float, np.floating)):
            out.append(int(v) if float(v).is_integer() else str(v))
        else:
            out.append(str(v).strip())
    if all(isinstance(v, int) or (isinstance(v, str) and _INT_RE.match(v)) for v in out):
        return [int(v) for v in out]
    return [str(v) for v in out]


@dataclass
class Examples:
    """Validated texts (and labels) of one file, with their 1-based data row numbers."""

    texts: list[str]
    labels: list | None
    rows: np.ndarray
    source: str
    frame: pd.DataFrame | None = field(default=None, repr=False)  # the original rows (predict output)
    words: list | None = field(default=None, repr=False)           # NER: the words of each text
    offsets: list | None = field(default=None, repr=False)         # NER: (n_words, 2) character offsets
    index: np.ndarray | None = field(default=None, repr=False)     # position in the file's examples (0-based)

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = np.arange(len(self.texts))

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "Examples":
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Examples([self.texts[i] for i in idx], pick(self.labels), self.rows[idx], self.source,
                        None if self.frame is None else self.frame.iloc[idx].reset_index(drop=True),
                        pick(self.words), pick(self.offsets), self.index[idx])

    def content_hash(self) -> str:
        """sha256 over texts and labels (identifies the data in caches and records, not the text)."""
        h = hashlib.sha256()
        for i, t in enumerate(self.texts):
            h.update(t.encode("utf-8"))
            h.update(b"\x00")
            if self.labels is not None:
                lab = self.labels[i]
                h.update((json.dumps(list(lab)) if isinstance(lab, (list, tuple)) else str(lab)).encode("utf-8"))
            h.update(b"\x01")
        return h.hexdigest()


def load_examples(path: str | Path, text_col: str = "text", label_col: str | None = "label",
                  *, keep_frame: bool = False, task: str = "classification", label_sep: str = "|") -> Examples:
    """Read ``path`` and validate its text (and, if ``label_col``, label) column.

    ``task="multilabel"``: each label cell holds labels separated by ``label_sep``, kept as a sorted
    tuple. ``task="ner"``: CoNLL/BIO or JSONL spans, see :mod:`clintune.ner`.
    """
    if task == "ner":
        from .ner import load_ner, words_of_texts
        if label_col is not None:
            return load_ner(path, text_col, label_col)
        ex = load_examples(path, text_col, None, keep_frame=keep_frame)
        ex.words, ex.offsets = words_of_texts(ex.texts)
        return ex
    source = str(path)
    df = read_table(path)
    if len(df) == 0:
        raise DataError(f"{source}: file has a header but no rows")
    for col in (text_col, label_col):
        if col is not None and col not in df.columns:
            cols = ", ".join(map(str, df.columns[:20]))
            raise DataError(f"{source}: column '{col}' not found (columns: {cols})")
    raw_texts = df[text_col].tolist()
    bad = [i + 1 for i, t in enumerate(raw_texts) if _missing(t)]
    if bad:
        raise DataError(f"{source}: empty or missing text in column '{text_col}' at {_rows_phrase(bad)}")
    texts = [t if isinstance(t, str) else str(t) for t in raw_texts]
    labels = None
    if label_col is not None:
        raw_labels = df[label_col].tolist()
        bad = [i + 1 for i, v in enumerate(raw_labels) if _missing(v)]
        if bad:
            raise DataError(f"{source}: empty or missing label in column '{label_col}' at {_rows_phrase(bad)}")
        if task == "multilabel":
            sets = [[x.strip() for x in str(v).split(label_sep) if x.strip()] for v in raw_labels]
            bad = [i + 1 for i, s in enumerate(sets) if not s]
            if bad:
                raise DataError(f"{source}: no label in column '{label_col}' at {_rows_phrase(bad)} "
                                f"(labels are separated by '{label_sep}')")
            flat = _normalise_labels([x for s in sets for x in s], source, label_col)
            it = iter(flat)
            labels = [tuple(sorted({next(it) for _ in s}, key=lambda v: (isinstance(v, str), v))) for s in sets]
        else:
            labels = _normalise_labels(raw_labels, source, label_col)
    return Examples(texts, labels, np.arange(1, len(texts) + 1), source, df if keep_frame else None)


# ----------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------

@dataclass
class LabelMap:
    """Class names (ints or strings, sorted) <-> indices 0..K-1; the positive class for binary tasks."""

    labels: list
    positive: Any = None

    def __post_init__(self) -> None:
        self._index = {self._key(l): i for i, l in enumerate(self.labels)}
        if len(self.labels) == 2 and self.positive is None:
            self.positive = self.labels[-1]

    @staticmethod
    def _key(label: Any) -> str:
        return str(label)

    @classmethod
    def from_labels(cls, labels: Sequence[Any], positive: Any = None, source: str = "data") -> "LabelMap":
        uniq = sorted(set(labels), key=lambda v: (isinstance(v, str), v))
        lm = cls(list(uniq))
        if positive is not None:
            if str(positive) not in lm._index:
                raise DataError(f"--positive-label '{positive}' is not a label of {source} "
                                f"(labels: {', '.join(map(str, uniq[:20]))})")
            lm.positive = uniq[lm._index[str(positive)]]
        return lm

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def positive_index(self) -> int | None:
        return None if self.positive is None or len(self.labels) != 2 else self._index[str(self.positive)]

    def encode(self, labels: Sequence[Any]) -> np.ndarray:
        return np.asarray([self._index[self._key(l)] for l in labels], dtype=np.int64)

    def index_of(self, label: Any) -> int | None:
        return self._index.get(self._key(label))

    def decode(self, idx: Sequence[int]) -> list:
        return [self.labels[int(i)] for i in idx]

    def to_json(self) -> dict:
        return {"labels": self.labels, "positive": self.positive}

    @classmethod
    def from_json(cls, obj: dict) -> "LabelMap":
        return cls(list(obj["labels"]), obj.get("positive"))


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------

def _groups(texts: Sequence[str]) -> tuple[np.ndarray, int]:
    """Group id of each text (identical normalised texts share a group) and the number of groups."""
    ids: dict[str, int] = {}
    g = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        g[i] = ids.setdefault(normalise_text(t), len(ids))
    return g, len(ids)


def grouped_stratified_split(labels: Sequence[Any], texts: Sequence[str], frac: float, seed: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held out) with ``frac`` of each class held out.

    Identical texts form one group and land on the same side. Each class with at least two groups
    gives at least one to each side; a class with a single group stays on the kept side.
    """
    rng = np.random.default_rng(seed)
    group, n_groups = _groups(texts)
    first = np.full(n_groups, -1)
    for i, g in enumerate(group):
        if first[g] < 0:
            first[g] = i
    by_class: dict[str, list[int]] = {}
    for g in range(n_groups):
        by_class.setdefault(str(labels[first[g]]), []).append(g)
    held = np.zeros(n_groups, dtype=bool)
    for key in sorted(by_class):
        gs = np.array(by_class[key])
        rng.shuffle(gs)
        n = len(gs)
        k = int(round(frac * n))
        k = min(max(k, 1 if n >= 2 else 0), n - 1) if n >= 1 else 0
        held[gs[:k]] = True
    idx = np.arange(len(texts))
    out = held[group]
    return idx[~out], idx[out]


@dataclass
class Splits:
    train: Examples
    val: Examples | None
    test: Examples
    label_map: LabelMap
    info: dict
    full: Examples | None = None      # every row of --data (train and validation index into it)

    def encoded(self, part: str) -> np.ndarray:
        ex = getattr(self, part)
        return self.label_map.encode(ex.labels)


def _check_leakage(train: Examples, other: Examples, what: str, allow: bool, info: dict) -> None:
    seen: dict[str, int] = {}
    for t, row in zip(train.texts, train.rows):
        seen.setdefault(normalise_text(t), row)
    clash = [(row, seen[normalise_text(t)]) for t, row in zip(other.texts, other.rows) if normalise_text(t) in seen]
    info[f"train_{what}_duplicates"] = len(clash)
    if clash and not allow:
        (orow, srow) = clash[0]
        raise DataError(f"{other.source}: {len(clash)} {what} text(s) also appear in {train.source} "
                        f"(first: {what} row {orow} = train row {srow}); this leaks {what} data into training. "
                        "Remove them or pass --allow-duplicates")


def prepare_splits(cfg) -> Splits:
    """Load ``cfg.data`` (and ``cfg.test_data``, ``cfg.val_data``) and build train/validation/test splits.

    Splits are stratified by the task's strata (the label; the label set for multi-label; whether a
    sentence has entities for NER) and grouped so identical texts stay on one side.
    """
    from .tasks import get_task

    task = get_task(cfg.task)
    if not cfg.data:
        raise DataError("no training data: give --data FILE (or builtin:icd10-circulatory)")
    load = lambda path: load_examples(path, cfg.text_col, cfg.label_col, task=cfg.task,  # noqa: E731
                                      label_sep=cfg.label_sep)
    full = load(cfg.data)
    classes = Counter(str(x) for l in full.labels for x in task.label_items(l))
    if cfg.task == "classification" and len(classes) < 2:
        only = next(iter(classes))
        raise DataError(f"{full.source}: column '{cfg.label_col}' has a single class '{only}'; "
                        "a classifier needs at least two")
    if cfg.task == "ner" and set(classes) <= {"O"}:
        raise DataError(f"{full.source}: no entities (every tag is O)")
    info: dict[str, Any] = {"task": cfg.task, "train_source": full.source, "train_sha256": full.content_hash(),
                            "n_rows": len(full)}
    _, n_unique = _groups(full.texts)
    info["duplicate_texts"] = len(full) - n_unique
    strata = task.strata
    if cfg.test_data:
        test = load(cfg.test_data)
        info.update(test_source=test.source, test_sha256=test.content_hash(), split="given")
        train_all = full
        _check_leakage(train_all, test, "test", cfg.allow_duplicates, info)
    else:
        if cfg.task == "classification":
            for label, n in classes.items():
                if n < 2:
                    raise DataError(f"{full.source}: label '{label}' has only {n} example; each class needs at "
                                    "least 2 to be split into train and test (or give --test-data)")
        keep, held = grouped_stratified_split(strata(full.labels), full.texts, cfg.test_size, cfg.seed)
        train_all, test = full.subset(keep), full.subset(held)
        info.update(split=f"stratified {1 - cfg.test_size:.0%}/{cfg.test_size:.0%} grouped by text, seed {cfg.seed}")
    val = None
    train = train_all
    if cfg.val_data:
        val = load(cfg.val_data)
        _check_leakage(train_all, val, "validation", cfg.allow_duplicates, info)
    elif cfg.val_size > 0:
        keep, held = grouped_stratified_split(strata(train_all.labels), train_all.texts, cfg.val_size, cfg.seed + 1)
        if len(held):
            train, val = train_all.subset(keep), train_all.subset(held)
    if cfg.train_fraction < 1:
        keep, _ = grouped_stratified_split(strata(train.labels), train.texts, 1 - cfg.train_fraction, cfg.seed + 2)
        train = train.subset(keep)
    lm = task.label_map(train.labels, cfg, train.source)
    if cfg.task == "classification" and len(lm) < 2:
        raise DataError(f"{full.source}: the training split has a single class; add data or lower --test-size")
    task.check_known(test, lm, "the test data")
    if val is not None:
        task.check_known(val, lm, "the validation split")
    info.update(n_train=len(train), n_val=0 if val is None else len(val), n_test=len(test),
                labels=[str(l) for l in lm.labels], train_label_counts=task.counts(train.labels),
                test_label_counts=task.counts(test.labels))
    return Splits(train, val, test, lm, info, full)


# ----------------------------------------------------------------------------------------------
# Writing tables (predict output)
# ----------------------------------------------------------------------------------------------

def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` in the format named by ``path``'s extension, atomically (temp file + rename)."""
    from .store import atomic_path

    p = Path(path)
    fmt, comp = detect_format(p)
    compression = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}.get(comp or "", None)
    with atomic_path(p) as tmp:
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        elif fmt == "jsonl":
            df.to_json(tmp, orient="records", lines=True, force_ascii=False, compression=compression)
        else:
            df.to_csv(tmp, sep="," if fmt == "csv" else "\t", index=False, compression=compression)
