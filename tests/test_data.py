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


# ----------------------------------------------------------------------------- privacy of messages
SECRET = "SECRETNOTE"


def test_headerless_file_does_not_show_its_first_row(tmp_path):
    p = write(tmp_path, "d.csv", f"patient 0 has broken arm {SECRET}0,0\npatient 1 is fine {SECRET}1,1\n")
    with pytest.raises(DataError, match="column 'text' not found.*first row looks like data") as e:
        load_examples(p)
    assert SECRET not in str(e.value) and "patient" not in str(e.value)
    p = write(tmp_path, "n.jsonl", json.dumps({"body": "x", "a very long key that is no column name at all": 1}) + "\n")
    with pytest.raises(DataError, match="column 'text' not found") as e:
        load_examples(p)
    assert "very long key" not in str(e.value)


def test_label_values_that_look_like_text_are_never_shown(tmp_path):
    rows = "".join(f"patient {i} has a broken arm {SECRET}{i},{i % 2}\n" for i in range(6))
    p = write(tmp_path, "d.csv", "text,label\n" + rows)
    swapped = cfg_for(p, text_col="label", label_col="text")      # --label-col names the text column
    with pytest.raises(DataError, match=r"at row 1 has only 1 example.*really the label column") as e:
        prepare_splits(swapped)
    assert SECRET not in str(e.value)
    one = write(tmp_path, "one.csv", "text,label\n" + "".join(f"{i},patient has a broken arm {SECRET}\n" for i in range(4)))
    with pytest.raises(DataError, match=r"single class \(a 35-character value, not shown") as e:
        prepare_splits(cfg_for(one))
    assert SECRET not in str(e.value)
    with pytest.raises(DataError, match="--positive-label 'x' is not a label.*2 labels, not shown") as e:
        LabelMap.from_labels([f"note one {SECRET}", f"note number two {SECRET}"], positive="x")
    assert SECRET not in str(e.value)
    # short codes are still named
    with pytest.raises(DataError, match="label 'c' in column 'label' at row 3 has only 1 example"):
        prepare_splits(cfg_for(write(tmp_path, "c.csv", "text,label\na,x\nb,x\nc,c\nd,y\ne,y\n")))


def test_unseen_long_test_label_is_not_shown(tmp_path):
    tr = write(tmp_path, "tr.csv", "text,label\na,x\nb,y\nc,x\nd,y\n")
    te = write(tmp_path, "te.csv", f"text,label\ne,x\nf,left arm fracture seen {SECRET}\n")
    with pytest.raises(DataError, match=r"label \(a \d+-character value, not shown.*row 2 of the test data never "
                                        r"appears.*labels: x, y") as e:
        prepare_splits(cfg_for(tr, test_data=str(te), val_size=0))
    assert SECRET not in str(e.value)


# ----------------------------------------------------------------------------- reading without corruption
def test_parquet_nullable_missing_values_are_missing(tmp_path):
    p = tmp_path / "d.parquet"
    pd.DataFrame({"text": pd.array(["a", None, "c"], dtype="string"),
                  "label": pd.array([1, 0, 1], dtype="Int64")}).to_parquet(p)
    with pytest.raises(DataError, match="empty or missing text in column 'text' at row 2"):
        load_examples(p)
    pd.DataFrame({"text": pd.array(["a", "b", "c"], dtype="string"),
                  "label": pd.array([1, None, 0], dtype="Int64")}).to_parquet(p)
    with pytest.raises(DataError, match="empty or missing label in column 'label' at row 2"):
        load_examples(p)
    pd.DataFrame({"text": pd.array(["a", "b", "c"], dtype="string"),
                  "label": pd.array([1, 0, 1], dtype="Int64")}).to_parquet(p)
    ex = load_examples(p)
    assert ex.texts == ["a", "b", "c"] and ex.labels == [1, 0, 1]


@pytest.mark.parametrize("content,needle", [
    ("text,label\nchest pain, left side,1\nrash,0\n", "row 1 (line 2) has 3 fields, the header has 2 (an unquoted comma"),
    ("text,label\nchest pain, left,1\nrash, arm,0\n", "row 1 (line 2) has 3 fields"),   # one extra comma on every row
    ("text,label\n\na,1\nb\n", "row 2 (line 4) has 1 fields, the header has 2"),
    ('text,label\n"chest pain,1\nrash,0\n', "the quoted field opened on line 2 is never closed"),
    ('text,label\n"chest" pain,1\n', "cannot parse as CSV at line 2"),
])
def test_ragged_or_badly_quoted_csv_rows_are_one_error(tmp_path, content, needle):
    p = write(tmp_path, "d.csv", content)
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert needle in str(e.value) and str(p) in str(e.value)
    assert "chest" not in str(e.value) and "\n" not in str(e.value)


def test_csv_quoting_still_reads(tmp_path):
    p = write(tmp_path, "d.csv", 'text,label\n"chest pain, left side",1\n"he said ""ouch""\nthen left",0\n\n')
    ex = load_examples(p)
    assert ex.texts == ["chest pain, left side", 'he said "ouch"\nthen left'] and ex.labels == [1, 0]
    long = "x" * 300_000                                   # beyond the csv module's default field limit
    ex = load_examples(write(tmp_path, "l.csv", f"text,label\n{long},1\n"))
    assert ex.texts == [long]


def test_tsv_is_read_literally(tmp_path):
    p = write(tmp_path, "d.tsv", 'text\tlabel\n"Pain" in chest\t1\n"unclosed quote\t0\nrash\t1\n"whole"\t0\n"a ""b"""\t1\n')
    ex = load_examples(p)
    assert ex.texts == ['"Pain" in chest', '"unclosed quote', "rash", "whole", 'a "b"']   # quoted whole: unquoted
    assert ex.labels == [1, 0, 1, 0, 1]
    p = write(tmp_path, "r.tsv", 'text\tlabel\n"note with\nline break"\t1\n')
    with pytest.raises(DataError, match=r"row 1 \(line 2\) has 1 fields.*TSV fields cannot hold line breaks"):
        load_examples(p)
    with pytest.raises(DataError, match=r"row 1 \(line 2\) has 3 fields.*a tab inside a field"):
        load_examples(write(tmp_path, "t.tsv", "text\tlabel\na\tb\t1\n"))


def test_labels_stay_text_unless_canonical_integers(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\na,007\nb,07\nc,7\nd,+7\ne,7\n")
    assert load_examples(p).labels == ["007", "07", "7", "+7", "7"]
    p = write(tmp_path, "i.csv", "text,label\na,1\nb,-2\nc,0\nd, 3 \n")
    assert load_examples(p).labels == [1, -2, 0, 3]
    p = write(tmp_path, "m.csv", "text,label\na,01|1\nb,1\n")
    assert load_examples(p, task="multilabel").labels == [("01", "1"), ("1",)]


def test_jsonl_list_labels(tmp_path):
    p = write(tmp_path, "d.jsonl", '{"text": "a", "label": ["I50", "E11"]}\n\n{"text": "b", "label": "E11"}\n'
                                   '{"text": "c", "label": [7, 10]}\n')
    assert load_examples(p, task="multilabel").labels == [("E11", "I50"), ("E11",), ("10", "7")]
    with pytest.raises(DataError, match="holds a list of labels at line 1 and 1 more; .*--task multilabel"):
        load_examples(p)
    p = write(tmp_path, "e.jsonl", '{"text": "a", "label": []}\n')
    with pytest.raises(DataError, match="no label in column 'label' at line 1"):
        load_examples(p, task="multilabel")
    p = write(tmp_path, "o.jsonl", '{"text": "a", "label": {"code": 1}}\n')
    with pytest.raises(DataError, match="holds a JSON object, not a label, at line 1"):
        load_examples(p)
    p = write(tmp_path, "t.jsonl", '{"text": ["a"], "label": 1}\n')
    with pytest.raises(DataError, match="column 'text' holds a list or an object, not text, at line 1"):
        load_examples(p)


def test_jsonl_messages_and_rows_are_line_numbers(tmp_path):
    p = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n\n\n\n{"text": " ", "label": 0}\n')
    with pytest.raises(DataError, match="empty or missing text in column 'text' at line 5"):
        load_examples(p)
    p = write(tmp_path, "ok.jsonl", '{"text": "a\u2028b", "label": 1}\n\n{"text": "c", "label": 0}\n')
    ex = load_examples(p)                                   # U+2028 inside a text is no line break
    assert ex.texts == ["a\u2028b", "c"] and list(ex.rows) == [1, 3] and ex.unit == "line"
    assert list(ex.subset([1]).rows) == [3] and ex.subset([1]).unit == "line"


def test_empty_test_split_is_refused_before_training(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\nsame a,x\nsame  a,x\nsame b,y\nsame b,y\n")
    with pytest.raises(DataError, match=r"d.csv: the test split is empty.*--test-data"):
        prepare_splits(cfg_for(p))


def test_a_directory_is_not_a_data_file(tmp_path):
    for name in ("data", "data.csv", "data.conll"):
        (tmp_path / name).mkdir()
        for task in ("classification", "ner"):
            with pytest.raises(DataError, match=f"{name}: is a directory, expected a data file"):
                load_examples(tmp_path / name, task=task)
