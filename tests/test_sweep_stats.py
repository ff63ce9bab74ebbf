"""Statistics against hand-computed values: composite efficiency, Pareto fronts, McNemar, paired bootstrap, Holm."""
import math

import numpy as np
import pytest

from clintune.sweep import stats

nan = float("nan")


def test_composite_efficiency_hand_computed():
    # time to best [10, 20, 30] -> [0, .5, 1]; trainable [100, 1000, 100] -> [0, 1, 0];
    # total [1e6, 1e6, 2e6] -> [0, 0, 1]; negated means [0, -1/2, -2/3]; rescaled -> [1, 1/4, 0]
    e = stats.composite_efficiency([10, 20, 30], [100, 1000, 100], [1e6, 1e6, 2e6])
    assert e == pytest.approx([1.0, 0.25, 0.0])


def test_composite_efficiency_constant_column_and_ties():
    # trainable params equal for all runs: that column normalises to 0 and separates nothing.
    # time [1, 3, 2] -> [0, 1, .5]; total [10, 20, 40] -> [0, 1/3, 1];
    # negated means [0, -4/9, -1/2]; rescaled by (x + 1/2) / (1/2) -> [1, 1/9, 0]
    e = stats.composite_efficiency([1, 3, 2], [7, 7, 7], [10, 20, 40])
    assert e == pytest.approx([1.0, 1 / 9, 0.0])
    # every run equally costly: all equally efficient
    assert stats.composite_efficiency([5, 5], [1, 1], [2, 2]) == pytest.approx([1.0, 1.0])
    # a single run compared with itself
    assert stats.composite_efficiency([3.0], [10], [100]) == pytest.approx([1.0])


def test_composite_efficiency_missing_cost_is_left_out():
    e = stats.composite_efficiency([10, nan, 30, 20], [100, 5, 100, 1000], [1e6, 1e6, 2e6, 1e6])
    assert math.isnan(e[1])
    # the other three are normalised among themselves, exactly as without the incomplete run
    assert [e[0], e[3], e[2]] == pytest.approx([1.0, 0.25, 0.0])


def test_minmax():
    assert stats.minmax([2, 4, 6]) == pytest.approx([0, 0.5, 1])
    assert stats.minmax([3, 3]) == pytest.approx([0, 0])


def test_pareto_front_hand_made():
    #          A    B    C    D(=B) E    F(no cost)
    cost = [1.0, 2.0, 3.0, 2.0, 0.5, nan]
    f1 = [0.5, 0.7, 0.6, 0.7, 0.4, 0.9]
    assert stats.pareto_front(cost, f1).tolist() == [True, True, False, True, True, False]
    # a point better in both dominates everything
    assert stats.pareto_front([1, 2, 3], [0.9, 0.8, 0.7]).tolist() == [True, False, False]
    # equal quality at higher cost is dominated
    assert stats.pareto_front([1, 2], [0.8, 0.8]).tolist() == [True, False]


def _systems(n_right_a: int, n_extra_b: int, n: int = 100, n_wrong_b: int = 0):
    """Binary gold; A right on the first n_right_a; B right on those minus n_wrong_b plus n_extra_b more."""
    y = np.array([i % 2 for i in range(n)])
    a = 1 - y.copy()
    a[:n_right_a] = y[:n_right_a]
    b = a.copy()
    b[n_right_a:n_right_a + n_extra_b] = y[n_right_a:n_right_a + n_extra_b]
    b[:n_wrong_b] = 1 - y[:n_wrong_b]
    return y, a, b


def test_mcnemar_hand_computed():
    y, a, _ = _systems(60, 0)
    assert stats.mcnemar([(y, a, a)]) == {"b": 0, "c": 0, "p": 1.0}
    y, a, b = _systems(60, 30)                     # B fixes 30 of A's errors, breaks none
    r = stats.mcnemar([(y, a, b)])
    assert (r["b"], r["c"]) == (0, 30)
    assert r["p"] == pytest.approx(2 * 0.5 ** 30)
    y, a, b = _systems(60, 10, n_wrong_b=3)        # b = 3, c = 10: p = 2 P(X <= 3), X ~ Bin(13, 1/2)
    r = stats.mcnemar([(y, a, b)])
    assert (r["b"], r["c"]) == (3, 10)
    assert r["p"] == pytest.approx(2 * (1 + 13 + 78 + 286) / 2 ** 13)
    # summed over strata
    r2 = stats.mcnemar([(y, a, b), (y, a, b)])
    assert (r2["b"], r2["c"]) == (6, 20)


def _f1(y, p):
    tp = int(((p == 1) & (y == 1)).sum())
    fp = int(((p == 1) & (y == 0)).sum())
    fn = int(((p == 0) & (y == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn)


def test_paired_bootstrap_identical_predictions_p_is_one():
    y, a, _ = _systems(70, 0)
    r = stats.paired_bootstrap([(y, a, a)], 2, metric="f1", n_boot=500)
    assert r["delta"] == 0 and r["ci"] == [0.0, 0.0] and r["p"] == 1.0


def test_paired_bootstrap_clearly_better_system():
    y, a, b = _systems(60, 30, n=200)
    r = stats.paired_bootstrap([(y, a, b)], 2, metric="f1", positive=1, n_boot=2000, seed=1)
    assert r["delta"] == pytest.approx(_f1(y, b) - _f1(y, a))
    assert r["a"] == pytest.approx(_f1(y, a)) and r["b"] == pytest.approx(_f1(y, b))
    assert r["ci"][0] > 0 and r["ci"][0] < r["delta"] < r["ci"][1]
    assert r["p"] < 0.01
    # the reverse comparison: same size, opposite sign, same p
    rev = stats.paired_bootstrap([(y, b, a)], 2, metric="f1", positive=1, n_boot=2000, seed=1)
    assert rev["delta"] == pytest.approx(-r["delta"]) and rev["p"] < 0.01


def test_paired_bootstrap_small_difference_is_not_significant():
    y, a, b = _systems(60, 2, n=200, n_wrong_b=1)
    r = stats.paired_bootstrap([(y, a, b)], 2, metric="accuracy", n_boot=2000)
    assert r["delta"] == pytest.approx(0.005)
    assert r["p"] > 0.3 and r["ci"][0] < 0 < r["ci"][1]


def test_paired_bootstrap_stratified_over_seeds():
    y1, a1, b1 = _systems(60, 30)
    y2, a2, b2 = _systems(60, 10)
    r = stats.paired_bootstrap([(y1, a1, b1), (y2, a2, b2)], 2, metric="accuracy", n_boot=1000)
    assert r["delta"] == pytest.approx((0.30 + 0.10) / 2)
    assert r["n"] == 200


def test_macro_f1_for_multiclass():
    from sklearn.metrics import f1_score

    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.array([0, 1, 1, 0, 2, 2])
    r = stats.paired_bootstrap([(y, p, p)], 3, metric="f1", n_boot=100)
    assert r["a"] == pytest.approx(f1_score(y, p, average="macro"))        # clintune's multi-class F1: macro
    y3, p3 = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])              # class 2 neither given nor predicted
    r = stats.paired_bootstrap([(y3, p3, y3)], 3, metric="f1", n_boot=100)
    assert (r["a"], r["b"]) == pytest.approx((f1_score(y3, p3, average="macro"), 1.0))
    r = stats.paired_bootstrap([(y, p, y)], 3, metric="f1_micro", n_boot=100)
    assert (r["a"], r["b"]) == pytest.approx((4 / 6, 1.0))                  # single-label micro F1 = accuracy


def test_set_counts_multilabel_and_entities_hand_computed():
    # multi-label: gold {a,b} {b} {} ; predicted {a} {b,c} {c}
    gold = [frozenset("ab"), frozenset("b"), frozenset()]
    pred = [frozenset("a"), frozenset("bc"), frozenset("c")]
    c = stats.counts_sets(gold, pred, ["a", "b", "c"])
    assert c.tp.sum() == 2 and c.fp.sum() == 2 and c.fn.sum() == 1 and c.correct.tolist() == [0, 0, 0]
    sums = c.matrix().sum(0, keepdims=True)
    assert stats.metric_of_sums(sums, 3, 3, "micro")[0] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # per label F1: a = 2/(2+0+0)... a: tp1 fn0 fp0 -> 1; b: tp1 fn1 -> 2/3; c: fp2 -> 0
    assert stats.metric_of_sums(sums, 3, 3, "macro")[0] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # NER: an entity counts only with the right span and type
    g = [frozenset({(0, 5, "DRUG"), (10, 14, "DOSE")}), frozenset({(3, 8, "DRUG")})]
    p = [frozenset({(0, 5, "DRUG"), (10, 13, "DOSE")}), frozenset({(3, 8, "DRUG")})]
    c = stats.counts_sets(g, p, ["DOSE", "DRUG"])
    assert (c.tp.sum(), c.fp.sum(), c.fn.sum()) == (2, 1, 1) and c.correct.tolist() == [0, 1]
    r = stats.paired_bootstrap_counts([(c, c)], "micro", n_boot=100)
    assert r["a"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1)) and r["p"] == 1.0


def test_holm_and_mean_sd():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, None]) == [0.5, None]
    m, s, n = stats.mean_sd([1.0, 2.0, 3.0, None])
    assert (m, n) == (2.0, 3) and s == pytest.approx(1.0)
    assert stats.mean_sd([4.0]) == (4.0, None, 1)
    assert stats.mean_sd([]) == (None, None, 0)


def test_seeds_sharing_a_test_set_are_resampled_together():
    """k seeds on one test set are N examples, not k N: with identical seeds the shared bootstrap is exactly the
    one-seed bootstrap (every resample's mean of k equal deltas is that delta); pooling them as independent
    test sets would shrink the p-value."""
    y, a, b = _systems(60, 4, n=100, n_wrong_b=1)
    one = stats.paired_bootstrap([(y, a, b)], 2, metric="accuracy", n_boot=2000)
    shared = stats.paired_bootstrap([(y, a, b)] * 3, 2, metric="accuracy", n_boot=2000, shared=["t"] * 3)
    assert (shared["delta"], shared["ci"], shared["p"], shared["n"]) == (one["delta"], one["ci"], one["p"], 100)
    pooled = stats.paired_bootstrap([(y, a, b)] * 3, 2, metric="accuracy", n_boot=2000)   # as distinct test sets
    assert pooled["n"] == 300 and pooled["p"] < one["p"]
    # two different seeds on one test set: delta is the mean of their deltas (0.03 and 0.01)
    y2, a2, b2 = _systems(60, 1, n=100)
    r = stats.paired_bootstrap([(y, a, b), (y2, a2, b2)], 2, metric="accuracy", n_boot=200, shared=["t", "t"])
    assert r["delta"] == pytest.approx((0.03 + 0.01) / 2) and r["n"] == 100
    with pytest.raises(ValueError, match="same examples"):
        stats.paired_bootstrap([(y, a, b), (y[:50], a[:50], b[:50])], 2, n_boot=10, shared=["t", "t"])


def test_mcnemar_counts_each_shared_example_once():
    # six examples, two seeds on the same test set; 1 = right
    a1, b1 = [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 1]
    a2, b2 = [1, 0, 0, 0, 1, 1], [1, 1, 1, 0, 0, 1]
    strata = [(np.array(a1, bool), np.array(b1, bool)), (np.array(a2, bool), np.array(b2, bool))]
    # distinct test sets: seed 1 b = 1 (ex 0), c = 2 (ex 2, 5); seed 2 b = 1 (ex 4), c = 2 (ex 1, 2)
    assert stats.mcnemar_correct(strata) == {"b": 2, "c": 4, "p": pytest.approx(2 * (1 + 6 + 15) / 64)}
    # shared: r_A = [1, .5, 0, 0, 1, .5], r_B = [.5, 1, 1, 0, .5, 1]: A ahead on ex 0, 4; B on ex 1, 2, 5
    r = stats.mcnemar_correct(strata, shared=["t", "t"])
    assert (r["b"], r["c"]) == (2, 3) and r["p"] == 1.0         # 2 P(X <= 2), X ~ Bin(5, 1/2) = 2 * 16/32
    # one seed repeated: the same as the seed alone
    y, a, b = _systems(60, 10, n_wrong_b=3)
    assert stats.mcnemar([(y, a, b)] * 3, shared=[0, 0, 0]) == stats.mcnemar([(y, a, b)])
