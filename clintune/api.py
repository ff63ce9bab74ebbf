"""The three verbs: :func:`train`, :func:`evaluate`, :func:`predict` (the CLI is a thin layer on these).

``train`` runs the whole flow of a run:

    data (load, validate, split) -> tokenize -> assemble (backbone + method + head)
      -> fit (one loop, cost meter) -> save (only what trained) -> predict test -> metrics + CIs
      -> record.json, written last, into a directory that appears complete or not at all.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import TrainConfig, build
from .cost import CostMeter
from .data import LabelMap, Splits, load_examples, prepare_splits, write_table
from .errors import ClintuneError, DataError
from .methods import METHODS, count_parameters
from .metrics import bootstrap_ci, classification_metrics
from . import __version__
from .modeling import FORMAT_VERSION, Classifier, ClintuneModel, assemble, load, save_model
from .record import environment, make_record
from .runtime import resolve_runtime, seed_everything
from .store import check_output_dir, staged_dir, write_json
from .training import TokenFeed, balanced_weights, cross_entropy, fit

log = logging.getLogger("clintune")


@dataclass
class TrainResult:
    record: dict
    classifier: Classifier | None
    out: Path | None
    #: per test example: ``row`` (1-based row of its file), ``gold``, ``predicted_label``, ``prob_<label>``...
    #: (the same table as ``test_predictions.csv``; no text). Paired tests between runs use it.
    predictions: pd.DataFrame | None = None

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]

    @property
    def cost(self) -> dict:
        return self.record["cost"]


def val_scorer(metric: str, y_val: np.ndarray, positive_index: int | None):
    """logits -> score where higher is better, for early stopping and best-epoch selection."""
    import torch

    from .modeling import softmax

    def score(logits: np.ndarray) -> float:
        if metric == "loss":
            return -float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_val)))
        m = classification_metrics(y_val, softmax(logits), positive_index)
        v = m.get(metric)
        return float("-inf") if v is None else float(v)
    return score


def _predictions_frame(split_rows: np.ndarray, gold: np.ndarray | None, proba: np.ndarray, lm: LabelMap) -> pd.DataFrame:
    df = pd.DataFrame({"row": split_rows})
    if gold is not None:
        df["gold"] = lm.decode(gold)
    df["predicted_label"] = lm.decode(proba.argmax(1))
    for j, lab in enumerate(lm.labels):
        df[f"prob_{lab}"] = proba[:, j]
    return df


def train(cfg: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train one model as ``cfg`` says; write ``cfg.out`` (if set); return the record and classifier."""
    if cfg is None:
        cfg = build(TrainConfig, overrides=overrides, override_source="train()")
    elif overrides:
        cfg = cfg.replace(**overrides)
    runtime = resolve_runtime(cfg.device, cfg.precision, cfg.threads)
    if cfg.out:
        check_output_dir(cfg.out, cfg.overwrite)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    splits = prepare_splits(cfg)
    lm = splits.label_map
    log.info("data: %d train, %d validation, %d test examples; %d classes", len(splits.train),
             0 if splits.val is None else len(splits.val), len(splits.test), len(lm))
    if cfg.method == "tfidf":
        runtime = resolve_runtime("cpu", "fp32", cfg.threads)
        rcfg = cfg.replace(backbone="tfidf", head="linear", precision="fp32", device="cpu")
        run = lambda: _train_tfidf(rcfg, runtime, splits, t_start)  # noqa: E731
    else:
        seed_everything(cfg.seed)
        asm = assemble(cfg, len(lm), runtime, train_texts=splits.train.texts)
        rcfg = cfg.replace(lr=cfg.learning_rate, precision=runtime.precision, device=runtime.device.type,
                           **asm.resolved)
        run = lambda: _train_assembled(rcfg, runtime, splits, asm, t_start)  # noqa: E731
    try:
        return run()
    except (ClintuneError, KeyboardInterrupt):
        raise
    except Exception as e:
        if rcfg.out:
            with staged_dir(rcfg.out, overwrite=True) as tmp:
                write_json(tmp / "record.json", make_record(rcfg.to_dict(), "failed", data=splits.info,
                                                            env=environment(runtime),
                                                            error=f"{type(e).__name__}: {e}"))
        raise


class _Inputs:
    """How a run's texts reach the model: token ids through the encoder, or cached frozen features."""

    def __init__(self, cfg: TrainConfig, runtime, splits: Splits, asm) -> None:
        from .cache import FeatureCache, default_cache_dir

        self.cfg, self.runtime, self.splits, self.asm = cfg, runtime, splits, asm
        self.cached = cfg.method == "frozen" and cfg.cache
        self.cache = FeatureCache(cfg.cache_dir or default_cache_dir()) if self.cached else None
        self.hits: dict[str, bool] = {}
        self.truncated: dict[str, int] = {}

    def _features(self, name: str, texts: list[str]):
        """Cached features of ``texts`` (computed with the classifier's own batching if missing)."""
        from .batching import encode
        from .cache import cache_key, encode_into, texts_sha256, tokenizer_sha256

        cfg, model = self.cfg, self.asm.model
        enc = encode(self.asm.tokenizer, texts, cfg.max_length)
        dtype = model.feature_dtype or torch.float32
        key = cache_key(backbone=self.asm.backbone["fingerprint"], tokenizer=tokenizer_sha256(self.asm.tokenizer),
                        max_length=cfg.max_length, batch_size=cfg.eval_batch_size, dtype=str(dtype),
                        device=self.runtime.device.type, texts=texts_sha256(texts))
        model.to(self.runtime.device)
        feats = self.cache.get(key, enc, model.head.hidden_size, dtype,
                               lambda st, off: encode_into(model, enc, cfg.eval_batch_size, self.runtime, st, off))
        self.hits[name] = feats.hit
        return feats, enc

    def train_val(self):
        """(train feed, validation feed or None) for fit()."""
        from .batching import encode
        from .training import FeatureFeed, TokenFeed

        sp, cfg = self.splits, self.cfg
        if self.cached:
            feats, enc = self._features("data", sp.full.texts)
            tr, va = sp.train.rows - 1, None if sp.val is None else sp.val.rows - 1
            self.truncated.update(train=int(enc.truncated[tr].sum()),
                                  val=0 if va is None else int(enc.truncated[va].sum()))
            return FeatureFeed(feats, tr), None if va is None else FeatureFeed(feats, va)
        enc_tr = encode(self.asm.tokenizer, sp.train.texts, cfg.max_length)
        enc_va = None if sp.val is None else encode(self.asm.tokenizer, sp.val.texts, cfg.max_length)
        self.truncated.update(train=enc_tr.n_truncated, val=0 if enc_va is None else enc_va.n_truncated)
        return TokenFeed(enc_tr), None if enc_va is None else TokenFeed(enc_va)

    def test_logits(self, clf: Classifier) -> np.ndarray:
        """Test logits exactly as the saved model computes them (cached features: same bits)."""
        from .training import FeatureFeed, predict_logits

        texts = self.splits.test.texts
        if self.cached:
            feats, enc = self._features("test", texts)
            self.truncated["test"] = enc.n_truncated
            return predict_logits(clf.model, FeatureFeed(feats, np.arange(len(texts))), self.cfg.eval_batch_size,
                                  self.runtime, len(clf.label_map))
        enc = clf.encode(texts)
        self.truncated["test"] = enc.n_truncated
        return clf.logits_encoded(enc)


def _train_assembled(cfg: TrainConfig, runtime, splits: Splits, asm, t_start: float) -> TrainResult:
    from .modeling import softmax

    lm = splits.label_map
    meter = CostMeter(runtime.device)
    model: ClintuneModel = asm.model
    meter.set_params(*count_parameters(model))
    y_train = splits.encoded("train")
    inputs = _Inputs(cfg, runtime, splits, asm)
    with meter.phase("train", len(splits.train)):
        with meter.phase("prepare_inputs"):
            train_feed, val_feed = inputs.train_val()
        weights = balanced_weights(y_train, len(lm)) if cfg.class_weights else None
        y_val = None if splits.val is None else splits.encoded("val")
        fitres = fit(model, train_feed, y_train, cfg, runtime, meter, val_feed=val_feed,
                     val_score=None if y_val is None else val_scorer(cfg.val_metric, y_val, lm.positive_index),
                     loss_fn=cross_entropy(weights), num_labels=len(lm))
    meter.extra["time_to_best_s"] = round(fitres.time_to_best_s, 3)
    log.info("trained %d epoch(s), best epoch %d", fitres.epochs_run, fitres.best_epoch)
    method = METHODS[cfg.method]

    def classifier() -> Classifier:  # after saving: LoRA is merged into the weights once its adapter is saved
        inference = ClintuneModel(method.for_inference(model.encoder), model.head, backbone_trains=False,
                                  feature_dtype=model.feature_dtype)
        return Classifier(inference, asm.tokenizer, lm, cfg, runtime)

    def extra_cost() -> dict:
        if not inputs.cached:
            return {}
        return {"feature_cache": {"hits": inputs.hits, "prepare_seconds": round(meter.seconds["prepare_inputs"], 3)}}

    training = {"epochs_run": fitres.epochs_run, "best_epoch": fitres.best_epoch, "best_val_score": fitres.best_val,
                "stopped_early": fitres.stopped_early, "history": fitres.history}
    return _complete(cfg, runtime, splits, meter, t_start, classifier,
                     save=lambda d: save_model(d, asm, cfg, lm), test_proba=lambda c: softmax(inputs.test_logits(c)),
                     training=training, backbone=asm.backbone,
                     data_extra=lambda: {"truncated": inputs.truncated}, cost_extra=extra_cost)


def _train_tfidf(cfg: TrainConfig, runtime, splits: Splits, t_start: float) -> TrainResult:
    """TF-IDF + logistic regression: the same splits, metrics, cost keys, record and artifacts."""
    from .tfidf import TfidfClassifier, TfidfModel

    lm = splits.label_map
    meter = CostMeter(runtime.device)
    y_train = splits.encoded("train")
    with meter.phase("train", len(splits.train)):
        with meter.phase("train_steps", len(splits.train)):
            model = TfidfModel.fit(splits.train.texts, y_train, cfg, len(lm))
        val_score = None
        if splits.val is not None:
            with meter.phase("validate", len(splits.val)):
                val_score = val_scorer(cfg.val_metric, splits.encoded("val"), lm.positive_index)(
                    np.log(np.clip(model.predict_proba(splits.val.texts), 1e-12, None)))
    meter.set_params(*model.parameter_counts())
    meter.extra["time_to_best_s"] = round(meter.seconds["train_steps"], 3)
    meter.extra["n_features"] = model.n_features
    clf = TfidfClassifier(model, lm, cfg)

    def save(directory: Path) -> None:
        import yaml

        model.save(directory)
        (directory / "labels.json").write_text(json.dumps(lm.to_json(), indent=2) + "\n", encoding="utf-8")
        (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        (directory / "model.json").write_text(json.dumps({
            "format": FORMAT_VERSION, "clintune_version": __version__, "task": cfg.task, "method": "tfidf",
            "backbone": {"name": "tfidf", "kind": "tfidf"}, "head": "linear", "num_labels": len(lm)}, indent=2) + "\n",
            encoding="utf-8")

    training = {"epochs_run": 1, "best_epoch": 1, "best_val_score": val_score, "stopped_early": False,
                "history": [{"epoch": 1, **({"val_score": val_score} if val_score is not None else {})}]}
    return _complete(cfg, runtime, splits, meter, t_start, lambda: clf, save=save,
                     test_proba=lambda c: c.predict_proba(splits.test.texts), training=training,
                     backbone={"name": "tfidf", "kind": "tfidf"}, data_extra=dict, cost_extra=dict)


def _complete(cfg: TrainConfig, runtime, splits: Splits, meter: CostMeter, t_start: float, classifier, *, save,
              test_proba, training: dict, backbone: dict, data_extra, cost_extra) -> TrainResult:
    """Save the model, predict the test split with it, compute metrics and CIs, write record.json.

    ``classifier()`` builds the inference form of the trained model; it is called after ``save`` (for
    LoRA/IA3 the inference form has the adapter merged into the weights).
    """
    lm = splits.label_map

    def finish(directory: Path | None) -> TrainResult:
        if directory is not None:
            save(directory)
        clf = classifier()
        with meter.phase("predict", len(splits.test)):
            proba = test_proba(clf)
        y_test = splits.encoded("test")
        metrics = classification_metrics(y_test, proba, lm.positive_index, lm.labels)
        ci = bootstrap_ci(y_test, proba, lm.positive_index)
        cost = {**meter.summary(), "wall_seconds": round(time.perf_counter() - t_start, 3), **cost_extra()}
        data_info = {**splits.info, **data_extra(), "test_split_sha256": splits.test.content_hash()}
        record = make_record(cfg.to_dict(), "success", metrics=metrics, metrics_ci=ci, cost=cost, data=data_info,
                             env=environment(runtime), training=training, backbone=backbone)
        preds = _predictions_frame(splits.test.rows, y_test, proba, lm)
        if directory is not None:
            write_table(preds, directory / "test_predictions.csv")
            write_json(directory / "record.json", record)
        return TrainResult(record, clf, Path(cfg.out) if cfg.out else None, preds)

    if cfg.out:
        with staged_dir(cfg.out, cfg.overwrite) as tmp:
            return finish(tmp)
    return finish(None)


# ----------------------------------------------------------------------------------------------
# evaluate and predict
# ----------------------------------------------------------------------------------------------

def evaluate(model_dir: str | Path, data: str | Path, *, text_col: str | None = None,
             label_col: str | None = None, out: str | Path | None = None, classifier: Classifier | None = None) -> dict:
    """Metrics (with CIs) of a saved model on a labelled file; written to ``out`` if given."""
    clf = classifier or load(model_dir)
    cfg = clf.config
    ex = load_examples(data, text_col or cfg.text_col, label_col or cfg.label_col)
    lm = clf.label_map
    for label, row in zip(ex.labels, ex.rows):
        if lm.index_of(label) is None:
            raise DataError(f"{ex.source}: label '{label}' at row {row} is not one the model knows "
                            f"(labels: {', '.join(map(str, lm.labels[:20]))})")
    meter = CostMeter(clf.runtime.device)
    with meter.phase("predict", len(ex)):
        proba = clf.predict_proba(ex.texts)
    y = lm.encode(ex.labels)
    result = {"model": str(model_dir), "data": ex.source, "data_sha256": ex.content_hash(),
              "metrics": classification_metrics(y, proba, lm.positive_index, lm.labels),
              "metrics_ci": bootstrap_ci(y, proba, lm.positive_index),
              "cost": {"predict_seconds": round(meter.seconds["predict"], 3),
                       "predict_samples_per_s": meter.rate("predict")}}
    if out is not None:
        write_json(out, result)
    return result


def predict(model_dir: str | Path, data: str | Path, out: str | Path, *, text_col: str | None = None,
            batch_size: int | None = None, classifier: Classifier | None = None) -> pd.DataFrame:
    """Write ``data``'s rows plus ``predicted_label`` and ``prob_<label>`` columns to ``out``."""
    from .data import detect_format

    detect_format(out)  # fail on an unknown output format before any work
    clf = classifier or load(model_dir)
    ex = load_examples(data, text_col or clf.config.text_col, None, keep_frame=True)
    proba = clf.predict_proba(ex.texts, batch_size)
    df = ex.frame.copy()
    df["predicted_label"] = clf.label_map.decode(proba.argmax(1))
    for j, lab in enumerate(clf.label_map.labels):
        df[f"prob_{lab}"] = proba[:, j]
    write_table(df, out)
    return df
