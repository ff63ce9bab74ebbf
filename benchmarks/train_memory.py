#!/usr/bin/env python3
"""Where a LoRA training's peak memory goes: in use, held by glibc's heap, resident (issue 7).

Peak RSS counts every page the process touched and still holds, so it is what the allocator holds, not what
the tensors need: freed blocks that glibc keeps (``fast.reuse_freed_memory``) and cannot hand to the next
request because kept blocks sit between them are counted too. This trains the speed run's LoRA
(``train_pairs.py``'s settings) on the first ``--notes`` medical-abstracts training notes, once per variant,
each in a process of its own (peak RSS is per process), and prints for each:

* peak RSS (``getrusage``) and train seconds (record.json);
* at the moment of peak RSS and of the largest sampled use: malloc's bytes in use (``mallinfo2``: in the
  heaps plus mapped blocks) and what the heaps and mappings hold, sampled every 10 ms by a thread;
* the arena's high-water mark (:mod:`clintune.arena`) and the block cache's peak mapping (:mod:`clintune.blocks`)
  where they ran.

Variants: micro-batches of ``--tokens`` (default 2048 and 4096), each with the whole fast path, with
``--fast-off blocks`` (the arena alone) and with ``--fast-off arena,blocks`` (glibc's heap for everything), or
the ``--off`` sets given.

    python benchmarks/train_memory.py [--notes 320] [--epochs 1] [--tokens 2048,4096] [--off "" --off blocks ...]

glibc only (``mallinfo2``, glibc 2.33 and later); notes are never printed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r"""
import ctypes, json, resource, sys, threading, time
sys.path.insert(0, {here!r})
from pathlib import Path

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

peak = {{"rss": (0, 0, 0), "use": (0, 0, 0)}}
done = False

def sample():
    while not done:
        m = libc.mallinfo2()
        use, held, rss = (m.uordblks + m.hblkhd) / 2 ** 20, (m.arena + m.hblkhd) / 2 ** 20, rss_mb()
        if rss > peak["rss"][2]:
            peak["rss"] = (use, held, rss)
        if use > peak["use"][0]:
            peak["use"] = (use, held, rss)
        time.sleep(0.01)

import clintune
from train_pairs import lora_args, lora_sample
args = lora_args(lora_sample(Path({work!r}), {notes}), Path({out!r}), {epochs})
args.update(micro_batch_tokens={tokens}, fast_off={off!r})
t = threading.Thread(target=sample, daemon=True)
t.start()
res = clintune.train(**args)
done = True
t.join()
print(json.dumps({{"train_seconds": res.cost["train_seconds"], "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "at_peak_rss": peak["rss"], "at_peak_use": peak["use"],
    "arena": res.cost.get("speedups", {{}}).get("arena"),
    "blocks": res.cost.get("speedups", {{}}).get("block_cache")}}))
"""


def main() -> None:
    from bench_data import cpu_line

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notes", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--tokens", default="2048,4096", help="micro-batch sizes in tokens, comma-separated")
    ap.add_argument("--work", default="/tmp/clintune-bench")
    ap.add_argument("--off", action="append", default=None,
                    help="a --fast-off set to run (repeatable; default: '', 'blocks', 'arena,blocks')")
    a = ap.parse_args()
    offs = [[p for p in o.split(",") if p] for o in (a.off if a.off is not None else ["", "blocks", "arena,blocks"])]
    print(f"{cpu_line()}; {a.notes} notes x {a.epochs} epoch(s)")
    print(f"{'micro-batch':>11} {'--fast-off':>12} {'train s':>8} {'peak RSS':>9} {'in use':>7} {'heap held':>9} "
          f"{'max in use':>10} {'arena MB':>8} {'blocks MB':>9}")
    for tokens in (int(t) for t in a.tokens.split(",")):
        for off in offs:
            with tempfile.TemporaryDirectory(prefix="train-memory-") as out:
                code = CHILD.format(here=str(HERE), work=a.work, notes=a.notes, out=out, epochs=a.epochs,
                                    tokens=tokens, off=off)
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"train_memory: the {tokens}-token run failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            use, held, _ = r["at_peak_rss"]
            arena = r["arena"]["high_mb"] if r["arena"] else None
            mapped = r["blocks"]["peak_mapped_mb"] if isinstance(r["blocks"], dict) else None
            print(f"{tokens:11d} {','.join(off) or '-':>12} {r['train_seconds']:8.2f} {r['peak_rss_mb']:9.0f} "
                  f"{use:7.0f} {held:9.0f} {r['at_peak_use'][0]:10.0f} "
                  f"{'-' if arena is None else format(arena, '.0f'):>8} "
                  f"{'-' if mapped is None else format(mapped, '.0f'):>9}")
    print("\nMB; 'in use' and 'heap held' at the moment of peak RSS (malloc's counts, sampled every 10 ms: the block "
          "cache's mappings are not malloc's, so 'blocks MB' is its own peak); the rest of RSS is the libraries' code "
          "and data and Python's own arenas.")


if __name__ == "__main__":
    main()
