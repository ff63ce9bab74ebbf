"""The ``clintune`` command. Flags of ``train`` are generated from :class:`clintune.config.TrainConfig`.

User errors print one line (``clintune: error: ...``) on stderr and exit 2; Ctrl-C exits 130; an
unexpected failure prints one line and exits 1 (``CLINTUNE_DEBUG=1`` shows its traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .errors import ClintuneError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("clintune")
    logger.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("clintune: %(message)s"))
    logger.addHandler(h)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


#: commands that tokenise in this process: the Rust tokenizer's thread pool on (for the speed benchmark's 797
#: test notes, encode_batch took 0.17 s on 2 cores against 0.33 s on one). The others (bench, tune) start worker
#: processes, each with its share of the cores: off there, which also silences tokenizers' warning at a fork.
_TOKENISING = ("train", "evaluate", "predict", "demo")


def _tokenizer_threads(command: str | None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if command in _TOKENISING else "false")


def _quiet_libraries() -> None:
    for cat in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=cat)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", module="peft.*")
    warnings.filterwarnings("ignore", module="transformers.*")


def _fmt(v, digits=4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_metrics(metrics: dict, ci: dict | None = None) -> str:
    ci = ci or {}
    if "subset_accuracy" in metrics:           # multilabel
        names = ["f1_micro", "f1_macro", "precision_micro", "recall_micro", "auroc_macro", "subset_accuracy"]
    elif "n_entities" in metrics:              # NER: entity-level
        names = ["precision", "recall", "f1", "token_accuracy"]
    else:
        names = ["accuracy", "precision", "recall", "f1", "auroc"]
        if "f1_macro" in metrics and len(metrics.get("labels", [])) > 2:
            names += ["f1_micro", "f1_macro"]
    lines = []
    for n in names:
        if n not in metrics:
            continue
        lo_hi = ci.get(n)
        extra = f"  [95% CI {lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else ""
        lines.append(f"  {n:<15} {_fmt(metrics[n])}{extra}")
    return "\n".join(lines)


def format_cost(cost: dict) -> str:
    keys = [("train_seconds", "train time (s)"), ("train_samples_per_s", "train samples/s"),
            ("predict_samples_per_s", "predict samples/s"), ("peak_rss_mb", "peak RSS (MB)"),
            ("peak_gpu_mb", "peak GPU (MB)"), ("trainable_params", "trainable params"),
            ("total_params", "total params")]
    lines = []
    for k, label in keys:
        if k in cost and cost[k] is not None:
            v = cost[k]
            lines.append(f"  {label:<18} {v:,}" if isinstance(v, int) else f"  {label:<18} {_fmt(v, 2)}")
    return "\n".join(lines)


def print_train_summary(record: dict, out: str | None) -> None:
    cfg = record["config"]
    print(f"{cfg['backbone']} + {cfg['method']} + {cfg['head']} head, "
          f"{record['data'].get('n_train')} train / {record['data'].get('n_test')} test examples")
    print("test metrics:")
    print(format_metrics(record["metrics"], record.get("metrics_ci")))
    print("cost:")
    print(format_cost(record["cost"]))
    if out:
        print(f"model and record.json written to {out}")
    else:
        print("model not saved (no --out given)")


# ----------------------------------------------------------------------------------------------

def _cmd_train(args) -> int:
    from . import config as C
    from .api import train

    given = {k: v for k, v in vars(args).items() if k in {f.name for f in C.dataclasses.fields(C.TrainConfig)}}
    yaml_values = C.read_yaml(args.config) if args.config else None
    cfg = C.build(C.TrainConfig, yaml_values=yaml_values, yaml_source=str(args.config), overrides=given)
    res = train(cfg)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if res.out is not None or not cfg.out:     # rank 0 (or a single process) reports
        if res.record.get("metrics"):
            print_train_summary(res.record, cfg.out)
    return 0


def _cmd_evaluate(args) -> int:
    from .api import evaluate

    res = evaluate(args.model, args.data, text_col=args.text_col, label_col=args.label_col, out=args.out,
                   quantize=args.quantize, device=args.device,
                   calibration=args.calibration)
    print(f"{res['data']}: {res['metrics']['n']} examples")
    print(format_metrics(res["metrics"], res["metrics_ci"]))
    print(f"  predict samples/s {res['cost']['predict_samples_per_s']}")
    if args.out:
        print(f"metrics written to {args.out}")
    return 0


def _cmd_predict(args) -> int:
    from .api import predict
    from .errors import ConfigError

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError("--batch-size: must be >= 1")
    df = predict(args.model, args.data, args.out, text_col=args.text_col, batch_size=args.batch_size,
                 quantize=args.quantize, device=args.device,
                 calibration=args.calibration)
    if "predicted_label" in df:
        from .data import is_shown

        counts = df["predicted_label"].astype(str).value_counts().to_dict()
        if all(is_shown(k) for k in counts):
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        else:       # a model whose labels look like note text: counts only
            detail = f"{len(counts)} distinct labels"
    elif "predicted_labels" in df:
        detail = f"{sum(1 for s in df['predicted_labels'] if s)} with at least one label"
    else:
        import json
        detail = f"{sum(len(json.loads(e)) for e in df['entities'])} entities"
    print(f"{len(df)} predictions written to {args.out} ({detail})")
    return 0


def _cmd_cache_clear(args) -> int:
    from .cache import clear, default_cache_dir

    root = args.cache_dir or default_cache_dir()
    n, size, other = clear(root)
    print(f"removed {n} feature-cache entr{'y' if n == 1 else 'ies'} ({size / 2 ** 20:.1f} MB) from {root}"
          + (f"; left {other} other item(s) there, which are not cache entries" if other else ""))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, epochs=args.epochs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import DEVICES, QUANTIZE, TrainConfig, add_arguments

    p = _Parser(prog="clintune", description="Clinical text classification under tight compute and data limits.")
    p.add_argument("--version", action="version", version=f"clintune {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a classifier and write its model directory and record.json",
                       description="Train a classifier. Every flag can also be a key of --config FILE.yaml "
                                   "(flags override the file).")
    t.add_argument("--config", metavar="FILE.yaml", help="YAML file holding any of the options below")
    add_arguments(t, TrainConfig)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="metrics of a saved model on a labelled file")
    e.add_argument("--model", required=True, metavar="DIR")
    e.add_argument("--data", required=True, metavar="FILE")
    e.add_argument("--text-col", default=None, help="(default: the model's)")
    e.add_argument("--label-col", default=None, help="(default: the model's)")
    e.add_argument("--out", default=None, metavar="FILE.json", help="also write the metrics here")
    e.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("predict", help="predict labels and probabilities for a file of notes")
    pr.add_argument("--model", required=True, metavar="DIR")
    pr.add_argument("--data", required=True, metavar="FILE")
    pr.add_argument("--out", required=True, metavar="FILE", help="output file (.csv/.tsv/.jsonl/.parquet)")
    pr.add_argument("--text-col", default=None, help="(default: the model's)")
    pr.add_argument("--batch-size", type=int, default=None, metavar="N",
                    help="notes per batch, >= 1 (default: the model's eval_batch_size)")
    pr.set_defaults(func=_cmd_predict)

    for sp in (e, pr):
        sp.add_argument("--quantize", choices=QUANTIZE, default=None,
                        help="int8: the encoder's linear layers in int8 on CPU; int8-static: also the feed-forward "
                             "activations on calibrated ranges (default: the model's; see train --help)")
        sp.add_argument("--calibration", default=None, metavar="FILE",
                        help="with --quantize int8-static: notes (the model's text column) to calibrate the ranges "
                             "on, up to 256 of them (default: the ranges saved with the model)")
        sp.add_argument("--device", choices=DEVICES, default=None,
                        help="(default: where the model trained, the CPU where that GPU is absent)")

    c = sub.add_parser("cache-clear", help="delete the frozen-backbone feature cache (it holds note-derived states)")
    c.add_argument("--cache-dir", default=None, help="(default: $CLINTUNE_CACHE_DIR or ~/.cache/clintune/features)")
    c.set_defaults(func=_cmd_cache_clear)

    d = sub.add_parser("demo", help="train LoRA on MiniLM for the built-in ICD-10-CM circulatory task (~2 min on CPU)")
    d.add_argument("--out", default="runs/demo", metavar="DIR", help="model directory (replaced; default runs/demo)")
    d.add_argument("--epochs", type=int, default=None, metavar="N", help="(default 3)")
    d.set_defaults(func=_cmd_demo)

    from .sweep.cli import add_commands  # bench, runs, report, tune
    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("CLINTUNE_DEBUG", "") not in ("", "0")
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    _tokenizer_threads(getattr(args, "command", None))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.quiet)
    try:
        return int(args.func(args) or 0)
    except ClintuneError as e:
        if debug:
            raise
        print(f"clintune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("clintune: interrupted (nothing incomplete was left looking complete)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except Exception as e:  # an internal error: one line unless debugging
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"clintune: internal error: {type(e).__name__}: {msg} (set CLINTUNE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
