"""Statistics for comparing runs: seed aggregates, paired tests, composite efficiency, Pareto fronts.

* **Seed aggregates**: mean and sample standard deviation (ddof = 1) over the seeds of a configuration.
* **Paired bootstrap** (Efron & Tibshirani 1993; Koehn 2004; Berg-Kirkpatrick et al. 2012) of the
  difference in F1 between two systems on the *same* test examples: resample test examples with
  replacement B times, recompute delta = F1(B) - F1(A) on each resample. The 95% CI is the 2.5th and
  97.5th percentiles of the resampled deltas; the two-sided p-value of H0: delta = 0 uses the
  bootstrap distribution shifted to the null, p = (1 + #{|delta* - delta| >= |delta|}) / (B + 1).
  Over several seeds delta is the mean of the per-seed deltas, and the resampling follows the test
  examples: seeds with their own test split (strata) are resampled each on its own (stratified), while
  seeds that share one test set (a given test file) are resampled together: one draw of example indices
  serves all of them (a cluster bootstrap over examples), so k seeds on N shared examples count as N
  examples, not k N independent ones.
* **McNemar's exact test** on the discordant errors: b = examples A gets right and B wrong, c = the
  reverse; under H0 each discordant example is B's win with probability 1/2, so p is the two-sided
  exact binomial p-value of b in b + c trials (summed over distinct test sets: still Binomial(b + c, 1/2)
  under H0). Where several seeds share the test examples each example counts once: with r_A(i), r_B(i)
  the fractions of those seeds in which A and B get example i right, b = #{r_A(i) > r_B(i)} and
  c = #{r_A(i) < r_B(i)} (a sign test over examples; McNemar's test when there is one seed).
  "Right" is the label for single-label tasks, the whole label set for multi-label, all entities for NER.
* Every task's F1 (positive-class, macro, micro; entity-level for NER) and accuracy is a function of
  per-example true/false positive and false negative counts, so one bootstrap serves them all.
* **Holm's step-down adjustment** of the p-values of several comparisons against one baseline.
* **Composite efficiency** of Taylor et al. (arXiv 2402.10597; code nlpie-research/efficient-ml).
* **Pareto front** of quality (higher is better) against a cost (lower is better).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: Metrics the paired tests can compare, computed from predicted labels.
PAIRED_METRICS = ("f1", "f1_macro", "f1_micro", "accuracy")


# ----------------------------------------------------------------------------------------------
# aggregates
# ----------------------------------------------------------------------------------------------

def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample sd or None for fewer than 2 values, n) of the finite values."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None), int(len(v))


def minmax(x: Sequence[float]) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant column (max = min) maps to 0; NaN stays NaN."""
    a = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(a)
    out = np.full(a.shape, np.nan)
    if not ok.any():
        return out
    lo, hi = a[ok].min(), a[ok].max()
    out[ok] = 0.0 if hi == lo else (a[ok] - lo) / (hi - lo)
    return out


def composite_efficiency(time_to_best: Sequence[float], trainable_params: Sequence[float],
                         total_params: Sequence[float]) -> np.ndarray:
    """Taylor et al.'s composite efficiency of each run, in [0, 1] (1 = the most efficient compared).

    Each cost (time to the best validation score, trainable (PEFT) parameters, total parameters) is
    min-max normalised across the runs compared; a run's raw efficiency is the negated mean of its three
    normalised costs; the raw scores are min-max rescaled to [0, 1]. A cost that is equal for every run
    normalises to 0 (it does not separate runs); if every run has the same raw score, all get 1. Runs
    missing a cost get NaN and take no part in the normalisation.
    """
    X = np.column_stack([np.asarray(c, dtype=np.float64) for c in (time_to_best, trainable_params, total_params)])
    ok = np.isfinite(X).all(1)
    out = np.full(len(X), np.nan)
    if not ok.any():
        return out
    norm = np.column_stack([minmax(X[ok, j]) for j in range(3)])     # (n_ok, 3)
    raw = -norm.mean(1)
    lo, hi = raw.min(), raw.max()
    out[ok] = 1.0 if hi == lo else (raw - lo) / (hi - lo)
    return out


def pareto_front(cost: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """Boolean mask of the points no other point dominates (cost <= and quality >=, one strictly).

    Lower cost and higher quality are better; points with a NaN are never on the front; identical
    points do not dominate each other.
    """
    c = np.asarray(cost, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    ok = np.isfinite(c) & np.isfinite(q)
    front = np.zeros(len(c), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (c <= c[i]) & (q >= q[i]) & ((c < c[i]) | (q > q[i]))
        front[i] = not dominated.any()
    return front


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error over the comparisons given)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and np.isfinite(p)]
    out: list[float | None] = [None] * len(pvalues)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


# ----------------------------------------------------------------------------------------------
# paired tests
# ----------------------------------------------------------------------------------------------

@dataclass
class Counts:
    """Per-example statistics of one system on one test set, from which every F1 and accuracy follow.

    ``tp``/``fp``/``fn``: (N, C) true positives, false positives and false negatives of example i for
    class (label, entity type) c; ``correct``: (N,) whether example i is entirely right (its label; its
    label set; all its entities). A metric of any resample of the examples is a function of the summed
    rows, so resampling is one (B, N) x (N, 3C + 1) product.
    """

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    correct: np.ndarray

    def __len__(self) -> int:
        return len(self.correct)

    def matrix(self) -> np.ndarray:
        return np.hstack([self.tp, self.fp, self.fn, self.correct[:, None]]).astype(np.float64)


def encode_labels(*columns: Sequence, labels: Sequence | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Map label columns (ints or strings) to shared class indices; returns (arrays, class names)."""
    names = [str(x) for x in labels] if labels is not None else sorted({str(v) for col in columns for v in col})
    names = names + sorted({str(v) for col in columns for v in col} - set(names))
    index = {n: i for i, n in enumerate(names)}
    return [np.array([index[str(v)] for v in col], dtype=np.int64) for col in columns], names


def counts_single_label(y: Sequence[int], pred: Sequence[int], k: int) -> Counts:
    """Counts of single-label predictions (class indices 0..k-1)."""
    y, p = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    gold, hit = np.eye(k, dtype=np.int64)[y], np.eye(k, dtype=np.int64)[p]       # (N, k) one-hot
    return Counts(gold * hit, (1 - gold) * hit, gold * (1 - hit), (y == p).astype(np.int64))


def counts_sets(gold: Sequence[set], pred: Sequence[set], classes: Sequence) -> Counts:
    """Counts of set predictions: label sets (multi-label; class = label) or entity sets (NER; each item a
    (start, end, type) tuple, class = type; an entity counts only if its span and type are both right)."""
    index = {c: j for j, c in enumerate(classes)}
    n, k = len(gold), len(classes)
    tp, fp, fn = (np.zeros((n, k), dtype=np.int64) for _ in range(3))

    def cls(item):
        return index[item[-1] if isinstance(item, tuple) else item]

    for i, (g, p) in enumerate(zip(gold, pred)):
        for item in g & p:
            tp[i, cls(item)] += 1
        for item in p - g:
            fp[i, cls(item)] += 1
        for item in g - p:
            fn[i, cls(item)] += 1
    correct = np.array([g == p for g, p in zip(gold, pred)], dtype=np.int64)
    return Counts(tp, fp, fn, correct)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


def metric_of_sums(sums: np.ndarray, k: int, n: int, kind) -> np.ndarray:
    """Metric of summed count rows (B, 3k + 1): ``kind`` is ``"micro"`` (F1 of the pooled counts),
    ``"macro"`` (mean of the per-class F1 over the classes given or predicted in that row, as in
    :mod:`clintune.metrics`), ``"accuracy"`` (share of examples entirely right) or a class index (that class's
    F1, e.g. the positive class of a binary task)."""
    from ..metrics import macro

    tp, fp, fn, correct = sums[:, :k], sums[:, k:2 * k], sums[:, 2 * k:3 * k], sums[:, 3 * k]
    if kind == "accuracy":
        return correct / max(n, 1)
    if kind == "micro":
        return _f1(tp.sum(1), fp.sum(1), fn.sum(1))
    if kind == "macro":
        return macro(_f1(tp, fp, fn), tp + fp + fn)
    return _f1(tp[:, kind], fp[:, kind], fn[:, kind])


def _shared(strata: Sequence, shared: Sequence | None) -> list[list[int]]:
    """Indices of the strata grouped by test set: ``shared[i]`` names stratum i's set of examples (strata
    with equal names hold the same examples in the same order); ``None``: every stratum its own set."""
    keys = list(range(len(strata))) if shared is None else list(shared)
    if len(keys) != len(strata):
        raise ValueError("shared: one test-set name per stratum")
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        if len({len(strata[i][0]) for i in idx}) != 1:
            raise ValueError("strata that share a test set must have the same examples")
    return list(groups.values())


def paired_bootstrap_counts(strata: Sequence[tuple[Counts, Counts]], kind, *, n_boot: int = 5000, seed: int = 0,
                            alpha: float = 0.05, chunk: int = 500, shared: Sequence | None = None) -> dict:
    """Paired bootstrap of delta = metric(B) - metric(A), the mean over one or more strata (seeds).

    ``shared``: a name per stratum for its test set (e.g. its test split's sha256); strata with the same
    name share their examples, aligned row by row, and every resample draws ONE multiset of example
    indices for all of them: delta* = mean_s [metric(B_s on w) - metric(A_s on w)] with w ~ Multinomial(N,
    1/N), drawn once per test set. Without ``shared`` each stratum is its own test set, resampled on its own.
    Returns ``{"delta", "ci": [lo, hi], "p", "a", "b", "n", "n_boot"}`` (``a``/``b``: mean metrics;
    ``n``: distinct test examples, each shared test set counted once).
    """
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    deltas, a_obs, b_obs = [], [], []
    n_examples = 0
    for idx in _shared(strata, shared):
        n, k = len(strata[idx[0]][0]), strata[idx[0]][0].tp.shape[1]
        n_examples += n
        xs = []
        for i in idx:
            ca, cb = strata[i]
            xa, xb = ca.matrix(), cb.matrix()                                    # (N, 3k + 1)
            ma = float(metric_of_sums(xa.sum(0, keepdims=True), k, n, kind)[0])
            mb = float(metric_of_sums(xb.sum(0, keepdims=True), k, n, kind)[0])
            a_obs.append(ma), b_obs.append(mb), deltas.append(mb - ma)
            xs.append((xa, xb))
        for s in range(0, n_boot, chunk):
            e = min(n_boot, s + chunk)
            w = rng.multinomial(n, np.full(n, 1.0 / n), size=e - s).astype(np.float64)   # (b, N) resample counts
            for xa, xb in xs:                                                    # the same w for every seed
                boot[s:e] += metric_of_sums(w @ xb, k, n, kind) - metric_of_sums(w @ xa, k, n, kind)
    boot /= len(strata)
    delta = float(np.mean(deltas))
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    extreme = np.abs(boot - delta) >= abs(delta) - 1e-12
    p = (1 + int(extreme.sum())) / (n_boot + 1)
    return {"delta": delta, "ci": [float(lo), float(hi)], "p": float(min(1.0, p)), "a": float(np.mean(a_obs)),
            "b": float(np.mean(b_obs)), "n": int(n_examples), "n_boot": n_boot}


def single_label_kind(metric: str, k: int, positive: int | None):
    """How clintune defines ``metric`` for single-label predictions (see :mod:`clintune.metrics`)."""
    if metric in ("accuracy", "f1_micro"):
        return "accuracy"          # single-label micro F1 equals accuracy
    if metric == "f1_macro" or (metric == "f1" and k > 2):
        return "macro"
    if metric == "f1":
        return 1 if positive is None else positive
    raise ValueError(f"paired tests compare {', '.join(PAIRED_METRICS)}; not '{metric}'")


def paired_bootstrap(strata: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int, *, metric: str = "f1",
                     positive: int | None = None, **kw) -> dict:
    """Paired bootstrap for single-label predictions: ``strata`` of (gold, pred_a, pred_b) class indices."""
    kind = single_label_kind(metric, k, positive)
    return paired_bootstrap_counts([(counts_single_label(y, a, k), counts_single_label(y, b, k))
                                    for y, a, b in strata], kind, **kw)


def mcnemar_correct(strata: Sequence[tuple[np.ndarray, np.ndarray]], shared: Sequence | None = None) -> dict:
    """McNemar's exact test on which examples each system gets entirely right: ``{"b", "c", "p"}``.

    b: A right and B wrong; c: A wrong and B right, summed over distinct test sets. Strata that share a
    test set (equal ``shared`` names, examples aligned) count each example once: with r_A(i), r_B(i) the
    fractions of those strata where A and B get example i right, b = #{r_A(i) > r_B(i)}, c = #{r_A(i) <
    r_B(i)} (a sign test; McNemar's for one stratum). p: two-sided exact binomial test of b ~ Bin(b + c, 1/2).
    """
    from scipy.stats import binomtest

    b = c = 0
    for idx in _shared(strata, shared):
        ra = np.mean([np.asarray(strata[i][0], dtype=np.float64) for i in idx], axis=0)
        rb = np.mean([np.asarray(strata[i][1], dtype=np.float64) for i in idx], axis=0)
        b += int((ra > rb).sum())
        c += int((ra < rb).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "p": p}


def mcnemar(strata: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], shared: Sequence | None = None) -> dict:
    """McNemar's exact test for single-label predictions: ``strata`` of (gold, pred_a, pred_b)."""
    return mcnemar_correct([(np.asarray(a) == np.asarray(y), np.asarray(b) == np.asarray(y)) for y, a, b in strata],
                           shared)
