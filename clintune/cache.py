"""Feature cache: with a frozen backbone, encode each text once and train heads from the stored states.

Below a frozen encoder nothing changes between epochs, heads, seeds or runs, so its token states are
computed once and reused. An entry holds the token states of one list of texts, without padding:
``states`` (total_tokens, H) and ``offsets`` (N + 1), in the run's feature precision (bf16 when the
run computes in bf16, else fp32), memory-mapped from disk so that large corpora need not fit in RAM.

The key is a hash of everything that decides the bits: the encoder's weights fingerprint, the
tokenizer (its vocabulary and pipeline, not the truncation or padding its last call left set), ``max_length``,
the batch size and precision of the encoding pass (batch composition changes low-order bits), the device and
how it computes (:func:`clintune.fast.fingerprint`: the fast path and its parts, the compiled kernels, the CPU's
instruction set or the GPU), the clintune/torch/transformers versions and the texts themselves. An entry also
keeps how long its encoding took, so a run that finds it reports the encoder's share of prediction time as the
run that computed it measured it, not the head's alone.
Entries are written into a ``KEY.partial-*`` directory and renamed when complete, so a crash or a
concurrent run never leaves a half-written entry that could be read. Cached states are derived from
notes: the cache directory is created private (mode 0700); ``clintune cache-clear`` removes its entries.

Encoding uses exactly the batching of :meth:`clintune.modeling.Classifier.logits_encoded` (length-
sorted batches of ``eval_batch_size``, in equal pieces of at most ``training.EVAL_TOKENS_CPU`` tokens on
CPU, padded by ``batching.padded_length``: that cap and that padding are part of the key), so
predictions made from cached test states are bit-for-bit
those of the saved model reloaded and run on the same texts.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .batching import PAD_MULTIPLE, SHORT_PAD_LIMIT, SHORT_PAD_MULTIPLE, Encoded, padded_length

FORMAT = 3       # 2: batches padded by padded_length and cut into equal pieces (batching.py); 3: encode_seconds


def default_cache_dir() -> Path:
    env = os.environ.get("CLINTUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "clintune" / "features"


def texts_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """The tokenizer's vocabulary and pipeline; not the truncation and padding settings, which a fast tokenizer
    keeps from its last call (they would make the same tokenizer hash three ways)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        blob = repr(sorted(tokenizer.get_vocab().items()))
    else:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        blob = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_key(**parts) -> str:
    import transformers

    from . import __version__
    from .training import EVAL_TOKENS_CPU   # the batching decides the low-order bits, so it is in the key

    parts = {**parts, "format": FORMAT, "eval_tokens_cpu": EVAL_TOKENS_CPU,
             "padding": [SHORT_PAD_MULTIPLE, SHORT_PAD_LIMIT, PAD_MULTIPLE], "torch": torch.__version__,
             "transformers": transformers.__version__, "clintune": __version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


_STORE = {torch.bfloat16: (np.int16, "bf16"), torch.float32: (np.float32, "fp32"), torch.float16: (np.float16, "fp16")}
_LOAD = {"bf16": (np.int16, torch.bfloat16), "fp32": (np.float32, torch.float32), "fp16": (np.float16, torch.float16)}


@dataclass
class Features:
    """Unpadded token states of N texts: rows offsets[i]:offsets[i+1] of ``states`` belong to text i."""

    states: np.ndarray          # (total_tokens, H), numpy storage dtype (bf16 kept as int16 bits)
    offsets: np.ndarray         # (N + 1,)
    dtype: torch.dtype
    hit: bool = False           # loaded from disk rather than computed by this run
    encode_seconds: float = 0.0  # how long computing the entry took (measured by the run that computed it)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, T, H), attention_mask (B, T)) for texts ``idx``, zero-padded by ``padded_length``."""
        lens = self.lengths[idx]
        t = padded_length(int(lens.max()))
        h = self.states.shape[1]
        out = np.zeros((len(idx), t, h), dtype=self.states.dtype)
        mask = np.zeros((len(idx), t), dtype=np.int64)
        for j, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[j, : b - a] = self.states[a:b]
            mask[j, : b - a] = 1
        states = torch.from_numpy(out)
        if self.dtype == torch.bfloat16:
            states = states.view(torch.bfloat16)
        return states, torch.from_numpy(mask)


@torch.inference_mode()
def encode_into(model, enc: Encoded, batch_size: int, runtime, states: np.ndarray, offsets: np.ndarray) -> None:
    """Run the (frozen) encoder over ``enc`` with the classifier's batching; write unpadded states."""
    from .training import TokenFeed, eval_max_tokens

    model.eval()
    dev = runtime.device
    for batch, idx in TokenFeed(enc).eval_batches(batch_size, eval_max_tokens(dev)):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with runtime.autocast():
            h = model.encode(ids.to(dev), mask.to(dev))                       # (B, T, H) feature dtype
        h = h.cpu()
        if h.dtype == torch.bfloat16:
            h = h.view(torch.int16)
        h = h.numpy()
        for j, i in enumerate(idx):
            n = len(enc.ids[i])
            states[offsets[i]: offsets[i] + n] = h[j, :n]


class FeatureCache:
    """Content-addressed store of :class:`Features` (``root=None``: keep them in memory only)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root).expanduser()

    def get(self, key: str, enc: Encoded, hidden: int, dtype: torch.dtype, compute) -> Features:
        """Load entry ``key`` or build it with ``compute(states, offsets)`` and store it."""
        np_dtype, name = _STORE[dtype]
        offsets = np.concatenate([[0], np.cumsum(enc.lengths)]).astype(np.int64)
        if self.root is None:
            states = np.empty((int(offsets[-1]), hidden), dtype=np_dtype)
            t0 = time.perf_counter()
            compute(states, offsets)
            return Features(states, offsets, dtype, encode_seconds=time.perf_counter() - t0)
        final = self.root / key
        found = self._load(final, len(enc), hidden, name)
        if found is not None:
            return found
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=self.root))
        try:
            states = np.lib.format.open_memmap(tmp / "states.npy", mode="w+", dtype=np_dtype,
                                               shape=(int(offsets[-1]), hidden))
            t0 = time.perf_counter()
            compute(states, offsets)
            seconds = time.perf_counter() - t0
            states.flush()
            del states
            np.save(tmp / "offsets.npy", offsets)
            meta = {"format": FORMAT, "n": len(enc), "hidden": hidden, "dtype": name,
                    "tokens": int(offsets[-1]), "created": time.time(), "encode_seconds": round(seconds, 4)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, final)
            except OSError:
                # Another run stored the same entry first (use theirs), or a broken entry is in the way.
                if self._load(final, len(enc), hidden, name) is None:
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        loaded = self._load(final, len(enc), hidden, name)
        loaded.hit = False
        return loaded

    @staticmethod
    def _load(path: Path, n: int, hidden: int, name: str) -> Features | None:
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT or meta.get("n") != n or meta.get("hidden") != hidden or meta.get("dtype") != name:
            return None
        try:
            states = np.load(path / "states.npy", mmap_mode="r")
            offsets = np.load(path / "offsets.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        return Features(states, offsets, _LOAD[name][1], hit=True, encode_seconds=float(meta.get("encode_seconds", 0)))


#: an entry's directory name (the key, or a partial write of it) and the files an entry holds
_ENTRY = re.compile(r"[0-9a-f]{32}(\.partial-[A-Za-z0-9_]+)?")
_ENTRY_FILES = {"states.npy", "offsets.npy", "meta.json"}


def is_entry(path: Path) -> bool:
    """Is ``path`` a cache entry: a directory named by a key, holding nothing but an entry's files?"""
    if path.is_symlink() or not path.is_dir() or not _ENTRY.fullmatch(path.name):
        return False
    return all(f.is_file() and not f.is_symlink() and f.name in _ENTRY_FILES for f in path.iterdir())


def clear(root: str | Path | None = None) -> tuple[int, int, int]:
    """Remove the cache entries under ``root``; return (entries, bytes removed, other things left).

    Only directories that are entries (:func:`is_entry`) are removed, so a cache directory pointed at the
    wrong folder (``--cache-dir ~``) loses nothing else; what else is there is counted and left alone.
    """
    root = Path(root) if root else default_cache_dir()
    if not root.exists():
        return 0, 0, 0
    if not root.is_dir():
        raise ConfigError(f"--cache-dir: {root} is not a directory")
    n, size, other = 0, 0, 0
    for p in root.iterdir():
        if is_entry(p):
            size += sum(f.stat().st_size for f in p.iterdir())
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        else:
            other += 1
    return n, size, other
