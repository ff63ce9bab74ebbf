"""Metrics against values computed by hand."""
import numpy as np
import pytest

from clintune.metrics import auroc, bootstrap_ci, classification_metrics


def probs_from(pred_pos_scores):
    s = np.asarray(pred_pos_scores, dtype=float)
    return np.stack([1 - s, s], axis=1)


def test_binary_metrics_by_hand():
    # gold: 1 1 1 0 0 0 0 0 ; scores -> predictions 1 1 0 1 0 0 0 0
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    s = [0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1, 0.05]
    m = classification_metrics(y, probs_from(s), positive_index=1)
    # tp=2 fp=1 fn=1 tn=4
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # AUROC: pairs (pos, neg) = 15; pos scores .9 .8 .4 vs neg .7 .3 .2 .1 .05 -> 5 + 5 + 4 = 14 wins
    assert m["auroc"] == pytest.approx(14 / 15)
    assert m["confusion_matrix"] == [[4, 1], [1, 2]]
    # macro F1: class 0 has p = 4/5, r = 4/5, f1 = 0.8; class 1 f1 = 2/3
    assert m["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_positive_label_flips_binary_metrics():
    y = np.array([1, 1, 0, 0])
    p = probs_from([0.9, 0.2, 0.1, 0.3])            # predicts 1 0 0 0
    m = classification_metrics(y, p, positive_index=0)
    # positive = class 0: tp = 2 (rows 3,4), fp = 1 (row 2), fn = 0
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0


def test_multiclass_macro_and_micro_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    proba = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = classification_metrics(y, proba)
    # class0: p=1/2 r=1/2 f=1/2 ; class1: p=2/3 r=1 f=0.8 ; class2: p=1 r=1/2 f=2/3
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3) == m["f1_macro"]
    assert m["f1_micro"] == pytest.approx(4 / 6) == m["accuracy"]


def test_macro_averages_skip_a_class_neither_given_nor_predicted():
    from sklearn.metrics import f1_score

    y = np.array([0, 0, 1, 1, 0, 1])                 # class 2 is in the label set but not in this test file
    m = classification_metrics(y, np.eye(3)[y])
    assert m["f1"] == m["precision"] == m["recall"] == 1.0 == m["f1_macro"]
    pred = np.array([0, 2, 1, 1, 0, 0])              # predicted once: now it counts, with F1 0
    m = classification_metrics(y, np.eye(3)[pred])
    # class 0: p 2/3 r 2/3 ; class 1: p 1 r 2/3 f 0.8 ; class 2: p 0 r 0
    assert m["f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3) == f1_score(y, pred, average="macro")
    assert m["precision"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_bootstrap_macro_counts_only_the_classes_each_resample_has():
    y = np.array([0] * 20 + [1] * 20 + [2])          # class 2 is missing from about a third of the resamples
    ci = bootstrap_ci(y, np.eye(3)[y], n_boot=300)
    assert ci["f1"] == [1.0, 1.0] and ci["precision_macro"] == [1.0, 1.0] and ci["recall_macro"] == [1.0, 1.0]


def test_multiclass_auroc_is_mean_of_one_vs_rest_and_skips_absent_classes():
    y = np.array([0, 1, 2, 0])
    proba = np.array([[.7, .2, .1], [.2, .6, .2], [.3, .3, .4], [.5, .4, .1]])
    from sklearn.metrics import roc_auc_score
    assert auroc(y, proba) == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    y2 = np.array([0, 1, 0, 1])                       # class 2 absent: averaged over 0 and 1 only
    a0 = roc_auc_score(y2 == 0, proba[:, 0]); a1 = roc_auc_score(y2 == 1, proba[:, 1])
    assert auroc(y2, proba) == pytest.approx((a0 + a1) / 2)


def test_bootstrap_ci_brackets_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = np.clip(y * 0.6 + rng.normal(0.2, 0.25, 400), 0, 1)
    p = probs_from(s)
    m = classification_metrics(y, p, 1)
    ci = bootstrap_ci(y, p, 1, n_boot=500, seed=1)
    for k in ("accuracy", "precision", "recall", "f1", "auroc"):
        lo, hi = ci[k]
        assert lo <= m[k] <= hi and hi - lo < 0.2
    small = bootstrap_ci(y[:50], p[:50], 1, n_boot=500, seed=1)
    assert small["f1"][1] - small["f1"][0] > ci["f1"][1] - ci["f1"][0]
    # the vectorised bootstrap AUROC agrees with sklearn on a resample
    from sklearn.metrics import roc_auc_score
    from clintune.metrics import _auroc_resampled
    idx = rng.integers(0, 400, (3, 400))
    got = _auroc_resampled(y, s, idx)
    assert got == pytest.approx([roc_auc_score(y[i], s[i]) for i in idx])
