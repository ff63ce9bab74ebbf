"""The model: backbone + adaptation method + head, composed in one place (:func:`assemble`).

    input_ids, attention_mask --encoder (+ method)--> token states (B, T, H) --head--> logits (B, K)

:class:`Classifier` is what users hold after training or :func:`load`: the model in its inference
form (LoRA/IA3 merged into the weights), the tokenizer, the label map and the config, with
``predict``/``predict_proba``. A model directory holds only what was trained (see ``methods``) and is
reloaded bit-for-bit: the same inputs give the same probabilities as before saving.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .backbones import (BackboneSource, fingerprint, load_backbone, load_tokenizer, pretrained_pooler,
                        quiet_transformers)
from .batching import encode
from .config import TrainConfig
from .data import LabelMap
from .errors import BackboneError, ConfigError, ModelDirError
from .heads import HEADS
from .methods import METHODS
from .packing import pack
from .runtime import Runtime, resolve_runtime

FORMAT_VERSION = 1


class ClintuneModel(nn.Module):
    """encoder (possibly peft-wrapped) -> token states -> head -> logits."""

    def __init__(self, encoder: nn.Module, head: nn.Module, backbone_trains: bool = True,
                 feature_dtype: torch.dtype | None = None, first_token_only: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.backbone_trains = backbone_trains
        # the encoder's last layer computes only the first token's row, all the head reads (clintune.prune)
        self.first_token_only = first_token_only
        # Frozen backbones emit features in the run's precision (what the feature cache stores), so that
        # cached and on-the-fly features are the same numbers. None: leave the encoder's output as is.
        self.feature_dtype = feature_dtype
        # prediction runs each batch's notes packed without padding (clintune.packing; set by Classifier),
        # their position ids from first_position (packing.first_position: 0 for BERT, 2 for RoBERTa)
        self.packed = False
        self.first_position = 0
        # packed sequences padded to a few lengths (packing.rounded_rows), so oneDNN builds few products
        self.round_rows = False

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.backbone_trains:
            self.encoder.eval()  # a frozen backbone never runs dropout: its features are fixed
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, T, H) token states."""
        packed = self.packed and not torch.is_grad_enabled() and pack(input_ids, attention_mask, self.first_position,
                                                                       self.round_rows)
        with torch.set_grad_enabled(self.backbone_trains and torch.is_grad_enabled()):
            if packed:
                kwargs, layout = packed
                states = layout.unpack(self.encoder(**kwargs).last_hidden_state, self.first_token_only)
            else:
                states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return states if self.feature_dtype is None else states.to(self.feature_dtype)

    def forward(self, input_ids=None, attention_mask=None, states=None, window_owner=None) -> torch.Tensor:
        """(B, K) logits; (B, T, K) for token tasks. With ``window_owner`` the rows are windows of long notes."""
        if states is None:
            states = self.encode(input_ids, attention_mask)
        if window_owner is not None:
            return self.head.forward_windows(states, attention_mask, window_owner)
        return self.head(states, attention_mask)


def hidden_size(encoder: nn.Module) -> int:
    cfg = encoder.config
    for attr in ("hidden_size", "dim", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise BackboneError(f"backbone of type '{cfg.model_type}': cannot tell its hidden size")


@dataclass
class Assembled:
    model: ClintuneModel
    tokenizer: object
    backbone: dict                     # name, kind, location, fingerprint
    resolved: dict = field(default_factory=dict)  # config values the method resolved


def frozen_feature_dtype(method_name: str, runtime: Runtime | None) -> torch.dtype | None:
    """Frozen backbones hand the head features in the run's compute precision (bf16/fp16), else as is."""
    if method_name != "frozen" or runtime is None or runtime.precision == "fp32":
        return None
    return runtime.dtype


def trim_last_layer(encoder: nn.Module, head: nn.Module, cfg: TrainConfig) -> bool:
    """Where the head reads only the first token (``--pooling cls``, no token-level part) of an encoder that
    runs on every batch (not ``frozen``, whose cached features are every token's), make its last layer
    compute that row alone (:mod:`clintune.prune`: the same numbers, about 1/7 less work for a 6-layer
    encoder at 256 tokens). Part of ``--fast``; True if done."""
    from .prune import first_token_only, head_reads_first_token_only

    return (cfg.fast and "first_token" not in (cfg.fast_off or ()) and METHODS[cfg.method].backbone_trains
            and head_reads_first_token_only(head)
            and first_token_only(encoder))


def assemble(cfg: TrainConfig, num_labels: int, runtime: Runtime | None = None,
             train_texts: list[str] | None = None) -> Assembled:
    """Build backbone + method + head for ``cfg``: the single place where the three parts meet.

    ``train_texts`` (the training split) is needed only by scratch-* backbones, whose tokenizer is
    learned from it.
    """
    from .scratch import build_scratch, is_scratch

    method = METHODS[cfg.method]
    if is_scratch(cfg.backbone):
        if train_texts is None:
            raise ValueError("scratch backbones need the training texts to learn their tokenizer")
        encoder, tokenizer = build_scratch(cfg, train_texts)
        src = BackboneSource(cfg.backbone, "", "scratch")
    else:
        encoder, tokenizer, src = load_backbone(cfg.backbone)
    pooler = pretrained_pooler(encoder)
    base_fp = fingerprint(encoder) if method.needs_base else None
    resolved = method.resolved(encoder, cfg)
    encoder = method.apply(encoder, cfg.replace(**resolved) if resolved else cfg)
    head = HEADS[cfg.head](hidden_size(encoder), num_labels, cfg)
    head.init_from_backbone(float(getattr(encoder.config, "initializer_range", None) or 0.02), pooler)
    model = ClintuneModel(encoder, head, backbone_trains=method.backbone_trains,
                          feature_dtype=frozen_feature_dtype(cfg.method, runtime),
                          first_token_only=trim_last_layer(encoder, head, cfg))
    return Assembled(model, tokenizer, {"name": src.name, "kind": src.kind, "location": src.location,
                                        "fingerprint": base_fp}, resolved)


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------

def encode_for(cfg: TrainConfig, tokenizer, texts: Sequence[str], words=None, offsets=None):
    """Tokenise for the task: word-aligned for NER, windows for --long chunk, else one sequence per note."""
    if cfg.task == "ner":
        from .ner import encode_words, words_of_texts
        if words is None:
            words, offsets = words_of_texts(list(texts))
        return encode_words(tokenizer, words, cfg.max_length, offsets)
    if cfg.long == "chunk":
        from .batching import encode_chunks
        return encode_chunks(tokenizer, list(texts), cfg.max_length, cfg.chunk_overlap, cfg.max_chunks)
    return encode(tokenizer, list(texts), cfg.max_length)


class Classifier:
    """A trained model ready to use: ``predict(texts)``; ``predict_proba(texts)`` for classification tasks.

    ``predict`` returns labels (classification), label tuples (multilabel, each label's tuned threshold)
    or entity lists ``[{"start", "end", "label", "text"}]`` with character offsets (NER).
    """

    def __init__(self, model: ClintuneModel, tokenizer, label_map: LabelMap, config: TrainConfig,
                 runtime: Runtime | None = None, state: dict | None = None) -> None:
        from .tasks import get_task

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label_map = label_map
        self.config = config
        self.task = get_task(config.task)
        self.state = state or {}
        self.runtime = runtime or resolve_runtime(config.device, config.precision, allow_distributed=False)
        self.model.requires_grad_(False).to(self.runtime.device)
        self.speedups = None
        if self.runtime.device.type == "cpu" and config.fast:
            from .fast import accelerate

            # the training speed-ups that hold without gradients: weights stored once in bf16 (autocast would
            # cast them at every batch; no fp32 copy kept) through oneDNN, the attention kernel, the heap reused
            self.speedups = accelerate(self.model, self.runtime, restorable=False, off=config.fast_off)
        self.int8_linears = 0
        self.calibration: dict | None = None     # --quantize int8-static: the ranges in use (calibrate())
        if config.quantize in ("int8", "int8-static"):
            from .quantize import quantize_int8, require_cpu

            require_cpu(config.quantize, self.runtime.device)
            self.int8_linears = quantize_int8(self.model.encoder)
        if self.speedups is not None and "packing" not in (config.fast_off or ()) and self.runtime.precision == "bf16":
            from .fast import _attention_kernels
            from .packing import first_position

            # notes packed without padding where the compiled attention kernels take them (clintune.packing), in
            # their AMX form too; not where they step aside (AMX tiles not lent: padded batches through SDPA)
            first = first_position(self.model.encoder) if _attention_kernels() else None
            self.model.packed, self.model.first_position = first is not None, first or 0
            # bf16 alone: int8's dynamic ranges would see the filler's rows, and its first pass showed no such cost
            self.model.round_rows = self.model.packed and config.quantize == "none"

    def calibrate(self, texts: Sequence[str], words=None, offsets=None, *, source: str = "calibration notes",
                  limit: int | None = None) -> dict:
        """``--quantize int8-static``: set the static ranges (:mod:`clintune.quantize`) from up to ``limit``
        (default :data:`~clintune.quantize.CALIBRATION_NOTES`) of ``texts``, a seeded sample when there are
        more, predicted with dynamic codes; return what :func:`load` reads back (``int8_calibration.json``)."""
        from .errors import ClintuneError
        from .quantize import CALIBRATION_NOTES, calibrate, set_static

        if self.config.quantize != "int8-static":
            raise ClintuneError(f"calibrate: for --quantize int8-static, not {self.config.quantize}")
        limit = CALIBRATION_NOTES if limit is None else limit
        pick = np.arange(len(texts))
        if len(pick) > limit:
            pick = np.sort(np.random.default_rng(0).choice(len(pick), limit, replace=False))
        sub = lambda xs: None if xs is None else [xs[i] for i in pick]  # noqa: E731
        self.calibration = None
        enc = self.encode(sub(list(texts)), sub(words), sub(offsets))
        ranges = calibrate(self.model.encoder, lambda: self._outputs(enc))
        set_static(self.model.encoder, ranges, source)
        self.calibration = {"format": 2, "notes": int(len(pick)), "source": source, "ranges": ranges}
        return self.calibration

    @property
    def labels(self) -> list:
        return list(self.label_map.labels)

    def encode(self, texts: Sequence[str], words=None, offsets=None):
        return encode_for(self.config, self.tokenizer, texts, words, offsets)

    def outputs_encoded(self, enc, batch_size: int | None = None):
        """Raw outputs in input order: (N, K) logits, or for NER a (sub-tokens, K) array per text."""
        if self.config.quantize == "int8-static" and self.calibration is None:
            from .errors import ClintuneError
            raise ClintuneError("--quantize int8-static: not calibrated (Classifier.calibrate(texts), or load() "
                                "a model directory with its calibration)")
        return self._outputs(enc, batch_size)

    def _outputs(self, enc, batch_size: int | None = None):
        from .training import make_feed, predict_logits

        return predict_logits(self.model, make_feed(enc), batch_size or self.config.eval_batch_size, self.runtime,
                              len(self.label_map), token_level=self.task.token_level)

    def logits_encoded(self, enc, batch_size: int | None = None):
        return self.outputs_encoded(enc, batch_size)

    def predict_proba(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(N, K) probabilities: softmax over classes, or one sigmoid per label for multilabel."""
        if self.task.token_level:
            raise TypeError("predict_proba is for classification tasks; NER models return entities from predict()")
        out = self.outputs_encoded(self.encode(texts), batch_size)
        return softmax(out) if self.config.task == "classification" else 1.0 / (1.0 + np.exp(-out))

    def prediction_columns(self, texts: Sequence[str], batch_size: int | None = None, words=None, offsets=None) -> dict:
        enc = self.encode(texts, words, offsets)
        return self.task.prediction_columns(self.outputs_encoded(enc, batch_size), self.label_map, enc, self.state,
                                            list(texts))

    def predict(self, texts: Sequence[str], batch_size: int | None = None) -> list:
        cols = self.prediction_columns(texts, batch_size)
        if self.config.task == "classification":
            return cols["predicted_label"]
        if self.config.task == "multilabel":
            return [tuple(self.label_map.labels[self.label_map.index_of(l)] for l in s.split("|")) if s else ()
                    for s in cols["predicted_labels"]]
        return [json.loads(e) for e in cols["entities"]]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------

def save_model(directory: Path, asm: Assembled, cfg: TrainConfig, label_map: LabelMap, state: dict | None = None) -> None:
    """Write the trained parts (method-specific), the head, tokenizer, label map, task state and model.json."""
    import yaml

    if state:
        (directory / "task_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    method = METHODS[cfg.method]
    method.save(asm.model.encoder, directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in asm.model.head.state_dict().items()},
              str(directory / "head.safetensors"))
    asm.tokenizer.save_pretrained(str(directory / "tokenizer"))
    (directory / "labels.json").write_text(json.dumps(label_map.to_json(), indent=2) + "\n", encoding="utf-8")
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    meta = {"format": FORMAT_VERSION, "clintune_version": __version__, "task": cfg.task,
            "backbone": asm.backbone, "method": cfg.method, "head": cfg.head,
            "num_labels": len(label_map), "hidden_size": asm.model.head.hidden_size,
            "max_length": cfg.max_length}
    (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{path.parent}: not a clintune model directory (no {path.name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelDirError(f"{path}: corrupt (not valid JSON)") from None


def load(directory: str | Path, *, device: str | None = None, precision: str | None = None,
         quantize: str | None = None, calibration: str | Path | Sequence[str] | None = None) -> Classifier:
    """Reload a model directory written by ``clintune train`` as a :class:`Classifier`; ``device``,
    ``precision`` and ``quantize`` (``"int8"``, ``"int8-static"``: :mod:`clintune.quantize`) override what it
    was trained with. With int8-static, the ranges come from ``calibration`` (notes, or a file of them read with
    the model's text column) if given, else from the directory's ``int8_calibration.json``."""
    import yaml

    d = Path(directory)
    if not d.is_dir():
        raise ModelDirError(f"{d}: model directory not found")
    record = _read_json(d / "record.json")
    if record.get("status") != "success":
        raise ModelDirError(f"{d}: holds a {record.get('status', 'unfinished')} run "
                            f"({record.get('error', 'no model was saved')}); nothing to load")
    meta = _read_json(d / "model.json")
    if meta.get("format") != FORMAT_VERSION:
        raise ModelDirError(f"{d}: model format {meta.get('format')} is not supported by this clintune "
                            f"(expects {FORMAT_VERSION})")
    try:
        cfg = TrainConfig.from_dict(yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")),
                                    source=str(d / "config.yaml"))
    except FileNotFoundError:
        raise ModelDirError(f"{d}: incomplete model directory (no config.yaml)") from None
    changes = {k: v for k, v in (("device", device), ("precision", precision), ("quantize", quantize)) if v}
    if not device and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        # trained on a GPU, used where there is none: predict on the CPU (fp16 is GPU-only: the CPU's best)
        changes["device"] = "cpu"
        if not precision and cfg.precision == "fp16":
            changes["precision"] = "auto"
        logging.getLogger("clintune").info("%s: trained on %s; no GPU here, so it predicts on the CPU", d, cfg.device)
    if changes:
        cfg = cfg.replace(**changes)
    label_map = LabelMap.from_json(_read_json(d / "labels.json"))
    if meta["method"] == "tfidf":
        from .tfidf import TfidfClassifier, TfidfModel
        try:
            return TfidfClassifier(TfidfModel.load(d, cfg), label_map, cfg)
        except (FileNotFoundError, KeyError, ValueError):
            raise ModelDirError(f"{d}: incomplete or corrupt TF-IDF model (tfidf.json / tfidf.safetensors)") from None
    if calibration is not None and cfg.quantize != "int8-static":
        raise ConfigError(f"--calibration: for --quantize int8-static (this prediction is --quantize {cfg.quantize})")
    clf = _load_classifier(d, meta, cfg, label_map)
    if cfg.quantize == "int8-static":
        from .quantize import CALIBRATION_FILE, read_calibration, set_static

        if calibration is None:
            saved = read_calibration(d)
            set_static(clf.model.encoder, saved["ranges"], str(d / CALIBRATION_FILE))
            clf.calibration = saved
        elif isinstance(calibration, (str, Path)):
            from .data import load_examples

            ex = load_examples(calibration, cfg.text_col, None, task=cfg.task)
            clf.calibrate(ex.texts, ex.words, ex.offsets, source=Path(calibration).name)
        else:
            clf.calibrate(list(calibration))
    return clf


def _load_classifier(d: Path, meta: dict, cfg: TrainConfig, label_map: LabelMap) -> Classifier:
    method = METHODS[meta["method"]]
    bb = meta["backbone"]
    try:
        if method.needs_base:
            base, _, src = load_backbone(bb["name"])
            pretrained_pooler(base)   # the saved head has its own weights
            if bb.get("fingerprint") and fingerprint(base) != bb["fingerprint"]:
                raise ModelDirError(f"{d}: backbone '{bb['name']}' on this machine differs from the one the "
                                    "model was trained on (weights fingerprint mismatch)")
            with quiet_transformers():
                encoder = method.load(base, d)
        else:
            encoder = method.load(None, d)
        tokenizer = load_tokenizer(str(d / "tokenizer"))
        head = HEADS[meta["head"]](meta["hidden_size"], meta["num_labels"], cfg)
        head.load_state_dict(load_file(str(d / "head.safetensors")), strict=True)
    except (FileNotFoundError, OSError) as e:
        raise ModelDirError(f"{d}: incomplete model directory ({Path(getattr(e, 'filename', '') or str(e)).name} "
                            "missing)") from None
    runtime = resolve_runtime(cfg.device, cfg.precision)
    encoder = method.for_inference(encoder)
    model = ClintuneModel(encoder, head, backbone_trains=False,
                          feature_dtype=frozen_feature_dtype(meta["method"], runtime),
                          first_token_only=trim_last_layer(encoder, head, cfg))
    state = _read_json(d / "task_state.json") if (d / "task_state.json").exists() else {}
    return Classifier(model, tokenizer, label_map, cfg, runtime, state)
