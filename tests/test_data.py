"""Reading every format, splitting without leakage, and one clear error per bad input."""
import gzip
import json

import numpy as np
import pandas as pd
import pytest

from clintune.config import TrainConfig
from clintune.data import LabelMap, grouped_stratified_split, load_examples, prepare_splits, read_table
from clintune.errors import DataError

ROWS = pd.DataFrame({"note": ["chest pain", "rash on arm", "heart failure", "skin lesion"],
                     "y": ["cardio", "skin", "cardio", "skin"]})


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl", "d.parquet", "d.csv.gz"])
def test_formats_read_the_same(tmp_path, name):
    p = tmp_path / name
    if name.endswith(".parquet"):
        ROWS.to_parquet(p)
    elif name.endswith(".jsonl"):
        p.write_text("\n".join(json.dumps(r) for r in ROWS.to_dict("records")) + "\n")
    elif name.endswith(".gz"):
        p.write_bytes(gzip.compress(ROWS.to_csv(index=False).encode()))
    else:
        ROWS.to_csv(p, sep="\t" if name.endswith(".tsv") else ",", index=False)
    ex = load_examples(p, "note", "y")
    assert ex.texts == ROWS.note.tolist() and ex.labels == ROWS.y.tolist()
    assert list(ex.rows) == [1, 2, 3, 4]


def test_integer_labels_and_na_strings_kept(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nNA,1\nNone,0\n")
    ex = load_examples(p)
    assert ex.texts == ["NA", "None"] and ex.labels == [1, 0]


def write(tmp_path, name, content: bytes | str):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


@pytest.mark.parametrize("name,content,col,needle", [
    ("d.xlsx", "x", "text", "unknown format ('.xlsx')"),
    ("d.csv", "", "text", "file is empty"),
    ("d.csv", "text,label\n", "text", "header but no rows"),
    ("d.csv", "note,label\na,1\n", "text", "column 'text' not found (columns: note, label)"),
    ("d.csv", "text,label\na,1\n ,0\nb,1\n", "text", "empty or missing text in column 'text' at row 2"),
    ("d.csv", "text,label\na,1\nb,\n", "text", "empty or missing label in column 'label' at row 2"),
    ("d.csv", b"text,label\na,1\nb\xff\xfe,0\n", "text", "not valid UTF-8 at line 3"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": \n', "text", "line 2 is not valid JSON"),
    ("d.parquet", b"not parquet", "text", "cannot read as Parquet"),
])
def test_bad_files_name_file_column_or_row(tmp_path, name, content, col, needle):
    p = write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        load_examples(p, col, "label")
    assert needle in str(e.value) and str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(DataError, match="nope.csv: file not found"):
        read_table("nope.csv")


def cfg_for(path, **kw):
    return TrainConfig(data=str(path), progress=False, **kw)


def test_single_class_and_unseen_test_label(tmp_path):
    p = write(tmp_path, "one.csv", "text,label\na,x\nb,x\nc,x\n")
    with pytest.raises(DataError, match="single class 'x'"):
        prepare_splits(cfg_for(p))
    tr = write(tmp_path, "tr.csv", "text,label\na,x\nb,y\nc,x\nd,y\n")
    te = write(tmp_path, "te.csv", "text,label\ne,x\nf,z\n")
    with pytest.raises(DataError, match="label 'z' at row 2 of the test data never appears"):
        prepare_splits(cfg_for(tr, test_data=str(te), val_size=0))


def test_leakage_is_refused_unless_allowed(tmp_path):
    tr = write(tmp_path, "tr.csv", "text,label\nchest pain,1\nrash,0\nheart,1\nskin,0\n")
    te = write(tmp_path, "te.csv", "text,label\nbone,0\n chest   pain ,1\n")
    with pytest.raises(DataError, match=r"1 test text\(s\) also appear.*test row 2 = train row 1.*--allow-duplicates"):
        prepare_splits(cfg_for(tr, test_data=str(te), val_size=0))
    s = prepare_splits(cfg_for(tr, test_data=str(te), val_size=0, allow_duplicates=True))
    assert s.info["train_test_duplicates"] == 1


def test_split_is_stratified_grouped_and_seeded(binary_csv):
    full = load_examples(binary_csv)
    texts = full.texts + full.texts[:20]          # 20 duplicated texts must stay together
    labels = full.labels + full.labels[:20]
    keep, held = grouped_stratified_split(labels, texts, 0.3, seed=3)
    assert len(set(keep) | set(held)) == len(texts) and not set(keep) & set(held)
    assert not {texts[i] for i in keep} & {texts[i] for i in held}
    pos_rate = np.mean([labels[i] for i in held])
    assert abs(pos_rate - np.mean(labels)) < 0.05
    again = grouped_stratified_split(labels, texts, 0.3, seed=3)
    assert (again[0] == keep).all()


def test_prepare_splits_sizes_and_no_overlap(binary_csv):
    s = prepare_splits(cfg_for(binary_csv))
    n = len(s.train) + len(s.val) + len(s.test)
    assert n == 400 and abs(len(s.test) - 120) <= 2
    sets = [set(x.texts) for x in (s.train, s.val, s.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    half = prepare_splits(cfg_for(binary_csv, train_fraction=0.5))
    assert abs(len(half.train) - len(s.train) / 2) <= 2 and half.test.texts == s.test.texts


def test_label_map_positive_and_order():
    lm = LabelMap.from_labels(["yes", "no", "yes"])
    assert lm.labels == ["no", "yes"] and lm.positive == "yes" and lm.positive_index == 1
    lm = LabelMap.from_labels([1, 0, 1], positive="0")
    assert lm.positive == 0 and lm.positive_index == 0
    assert LabelMap.from_labels([10, 2, 3]).labels == [2, 3, 10]
    with pytest.raises(DataError, match="--positive-label 'maybe'"):
        LabelMap.from_labels(["yes", "no"], positive="maybe")


def test_builtin_datasets():
    df = read_table("builtin:icd10-circulatory")
    assert 3500 < len(df) < 4500 and abs(df.label.mean() - 0.36) < 0.01
    assert df.text.is_unique
    ch = read_table("builtin:icd10-chapters")
    assert ch.label.nunique() == 22
    with pytest.raises(DataError, match="unknown built-in dataset"):
        read_table("builtin:nope")


def test_shared_medical_abstracts_reads(shared_data):
    ex = load_examples(shared_data / "medical_abstracts" / "medical_tc_test.csv", "medical_abstract", "condition_label")
    assert len(ex) == 2888 and set(ex.labels) == {1, 2, 3, 4, 5}
    mo = load_examples(shared_data / "morfitt" / "train.tsv", "abstract", "specialities")
    assert len(mo) == 1514
