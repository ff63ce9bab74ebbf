"""The frozen-backbone feature cache: same predictions as without it, reused, never half-written."""
import json

import numpy as np
import pandas as pd
import pytest

import clintune
import clintune.cache as cache_mod

from conftest import tiny_config


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("CLINTUNE_CACHE_DIR", str(d))
    return d


@pytest.mark.parametrize("head", ["linear", "grn", "tinyattention"])
def test_cached_and_uncached_training_give_the_same_predictions(head, tiny_backbone, binary_csv, cache_dir):
    kw = dict(method="frozen", head=head, head_dim=8, epochs=4, lr=2e-2)
    cached = clintune.train(tiny_config(tiny_backbone, binary_csv, **kw))
    uncached = clintune.train(tiny_config(tiny_backbone, binary_csv, cache=False, **kw))
    assert cached.record["cost"]["feature_cache"]["hits"] == {"data": False, "test": False}
    assert "feature_cache" not in uncached.record["cost"]
    texts = pd.read_csv(binary_csv)["text"].tolist()
    a, b = cached.classifier.predict_proba(texts), uncached.classifier.predict_proba(texts)
    assert (a.argmax(1) == b.argmax(1)).all()
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert cached.metrics["accuracy"] == uncached.metrics["accuracy"]


def test_second_run_reuses_the_cache_without_encoding(tiny_backbone, binary_csv, cache_dir, monkeypatch, tmp_path):
    clintune.train(tiny_config(tiny_backbone, binary_csv, method="frozen", head="adapter", head_dim=8, epochs=1))
    entries = sorted(p.name for p in cache_dir.iterdir())
    assert len(entries) == 2 and not any(".partial-" in e for e in entries)

    def no_encoding(*a, **k):
        raise AssertionError("encoded again")
    monkeypatch.setattr(cache_mod, "encode_into", no_encoding)
    out = tmp_path / "second"
    res = clintune.train(tiny_config(tiny_backbone, binary_csv, method="frozen", head="lightweight", head_dim=8,
                                     epochs=2, out=str(out)))              # another head: the same features
    assert res.record["cost"]["feature_cache"]["hits"] == {"data": True, "test": True}
    assert sorted(p.name for p in cache_dir.iterdir()) == entries
    monkeypatch.undo()
    monkeypatch.setenv("CLINTUNE_CACHE_DIR", str(cache_dir))
    res = clintune.train(tiny_config(tiny_backbone, binary_csv, method="frozen", epochs=1, seed=9))
    assert res.record["cost"]["feature_cache"]["hits"] == {"data": True, "test": False}  # new seed: new test split
    # test metrics came from cached features; the saved model, reloaded, predicts the very same numbers
    preds = pd.read_csv(out / "test_predictions.csv")
    texts = pd.read_csv(binary_csv)["text"].tolist()
    test_texts = [texts[r - 1] for r in preds["row"]]
    again = clintune.load(out).predict_proba(test_texts)
    np.testing.assert_array_equal(again[:, 1].astype(np.float32), preds["prob_1"].to_numpy(np.float32))


def test_partial_entries_are_ignored_and_rebuilt(tiny_backbone, binary_csv, cache_dir):
    cfg = tiny_config(tiny_backbone, binary_csv, method="frozen", epochs=1)
    clintune.train(cfg)
    entry = next(p for p in cache_dir.iterdir())
    (entry / "meta.json").unlink()             # as if the writer died before completing
    res = clintune.train(cfg)
    assert res.record["cost"]["feature_cache"]["hits"] == {"data": False, "test": True} or \
        res.record["cost"]["feature_cache"]["hits"] == {"data": True, "test": False}
    assert all((p / "meta.json").exists() for p in cache_dir.iterdir())


def test_cache_key_changes_with_what_decides_the_bits(monkeypatch):
    from clintune import training

    base = dict(backbone="a", tokenizer="t", max_length=256, batch_size=64, dtype="bf16", device="cpu", texts="x")
    k = cache_mod.cache_key(**base)
    for field, value in [("backbone", "b"), ("max_length", 128), ("batch_size", 32), ("dtype", "fp32"), ("texts", "y")]:
        assert cache_mod.cache_key(**{**base, field: value}) != k
    monkeypatch.setattr(training, "EVAL_TOKENS_CPU", training.EVAL_TOKENS_CPU * 2)   # evaluation pieces
    assert cache_mod.cache_key(**base) != k


def test_bf16_features_are_stored_as_computed_and_reload_exactly(tiny_backbone, binary_csv, cache_dir, tmp_path):
    out = tmp_path / "bf16"
    res = clintune.train(tiny_config(tiny_backbone, binary_csv, method="frozen", head="grn", head_dim=8, epochs=2,
                                     precision="bf16", out=str(out)))
    assert res.classifier.model.feature_dtype is not None
    meta = [json.loads((p / "meta.json").read_text()) for p in cache_dir.iterdir()]
    assert {m["dtype"] for m in meta} == {"bf16"}
    preds = pd.read_csv(out / "test_predictions.csv")
    texts = pd.read_csv(binary_csv)["text"].tolist()
    again = clintune.load(out).predict_proba([texts[r - 1] for r in preds["row"]])
    np.testing.assert_array_equal(again[:, 1].astype(np.float32), preds["prob_1"].to_numpy(np.float32))


def test_cache_clear_command_empties_the_cache(tiny_backbone, binary_csv, cache_dir, capsys):
    from clintune.cli import main

    clintune.train(tiny_config(tiny_backbone, binary_csv, method="frozen", epochs=1))
    assert any(cache_dir.iterdir())
    assert main(["cache-clear"]) == 0
    assert "removed 2 feature-cache entries" in capsys.readouterr().out
    assert not any(cache_dir.iterdir())


def test_cache_clear_removes_only_cache_entries(tmp_path, capsys):
    from clintune.cli import main

    key = "0123456789abcdef0123456789abcdef"
    (tmp_path / key).mkdir()
    for name in ("states.npy", "offsets.npy", "meta.json"):
        (tmp_path / key / name).write_bytes(b"x" * 10)
    (tmp_path / f"{key}.partial-ab_12").mkdir()                     # a write that was interrupted
    (tmp_path / "thesis" / "src").mkdir(parents=True)               # a user's folder: --cache-dir pointed wrong
    (tmp_path / "thesis" / "src" / "main.py").write_text("x")
    (tmp_path / "fedcba9876543210fedcba9876543210").mkdir()         # named like a key, but holds something else
    (tmp_path / "fedcba9876543210fedcba9876543210" / "notes.txt").write_text("x")
    (tmp_path / "notes.csv").write_text("x")
    assert main(["cache-clear", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "removed 2 feature-cache entries" in out and "left 3 other item(s)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fedcba9876543210fedcba9876543210", "notes.csv", "thesis"]
    assert (tmp_path / "thesis" / "src" / "main.py").exists()
    assert main(["cache-clear", "--cache-dir", str(tmp_path / "notes.csv")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_entries_are_keyed_by_how_the_features_are_computed(tiny_backbone, binary_csv, cache_dir, tmp_path):
    """The fast path and plain PyTorch round bf16 differently: a run with the other never reads the first's
    features, so its test predictions are still those of its saved model, reloaded."""
    kw = dict(method="frozen", head="linear", epochs=1, precision="bf16")
    first = clintune.train(tiny_config(tiny_backbone, binary_csv, **kw))
    assert first.record["cost"]["feature_cache"]["hits"] == {"data": False, "test": False}
    out = tmp_path / "plain"
    plain = clintune.train(tiny_config(tiny_backbone, binary_csv, fast=False, out=str(out), **kw))
    assert plain.record["cost"]["feature_cache"]["hits"] == {"data": False, "test": False}
    assert len(list(cache_dir.iterdir())) == 4
    preds = pd.read_csv(out / "test_predictions.csv")
    texts = pd.read_csv(binary_csv)["text"].tolist()
    again = clintune.load(out).predict_proba([texts[r - 1] for r in preds["row"]])
    np.testing.assert_array_equal(again[:, 1].astype(np.float32), preds["prob_1"].to_numpy(np.float32))


def test_prediction_time_counts_the_encoder_when_the_test_entry_is_found(tiny_backbone, binary_csv, cache_dir):
    """A run that finds the test features still reports the saved model's prediction cost: the head's time
    plus the encoding time stored with the entry (here edited to 100 s so that it shows)."""
    kw = dict(method="frozen", head="linear", epochs=1)
    clintune.train(tiny_config(tiny_backbone, binary_csv, **kw))
    metas = [p / "meta.json" for p in cache_dir.iterdir()]
    assert all(json.loads(m.read_text())["encode_seconds"] > 0 for m in metas)
    for m in metas:
        meta = json.loads(m.read_text())
        m.write_text(json.dumps({**meta, "encode_seconds": 100.0}))
    again = clintune.train(tiny_config(tiny_backbone, binary_csv, **kw))
    assert again.record["cost"]["feature_cache"]["hits"] == {"data": True, "test": True}
    assert 100.0 <= again.record["cost"]["predict_seconds"] < 200.0          # added once, not per entry


def test_tokenizer_hash_ignores_the_truncation_left_by_the_last_call(tiny_backbone):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    fresh = cache_mod.tokenizer_sha256(tok)
    tok(["heart failure noted today"], truncation=True, max_length=4, padding="max_length")
    assert cache_mod.tokenizer_sha256(tok) == fresh
    other = AutoTokenizer.from_pretrained(tiny_backbone)
    other.add_tokens(["cardiomyopathy"])
    assert cache_mod.tokenizer_sha256(other) != fresh
