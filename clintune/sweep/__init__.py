"""Benchmark sweeps: a resumable grid of runs, a results store, statistics and a report.

    SPEC.yaml --spec--> grid points (TrainConfig + stable id) --runner/executors--> one fresh worker
      process per run --> runs.db (store) --stats--> seed aggregates, paired tests, efficiency,
      Pareto fronts --report--> report.html / report.md

Modules, one noun each: ``spec`` (the validated SPEC and its expansion), ``store`` (runs.db),
``worker`` (one run in a fresh process), ``executors`` (local processes or Ray), ``runner`` (the
resumable scheduling loop), ``tune`` (Optuna search), ``stats``, ``report``, ``tracking`` (MLflow),
``cli`` (``clintune bench | runs | report | tune``).
"""
