"""Named-entity recognition data: CoNLL/BIO and JSONL character spans, words <-> sub-tokens, entities.

Input formats (``--task ner``):

* CoNLL/BIO (any extension but ``.jsonl``; e.g. ``.conll``, ``.bio``, ``.tsv``): one token per line, its
  tag in the last column (``O``, ``B-TYPE``, ``I-TYPE``), a blank line between sentences,
  ``-DOCSTART-`` lines ignored. The sentence's text is its tokens joined by single spaces.
* JSONL: ``{"text": "...", "entities": [{"start": 0, "end": 12, "label": "Disease"}, ...]}`` with
  character offsets (end exclusive); the text column is ``--text-col``, the entity column
  ``--label-col`` (``entities`` when the default ``label`` is absent). Texts are split into words
  (runs of letters/digits, or single punctuation marks) and each word overlapping an entity is tagged.

Words are split into sub-tokens by the backbone's tokenizer; a word's label is learned and predicted
on its first sub-token. Predictions come back as entities with character offsets into the text.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .batching import Encoded
from .data import Examples, LabelMap, _decode, _lines, columns_phrase, detect_format, read_bytes
from .errors import DataError

WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
TAG_RE = re.compile(r"^(O|[BI]-\S+)$")
IGNORE = -100


def split_words(text: str) -> tuple[list[str], np.ndarray]:
    """Words of ``text`` and their (start, end) character offsets."""
    words, offs = [], []
    for m in WORD_RE.finditer(text):
        words.append(m.group())
        offs.append((m.start(), m.end()))
    return words, np.asarray(offs, dtype=np.int64).reshape(-1, 2)


def _joined_offsets(words: list[str]) -> np.ndarray:
    offs, pos = [], 0
    for w in words:
        offs.append((pos, pos + len(w)))
        pos += len(w) + 1
    return np.asarray(offs, dtype=np.int64).reshape(-1, 2)


def read_conll(path: str | Path) -> Examples:
    p = Path(path)
    raw = read_bytes(p)
    if not raw.strip():
        raise DataError(f"{p}: file is empty")
    text = _decode(p, raw)
    sents, tags_all, starts = [], [], []
    words, tags, start = [], [], None
    for i, line in enumerate(_lines(text), 1):
        s = line.strip()
        if not s or s.startswith("-DOCSTART-"):
            if words:
                sents.append(words), tags_all.append(tags), starts.append(start)
            words, tags, start = [], [], None
            continue
        parts = s.split()
        if len(parts) < 2:
            raise DataError(f"{p}: line {i} has no tag (expected 'token tag', a blank line between sentences)")
        tag = parts[-1]
        if not TAG_RE.match(tag):
            raise DataError(f"{p}: line {i}: the tag (the last column) is not BIO (O, B-TYPE or I-TYPE); "
                            "expected 'token tag' per line")
        if start is None:
            start = i
        words.append(parts[0])
        tags.append(tag)
    if words:
        sents.append(words), tags_all.append(tags), starts.append(start)
    if not sents:
        raise DataError(f"{p}: no sentences found")
    texts = [" ".join(w) for w in sents]
    return Examples(texts, tags_all, np.asarray(starts), str(p), words=sents,
                    offsets=[_joined_offsets(w) for w in sents], unit="line")


def read_spans(path: str | Path, text_col: str, ent_col: str) -> Examples:
    from .data import read_rows

    p = Path(path)
    df, rows, unit = read_rows(p)
    if text_col not in df.columns:
        raise DataError(f"{p}: column '{text_col}' not found ({columns_phrase(df.columns)})")
    if ent_col not in df.columns:
        if ent_col == "label" and "entities" in df.columns:
            ent_col = "entities"
        else:
            raise DataError(f"{p}: column '{ent_col}' (entity spans) not found")
    texts, tags_all, words_all, offs_all = [], [], [], []
    for i, text, ents in zip(rows, df[text_col].tolist(), df[ent_col].tolist()):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{p}: empty or missing text in column '{text_col}' at {unit} {i}")
        if isinstance(ents, str):
            try:
                ents = json.loads(ents)
            except json.JSONDecodeError:
                raise DataError(f"{p}: {unit} {i}: column '{ent_col}' is not a JSON list of spans") from None
        if ents is None or (isinstance(ents, float) and np.isnan(ents)):
            ents = []
        if not isinstance(ents, (list, tuple, np.ndarray)):
            raise DataError(f"{p}: {unit} {i}: column '{ent_col}' is not a list of spans")
        words, offs = split_words(text)
        tags = ["O"] * len(words)
        for e in ents:
            try:
                a, b, lab = int(e["start"]), int(e["end"]), str(e["label"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{p}: {unit} {i}: each entity needs integer 'start', 'end' and a 'label'") from None
            if not 0 <= a < b <= len(text):
                raise DataError(f"{p}: {unit} {i}: entity span {a}..{b} is outside the text (length {len(text)})")
            inside = [k for k, (s, t) in enumerate(offs) if s < b and t > a]
            for n, k in enumerate(inside):
                tags[k] = ("B-" if n == 0 else "I-") + lab
        texts.append(text), tags_all.append(tags), words_all.append(words), offs_all.append(offs)
    return Examples(texts, tags_all, np.asarray(rows, dtype=np.int64), str(p), words=words_all, offsets=offs_all,
                    unit=unit)


def load_ner(path: str | Path, text_col: str = "text", label_col: str = "label") -> Examples:
    if str(path).startswith("builtin:"):
        raise DataError(f"{path}: built-in datasets are not NER data")
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a data file")
    try:
        fmt, _ = detect_format(p)
    except DataError:
        fmt = "conll"
    if fmt == "jsonl":
        return read_spans(p, text_col, label_col)
    if fmt in ("csv", "parquet"):
        raise DataError(f"{p}: NER data must be CoNLL (token and BIO tag per line) or JSONL with character spans")
    return read_conll(p)


def words_of_texts(texts: list[str]) -> tuple[list[list[str]], list[np.ndarray]]:
    out = [split_words(t) for t in texts]
    return [w for w, _ in out], [o for _, o in out]


class WordEncoded(Encoded):
    """Sub-token ids of word sequences, with each sub-token's word index (-1: special or not a first piece)."""

    def __init__(self, ids, truncated, pad_id, first_of_word, n_words, word_offsets):
        super().__init__(ids, truncated, pad_id)
        self.first_of_word = first_of_word          # list of (n_sub,) int arrays: word index at first pieces, else -1
        self.n_words = n_words
        self.word_offsets = word_offsets


def encode_words(tokenizer, words: list[list[str]], max_length: int, word_offsets=None) -> WordEncoded:
    if not words:
        return WordEncoded([], np.zeros(0, bool), tokenizer.pad_token_id or 0, [], [], [])
    enc = tokenizer([list(w) if w else [tokenizer.unk_token] for w in words], is_split_into_words=True,
                    truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False)
    ids, firsts, trunc = [], [], np.zeros(len(words), dtype=bool)
    for i in range(len(words)):
        wid = enc.word_ids(i)
        first = np.full(len(wid), -1, dtype=np.int64)
        prev = None
        for k, w in enumerate(wid):
            if w is not None and w != prev and words[i]:
                first[k] = w
            prev = w
        seen = [w for w in wid if w is not None]
        trunc[i] = bool(words[i]) and (not seen or max(seen) < len(words[i]) - 1)
        ids.append(np.asarray(enc["input_ids"][i], dtype=np.int64))
        firsts.append(first)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return WordEncoded(ids, trunc, pad, firsts, [len(w) for w in words],
                       word_offsets if word_offsets is not None else [_joined_offsets(w) for w in words])


def subtoken_targets(ex: Examples, lm: LabelMap, enc: WordEncoded) -> list[np.ndarray]:
    out = []
    for tags, first in zip(ex.labels, enc.first_of_word):
        y = np.full(len(first), IGNORE, dtype=np.int64)
        m = first >= 0
        y[m] = [lm.index_of(tags[w]) for w in first[m]]
        out.append(y)
    return out


def word_predictions(outputs: list[np.ndarray], enc: WordEncoded, lm: LabelMap) -> list[list[str]]:
    """Tag of each word from its first sub-token's logits; words cut by truncation get 'O'."""
    tags = []
    for out, first, n in zip(outputs, enc.first_of_word, enc.n_words):
        t = ["O"] * n
        m = first >= 0
        for w, k in zip(first[m], out[m].argmax(-1)):
            t[w] = str(lm.labels[k])
        tags.append(_repair_bio(t))
    return tags


def _repair_bio(tags: list[str]) -> list[str]:
    """An I-X that does not continue an entity of type X starts one (conlleval's reading), made explicit."""
    out, prev = [], "O"
    for t in tags:
        if t.startswith("I-") and prev[2:] != t[2:]:
            t = "B-" + t[2:]
        out.append(t)
        prev = t
    return out


def entities_from_tags(tags: list[str], offsets: np.ndarray, text: str) -> list[dict]:
    from seqeval.metrics.sequence_labeling import get_entities

    ents = []
    for label, a, b in get_entities(list(tags)):
        s, e = int(offsets[a][0]), int(offsets[b][1])
        ents.append({"start": s, "end": e, "label": label, "text": text[s:e]})
    return ents
