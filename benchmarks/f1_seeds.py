#!/usr/bin/env python3
"""Is clintune as accurate as Hugging Face Trainer + PEFT? Test F1 of both over several seeds (issue 7).

One seed cannot say it: on the medical-abstracts binary split the peer's own F1 moves by about 0.01 from seed
to seed (0.740-0.750), as much as the acceptance margin. This runs ``benchmarks/speed.py``'s two bf16
trainings (the same settings: LoRA r=8 on query/key/value, BERT's pooler head, lr 3e-4, batch 16, max length
256, 3 epochs) once per seed, each in its own process, and reports every seed's F1 and the mean difference
(clintune - peer) with its 95% t-interval over seeds. A seed is shared by the two systems in name only: each
draws its own initialisation, order and dropout from it.

    python benchmarks/f1_seeds.py [--seeds 42,1,2,3,4] [--epochs 3] [--work DIR] [--no-fast] [--fast-off PARTS ...]

``--fast-off PARTS`` (repeatable) also trains clintune with those parts of its fast path left out, one system
per flag, compared with the whole fast path (and with ``--no-fast`` when given): which part, if any, moves the
scores. ``--no-fast`` also trains clintune with ``--no-fast`` (plain PyTorch: no compiled kernels, torch's own dropout
masks, every layer whole) at each seed, and reports the fast path against it and it against the peer: whether
the speed-ups cost F1, apart from what the rest of clintune does. clintune's runs also keep their test AUROC and
log loss (they score every probability, so they move far less from seed to seed than F1 at the argmax),
reported where every seed has them; the peer prints no scores to compute them from.

Resumable: each finished (system, seed) result is kept in WORK/f1_seeds.json, with the CPU and the torch and
transformers versions it came from, and not run again. No timings
are compared here, so it may share the machine with other work.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_data as datasets  # noqa: E402
import speed  # noqa: E402

from clintune.store import write_json  # noqa: E402


#: what clintune's runs also keep beside F1 and accuracy (higher AUROC and lower log loss are better)
SCORES = {"auroc": "AUROC", "log_loss": "test log loss"}


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of the per-seed differences and its two-sided 95% Student-t interval (scipy's one-sample t-test)."""
    from scipy import stats

    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    return mean, float(ci.low), float(ci.high)


def where() -> dict:
    """What a result depends on beyond the seed: a seed's F1 is the same from run to run on one machine and
    software, but not across them (the peer's seed 1 gave 0.750 on a Xeon with AMX, 0.746 on an AMD EPYC)."""
    import transformers
    import torch

    from clintune.runtime import cpu_name

    return {"cpu": cpu_name(), "torch": torch.__version__, "transformers": transformers.__version__}


def resumable(a, results: str) -> tuple[list[int], Path, Path, Path, Path, dict]:
    """A seeds benchmark's start: the seeds, the work directory, the medabs split in it, and its results file
    (WORK/RESULTS) with what earlier runs kept there."""
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    work = Path(a.work)
    train, test = datasets.medabs(work / "medabs")
    store = work / results
    return seeds, work, train, test, store, json.loads(store.read_text()) if store.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="42,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/clintune-bench")
    ap.add_argument("--no-fast", action="store_true", help="also clintune --no-fast at each seed")
    ap.add_argument("--fast-off", action="append", default=[], metavar="PARTS",
                    help="also clintune --fast-off PARTS at each seed (repeatable: one system each)")
    a = ap.parse_args()
    seeds, work, train, test, store, done = resumable(a, "f1_seeds.json")
    variants = {f"clintune-off-{parts.replace(',', '+')}": ("--fast-off", parts) for parts in a.fast_off}
    variants.update({"clintune-no-fast": ("--no-fast",)} if a.no_fast else {})
    systems = ("peer", "clintune", *variants)
    for seed in seeds:
        for system in systems:
            key = f"{system}:{seed}:{a.epochs}"
            if key in done:
                continue
            if system == "peer":
                r = speed.peer(train, test, a, True, seed=seed)
            else:
                r = speed.clintune(train, test, a, work, seed=seed, extra=variants.get(system, ()))
            done[key] = {"f1": r["f1"], "accuracy": r["accuracy"], **where()}
            for score in SCORES:                           # clintune's runs have them; the peer prints no scores
                if r.get(score) is not None:
                    done[key][score] = r[score]
            write_json(store, done)                        # atomic: never a half-written results file
            print(f"seed {seed} {system}: F1 {r['f1']:.4f}", flush=True)
    f1 = {system: [done[f"{system}:{s}:{a.epochs}"]["f1"] for s in seeds] for system in systems}
    print(f"{'seed':>5} " + " ".join(f"{system + ' F1':>{max(11, len(system) + 3)}}" for system in systems)
          + f" {'clintune - peer':>15}")
    for i, seed in enumerate(seeds):
        print(f"{seed:>5} " + " ".join(f"{f1[system][i]:>{max(11, len(system) + 3)}.4f}" for system in systems)
              + f" {f1['clintune'][i] - f1['peer'][i]:>+15.4f}")
    results = ("f1", "accuracy", *SCORES)
    origins = {json.dumps({k: v for k, v in done[f"{system}:{s}:{a.epochs}"].items() if k not in results},
                          sort_keys=True) for s in seeds for system in systems}
    if len(origins) > 1:
        print(f"note: these results come from {len(origins)} machines or software versions: {sorted(origins)}")
    means = ", ".join(f"{system} {sum(v) / len(v):.4f}" for system, v in f1.items())
    print(f"mean over {len(seeds)} seeds: {means}")
    scores = {score: {system: [done[f"{system}:{s}:{a.epochs}"].get(score) for s in seeds] for system in systems}
              for score in SCORES}
    scores = {score: {system: v for system, v in by.items() if None not in v} for score, by in scores.items()}
    for score, by in scores.items():   # threshold-free: how well each scores the notes, where F1 moves with the argmax
        if by:
            print(f"mean {SCORES[score]}: " + ", ".join(f"{system} {sum(v) / len(v):.4f}" for system, v in by.items()))
    pairs = [("clintune", "peer")] + ([("clintune", "clintune-no-fast"), ("clintune-no-fast", "peer")]
                                      if a.no_fast else [])
    for v in variants:                # each part left out against the whole fast path and against plain PyTorch
        if v != "clintune-no-fast":
            pairs += [(v, "clintune")] + ([(v, "clintune-no-fast")] if a.no_fast else [])
    for x, y in pairs:
        mean, lo, hi = t_interval([u - v for u, v in zip(f1[x], f1[y])])
        print(f"{x} - {y}: {mean:+.4f} (95% t-interval {lo:+.4f} to {hi:+.4f})")
        for score, by in scores.items():
            if x in by and y in by:
                mean, lo, hi = t_interval([u - v for u, v in zip(by[x], by[y])])
                print(f"{x} - {y}, {SCORES[score]}: {mean:+.4f} (95% t-interval {lo:+.4f} to {hi:+.4f})")


if __name__ == "__main__":
    main()
