#!/usr/bin/env python3
"""Issue 3: the frozen-backbone feature cache. Three whole `clintune train` commands, one run each, on the
medical-abstracts binary split: GRN head on frozen MiniLM, 10 epochs (--patience 0: all ten) --
(1) --no-cache, (2) the cache-filling first run, (3) a second head with the cache warm.

    python benchmarks/frozen_cache.py [--work /tmp/clintune-bench]
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_data  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/clintune-bench")
    a = ap.parse_args()
    work = Path(a.work)
    tr, te = bench_data.medabs(work / "medabs")
    cache = work / "feature-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {"CLINTUNE_CACHE_DIR": str(cache)}
    rows = []
    for name, head, extra in [("no cache", "grn", ["--no-cache"]), ("cold cache (fills it)", "grn", []),
                              ("warm cache, another head", "adapter", [])]:
        out = work / "runs" / f"frozen-{len(rows)}"
        args = ["--data", str(tr), "--test-data", str(te), "--backbone", "minilm", "--method", "frozen", "--head", head,
                "--epochs", "10", "--patience", "0", *extra]
        t0 = time.perf_counter()
        rec = bench_data.train(out, args, env)   # whole command, including reading record.json (negligible)
        wall = time.perf_counter() - t0
        rows.append({"run": name, "head": head, "wall_s": round(wall, 1), "f1": rec["metrics"]["f1"],
                     "cache": rec["cost"].get("feature_cache")})
    base = rows[0]["wall_s"]
    for r in rows:
        print(f"{r['run']:<26} head {r['head']:<8} whole command {r['wall_s']:7.1f} s  ({base / r['wall_s']:5.1f}x faster "
              f"than no cache)  F1 {r['f1']:.4f}  cache {r['cache']}")
    (work / "frozen_cache.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
