"""The classical baseline every clinical NLP reviewer asks for: TF-IDF n-grams + logistic regression.

    x = [ tfidf_word(note) ; tfidf_char(note) ]        word 1..``tfidf_word_ngrams``-grams and
                                                       character 2..5-grams within word boundaries,
                                                       sublinear tf (1 + log tf), l2-normalised, terms
                                                       kept if in >= ``tfidf_min_df`` training notes
    p(y | x) = softmax(W x + b)   (sigmoid for two classes), class-weighted ("balanced") L2 logistic
                                  regression with inverse regularisation strength C = ``tfidf_c``

All scikit-learn. Saved without pickle: the vocabularies as JSON, idf weights and the regression's
coefficients as safetensors, so a model directory can be loaded from an untrusted source safely.
The vocabulary is made of words and character n-grams of the training notes (terms seen in at least
``tfidf_min_df`` notes), so a TF-IDF model directory is as private as the notes themselves.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from .data import LabelMap

_SHARED = dict(sublinear_tf=True, lowercase=True, dtype=np.float64)


def _vectorizers(cfg, vocab_word=None, vocab_char=None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    word = TfidfVectorizer(analyzer="word", ngram_range=(1, cfg.tfidf_word_ngrams), min_df=cfg.tfidf_min_df,
                           token_pattern=r"(?u)\b\w+\b", vocabulary=vocab_word, **_SHARED)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=cfg.tfidf_min_df,
                           vocabulary=vocab_char, **_SHARED)
    return word, char


class TfidfModel:
    """Fitted vectorizers + logistic regression; ``predict_proba`` columns follow the label indices."""

    def __init__(self, word, char, clf, num_labels: int) -> None:
        self.word, self.char, self.clf, self.num_labels = word, char, clf, num_labels

    @classmethod
    def fit(cls, texts: Sequence[str], y: np.ndarray, cfg, num_labels: int) -> "TfidfModel":
        from sklearn.linear_model import LogisticRegression

        word, char = _vectorizers(cfg)
        x = sp.hstack([word.fit_transform(texts), char.fit_transform(texts)]).tocsr()
        clf = LogisticRegression(C=cfg.tfidf_c, class_weight="balanced", max_iter=2000, random_state=cfg.seed)
        clf.fit(x, y)
        return cls(word, char, clf, num_labels)

    def features(self, texts: Sequence[str]):
        return sp.hstack([self.word.transform(texts), self.char.transform(texts)]).tocsr()

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        p = self.clf.predict_proba(self.features(list(texts)))
        out = np.zeros((len(texts), self.num_labels), dtype=np.float64)
        out[:, self.clf.classes_.astype(int)] = p
        return out

    @property
    def n_features(self) -> int:
        return len(self.word.vocabulary_) + len(self.char.vocabulary_)

    def parameter_counts(self) -> tuple[int, int]:
        """(trained regression weights, all fitted numbers incl. idf weights)."""
        trained = int(self.clf.coef_.size + self.clf.intercept_.size)
        return trained, trained + self.n_features

    # ------------------------------------------------------------------ saving without pickle
    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        def ordered(vocab: dict) -> list[str]:
            terms = [""] * len(vocab)
            for term, i in vocab.items():
                terms[i] = term
            return terms

        (directory / "tfidf.json").write_text(json.dumps({
            "format": 1, "word_vocabulary": ordered(self.word.vocabulary_),
            "char_vocabulary": ordered(self.char.vocabulary_),
            "classes": self.clf.classes_.astype(int).tolist(), "num_labels": self.num_labels},
            ensure_ascii=False), encoding="utf-8")
        save_file({"word_idf": np.ascontiguousarray(self.word.idf_), "char_idf": np.ascontiguousarray(self.char.idf_),
                   "coef": np.ascontiguousarray(self.clf.coef_), "intercept": np.ascontiguousarray(self.clf.intercept_)},
                  str(directory / "tfidf.safetensors"))

    @classmethod
    def load(cls, directory: Path, cfg) -> "TfidfModel":
        from safetensors.numpy import load_file
        from sklearn.linear_model import LogisticRegression

        meta = json.loads((directory / "tfidf.json").read_text(encoding="utf-8"))
        arrays = load_file(str(directory / "tfidf.safetensors"))
        word, char = _vectorizers(cfg, {t: i for i, t in enumerate(meta["word_vocabulary"])},
                                  {t: i for i, t in enumerate(meta["char_vocabulary"])})
        word.idf_, char.idf_ = arrays["word_idf"], arrays["char_idf"]
        clf = LogisticRegression(C=cfg.tfidf_c, class_weight="balanced")
        clf.coef_, clf.intercept_ = arrays["coef"], arrays["intercept"]
        clf.classes_ = np.asarray(meta["classes"])
        clf.n_features_in_ = clf.coef_.shape[1]
        return cls(word, char, clf, meta["num_labels"])


class TfidfClassifier:
    """Same interface as :class:`clintune.modeling.Classifier`, for a :class:`TfidfModel`."""

    def __init__(self, model: TfidfModel, label_map: LabelMap, config) -> None:
        from .runtime import resolve_runtime

        self.model, self.label_map, self.config = model, label_map, config
        self.runtime = resolve_runtime("cpu", "fp32")

    @property
    def labels(self) -> list:
        return list(self.label_map.labels)

    def predict_proba(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        return self.model.predict_proba(texts)

    def predict(self, texts: Sequence[str], batch_size: int | None = None) -> list:
        return self.label_map.decode(self.predict_proba(texts).argmax(1))
