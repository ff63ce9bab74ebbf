"""Typed, validated configuration: the single source of CLI flags, YAML keys and the saved config.

Each field of a config dataclass is at once
  * a command-line flag (``lora_r`` -> ``--lora-r``; booleans get ``--x/--no-x``),
  * a YAML key (``lora_r: 16`` in ``--config run.yaml``), and
  * a key of ``config`` in the run record (``record.json``) and ``config.yaml`` of a model directory.

Precedence: dataclass default < YAML file < command-line flag. Every value is type-checked and
range-checked with an error that names the flag or key (see :class:`clintune.errors.ConfigError`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def option(default: Any = None, help: str = "", *, choices: tuple | None = None, group: str = "options",
           default_factory: Any = None) -> Any:
    """A config field with its CLI help, allowed values and help group."""
    meta = {"help": help, "choices": choices, "group": group}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Generic machinery (works for any config dataclass built with `option`)
# ----------------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(base type, optional?) of an annotation like ``int | None`` or ``list[str]``."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        tp = args[0]
    return tp, optional


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming ``where``."""
    base, optional = _base_type(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ConfigError(f"{where}: expected a list of names, got {value!r}")
        return [str(v) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value) if isinstance(value, (int, str)) else _raise()
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _raise():
    raise ValueError


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_arguments(parser: argparse.ArgumentParser, cls, *, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``cls``; defaults are SUPPRESSed so we can tell what was given."""
    hints = _hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        meta = f.metadata
        group = groups.setdefault(meta.get("group", "options"), parser.add_argument_group(meta.get("group", "options")))
        base, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = meta.get("help", "")
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        if typing.get_origin(base) is list:
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["metavar"] = {int: "N", float: "X"}.get(base, "VALUE") if not meta.get("choices") else None
        group.add_argument(_flag(f.name), **kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value at the top level")
    return data


def build(cls, *, yaml_values: dict[str, Any] | None = None, yaml_source: str = "config",
          overrides: dict[str, Any] | None = None, override_source: str = "flag"):
    """Instantiate ``cls`` from defaults < YAML values < overrides, with errors naming the source."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    yaml_keys: dict[str, str] = {}          # field -> the key as the YAML file spells it
    for key, value in (yaml_values or {}).items():
        k = str(key).replace("-", "_")
        if k not in names:
            close = [n for n in names if n.startswith(k[:4])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{yaml_source}: unknown key '{key}'{hint}")
        values[k] = _coerce(value, hints[k], f"{yaml_source}: {key}")
        yaml_keys[k] = str(key)
    for k, value in (overrides or {}).items():
        where = _flag(k) if override_source == "flag" else f"{override_source}: {k}"
        if k not in names:
            raise ConfigError(f"unknown option {where}")
        values[k] = _coerce(value, hints[k], where)
        yaml_keys.pop(k, None)
    try:
        return cls(**values)
    except ConfigError as e:
        name = getattr(e, "option", None)
        if name in yaml_keys:               # the bad value came from the file: name the file and its key
            raise ConfigError(f"{yaml_source}: {yaml_keys[name]}: {e.detail}") from None
        raise
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(str(e)) from None


def to_dict(cfg) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def option_error(name: str, detail: str) -> ConfigError:
    """``--flag-name: detail``, remembering the option, so that :func:`build` can name the YAML file and
    key instead where the value came from a file."""
    e = ConfigError(f"{_flag(name)}: {detail}")
    e.option, e.detail = name, detail
    return e


def check_choice(cfg, name: str, choices) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise option_error(name, f"'{value}' is not one of {', '.join(map(str, choices))}")


def check_finite(cfg) -> None:
    """Refuse NaN and infinities in every float option (every comparison with NaN is false, so a range
    check alone lets it through)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise option_error(f.name, f"{v} is not a finite number")


def check_range(cfg, name: str, lo=None, hi=None, *, lo_open=False, hi_open=False) -> None:
    v = getattr(cfg, name)
    if v is None:
        return
    if isinstance(v, float) and not math.isfinite(v):
        raise option_error(name, f"{v} is not a finite number")
    bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi)))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise option_error(name, f"{v} is out of range {lb}{lo if lo is not None else '-inf'}, "
                                 f"{hi if hi is not None else 'inf'}{rb}")


# ----------------------------------------------------------------------------------------------
# The training configuration
# ----------------------------------------------------------------------------------------------

TASKS = ("classification", "multilabel", "ner")
LONG = ("truncate", "chunk")
CHUNK_POOLINGS = ("mean", "max", "attention")
POOLINGS = ("mean", "cls")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZE = ("none", "int8", "int8-static")
# clintune.fast.PARTS (checked equal by the tests; not imported: torch-free config)
FAST_PARTS = ("first_token", "attention", "attention_kernel", "dropout", "bf16_weights", "lora", "qkv", "sublayer_end",
              "gelu", "memory", "arena", "blocks", "packing", "embeddings")
VAL_METRICS = ("f1", "f1_macro", "auroc", "accuracy", "loss")

#: Per-method default learning rates (used when --lr is not given). Full fine-tuning of a BERT-size
#: encoder wants ~5e-5; low-rank/scaling adapters train well at ~3e-4 (LoRA) to 3e-3 (IA3, whose
#: scaling vectors start at 1 and move slowly); a head alone on frozen features tolerates 1e-3.
DEFAULT_LR = {"full": 5e-5, "lora": 3e-4, "ia3": 3e-3, "frozen": 1e-3}
#: A small encoder trained from random weights (scratch-*) wants a larger step, with the warm-up.
DEFAULT_LR_SCRATCH = 1e-3
#: Seeds go to random, numpy (which takes 0 <= seed < 2**32), torch and PYTHONHASHSEED (the same range).
MAX_SEED = 2 ** 32 - 1
#: The longest --max-length an embedded backbone reads: its position embeddings (the minilm checkpoint's
#: max_position_embeddings). Other backbones are checked against their config when loaded.
EMBEDDED_MAX_LENGTH = {"minilm": 512}


@dataclass
class TrainConfig:
    """Everything that defines a training run. Field name = YAML key = ``--flag-name``."""

    # --- data ---------------------------------------------------------------------------------
    data: str | None = option(None, "training data: a .csv/.tsv/.jsonl/.parquet file, or builtin:NAME "
                              "(builtin:icd10-circulatory, builtin:icd10-chapters)", group="data")
    test_data: str | None = option(None, "separate test file; without it a stratified split of --data "
                                   "is held out", group="data")
    text_col: str = option("text", "column holding the note text", group="data")
    label_col: str = option("label", "column holding the label (strings or integers)", group="data")
    task: str = option("classification", "classification (binary/multi-class, inferred from the labels), "
                       "multilabel (label sets) or ner (CoNLL/BIO or JSONL spans)", choices=TASKS, group="data")
    label_sep: str = option("|", "separator of the labels in a multilabel label cell", group="data")
    val_data: str | None = option(None, "separate validation file (default: carved from --data by --val-size)",
                                  group="data")
    test_size: float = option(0.3, "fraction held out for test when --test-data is not given "
                              "(0.3: the seed study's 70/30)", group="data")
    val_size: float = option(0.1, "fraction of the training split carved out for validation/early "
                             "stopping (0 disables)", group="data")
    train_fraction: float = option(1.0, "train on this stratified fraction of the training split "
                                   "(learning curves); test stays whole", group="data")
    allow_duplicates: bool = option(False, "allow identical texts in train and test (leakage)", group="data")
    positive_label: str | None = option(None, "for binary tasks, the label counted as positive for "
                                        "precision/recall/F1/AUROC (default: the larger label, e.g. 1)",
                                        group="data")

    # --- model = backbone + method + head ---------------------------------------------------
    backbone: str = option("minilm", "encoder: 'minilm' (embedded), a local directory, or a Hugging "
                           "Face Hub id (needs network unless cached; HF_HUB_OFFLINE is respected)",
                           group="model")
    method: str = option("lora", "adaptation method: full, frozen, lora, ia3; or tfidf (TF-IDF n-grams + "
                         "logistic regression, no encoder)", group="model")
    head: str = option("mlp", "classification head: mlp (dense + tanh + linear), pooler (BERT's pooler + "
                       "classifier, as transformers trains it), linear, or the seed study's adapter, "
                       "lightweight, tinyattention, grn", group="model")
    pooling: str = option("mean", "how token states become one vector for pooled heads",
                          choices=POOLINGS, group="model")
    max_length: int = option(256, "maximum tokens per note, or per window with --long chunk (truncated "
                             "notes are counted in the record)", group="model")
    long: str = option("truncate", "notes longer than --max-length: truncate, or chunk into overlapping "
                       "windows that are encoded and pooled (the whole note is classified)", choices=LONG,
                       group="model")
    chunk_overlap: int = option(64, "--long chunk: tokens shared by consecutive windows", group="model")
    chunk_pooling: str = option("mean", "--long chunk: how window representations become one: mean, max or "
                                "attention (learned weights)", choices=CHUNK_POOLINGS, group="model")
    max_chunks: int = option(64, "--long chunk: at most this many windows per note (the rest is counted as "
                             "truncated)", group="model")
    lora_r: int = option(8, "LoRA rank r", group="model")
    lora_alpha: float = option(16.0, "LoRA alpha (update is scaled by alpha / r)", group="model")
    lora_dropout: float = option(0.1, "dropout on the LoRA branch input", group="model")
    target_modules: list[str] | None = option(None, "modules adapted by LoRA/IA3 (default per architecture: "
                                              "query,key,value for BERT-like LoRA)", group="model")
    feedforward_modules: list[str] | None = option(None, "IA3 modules scaled on their input (default per "
                                                   "architecture)", group="model")
    head_dropout: float = option(0.1, "dropout inside the head and before its output layer", group="model")
    head_dim: int = option(64, "bottleneck width r of the adapter, lightweight and grn heads; attention width "
                           "of the tinyattention head", group="model")
    head_heads: int = option(1, "attention heads of the tinyattention head", group="model")
    scratch_layers: int | None = option(None, "layers of a scratch-* backbone (default: scratch-small 2, "
                                        "scratch-base 4)", group="model")
    scratch_hidden: int | None = option(None, "hidden size of a scratch-* backbone (default 128 / 256)", group="model")
    scratch_heads: int | None = option(None, "attention heads of a scratch-* backbone (default 2 / 4)", group="model")
    vocab_size: int = option(8000, "vocabulary size of the tokenizer learned (on the training split only) for "
                             "scratch-* backbones", group="model")
    tokenizer_model: str = option("wordpiece", "tokenizer learned for scratch-* backbones",
                                  choices=("wordpiece", "bpe"), group="model")
    tfidf_word_ngrams: int = option(2, "--method tfidf: word n-grams 1..N (character 2-5-grams are always "
                                    "added)", group="model")
    tfidf_min_df: int = option(2, "--method tfidf: keep terms seen in at least this many training notes",
                               group="model")
    tfidf_c: float = option(1.0, "--method tfidf: inverse L2 regularisation strength C of the logistic "
                            "regression", group="model")

    # --- training -----------------------------------------------------------------------------
    epochs: int = option(3, "training epochs (maximum, with early stopping)", group="training")
    batch_size: int = option(16, "training batch size", group="training")
    micro_batch_tokens: int | None = option(None, "split each batch into micro-batches of at most this many "
                                            "tokens and accumulate their gradients: the same update, a fraction "
                                            "of the memory (default when an encoder trains on CPU: 4096 for "
                                            "encoders no bigger than MiniLM-L6, 6 layers x 384, else 2048; "
                                            "0: off)",
                                            group="training")
    bucket: bool = option(True, "length-bucketed training batches: notes of similar length share a batch, so "
                          "less padding (--no-bucket: plain random batches; steady shapes fragment the heap "
                          "less, so lower peak memory, but slower when lengths vary)", group="training")
    eval_batch_size: int = option(64, "batch size for validation, test and predict", group="training")
    lr: float | None = option(None, "peak learning rate (default per method: full 5e-5, lora 3e-4, "
                              "ia3 3e-3, frozen 1e-3; scratch-* backbones 1e-3)", group="training")
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norms)",
                                 group="training")
    warmup_ratio: float = option(0.1, "fraction of steps with linear warm-up, then linear decay to 0",
                                 group="training")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)", group="training")
    patience: int = option(2, "early stopping: epochs without validation improvement before stopping "
                           "(0 disables)", group="training")
    val_metric: str = option("f1", "validation metric for early stopping and best-epoch selection",
                             choices=VAL_METRICS, group="training")
    class_weights: bool = option(False, "weight the loss by inverse class frequency", group="training")
    seed: int = option(42, "random seed (splits, initialisation, order); same seed, same metrics on CPU",
                       group="training")

    # --- runtime ------------------------------------------------------------------------------
    precision: str = option("auto", "auto picks bf16 where the CPU/GPU supports it, else fp32",
                            choices=PRECISIONS, group="runtime")
    device: str = option("auto", "where to train", choices=DEVICES, group="runtime")
    threads: int | None = option(None, "CPU threads (default: OMP_NUM_THREADS if set, else one per core, "
                                 "fewer under a container's CPU limit)", group="runtime")
    progress: bool = option(True, "show a progress bar with loss and samples/s", group="runtime")
    fast: bool = option(True, "speed-ups that keep the maths: the last layer for the first token only when the "
                        "head reads only that (--pooling cls); on CPU fast dropout masks, cache-sized attention "
                        "chunks with dropout, fused attention without gradients, bf16 storage of frozen "
                        "weights under bf16, fused LoRA linears, dropout + residual + LayerNorm and GELU passes "
                        "in bf16 training, reuse of freed memory, training's saved tensors in one reused buffer "
                        "and its large blocks mapped once and reused (--no-fast: plain PyTorch)",
                        group="runtime")
    fast_off: list[str] | None = option(None, "leave out these parts of --fast (comma-separated), to measure what "
                                        "each changes: " + ", ".join(FAST_PARTS), group="runtime")
    quantize: str = option("none", "int8: predict (the test split, clintune predict/evaluate, load) on CPU with the "
                           "encoder's linear layers in int8, weights per channel and each batch's inputs per "
                           "tensor (oneDNN): 1.4-1.5x faster measured on a CPU with AVX-512 VNNI; predictions may change "
                           "slightly, so compare with clintune evaluate. int8-static: also the feed-forward "
                           "blocks' hidden activations on ranges calibrated on up to 256 training notes (saved "
                           "with the model; --calibration FILE for a model trained without): faster, and values "
                           "beyond the ranges are clipped. Training is unaffected",
                           choices=QUANTIZE, group="runtime")
    cache: bool = option(True, "with --method frozen, encode each text once and train the head from cached "
                         "features (--no-cache re-encodes every epoch)", group="runtime")
    cache_dir: str | None = option(None, "feature cache directory (default: $CLINTUNE_CACHE_DIR or "
                                   "~/.cache/clintune/features)", group="runtime")

    # --- output -------------------------------------------------------------------------------
    out: str | None = option(None, "output directory for the model and record.json", group="output")
    overwrite: bool = option(False, "replace --out if it exists", group="output")

    def __post_init__(self) -> None:
        from .heads import HEADS
        from .methods import METHODS

        check_finite(self)
        check_choice(self, "task", TASKS)
        check_choice(self, "long", LONG)
        check_choice(self, "chunk_pooling", CHUNK_POOLINGS)
        check_range(self, "max_chunks", 1, 100_000)
        check_range(self, "chunk_overlap", 0)
        if self.long == "chunk" and self.chunk_overlap > self.max_length // 2:
            raise option_error("chunk_overlap", f"{self.chunk_overlap} is more than half of --max-length "
                                                f"{self.max_length}")
        if self.long == "chunk" and self.task == "ner":
            raise option_error("long", "chunk: classification and multilabel only (NER predicts every token)")
        if self.task != "classification" and self.method == "tfidf":
            raise option_error("method", f"tfidf: classification only (not --task {self.task})")
        if not self.label_sep:
            raise option_error("label_sep", "must not be empty")
        check_choice(self, "method", (*METHODS, "tfidf"))
        check_choice(self, "head", tuple(HEADS))
        check_choice(self, "pooling", POOLINGS)
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "device", DEVICES)
        check_choice(self, "quantize", QUANTIZE)
        for part in self.fast_off or ():
            if part not in FAST_PARTS:
                raise option_error("fast_off", f"'{part}' is not one of {', '.join(FAST_PARTS)}")
        if self.quantize != "none" and (self.method == "tfidf" or self.device == "cuda"):
            raise option_error("quantize", f"{self.quantize}: for encoders predicting on CPU "
                                           f"(not --{'method tfidf' if self.method == 'tfidf' else 'device cuda'})")
        check_choice(self, "val_metric", VAL_METRICS)
        check_range(self, "test_size", 0, 1, lo_open=True, hi_open=True)
        check_range(self, "val_size", 0, 1, hi_open=True)
        check_range(self, "train_fraction", 0, 1, lo_open=True)
        check_range(self, "max_length", 8, 100_000)
        limit = EMBEDDED_MAX_LENGTH.get(self.backbone)
        if limit is not None and self.method != "tfidf" and self.max_length > limit:
            raise option_error("max_length", f"{self.max_length} is more than the {limit} tokens the {self.backbone} "
                                             "backbone reads (its position embeddings); for longer notes use "
                                             f"--long chunk with --max-length {limit} or less")
        check_range(self, "lora_r", 1)
        check_range(self, "lora_alpha", 0, lo_open=True)
        check_range(self, "lora_dropout", 0, 1, hi_open=True)
        check_range(self, "head_dropout", 0, 1, hi_open=True)
        check_range(self, "head_dim", 1, 65536)
        check_range(self, "head_heads", 1, 1024)
        check_range(self, "epochs", 1, 10_000)
        check_range(self, "batch_size", 1)
        check_range(self, "micro_batch_tokens", 0)
        check_range(self, "eval_batch_size", 1)
        check_range(self, "lr", 0, 1, lo_open=True)
        check_range(self, "weight_decay", 0)
        check_range(self, "warmup_ratio", 0, 1)
        check_range(self, "max_grad_norm", 0)
        check_range(self, "patience", 0)
        check_range(self, "seed", 0, MAX_SEED)
        check_range(self, "threads", 1, 4096)
        check_choice(self, "tokenizer_model", ("wordpiece", "bpe"))
        check_range(self, "vocab_size", 100, 1_000_000)
        for name in ("scratch_layers", "scratch_hidden", "scratch_heads"):
            check_range(self, name, 1, 100_000)
        check_range(self, "tfidf_word_ngrams", 1, 5)
        check_range(self, "tfidf_min_df", 1)
        check_range(self, "tfidf_c", 0, lo_open=True)
        if self.backbone.startswith("scratch-") and self.method not in ("full", "tfidf"):
            raise option_error("method", f"{self.method}: a {self.backbone} backbone starts from random weights "
                                         "and is trained end to end; use --method full")
        for name in ("text_col", "label_col"):
            if not getattr(self, name):
                raise option_error(name, "must not be empty")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.backbone.startswith("scratch-"):
            return DEFAULT_LR_SCRATCH
        return DEFAULT_LR.get(self.method, 3e-4)

    def replace(self, **changes) -> "TrainConfig":
        return build(type(self), overrides={**to_dict(self), **changes}, override_source="config")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        return build(cls, yaml_values=values, yaml_source=source)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        return build(cls, yaml_values=read_yaml(path), yaml_source=str(path), overrides=overrides)
