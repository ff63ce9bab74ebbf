"""``clintune bench | runs | report | tune``: the sweep commands (added to the main parser by ``add_commands``)."""
from __future__ import annotations

import json
import sys

from .runner import SweepInterrupted


def _echo(line: str) -> None:
    print(line, flush=True)


def _add_execution(p, out_required: bool = True) -> None:
    p.add_argument("--out", metavar="DIR", required=out_required,
                   help="sweep directory: runs.db, logs/, report (created; an existing one is continued)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: worker processes on this machine (default); ray: Ray tasks (pip install "
                        "'clintune[ray]')")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at a time (default 1; each run gets cores/N threads unless the SPEC sets threads)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --executor ray: the cluster to use (default: start a local Ray instance)")
    p.add_argument("--retry-failed", action="store_true", help="train failed runs again (default: they stay failed)")
    p.add_argument("--mlflow", default=None, metavar="URI",
                   help="also log each run to this MLflow tracking URI (pip install 'clintune[mlflow]')")


def _interrupted(e: SweepInterrupted) -> int:
    print(f"clintune: {e}", file=sys.stderr)
    return 130


def _cmd_bench(args) -> int:
    from .runner import bench
    from .spec import load_spec

    spec = load_spec(args.spec)
    if args.dry_run:
        from .spec import config_key

        spec.check_inputs()
        points = spec.points()
        cids: dict = {}
        for p in points:  # C numbers as the report gives them: configurations in grid order
            cid = cids.setdefault(config_key(p.config), f"C{len(cids) + 1}")
            print(f"{cid:<4} {p.id[:10]}  {p.label}")
        extra = f"; plus a search of {spec.search.trials} trials" if spec.search else ""
        print(f"{spec.name}: {len(points)} runs{extra} (SPEC is valid; nothing was trained)")
        return 0
    if not args.out:
        from ..errors import ConfigError
        raise ConfigError("--out DIR is required (the sweep directory)")
    try:
        summary = bench(spec, args.out, executor=args.executor, jobs=args.jobs, address=args.address,
                        retry_failed=args.retry_failed, mlflow=args.mlflow, echo=_echo)
    except SweepInterrupted as e:
        return _interrupted(e)
    # 0 only when every run succeeded: a failed or unfinished run is a sweep still to look at
    return 0 if summary.counts["success"] == sum(summary.counts.values()) else 1


def _cmd_tune(args) -> int:
    from .spec import load_spec
    from .tune import tune

    spec = load_spec(args.spec)
    if args.trials is not None and args.trials < 1:
        from ..errors import ConfigError
        raise ConfigError(f"--trials: {args.trials} is out of range [1, inf]")
    try:
        tune(spec, args.out, trials=args.trials, executor=args.executor, jobs=args.jobs, address=args.address,
             retry_failed=args.retry_failed, mlflow=args.mlflow, echo=_echo)
    except SweepInterrupted as e:
        return _interrupted(e)
    return 0


def _cmd_runs(args) -> int:
    from pathlib import Path

    from .spec import describe, label_keys
    from .store import DB_NAME, RunStore

    with RunStore(Path(args.dir) / DB_NAME, create=False) as store:
        runs = store.runs(status=tuple(args.status.split(",")) if args.status else None)
        counts = store.counts()
    if args.json:
        for r in runs:
            print(json.dumps({"id": r.id, "status": r.status, "attempts": r.attempts, "source": r.source,
                              "label": r.label, "config": r.config, "metrics": r.metrics, "cost": r.cost,
                              "error": r.error, "started": r.started, "finished": r.finished}, default=str))
        return 0
    keys = label_keys([r.config for r in runs])
    rows = []
    for r in runs:
        m, c = r.metrics or {}, r.cost or {}
        f = lambda v, d=4: f"{v:.{d}f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        note = (r.error or "")[:70] if r.status != "success" else ""
        rows.append([r.short_id, r.status, str(r.attempts), f(m.get("f1")), f(m.get("auroc")),
                     f(c.get("train_seconds"), 1), f(c.get("peak_rss_mb"), 0), describe(r.config, keys), note])
    headers = ["run", "status", "tries", "f1", "auroc", "train_s", "rss_mb", "configuration", "error"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    print(f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0


def _cmd_report(args) -> int:
    from ..errors import ConfigError
    from .report import build_report

    if args.bootstrap < 100:
        raise ConfigError(f"--bootstrap: {args.bootstrap} is too few resamples (at least 100)")
    res = build_report(args.dir, baseline=args.baseline, metric=args.metric, n_boot=args.bootstrap)
    for line in res["summary"]:
        print(line)
    for s in res["skipped"]:
        print(f"plot {s}")
    print(f"report written to {res['html']} and {res['md']}")
    return 0


def add_commands(sub) -> None:
    """Add ``bench``, ``runs``, ``report`` and ``tune`` to the ``clintune`` sub-command parser."""
    b = sub.add_parser("bench", help="run a benchmark sweep (grid of backbones x methods x heads x seeds x sizes); "
                                     "resumable",
                       description="Run every grid point of SPEC (each a fresh process), record each in DIR/runs.db, "
                                   "skip runs already recorded. Re-running after a crash, kill or Ctrl-C continues.")
    b.add_argument("spec", metavar="SPEC.yaml")
    _add_execution(b, out_required=False)  # not needed for --dry-run
    b.add_argument("--dry-run", action="store_true", help="validate SPEC and list its runs; train nothing")
    b.set_defaults(func=_cmd_bench)

    r = sub.add_parser("runs", help="list the runs of a sweep directory")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--status", default=None, metavar="S[,S]", help="only runs with this status "
                                                                   "(pending, running, success, failed)")
    r.add_argument("--json", action="store_true", help="one JSON object per run")
    r.set_defaults(func=_cmd_runs)

    rp = sub.add_parser("report", help="write DIR/report.html and DIR/report.md: tables, CIs, paired tests, "
                                       "efficiency, Pareto fronts, plots")
    rp.add_argument("dir", metavar="DIR")
    rp.add_argument("--baseline", default=None, metavar="RUN_ID_OR_LABEL",
                    help="configuration the others are compared with: a run id (prefix), C number or label "
                         "(default: the SPEC's report.baseline, else the first configuration)")
    rp.add_argument("--metric", default=None, help="primary metric (default f1; e.g. auroc, accuracy, f1_macro)")
    rp.add_argument("--bootstrap", type=int, default=5000, metavar="B", help="paired bootstrap resamples (default 5000)")
    rp.set_defaults(func=_cmd_report)

    t = sub.add_parser("tune", help="Optuna search of the SPEC's search: section (resumable); trials are runs")
    t.add_argument("spec", metavar="SPEC.yaml")
    _add_execution(t)
    t.add_argument("--trials", type=int, default=None, metavar="N", help="trials to finish (default: the SPEC's)")
    t.set_defaults(func=_cmd_tune)
