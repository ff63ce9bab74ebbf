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

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .arena import Arena, saving_into
from .batching import Encoded, collate, eval_batches, padded_length, train_batches
from .cost import CostMeter
from .methods import trainable_state
from .runtime import Runtime


class Feed:
    """Where batches come from. ``make(idx)`` gives the model's keyword inputs for examples ``idx``;
    batches are chosen by ``lengths`` (bucketed and shuffled for training, sorted for evaluation)."""

    bucket: bool = True

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def lengths(self) -> np.ndarray:  # pragma: no cover - every feed defines it
        raise NotImplementedError

    def make(self, idx: np.ndarray) -> dict:  # pragma: no cover
        raise NotImplementedError

    def split(self, idx: np.ndarray, max_tokens: int | None) -> list[np.ndarray]:
        """``idx`` in as few consecutive micro-batches of at most ``max_tokens`` padded tokens as will do, of
        equal size (give or take one; one example at least): 16 notes of 136-256 tokens under 2048 are 8 + 8,
        not 15 + 1 or 9 + 7, so that batches come in few shapes (see :func:`clintune.batching.padded_length`)."""
        if not max_tokens:
            return [idx]
        t = padded_length(int(self.lengths[idx].max()))
        per = max(1, max_tokens // max(t, 1))
        parts = -(-len(idx) // per)
        return np.array_split(idx, parts) if parts > 1 else [idx]

    def index_batches(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        return train_batches(self.lengths, batch_size, rng, self.bucket)

    def train_batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[dict, np.ndarray]]:
        for idx in self.index_batches(batch_size, rng):
            yield self.make(idx), idx

    def eval_batches(self, batch_size: int, max_tokens: int | None = None) -> Iterator[tuple[dict, np.ndarray]]:
        for batch in eval_batches(self.lengths, batch_size):
            for idx in self.split(batch, max_tokens):
                yield self.make(idx), idx


class TokenFeed(Feed):
    """Token ids -> padded (input_ids, attention_mask) batches."""

    def __init__(self, enc: Encoded, bucket: bool = True) -> None:
        self.enc, self.bucket = enc, bucket

    @property
    def lengths(self) -> np.ndarray:
        return self.enc.lengths

    def make(self, idx: np.ndarray) -> dict:
        ids, mask = collate([self.enc.ids[i] for i in idx], self.enc.pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    def probe(self, n: int) -> dict:
        """Inputs of one n-token example (for counting FLOPs)."""
        ids = np.resize(self.enc.ids[int(np.argmax(self.enc.lengths))], n)
        return {"input_ids": torch.from_numpy(ids)[None], "attention_mask": torch.ones(1, n, dtype=torch.long)}


def _shard(batches: list, runtime) -> list:
    """This process's share of an epoch's batches under DDP: every world-th, the same count on every rank."""
    if runtime.world == 1:
        return batches
    usable = len(batches) - len(batches) % runtime.world
    return batches[runtime.rank:usable:runtime.world]


class FeatureFeed(Feed):
    """Cached encoder states (a subset ``index`` of a :class:`~clintune.cache.Features`) -> head batches."""

    def __init__(self, features, index: np.ndarray, bucket: bool = True) -> None:
        self.features, self.index, self.bucket = features, np.asarray(index), bucket

    @property
    def lengths(self) -> np.ndarray:
        return self.features.lengths[self.index]

    def make(self, idx: np.ndarray) -> dict:
        states, mask = self.features.batch(self.index[idx])
        return {"states": states, "attention_mask": mask}

    def probe(self, n: int) -> dict:
        states, _ = self.features.batch(self.index[:1])
        return {"states": torch.zeros((1, n, states.shape[-1]), dtype=states.dtype),
                "attention_mask": torch.ones(1, n, dtype=torch.long)}


class ChunkFeed(Feed):
    """Long notes as windows (--long chunk): a batch of notes -> all their windows + each window's note."""

    def __init__(self, enc, bucket: bool = True) -> None:
        self.enc, self.bucket = enc, bucket

    @property
    def lengths(self) -> np.ndarray:
        return self.enc.lengths

    def make(self, idx: np.ndarray) -> dict:
        seqs, owner = self.enc.windows(idx)
        ids, mask = collate(seqs, self.enc.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "window_owner": torch.from_numpy(owner)}


def make_feed(enc, bucket: bool = True) -> Feed:
    from .batching import ChunkEncoded

    return ChunkFeed(enc, bucket) if isinstance(enc, ChunkEncoded) else TokenFeed(enc, bucket)


def _to(inputs: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return inputs
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in inputs.items()}


#: On CPU, evaluation batches run in pieces of at most this many padded tokens: the same outputs up to the
#: precision's rounding, without the transient activations of 64 long notes at once. Predicting the speed
#: benchmark's 797 test notes with its MiniLM: peak RSS 886-911 MB against 1092-1126 with whole batches of
#: 64, and 123-125 samples/s against 116-120 (2048: 813 MB, 121/s; 8192: 1047 MB, 125/s; AMD EPYC, before
#: packing). 8,192 since packed prediction (issue 7, Xeon with AMX, the same notes, one process, passes
#: alternating with 4,096): bf16 3.56 -> 3.25 s a pass, int8-static 3.24 -> 3.06 s (fewer products, each with
#: a fixed cost of about 40 us, and fewer layer calls); peak RSS of int8-static evaluation 801-807 -> 851-870 MB.
EVAL_TOKENS_CPU = 8192

#: On CPU, training's micro-batches hold at most this many padded tokens by default (their gradients summed: the
#: same update as the whole batch), which bounds what a step keeps for its backward pass. Encoders no bigger
#: than MiniLM-L6 (layers x width at most :data:`SMALL_ENCODER`) take whole 16-note batches of 256 tokens
#: (:data:`MICRO_TOKENS_SMALL`): half the passes, 1.17x the speed run's training (58.17-58.69 against 49.29-50.37
#: samples/s, Xeon with AMX, issue 7) at 1,131-1,132 MB peak RSS against 978-990, which the saved tensors' arena
#: (:mod:`clintune.arena`) and the block cache (:mod:`clintune.blocks`) made fit half the peer's memory.
#: The same accuracy: over eight seeds F1 -0.0004 (95% interval -0.0039 to +0.0031) against 2,048, test log loss
#: -0.0005. Larger encoders keep 2,048, as before.
MICRO_TOKENS_CPU = 2048
MICRO_TOKENS_SMALL = 4096
SMALL_ENCODER = 6 * 384


def default_micro_tokens(model: nn.Module, device: torch.device) -> int:
    """``--micro-batch-tokens``' default: 0 (whole batches) on GPUs and where no encoder trains (a head on
    cached features), else :data:`MICRO_TOKENS_SMALL` or :data:`MICRO_TOKENS_CPU` by the encoder's size (its
    first Hugging Face config's layers x hidden width; unknown: the larger encoders' default)."""
    if device.type != "cpu" or not getattr(model, "backbone_trains", True):
        return 0
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers", None)
        width = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None)
        if isinstance(layers, int) and isinstance(width, int):
            return MICRO_TOKENS_SMALL if layers * width <= SMALL_ENCODER else MICRO_TOKENS_CPU
    return MICRO_TOKENS_CPU


def eval_max_tokens(device: torch.device) -> int | None:
    """Token cap of evaluation pieces on ``device``: :data:`EVAL_TOKENS_CPU` on CPU, none on GPUs."""
    return EVAL_TOKENS_CPU if device.type == "cpu" else None


@torch.inference_mode()
def predict_logits(model: nn.Module, feed: Feed, batch_size: int, runtime: Runtime, num_labels: int,
                   token_level: bool = False):
    """Float32 logits in the feed's order: (N, K), or for token tasks a list of (tokens_i, K) arrays."""
    was_training = model.training
    model.eval()
    out = [None] * len(feed) if token_level else np.zeros((len(feed), num_labels), dtype=np.float32)
    for inputs, idx in feed.eval_batches(batch_size, eval_max_tokens(runtime.device)):
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
    """AdamW's groups: weight decay for weight matrices; none for biases, norm gains and IA3's scaling vectors
    (gains that start at 1, which decay would pull toward 0 rather than toward the identity)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in n.lower() or "ia3_l" in n else decay).append(p)
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
        num_labels: int | None = None, token_level: bool = False, arena: Arena | None = None) -> FitResult:
    """Train ``model`` in place; return what happened.

    ``targets.batch(idx, inputs)`` gives the batch's targets (see :mod:`clintune.tasks`);
    ``val_score(outputs) -> float``, higher is better; ``arena``: where each micro-batch's forward pass keeps
    the fused steps' saved tensors for its backward (:mod:`clintune.arena`; None: the heap).
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    device = runtime.device
    model.to(device).train()
    net = model
    if runtime.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(cfg.seed + 1000 * runtime.rank)   # same weights everywhere, own dropout noise per rank
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("nothing to train: the model has no trainable parameters")
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                            fused=device.type == "cuda" or None)
    steps_per_epoch = math.ceil(len(train_feed) / cfg.batch_size)
    if runtime.world > 1:
        steps_per_epoch = steps_per_epoch // runtime.world
    total = steps_per_epoch * cfg.epochs
    sched = get_linear_schedule_with_warmup(opt, int(round(cfg.warmup_ratio * total)), total)
    scaler = torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None
    rng = np.random.default_rng(cfg.seed)
    res = FitResult()
    micro_tokens = cfg.micro_batch_tokens
    if micro_tokens is None:   # auto: bound activation memory where the encoder trains on CPU
        micro_tokens = default_micro_tokens(model, device)
    meter.extra["micro_batch_tokens"] = micro_tokens
    flop_model = None
    measuring = 0.0          # counting FLOPs and measuring the peak: not training, so not in train_seconds
    if getattr(train_feed, "probe", None) is not None and len(train_feed):
        from .cost import calibrate_flops, matmul_peak_flops

        t0 = time.perf_counter()
        top = int(train_feed.lengths.max())
        flop_model = calibrate_flops(model, train_feed.probe, runtime, (max(top // 4, 1), max(top // 2, 2), max(top, 3)))
        meter.extra["train_flops"] = 0.0
        peak_dtype = runtime.dtype if runtime.precision != "fp32" else torch.float32
        meter.extra["matmul_peak_tflops"] = round(matmul_peak_flops(peak_dtype, device) / 1e12, 4)
        measuring += time.perf_counter() - t0
    best_state = None
    train_time = 0.0
    bar = tqdm(total=total, disable=None if cfg.progress else True, unit="step", dynamic_ncols=True,
               leave=False)  # disable=None: off when stderr is not a terminal
    ema = None
    try:
        for epoch in range(1, cfg.epochs + 1):
            t_epoch, seen, loss_sum = time.perf_counter(), 0, 0.0
            for idx in _shard(train_feed.index_batches(cfg.batch_size, rng), runtime):
                parts = []
                for part in train_feed.split(idx, micro_tokens):
                    inputs = train_feed.make(part)
                    parts.append((inputs, targets.batch(part, inputs)))
                total = sum(loss_fn.norm(y) for _, y in parts)      # the whole batch's mean denominator
                loss = 0.0
                for k, (inputs, y) in enumerate(parts):
                    sync = net.no_sync() if runtime.world > 1 and k < len(parts) - 1 else contextlib.nullcontext()
                    with sync, saving_into(arena):
                        with runtime.autocast():
                            logits = net(**_to(inputs, device))
                        part_loss = loss_fn(logits.float(), y.to(device)) / max(total, 1e-12)
                        (scaler.scale(part_loss) if scaler is not None else part_loss).backward()
                    loss += float(part_loss.detach())
                if scaler is not None:
                    scaler.unscale_(opt)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                lv = loss
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
            meter.add("train_steps", epoch_s, seen * runtime.world)
            if flop_model is not None:   # every example once per epoch, on one of the ranks
                meter.extra["train_flops"] += flop_model(train_feed.lengths) / runtime.world
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
    if flop_model is not None and train_time >= 60.0:   # a long run: the peak again, the better of the two
        t0 = time.perf_counter()
        meter.extra["matmul_peak_tflops"] = round(matmul_peak_flops(peak_dtype, device, remeasure=True) / 1e12, 4)
        measuring += time.perf_counter() - t0
    if measuring:
        meter.add("train", -measuring)       # fit() runs inside the caller's "train" phase
        meter.extra["measuring_seconds"] = round(measuring, 3)
    if best_state is not None and res.best_epoch != res.epochs_run:
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, v in best_state.items():
                named[n].copy_(v)
    model.eval()
    return res


