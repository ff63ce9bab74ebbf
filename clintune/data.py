"""Load, validate and split labelled notes.

The flow is ``read_table`` (any supported file -> DataFrame) -> ``load_examples`` (columns checked,
texts and labels validated, row numbers kept for messages) -> ``prepare_splits`` (train / validation /
test, stratified and grouped by identical text so that no text sits on both sides of a split).

Every problem is a :class:`~clintune.errors.DataError` naming the file, the column and the 1-based
data row (the header is not counted). No message ever contains note text.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import re
import sys
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
_CANONICAL_INT = re.compile(r"^(0|-?[1-9][0-9]*)$")   # no sign, no leading zeros: 7, not 07 or +7


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
    return read_rows(path)[0]


def read_rows(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, str]:
    """:func:`read_table`, with the number messages use for each row and its unit: the 1-based data row
    (header and blank lines not counted) for CSV, TSV and Parquet, the line number for JSONL."""
    p = Path(path)
    if str(path).startswith(BUILTIN_PREFIX):
        from .builtin import load_builtin
        df = load_builtin(str(path)[len(BUILTIN_PREFIX):])
        return df, np.arange(1, len(df) + 1), "row"
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a data file")
    fmt, comp = detect_format(p)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if fmt == "parquet":
        if p.stat().st_size == 0:
            raise DataError(f"{p}: file is empty")
        try:
            df = pd.read_parquet(p)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{p}: cannot read as Parquet ({type(e).__name__})") from None
        return df, np.arange(1, len(df) + 1), "row"
    raw = read_bytes(p)
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
    df = _read_delimited(p, text, fmt)
    return df, np.arange(1, len(df) + 1), "row"


def read_bytes(p: Path) -> bytes:
    """The bytes of ``p``, or one line naming it (missing, a directory, unreadable)."""
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a data file")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None


def _lines(text: str) -> list[str]:
    """Physical lines: split on line feeds only (str.splitlines also splits on form feeds, U+2028 and other
    characters that may sit inside a note)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


_QUOTED = re.compile(r'"((?:[^"]|"")*)"', re.DOTALL)


def _csv_records(p: Path, text: str):
    """(first line, fields) of each CSV record; strict quoting, so a quote never silently swallows lines."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DataError(f"{p}: cannot parse as CSV: the quoted field opened on line {start} is never "
                                "closed") from None
            raise DataError(f"{p}: cannot parse as CSV at line {reader.line_num}: {e} (a field holding quotes "
                            "must be quoted whole, with its quotes doubled)") from None
        yield start, fields
        start = reader.line_num + 1


def _tsv_records(text: str):
    """(line, fields) of each TSV line. A TSV field cannot hold a tab or a line break, so each line is one
    record, split on tabs and read literally; a field quoted whole (``"..."`` with inner quotes doubled, as
    spreadsheet and pandas writers quote) is unquoted."""
    for i, line in enumerate(_lines(text), 1):
        fields = line.split("\t") if line else []
        yield i, [_unquote(f) for f in fields]


def _unquote(field: str) -> str:
    m = _QUOTED.fullmatch(field)
    return m.group(1).replace('""', '"') if m else field


def _read_delimited(p: Path, text: str, fmt: str) -> pd.DataFrame:
    """A CSV or TSV file as a DataFrame of str. Every row must have as many fields as the header: a
    ragged row is one error naming it (pandas would silently shift columns or take a field as the index)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))     # notes can be longer than csv's 128 KiB default
    try:
        records = _csv_records(p, text) if fmt == "csv" else _tsv_records(text)
        header: list[str] | None = None
        rows: list[list[str]] = []
        for line, fields in records:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue                                       # blank line
            if header is None:
                header = fields
                continue
            if len(fields) != len(header):
                raise DataError(f"{p}: row {len(rows) + 1} (line {line}) has {len(fields)} fields, the header has "
                                f"{len(header)} ({_ragged_hint(fmt, len(fields) > len(header))})")
            rows.append(fields)
    finally:
        csv.field_size_limit(limit)
    if header is None:
        raise DataError(f"{p}: file is empty")
    return pd.DataFrame(rows, columns=_column_names(header), dtype=str)


def _ragged_hint(fmt: str, more: bool) -> str:
    if fmt == "csv":
        return ("an unquoted comma inside a field? quote fields that hold commas" if more else
                "a missing field, or an unquoted line break?")
    return ("a tab inside a field?" if more else
            "a line break inside a field? TSV fields cannot hold line breaks: use CSV, JSONL or Parquet")


def _column_names(header: list[str]) -> list[str]:
    """Header names stripped; empty ones 'Unnamed: i' and repeated ones 'name.1', as pandas names them."""
    names: list[str] = []
    seen: set[str] = set()
    for i, h in enumerate(header):
        name = h.strip() or f"Unnamed: {i}"
        base, k = name, 0
        while name in seen:
            k += 1
            name = f"{base}.{k}"
        seen.add(name)
        names.append(name)
    return names


def _read_jsonl(p: Path, text: str) -> tuple[pd.DataFrame, np.ndarray, str]:
    records, lines = [], []
    for i, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {i} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}: line {i} is not a JSON object")
        records.append(obj)
        lines.append(i)
    if not records:
        raise DataError(f"{p}: file is empty")
    return pd.DataFrame.from_records(records), np.asarray(lines, dtype=np.int64), "line"


def _missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, (float, np.floating)) and np.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))


# ----------------------------------------------------------------------------------------------
# Showing names and labels in messages without showing note text
# ----------------------------------------------------------------------------------------------

#: A column name or label is shown in a message only when it looks like a name: at most this many
#: characters and three words. A longer value may be note text (a file without a header, or
#: --label-col naming the text column), so it is described, never quoted.
SHOWN_MAX_CHARS = 40


def is_shown(value: Any) -> bool:
    """Whether ``value`` is short enough to be a name or a label code, and so safe to print."""
    s = str(value)
    return 0 < len(s) <= SHOWN_MAX_CHARS and s.isprintable() and len(s.split()) <= 3


def show_label(value: Any) -> str:
    """``'value'`` for a short label; otherwise a description that does not contain it."""
    if is_shown(value):
        return f"'{value}'"
    return f"(a {len(str(value))}-character value, not shown: it may be note text)"


def labels_phrase(labels: Sequence[Any], limit: int = 20) -> str:
    """``labels: a, b, c`` when every label is short; else only their number."""
    labels = list(labels)
    if labels and all(is_shown(l) for l in labels):
        more = f" and {len(labels) - limit} more" if len(labels) > limit else ""
        return "labels: " + ", ".join(map(str, labels[:limit])) + more
    return f"{len(labels)} labels, not shown: some are long enough to be note text"


def columns_phrase(columns: Sequence[Any], limit: int = 20) -> str:
    """``columns: a, b`` when the header looks like names; else their number and a hint (a file without a
    header row has a note as its 'header')."""
    cols = list(columns)
    if cols and all(is_shown(c) for c in cols):
        more = f" and {len(cols) - limit} more" if len(cols) > limit else ""
        return "columns: " + ", ".join(map(str, cols[:limit])) + more
    return (f"{len(cols)} column(s), names not shown: the first row looks like data, not a header; "
            "the file needs a header row")


def _rows_phrase(rows: Sequence[int], unit: str = "row") -> str:
    rows = list(rows)
    more = f" and {len(rows) - 1} more" if len(rows) > 1 else ""
    return f"{unit} {rows[0]}{more}"


def normalise_text(t: str) -> str:
    """The text key used for duplicate and leakage checks: whitespace-insensitive, case-sensitive."""
    return " ".join(t.split())


def _normalise_labels(values: Sequence[Any]) -> list:
    """Labels as ints when every label is an integer (a number, or a string written as a canonical integer
    literal: ``7``, ``-2``; not ``07`` or ``+7``), else as stripped strings, so that codes such as ``007`` and
    ``7`` stay two classes and keep their leading zeros."""
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
    if all(isinstance(v, int) or _CANONICAL_INT.match(v) for v in out):
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
    unit: str = "row"        # what ``rows`` counts: data rows (CSV, TSV, Parquet) or lines (JSONL, CoNLL)

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
                        pick(self.words), pick(self.offsets), self.index[idx], self.unit)

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
    df, rows, unit = read_rows(path)
    if len(df) == 0:
        raise DataError(f"{source}: file has a header but no rows")
    for col in (text_col, label_col):
        if col is not None and col not in df.columns:
            raise DataError(f"{source}: column '{col}' not found ({columns_phrase(df.columns)})")
    raw_texts = df[text_col].tolist()
    bad = [rows[i] for i, t in enumerate(raw_texts) if isinstance(t, dict) or _is_list(t)]
    if bad:
        raise DataError(f"{source}: column '{text_col}' holds a list or an object, not text, at "
                        f"{_rows_phrase(bad, unit)}")
    bad = [rows[i] for i, t in enumerate(raw_texts) if _missing(t)]
    if bad:
        raise DataError(f"{source}: empty or missing text in column '{text_col}' at {_rows_phrase(bad, unit)}")
    texts = [t if isinstance(t, str) else str(t) for t in raw_texts]
    labels = None
    if label_col is not None:
        labels = _labels(df[label_col].tolist(), rows, unit, source, label_col, task, label_sep)
    return Examples(texts, labels, np.asarray(rows, dtype=np.int64), source, df if keep_frame else None, unit=unit)


def _labels(raw: list, rows: np.ndarray, unit: str, source: str, col: str, task: str, sep: str) -> list:
    """Validated labels of one column: one per row, or a sorted tuple per row for multilabel (a cell
    ``A|B`` split on ``sep``, or a JSON list)."""
    where = lambda bad: _rows_phrase(bad, unit)  # noqa: E731
    bad = [rows[i] for i, v in enumerate(raw) if isinstance(v, dict)]
    if bad:
        raise DataError(f"{source}: column '{col}' holds a JSON object, not a label, at {where(bad)}")
    bad = [rows[i] for i, v in enumerate(raw) if not _is_list(v) and _missing(v)]
    if bad:
        raise DataError(f"{source}: empty or missing label in column '{col}' at {where(bad)}")
    if task != "multilabel":
        bad = [rows[i] for i, v in enumerate(raw) if _is_list(v)]
        if bad:
            raise DataError(f"{source}: column '{col}' holds a list of labels at {where(bad)}; a note with "
                            "several labels needs --task multilabel")
        return _normalise_labels(raw)
    sets: list[list] = []
    for i, v in enumerate(raw):
        if _is_list(v):
            items = list(v)
            if any(isinstance(x, (dict, list, tuple, np.ndarray)) for x in items):
                raise DataError(f"{source}: column '{col}' at {unit} {rows[i]}: a label list holds a list or "
                                "an object; expected a flat list of labels")
            items = [x for x in items if not _missing(x)]
            sets.append([x.strip() if isinstance(x, str) else x for x in items])
        else:
            sets.append([x.strip() for x in str(v).split(sep) if x.strip()])
    bad = [rows[i] for i, s in enumerate(sets) if not s]
    if bad:
        raise DataError(f"{source}: no label in column '{col}' at {where(bad)} "
                        f"(labels are separated by '{sep}', or a JSON list)")
    flat = _normalise_labels([x for s in sets for x in s])
    it = iter(flat)
    return [tuple(sorted({next(it) for _ in s}, key=lambda v: (isinstance(v, str), v))) for s in sets]


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
                                f"({labels_phrase(uniq)})")
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
                        f"(first: {what} {other.unit} {orow} = train {train.unit} {srow}); this leaks {what} data into training. "
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
        raise DataError(f"{full.source}: column '{cfg.label_col}' has a single class {show_label(only)}; "
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
            rare = [label for label, n in classes.items() if n < 2]
            if rare:
                row = next(r for l, r in zip(full.labels, full.rows) if str(l) == rare[0])
                more = f" ({len(rare)} labels have a single example)" if len(rare) > 1 else ""
                hint = "" if is_shown(rare[0]) else f"; is column '{cfg.label_col}' really the label column?"
                raise DataError(f"{full.source}: label {show_label(rare[0])} in column '{cfg.label_col}' at "
                                f"{full.unit} {row} has only 1 example{more}; each class needs at least 2 to be "
                                f"split into train and test (or give --test-data){hint}")
        keep, held = grouped_stratified_split(strata(full.labels), full.texts, cfg.test_size, cfg.seed)
        if len(held) == 0:
            raise DataError(f"{full.source}: the test split is empty: identical texts stay on one side of the "
                            f"split, and no class has two distinct texts ({n_unique} distinct text(s) in "
                            f"{len(full)} {full.unit}s); add notes or give --test-data")
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
