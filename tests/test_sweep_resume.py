"""Interrupting a sweep: Ctrl-C stops cleanly with one line; SIGKILL of the sweep leaves no orphan worker and an
intact runs.db; running the command again finishes the grid with every run recorded once, none retrained."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clintune.sweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
# Guards against a hung test only (never a performance assertion): generous on a loaded 2-core machine.
GUARD_S = 600


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    return e


def snapshot(db: Path) -> dict:
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {r[0]: {"status": r[1], "attempts": r[2], "finished": r[3], "worker": r[4]}
                for r in con.execute("SELECT id, status, attempts, finished, worker FROM runs")}
    except sqlite3.OperationalError:  # not created yet
        return {}
    finally:
        con.close()


def wait_for(cond, what: str):
    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"gave up waiting for {what}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()   # a zombie has finished
    except FileNotFoundError:
        return False


def live_worker(rows: dict) -> int | None:
    for r in rows.values():
        w = r["worker"] or ""
        if r["status"] == "running" and w.split("@")[0].isdigit() and alive(int(w.split("@")[0])):
            return int(w.split("@")[0])
    return None


@pytest.fixture
def spec(tmp_path, tiny_backbone, binary_csv):
    p = tmp_path / "spec.yaml"
    p.write_text(f"""
data: {{data: {binary_csv}}}
settings: {{backbone: {tiny_backbone}, epochs: 3, batch_size: 8, max_length: 32, lr: 5.0e-3, precision: fp32}}
grid: {{method: [frozen, lora]}}
seeds: [1, 2]
""")
    return p


def _foreground_signals() -> None:
    """In the child: SIGINT as in a foreground job. A test suite started in the background by a shell without
    job control (``cmd &``) inherits SIGINT ignored, and Python then leaves it ignored: no Ctrl-C to test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(spec: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clintune", "bench", str(spec), "--out", str(out)]
    return subprocess.Popen(cmd, env=env(), cwd=str(spec.parent), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_foreground_signals)


def test_ctrl_c_then_sigkill_then_resume(spec, tmp_path):
    out = tmp_path / "out"
    db = out / "runs.db"
    ids = {p.id for p in load_spec(spec).points()}
    assert len(ids) == 4

    # 1. Ctrl-C (SIGINT to the foreground process group) while the first run trains
    proc = start(spec, out)
    try:
        wait_for(lambda: live_worker(snapshot(db)), "a running worker")
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=GUARD_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("clintune: interrupted") and "Run the same command again" in lines[-1]
    rows = snapshot(db)
    assert all(r["status"] == "pending" for r in rows.values())       # nothing left looking like it ran
    assert sum(r["attempts"] for r in rows.values()) == 1

    # 2. SIGKILL of the sweep alone, once one run is recorded and another is training
    proc = start(spec, out)
    try:
        def state():
            rows = snapshot(db)
            pid = live_worker(rows)
            done = [k for k, r in rows.items() if r["status"] == "success"]
            return (rows, pid) if pid and done else None

        before, worker = wait_for(state, "one finished run and one running")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=GUARD_S)
        # its worker must not keep training as an orphan
        wait_for(lambda: not alive(worker), f"orphan worker {worker} to exit")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    killed = [k for k, r in snapshot(db).items() if r["status"] == "running"]
    assert len(killed) == 1

    # 3. the same command again finishes the grid
    res = subprocess.run([sys.executable, "-m", "clintune", "bench", str(spec), "--out", str(out)], env=env(),
                         capture_output=True, text=True, timeout=GUARD_S)
    assert res.returncode == 0, res.stderr
    after = snapshot(db)
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM runs").fetchone() == (4, 4)
    assert con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 4
    con.close()
    assert set(after) == ids and all(r["status"] == "success" for r in after.values())
    for k, r in before.items():
        if r["status"] == "success":                                  # finished before the kill: not retrained
            assert after[k]["attempts"] == r["attempts"] and after[k]["finished"] == r["finished"]
    assert after[killed[0]]["attempts"] == 2                          # interrupted by the kill: trained again
    assert sum(r["attempts"] for r in after.values()) == 4 + 1 + 1    # + the Ctrl-C'd and the killed attempt
