"""``clintune report DIR``: DIR/report.html (self-contained, opens offline) and DIR/report.md (+ report_files/).

What it shows, from runs.db alone:

* the results table, one row per successful run: F1 with its 95% bootstrap CI, AUROC, accuracy, train
  time, training throughput, peak memory, trainable/total parameters and the composite efficiency;
* seed aggregates per configuration (mean +- sd over seeds);
* comparisons of every configuration with a baseline on the same test examples: delta of the primary
  metric with its paired-bootstrap 95% CI and p-value, Holm-adjusted p, McNemar's exact p;
* the composite efficiency of Taylor et al. against AUROC and F1; Pareto fronts of quality against
  training time, peak memory and trainable parameters;
* plots (matplotlib, Agg, embedded as base64 PNG): quality vs training time / peak memory / trainable
  parameters with the Pareto front, efficiency vs AUROC/F1, learning curves over training fractions,
  quality vs LoRA rank (a plot the sweep has no variation for is skipped with a note);
* failed runs with their errors, and the environment (versions, git sha, device, threads).

Configurations are numbered C1, C2, ... over the whole grid in its order (those without a successful run keep
their number), in table and plot alike. Nothing here contains note text.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..store import atomic_path
from . import stats
from .spec import config_key, describe, label_keys, short_value
from .store import DB_NAME, Run, RunStore

METRIC_NAMES = {"f1": "F1", "auroc": "AUROC", "accuracy": "accuracy", "f1_macro": "macro F1",
                "f1_micro": "micro F1", "auroc_macro": "macro AUROC"}


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------

def _isnum(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(float(v))


def fnum(v, digits: int = 4) -> str:
    return f"{float(v):.{digits}f}" if _isnum(v) else "n/a"


def fint(v) -> str:
    return f"{int(round(float(v))):,}" if _isnum(v) else "n/a"


def fsec(v) -> str:
    if not _isnum(v):
        return "n/a"
    v = float(v)
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def fp(p) -> str:
    if not _isnum(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmean_sd(m, s, digits: int = 4) -> str:
    if not _isnum(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if _isnum(s) else f"{m:.{digits}f}"


def fci(lo, hi, digits: int = 4) -> str:
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]" if _isnum(lo) and _isnum(hi) else ""


def metric_name(m: str) -> str:
    return METRIC_NAMES.get(m, m)


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    anchor: str = ""
    marks: list[list[bool]] = field(default_factory=list)  # cells to emphasise (significant p, front)


@dataclass
class Plot:
    name: str
    title: str
    png: bytes | None
    note: str = ""


# ----------------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------------

def _auroc(m: dict):
    v = m.get("auroc")
    return v if v is not None else m.get("auroc_macro")


@dataclass
class Analysis:
    name: str
    out: Path
    runs: list[Run]
    metric: str
    frame: pd.DataFrame            # one row per successful run
    groups: pd.DataFrame           # one row per configuration (seeds aggregated)
    group_keys: list[str]
    run_keys: list[str]
    baseline: str | None           # config key of the baseline
    comparisons: list[dict]
    pair_details: list[dict]
    compare_metric: str
    notes: list[str]


def _frame(runs: list[Run], metric: str, run_keys: list[str], group_keys: list[str]) -> pd.DataFrame:
    rows = []
    for r in runs:
        m, c, ci, d = r.metrics or {}, r.cost or {}, r.metrics_ci or {}, r.data or {}
        cfg = r.config
        lo_hi = ci.get("f1") or [None, None]
        prim = m.get(metric)
        rows.append({
            "id": r.id, "short": r.short_id, "seq": r.seq, "source": r.source,
            "group": config_key(cfg), "label": describe(cfg, run_keys), "group_label": describe(cfg, group_keys),
            "seed": cfg.get("seed"), "train_fraction": cfg.get("train_fraction"), "method": cfg.get("method"),
            "head": cfg.get("head"), "backbone": short_value("backbone", cfg.get("backbone")),
            "lora_r": cfg.get("lora_r"), "lora_alpha": cfg.get("lora_alpha"),
            "primary": prim if _isnum(prim) else np.nan,
            "primary_ci": ci.get(metric),
            "f1": m.get("f1", np.nan) if _isnum(m.get("f1")) else np.nan, "f1_lo": lo_hi[0], "f1_hi": lo_hi[1],
            "auroc": _auroc(m) if _isnum(_auroc(m)) else np.nan,
            "accuracy": m.get("accuracy") if _isnum(m.get("accuracy")) else np.nan,
            "train_s": c.get("train_seconds", np.nan), "time_to_best_s": c.get("time_to_best_s", np.nan),
            "samples_s": c.get("train_samples_per_s", np.nan), "peak_rss_mb": c.get("peak_rss_mb", np.nan),
            "peak_gpu_mb": c.get("peak_gpu_mb", np.nan), "trainable": c.get("trainable_params", np.nan),
            "total": c.get("total_params", np.nan), "n_train": d.get("n_train", np.nan),
            "n_test": d.get("n_test", np.nan), "test_sha": r.test_split_sha256,
            "labels": (m.get("labels") or d.get("labels")),
            "positive": cfg.get("positive_label"), "task": cfg.get("task"), "label_sep": cfg.get("label_sep"),
        })
    df = pd.DataFrame(rows)
    if len(df):
        for col in ("train_s", "time_to_best_s", "samples_s", "peak_rss_mb", "peak_gpu_mb", "trainable", "total",
                    "n_train", "n_test"):
            df[col] = pd.to_numeric(df[col], errors="coerce")
        df["efficiency"] = stats.composite_efficiency(df["time_to_best_s"], df["trainable"], df["total"])
    return df


def _configurations(runs: list[Run], group_keys: list[str]) -> pd.DataFrame:
    """Every configuration of the sweep (all runs, whatever their status) in registration order, numbered
    C1, C2, ...: the numbers follow the grid, so they do not shift while runs finish or fail."""
    rows: dict = {}
    for r in runs:
        key = config_key(r.config)
        if key not in rows:
            rows[key] = {"group": key, "cid": f"C{len(rows) + 1}", "label": describe(r.config, group_keys)}
    return pd.DataFrame(list(rows.values()), columns=["group", "cid", "label"])


def _groups(df: pd.DataFrame, cids: dict) -> pd.DataFrame:
    rows = []
    for key, g in df.groupby("group", sort=False):
        g = g.sort_values("seq")
        row = {"group": key, "label": g["group_label"].iloc[0], "seq": g["seq"].min(), "n": len(g),
               "method": g["method"].iloc[0], "head": g["head"].iloc[0], "backbone": g["backbone"].iloc[0],
               "train_fraction": g["train_fraction"].iloc[0], "lora_r": g["lora_r"].iloc[0],
               "lora_alpha": g["lora_alpha"].iloc[0], "ids": list(g["id"])}
        for col in ("primary", "f1", "auroc", "accuracy", "train_s", "time_to_best_s", "samples_s", "peak_rss_mb",
                    "trainable", "total", "efficiency", "n_train"):
            mean, sd, n = stats.mean_sd(list(g[col]))
            row[col], row[col + "_sd"] = (np.nan if mean is None else mean), (np.nan if sd is None else sd)
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["cid"] = [cids[g] for g in out["group"]]
        out = out.assign(_n=[int(c[1:]) for c in out["cid"]]).sort_values("_n").drop(columns="_n")
        out = out.reset_index(drop=True)
    return out


def _resolve_baseline(configs: pd.DataFrame, groups: pd.DataFrame, runs: list[Run], baseline: str | None,
                      where: str = "--baseline") -> str | None:
    """The config key of the baseline: a run id (prefix of 4+ characters), a C number or a label (exact, else
    a unique substring); default the first configuration with a successful run. A configuration without a
    successful run cannot be the baseline: one error, never a silent switch to another one."""
    if not len(groups):
        return None
    if not baseline:
        return groups["group"].iloc[0]
    b = str(baseline).strip()
    key = None
    if len(b) >= 4:
        keys = {config_key(r.config) for r in runs if r.id.startswith(b.lower())}
        key = keys.pop() if len(keys) == 1 else None
    for col in ("cid", "label"):
        hits = configs[configs[col].astype(str).str.lower() == b.lower()]
        if key is None and len(hits) == 1:
            key = hits["group"].iloc[0]
    hits = configs[configs["label"].str.lower().str.contains(b.lower(), regex=False)]
    if key is None and len(hits) == 1:
        key = hits["group"].iloc[0]
    choices = "; ".join(f"{c} = {l}" for c, l in zip(groups["cid"], groups["label"]))
    if key is None:
        what = "matches several configurations" if len(hits) > 1 else "matches no configuration"
        raise ConfigError(f"{where} '{baseline}' {what} (give a run id, a C number or a label: {choices})")
    if key not in set(groups["group"]):
        cid, label = configs.loc[configs["group"] == key, ["cid", "label"]].iloc[0]
        raise ConfigError(f"{where} '{baseline}' is {cid} ({label}), which has no successful run; choose a "
                          f"configuration that has one: {choices}")
    return key


def _pair_counts(store: RunStore, cache: dict, ra: pd.Series, rb: pd.Series, metric: str):
    """(counts A, counts B, kind) of two runs on the test examples both predicted, or (None, reason)."""
    for rid in (ra["id"], rb["id"]):
        if rid not in cache:
            cache[rid] = store.predictions(rid)
    pa, pb = cache[ra["id"]], cache[rb["id"]]
    task = ra["task"] or "classification"
    if task != (rb["task"] or "classification"):
        return None, "different tasks"
    col = {"classification": "predicted_label", "multilabel": "predicted_labels", "ner": "entities"}.get(task)
    if col is None or pa is None or pb is None or not {"row", "gold", col} <= set(pa.columns) & set(pb.columns):
        return None, "no comparable per-example predictions"
    m = pa[["row", "gold", col]].merge(pb[["row", "gold", col]], on="row", suffixes=("_a", "_b"))
    m = m.sort_values("row", kind="stable").reset_index(drop=True)  # runs on one test set align row by row
    if len(m) == 0 or len(m) != len(pa) or len(m) != len(pb) or \
            (m["gold_a"].astype(str) != m["gold_b"].astype(str)).any():
        return None, "different test examples"
    if task == "classification":
        labels = ra["labels"] if isinstance(ra["labels"], list) else None
        (y, a, b), names = stats.encode_labels(m["gold_a"], m[f"{col}_a"], m[f"{col}_b"], labels=labels)
        k = max(len(names), 2)
        kind = stats.single_label_kind(metric, k, _positive_index(names, rb["positive"]))
        return (stats.counts_single_label(y, a, k), stats.counts_single_label(y, b, k), kind), ""
    if task == "multilabel":
        # stored label sets are always joined with "|" (whatever the data's --label-sep was)
        def sets(col_):
            return [frozenset(x for x in str(v).split("|") if x) if isinstance(v, str) else frozenset() for v in col_]
    else:  # ner: entities as (start, end, type); right only if span and type both match
        def sets(col_):
            return [frozenset((int(e["start"]), int(e["end"]), str(e["label"])) for e in json.loads(v or "[]"))
                    for v in col_]
    gold, pa_, pb_ = sets(m["gold_a"]), sets(m[f"{col}_a"]), sets(m[f"{col}_b"])
    classes = sorted({(i[-1] if isinstance(i, tuple) else i) for col_ in (gold, pa_, pb_) for s_ in col_ for i in s_})
    if not classes:
        return None, "no labels in the test examples"
    kind = {"f1": "micro", "f1_micro": "micro", "f1_macro": "macro", "accuracy": "accuracy"}[metric]
    return (stats.counts_sets(gold, pa_, classes), stats.counts_sets(gold, pb_, classes), kind), ""


def _positive_index(names: list[str], positive) -> int | None:
    if len(names) != 2:
        return None
    if positive is not None and str(positive) in names:
        return names.index(str(positive))
    return 1  # clintune's default positive class: the larger label (the last in sorted order)


def _compare(store: RunStore, df: pd.DataFrame, groups: pd.DataFrame, base: str, metric: str,
             n_boot: int) -> tuple[list[dict], list[dict], list[str]]:
    cache: dict = {}
    base_runs = df[df["group"] == base]
    comps, details, reasons = [], [], {}
    for _, g in groups.iterrows():
        if g["group"] == base:
            continue
        strata, kinds, pairs, splits = [], set(), [], []
        for _, rb in df[df["group"] == g["group"]].sort_values("seq").iterrows():
            cands = base_runs[base_runs["test_sha"] == rb["test_sha"]] if rb["test_sha"] else base_runs.iloc[0:0]
            if not len(cands):
                reasons["no baseline run on the same test split (another seed without a given test file, or "
                        "other data)"] = 1
                continue
            same_seed = cands[cands["seed"] == rb["seed"]]
            ra = (same_seed if len(same_seed) else cands).iloc[0]
            got, why = _pair_counts(store, cache, ra, rb, metric)
            if got is None:
                reasons[why] = 1
                continue
            ca, cb, kind = got
            strata.append((ca, cb))
            splits.append(rb["test_sha"])   # seeds on one test split (a given test file) share its examples
            kinds.add(kind)
            pairs.append({"a": ra, "b": rb, "boot": stats.paired_bootstrap_counts([(ca, cb)], kind, n_boot=n_boot),
                          "mcnemar": stats.mcnemar_correct([(ca.correct, cb.correct)])})
        if not strata or len(kinds) != 1:
            comps.append({"group": g, "pairs": 0})
            continue
        boot = stats.paired_bootstrap_counts(strata, kinds.pop(), n_boot=n_boot, shared=splits)
        mc = stats.mcnemar_correct([(ca.correct, cb.correct) for ca, cb in strata], shared=splits)
        comps.append({"group": g, "pairs": len(strata), "boot": boot, "mcnemar": mc,
                      "shared": len(set(splits)) < len(splits)})
        details.extend(pairs)
    ps = [c["boot"]["p"] if c.get("pairs") else None for c in comps]
    for c, adj in zip(comps, stats.holm(ps)):
        c["p_holm"] = adj
    notes = [f"Not compared where runs could not be paired: {'; '.join(reasons)}."] if reasons else []
    return comps, details, notes


def analyse(out: str | Path, *, baseline: str | None = None, metric: str | None = None,
            n_boot: int = 5000) -> tuple[Analysis, RunStore]:
    out = Path(out)
    store = RunStore(out / DB_NAME, create=False)
    runs = store.runs()
    spec_meta = json.loads(store.get_meta("spec") or "{}")
    report_defaults = spec_meta.get("report") or {}
    # errors name where a value came from: the flag, or the SPEC's report: section
    metric_from = "--metric" if metric else "report: metric (in the SPEC)"
    baseline_from = "--baseline" if baseline else "report: baseline (in the SPEC)"
    metric = metric or report_defaults.get("metric") or "f1"
    baseline = baseline or report_defaults.get("baseline")
    name = store.get_meta("name") or out.name
    run_keys = label_keys([r.config for r in runs])
    group_keys = [k for k in run_keys if k != "seed"]
    configs = _configurations(runs, group_keys)
    ok = [r for r in runs if r.status == "success"]
    df = _frame(ok, metric, run_keys, group_keys)
    groups = _groups(df, dict(zip(configs["group"], configs["cid"]))) if len(df) else pd.DataFrame()
    notes = []
    if len(df) and df["primary"].isna().all():
        raise ConfigError(f"{metric_from} {metric}: no successful run has this metric "
                          f"(e.g. f1, auroc, accuracy, f1_macro, f1_micro)")
    base = _resolve_baseline(configs, groups, runs, baseline, baseline_from)
    cmp_metric = metric if metric in stats.PAIRED_METRICS else "f1"
    if cmp_metric != metric:
        notes.append(f"Paired tests compare {metric_name(cmp_metric)} (they work on predicted labels; "
                     f"{metric_name(metric)} needs scores).")
    comps, details = [], []
    if base is not None and len(groups) > 1:
        comps, details, more = _compare(store, df, groups, base, cmp_metric, n_boot)
        notes += more
    return Analysis(name, out, runs, metric, df, groups, group_keys, run_keys, base, comps, details, cmp_metric,
                    notes), store


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------

def _cid_map(a: Analysis) -> dict:
    return dict(zip(a.groups["group"], a.groups["cid"])) if len(a.groups) else {}


def results_table(a: Analysis) -> Table:
    cids = _cid_map(a)
    m = metric_name(a.metric)
    headers = ["config", "run", "configuration", "F1 [95% CI]", "AUROC", "accuracy"]
    if a.metric not in ("f1", "auroc", "accuracy"):
        headers.insert(3, m)
    headers += ["train s", "time to best s", "samples/s", "peak RSS MB", "trainable params", "total params",
                "efficiency"]
    rows = []
    df = a.frame.assign(cid_order=a.frame["group"].map(lambda g: int(cids[g][1:]))).sort_values(["cid_order", "seq"])
    for _, r in df.iterrows():
        row = [cids[r["group"]], r["short"], r["label"], f"{fnum(r['f1'])} {fci(r['f1_lo'], r['f1_hi'])}".strip(),
               fnum(r["auroc"]), fnum(r["accuracy"])]
        if a.metric not in ("f1", "auroc", "accuracy"):
            ci = r["primary_ci"] or [None, None]
            row.insert(3, f"{fnum(r['primary'])} {fci(*ci)}".strip())
        row += [fsec(r["train_s"]), fsec(r["time_to_best_s"]), fnum(r["samples_s"], 1), fnum(r["peak_rss_mb"], 0),
                fint(r["trainable"]), fint(r["total"]), fnum(r["efficiency"], 3)]
        rows.append(row)
    return Table("Results", headers, rows, anchor="results",
                 note="One row per successful run. CI: 95% percentile bootstrap over test examples. Train s: "
                      "training wall time (validation included); time to best: training time until the epoch "
                      "with the best validation score; samples/s: training throughput; peak RSS: the run's own "
                      "process; efficiency: composite efficiency (below), 1 = most efficient run. A frozen-backbone "
                      "run that does not find its features in the feature cache pays for encoding them in its "
                      "train time (usually the first run of a backbone).")


def seeds_table(a: Analysis) -> Table:
    m = metric_name(a.metric)
    headers = ["config", "configuration", "seeds", f"{m} mean ± sd"]
    if a.metric != "f1":
        headers.append("F1 mean ± sd")
    headers += ["AUROC mean ± sd", "accuracy mean", "train s mean", "peak RSS MB", "trainable params", "efficiency"]
    rows = []
    for _, g in a.groups.iterrows():
        row = [g["cid"], g["label"] + ("  (baseline)" if g["group"] == a.baseline else ""), str(g["n"]),
               fmean_sd(g["primary"], g["primary_sd"])]
        if a.metric != "f1":
            row.append(fmean_sd(g["f1"], g["f1_sd"]))
        row += [fmean_sd(g["auroc"], g["auroc_sd"]), fnum(g["accuracy"]), fsec(g["train_s"]),
                fnum(g["peak_rss_mb"], 0), fint(g["trainable"]), fnum(g["efficiency"], 3)]
        rows.append(row)
    return Table("Seed aggregates", headers, rows, anchor="seeds",
                 note="Mean and sample standard deviation (ddof = 1) over the seeds of each configuration.")


def comparisons_table(a: Analysis) -> Table:
    cids = _cid_map(a)
    m = metric_name(a.compare_metric)
    base_label = a.groups.loc[a.groups["group"] == a.baseline, "label"].iloc[0]
    headers = ["config", "configuration", "paired seeds", f"baseline {m}", m, f"Δ{m} [95% CI]", "p (bootstrap)",
               "p (Holm)", "McNemar b / c", "McNemar p"]
    rows, marks = [], []
    for c in a.comparisons:
        g = c["group"]
        if not c.get("pairs"):
            rows.append([cids[g["group"]], g["label"], "0"] + ["n/a"] * 7)
            marks.append([False] * 10)
            continue
        b, mc = c["boot"], c["mcnemar"]
        rows.append([cids[g["group"]], g["label"], str(c["pairs"]), fnum(b["a"]), fnum(b["b"]),
                     f"{b['delta']:+.4f} {fci(*b['ci'])}", fp(b["p"]), fp(c["p_holm"]), f"{mc['b']} / {mc['c']}",
                     fp(mc["p"])])
        sig = [False] * 10
        sig[6] = b["p"] < 0.05
        sig[7] = _isnum(c["p_holm"]) and c["p_holm"] < 0.05
        sig[9] = mc["p"] < 0.05
        marks.append(sig)
    paired = [c for c in a.comparisons if c.get("pairs")]
    shared = any(c.get("shared") for c in paired)
    seeds_note = ("seeds that share a test set (a given test file) are resampled together, one draw of the "
                  "examples for all of them, so each example counts once" if shared else
                  "each seed's test split is resampled on its own (stratified)")
    mc_note = ("McNemar: exact binomial test on discordant examples (b: the baseline right, the configuration "
               "wrong; c: the reverse); where seeds share the test examples each example counts once, b / c "
               "counting examples the baseline / the configuration gets right in more of those seeds (a sign "
               "test)" if shared else "McNemar: exact binomial test on discordant errors (b: baseline right, "
               "config wrong; c: the reverse), summed over the seeds' distinct test splits")
    note = (f"Each configuration against the baseline {cids[a.baseline]} ({base_label}) on the same test examples "
            f"(runs paired by test split; Δ is the mean of the per-seed differences; {seeds_note}). p (bootstrap): "
            f"two-sided paired bootstrap, {paired[0]['boot']['n_boot'] if paired else 0} resamples; p (Holm): "
            f"adjusted for the {len(paired)} comparison{'' if len(paired) == 1 else 's'} with paired runs; "
            f"{mc_note}. Emphasised: p < 0.05.")
    return Table("Comparisons with the baseline", headers, rows, note, "comparisons", marks)


def pair_table(a: Analysis) -> Table:
    cids = _cid_map(a)
    m = metric_name(a.compare_metric)
    headers = ["config", "run", "baseline run", "seed", f"Δ{m} [95% CI]", "p (bootstrap)", "McNemar b / c",
               "McNemar p"]
    rows = []
    for d in a.pair_details:
        b, mc = d["boot"], d["mcnemar"]
        rows.append([cids[d["b"]["group"]], d["b"]["short"], d["a"]["short"], str(d["b"]["seed"]),
                     f"{b['delta']:+.4f} {fci(*b['ci'])}", fp(b["p"]), f"{mc['b']} / {mc['c']}", fp(mc["p"])])
    return Table("Run-by-run comparisons", headers, rows, anchor="pairs",
                 note="Each run against the baseline run on the same test split (same seed where possible).")


def efficiency_table(a: Analysis) -> Table:
    df = a.frame.sort_values("efficiency", ascending=False)
    cids = _cid_map(a)
    headers = ["config", "run", "configuration", "efficiency", "time to best s", "trainable params", "total params",
               "AUROC", "F1"]
    rows = [[cids[r["group"]], r["short"], r["label"], fnum(r["efficiency"], 3), fsec(r["time_to_best_s"]),
             fint(r["trainable"]), fint(r["total"]), fnum(r["auroc"]), fnum(r["f1"])] for _, r in df.iterrows()]
    return Table("Composite efficiency", headers, rows, anchor="efficiency",
                 note="Taylor et al. (arXiv 2402.10597): the time to the best validation score, the trainable (PEFT) "
                      "parameters and the total parameters are each min-max normalised across the runs compared; "
                      "efficiency is the negated mean of the three, rescaled to [0, 1] (1 = most efficient). A cost "
                      "equal for all runs does not count.")


FRONTS = (("train_s", "training time (s)", "time"), ("peak_rss_mb", "peak memory (RSS, MB)", "memory"),
          ("trainable", "trainable parameters", "params"))


def front_masks(a: Analysis) -> dict[str, np.ndarray]:
    return {col: stats.pareto_front(a.groups[col], a.groups["primary"]) for col, _, _ in FRONTS}


def pareto_table(a: Analysis, masks: dict) -> Table:
    m = metric_name(a.metric)
    headers = ["config", "configuration", f"{m} mean", "train s", "peak RSS MB", "trainable params",
               "front: time", "front: memory", "front: params"]
    rows, marks = [], []
    for i, g in a.groups.iterrows():
        flags = [bool(masks[col][i]) for col, _, _ in FRONTS]
        rows.append([g["cid"], g["label"], fnum(g["primary"]), fsec(g["train_s"]), fnum(g["peak_rss_mb"], 0),
                     fint(g["trainable"])] + ["yes" if f else "" for f in flags])
        marks.append([False] * 6 + flags)
    return Table("Pareto fronts", headers, rows,
                 note=f"A configuration is on a front when no other has at least its {m} (seed mean) at no more cost "
                      "(and is better in one of the two). Costs are seed means.", anchor="pareto", marks=marks)


def failed_table(a: Analysis) -> Table | None:
    failed = [r for r in a.runs if r.status == "failed"]
    pending = [r for r in a.runs if r.status in ("pending", "running")]
    rows = [[r.short_id, describe(r.config, a.run_keys), r.status, str(r.attempts), (r.error or "")[:300]]
            for r in failed + pending]
    if not rows:
        return None
    return Table("Failed and unfinished runs", ["run", "configuration", "status", "attempts", "error"], rows,
                 anchor="failed",
                 note="Failed runs are recorded with their error and not retried (clintune bench --retry-failed "
                      "does); unfinished runs are trained when the sweep runs again.")


def environment_table(a: Analysis) -> Table:
    vals: dict[str, list] = {}

    def add(k, v):
        if v is None:
            return
        s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        vals.setdefault(k, [])
        if s not in vals[k]:
            vals[k].append(s)

    for r in a.runs:
        if r.status != "success" or not r.env:
            continue
        e = r.env
        for k in ("python", "platform", "cpu", "device", "device_name", "precision", "threads", "git_sha", "cuda",
                  "gpus", "cpu_bf16"):
            add(k, e.get(k))
        for p, v in sorted((e.get("packages") or {}).items()):
            add(p, v)
    rows = [[k, "; ".join(v)] for k, v in vals.items()]
    return Table("Environment", ["item", "value(s)"], rows, anchor="environment",
                 note="As recorded by each run's worker (several values: they differed between runs).")


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------

def _figure(w: float = 7.2, h: float = 4.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    return fig


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _log_if_wide(ax, values, axis: str = "x") -> None:
    v = np.asarray([x for x in values if _isnum(x) and x > 0], dtype=float)
    if len(v) >= 2 and v.max() / v.min() > 30:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _method_colors(methods) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(dict.fromkeys(methods))}


def plot_front(a: Analysis, col: str, xlabel: str, mask: np.ndarray) -> bytes:
    g = a.groups
    fig = _figure()
    ax = fig.add_subplot()
    colors = _method_colors(g["method"])
    ok = g[col].notna() & g["primary"].notna()
    for method, color in colors.items():
        sel = ok & (g["method"] == method)
        if sel.any():
            ax.errorbar(g.loc[sel, col], g.loc[sel, "primary"], yerr=g.loc[sel, "primary_sd"].fillna(0),
                        fmt="o", color=color, ecolor=color, alpha=0.85, capsize=3, label=str(method))
    fr = g[mask].sort_values(col)
    if len(fr):
        ax.step(fr[col], fr["primary"], where="post", color="crimson", lw=1.5, label="Pareto front")
        ax.scatter(fr[col], fr["primary"], s=160, facecolors="none", edgecolors="crimson", lw=1.5)
    for _, r in g[ok].iterrows():
        ax.annotate(r["cid"], (r[col], r["primary"]), textcoords="offset points", xytext=(6, 5), fontsize=8)
    _log_if_wide(ax, g[col])
    ax.set_xlabel(xlabel + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(f"{metric_name(a.metric)} (seed mean ± sd)")
    ax.set_title(f"{metric_name(a.metric)} vs {xlabel}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def plot_efficiency(a: Analysis) -> bytes:
    df = a.frame
    fig = _figure(9.0, 4.0)
    colors = _method_colors(df["method"])
    for j, (col, name) in enumerate((("auroc", "AUROC"), ("f1", "F1"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for method, color in colors.items():
            sel = df["method"] == method
            ax.scatter(df.loc[sel, "efficiency"], df.loc[sel, col], color=color, label=str(method), alpha=0.85)
        ax.set_xlabel("composite efficiency (1 = most efficient)")
        ax.set_ylabel(f"test {name}")
        ax.set_xlim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} vs efficiency")
        if j == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _curves(a: Analysis, x: str, drop: tuple[str, ...], subset: pd.Series | None = None):
    """Lines over ``x`` for each configuration with ``drop`` keys (and the seed) removed: (label, xs, mean, sd)."""
    df = a.frame if subset is None else a.frame[subset]
    keys = [k for k in a.group_keys if k not in drop]
    lines = {}
    by_id = {rr.id: rr for rr in a.runs}
    for _, r in df.iterrows():
        run = by_id[r["id"]]
        cfg = {k: v for k, v in run.config.items() if k not in drop and k != "seed"}
        key = json.dumps(cfg, sort_keys=True, default=str)
        lines.setdefault(key, {"label": describe(run.config, keys), "pts": {}})
        lines[key]["pts"].setdefault(r[x], []).append(r["primary"])
    out = []
    for ln in lines.values():
        xs = sorted(k for k in ln["pts"] if _isnum(k))
        means = [stats.mean_sd(ln["pts"][v])[0] for v in xs]
        sds = [stats.mean_sd(ln["pts"][v])[1] or 0.0 for v in xs]
        out.append((ln["label"], xs, means, sds))
    return out


def plot_lines(a: Analysis, x: str, xlabel: str, drop: tuple[str, ...], title: str,
               subset: pd.Series | None = None, logx: bool = False) -> bytes:
    fig = _figure(7.8, 4.4)
    ax = fig.add_subplot()
    for label, xs, means, sds in _curves(a, x, drop, subset):
        if len(xs) < 2:
            continue
        ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=label[:60])
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric_name(a.metric)} (mean ± sd over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def plots(a: Analysis, masks: dict) -> list[Plot]:
    out = []
    m = metric_name(a.metric)
    n_groups = len(a.groups)
    for col, xlabel, short in FRONTS:
        name = f"{a.metric}_vs_{short}"
        title = f"{m} vs {xlabel}, Pareto front"
        if n_groups < 1 or a.groups[col].notna().sum() == 0:
            out.append(Plot(name, title, None, f"skipped: no run has {xlabel}"))
        else:
            out.append(Plot(name, title, plot_front(a, col, xlabel, masks[col])))
    if a.frame["efficiency"].notna().sum() >= 2:
        out.append(Plot("efficiency", "AUROC and F1 vs composite efficiency", plot_efficiency(a)))
    else:
        out.append(Plot("efficiency", "AUROC and F1 vs composite efficiency", None,
                        "skipped: needs at least two successful runs"))
    fr = a.frame["train_fraction"].dropna().unique()
    title = f"Learning curves: {m} vs training fraction"
    if len(fr) >= 2:
        out.append(Plot("learning_curves", title, plot_lines(a, "train_fraction", "fraction of the training split",
                                                             ("train_fraction",), title)))
    else:
        out.append(Plot("learning_curves", title, None, "skipped: the sweep uses a single training fraction"))
    lora = a.frame["method"] == "lora"
    ranks = a.frame.loc[lora, "lora_r"].dropna().unique()
    title = f"{m} vs LoRA rank"
    if len(ranks) >= 2:
        out.append(Plot("lora_rank", title, plot_lines(a, "lora_r", "LoRA rank r", ("lora_r", "lora_alpha", "lr",
                                                                                      "lora_dropout"), title,
                                                       subset=lora, logx=True)))
    else:
        out.append(Plot("lora_rank", title, None, "skipped: the sweep has fewer than two LoRA ranks"))
    return out


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1500px;color:#222;
     padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#555} .note{color:#555;font-size:.9em;max-width:1100px}
table{border-collapse:collapse;font-size:.86em;margin:.6em 0}
th,td{border:1px solid #d6d6d6;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f2f4f7;position:sticky;top:0}
tr:nth-child(even) td{background:#fafafa} td.mark{font-weight:bold;color:#b00020}
.plots{display:flex;flex-wrap:wrap;gap:18px} figure{margin:0;flex:1 1 620px;max-width:760px}
figcaption{font-size:.9em;color:#444} img{width:100%;height:auto;border:1px solid #e3e3e3}
.skip{color:#777;font-style:italic} td.t{text-align:left}
ul.summary li{margin:.2em 0} code{background:#f3f3f3;padding:0 3px}
"""


TEXT_COLUMNS = {"config", "run", "baseline run", "configuration", "item", "value(s)", "error", "status"}


def _cell(c: str, mark: bool, text: bool) -> str:
    cls = (["mark"] if mark else []) + (["t"] if text else [])  # text left-aligned, numbers right-aligned
    attr = f" class=\"{' '.join(cls)}\"" if cls else ""
    return f"<td{attr}>{html.escape(c)}</td>"


def html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = []
    for i, row in enumerate(t.rows):
        marks = t.marks[i] if i < len(t.marks) else []
        cells = "".join(_cell(c, j < len(marks) and marks[j], t.headers[j] in TEXT_COLUMNS)
                        for j, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    note = f"<p class=\"note\">{html.escape(t.note)}</p>" if t.note else ""
    return (f"<h2 id=\"{t.anchor}\">{html.escape(t.title)}</h2>{note}"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def md_table(t: Table) -> str:
    lines = [f"## {t.title}", ""]
    if t.note:
        lines += [t.note, ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
    lines.append("|" + "|".join("---" for _ in t.headers) + "|")
    for i, row in enumerate(t.rows):
        marks = t.marks[i] if i < len(t.marks) else []
        cells = [f"**{_md_cell(c)}**" if j < len(marks) and marks[j] and c else _md_cell(c) for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_lines(a: Analysis, masks: dict) -> list[str]:
    counts = {s: sum(1 for r in a.runs if r.status == s) for s in ("success", "failed", "pending", "running")}
    lines = [f"{len(a.runs)} runs: {counts['success']} success, {counts['failed']} failed"
             + (f", {counts['pending'] + counts['running']} not finished" if counts['pending'] + counts['running'] else "")
             + f"; {len(a.groups)} configurations."]
    if not len(a.groups):
        return lines
    m = metric_name(a.metric)
    best = a.groups.sort_values("primary", ascending=False).iloc[0]
    lines.append(f"Best {m} (seed mean): {best['cid']} {best['label']}: {fmean_sd(best['primary'], best['primary_sd'])}.")
    if a.frame["efficiency"].notna().any():
        eff = a.groups.sort_values("efficiency", ascending=False).iloc[0]
        lines.append(f"Most efficient (composite efficiency): {eff['cid']} {eff['label']} "
                     f"(efficiency {fnum(eff['efficiency'], 3)}, {m} {fnum(eff['primary'])}).")
    for col, xlabel, _ in FRONTS:
        members = ", ".join(a.groups.loc[masks[col], "cid"])
        lines.append(f"Pareto front of {m} vs {xlabel}: {members or 'none'}.")
    if a.comparisons:
        sig = [c for c in a.comparisons if c.get("pairs") and c["p_holm"] is not None and c["p_holm"] < 0.05]
        cids = _cid_map(a)
        base = cids[a.baseline]
        if sig:
            lines.append(f"Different from the baseline {base} after Holm adjustment (p < 0.05): "
                         + ", ".join(f"{cids[c['group']['group']]} ({c['boot']['delta']:+.4f})" for c in sig) + ".")
        else:
            lines.append(f"No configuration differs significantly from the baseline {base} "
                         f"(paired bootstrap, Holm-adjusted p < 0.05).")
    return lines


def _write_file(path: Path, data: bytes) -> None:
    """Atomic write with the usual permissions (a report is meant to be shared; mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o666 & ~umask)


def build_report(out: str | Path, *, baseline: str | None = None, metric: str | None = None,
                 n_boot: int = 5000) -> dict:
    """Write DIR/report.html, DIR/report.md and DIR/report_files/*.png; return their paths and notes."""
    a, store = analyse(out, baseline=baseline, metric=metric, n_boot=n_boot)
    try:
        return _write(a)
    finally:
        store.close()


def _write(a: Analysis) -> dict:
    out = a.out
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    tables: list[Table] = []
    figs: list[Plot] = []
    masks = {}
    if len(a.groups):
        masks = front_masks(a)
        tables.append(results_table(a))
        tables.append(seeds_table(a))
        if a.comparisons:
            tables.append(comparisons_table(a))
            if a.pair_details:
                tables.append(pair_table(a))
        tables.append(efficiency_table(a))
        tables.append(pareto_table(a, masks))
        figs = plots(a, masks)
    ft = failed_table(a)
    if ft:
        tables.append(ft)
    tables.append(environment_table(a))
    summary = summary_lines(a, masks) + a.notes

    files = out / "report_files"
    files.mkdir(exist_ok=True)
    for p in figs:
        if p.png is not None:
            _write_file(files / f"{p.name}.png", p.png)

    # HTML: one self-contained file (inline CSS, images as data: URIs, no scripts, nothing fetched)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>clintune report: "
             f"{html.escape(a.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>clintune sweep report: {html.escape(a.name)}</h1>",
             f"<p class=\"meta\">{html.escape(str(out.resolve()))} &middot; generated {generated} &middot; primary "
             f"metric: {html.escape(metric_name(a.metric))}</p>",
             "<ul class=\"summary\">" + "".join(f"<li>{html.escape(s)}</li>" for s in summary) + "</ul>",
             "<p class=\"meta\">" + " &middot; ".join(f"<a href=\"#{t.anchor}\">{html.escape(t.title)}</a>"
                                                     for t in tables) + " &middot; <a href=\"#plots\">Plots</a></p>"]
    plot_html = ["<h2 id=\"plots\">Plots</h2><div class=\"plots\">"]
    for p in figs:
        if p.png is None:
            plot_html.append(f"<figure><figcaption><b>{html.escape(p.title)}</b></figcaption>"
                             f"<p class=\"skip\">{html.escape(p.note)}</p></figure>")
        else:
            b64 = base64.b64encode(p.png).decode("ascii")
            plot_html.append(f"<figure><img alt=\"{html.escape(p.title)}\" src=\"data:image/png;base64,{b64}\">"
                             f"<figcaption>{html.escape(p.title)}</figcaption></figure>")
    plot_html.append("</div>")
    body_tables = [html_table(t) for t in tables]
    # plots after the Pareto table, before failed runs and the environment
    split = next((i + 1 for i, t in enumerate(tables) if t.anchor == "pareto"), len(tables))
    parts += body_tables[:split] + (plot_html if figs else []) + body_tables[split:]
    parts.append("</body></html>")
    html_path = out / "report.html"
    _write_file(html_path, "\n".join(parts).encode("utf-8"))

    md = [f"# clintune sweep report: {a.name}", "", f"{out.resolve()} · generated {generated} · primary metric: "
          f"{metric_name(a.metric)}", ""] + [f"* {s}" for s in summary] + [""]
    md_tables = [md_table(t) for t in tables]
    md_plots = ["## Plots", ""]
    for p in figs:
        md_plots.append(f"![{p.title}](report_files/{p.name}.png)" if p.png is not None else f"*{p.title}: {p.note}*")
        md_plots.append("")
    md += md_tables[:split] + (md_plots if figs else []) + md_tables[split:]
    md_path = out / "report.md"
    _write_file(md_path, "\n".join(md).encode("utf-8"))
    return {"html": html_path, "md": md_path, "plots": [p.name for p in figs if p.png is not None],
            "skipped": [f"{p.title}: {p.note}" for p in figs if p.png is None], "summary": summary}
