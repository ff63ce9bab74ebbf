#!/usr/bin/env python3
"""One change to the training path, on and off, alternating in one process (issue 7).

A shared machine drifts by 10-20% between minutes, more than most single changes gain, so two trainings timed one
after the other in processes of their own cannot tell a 3% change. This trains the same LoRA (MiniLM with the
speed run's settings: rank 8 on query, key and value, batch 16, max length 256, bf16) on the first ``--notes``
notes of the medical-abstracts training split, ``--pairs`` times each way, alternating in one warm process, and
prints each pair's training seconds (record.json's ``train_seconds``), the differences, their mean and its 95%
t-interval. What the "off" runs leave out:

* ``--off PART``: a ``--fast-off`` part (:data:`clintune.fast.PARTS`), e.g. ``lora`` or ``attention_kernel``;
* ``--no-lora-kernels``: the compiled LoRA kernels (:func:`clintune.masks.lora_input`, ``lora_output``,
  ``lora_backward``; torch's casts and products instead), or only their forward (``--no-lora-kernels forward``)
  or backward (``backward``) side;
* ``--no-lora-tiles``: the LoRA kernels' AMX form (their rank-r products on the tiles; the AVX-512 form instead,
  :func:`clintune.masks.amx_form` with ``lora_only``), where the CPU has AMX.

    python benchmarks/train_pairs.py --no-lora-kernels [both|forward|backward] [--pairs 6] [--notes 320]
    python benchmarks/train_pairs.py --no-lora-tiles [--pairs 6]
    python benchmarks/train_pairs.py --off lora [--pairs 6]

Both arms draw the same dropout masks where the change keeps them (the fast path's seeds come from the same
generator at the same seed), so their losses can be compared too: the largest difference in the final training
loss is printed. Notes are never printed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def lora_kernels_off(side: str):
    """A stand-in for ``masks.lora_kernels_available`` that says no on ``side`` (the forward asks from
    ``_LoraLinear.forward``, the backward from ``_LoraLinear.backward``; query, key and value together,
    ``fast._LoraLinears``, need both and ask from ``_qkv_parts``: no on either side)."""
    from clintune import masks

    real = masks.lora_kernels_available

    def available(*args) -> bool:
        caller = sys._getframe(1).f_code.co_name
        return real(*args) and side not in ("both", caller) and caller != "_qkv_parts"

    return real, available


def lora_sample(work: Path, notes: int) -> Path:
    """The first ``notes`` notes of the medical-abstracts training split, as a CSV in ``work``."""
    import pandas as pd
    from bench_data import medabs

    train, _ = medabs(work / "medabs")
    sample = work / f"pairs-train-{notes}.csv"
    if not sample.exists():
        pd.read_csv(train).head(notes).to_csv(sample, index=False)
    return sample


def lora_args(sample: Path, out: Path, epochs: int) -> dict:
    """``clintune.train`` arguments of the speed run's LoRA (speed.py's settings) on ``sample``."""
    return dict(data=str(sample), backbone="minilm", method="lora", head="pooler", pooling="cls", lora_r=8,
                lora_alpha=8, lora_dropout=0.1, target_modules=["query", "key", "value"], epochs=epochs,
                batch_size=16, max_length=256, lr=3e-4, weight_decay=0, warmup_ratio=0, max_grad_norm=1,
                val_size=0, patience=0, seed=42, precision="bf16", out=str(out), overwrite=True)


def main() -> None:
    from bench_data import cpu_line
    from f1_seeds import t_interval

    import clintune
    from clintune import masks

    ap = argparse.ArgumentParser()
    ap.add_argument("--off", default=None, help="a --fast-off part the 'off' runs leave out")
    ap.add_argument("--no-lora-kernels", nargs="?", const="both", choices=("both", "forward", "backward"),
                    default=None, help="the 'off' runs without the compiled LoRA kernels (or one side of them)")
    ap.add_argument("--no-lora-tiles", action="store_true",
                    help="the 'off' runs with the LoRA kernels' AVX-512 form instead of their AMX one")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--notes", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--work", default="/tmp/clintune-bench")
    a = ap.parse_args()
    if sum((a.off is not None, a.no_lora_kernels is not None, a.no_lora_tiles)) != 1:
        ap.error("give one of --off PART, --no-lora-kernels and --no-lora-tiles")
    sample = lora_sample(Path(a.work), a.notes)
    args = lora_args(sample, Path(tempfile.mkdtemp(prefix="train-pairs-")), a.epochs)
    real, stand_in = lora_kernels_off(a.no_lora_kernels or "both")
    if (a.no_lora_kernels or a.no_lora_tiles) and not real(384, 384, 8):
        sys.exit("the compiled LoRA kernels do not run on this CPU: nothing to switch off")
    if a.no_lora_tiles and not masks.compiled().attention_amx_available():
        sys.exit("no AMX tiles on this CPU: the LoRA kernels run in their AVX-512 form already")

    def run(on: bool) -> tuple[float, float]:
        masks.lora_kernels_available = real if on or not a.no_lora_kernels else stand_in
        try:
            with masks.amx_form(on or not a.no_lora_tiles, lora_only=True):
                res = clintune.train(**args, fast_off=None if on or not a.off else [a.off])
        finally:
            masks.lora_kernels_available = real
        history = res.record["training"]["history"]
        return res.cost["train_seconds"], history[-1]["train_loss"] if history else float("nan")

    what = (f"--fast-off {a.off}" if a.off else "the LoRA kernels' AMX form" if a.no_lora_tiles
            else f"LoRA kernels off ({a.no_lora_kernels})")
    print(f"{cpu_line()}; {a.notes} notes x {a.epochs} epoch(s), {a.pairs} pairs; off: {what}")
    run(True)                                                   # warm-up: oneDNN's kernels, the model's files
    rows = []
    for i in range(a.pairs):
        off, on = run(False), run(True)
        rows.append((off, on))
        print(f"pair {i + 1}: off {off[0]:.2f} s, on {on[0]:.2f} s, on - off {on[0] - off[0]:+.2f} s", flush=True)
    diffs = [on[0] - off[0] for off, on in rows]
    mean, lo, hi = t_interval(diffs)
    base = sum(off[0] for off, _ in rows) / len(rows)
    print(f"on - off: mean {mean:+.3f} s ({100 * mean / base:+.1f}% of {base:.2f} s), 95% t-interval "
          f"{lo:+.3f} to {hi:+.3f}; faster in {sum(d < 0 for d in diffs)} of {len(diffs)}")
    print(f"largest difference in the last epoch's training loss: "
          f"{max(abs(on[1] - off[1]) for off, on in rows):.2e}")


if __name__ == "__main__":
    main()
