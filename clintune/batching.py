"""Tokenisation once, then dynamic padding and length-aware batching.

Texts are tokenised once per run (fast Rust tokenizer, batched). Batches are padded to their own
longest member, never to ``max_length``, rounded up by :func:`padded_length`: to a multiple of 8 up to 64
tokens (short texts: sentences, NER), of :data:`PAD_MULTIPLE` (32) beyond. The coarser steps keep the number
of distinct batch shapes small: on CPU oneDNN compiles and caches matrix-product kernels for every new
shape, about 0.55 MB each (measured, cache of 1,024), and a LoRA step of MiniLM runs about twenty of them
per shape. Multiples of 8 all the way gave length-bucketed training of 256-token notes some 30 lengths x
several micro-batch sizes and up to 0.5 GB more peak memory than plain random batches; multiples of 32
cost a few percent more padded tokens there, and would cost short texts a quarter or more. CPU prediction in
bf16 then packs each batch's notes without their padding (:mod:`clintune.packing`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SHORT_PAD_MULTIPLE = 8  # the rounding of batch lengths up to SHORT_PAD_LIMIT tokens
SHORT_PAD_LIMIT = 64
PAD_MULTIPLE = 32       # beyond
BUCKET_CHUNK = 64


def padded_length(t: int) -> int:
    """The padded length of a batch whose longest member has ``t`` tokens (see the module docstring)."""
    step = SHORT_PAD_MULTIPLE if t <= SHORT_PAD_LIMIT else PAD_MULTIPLE
    return -(-int(t) // step) * step


@dataclass
class Encoded:
    """Token ids of each example (without padding) and which examples were truncated."""

    ids: list[np.ndarray]
    truncated: np.ndarray   # (N,) bool
    pad_id: int

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer, texts: list[str], max_length: int) -> Encoded:
    """Tokenise with special tokens, truncating to ``max_length``, and count truncated examples."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length + 1, add_special_tokens=True,
                    return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    ids, truncated = [], np.zeros(len(enc), dtype=bool)
    for i, seq in enumerate(enc):
        if len(seq) > max_length:  # one token over: the text was cut. Drop a content token, keep [SEP].
            truncated[i] = True
            seq = seq[: max_length - 1] + [seq[-1]] if seq[-1] in special else seq[:max_length]
        ids.append(np.asarray(seq, dtype=np.int64))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(ids, truncated, pad)


def collate(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence (rounded up by :func:`padded_length`): (input_ids, attention_mask), (B, T)."""
    t = padded_length(max(len(s) for s in seqs))
    ids = np.full((len(seqs), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), t), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  bucket: bool = True) -> list[np.ndarray]:
    """Index batches for one epoch (seeded by ``rng``), length-bucketed unless ``bucket`` is False."""
    order = rng.permutation(len(lengths))
    if not bucket:
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    chunk = batch_size * BUCKET_CHUNK
    for start in range(0, len(order), chunk):
        part = order[start: start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Index batches sorted by decreasing length (deterministic: depends on the data only)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class ChunkEncoded:
    """Long notes as overlapping windows (``--long chunk``).

    Each note's content tokens are cut into windows of ``max_length - specials`` tokens, consecutive
    windows sharing ``overlap`` tokens, each wrapped in the tokenizer's special tokens ([CLS] ... [SEP]).
    ``ids`` holds the windows of all notes back to back; note i owns windows ``starts[i]:starts[i+1]``.
    """

    ids: list[np.ndarray]
    starts: np.ndarray          # (N + 1,)
    truncated: np.ndarray       # (N,) bool: more than max_chunks windows were needed
    pad_id: int

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per note (all its windows): the bucketing key."""
        per_window = np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))
        return np.add.reduceat(per_window, self.starts[:-1]) if len(self.ids) else np.zeros(0, np.int64)

    def windows(self, idx: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Windows of notes ``idx`` and, for each window, the position (0..len(idx)-1) of its note."""
        seqs, owner = [], []
        for j, i in enumerate(idx):
            a, b = self.starts[i], self.starts[i + 1]
            seqs += self.ids[a:b]
            owner += [j] * (b - a)
        return seqs, np.asarray(owner, dtype=np.int64)


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after a single sequence ([CLS] / [SEP] for BERT)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for a in range(len(full) - len(plain) + 1):
        if full[a: a + len(plain)] == plain:
            return full[:a], full[a + len(plain):]
    return [], []  # pragma: no cover - no tokenizer wraps a text without containing it


def encode_chunks(tokenizer, texts: list[str], max_length: int, overlap: int, max_chunks: int) -> ChunkEncoded:
    body = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False, verbose=False)["input_ids"]
    prefix, suffix = special_wrap(tokenizer)
    width = max_length - len(prefix) - len(suffix)
    step = max(width - overlap, 1)
    ids, starts, trunc = [], [0], np.zeros(len(texts), dtype=bool)
    for i, toks in enumerate(body):
        pieces = [toks[a: a + width] for a in range(0, max(len(toks) - overlap, 1), step)] or [[]]
        if len(pieces) > max_chunks:
            pieces, trunc[i] = pieces[:max_chunks], True
        ids += [np.asarray(prefix + list(p) + suffix, dtype=np.int64) for p in pieces]
        starts.append(len(ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ChunkEncoded(ids, np.asarray(starts, dtype=np.int64), trunc, pad)
