"""Built-in datasets, made from the ICD-10-CM tabular list shipped in ``simple-icd-10-cm``.

The ICD-10-CM list is public domain (US CDC/NCHS) and installs with clintune, so ``clintune demo``
and ``--data builtin:NAME`` work on a fresh machine with no data of the user's. Each example is one
billable diagnosis (a leaf code); its text is the code's official description.

* ``icd10-circulatory`` mirrors the seed study's binary task (Le et al., arXiv 2407.19299: is this
  note about cardiac failure, ~36% positive): label 1 if the diagnosis is in Chapter 9, "Diseases of
  the circulatory system" (I00-I99). All Chapter 9 leaves are positives; negatives are drawn evenly
  from the 21 other chapters (so that near misses such as congenital heart malformations, Q20-Q28,
  or hypertension in pregnancy, O10-O16, are present), to a 36% positive rate.
* ``icd10-chapters``: 22-class multi-class variant, the chapter of each diagnosis, up to 150 leaves a
  chapter.

Sampling uses a fixed seed of its own, so a built-in dataset is the same on every machine and run.
Descriptions that occur under more than one label are dropped, and each text appears once.
"""
from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import numpy as np
import pandas as pd

from .errors import DataError

_SEED = 20240725  # fixed: the datasets must not depend on the run's seed
POSITIVE_RATE = 0.36


@lru_cache(maxsize=1)
def _leaves_by_chapter() -> dict[str, list[tuple[str, str]]]:
    try:
        import simple_icd_10_cm as cm
    except ImportError:  # pragma: no cover - a hard dependency
        raise DataError("built-in datasets need the package simple-icd-10-cm (pip install simple-icd-10-cm)") from None
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for code in cm.get_all_codes(with_dots=True):
        if cm.is_leaf(code) and not cm.is_chapter_or_block(code):
            out[cm.get_ancestors(code)[-1]].append((code, cm.get_description(code)))
    return dict(out)


def _dedupe(rows: list[tuple[str, str, object]]) -> list[tuple[str, str, object]]:
    """Keep one row per description; drop descriptions that carry more than one label."""
    labels: dict[str, set] = defaultdict(set)
    for _, text, label in rows:
        labels[text].add(label)
    seen, out = set(), []
    for code, text, label in rows:
        if len(labels[text]) == 1 and text not in seen:
            seen.add(text)
            out.append((code, text, label))
    return out


def icd10_circulatory() -> pd.DataFrame:
    chapters = _leaves_by_chapter()
    rng = np.random.default_rng(_SEED)
    pos = [(c, d, 1) for c, d in chapters["9"]]
    others = {ch: list(rows) for ch, rows in chapters.items() if ch != "9"}
    n_neg = int(round(len(pos) * (1 - POSITIVE_RATE) / POSITIVE_RATE))
    # Even allocation across chapters (water-filling: small chapters give all they have).
    quota, left, todo = {}, n_neg, sorted(others, key=lambda ch: len(others[ch]))
    while todo:
        share = left // len(todo)
        ch = todo.pop(0)
        quota[ch] = min(len(others[ch]), share if todo else left)
        left -= quota[ch]
    neg = []
    for ch in sorted(others, key=int):
        rows = others[ch]
        pick = rng.choice(len(rows), size=quota[ch], replace=False)
        neg += [(rows[i][0], rows[i][1], 0) for i in sorted(pick)]
    rows = _dedupe(pos + neg)
    order = rng.permutation(len(rows))
    return pd.DataFrame([{"code": rows[i][0], "text": rows[i][1], "label": rows[i][2]} for i in order])


def icd10_chapters(per_chapter: int = 150) -> pd.DataFrame:
    import simple_icd_10_cm as cm

    chapters = _leaves_by_chapter()
    rng = np.random.default_rng(_SEED + 1)
    rows = []
    for ch in sorted(chapters, key=int):
        leaves = chapters[ch]
        pick = rng.choice(len(leaves), size=min(per_chapter, len(leaves)), replace=False)
        name = cm.get_description(ch).split(" (")[0]
        rows += [(leaves[i][0], leaves[i][1], f"{int(ch):02d} {name}") for i in sorted(pick)]
    rows = _dedupe(rows)
    order = rng.permutation(len(rows))
    return pd.DataFrame([{"code": rows[i][0], "text": rows[i][1], "label": rows[i][2]} for i in order])


BUILTINS = {"icd10-circulatory": icd10_circulatory, "icd10-chapters": icd10_chapters}


def load_builtin(name: str) -> pd.DataFrame:
    if name not in BUILTINS:
        raise DataError(f"builtin:{name}: unknown built-in dataset (known: "
                        f"{', '.join('builtin:' + n for n in BUILTINS)})")
    return BUILTINS[name]()
