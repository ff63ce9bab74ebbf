"""Tokenisation once, then dynamic padding and length-aware batching.

Texts are tokenised once per run (fast Rust tokenizer, batched). Batches are padded to their own
longest member (rounded up to a multiple of 8, which suits the matrix units), never to ``max_length``.
Training batches are *bucketed*: the epoch's shuffled order is cut into chunks of ``64 x batch_size``,
each chunk sorted by length and cut into batches, and the batches shuffled again, so that a batch
holds notes of similar length (little padding) while the order stays random across the epoch.
Evaluation batches are sorted by length outright; outputs are returned in the input order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PAD_MULTIPLE = 8
BUCKET_CHUNK = 64


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
    """Pad to the longest sequence (rounded up to PAD_MULTIPLE): (input_ids, attention_mask), (B, T)."""
    t = max(len(s) for s in seqs)
    t = -(-t // PAD_MULTIPLE) * PAD_MULTIPLE
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
