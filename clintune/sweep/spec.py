"""The sweep SPEC: data, a grid of training options, shared settings and an optional search.

A SPEC is a YAML file::

    name: quick                          # optional (default: the file's name)
    data:                                # the data options of `clintune train` (or just a file name)
      data: builtin:icd10-circulatory    # relative paths are relative to the SPEC file
      text_col: text
      label_col: label
    settings:                            # any training option, shared by every run
      backbone: minilm
      max_length: 48
      epochs: 2
    grid:                                # a block, or a list of blocks (their union)
      - method: frozen                   # each block is the product of its values:
        head: [linear, adapter, grn]     #   a scalar is one value, a list is an axis
      - method: lora
        lora_r: [4, 16]
        train_fraction: 0.5              # a block may pin an axis given below
    seeds: [1, 2]                        # crossed with every block that does not set `seed`
    train_fractions: [0.25, 0.5]         # crossed with every block that does not set `train_fraction`
    search: {...}                        # optional Optuna search (see SearchSpec)
    report: {baseline: ..., metric: f1}  # optional report defaults

Every grid point is a :class:`~clintune.config.TrainConfig`, validated as such (errors name the SPEC
key). Its **run id** is the sha256 of the canonical JSON of the config minus the runtime-only fields
(``out``, ``overwrite``, ``progress``, ``cache``, ``cache_dir``, ``threads``), which change how a run
executes but not what it computes: equal ids, equal runs, so a finished id is never trained again. Options
a run's method does not use (``lora_r`` of a frozen run, :data:`METHOD_ONLY`) take their defaults first.
:meth:`Spec.digest` hashes what a whole SPEC computes; a sweep directory keeps the results of one digest.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig, _base_type, read_yaml
from ..errors import ConfigError

#: Fields that change how a run executes, not what it computes: left out of the run id.
RUNTIME_ONLY = ("out", "overwrite", "progress", "cache", "cache_dir", "threads")
#: Fields the sweep sets itself for every run.
MANAGED = {"out": None, "overwrite": False, "progress": False}
TOP_KEYS = ("name", "data", "settings", "grid", "seeds", "train_fractions", "search", "report")
#: The data options that name files (resolved relative to the SPEC file, checked, hashed by the sweep).
DATA_FILES = ("data", "test_data", "val_data")
#: Metrics the report can rank by (higher is better), as runs record them.
REPORT_METRICS = ("f1", "auroc", "accuracy", "f1_macro", "f1_micro", "auroc_macro", "precision", "recall",
                  "precision_macro", "recall_macro", "precision_micro", "recall_micro", "subset_accuracy",
                  "token_accuracy")
#: Keys shown first (as bare values) in a configuration's label.
LABEL_FIRST = ("backbone", "method", "head")
ID_VERSION = 1

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
#: The data options (file, columns, task, split sizes). train_fraction is a grid axis instead.
DATA_KEYS = tuple(n for n, f in _FIELDS.items() if f.metadata.get("group") == "data" and n != "train_fraction")


# ----------------------------------------------------------------------------------------------
# ids and labels
# ----------------------------------------------------------------------------------------------

def identity(config: dict) -> dict:
    """The part of a config that decides what a run computes (runtime-only fields removed)."""
    return {k: v for k, v in config.items() if k not in RUNTIME_ONLY}


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def run_id(config: dict) -> str:
    """Stable id of a run: sha256 of its canonical config (runtime-only fields left out)."""
    return _digest({"v": ID_VERSION, "config": identity(config)})


def config_key(config: dict) -> str:
    """Id of a run's configuration across seeds (the seed left out too): what seed statistics group."""
    cfg = identity(config)
    cfg.pop("seed", None)
    return _digest({"v": ID_VERSION, "config": cfg})[:16]


#: Options that only mean something for some methods: left out of other runs' labels.
METHOD_ONLY = {"lora_r": ("lora",), "lora_alpha": ("lora",), "lora_dropout": ("lora",),
               "target_modules": ("lora", "ia3"), "feedforward_modules": ("ia3",)}


def short_value(key: str, value: Any) -> str:
    if value is None:
        return "default" if key == "lr" else "none"
    if key == "backbone" and isinstance(value, str) and ("/" in value and Path(value).is_absolute()):
        return Path(value).name or value
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def describe(config: dict, keys: list[str] | tuple[str, ...]) -> str:
    """A short human label from the keys that vary: 'minilm / lora / linear / lora_r=8 / seed=1'."""
    keys = [k for k in keys if config.get("method") in METHOD_ONLY.get(k, (config.get("method"),))]
    parts = [short_value(k, config.get(k)) for k in LABEL_FIRST if k in keys]
    parts += [f"{k}={short_value(k, config.get(k))}" for k in keys if k not in LABEL_FIRST]
    if not parts:
        parts = [short_value(k, config.get(k)) for k in LABEL_FIRST]
    return " / ".join(parts)


def label_keys(configs: list[dict], *, exclude: tuple[str, ...] = ()) -> list[str]:
    """The varying keys worth a label: those not implied by the method (e.g. epochs set per method block)."""
    keys = varying_keys(configs, exclude=exclude)
    if "method" not in keys:
        return keys
    out = []
    for k in keys:
        by_method: dict = {}
        for c in configs:
            by_method.setdefault(c.get("method"), set()).add(json.dumps(c.get(k), sort_keys=True, default=str))
        if k in LABEL_FIRST or any(len(v) > 1 for v in by_method.values()):
            out.append(k)
    return out


def varying_keys(configs: list[dict], *, exclude: tuple[str, ...] = ()) -> list[str]:
    """Keys (in TrainConfig order) whose values differ across ``configs``."""
    out = []
    for name in _FIELDS:
        if name in RUNTIME_ONLY or name in exclude:
            continue
        vals = {json.dumps(c.get(name), sort_keys=True, default=str) for c in configs}
        if len(vals) > 1:
            out.append(name)
    return out


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------

def _unflag(msg: str) -> str:
    """'--lora-r: 0 is out of range' -> 'lora_r: 0 is out of range' (SPEC keys, not flags)."""
    return re.sub(r"^--([a-z0-9-]+)", lambda m: m.group(1).replace("-", "_"), msg)


def make_config(values: dict, where: str) -> TrainConfig:
    """TrainConfig from SPEC values; a bad value raises one line naming ``where`` and the key."""
    try:
        return TrainConfig.from_dict(values, source=where)
    except ConfigError as e:
        msg = str(e)
        if not msg.startswith(where):
            msg = f"{where}: {_unflag(msg)}"
        raise ConfigError(msg) from None


def _unknown(key: str, allowed, where: str, what: str = "key") -> ConfigError:
    k = str(key)
    close = difflib.get_close_matches(k, list(allowed), n=1, cutoff=0.6)
    if not close and k.endswith("s") and k[:-1] in allowed:
        close = [k[:-1]]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown {what} '{k}'{hint}")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of option: value, got {type(value).__name__}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _check_option(key: str, where: str, *, allow_data: bool = False) -> None:
    if key not in _FIELDS:
        raise _unknown(key, _FIELDS, where, "option")
    if key in MANAGED:
        raise ConfigError(f"{where}: {key} is set by the sweep itself (each run's results go to runs.db)")
    if key in DATA_KEYS and not allow_data:
        raise ConfigError(f"{where}: {key} is a data option; put it under data:")


def _axis(key: str, value: Any, where: str) -> list:
    """A block value as the list of values it stands for."""
    base, _ = _base_type(_HINTS[key])
    is_list_field = typing.get_origin(base) is list
    if isinstance(value, list):
        if is_list_field and not all(isinstance(v, list) for v in value):
            return [value]  # a list-valued option given once: one value, not an axis
        if not value:
            raise ConfigError(f"{where}: {key}: an empty list gives no runs")
        return list(value)
    if isinstance(value, dict):
        raise ConfigError(f"{where}: {key}: expected a value or a list of values, got a mapping")
    return [value]


def _resolve_path(value: Any, base: Path | None) -> Any:
    if base is None or not isinstance(value, str) or not value or value.startswith("builtin:"):
        return value
    p = Path(value).expanduser()
    return value if p.is_absolute() else str((base / p).resolve())


# ----------------------------------------------------------------------------------------------
# the SPEC
# ----------------------------------------------------------------------------------------------

@dataclass
class Point:
    """One run of the sweep: its stable id, full config (as given to TrainConfig) and label."""

    id: str
    config: dict
    label: str = ""
    source: str = "grid"


@dataclass
class SearchSpec:
    """Optuna search as in Taylor et al. (arXiv 2402.10597): learning rate log-uniform, LoRA alpha as a
    multiple of the rank, LoRA dropout from a few values; objective: the validation metric (macro AUROC)."""

    trials: int = 20
    fixed: dict = field(default_factory=dict)
    lr: tuple[float, float] = (1e-5, 1e-3)
    lora_r: list[int] | None = None
    lora_alpha_ratio: list[float] = field(default_factory=lambda: [0.3, 0.5, 1.0])
    lora_dropout: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])
    metric: str = "auroc"
    seed: int = 0


@dataclass
class Spec:
    name: str
    data: dict
    settings: dict
    blocks: list[dict[str, list]]
    seeds: list | None = None
    train_fractions: list | None = None
    search: SearchSpec | None = None
    report: dict = field(default_factory=dict)
    source: str = "spec"
    single_block: bool = False   # grid given as one mapping (errors say "grid", not "grid[0]")

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "Spec":
        p = Path(path)
        return cls.from_dict(read_yaml(p), source=p.name, base_dir=p.resolve().parent, default_name=p.stem)

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "spec", base_dir: Path | None = None,
                  default_name: str = "sweep") -> "Spec":
        raw = {str(k): v for k, v in (raw or {}).items()}
        for k in raw:
            if k not in TOP_KEYS:
                raise _unknown(k, TOP_KEYS, source)
        name = str(raw.get("name") or default_name)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name):
            raise ConfigError(f"{source}: name: use letters, digits, '.', '_' or '-' (got {name!r})")

        data = raw.get("data")
        if data is None:
            raise ConfigError(f"{source}: data: missing (a file, builtin:NAME, or a mapping with data: FILE)")
        data = {"data": data} if isinstance(data, str) else _mapping(data, f"{source}: data")
        for k in data:
            if k not in DATA_KEYS:
                hint = "" if k not in _FIELDS else " (a training option: put it under settings: or grid:)"
                if hint:
                    raise ConfigError(f"{source}: data: {k} is not a data option{hint}")
                raise _unknown(k, DATA_KEYS, f"{source}: data")
        if not data.get("data"):
            raise ConfigError(f"{source}: data: data: missing (the training file or builtin:NAME)")
        for k in DATA_FILES:
            data[k] = _resolve_path(data.get(k), base_dir) if data.get(k) is not None else None
        data = {k: v for k, v in data.items() if v is not None}
        make_config(data, f"{source}: data")

        settings = _mapping(raw.get("settings"), f"{source}: settings")
        for k in list(settings):
            _check_option(k, f"{source}: settings")
            if k == "backbone" and isinstance(settings[k], str) and settings[k].startswith(("./", "../")):
                settings[k] = _resolve_path(settings[k], base_dir)
        make_config({**data, **settings}, f"{source}: settings")

        grid = raw.get("grid")
        if grid is None:  # no grid: one run of the settings, or none if the SPEC is a search
            grid = [] if raw.get("search") is not None else [{}]
        single = isinstance(grid, dict)
        if single:
            grid = [grid]
        if not isinstance(grid, list) or (not grid and raw.get("grid") is not None):
            raise ConfigError(f"{source}: grid: expected a mapping of option: values, or a list of them")
        blocks = []
        for i, block in enumerate(grid):
            where = f"{source}: grid" if single else f"{source}: grid[{i}]"
            block = _mapping(block, where)
            axes = {}
            for k, v in block.items():
                _check_option(k, where)
                vals = _axis(k, v, where)
                if k == "backbone":
                    vals = [_resolve_path(b, base_dir) if isinstance(b, str) and b.startswith(("./", "../")) else b
                            for b in vals]
                axes[k] = vals
            blocks.append(axes)

        def top_list(key: str) -> list | None:
            v = raw.get(key)
            if v is None:
                return None
            v = v if isinstance(v, list) else [v]
            if not v:
                raise ConfigError(f"{source}: {key}: an empty list gives no runs")
            return v

        seeds, fractions = top_list("seeds"), top_list("train_fractions")
        base = {**data, **settings}
        for s in seeds or []:
            make_config({**base, "seed": s}, f"{source}: seeds")
        for f_ in fractions or []:
            make_config({**base, "train_fraction": f_}, f"{source}: train_fractions")

        search = None
        if raw.get("search") is not None:
            search = _parse_search(_mapping(raw["search"], f"{source}: search"), base, f"{source}: search")
        report = _mapping(raw.get("report"), f"{source}: report")
        for k in report:
            if k not in ("baseline", "metric"):
                raise _unknown(k, ("baseline", "metric"), f"{source}: report")
        if "metric" in report and report["metric"] not in REPORT_METRICS:
            raise _unknown(report["metric"], REPORT_METRICS, f"{source}: report: metric", "metric")
        spec = cls(name, data, settings, blocks, seeds, fractions, search, report, source, single)
        points = spec.points()  # validate every grid point now, with errors naming its block
        b = str(report.get("baseline") or "")
        if re.fullmatch(r"[Cc]\d+", b) and search is None:
            n = len({config_key(p.config) for p in points})
            if not 1 <= int(b[1:]) <= n:
                raise ConfigError(f"{source}: report: baseline: {b} is not a configuration of the grid "
                                  f"(C1..C{n}; `clintune bench SPEC --dry-run` lists them)")
        return spec

    # -- identity and inputs ---------------------------------------------------------------------
    def digest(self) -> str:
        """What this SPEC computes, as a sha256: the ids of its grid runs (as a set: block order, comments and
        runtime-only options such as ``threads`` do not count) and its search (every field but ``trials``,
        which only says how many trials to finish, over the run config the trials start from; and the name,
        which names the Optuna study). A sweep directory holds the results of one digest."""
        search = None
        if self.search is not None:
            s = dataclasses.asdict(self.search)
            s.pop("trials")
            base = make_config({**self.base_config(), **self.search.fixed, "val_metric": self.search.metric},
                               f"{self.source}: search").to_dict()
            search = {**s, "base": identity(base), "name": self.name}
        return _digest({"v": ID_VERSION, "grid": sorted(p.id for p in self.points()), "search": search})

    def check_inputs(self) -> None:
        """Before anything trains: every data file exists (a ``builtin:`` name is a known one) and every
        backbone given as a path (``./``, ``../``, ``/``, ``~``) is a model directory. One ConfigError line
        naming the SPEC key otherwise, instead of every run failing on its own."""
        for k in DATA_FILES:
            v = self.data.get(k)
            if not v:
                continue
            v = str(v)
            if v.startswith("builtin:"):
                from ..builtin import BUILTINS

                if v[len("builtin:"):] not in BUILTINS:
                    raise ConfigError(f"{self.source}: data: {k}: '{v}' is not a built-in dataset (known: "
                                      f"{', '.join('builtin:' + n for n in BUILTINS)})")
            elif not Path(v).expanduser().is_file():
                raise ConfigError(f"{self.source}: data: {k}: {v}: file not found")
        where = [(f"{self.source}: settings", [self.settings.get("backbone")])]
        for i, axes in enumerate(self.blocks):
            where.append((f"{self.source}: grid" if self.single_block else f"{self.source}: grid[{i}]",
                          axes.get("backbone") or []))
        if self.search is not None:
            where.append((f"{self.source}: search: fixed", [self.search.fixed.get("backbone")]))
        for w, values in where:
            for b in values:
                if not isinstance(b, str) or not b.startswith((".", "/", "~")):
                    continue  # minilm, scratch-*, Hub ids: resolved (or not) by the run
                p = Path(b).expanduser()
                if not p.is_dir():
                    raise ConfigError(f"{w}: backbone: {b}: directory not found")
                if not (p / "config.json").is_file():
                    raise ConfigError(f"{w}: backbone: {b}: not a Hugging Face model directory (no config.json)")

    # -- expansion -------------------------------------------------------------------------------
    def base_config(self) -> dict:
        return {**self.data, **self.settings}

    def points(self) -> list[Point]:
        """Every grid point, seeds outermost (a stopped sweep has whole seeds done first), duplicates once.

        Options that only mean something for other methods (:data:`METHOD_ONLY`, e.g. ``lora_r`` of a frozen
        run) are set to their defaults first, so ``method: [frozen, lora] x lora_r: [4, 16]`` gives one frozen
        run per seed, not two identical ones."""
        out: list[Point] = []
        seen: set[str] = set()
        base = self.base_config()
        expanded = []
        for i, axes in enumerate(self.blocks):
            where = f"{self.source}: grid" if self.single_block else f"{self.source}: grid[{i}]"
            axes = dict(axes)
            if self.seeds is not None and "seed" not in axes:
                axes["seed"] = self.seeds
            if self.train_fractions is not None and "train_fraction" not in axes:
                axes["train_fraction"] = self.train_fractions
            keys = list(axes)
            for combo in itertools.product(*(axes[k] for k in keys)):
                values = dict(zip(keys, combo))
                cfg = make_config({**base, **values}, where).to_dict()
                for k, methods in METHOD_ONLY.items():  # options the method ignores: one run, not one each
                    if cfg.get("method") not in methods:
                        cfg[k] = _FIELDS[k].default
                expanded.append((cfg["seed"], i, cfg))
        seed_order = {s: j for j, s in enumerate(dict.fromkeys(s for s, _, _ in expanded))}
        expanded.sort(key=lambda t: (seed_order[t[0]], t[1]))  # stable: product order kept within a block
        configs = []
        for _, _, cfg in expanded:
            cfg = {**cfg, **MANAGED}
            rid = run_id(cfg)
            if rid in seen:
                continue
            seen.add(rid)
            configs.append(cfg)
            out.append(Point(rid, cfg))
        keys = label_keys(configs)
        for p in out:
            p.label = describe(p.config, keys)
        return out


def _parse_search(raw: dict, base: dict, where: str) -> SearchSpec:
    allowed = [f.name for f in dataclasses.fields(SearchSpec)]
    for k in raw:
        if k not in allowed:
            raise _unknown(k, allowed, where)
    s = SearchSpec()
    if "trials" in raw:
        t = raw["trials"]
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ConfigError(f"{where}: trials: expected a positive integer, got {t!r}")
        s.trials = t
    s.fixed = _mapping(raw.get("fixed"), f"{where}: fixed")
    for k in s.fixed:
        _check_option(k, f"{where}: fixed")
    if "metric" in raw:
        s.metric = str(raw["metric"])
    if "seed" in raw:
        if isinstance(raw["seed"], bool) or not isinstance(raw["seed"], int):
            raise ConfigError(f"{where}: seed: expected an integer, got {raw['seed']!r}")
        s.seed = raw["seed"]
    fixed = make_config({**base, **s.fixed, "val_metric": s.metric}, where)
    if fixed.val_size <= 0:
        raise ConfigError(f"{where}: the search is scored on the validation split; set data: val_size above 0")
    if "lr" in raw:
        lr = raw["lr"]
        try:
            lo, hi = (float(v) for v in lr)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: lr: expected [low, high] (searched log-uniformly), got {lr!r}") from None
        if not 0 < lo < hi <= 1:
            raise ConfigError(f"{where}: lr: expected 0 < low < high <= 1, got {lr!r}")
        s.lr = (lo, hi)

    def choices(key: str, option: str, conv) -> list | None:
        if key not in raw:
            return None
        vals = raw[key] if isinstance(raw[key], list) else [raw[key]]
        if not vals:
            raise ConfigError(f"{where}: {key}: expected a non-empty list of values")
        out = []
        for v in vals:
            try:
                out.append(conv(v))
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {key}: expected numbers, got {v!r}") from None
        return out

    s.lora_r = choices("lora_r", "lora_r", int) or [fixed.lora_r]
    for r in s.lora_r:
        make_config({**base, **s.fixed, "lora_r": r}, f"{where}: lora_r")
    ratios = choices("lora_alpha_ratio", "lora_alpha", float)
    if ratios is not None:
        if any(r <= 0 for r in ratios):
            raise ConfigError(f"{where}: lora_alpha_ratio: values must be > 0 (alpha = rank x ratio)")
        s.lora_alpha_ratio = ratios
    drops = choices("lora_dropout", "lora_dropout", float)
    if drops is not None:
        for d in drops:
            make_config({**base, **s.fixed, "lora_dropout": d}, f"{where}: lora_dropout")
        s.lora_dropout = drops
    return s


def load_spec(path: str | Path) -> Spec:
    return Spec.from_yaml(path)
