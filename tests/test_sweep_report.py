"""The report from a hand-made runs.db: paired tests align predictions on `row`, every plot is embedded, the
composite efficiency and the Pareto fronts match the hand computation."""
import json
import re

import numpy as np
import pandas as pd
import pytest

from clintune.errors import ConfigError
from clintune.metrics import bootstrap_ci, classification_metrics
from clintune.sweep import stats
from clintune.sweep.report import analyse, build_report
from clintune.sweep.spec import Point, run_id
from clintune.sweep.store import RunStore, predictions_to_bytes

N = 200
GOLD = np.array([i % 2 for i in range(N)])


def predictions(accuracy: float, seed: int) -> np.ndarray:
    """Predictions right on the first accuracy*N examples of a seed-specific order."""
    order = np.random.default_rng(seed).permutation(N)
    pred = 1 - GOLD
    pred[order[: int(accuracy * N)]] = GOLD[order[: int(accuracy * N)]]
    return pred


def add_run(store, *, method, frac, seed, r, pred, shuffle, cost):
    cfg = {"data": "notes.csv", "backbone": "tiny", "method": method, "head": "linear", "train_fraction": frac,
           "lora_r": r, "seed": seed, "lr": None}
    p = Point(run_id(cfg), cfg, "")
    store.register([p])
    store.start(p.id, "1@host")
    proba = np.zeros((N, 2))
    proba[np.arange(N), pred] = 0.8
    proba[np.arange(N), 1 - pred] = 0.2
    metrics = classification_metrics(GOLD, proba, 1, [0, 1])
    rows = np.arange(1, N + 1) + 1000 * seed                      # 1-based rows of the data file
    df = pd.DataFrame({"row": rows, "gold": GOLD, "predicted_label": pred, "prob_0": proba[:, 0],
                       "prob_1": proba[:, 1]})
    if shuffle:
        df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    rec = {"config": cfg, "status": "success", "metrics": metrics, "metrics_ci": bootstrap_ci(GOLD, proba, 1),
           "cost": cost, "data": {"test_split_sha256": f"split-{seed}", "n_test": N, "n_train": int(1000 * frac)},
           "training": {"best_val_score": metrics["f1"]},
           "env": {"python": "3.11", "packages": {"torch": "2.x"}, "threads": 2, "device": "cpu"}}
    store.finish(p.id, rec, predictions_to_bytes(df), N)
    return p.id


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with RunStore(out / "runs.db") as s:
        s.set_meta("name", "handmade")
        for seed in (1, 2):
            base = predictions(0.70, seed)
            cheap = dict(time_to_best_s=10.0, train_seconds=12.0, trainable_params=100, total_params=1000,
                         peak_rss_mb=500.0, train_samples_per_s=50.0)
            # C1 baseline; C2 the same predictions in another row order (paired on `row`: no difference)
            add_run(s, method="frozen", frac=0.25, seed=seed, r=8, pred=base, shuffle=False, cost=cheap)
            add_run(s, method="frozen", frac=0.5, seed=seed, r=8, pred=base, shuffle=True,
                    cost={**cheap, "time_to_best_s": 20.0, "train_seconds": 22.0})
            # C3, C4: LoRA, clearly better and costlier
            for r, t in ((4, 30.0), (16, 40.0)):
                add_run(s, method="lora", frac=0.5, seed=seed, r=r, pred=predictions(0.95, seed + 10),
                        shuffle=True, cost=dict(time_to_best_s=t, train_seconds=t + 5, trainable_params=10 * r,
                                                total_params=2000, peak_rss_mb=900.0, train_samples_per_s=10.0))
        p = Point(run_id({"x": 1}), {"backbone": "missing", "method": "lora", "seed": 1}, "")
        s.register([p])
        s.start(p.id, "w")
        s.finish(p.id, {"config": p.config, "status": "failed", "error": "BackboneError: not here"})
    return out


def test_paired_comparisons_align_rows(sweep):
    a, store = analyse(sweep, n_boot=2000)
    store.close()
    assert list(a.groups["cid"]) == ["C1", "C2", "C3", "C4"]
    by = {c["group"]["cid"]: c for c in a.comparisons}
    assert by["C2"]["pairs"] == 2
    assert by["C2"]["boot"]["delta"] == 0 and by["C2"]["boot"]["p"] == 1.0    # same predictions, shuffled rows
    assert by["C2"]["mcnemar"] == {"b": 0, "c": 0, "p": 1.0}
    for cid in ("C3", "C4"):
        b = by[cid]["boot"]
        assert b["delta"] > 0.2 and b["ci"][0] > 0 and b["p"] < 0.01 and by[cid]["mcnemar"]["p"] < 1e-6
        assert by[cid]["p_holm"] >= b["p"]


def test_efficiency_and_fronts_match_hand_computation(sweep):
    a, store = analyse(sweep, n_boot=200)
    store.close()
    f = a.frame.sort_values("seq")
    expected = stats.composite_efficiency([10, 20, 30, 40] * 2, [100, 100, 40, 160] * 2, [1000, 1000, 2000, 2000] * 2)
    assert f["efficiency"].to_numpy() == pytest.approx(expected)
    # by hand: time [10,20,30,40] -> [0,1/3,2/3,1]; trainable [100,100,40,160] -> [.5,.5,0,1];
    # total -> [0,0,1,1]; negated means [-1/6,-5/18,-5/9,-1]; rescaled to [0, 1]:
    assert expected[:4] == pytest.approx([1.0, 13 / 15, 8 / 15, 0.0])
    fronts = {col: list(a.groups.loc[m, "cid"]) for col, m in
              {c: stats.pareto_front(a.groups[c], a.groups["primary"]) for c in ("train_s", "peak_rss_mb",
                                                                                 "trainable")}.items()}
    assert fronts["train_s"] == ["C1", "C3"]           # C2: same F1 as C1, slower; C4: same F1 as C3, slower
    assert fronts["trainable"] == ["C3"]               # 40 LoRA parameters beat 100 head parameters at higher F1
    assert fronts["peak_rss_mb"] == ["C1", "C2", "C3", "C4"]   # equal points do not dominate each other


def test_report_has_every_plot_and_table(sweep):
    res = build_report(sweep, n_boot=500)
    assert set(res["plots"]) == {"f1_vs_time", "f1_vs_memory", "f1_vs_params", "efficiency", "learning_curves",
                                 "lora_rank"}
    assert res["skipped"] == []
    page = res["html"].read_text()
    assert page.count('src="data:image/png;base64,') == 6
    row_c2 = re.search(r"<tr><td class=\"t\">C2</td>.*?</tr>", page[page.index('id="comparisons"'):]).group(0)
    assert "+0.0000" in row_c2 and "1.000" in row_c2
    assert "Different from the baseline C1 after Holm adjustment (p &lt; 0.05): C3" in page
    assert "adjusted for the 3 comparisons with paired runs" in page
    assert "each seed&#x27;s test split is resampled on its own" in page
    assert "BackboneError: not here" in page
    md = res["md"].read_text()
    assert md.count("](report_files/") == 6
    for name in res["plots"]:
        assert (sweep / "report_files" / f"{name}.png").stat().st_size > 1000


def test_report_baseline_choice(sweep):
    a, store = analyse(sweep, baseline="C3", n_boot=200)
    store.close()
    assert a.groups.loc[a.groups["group"] == a.baseline, "cid"].item() == "C3"
    a2, store = analyse(sweep, baseline=a.frame.sort_values("seq")["id"].iloc[2][:8], n_boot=200)
    store.close()
    assert a2.baseline == a.baseline                    # a run id prefix selects its configuration


@pytest.mark.parametrize("task", ["multilabel", "ner"])
def test_label_set_and_entity_predictions_are_paired_too(tmp_path, task):
    """Multi-label runs (label sets) and NER runs (entity spans) are compared on micro F1 like the records."""
    import json

    if task == "multilabel":
        gold = ["a|b", "b", "c", "a"] * 25
        preds = {"x": ["a", "b", "c", "a|c"] * 25, "y": ["a|b", "b", "c", "a"] * 25}
        col = "predicted_labels"
    else:
        e = lambda *spans: json.dumps([{"start": s, "end": t, "label": lab} for s, t, lab in spans])  # noqa: E731
        gold = [e((0, 4, "DRUG"), (6, 9, "DOSE")), e((2, 5, "DRUG"))] * 50
        preds = {"x": [e((0, 4, "DRUG")), e((2, 6, "DRUG"))] * 50, "y": gold}
        col = "entities"
    out = tmp_path / "s"
    with RunStore(out / "runs.db") as s:
        for name, seed in (("x", 1), ("y", 2)):
            cfg = {"data": "d", "task": task, "method": "frozen" if name == "x" else "lora", "seed": 1,
                   "label_sep": ";"}   # the data's separator; stored label sets are joined with "|" regardless
            p = Point(run_id(cfg), cfg, "")
            s.register([p])
            s.start(p.id, "w")
            df = pd.DataFrame({"row": np.arange(1, 101), "gold": gold, col: preds[name]})
            s.finish(p.id, {"config": cfg, "status": "success", "metrics": {"f1": 0.5}, "cost": {},
                            "data": {"test_split_sha256": "same"}}, predictions_to_bytes(df), 100)
    a, store = analyse(out, n_boot=1000)
    store.close()
    (c,) = a.comparisons
    # by hand: multilabel x: tp 1+1+1+1, fp 0+0+0+1, fn 1+0+0+0 per 4 rows -> micro F1 = 8/10; y perfect
    # NER x: per 2 rows tp 1, fp 1 (wrong span), fn 2 -> micro F1 = 2/5; y perfect
    f1_x = 8 / 10 if task == "multilabel" else 2 / 5
    assert c["boot"]["a"] == pytest.approx(f1_x) and c["boot"]["b"] == pytest.approx(1.0)
    assert c["boot"]["delta"] == pytest.approx(1 - f1_x) and c["boot"]["p"] < 0.01
    assert (c["mcnemar"]["b"], c["mcnemar"]["c"]) == ((0, 50) if task == "multilabel" else (0, 100))


def _store_runs(out, runs, test_sha):
    """runs: (method, seed, status, predictions) on GOLD; test_sha(seed) names each run's test split."""
    with RunStore(out / "runs.db") as s:
        for method, seed, status, pred in runs:
            cfg = {"data": "d", "backbone": "tiny", "method": method, "seed": seed}
            p = Point(run_id(cfg), cfg, "")
            s.register([p])
            s.start(p.id, "w")
            if status != "success":
                s.finish(p.id, {"config": cfg, "status": "failed", "error": "BackboneError: not here"})
                continue
            df = pd.DataFrame({"row": np.arange(1, N + 1), "gold": GOLD, "predicted_label": pred})
            s.finish(p.id, {"config": cfg, "status": "success", "metrics": {"f1": 0.5}, "cost": {},
                            "data": {"test_split_sha256": test_sha(seed), "n_test": N}}, predictions_to_bytes(df), N)


def test_seeds_on_one_test_file_count_each_example_once(tmp_path):
    """With a given test file every seed predicts the same examples: the comparison resamples them together
    and McNemar counts each example once, so two identical seeds give exactly the one-seed statistics."""
    base, better = predictions(0.70, 1), predictions(0.80, 1)
    runs = [(m, seed, "success", pred) for seed in (1, 2) for m, pred in (("frozen", base), ("lora", better))]
    _store_runs(tmp_path, runs, lambda seed: "the-test-file")
    a, store = analyse(tmp_path, n_boot=1000)
    store.close()
    (c,) = a.comparisons
    one = stats.paired_bootstrap([(GOLD, base, better)], 2, metric="f1", positive=1, n_boot=1000)
    assert c["pairs"] == 2 and c["shared"]
    assert (c["boot"]["delta"], c["boot"]["ci"], c["boot"]["p"], c["boot"]["n"]) == \
        (one["delta"], one["ci"], one["p"], N)
    assert c["mcnemar"] == stats.mcnemar([(GOLD, base, better)])
    page = build_report(tmp_path, n_boot=200)["html"].read_text()
    assert "seeds that share a test set (a given test file) are resampled together" in page


def test_configurations_are_numbered_over_the_grid(tmp_path):
    """C numbers follow the grid, whatever has finished: a configuration without a successful run keeps its
    number, and naming it as the baseline is one error instead of another configuration's comparison."""
    pred = predictions(0.70, 1)
    _store_runs(tmp_path, [("frozen", 1, "failed", None), ("lora", 1, "success", pred), ("full", 1, "success", pred)],
                lambda seed: "split")
    a, store = analyse(tmp_path, n_boot=100)
    store.close()
    assert list(a.groups["cid"]) == ["C2", "C3"] and list(a.groups["method"]) == ["lora", "full"]
    assert a.groups.loc[a.groups["group"] == a.baseline, "cid"].item() == "C2"   # default: first with a success
    with pytest.raises(ConfigError) as e:
        analyse(tmp_path, baseline="C1", n_boot=100)
    assert str(e.value).startswith("--baseline 'C1' is C1 (frozen), which has no successful run; choose a "
                                   "configuration that has one: C2 = lora; C3 = full")
    with RunStore(tmp_path / "runs.db") as s:                 # the same baseline from the SPEC's report: section
        s.set_meta("spec", json.dumps({"report": {"baseline": "frozen"}}))
    with pytest.raises(ConfigError, match=r"^report: baseline \(in the SPEC\) 'frozen' is C1 \(frozen\)"):
        analyse(tmp_path, n_boot=100)
