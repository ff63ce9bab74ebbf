"""Statistics for comparing runs: seed aggregates, paired tests, composite efficiency, Pareto fronts.

* **Seed aggregates**: mean and sample standard deviation (ddof = 1) over the seeds of a configuration.
* **Paired bootstrap** (Efron & Tibshirani 1993; Koehn 2004; Berg-Kirkpatrick et al. 2012) of the
  difference in F1 between two systems on the *same* test examples: resample test examples with
  replacement B times, recompute delta = F1(B) - F1(A) on each resample. The 95% CI is the 2.5th and
  97.5th percentiles of the resampled deltas; the two-sided p-value of H0: delta = 0 uses the
  bootstrap distribution shifted to the null, p = (1 + #{|delta* - delta| >= |delta|}) / (B + 1).
  Across seeds (each seed its own test split) the resampling is stratified: each seed's test set is
  resampled on its own and delta is the mean of the per-seed deltas.
* **McNemar's exact test** on the discordant errors: b = examples A gets right and B wrong, c = the
  reverse; under H0 each discordant example is B's win with probability 1/2, so p is the two-sided
  exact binomial p-value of b in b + c trials (summed over seeds: still Binomial(b + c, 1/2) under H0).
* **Holm's step-down adjustment** of the p-values of several comparisons against one baseline.
* **Composite efficiency** of Taylor et al. (arXiv 2402.10597; code nlpie-research/efficient-ml).
* **Pareto front** of quality (higher is better) against a cost (lower is better).
"""
from __future__ import annotations

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

def _metric_rows(y: np.ndarray, p: np.ndarray, k: int, metric: str, positive: int | None) -> np.ndarray:
    """``metric`` of each row of (B, N) gold ``y`` and predicted ``p`` class indices; shape (B,).

    ``f1``: the positive class's F1 for binary tasks (``positive``), macro F1 otherwise (as in
    :mod:`clintune.metrics`); ``f1_macro``; ``f1_micro`` (= accuracy for single-label); ``accuracy``.
    """
    if metric in ("accuracy", "f1_micro"):
        return (y == p).mean(1)

    def f1_of(c: int) -> np.ndarray:
        tp = ((p == c) & (y == c)).sum(1).astype(np.float64)
        fp = ((p == c) & (y != c)).sum(1)
        fn = ((p != c) & (y == c)).sum(1)
        denom = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)

    if metric == "f1" and k == 2:
        return f1_of(1 if positive is None else positive)
    if metric in ("f1", "f1_macro"):
        return np.mean([f1_of(c) for c in range(k)], axis=0)
    raise ValueError(f"paired tests compare {', '.join(PAIRED_METRICS)}; not '{metric}'")


def encode_labels(*columns: Sequence, labels: Sequence | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Map label columns (ints or strings) to shared class indices; returns (arrays, class names)."""
    names = [str(x) for x in labels] if labels is not None else sorted({str(v) for col in columns for v in col})
    extra = sorted({str(v) for col in columns for v in col} - set(names))
    names = names + extra
    index = {n: i for i, n in enumerate(names)}
    return [np.array([index[str(v)] for v in col], dtype=np.int64) for col in columns], names


def paired_bootstrap(strata: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int, *, metric: str = "f1",
                     positive: int | None = None, n_boot: int = 5000, seed: int = 0, alpha: float = 0.05,
                     chunk: int = 500) -> dict:
    """Paired bootstrap of delta = metric(B) - metric(A) over one or more test sets (strata).

    ``strata``: (gold, pred_a, pred_b) class-index arrays, aligned example by example. Returns
    ``{"delta", "ci": [lo, hi], "p", "a", "b", "n", "n_boot"}`` where ``a``/``b`` are the mean metrics.
    """
    rng = np.random.default_rng(seed)
    deltas_obs, a_obs, b_obs = [], [], []
    boot = np.zeros(n_boot)
    for y, pa, pb in strata:
        y, pa, pb = (np.asarray(v, dtype=np.int64) for v in (y, pa, pb))
        ma = float(_metric_rows(y[None], pa[None], k, metric, positive)[0])
        mb = float(_metric_rows(y[None], pb[None], k, metric, positive)[0])
        a_obs.append(ma), b_obs.append(mb), deltas_obs.append(mb - ma)
        n = len(y)
        for s in range(0, n_boot, chunk):
            e = min(n_boot, s + chunk)
            idx = rng.integers(0, n, size=(e - s, n), dtype=np.int64)          # (b, N)
            yb = y[idx]
            boot[s:e] += (_metric_rows(yb, pb[idx], k, metric, positive)
                          - _metric_rows(yb, pa[idx], k, metric, positive))
    m = len(strata)
    boot /= m
    delta = float(np.mean(deltas_obs))
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    extreme = np.abs(boot - delta) >= abs(delta) - 1e-12
    p = (1 + int(extreme.sum())) / (n_boot + 1)
    return {"delta": delta, "ci": [float(lo), float(hi)], "p": float(min(1.0, p)), "a": float(np.mean(a_obs)),
            "b": float(np.mean(b_obs)), "n": int(sum(len(s[0]) for s in strata)), "n_boot": n_boot}


def mcnemar(strata: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """McNemar's exact test on discordant errors, summed over strata: ``{"b", "c", "p"}``.

    b: A right and B wrong; c: A wrong and B right. p: two-sided exact binomial test of b ~ Bin(b + c, 1/2).
    """
    from scipy.stats import binomtest

    b = c = 0
    for y, pa, pb in strata:
        ra, rb = np.asarray(pa) == np.asarray(y), np.asarray(pb) == np.asarray(y)
        b += int((ra & ~rb).sum())
        c += int((~ra & rb).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "p": p}
