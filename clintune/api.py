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

from . import __version__
from .config import TrainConfig, build
from .cost import CostMeter
from .data import Examples, LabelMap, Splits, load_examples, prepare_splits, write_table
from .errors import ClintuneError, DataError
from .methods import METHODS, count_parameters
from .modeling import FORMAT_VERSION, Classifier, ClintuneModel, assemble, encode_for, load, save_model
from .quantize import CALIBRATION_FILE, require_cpu
from .record import environment, make_record
from .runtime import resolve_runtime, seed_everything
from .store import check_output_dir, staged_dir, write_json
from .tasks import Task, evaluate_outputs, get_task
from .training import fit, make_feed, predict_logits

log = logging.getLogger("clintune")


@dataclass
class TrainResult:
    record: dict
    classifier: Classifier | None
    out: Path | None
    #: per test example: ``row`` (its row, or first line for CoNLL, in its file), ``gold`` and the
    #: prediction columns (``predicted_label`` + ``prob_<label>``; ``predicted_labels``; ``entities``),
    #: the same table as ``test_predictions.csv``; no note text. Paired tests between runs use it.
    predictions: pd.DataFrame | None = None

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]

    @property
    def cost(self) -> dict:
        return self.record["cost"]


def _gold_column(task: Task, ex: Examples) -> list:
    if task.name == "classification":
        return list(ex.labels)
    if task.name == "multilabel":
        return ["|".join(map(str, l)) for l in ex.labels]
    from .ner import entities_from_tags
    return [json.dumps([{k: v for k, v in e.items() if k != "text"} for e in entities_from_tags(t, o, x)])
            for t, o, x in zip(ex.labels, ex.offsets, ex.texts)]


def _predictions_frame(task: Task, ex: Examples, outputs, lm: LabelMap, enc, state: dict) -> pd.DataFrame:
    """Test predictions without text (entity spans keep their offsets, not their words)."""
    df = pd.DataFrame({"row": ex.rows, "gold": _gold_column(task, ex)})
    cols = task.prediction_columns(outputs, lm, enc, state, ex.texts)
    if "entities" in cols:
        cols["entities"] = [json.dumps([{k: v for k, v in e.items() if k != "text"} for e in json.loads(s)])
                            for s in cols["entities"]]
    for k, v in cols.items():
        if not k.startswith("_"):
            df[k] = v
    return df


def train(cfg: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train one model as ``cfg`` says; write ``cfg.out`` (if set); return the record and classifier."""
    if cfg is None:
        cfg = build(TrainConfig, overrides=overrides, override_source="train()")
    elif overrides:
        cfg = cfg.replace(**overrides)
    runtime = resolve_runtime(cfg.device, cfg.precision, cfg.threads)
    require_cpu(cfg.quantize, runtime.device)     # before training, not after it
    if cfg.out:
        check_output_dir(cfg.out, cfg.overwrite)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()
    splits = prepare_splits(cfg)
    lm = splits.label_map
    log.info("data: %d train, %d validation, %d test examples; %d %s", len(splits.train),
             0 if splits.val is None else len(splits.val), len(splits.test), len(lm),
             "tags" if cfg.task == "ner" else "labels" if cfg.task == "multilabel" else "classes")
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
    """How a run's texts reach the model: token ids through the encoder, or cached frozen features.

    The feature cache serves frozen backbones (not --long chunk, whose windows are encoded on the fly). Its
    training entry holds every row of ``--data`` (so that every seed's split reuses it): a run that computes it
    spends that time in training, test rows included, and a run that finds it spends none. Prediction is timed
    as the saved model predicts: a run that finds the test entry adds the encoding time stored with it.
    """

    def __init__(self, cfg: TrainConfig, runtime, splits: Splits, asm, meter: CostMeter) -> None:
        from .cache import FeatureCache, default_cache_dir

        self.cfg, self.runtime, self.splits, self.asm, self.meter = cfg, runtime, splits, asm, meter
        self.cached = cfg.method == "frozen" and cfg.cache and cfg.long != "chunk"
        self.cache = FeatureCache(cfg.cache_dir or default_cache_dir()) if self.cached else None
        self.hits: dict[str, bool] = {}
        self.truncated: dict[str, int] = {}
        self.enc: dict[str, object] = {}

    def encode(self, name: str, ex: Examples):
        if name not in self.enc:
            self.enc[name] = encode_for(self.cfg, self.asm.tokenizer, ex.texts, ex.words, ex.offsets)
            self.truncated[name] = self.enc[name].n_truncated
        return self.enc[name]

    def _features(self, name: str, ex: Examples):
        """Cached features of ``ex`` (computed with the classifier's own batching if missing)."""
        from .cache import cache_key, encode_into, texts_sha256, tokenizer_sha256
        from .fast import fingerprint

        cfg, model = self.cfg, self.asm.model
        enc = encode_for(cfg, self.asm.tokenizer, ex.texts, ex.words, ex.offsets)
        dtype = model.feature_dtype or torch.float32
        unit = ["\x1f".join(w) for w in ex.words] if cfg.task == "ner" else ex.texts
        key = cache_key(backbone=self.asm.backbone["fingerprint"], tokenizer=tokenizer_sha256(self.asm.tokenizer),
                        max_length=cfg.max_length, batch_size=cfg.eval_batch_size, dtype=str(dtype),
                        device=self.runtime.device.type, texts=texts_sha256(unit),
                        mode="words" if cfg.task == "ner" else "text",
                        computation=fingerprint(cfg.fast, cfg.fast_off, self.runtime.device))
        model.to(self.runtime.device)
        feats = self.cache.get(key, enc, model.head.hidden_size, dtype,
                               lambda st, off: encode_into(model, enc, cfg.eval_batch_size, self.runtime, st, off))
        self.hits[name] = feats.hit
        return feats

    def feeds(self):
        """(train feed, validation feed or None) for fit()."""
        from .training import FeatureFeed

        sp = self.splits
        if self.cached:
            feats = self._features("data", sp.full)
            train = FeatureFeed(feats, sp.train.index, bucket=self.cfg.bucket)
            if sp.val is None:
                return train, None
            if sp.val.source == sp.full.source:
                return train, FeatureFeed(feats, sp.val.index)
            return train, FeatureFeed(self._features("val", sp.val), np.arange(len(sp.val)))
        train = make_feed(self.encode("train", sp.train), bucket=self.cfg.bucket)
        return train, None if sp.val is None else make_feed(self.encode("val", sp.val))

    def test_outputs(self, clf: Classifier):
        """Test outputs exactly as the saved model computes them (cached features: the same bits)."""
        from .training import FeatureFeed

        enc = self.encode("test", self.splits.test)
        if self.cached and self.cfg.quantize == "none":     # int8 features differ from the cached ones
            feats = self._features("test", self.splits.test)
            if feats.hit:   # the encoder's time, as measured when the entry was computed: the saved model runs it
                self.meter.add("predict", feats.encode_seconds)
            return predict_logits(clf.model, FeatureFeed(feats, np.arange(len(self.splits.test))),
                                  self.cfg.eval_batch_size, self.runtime, len(clf.label_map), clf.task.token_level)
        return clf.outputs_encoded(enc)


def _train_assembled(cfg: TrainConfig, runtime, splits: Splits, asm, t_start: float) -> TrainResult:
    task = get_task(cfg.task)
    lm = splits.label_map
    meter = CostMeter(runtime.device)
    model: ClintuneModel = asm.model
    meter.set_params(*count_parameters(model))
    inputs = _Inputs(cfg, runtime, splits, asm, meter)
    from .fast import Speedups, accelerate, trim_heap
    speedups = accelerate(model, runtime, off=cfg.fast_off) if cfg.fast else Speedups()
    with meter.phase("train", len(splits.train)):
        with meter.phase("prepare_inputs"):
            enc_train = inputs.encode("train", splits.train)
            enc_val = None if splits.val is None else inputs.encode("val", splits.val)
            train_feed, val_feed = inputs.feeds()
            trim_heap()         # what tokenising freed (in the tokenizer's threads' own heaps) back before training
        targets = task.targets(splits.train, lm, enc_train)
        val_score = None if splits.val is None else task.val_score(cfg.val_metric, splits.val, lm, enc_val)
        fitres = fit(model, train_feed, targets, cfg, runtime, meter, val_feed=val_feed, val_score=val_score,
                     loss_fn=task.loss(lm, targets, cfg.class_weights), num_labels=len(lm),
                     token_level=task.token_level, arena=speedups.arena)
        learns_state = type(task).fit_state is not Task.fit_state     # e.g. multi-label thresholds
        val_out = None if val_feed is None or not learns_state else predict_logits(
            model, val_feed, cfg.eval_batch_size, runtime, len(lm), task.token_level)
        state = task.fit_state(val_out, splits.val, lm, enc_val)
    speedups.restore()     # original weights and attention back: saving and merging see the model as reloaded
    meter.extra["time_to_best_s"] = round(fitres.time_to_best_s, 3)
    if model.first_token_only:
        speedups.report["last_layer"] = "first token only"
    if speedups.report:
        meter.extra["speedups"] = speedups.report
    log.info("trained %d epoch(s), best epoch %d", fitres.epochs_run, fitres.best_epoch)
    truncated = {k: v for k, v in inputs.truncated.items()}
    if truncated.get("train") and cfg.long == "truncate" and cfg.task != "ner":
        log.warning("%d of %d training notes were cut at --max-length %d tokens (see --long chunk)",
                    truncated["train"], len(splits.train), cfg.max_length)
    method = METHODS[cfg.method]

    def classifier() -> Classifier:  # after saving: LoRA is merged into the weights once its adapter is saved
        inference = ClintuneModel(method.for_inference(model.encoder), model.head, backbone_trains=False,
                                  feature_dtype=model.feature_dtype, first_token_only=model.first_token_only)
        clf = Classifier(inference, asm.tokenizer, lm, cfg, runtime, state)
        if clf.model.packed:
            meter.extra.setdefault("speedups", {})["prediction"] = "notes packed without padding"
        if cfg.quantize == "int8-static":      # ranges from the training notes, saved beside the model
            t0 = time.perf_counter()
            tr = splits.train
            clf.calibrate(tr.texts, tr.words, tr.offsets, source="training split")
            meter.extra["int8_calibration_seconds"] = round(time.perf_counter() - t0, 3)
        return clf

    def cost_extra() -> dict:
        if not inputs.cached:
            return {}
        return {"feature_cache": {"hits": inputs.hits, "prepare_seconds": round(meter.seconds["prepare_inputs"], 3)}}

    training = {"epochs_run": fitres.epochs_run, "best_epoch": fitres.best_epoch, "best_val_score": fitres.best_val,
                "stopped_early": fitres.stopped_early, "history": fitres.history}
    return _complete(cfg, task, runtime, splits, meter, t_start, classifier,
                     save=lambda d: save_model(d, asm, cfg, lm, state), test_outputs=inputs.test_outputs,
                     test_enc=lambda: inputs.enc["test"], state=state, training=training, backbone=asm.backbone,
                     data_extra=lambda: {"truncated": dict(inputs.truncated)}, cost_extra=cost_extra)


def _train_tfidf(cfg: TrainConfig, runtime, splits: Splits, t_start: float) -> TrainResult:
    """TF-IDF + logistic regression: the same splits, metrics, cost keys, record and artifacts."""
    from .tfidf import TfidfClassifier, TfidfModel

    task = get_task(cfg.task)
    lm = splits.label_map
    meter = CostMeter(runtime.device)
    y_train = lm.encode(splits.train.labels)
    with meter.phase("train", len(splits.train)):
        with meter.phase("train_steps", len(splits.train)):
            model = TfidfModel.fit(splits.train.texts, y_train, cfg, len(lm))
        val_score = None
        if splits.val is not None:
            with meter.phase("validate", len(splits.val)):
                logp = np.log(np.clip(model.predict_proba(splits.val.texts), 1e-12, None))
                val_score = task.val_score(cfg.val_metric, splits.val, lm)(logp)
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
    return _complete(cfg, task, runtime, splits, meter, t_start, lambda: clf, save=save,
                     test_outputs=lambda c: np.log(np.clip(c.predict_proba(splits.test.texts), 1e-300, None)),
                     test_enc=lambda: None, state={}, training=training, backbone={"name": "tfidf", "kind": "tfidf"},
                     data_extra=dict, cost_extra=dict)


def _complete(cfg: TrainConfig, task: Task, runtime, splits: Splits, meter: CostMeter, t_start: float, classifier, *,
              save, test_outputs, test_enc, state: dict, training: dict, backbone: dict, data_extra,
              cost_extra) -> TrainResult:
    """Save the model, predict the test split with it, compute metrics and CIs, write record.json.

    ``classifier()`` builds the inference form of the trained model; it is called after ``save`` (for
    LoRA/IA3 the inference form has the adapter merged into the weights).
    """
    lm = splits.label_map
    if not runtime.is_main:   # under torchrun, rank 0 alone tests, saves and records
        return TrainResult(make_record(cfg.to_dict(), "success", training=training, env=environment(runtime)), None,
                           None)

    def finish(directory: Path | None) -> TrainResult:
        if directory is not None:
            save(directory)
        clf = classifier()
        with meter.phase("predict", len(splits.test)):
            outputs = test_outputs(clf)
        enc = test_enc()
        ev = evaluate_outputs(task, outputs, splits.test, lm, enc, state)
        cost = {**meter.summary(), "wall_seconds": round(time.perf_counter() - t_start, 3), **cost_extra()}
        data_info = {**splits.info, **data_extra(), "test_split_sha256": splits.test.content_hash()}
        record = make_record(cfg.to_dict(), "success", metrics=ev.metrics, metrics_ci=ev.ci, cost=cost, data=data_info,
                             env=environment(runtime), training=training, backbone=backbone)
        preds = _predictions_frame(task, splits.test, outputs, lm, enc, state)
        if directory is not None:
            if getattr(clf, "calibration", None):
                write_json(directory / CALIBRATION_FILE, clf.calibration)
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

def _outputs_for(clf, ex: Examples):
    """(outputs, encoding) of a loaded model on examples (TF-IDF: log-probabilities, no encoding)."""
    if not isinstance(clf, Classifier):
        return np.log(np.clip(clf.predict_proba(ex.texts), 1e-300, None)), None
    enc = clf.encode(ex.texts, ex.words, ex.offsets)
    return clf.outputs_encoded(enc), enc


def evaluate(model_dir: str | Path, data: str | Path, *, text_col: str | None = None,
             label_col: str | None = None, out: str | Path | None = None, classifier: Classifier | None = None,
             quantize: str | None = None, device: str | None = None, calibration: str | Path | None = None) -> dict:
    """Metrics (with CIs) of a saved model on a labelled file; written to ``out`` if given. ``quantize``
    (``"int8"``, ``"int8-static"``: :mod:`clintune.quantize`) and ``device`` override the model's;
    ``calibration``, a file of notes, sets int8-static's ranges (:func:`load`)."""
    clf = classifier or load(model_dir, quantize=quantize, device=device, calibration=calibration)
    cfg = clf.config
    task = get_task(cfg.task)
    ex = load_examples(data, text_col or cfg.text_col, label_col or cfg.label_col, task=cfg.task,
                       label_sep=cfg.label_sep)
    lm = clf.label_map
    task.check_known(ex, lm, "the evaluation data")
    meter = CostMeter(clf.runtime.device)
    with meter.phase("predict", len(ex)):
        outputs, enc = _outputs_for(clf, ex)
    ev = evaluate_outputs(task, outputs, ex, lm, enc, getattr(clf, "state", {}))
    result = {"model": str(model_dir), "data": ex.source, "data_sha256": ex.content_hash(), "metrics": ev.metrics,
              "metrics_ci": ev.ci, "cost": {"predict_seconds": round(meter.seconds["predict"], 3),
                                            "predict_samples_per_s": meter.rate("predict")}}
    if out is not None:
        write_json(out, result)
    return result


def predict(model_dir: str | Path, data: str | Path, out: str | Path, *, text_col: str | None = None,
            batch_size: int | None = None, classifier: Classifier | None = None,
            quantize: str | None = None, device: str | None = None,
            calibration: str | Path | None = None) -> pd.DataFrame:
    """Write ``data``'s rows plus the prediction columns to ``out``.

    Classification: ``predicted_label`` and ``prob_<label>``; multilabel: ``predicted_labels``
    (``|``-separated) and ``prob_<label>``; NER: ``entities`` (JSON list of {start, end, label, text},
    character offsets into the text). NER input in CoNLL format gives one row per sentence. ``quantize``
    (``"int8"``, ``"int8-static"``: :mod:`clintune.quantize`) and ``device`` override the model's;
    ``calibration``, a file of notes, sets int8-static's ranges (:func:`load`).
    """
    from .data import detect_format

    detect_format(out)  # fail on an unknown output format before any work
    clf = classifier or load(model_dir, quantize=quantize, device=device, calibration=calibration)
    cfg = clf.config
    if cfg.task == "ner" and _is_conll(data):
        from .ner import read_conll
        ex = read_conll(data)
    else:
        ex = load_examples(data, text_col or cfg.text_col, None, keep_frame=True, task=cfg.task)
    if isinstance(clf, Classifier):
        cols = clf.prediction_columns(ex.texts, batch_size, ex.words, ex.offsets)
    else:
        proba = clf.predict_proba(ex.texts)
        cols = {"predicted_label": clf.label_map.decode(proba.argmax(1)),
                **{f"prob_{lab}": proba[:, j] for j, lab in enumerate(clf.label_map.labels)}}
    df = ex.frame.copy() if ex.frame is not None else pd.DataFrame({"text": ex.texts})
    for k, v in cols.items():
        if not k.startswith("_"):
            df[k] = v
    write_table(df, out)
    return df


def _is_conll(path) -> bool:
    from .data import detect_format
    try:
        return detect_format(path)[0] == "tsv"
    except DataError:
        return True
