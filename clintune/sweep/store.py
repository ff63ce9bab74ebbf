"""The results store: one SQLite database, ``DIR/runs.db``, one row per run.

Each run moves ``pending -> running -> success | failed``; every state change is one transaction
(``BEGIN IMMEDIATE ... COMMIT``) in WAL mode with ``synchronous=FULL``, so a kill at any moment leaves
the database as it was before or after a change, never in between. A run's row holds its config, its
status, how many times it was started (``attempts``), when, by which worker, the error of a failed run,
and the record's parts (metrics, CIs, cost, data, training, env) plus the whole record. Per-example test
predictions (row, gold, predicted label, probabilities; no text) sit beside it in ``predictions`` as
Parquet bytes, for paired tests between runs that share a test set (equal ``test_split_sha256``).

Exactly once: a run is registered with ``INSERT OR IGNORE`` (its id is the hash of its config), and
``finish`` only completes a row that is ``running``: a result can never overwrite a finished run.

A sweep holds ``DIR/.lock`` (``flock``) while it runs, so two sweeps never work on one DIR; any row left
``running`` when a sweep starts therefore belongs to a sweep that died, and is trained again.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from ..errors import ConfigError
from ..record import now
from ..store import _json_default

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "success", "failed")
DB_NAME = "runs.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id                TEXT PRIMARY KEY,             -- sha256 of the run's canonical config
    seq               INTEGER NOT NULL,             -- registration order
    source            TEXT NOT NULL DEFAULT 'grid', -- grid | search
    label             TEXT NOT NULL DEFAULT '',
    config            TEXT NOT NULL,                -- JSON: the TrainConfig as given
    status            TEXT NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'running', 'success', 'failed')),
    attempts          INTEGER NOT NULL DEFAULT 0,   -- times a worker was started for it
    registered        TEXT NOT NULL,
    started           TEXT,
    finished          TEXT,
    worker            TEXT,                         -- pid@host of the last attempt
    error             TEXT,
    metrics           TEXT, metrics_ci TEXT, cost TEXT, data TEXT, training TEXT, env TEXT,
    record            TEXT,                         -- the whole record (JSON)
    test_split_sha256 TEXT,
    trial             INTEGER                       -- Optuna trial number (search runs)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS predictions (
    run_id TEXT PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    n      INTEGER NOT NULL,
    format TEXT NOT NULL DEFAULT 'parquet',
    blob   BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_JSON_COLS = ("config", "metrics", "metrics_ci", "cost", "data", "training", "env", "record")


def _dumps(obj) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, default=_json_default)


@dataclass
class Run:
    """One row of ``runs`` with its JSON columns decoded."""

    id: str
    seq: int
    source: str
    label: str
    config: dict
    status: str
    attempts: int
    registered: str
    started: str | None
    finished: str | None
    worker: str | None
    error: str | None
    metrics: dict | None
    metrics_ci: dict | None
    cost: dict | None
    data: dict | None
    training: dict | None
    env: dict | None
    record: dict | None
    test_split_sha256: str | None
    trial: int | None

    @property
    def short_id(self) -> str:
        return self.id[:10]


def predictions_to_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def predictions_from_bytes(blob: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(blob))


def worker_name(pid: int | None = None) -> str:
    return f"{pid or os.getpid()}@{socket.gethostname()}"


class RunStore:
    """``DIR/runs.db``. Open with ``RunStore(path)``; use as a context manager to close it."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ConfigError(f"{self.path}: no results store here (run `clintune bench SPEC --out "
                              f"{self.path.parent}` first)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=60000")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(f"{self.path}: written by a newer clintune (store version {version}); "
                                  "upgrade clintune to read it")
            if version == 0:
                with self.transaction():
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            self.conn.execute(stmt)
                    self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{self.path}: not a clintune results store ({e})") from None

    # -- plumbing --------------------------------------------------------------------------------
    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic state change: all of the block's writes, or none of them."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _row(self, row: sqlite3.Row | tuple, cols: list[str]) -> Run:
        d = dict(zip(cols, row))
        for c in _JSON_COLS:
            d[c] = json.loads(d[c]) if d[c] is not None else None
        return Run(**d)

    # -- meta ------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                      (key, value))

    # -- registering and reading -----------------------------------------------------------------
    def register(self, points, source: str = "grid", trial: int | None = None) -> int:
        """Add runs that are not there yet (by id); return how many were new. One transaction."""
        ts = now()
        new = 0
        with self.transaction() as c:
            seq = c.execute("SELECT COALESCE(MAX(seq), 0) FROM runs").fetchone()[0]
            for p in points:
                seq += 1
                cur = c.execute(
                    "INSERT OR IGNORE INTO runs(id, seq, source, label, config, registered, trial) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (p.id, seq, getattr(p, "source", source) or source, p.label, _dumps(p.config), ts, trial))
                new += cur.rowcount
        return new

    def get(self, run_id: str) -> Run | None:
        cur = self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,))
        row = cur.fetchone()
        return None if row is None else self._row(row, [d[0] for d in cur.description])

    def runs(self, status: str | tuple[str, ...] | None = None, source: str | None = None) -> list[Run]:
        sql, args = "SELECT * FROM runs", []
        where = []
        if status is not None:
            st = (status,) if isinstance(status, str) else tuple(status)
            where.append(f"status IN ({','.join('?' * len(st))})")
            args += list(st)
        if source is not None:
            where.append("source = ?")
            args.append(source)
        if where:
            sql += " WHERE " + " AND ".join(where)
        cur = self.conn.execute(sql + " ORDER BY seq", args)
        cols = [d[0] for d in cur.description]
        return [self._row(r, cols) for r in cur.fetchall()]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for st, n in self.conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            out[st] = n
        return out

    def predictions(self, run_id: str) -> pd.DataFrame | None:
        row = self.conn.execute("SELECT blob FROM predictions WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else predictions_from_bytes(row[0])

    # -- state changes ---------------------------------------------------------------------------
    def start(self, run_id: str, worker: str) -> int:
        """pending/running/failed -> running, one more attempt; returns the attempt number.

        Refuses (ConfigError) to start a run that already succeeded: a finished run is never retrained.
        """
        with self.transaction() as c:
            row = c.execute("SELECT status, attempts FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            if row[0] == "success":
                raise ConfigError(f"run {run_id[:10]} already succeeded; it is not trained again")
            c.execute("UPDATE runs SET status = 'running', attempts = attempts + 1, started = ?, finished = NULL, "
                      "worker = ?, error = NULL WHERE id = ?", (now(), worker, run_id))
            c.execute("DELETE FROM predictions WHERE run_id = ?", (run_id,))
            return row[1] + 1

    def set_worker(self, run_id: str, worker: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET worker = ? WHERE id = ? AND status = 'running'", (worker, run_id))

    def finish(self, run_id: str, record: dict, predictions: bytes | None = None, n_predictions: int = 0) -> bool:
        """running -> success/failed with the record (and predictions), in one transaction.

        Returns False (and changes nothing) if the run is not ``running`` (e.g. it finished already).
        """
        status = record.get("status", "failed")
        if status not in ("success", "failed"):
            status = "failed"
        if status == "success" and predictions is None:
            raise ValueError("a successful run needs its test predictions")
        with self.transaction() as c:
            row = c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row[0] != "running":
                return False
            c.execute(
                "UPDATE runs SET status = ?, finished = ?, error = ?, metrics = ?, metrics_ci = ?, cost = ?, "
                "data = ?, training = ?, env = ?, record = ?, test_split_sha256 = ? WHERE id = ?",
                (status, now(), record.get("error"), _dumps(record.get("metrics")), _dumps(record.get("metrics_ci")),
                 _dumps(record.get("cost")), _dumps(record.get("data")), _dumps(record.get("training")),
                 _dumps(record.get("env")), _dumps(record), (record.get("data") or {}).get("test_split_sha256"),
                 run_id))
            if predictions is not None:
                c.execute("INSERT OR REPLACE INTO predictions(run_id, n, format, blob) VALUES (?, ?, 'parquet', ?)",
                          (run_id, int(n_predictions), sqlite3.Binary(predictions)))
        return True

    def release(self, run_id: str, note: str | None = None) -> None:
        """running -> pending (an interrupted run: it will be trained again)."""
        with self.transaction() as c:
            c.execute("UPDATE runs SET status = 'pending', error = ? WHERE id = ? AND status = 'running'",
                      (note, run_id))

    def set_trial(self, run_id: str, trial: int) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET trial = ? WHERE id = ?", (trial, run_id))


@contextlib.contextmanager
def sweep_lock(directory: str | Path) -> Iterator[Path]:
    """Hold ``DIR/.lock`` for the duration of a sweep (released by the OS if the process dies)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(f"{d}: a sweep ({holder}) is already running on this directory; wait for it "
                              "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield path
    finally:
        os.close(fd)
