"""Tasks: what a label is, how it is learned and how it is scored.

* ``classification`` (binary or multi-class, one label per note): cross-entropy on (B, K) logits;
  metrics in :mod:`clintune.metrics`.
* ``multilabel`` (a set of labels per note, e.g. diagnosis codes ``I50.9|E11.9``): one sigmoid per
  label, binary cross-entropy; after training, each label's decision threshold is tuned on the
  validation split (the threshold in 0.05..0.95 that maximises that label's F1; 0.5 without
  validation data); metrics: micro/macro F1, precision and recall, macro AUROC over labels with both
  classes present, subset accuracy, Hamming loss. ``f1`` = micro F1, ``auroc`` = macro AUROC.
* ``ner`` (entities in text, BIO tags): a label per word, learned on the word's first sub-token
  (the others are ignored, -100); entity-level micro precision/recall/F1 with seqeval's conventions
  (conlleval mode); ``f1`` = entity micro F1; per-type F1 beside.

A task turns examples into *targets* batched alongside the inputs, gives the loss, turns model
outputs into scores, predictions and metrics (with bootstrap CIs), and the columns that ``predict``
writes.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .data import Examples, LabelMap, labels_phrase, show_label
from .errors import DataError
from .metrics import bootstrap_ci, classification_metrics

IGNORE = -100


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class Task:
    name = ""
    token_level = False

    # ------------------------------------------------------------------ labels
    def strata(self, labels: Sequence) -> list[str]:
        """Keys for stratified splitting."""
        return [str(l) for l in labels]

    def label_map(self, labels: Sequence, cfg, source: str) -> LabelMap:
        raise NotImplementedError

    def check_known(self, ex: Examples, lm: LabelMap, what: str) -> None:
        """Refuse labels the model cannot learn (absent from the training split)."""
        for labels, row in zip(ex.labels, ex.rows):
            for label in self.label_items(labels):
                if lm.index_of(label) is None:
                    raise DataError(f"{ex.source}: label {show_label(label)} at {ex.unit} {row} of {what} never "
                                    f"appears in the training data ({labels_phrase(lm.labels)})")

    def label_items(self, labels) -> list:
        return [labels]

    def counts(self, labels: Sequence) -> dict:
        return {str(k): v for k, v in sorted(Counter(str(x) for l in labels for x in self.label_items(l)).items())}

    # ------------------------------------------------------------------ training
    def targets(self, ex: Examples, lm: LabelMap, enc=None) -> "Targets":
        raise NotImplementedError

    def loss(self, lm: LabelMap, targets: "Targets", class_weights: bool):
        raise NotImplementedError

    def val_score(self, metric: str, ex: Examples, lm: LabelMap, enc=None):
        """outputs -> score, higher is better."""
        def score(outputs) -> float:
            if metric == "loss":
                return -self.output_loss(outputs, ex, lm, enc)
            v = self.metrics(outputs, ex, lm, enc, state=None, ci=False).get(metric)
            if v is None:       # AUROC with one class: every epoch would tie and the first would be kept
                raise DataError(f"--val-metric {metric}: undefined on the validation split ({len(ex)} rows; "
                                "AUROC needs both classes there); choose another --val-metric, e.g. loss")
            return float(v)
        return score

    def output_loss(self, outputs, ex, lm, enc) -> float:
        t = self.targets(ex, lm, enc)
        return float(self.loss(lm, t, False).mean(torch.as_tensor(outputs), t.all()))

    def fit_state(self, outputs, ex: Examples | None, lm: LabelMap, enc=None) -> dict:
        """Post-training state learned on validation outputs (multilabel thresholds); saved with the model."""
        return {}

    # ------------------------------------------------------------------ evaluation and prediction
    def metrics(self, outputs, ex: Examples, lm: LabelMap, enc=None, state: dict | None = None, ci: bool = True) -> dict:
        raise NotImplementedError

    def prediction_columns(self, outputs, lm: LabelMap, enc=None, state: dict | None = None, texts=None) -> dict:
        raise NotImplementedError


class Loss:
    """A batch's loss as a sum, and the denominator of its mean: mean = loss(logits, y) / norm(y).

    Splitting a batch into micro-batches and dividing each micro-batch's sum by the whole batch's
    denominator gives exactly the gradient of the batch mean (see ``training.fit``).
    """

    def __init__(self, fn, norm) -> None:
        self._fn, self._norm = fn, norm

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._fn(logits, y)

    def norm(self, y: torch.Tensor) -> float:
        return float(self._norm(y))

    def mean(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(logits, y) / max(self.norm(y), 1e-12)


class Targets:
    """Per-example targets; ``batch(idx, inputs)`` returns the tensor the loss compares with the logits."""

    def __init__(self, values) -> None:
        self.values = values

    def batch(self, idx: np.ndarray, inputs: dict) -> torch.Tensor:
        return torch.as_tensor(self.values[idx])

    def all(self) -> torch.Tensor:
        return torch.as_tensor(self.values)


# ======================================================================================================
class Classification(Task):
    name = "classification"

    def label_map(self, labels, cfg, source):
        return LabelMap.from_labels(labels, cfg.positive_label, source)

    def targets(self, ex, lm, enc=None):
        return Targets(lm.encode(ex.labels))

    def loss(self, lm, targets, class_weights):
        w = None
        if class_weights:
            y = targets.values
            counts = np.bincount(y, minlength=len(lm)).astype(np.float64)
            w = torch.tensor(len(y) / (len(lm) * np.maximum(counts, 1)), dtype=torch.float32)

        def f(logits, y):
            return nn.functional.cross_entropy(logits, y, weight=None if w is None else w.to(logits.device),
                                               reduction="sum")
        return Loss(f, lambda y: y.numel() if w is None else w[y.cpu()].sum())

    def metrics(self, outputs, ex, lm, enc=None, state=None, ci=True):
        from .modeling import softmax

        proba = softmax(outputs)
        y = lm.encode(ex.labels)
        m = classification_metrics(y, proba, lm.positive_index, lm.labels)
        if ci:
            m["_ci"] = bootstrap_ci(y, proba, lm.positive_index)
        return m

    def prediction_columns(self, outputs, lm, enc=None, state=None, texts=None):
        from .modeling import softmax

        proba = softmax(outputs)
        cols = {"predicted_label": lm.decode(proba.argmax(1))}
        for j, lab in enumerate(lm.labels):
            cols[f"prob_{lab}"] = proba[:, j]
        return cols


# ======================================================================================================
class MultiLabel(Task):
    name = "multilabel"

    def label_items(self, labels):
        return list(labels)

    def strata(self, labels):
        return ["|".join(map(str, l)) for l in labels]

    def label_map(self, labels, cfg, source):
        uniq = sorted({x for l in labels for x in l}, key=lambda v: (isinstance(v, str), v))
        if not uniq:
            raise DataError(f"{source}: no labels found")
        return LabelMap(list(uniq))

    def multi_hot(self, ex, lm) -> np.ndarray:
        y = np.zeros((len(ex), len(lm)), dtype=np.float32)
        for i, labels in enumerate(ex.labels):
            for l in labels:
                j = lm.index_of(l)
                if j is not None:
                    y[i, j] = 1.0
        return y

    def targets(self, ex, lm, enc=None):
        return Targets(self.multi_hot(ex, lm))

    def loss(self, lm, targets, class_weights):
        pw = None
        if class_weights:
            y = targets.values
            pos = y.sum(0)
            pw = torch.tensor((len(y) - pos) / np.maximum(pos, 1), dtype=torch.float32)

        def f(logits, y):
            return nn.functional.binary_cross_entropy_with_logits(
                logits, y.to(logits.dtype), pos_weight=None if pw is None else pw.to(logits.device), reduction="sum")
        return Loss(f, lambda y: y.numel())

    def fit_state(self, outputs, ex, lm, enc=None):
        k = len(lm)
        if ex is None or outputs is None:
            return {"thresholds": [0.5] * k}
        p, y = sigmoid(outputs), self.multi_hot(ex, lm)
        grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
        th = []
        for j in range(k):
            if y[:, j].sum() == 0:
                th.append(0.5)
                continue
            pred = p[:, j][None, :] >= grid[:, None]                       # (G, N)
            tp = (pred & (y[:, j] == 1)).sum(1)
            fp = (pred & (y[:, j] == 0)).sum(1)
            fn = ((~pred) & (y[:, j] == 1)).sum(1)
            f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0)
            th.append(float(grid[int(np.argmax(f1))]))              # first best: the lowest threshold among ties
        return {"thresholds": th}

    @staticmethod
    def _prf(tp, fp, fn):
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 0.0)
            r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1e-12), 0.0)
            f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
        return p, r, f

    def metrics(self, outputs, ex, lm, enc=None, state=None, ci=True):
        from .metrics import _auroc_binary, macro

        th = np.asarray((state or {}).get("thresholds") or [0.5] * len(lm))
        p, y = sigmoid(outputs), self.multi_hot(ex, lm)
        pred = p >= th[None, :]
        yb = y.astype(bool)
        tp, fp, fn = (pred & yb), (pred & ~yb), (~pred & yb)
        mp, mr, mf = self._prf(tp.sum(), fp.sum(), fn.sum())
        lp, lr, lf = self._prf(tp.sum(0), fp.sum(0), fn.sum(0))
        aucs = [_auroc_binary(y[:, j].astype(int), p[:, j]) for j in range(len(lm))]
        present = [a for a in aucs if a is not None]
        seen = tp.sum(0) + fp.sum(0) + fn.sum(0)              # macro: over labels given or predicted
        m = {"n": len(ex), "f1_micro": float(mf), "precision_micro": float(mp), "recall_micro": float(mr),
             "f1_macro": float(macro(lf, seen)), "precision_macro": float(macro(lp, seen)),
             "recall_macro": float(macro(lr, seen)),
             "auroc_macro": float(np.mean(present)) if present else None,
             "subset_accuracy": float((pred == yb).all(1).mean()), "hamming_loss": float((pred != yb).mean()),
             "per_label_f1": {str(l): float(v) for l, v in zip(lm.labels, lf)},
             "thresholds": {str(l): float(t) for l, t in zip(lm.labels, th)}, "labels": [str(l) for l in lm.labels]}
        m.update(f1=m["f1_micro"], precision=m["precision_micro"], recall=m["recall_micro"], auroc=m["auroc_macro"],
                 accuracy=m["subset_accuracy"])
        if ci:
            m["_ci"] = self._bootstrap(tp, fp, fn, y, p)
        return m

    def _bootstrap(self, tp, fp, fn, y, p, n_boot=1000, seed=0):
        from .metrics import _auroc_resampled, macro, nanmean_classes

        n = len(y)
        if n == 0:
            return {}
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        out = {}
        res = {}
        # micro: sum over examples and labels; macro: per label then mean
        tpe, fpe, fne = tp.sum(1), fp.sum(1), fn.sum(1)                      # (N,)
        _, _, res["f1_micro"] = self._prf(tpe[idx].sum(1), fpe[idx].sum(1), fne[idx].sum(1))
        f_per, seen = [], []
        for j in range(y.shape[1]):
            tpj, fpj, fnj = tp[:, j][idx].sum(1), fp[:, j][idx].sum(1), fn[:, j][idx].sum(1)
            f_per.append(self._prf(tpj, fpj, fnj)[2])
            seen.append(tpj + fpj + fnj)
        res["f1_macro"] = macro(np.stack(f_per, axis=1), np.stack(seen, axis=1))
        aucs = [_auroc_resampled(y[:, j].astype(np.int64), p[:, j], idx) for j in range(y.shape[1])
                if 0 < y[:, j].sum() < n]
        if aucs:
            res["auroc_macro"] = nanmean_classes(aucs)
        res["f1"], res["auroc"] = res["f1_micro"], res.get("auroc_macro")
        for name, vals in res.items():
            if vals is None:
                continue
            vals = vals[~np.isnan(vals)]
            if len(vals):
                out[name] = [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]
        return out

    def prediction_columns(self, outputs, lm, enc=None, state=None, texts=None):
        th = np.asarray((state or {}).get("thresholds") or [0.5] * len(lm))
        p = sigmoid(outputs)
        pred = p >= th[None, :]
        cols = {"predicted_labels": ["|".join(str(lm.labels[j]) for j in np.flatnonzero(r)) for r in pred]}
        for j, lab in enumerate(lm.labels):
            cols[f"prob_{lab}"] = p[:, j]
        return cols


# ======================================================================================================
class NER(Task):
    """Token classification with BIO tags; see :mod:`clintune.ner` for reading and aligning words."""

    name = "ner"
    token_level = True

    def label_items(self, labels):
        return list(labels)

    def strata(self, labels):
        return [str(any(t != "O" for t in tags)) for tags in labels]

    def label_map(self, labels, cfg, source):
        tags = sorted({t for tags in labels for t in tags} | {"O"}, key=lambda t: (t != "O", t[2:], t[:1]))
        return LabelMap(tags)

    def targets(self, ex, lm, enc=None):
        from .ner import subtoken_targets

        return TokenTargets(subtoken_targets(ex, lm, enc))

    def loss(self, lm, targets, class_weights):
        w = None
        if class_weights:
            flat = np.concatenate([t[t != IGNORE] for t in targets.values])
            counts = np.bincount(flat, minlength=len(lm)).astype(np.float64)
            w = torch.tensor(len(flat) / (len(lm) * np.maximum(counts, 1)), dtype=torch.float32)

        def f(logits, y):
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                                               weight=None if w is None else w.to(logits.device), reduction="sum")

        def norm(y):
            valid = y[y != IGNORE].cpu()
            return valid.numel() if w is None else w[valid].sum()
        return Loss(f, norm)

    def output_loss(self, outputs, ex, lm, enc) -> float:
        t = self.targets(ex, lm, enc)
        tot, n = 0.0, 0
        for o, y in zip(outputs, t.values):
            m = y != IGNORE
            if m.any():
                tot += float(nn.functional.cross_entropy(torch.as_tensor(o[m]), torch.as_tensor(y[m]), reduction="sum"))
                n += int(m.sum())
        return tot / max(n, 1)

    def word_tags(self, outputs, ex_or_words, lm, enc) -> list[list[str]]:
        from .ner import word_predictions

        return word_predictions(outputs, enc, lm)

    def metrics(self, outputs, ex, lm, enc=None, state=None, ci=True):
        from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
        from seqeval.metrics.sequence_labeling import get_entities

        gold = [list(t) for t in ex.labels]
        pred = self.word_tags(outputs, ex, lm, enc)
        m = {"n": len(ex), "n_entities": int(sum(len(get_entities(g)) for g in gold)),
             "precision": float(precision_score(gold, pred, zero_division=0)),
             "recall": float(recall_score(gold, pred, zero_division=0)),
             "f1": float(f1_score(gold, pred, zero_division=0)),
             "f1_macro": float(f1_score(gold, pred, average="macro", zero_division=0)),
             "token_accuracy": float(np.mean([a == b for g, p in zip(gold, pred) for a, b in zip(g, p)])),
             "auroc": None, "labels": [str(l) for l in lm.labels]}
        m["f1_micro"], m["accuracy"] = m["f1"], m["token_accuracy"]
        rep = classification_report(gold, pred, output_dict=True, zero_division=0)
        m["per_type"] = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                             "support": int(v["support"])} for k, v in rep.items() if "avg" not in k}
        if ci:
            m["_ci"] = self._bootstrap(gold, pred)
        return m

    @staticmethod
    def _bootstrap(gold, pred, n_boot=1000, seed=0):
        from seqeval.metrics.sequence_labeling import get_entities

        counts = np.zeros((len(gold), 3))
        for i, (g, p) in enumerate(zip(gold, pred)):
            ge, pe = set(get_entities(g)), set(get_entities(p))
            counts[i] = (len(ge & pe), len(pe - ge), len(ge - pe))
        if not len(gold):
            return {}
        idx = np.random.default_rng(seed).integers(0, len(gold), size=(n_boot, len(gold)))
        tp, fp, fn = (counts[:, k][idx].sum(1) for k in range(3))
        p, r, f = MultiLabel._prf(tp, fp, fn)
        return {name: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]
                for name, v in (("precision", p), ("recall", r), ("f1", f))}

    def prediction_columns(self, outputs, lm, enc=None, state=None, texts=None):
        from .ner import entities_from_tags

        tags = self.word_tags(outputs, None, lm, enc)
        ents = [entities_from_tags(t, offs, text) for t, offs, text in zip(tags, enc.word_offsets, texts)]
        return {"entities": [json.dumps(e, ensure_ascii=False) for e in ents], "_tags": tags}


class TokenTargets(Targets):
    """Per-sub-token targets (list of arrays), padded with IGNORE to the batch's length."""

    def batch(self, idx, inputs):
        t = inputs["attention_mask"].shape[1]
        out = np.full((len(idx), t), IGNORE, dtype=np.int64)
        for j, i in enumerate(idx):
            v = self.values[i][:t]
            out[j, : len(v)] = v
        return torch.from_numpy(out)

    def all(self):  # pragma: no cover - NER computes its loss per example
        raise NotImplementedError


TASKS: dict[str, Task] = {t.name: t for t in (Classification(), MultiLabel(), NER())}


def get_task(name: str) -> Task:
    return TASKS[name]


@dataclass
class EvalResult:
    metrics: dict
    ci: dict


def evaluate_outputs(task: Task, outputs, ex: Examples, lm: LabelMap, enc=None, state=None) -> EvalResult:
    m = task.metrics(outputs, ex, lm, enc, state, ci=True)
    ci = m.pop("_ci", {})
    return EvalResult(m, ci)


__all__ = ["TASKS", "get_task", "Task", "Targets", "TokenTargets", "IGNORE", "evaluate_outputs", "EvalResult"]
