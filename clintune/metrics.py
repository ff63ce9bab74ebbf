"""Quality metrics with bootstrap confidence intervals.

Binary tasks (K = 2): precision, recall and F1 of the positive class; AUROC of its probability.
Multi-class (K > 2): ``precision``/``recall``/``f1`` are macro averages (each class weighs the same,
as rare diagnoses matter), with ``f1_micro`` (= accuracy for single-label) and ``f1_macro`` beside;
AUROC is the macro one-vs-rest mean over the classes present in the gold labels. A macro average runs over
the classes that occur in the gold labels or the predictions (scikit-learn's convention when no label list is
given): a class absent from a test file and never predicted has no precision, recall or F1, and counting it
as 0 would mark a perfect model down. The same holds in each bootstrap resample.

Confidence intervals are percentile bootstrap intervals (Efron & Tibshirani 1993): resample the
test set with replacement B times (default 1000, fixed seed), recompute each metric, take the 2.5th
and 97.5th percentiles. AUROC uses the rank (Mann-Whitney) form, vectorised over resamples.
"""
from __future__ import annotations

import numpy as np

# scikit-learn is imported where a metric is computed, not with this module: a training process imports this
# before it trains and needs it only after, and scikit-learn with SciPy adds some 40 MB to the training's peak
# resident memory on top of torch, transformers and pandas (issue 7's memory budget).


def _auroc_binary(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, score))


def auroc(y_true: np.ndarray, proba: np.ndarray, positive_index: int | None = None) -> float | None:
    """Binary AUROC of the positive class, or macro one-vs-rest AUROC over classes present."""
    k = proba.shape[1]
    if k == 2:
        pos = 1 if positive_index is None else positive_index
        return _auroc_binary((y_true == pos).astype(int), proba[:, pos])
    vals = [_auroc_binary((y_true == c).astype(int), proba[:, c]) for c in range(k)]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def macro(values: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Mean of per-class ``values`` (..., K) over the classes whose ``support`` (..., K; gold plus predicted
    count, tp + fp + fn) is positive; 0 where no class has any."""
    w = np.asarray(support) > 0
    n = w.sum(-1)
    return np.where(n > 0, (np.asarray(values) * w).sum(-1) / np.maximum(n, 1), 0.0)


def nanmean_classes(values: list[np.ndarray]) -> np.ndarray:
    """Per-resample mean of per-class values (each (B,)), leaving NaN out: NaN where all are NaN (no warning)."""
    v = np.stack(values)
    n = (~np.isnan(v)).sum(0)
    return np.where(n > 0, np.nansum(v, 0) / np.maximum(n, 1), np.nan)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, positive_index: int | None = None,
                           labels: list | None = None) -> dict:
    """All single-label metrics from gold indices (N,) and probabilities (N, K)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    k = proba.shape[1]
    pred = proba.argmax(1)
    classes = list(range(k))
    out: dict = {"n": int(len(y_true)), "accuracy": float(accuracy_score(y_true, pred))}
    pc, rc, fc, _ = precision_recall_fscore_support(y_true, pred, labels=classes, average=None, zero_division=0)
    seen = np.bincount(y_true, minlength=k) + np.bincount(pred, minlength=k)
    pm, rm, fm = (macro(v, seen) for v in (pc, rc, fc))
    out.update(precision_macro=float(pm), recall_macro=float(rm), f1_macro=float(fm),
               f1_micro=float(f1_score(y_true, pred, labels=classes, average="micro", zero_division=0)))
    if k == 2:
        pos = 1 if positive_index is None else positive_index
        p, r, f, _ = precision_recall_fscore_support(y_true, pred, labels=[pos], average=None, zero_division=0)
        out.update(precision=float(p[0]), recall=float(r[0]), f1=float(f[0]))
    else:
        out.update(precision=float(pm), recall=float(rm), f1=float(fm))
    out["auroc"] = auroc(y_true, proba, positive_index)
    out["confusion_matrix"] = confusion_matrix(y_true, pred, labels=classes).tolist()
    if labels is not None:
        out["labels"] = [str(l) for l in labels]
    return out


def _auroc_resampled(y: np.ndarray, score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUROC for each row of bootstrap indices ``idx`` (B, N); NaN where a resample has one class."""
    from scipy.stats import rankdata  # imported here: scipy.stats costs 0.6 s at start-up

    ys, ss = y[idx], score[idx]                                    # (B, N)
    ranks = rankdata(ss, axis=1)                                   # average ranks handle ties
    n_pos = ys.sum(1).astype(np.float64)
    n_neg = ys.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (ranks * ys).sum(1) - n_pos * (n_pos + 1) / 2
        return u / (n_pos * n_neg)


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, positive_index: int | None = None,
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, list[float]]:
    """Percentile bootstrap CIs for accuracy, precision, recall, f1 (and macro/micro), auroc."""
    y = np.asarray(y_true)
    n, k = proba.shape
    if n == 0 or n_boot <= 0:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    pred = proba.argmax(1)
    yb, pb = y[idx], pred[idx]                                     # (B, N)
    res: dict[str, np.ndarray] = {"accuracy": (yb == pb).mean(1)}

    def prf(c):
        tp = ((pb == c) & (yb == c)).sum(1).astype(np.float64)
        fp = ((pb == c) & (yb != c)).sum(1)
        fn = ((pb != c) & (yb == c)).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            r = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
            f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        return p, r, f, tp + fp + fn

    per = [prf(c) for c in range(k)]
    seen = np.stack([s for *_, s in per], axis=1)                  # (B, K): the classes each resample has
    res["precision_macro"] = macro(np.stack([p for p, *_ in per], axis=1), seen)
    res["recall_macro"] = macro(np.stack([r for _, r, *_ in per], axis=1), seen)
    res["f1_macro"] = macro(np.stack([f for _, _, f, _ in per], axis=1), seen)
    res["f1_micro"] = res["accuracy"]
    if k == 2:
        pos = 1 if positive_index is None else positive_index
        res["precision"], res["recall"], res["f1"] = per[pos][:3]
        res["auroc"] = _auroc_resampled((y == pos).astype(np.int64), proba[:, pos], idx)
    else:
        res["precision"], res["recall"], res["f1"] = res["precision_macro"], res["recall_macro"], res["f1_macro"]
        aucs = [_auroc_resampled((y == c).astype(np.int64), proba[:, c], idx) for c in range(k)
                if 0 < (y == c).sum() < n]
        if aucs:
            res["auroc"] = nanmean_classes(aucs)
    out = {}
    for name, vals in res.items():
        vals = vals[~np.isnan(vals)]
        if len(vals):
            lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
            out[name] = [float(lo), float(hi)]
    return out
