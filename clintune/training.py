"""One training loop for every backbone, method and head.

AdamW (no weight decay on biases and norm weights) with linear warm-up then linear decay to zero,
gradient-norm clipping, mixed precision (autocast; fp16 with loss scaling on CUDA), dynamic padding
with length-bucketed batches, evaluation on the validation split after every epoch, early stopping
after ``patience`` epochs without improvement, and the best epoch's trainable weights restored at the
end. Seeded: the same seed on the same machine gives the same weights and metrics.

The loop sees the model only through ``model(**inputs) -> logits`` and the data only through a
*feed* (token ids for the encoder, or cached encoder states for a frozen backbone), so the same
loop trains every configuration.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from .batching import Encoded, collate, eval_batches, train_batches
from .cost import CostMeter
from .methods import trainable_state
from .runtime import Runtime


class Feed(Protocol):
    """Where batches come from: ``inputs`` are keyword arguments of the model's forward."""

    def __len__(self) -> int: ...
    def train_batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[dict, np.ndarray]]: ...
    def eval_batches(self, batch_size: int) -> Iterator[tuple[dict, np.ndarray]]: ...


@dataclass
class TokenFeed:
    """Token ids -> padded (input_ids, attention_mask) batches."""

    enc: Encoded
    bucket: bool = True

    def __len__(self) -> int:
        return len(self.enc)

    def _batch(self, idx: np.ndarray) -> dict:
        ids, mask = collate([self.enc.ids[i] for i in idx], self.enc.pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    def train_batches(self, batch_size, rng):
        for idx in train_batches(self.enc.lengths, batch_size, rng, self.bucket):
            yield self._batch(idx), idx

    def eval_batches(self, batch_size):
        for idx in eval_batches(self.enc.lengths, batch_size):
            yield self._batch(idx), idx


@dataclass
class FeatureFeed:
    """Cached encoder states (a subset ``index`` of a :class:`~clintune.cache.Features`) -> head batches."""

    features: object
    index: np.ndarray
    bucket: bool = True

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        return self.features.lengths[self.index]

    def _batch(self, idx: np.ndarray) -> dict:
        states, mask = self.features.batch(self.index[idx])
        return {"states": states, "attention_mask": mask}

    def train_batches(self, batch_size, rng):
        for idx in train_batches(self.lengths, batch_size, rng, self.bucket):
            yield self._batch(idx), idx

    def eval_batches(self, batch_size):
        for idx in eval_batches(self.lengths, batch_size):
            yield self._batch(idx), idx


@dataclass
class ChunkFeed:
    """Long notes as windows (--long chunk): a batch of notes -> all their windows + each window's note."""

    enc: object
    bucket: bool = True

    def __len__(self) -> int:
        return len(self.enc)

    def _batch(self, idx: np.ndarray) -> dict:
        seqs, owner = self.enc.windows(idx)
        ids, mask = collate(seqs, self.enc.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "window_owner": torch.from_numpy(owner)}

    def train_batches(self, batch_size, rng):
        for idx in train_batches(self.enc.lengths, batch_size, rng, self.bucket):
            yield self._batch(idx), idx

    def eval_batches(self, batch_size):
        for idx in eval_batches(self.enc.lengths, batch_size):
            yield self._batch(idx), idx


def make_feed(enc):
    from .batching import ChunkEncoded

    return ChunkFeed(enc) if isinstance(enc, ChunkEncoded) else TokenFeed(enc)


def _to(inputs: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return inputs
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in inputs.items()}


@torch.inference_mode()
def predict_logits(model: nn.Module, feed: Feed, batch_size: int, runtime: Runtime, num_labels: int,
                   token_level: bool = False):
    """Float32 logits in the feed's order: (N, K), or for token tasks a list of (tokens_i, K) arrays."""
    was_training = model.training
    model.eval()
    out = [None] * len(feed) if token_level else np.zeros((len(feed), num_labels), dtype=np.float32)
    for inputs, idx in feed.eval_batches(batch_size):
        with runtime.autocast():
            logits = model(**_to(inputs, runtime.device)).float().cpu().numpy()
        if token_level:
            lens = inputs["attention_mask"].sum(1).numpy()
            for j, i in enumerate(idx):
                out[i] = logits[j, : lens[j]]
        else:
            out[idx] = logits
    model.train(was_training)
    return out


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


@dataclass
class FitResult:
    epochs_run: int = 0
    best_epoch: int = 0
    best_val: float | None = None
    time_to_best_s: float = 0.0
    stopped_early: bool = False
    history: list = field(default_factory=list)


def fit(model: nn.Module, train_feed: Feed, targets, cfg, runtime: Runtime, meter: CostMeter,
        *, val_feed: Feed | None = None, val_score: Callable[[object], float] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        num_labels: int | None = None, token_level: bool = False) -> FitResult:
    """Train ``model`` in place; return what happened.

    ``targets.batch(idx, inputs)`` gives the batch's targets (see :mod:`clintune.tasks`);
    ``val_score(outputs) -> float``, higher is better.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    device = runtime.device
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: the model has no trainable parameters")
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                            fused=device.type == "cuda" or None)
    steps_per_epoch = math.ceil(len(train_feed) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = get_linear_schedule_with_warmup(opt, int(round(cfg.warmup_ratio * total)), total)
    scaler = torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None
    rng = np.random.default_rng(cfg.seed)
    res = FitResult()
    best_state = None
    train_time = 0.0
    bar = tqdm(total=total, disable=None if cfg.progress else True, unit="step", dynamic_ncols=True,
               leave=False)  # disable=None: off when stderr is not a terminal
    ema = None
    try:
        for epoch in range(1, cfg.epochs + 1):
            t_epoch, seen, loss_sum = time.perf_counter(), 0, 0.0
            for inputs, idx in train_feed.train_batches(cfg.batch_size, rng):
                y = targets.batch(idx, inputs).to(device)
                with runtime.autocast():
                    logits = model(**_to(inputs, device))
                loss = loss_fn(logits.float(), y)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                lv = float(loss.detach())
                loss_sum += lv * len(idx)
                seen += len(idx)
                ema = lv if ema is None else 0.95 * ema + 0.05 * lv
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{ema:.4f}",
                                samples_s=f"{seen / max(time.perf_counter() - t_epoch, 1e-9):.1f}",
                                refresh=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_s = time.perf_counter() - t_epoch
            meter.add("train_steps", epoch_s, seen)
            train_time += epoch_s
            entry = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1)}
            res.epochs_run = epoch
            if val_feed is not None and val_score is not None and len(val_feed):
                with meter.phase("validate", len(val_feed)):
                    score = float(val_score(predict_logits(model, val_feed, cfg.eval_batch_size, runtime,
                                                           num_labels, token_level)))
                entry["val_score"] = score
                if res.best_val is None or score > res.best_val:
                    res.best_val, res.best_epoch, res.time_to_best_s = score, epoch, train_time
                    best_state = trainable_state(model)
                elif cfg.patience and epoch - res.best_epoch >= cfg.patience:
                    res.history.append(entry)
                    res.stopped_early = True
                    break
            else:
                res.best_epoch, res.time_to_best_s = epoch, train_time
            res.history.append(entry)
    finally:
        bar.close()
    if best_state is not None and res.best_epoch != res.epochs_run:
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, v in best_state.items():
                named[n].copy_(v)
    model.eval()
    return res


