"""Transformers trained from scratch with a tokenizer learned from the notes, and the TF-IDF baseline."""
import json

import numpy as np
import pandas as pd
import pytest

import clintune
import clintune.scratch as scratch
from clintune.config import TrainConfig
from clintune.errors import ConfigError

from conftest import make_texts


def small(binary_csv, **kw):
    base = dict(data=binary_csv, backbone="scratch-small", method="full", epochs=3, batch_size=16, max_length=32,
                progress=False, seed=3, precision="fp32", vocab_size=200, scratch_hidden=32, scratch_heads=2)
    base.update(kw)
    return TrainConfig(**base)


def test_scratch_model_trains_saves_and_reloads(binary_csv, tmp_path):
    out = tmp_path / "s"
    res = clintune.train(small(binary_csv, out=str(out), epochs=6))
    rec = json.loads((out / "record.json").read_text())
    assert rec["config"]["backbone"] == "scratch-small" and rec["config"]["lr"] == 1e-3
    assert rec["metrics"]["accuracy"] > 0.8                       # marker words are easy for a fresh model
    vocab = len(res.classifier.tokenizer)
    expect = scratch.param_count(scratch.ScratchSpec(2, 32, 2), vocab, 32) + (32 * 32 + 32) + (32 * 2 + 2)  # mlp head
    assert rec["cost"]["trainable_params"] == rec["cost"]["total_params"] == expect
    assert (out / "tokenizer" / "tokenizer.json").exists() and (out / "backbone" / "config.json").exists()
    texts = pd.read_csv(binary_csv)["text"].tolist()[:30]
    np.testing.assert_array_equal(res.classifier.predict_proba(texts), clintune.load(out).predict_proba(texts))


def test_tokenizer_never_sees_validation_or_test_texts(tmp_path, monkeypatch):
    df = make_texts(["cardio", "skin"], 200, seed=4)
    test = make_texts(["cardio", "skin"], 40, seed=5)
    test["text"] = test["text"] + " zebraword zebraword"           # frequent, but only in the test file
    df.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    seen = []
    real = scratch.train_tokenizer

    def spy(texts, *a, **k):
        seen.extend(texts)
        return real(texts, *a, **k)
    monkeypatch.setattr(scratch, "train_tokenizer", spy)
    res = clintune.train(TrainConfig(data=str(tmp_path / "train.csv"), test_data=str(tmp_path / "test.csv"),
                                     backbone="scratch-small", method="full", epochs=1, max_length=32, progress=False,
                                     vocab_size=300, scratch_hidden=32))
    n_train = res.record["data"]["n_train"]
    assert len(seen) == n_train < len(df)                           # the training split only: no validation
    assert not set(seen) & set(test["text"])
    assert "zebraword" not in res.classifier.tokenizer.get_vocab()


def test_learned_tokenizer_keeps_french_accents():
    texts = ["Fièvre et œdème pulmonaire", "fièvre élevée, œdème des membres", "pas de fièvre"] * 5
    tok = scratch.train_tokenizer(texts, 120)
    pieces = tok.convert_ids_to_tokens(tok("FIÈVRE œdème")["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert "fièvre" in pieces and "œdème" in pieces
    bpe = scratch.train_tokenizer(texts, 300, "bpe")
    assert bpe.decode(bpe("fièvre")["input_ids"], skip_special_tokens=True).strip() == "fièvre"


def test_scratch_backbones_are_trained_end_to_end():
    with pytest.raises(ConfigError, match="use --method full"):
        TrainConfig(backbone="scratch-base", method="lora")
    with pytest.raises(clintune.ClintuneError, match="unknown scratch model"):
        clintune.train(TrainConfig(data="builtin:icd10-circulatory", backbone="scratch-huge", method="full",
                                   progress=False))


def test_tfidf_baseline_record_predict_and_reload(multiclass_csv, tmp_path):
    out = tmp_path / "t"
    res = clintune.train(TrainConfig(data=multiclass_csv, method="tfidf", out=str(out), progress=False))
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "success" and rec["config"]["method"] == "tfidf" and rec["config"]["backbone"] == "tfidf"
    assert {"accuracy", "precision", "recall", "f1", "auroc", "f1_macro"} <= set(rec["metrics"])
    assert {"train_seconds", "train_samples_per_s", "predict_samples_per_s", "peak_rss_mb", "trainable_params",
            "total_params"} <= set(rec["cost"])
    n_feat = rec["cost"]["n_features"]
    assert rec["cost"]["trainable_params"] == 3 * n_feat + 3 and rec["cost"]["total_params"] == 4 * n_feat + 3
    assert rec["metrics"]["accuracy"] > 0.9
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"tfidf.json", "tfidf.safetensors", "record.json", "labels.json"} <= files
    assert not any(f.endswith((".pkl", ".joblib", ".pt", ".bin")) for f in files)
    texts = pd.read_csv(multiclass_csv)["text"].tolist()
    np.testing.assert_array_equal(res.classifier.predict_proba(texts), clintune.load(out).predict_proba(texts))
    df = clintune.predict(out, multiclass_csv, tmp_path / "p.csv")
    assert {"predicted_label", "prob_bone", "prob_cardio", "prob_skin"} <= set(df)
    ev = clintune.evaluate(out, multiclass_csv)
    assert ev["metrics"]["n"] == 180
