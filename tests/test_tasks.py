"""Multi-label, NER and long notes."""
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

import clintune
from clintune.batching import encode_chunks
from clintune.data import load_examples
from clintune.heads import WindowPool
from clintune.tasks import MultiLabel, get_task

from conftest import MARKERS, NEUTRAL, tiny_config


# ----------------------------------------------------------------------------- multi-label
@pytest.fixture(scope="module")
def multilabel_csv(tmp_path_factory):
    rnd = random.Random(3)
    rows = []
    for i in range(300):
        labs = sorted(rnd.sample(list(MARKERS), rnd.choice([1, 1, 2])))
        words = rnd.choices(NEUTRAL, k=rnd.randint(4, 10)) + [w for l in labs for w in rnd.choices(MARKERS[l], k=2)]
        rnd.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "labels": "|".join(labs)})
    p = tmp_path_factory.mktemp("ml") / "notes.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return str(p)


def test_multilabel_trains_tunes_thresholds_predicts_sets(tiny_backbone, multilabel_csv, tmp_path):
    out = tmp_path / "ml"
    res = clintune.train(tiny_config(tiny_backbone, multilabel_csv, task="multilabel", label_col="labels",
                                     method="full", lr=2e-3, epochs=8, patience=0, out=str(out)))
    m = json.loads((out / "record.json").read_text())["metrics"]
    assert {"f1_micro", "f1_macro", "auroc_macro", "subset_accuracy", "hamming_loss"} <= set(m)
    assert m["f1"] == m["f1_micro"] and m["labels"] == ["bone", "cardio", "skin"]
    assert m["f1_micro"] > 0.8 and m["auroc_macro"] > 0.9, m
    state = json.loads((out / "task_state.json").read_text())
    assert len(state["thresholds"]) == 3 and all(0.05 <= t <= 0.95 for t in state["thresholds"])
    texts = ["heart cardiac rash eczema today", "fracture femur follow up"]
    assert clintune.load(out).predict(texts) == res.classifier.predict(texts)
    df = clintune.predict(out, multilabel_csv, tmp_path / "p.csv")
    assert {"predicted_labels", "prob_bone", "prob_cardio", "prob_skin"} <= set(df)
    assert (df["predicted_labels"] == df["labels"]).mean() > 0.8


def test_threshold_tuning_by_hand():
    lm = clintune.data.LabelMap(["a", "b"])
    ex = clintune.data.Examples(["x"] * 4, [("a",), ("a", "b"), (), ("b",)], np.arange(1, 5), "h")
    # logits: label a scores 2, 1, -1, -2 -> probabilities .88 .73 .27 .12 ; a is positive for the first two
    logits = np.array([[2.0, -3], [1.0, 0.5], [-1.0, -3], [-2.0, 0.1]])
    th = MultiLabel().fit_state(logits, ex, lm)["thresholds"]
    assert 0.27 < th[0] <= 0.73                                  # any cut between the classes; the lowest best
    assert th[0] == 0.3
    m = MultiLabel().metrics(logits, ex, lm, state={"thresholds": th}, ci=False)
    assert m["per_label_f1"]["a"] == 1.0


def test_multilabel_macro_skips_a_label_neither_given_nor_predicted():
    lm = clintune.data.LabelMap(["a", "b", "c"])
    ex = clintune.data.Examples(["x"] * 3, [("a",), ("a", "b"), ()], np.arange(1, 4), "h")
    logits = np.array([[3.0, -3, -3], [3.0, 3, -3], [-3.0, 3, -3]])      # a: 2 of 2 ; b: tp 1, fp 1 ; c: never
    m = MultiLabel().metrics(logits, ex, lm, state={"thresholds": [0.5] * 3}, ci=True)
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3) / 2)               # c has no F1 to average
    assert m["per_label_f1"]["c"] == 0.0
    lo, hi = m["_ci"]["f1_macro"]
    assert lo <= m["f1_macro"] <= hi


def test_multilabel_labels_are_parsed_as_sets(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,I50|E11\nb,E11\nc, E11 | I50 \n")
    ex = load_examples(p, task="multilabel")
    assert ex.labels == [("E11", "I50"), ("E11",), ("E11", "I50")]
    p.write_text("text,label\na,I50\nb,|\n")
    with pytest.raises(clintune.ClintuneError, match="no label in column 'label' at row 2"):
        load_examples(p, task="multilabel")


# ----------------------------------------------------------------------------- NER
DISEASES = [["heart", "failure"], ["psoriasis"], ["coronary", "infarction"], ["eczema"]]


def conll_text(n, seed):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        words = [(w, "O") for w in rnd.choices(NEUTRAL, k=rnd.randint(3, 8))]
        d = rnd.choice(DISEASES)
        pos = rnd.randint(0, len(words))
        words[pos:pos] = [(w, ("B-" if i == 0 else "I-") + "Disease") for i, w in enumerate(d)]
        out.append("\n".join(f"{w}\t{t}" for w, t in words))
    return "-DOCSTART-\tO\n\n" + "\n\n".join(out) + "\n"


@pytest.fixture(scope="module")
def conll(tmp_path_factory):
    d = tmp_path_factory.mktemp("ner")
    (d / "train.conll").write_text(conll_text(200, 1))
    (d / "test.conll").write_text(conll_text(60, 2))
    return d


def test_ner_trains_with_entity_f1_and_predicts_character_spans(tiny_backbone, conll, tmp_path):
    out = tmp_path / "ner"
    res = clintune.train(tiny_config(tiny_backbone, str(conll / "train.conll"), test_data=str(conll / "test.conll"),
                                     task="ner", method="full", lr=3e-3, epochs=8, patience=0, out=str(out)))
    rec = json.loads((out / "record.json").read_text())
    m = rec["metrics"]
    assert m["f1"] == m["f1_micro"] and m["f1"] > 0.8, m
    assert m["per_type"]["Disease"]["support"] == m["n_entities"] == 60
    assert {"precision", "recall", "f1"} <= set(rec["metrics_ci"])
    preds = pd.read_csv(out / "test_predictions.csv")
    assert "text" not in preds.columns and all("text" not in e for s in preds["entities"] for e in json.loads(s))
    text = "today patient presents with  heart failure   noted on exam eczema"
    ents = clintune.load(out).predict([text])[0]
    assert ents == res.classifier.predict([text])[0]
    assert {(e["text"], e["label"]) for e in ents} == {("heart failure", "Disease"), ("eczema", "Disease")}
    assert all(text[e["start"]:e["end"]] == e["text"] for e in ents)
    # predict from JSONL text and from CoNLL
    (tmp_path / "new.jsonl").write_text(json.dumps({"id": 7, "text": text}) + "\n")
    df = clintune.predict(out, tmp_path / "new.jsonl", tmp_path / "p.jsonl")
    assert df["id"].tolist() == [7] and json.loads(df["entities"][0]) == ents
    df2 = clintune.predict(out, conll / "test.conll", tmp_path / "p2.jsonl")
    assert len(df2) == 60
    ev = clintune.evaluate(out, conll / "test.conll")
    assert ev["metrics"]["f1"] == pytest.approx(m["f1"])
    from clintune.quantize import int8_available
    if int8_available():            # token-level outputs through the int8 encoder: the same clear entities
        assert clintune.load(out, quantize="int8").predict([text])[0] == ents
        assert clintune.evaluate(out, conll / "test.conll", quantize="int8")["metrics"]["f1"] > 0.8


def test_ner_reads_jsonl_spans(tmp_path):
    text = "Acute heart failure, no eczema."
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": text, "entities": [{"start": 6, "end": 19, "label": "Disease"},
                                                        {"start": 24, "end": 30, "label": "Disease"}]}) + "\n")
    ex = load_examples(p, task="ner")
    assert ex.words[0] == ["Acute", "heart", "failure", ",", "no", "eczema", "."]
    assert ex.labels[0] == ["O", "B-Disease", "I-Disease", "O", "O", "B-Disease", "O"]
    p.write_text(json.dumps({"text": "abc", "entities": [{"start": 2, "end": 9, "label": "X"}]}) + "\n")
    with pytest.raises(clintune.ClintuneError, match="line 1: entity span 2..9 is outside the text"):
        load_examples(p, task="ner")
    (tmp_path / "bad.conll").write_text("heart B-Disease\nfailure Q-Disease\n")
    with pytest.raises(clintune.ClintuneError, match=r"line 2: the tag \(the last column\) is not BIO") as e:
        load_examples(tmp_path / "bad.conll", task="ner")
    assert "Q-Disease" not in str(e.value)                      # the line's words are never shown


def test_ner_entity_metrics_by_hand():
    task = get_task("ner")
    gold = [["B-D", "I-D", "O", "B-D"], ["O", "B-C"]]
    pred = [["B-D", "I-D", "O", "O"], ["O", "B-D"]]
    task.word_tags = lambda outputs, ex, lm, enc: pred                      # evaluate fixed predictions
    ex = clintune.data.Examples(["a", "b"], gold, np.arange(1, 3), "h")
    m = task.metrics(None, ex, clintune.data.LabelMap(["O", "B-D", "I-D", "B-C"]), ci=True)
    # gold entities: D(0-1), D(3), C(1); predicted: D(0-1), D(1) -> tp 1, fp 1, fn 2
    assert m["precision"] == pytest.approx(1 / 2) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


# ----------------------------------------------------------------------------- long notes
def test_chunk_windows_overlap_and_cover_the_note(tiny_backbone):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    note = " ".join(NEUTRAL[i % len(NEUTRAL)] for i in range(100))
    enc = encode_chunks(tok, [note], max_length=32, overlap=10, max_chunks=50)
    wins = [w[1:-1].tolist() for w in enc.windows(np.array([0]))[0]]             # strip [CLS] [SEP]
    body = tok(note, add_special_tokens=False)["input_ids"]
    assert all(len(w) <= 30 for w in wins) and wins[0] == body[:30]
    assert all(a[-10:] == b[:10] for a, b in zip(wins, wins[1:]))               # 10 shared tokens
    assert wins[-1][-1] == body[-1] and len(wins) == 5                          # 100 tokens, step 20
    few = encode_chunks(tok, [note], max_length=32, overlap=10, max_chunks=2)
    assert few.truncated.tolist() == [True]


@pytest.mark.parametrize("how", ["mean", "max", "attention"])
def test_window_pooling_by_hand(how):
    pool = WindowPool(how, 2)
    u = torch.tensor([[1.0, 4.0], [3.0, 0.0], [5.0, 5.0]])
    owner = torch.tensor([0, 0, 1])
    out = pool(u, owner, 2)
    if how == "mean":
        assert out.tolist() == [[2.0, 2.0], [5.0, 5.0]]
    elif how == "max":
        assert out.tolist() == [[3.0, 4.0], [5.0, 5.0]]
    else:
        s = pool.score(u).squeeze(-1)
        w = torch.softmax(s[:2], 0)
        torch.testing.assert_close(out[0], w[0] * u[0] + w[1] * u[1])
        torch.testing.assert_close(out[1], u[2])


def test_label_bearing_sentence_at_the_end_of_a_long_note_counts_only_with_chunking(tiny_backbone, binary_csv):
    res = clintune.train(tiny_config(tiny_backbone, binary_csv, method="full", lr=2e-3, epochs=6, patience=0,
                                     long="chunk", chunk_pooling="max", max_length=32, chunk_overlap=8,
                                     max_chunks=128))
    clf = res.classifier
    rnd = random.Random(0)
    filler = " ".join(rnd.choices(NEUTRAL, k=2100))                                    # > 2,000 words
    notes = [filler + " heart cardiac infarction coronary", filler + " rash eczema dermatitis psoriasis"]
    p_chunk = clf.predict_proba(notes)[:, 1]                                         # p(cardio)
    assert p_chunk[0] > 0.5 > p_chunk[1], p_chunk                                    # the ending decides
    enc = clf.encode(notes)
    n_tokens = len(clf.tokenizer(notes[0], add_special_tokens=False)["input_ids"])
    assert len(enc.windows(np.array([0]))[0]) == -(-(n_tokens - 8) // 22) and not enc.truncated.any()
    clf.config = clf.config.replace(long="truncate")                                # same model, truncated
    p_trunc = clf.predict_proba(notes)[:, 1]
    assert p_trunc[0] == pytest.approx(p_trunc[1], abs=1e-6)                        # the ending is cut off


def test_unknown_label_message_names_line_and_hides_text_like_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": ["I50"]}\n\n{"text": "b", "label": ["I50", "left arm fracture SECRETNOTE"]}\n')
    ex = load_examples(p, task="multilabel")
    task = get_task("multilabel")
    lm = clintune.data.LabelMap(["E11", "I50"])
    with pytest.raises(clintune.ClintuneError, match=r"label \(a 28-character value, not shown.*at line 3 of the "
                                                     r"test data never appears.*labels: E11, I50") as e:
        task.check_known(ex, lm, "the test data")
    assert "SECRETNOTE" not in str(e.value)
    with pytest.raises(clintune.ClintuneError, match="labels, not shown") as e:
        task.check_known(load_examples(p, task="multilabel"), clintune.data.LabelMap(["x", "a long code with words in it"]),
                         "the test data")
    assert "long code" not in str(e.value)
