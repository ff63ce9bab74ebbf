"""CPU speed-ups that keep the training maths unchanged (profiled; see benchmarks/speed.py).

A LoRA step of a BERT-size encoder on CPU with AMX spends less of its time in matrix products (bf16 ones
run at over 2 TFLOP/s on 2 Xeon cores; about 0.4 on 2 AMD Zen 4 cores without AMX, where they take about
60% of a step once the rest is done as below) than in passes over memory: dropout (``torch.bernoulli_``
draws about 0.2 G numbers/s per core, and BERT drops out every attention probability, B x heads x T x T
of them per layer, as well as hidden states and LoRA inputs), the unfused attention that PyTorch's fused
SDPA falls back to whenever attention dropout is on, and page faults on freshly mapped memory.

* :func:`keep_mask` / :func:`keep_bits` draw the Bernoulli(1 - p) keep-mask from 16-bit uniform integers,
  four per 64-bit SplitMix64 output (:mod:`clintune.masks`: a vectorised C loop, numpy's SFC64 without a
  compiler): keep iff u >= p * 2^16, so the drop probability is p rounded to a multiple of 2^-16
  (0.1 -> 0.100006). Seeded by the usual ``torch.manual_seed``.
* :func:`zero_dropped` applies a mask by an integer product on the values' bits (exact, vectorised).
* :class:`FastDropout` is ``nn.Dropout`` with that mask: y = x * m / (1 - p); LoRA's input dropouts
  hand their result to ``lora_A`` already in the autocast dtype (the same bits, one pass fewer).
* :func:`attention` is an attention function for transformers' ``AttentionInterface``: without
  gradients (inference) in bf16 on CPU it is :func:`masks.attention` (one compiled kernel; else
  :func:`_chunked_attention`), otherwise SDPA (fused); training with dropout it is :class:`_DropoutAttention`,
  which makes, normalises, drops out and uses the scores a few examples at a time while they are in
  cache, in the autocast dtype (in bf16 softmax and dropout are one compiled pass, :mod:`clintune.masks`),
  and keeps P and the mask's seed for an explicit backward pass.
* :func:`frozen_linears_to` stores frozen ``nn.Linear`` weights in bf16, exactly what autocast would
  cast them to at every call, minus the cast (and half the memory). Trainable parameters stay fp32.
  :class:`FrozenLinear` then runs them through oneDNN with the bias inside the product: the same bits as
  ``addmm``, without its pass that first broadcasts the bias into the output.
* :func:`fuse_passes` fuses the remaining passes over memory by class swaps (bf16 on CPU only; the original
  forward otherwise): PEFT's LoRA linear over a :class:`FrozenLinear` (:class:`_LoraLinear`: the update
  added inside the frozen product, the two input gradients summed in one pass), BERT's and DistilBERT's
  self-attention whose query, key and value are all such (:class:`_LoraLinears`: the three and their updates one
  product, their gradients side by side as the attention's backward writes them), BERT's sublayer end
  LayerNorm(dropout(h) + residual) with a frozen LayerNorm (:class:`_DropoutAddNorm` in training; in
  prediction LayerNorm(h + residual) in one pass, :func:`masks.add_norm`), and the exact GELU, which keeps
  its derivative from the forward pass in training (:class:`_GeluKeepGrad`) and in prediction is applied by
  oneDNN inside the feed-forward block's frozen product (:func:`_ffn_forward`: 1.05x for whole bf16 prediction
  on 2 Xeon cores with AMX, paired in one process). :class:`_Dropout` itself is one compiled pass each way
  (:func:`masks.dropout`).
* :func:`reuse_freed_memory` lets glibc's malloc reuse freed blocks instead of mapping fresh pages, and the
  fused steps' saved tensors come from one reused buffer (:class:`clintune.arena.Arena`, :attr:`Speedups.arena`),
  so they leave no holes in the heap; the other large blocks come from :mod:`clintune.blocks` while training,
  each mapped once and reused, so that small long-lived blocks do not keep holes between them either.

On CUDA none of this is needed (SDPA's fused kernels do dropout themselves), so :func:`accelerate`
only rewrites models that train on CPU.
"""
from __future__ import annotations

import inspect
from functools import lru_cache, partial

import torch
from torch import nn

from . import blocks, masks
from .arena import Arena, saved_empty
from .packing import STARTS

ATTENTION = "clintune"
NO_KERNEL = "clintune-no-kernel"       # the same attention without the compiled attention kernels

#: the parts of :func:`accelerate` that ``--fast-off`` can leave out, one at a time, to measure what each changes
PARTS = {
    "first_token": "the last layer for the first token only (--pooling cls)",
    "attention": "clintune's attention (transformers' own instead, with torch's dropout)",
    "attention_kernel": "the compiled attention kernels (PyTorch's products a chunk at a time instead)",
    "dropout": "the fast dropout masks (torch's nn.Dropout instead; also leaves out lora and sublayer_end, "
               "which draw the same masks)",
    "bf16_weights": "frozen weights stored in bf16 through oneDNN (autocast casts fp32 ones instead; also "
                    "leaves out lora)",
    "lora": "the fused LoRA linear (PEFT's; also leaves out qkv)",
    "qkv": "query, key and value's LoRA linears as one (their frozen products one product; one at a time instead)",
    "sublayer_end": "the fused dropout + residual + LayerNorm (BERT's)",
    "gelu": "GELU keeping its derivative in training, and inside the feed-forward product in prediction (PyTorch's)",
    "memory": "reuse of freed memory (glibc's default)",
    "arena": "training's saved tensors in one reused buffer (clintune.arena; glibc's heap instead)",
    "blocks": "training's large blocks mapped once and reused (clintune.blocks; glibc's heap instead)",
    "packing": "prediction's notes packed without padding (clintune.packing; padded batches instead)",
    "embeddings": "prediction's embeddings (gathers, adds, LayerNorm; BERT's) in one pass (PyTorch's)",
}
_registered = False


def _threshold(p: float) -> int:
    """keep iff u >= this, for u uniform on [-2^15, 2^15): P(drop) = p rounded to a multiple of 2^-16."""
    return int(round(p * 65536)) - 32768


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask, True with probability 1 - p (p quantised to 2^-16: keep iff u >= p 2^16 - 2^15)."""
    keep = masks.draw(torch.empty(shape, dtype=torch.bool), _threshold(p))
    return keep if device is None or device.type == "cpu" else keep.to(device)


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def keep_bits(shape: tuple[int, ...], p: float, dtype: torch.dtype, seed: int | None = None) -> torch.Tensor:
    """The :func:`keep_mask` draw as 0/1 integers as wide as ``dtype`` (for :func:`zero_dropped`); ``seed``
    (default: a fresh one from torch's generator) redraws the very same mask."""
    return masks.draw(torch.empty(shape, dtype=_BITS[dtype]), _threshold(p), seed)


def zero_dropped(x: torch.Tensor, keep: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x`` with its entries where ``keep`` is 0/False set to +0: an integer product of x's bits by 0/1
    (bit-exact, and several times faster on CPU than ``torch.where`` with a boolean mask)."""
    bits = _BITS[x.dtype]
    keep = keep if keep.dtype == bits else keep.to(bits)
    if inplace:
        x.view(bits).mul_(keep)
        return x
    return (x.contiguous().view(bits) * keep).view(x.dtype)


class _Dropout(torch.autograd.Function):
    """y = x * m / (1 - p) with m from :func:`keep_bits`, optionally emitted in ``out_dtype`` (see FastDropout):
    round(x / (1 - p)) then zeroed, the same bits as zeroing then rounding. Only the mask's seed is kept:
    the backward pass redraws m (a few ms) instead of holding it between passes (as wide as the values:
    about 100 MB over a LoRA step of MiniLM, 16 x 256 tokens)."""

    @staticmethod
    def forward(ctx, x, p, out_dtype):
        out_dtype = out_dtype or x.dtype
        ctx.seed, ctx.p = masks.new_seed(), p
        ctx.scale, ctx.in_dtype = 1.0 / (1.0 - p), x.dtype
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        if (x.device.type == "cpu" and masks.dropout_available(x.dtype, out_dtype)       # one compiled pass
                and not (x.dtype == torch.bfloat16 and out_dtype == torch.float32)):      # (torch.mul rounds first)
            return masks.dropout(x.contiguous(), y, ctx.seed, _threshold(p), ctx.scale)
        keep = keep_bits(x.shape, p, out_dtype, ctx.seed)
        torch.mul(x, ctx.scale, out=y)
        return zero_dropped(y, keep.to(x.device), inplace=True)

    @staticmethod
    def backward(ctx, grad):
        if grad.device.type == "cpu" and masks.dropout_available(grad.dtype, ctx.in_dtype):
            out = torch.empty(grad.shape, dtype=ctx.in_dtype)
            return masks.dropout(grad.contiguous(), out, ctx.seed, _threshold(ctx.p), ctx.scale), None, None
        keep = keep_bits(grad.shape, ctx.p, grad.dtype, ctx.seed).to(grad.device)
        return zero_dropped(grad, keep).to(ctx.in_dtype).mul_(ctx.scale), None, None


class FastDropout(nn.Module):
    """Inverted dropout y = x * m / (1 - p), m ~ Bernoulli(1 - p), drawn by :func:`keep_mask`.

    ``to_autocast=True`` is for a dropout whose only consumer is a linear layer (LoRA's ``lora_dropout``
    feeding ``lora_A``): under CPU autocast it hands back the result already in the autocast dtype, the
    cast the linear would make first, so the numbers are the same and one pass and half the memory go.
    """

    def __init__(self, p: float = 0.5, to_autocast: bool = False) -> None:
        super().__init__()
        self.p, self.to_autocast = float(p), to_autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        out = None
        if self.to_autocast and x.dtype == torch.float32 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            out = torch.get_autocast_dtype("cpu")
        return _Dropout.apply(x, self.p, out)

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", to_autocast=True" if self.to_autocast else "")


_CHUNK_ELEMENTS = 1 << 20     # scores of one chunk of examples: 2 MB in bf16, so they stay in cache


def joint_view(*parts: torch.Tensor) -> torch.Tensor | None:
    """The (m, G n) matrix of which G (B, h, T, d) tensors are the column blocks e n .. (e + 1) n - 1 (n = h d,
    m = B T), i.e. ``joint.view(B, T, G, h, d)[:, :, e].transpose(1, 2)`` for each e in turn (what
    :class:`_LoraLinears` returns for query, key and value, and the attention's backward writes their gradients
    as), as a view of their storage; None where they are laid out otherwise."""
    first = parts[0]
    if first.dim() != 4:
        return None
    b, h, t, d = first.shape
    g = len(parts)
    want = (t * g * h * d, d, g * h * d, 1)
    size = first.element_size()
    for e, x in enumerate(parts):
        if (x.shape != first.shape or x.dtype != first.dtype or x.stride() != want
                or x.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or x.data_ptr() != first.data_ptr() + e * h * d * size):
            return None
    return first.as_strided((b * t, g * h * d), (g * h * d, 1), first.storage_offset())


class _DropoutAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + bias) with dropout, times V, a chunk of examples at a time, in q's dtype.

    The (B, h, T, T) scores of a chunk are made, normalised, dropped out and used while still in cache;
    the probabilities P (q's dtype) are kept for the backward pass, and the 0/1 keep-mask m only by its
    seed (redrawn there: 25 MB a layer fewer held at 16 x 12 heads x 256^2 in bf16).
    With Q' = Q * scale and O = (P * m) V / (1 - p):
        dV = (P * m)^T dO',  dP = (dO' V^T) * m,  dS = P * (dP - rowsum(dP * P)),
        dQ = dS K * scale,  dK = dS^T Q',  where dO' = dO / (1 - p).
    In bf16 where the kernels are compiled (:func:`masks.softmax_keep`), softmax and dropout are one pass over
    the scores, and dropout's and softmax's gradients one pass over dP (profiled on 2 Zen 4 cores: a layer's
    attention at 16 x 256 tokens from about 40 to 32 ms, forward and backward); otherwise PyTorch's softmax
    and its gradient with :func:`zero_dropped`. Both use :func:`masks.attention_keep`'s mask for a seed.
    Under bf16 autocast this is the same maths as autocast's unfused attention (bf16 products, softmax
    accumulated in fp32), with P rounded to bf16 before, rather than after, its backward. ``bias`` is the
    additive mask (0 or -inf, one per example, broadcast over heads) with ``padded[i]`` saying whether example
    i has any -inf (:func:`_additive`).
    Where the AVX-512 BF16 kernels are compiled (head size 32 or 64, T <= 512, a bool ``mask``), the forward is
    :func:`masks.attention` with dropout and the backward :func:`masks.attention_backward`, one (example, head)
    at a time in cache: S and dP are accumulated in fp32 and never rounded to bf16 (closer to the fp32
    attention that PyTorch's math kernel computes under dropout for Trainer + PEFT), P is kept as above, and
    every product is rounded once.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, padded, p, scale, mask=None, kernels=True):
        with torch.autocast("cpu", enabled=False):
            b, h, t, _ = q.shape
            side_by_side = joint_view(q, k, v) is not None
            chunk = _examples_per_chunk(h, t)
            q = torch.mul(q, scale, out=saved_empty(q.shape, q.dtype))       # kept, with k, v and P: the arena's
            k, v = (x if x.is_contiguous() else saved_empty(x.shape, x.dtype).copy_(x) for x in (k, v))
            probs = saved_empty((b, h, t, t), q.dtype)
            seed, threshold, fused = masks.new_seed(), _threshold(p), _fused(q.dtype, t)
            out = None
            if fused and kernels and _attention_kernels():  # one kernel (None: a mask or size it does not take)
                out = masks.attention(q, k, v, mask, 1.0, probs=probs, seed=seed, threshold=threshold,
                                      dropout_scale=1.0 / (1.0 - p))
            ctx.p, ctx.scale, ctx.chunk, ctx.seed, ctx.threshold, ctx.fused = p, scale, chunk, seed, threshold, fused
            ctx.kernel, ctx.side_by_side = out is not None, side_by_side
            if out is not None:
                ctx.save_for_backward(q, k, v, probs)
                return out.transpose(1, 2)                          # (B, h, T, d) view of the (B, T, h, d) output
            out = torch.empty_like(q)
            kept, keep = _mask_buffers(fused, probs, chunk, threshold, seed)
            for s in range(0, b, chunk):
                e = min(s + chunk, b)
                scores = torch.matmul(q[s:e], k[s:e].transpose(-1, -2))
                if bias is not None and any(padded[s:e]):
                    scores.add_(bias[s:e])
                if fused:
                    dropped = kept[: e - s]
                    masks.softmax_keep(scores, probs[s:e], dropped, s * h * t, seed, threshold)
                else:
                    torch.ops.aten._softmax.out(scores, -1, False, out=probs[s:e])
                    dropped = zero_dropped(probs[s:e], keep[s:e])
                torch.matmul(dropped, v[s:e], out=out[s:e])
            out.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(q, k, v, probs)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, probs = ctx.saved_tensors
        b, h, t, _ = q.shape
        threshold, fused = ctx.threshold, ctx.fused                  # what the forward did, with the same mask
        if ctx.kernel:                  # the whole backward in one kernel too (it takes whatever the forward took)
            out = None
            if ctx.side_by_side:        # q, k, v were views of one (B, T, 3, h, d): their gradients laid out alike
                joint = torch.empty((b, t, 3, h, q.shape[-1]), dtype=q.dtype)
                out = tuple(joint[:, :, e].transpose(1, 2) for e in range(3))
            with torch.autocast("cpu", enabled=False):
                grads = masks.attention_backward(q, k, v, d_out, probs, ctx.seed, threshold, 1.0 / (1.0 - ctx.p),
                                                 ctx.scale, out=out)
            return (*grads, None, None, None, None, None, None)
        kept, keep = _mask_buffers(fused, probs, ctx.chunk, threshold, ctx.seed)
        with torch.autocast("cpu", enabled=False):
            d_out = (d_out * (1.0 / (1.0 - ctx.p))).to(q.dtype).contiguous()
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            for s in range(0, b, ctx.chunk):
                e = min(s + ctx.chunk, b)
                d_s = torch.matmul(d_out[s:e], v[s:e].transpose(-1, -2))                  # dP before the mask
                if fused:
                    dropped = kept[: e - s]
                    masks.softmax_keep_backward(d_s, probs[s:e], dropped, s * h * t, ctx.seed, threshold)
                else:
                    dropped = zero_dropped(probs[s:e], keep[s:e])
                    d_s = torch._softmax_backward_data(zero_dropped(d_s, keep[s:e], inplace=True), probs[s:e], -1,
                                                       q.dtype)
                torch.matmul(dropped.transpose(-1, -2), d_out[s:e], out=dv[s:e])
                torch.matmul(d_s, k[s:e], out=dq[s:e])
                torch.matmul(d_s.transpose(-1, -2), q[s:e], out=dk[s:e])
            dq.mul_(ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None


@lru_cache(maxsize=1)
def _attention_kernels() -> bool:
    """Whether attention goes to the compiled bf16 kernels (:func:`masks.attention`, :func:`masks.attention_backward`):
    wherever they are built (AVX-512 BF16), in their AMX form on CPUs with AMX tiles. Their AVX-512 form's products
    are dot products, measured faster than oneDNN's batched products on Zen 4 (no AMX) but slower than oneDNN's on
    AMX tiles; their AMX form (the same element-wise steps, products on the tiles) is faster than both oneDNN's
    products and PyTorch's SDPA there. Measured on 2 Xeon cores with AMX (``benchmarks/attention_cpu.py``, 16 x 12
    heads x 256 x 32): training's attention forward and backward 16.6 ms with the AMX kernels against 32.7 with the
    chunked products (34.3 for the AVX-512 form); prediction 3.6 ms against 5.7 for SDPA; 16 packed notes 2.3 ms
    against 4.3 for SDPA one note at a time. Where Linux does not lend a process the tiles (kernels before 5.16),
    the kernels step aside on AMX CPUs: the chunked products train and SDPA predicts (:func:`_predict_attention`)."""
    lib = masks.compiled()
    if lib is None or not lib.attention_bf16_available():
        return False
    return not _amx() or bool(lib.attention_amx_available())


def _int8_attention(module) -> bool:
    """Whether a self-attention module marked ``int8_attention`` (``--quantize int8``,
    :func:`clintune.quantize.quantize_int8`) attends through :func:`masks.attention_int8` (where it is built: AVX-512
    VNNI). Not where the bf16 kernels run in their AMX form, faster there than the int8 kernel and exact to bf16:
    measured on 2 Xeon cores with AMX (``benchmarks/attention_cpu.py``), 3.6 ms against 4.1 at 16 x 12 heads x 256 x
    32, 16.7 against 21.4 at 16 x 12 x 512 x 64, packed 2.5 against 3.0."""
    if not getattr(module, "int8_attention", False):
        return False
    lib = masks.compiled()       # asked each time: the form can be switched (masks.amx_form; _attention_kernels caches)
    return not (_amx() and lib is not None and lib.attention_bf16_available() and lib.attention_amx_available())


@lru_cache(maxsize=1)
def _amx() -> bool:
    """Whether the CPU has AMX tiles for bf16 (oneDNN, and so PyTorch's products and SDPA, run on them)."""
    from .runtime import cpu_flags

    return "amx_bf16" in cpu_flags()


def _predict_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """Prediction's bf16 attention on CPU where the compiled bf16 kernel does not run: (B, h, T, d) -> (B, T, h, d).

    With AMX (tiles not lent to the kernels' AMX form, :func:`_attention_kernels`), PyTorch's fused attention (SDPA:
    its flash kernel's products run on the tiles, scores and softmax in fp32); measured on 2 Xeon cores with AMX,
    12 heads (``benchmarks/attention_cpu.py``): 6.1 ms at 16 x 256 x 32 against 9.3 for :func:`_chunked_attention`
    and 11.5 for the kernels' AVX-512 form; 30.1 against 41.0 and 79.5 at 16 x 512 x 64.
    Without AMX, :func:`_chunked_attention` (faster than SDPA on Zen 4)."""
    if _amx():
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous()
    return _chunked_attention(q, k, v, mask, scale)


def _examples_per_chunk(h: int, t: int) -> int:
    """How many examples' (h, T, T) scores make one cache-sized chunk (at least one)."""
    return max(1, _CHUNK_ELEMENTS // (h * t * t))


def _fused(dtype: torch.dtype, t: int) -> bool:
    return dtype == torch.bfloat16 and masks.fused_softmax_available(t)


def _mask_buffers(fused: bool, probs: torch.Tensor, chunk: int, threshold: int, seed: int):
    """(kept, keep) for a pass of :class:`_DropoutAttention` over the (B, h, T, T) ``probs``: fused, a
    scratch chunk for P m (the kernels draw the mask themselves) and no mask; otherwise no scratch and the
    whole 0/1 mask, as wide as the values (:func:`masks.attention_keep`)."""
    if fused:
        return torch.empty((min(chunk, probs.shape[0]), *probs.shape[1:]), dtype=probs.dtype), None
    return None, masks.attention_keep(probs.shape, threshold, _BITS[probs.dtype], seed)


_BIAS: dict = {}


def _additive(mask: torch.Tensor | None, dtype: torch.dtype, batch: int):
    """Attend-mask (bool, True = attend; or already additive) -> (0 / -inf bias in ``dtype``, per-example
    "has a -inf" flags), both for ``batch`` examples (one mask for the batch is broadcast over it). Made once
    per forward pass: every layer gets the same mask tensor."""
    if mask is None:
        return None, None
    bias, padded = _bias_of(mask, dtype)
    if bias.shape[0] != batch:                                                   # one mask for the batch
        return bias.expand(batch, *bias.shape[1:]), padded * batch
    return bias, padded


def _bias_of(mask: torch.Tensor, dtype: torch.dtype):
    """:func:`_additive`'s bias and flags for the mask as given, cached for the mask tensor."""
    key = (id(mask), -1 if mask.is_inference() else mask._version, dtype)   # inference tensors have no version
    if _BIAS.get("key") != key or _BIAS.get("mask") is not mask:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
        else:
            bias = mask.to(dtype)
        padded = (bias != 0).flatten(1).any(1).tolist()
        _BIAS.update(key=key, mask=mask, bias=bias, padded=padded)
    return _BIAS["bias"], _BIAS["padded"]


def _chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) V without gradients, bf16 on CPU: (B, h, T, d) -> (B, T, h, d).

    The training forward of :class:`_DropoutAttention` with p = 0: a chunk of examples at a time, so that the
    (chunk, h, T, T) scores stay in cache while they are normalised (PyTorch's softmax, accumulated in fp32)
    and multiplied by V. Profiled on 2 Zen 4 cores at 16 x 12 heads x 256 tokens x 32: 11.4 ms against 15.3
    ms for PyTorch's fused CPU kernel (``scaled_dot_product_attention``), whose 32-wide blocks run slowly;
    prediction spent a quarter of its time there. The scores are rounded to bf16 before the softmax, as in
    training (the same maths as the model was trained with).
    """
    with torch.autocast("cpu", enabled=False):
        b, h, t, _ = q.shape
        chunk = _examples_per_chunk(h, t)
        bias, padded = _additive(mask, q.dtype, b)
        q = q * scale
        out = torch.empty((b, t, h, q.shape[-1]), dtype=q.dtype)
        probs = torch.empty((min(chunk, b), h, t, t), dtype=q.dtype)
        for s in range(0, b, chunk):
            e = min(s + chunk, b)
            scores = torch.matmul(q[s:e], k[s:e].transpose(-1, -2))
            if bias is not None and any(padded[s:e]):
                scores.add_(bias[s:e])
            p = probs[: e - s]
            torch.ops.aten._softmax.out(scores, -1, False, out=p)
            out[s:e] = torch.matmul(p, v[s:e]).transpose(1, 2)
        return out


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, kernels: bool = True,
              **kwargs):
    """(B, h, T, d) query/key/value -> ((B, T, h, d) output, None); mask: bool (B, 1, T, T), True = attend.

    Only for plain bidirectional self-attention (modules that say ``is_causal = False``, as BERT-family
    encoders do); anything else goes to transformers' SDPA attention unchanged.
    Without gradients: bf16 on CPU :func:`masks.attention` (:func:`_attention_kernels`, AMX tiles where the CPU has
    them) or :func:`_predict_attention` (PyTorch's fused SDPA with AMX, else :func:`_chunked_attention`), otherwise
    PyTorch's fused SDPA; a module marked ``int8_attention`` (``--quantize int8``,
    :func:`clintune.quantize.quantize_int8`) takes :func:`masks.attention_int8` first wherever it is built (AVX-512
    VNNI), except where the bf16 kernels' AMX form runs, faster there (:func:`_int8_attention`). Training with
    dropout on CPU: :class:`_DropoutAttention`.
    Otherwise (gradients without dropout) the unfused form: on CPU the fused kernel's backward is slower
    than two matrix products, softmax and their gradients. ``kernels=False`` (:data:`NO_KERNEL`, ``--fast-off
    attention_kernel``) leaves out the compiled attention kernels: PyTorch's products a chunk at a time.
    Notes packed into one sequence for prediction (:mod:`clintune.packing`) come with their offsets as
    transformers' ``cu_seq_lens_q`` keyword: each attends to itself alone (:func:`_packed_attention`).
    """
    if (getattr(module, "is_causal", None) is not False or kwargs.get("is_causal")
            or getattr(module, "num_key_value_groups", 1) != 1 or key.shape[-2] != query.shape[-2]):
        # not a plain bidirectional self-attention (a decoder, grouped keys, cross-attention): transformers' own
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    starts = kwargs.get(STARTS)
    if starts is not None:                                     # packed notes (clintune.packing)
        if needs_grad or attention_mask is not None:
            raise ValueError("clintune attention: packed sequences are for prediction, without a mask")
        return _packed_attention(module, query, key, value, starts, scale, kernels), None
    if not needs_grad:
        if query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.bfloat16:
            out = None
            if kernels and _int8_attention(module):                     # --quantize int8 (clintune.quantize)
                out = masks.attention_int8(query, key, value, attention_mask, scale)     # None: no VNNI kernel
            if out is None and kernels and _attention_kernels():
                out = masks.attention(query, key, value, attention_mask, scale)
            return (out if out is not None else _predict_attention(query, key, value, attention_mask, scale)), None
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    if not module.training:
        dropout = 0.0
    if dropout > 0.0 and query.device.type == "cpu" and query.dtype == key.dtype == value.dtype:
        bias, padded = _additive(attention_mask, query.dtype, query.shape[0])
        out = _DropoutAttention.apply(query, key, value, bias, padded, dropout, scale, attention_mask, kernels)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query * scale, key.transpose(-1, -2))                    # (B, h, T, T)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0.0:
        probs = zero_dropped(probs, keep_mask(probs.shape, dropout, probs.device)).mul_(1.0 / (1.0 - dropout))
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), None


def _packed_attention(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, scale: float,
                      kernels: bool) -> torch.Tensor:
    """(1, h, N, d) query/key/value of sequences packed one after another (``starts``: (B + 1,) offsets,
    :mod:`clintune.packing`) -> (1, N, h, d), each sequence attending to itself alone: the compiled kernels in
    one call where they run, else :func:`attention` one sequence at a time."""
    if kernels and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.bfloat16:
        out = None
        if _int8_attention(module):
            out = masks.attention_int8(q, k, v, None, scale, starts=starts)
        if out is None and _attention_kernels():
            out = masks.attention(q, k, v, None, scale, starts=starts)
        if out is not None:
            return out
    bounds = starts.tolist()
    return torch.cat([attention(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, scaling=scale,
                                kernels=kernels)[0] for a, b in zip(bounds[:-1], bounds[1:])], dim=1)


def register() -> None:
    """Make ``attn_implementation="clintune"`` available to transformers models (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionInterface.register(NO_KERNEL, partial(attention, kernels=False))
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    AttentionMaskInterface.register(NO_KERNEL, sdpa_mask)
    _registered = True


def replace_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` (hidden states, LoRA inputs, heads) for :class:`FastDropout`; return how many.

    LoRA's input dropouts (``...lora_dropout.<adapter>``, read only by ``lora_A``) hand back autocast's dtype.
    """
    n = 0
    for prefix, mod in model.named_modules():
        for name, child in list(mod.named_children()):
            if type(child) is nn.Dropout:
                fd = FastDropout(child.p, to_autocast=prefix.rsplit(".", 1)[-1] == "lora_dropout")
                setattr(mod, name, fd.train(child.training))        # an eval model stays in eval
                n += 1
    return n


def frozen_linears_to(model: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Store frozen ``nn.Linear`` weights/biases in ``dtype``; return (parameter, original tensor) pairs."""
    saved = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            for p in mod.parameters(recurse=False):
                if not p.requires_grad and p.dtype != dtype:
                    saved.append((p, p.data))
                    p.data = p.data.to(dtype)
    return saved


def _libc_function(name: str):
    """``name`` from the C library (ctypes), or None where there is no such function (not glibc/Linux)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):
        return None


_MADV_PAGEOUT = 21


def page_out(tensors) -> int:
    """Ask the kernel to reclaim the whole pages of these CPU tensors (``madvise(MADV_PAGEOUT)``, Linux 5.4+);
    return the bytes advised (0 where unsupported).

    For the fp32 originals of the weights :func:`frozen_linears_to` stored in bf16: transformers maps the
    checkpoint's safetensors file and the parameters point into it, so reading the originals once to round
    them leaves 40 MB of MiniLM's file pages resident (measured; 340 MB for a BERT-base) that nothing reads
    until :meth:`Speedups.restore`. PAGEOUT drops clean file pages (read again from the file when used) and
    never loses data: a page that was written stays, or goes to swap.
    """
    import ctypes
    import mmap

    madvise = _libc_function("madvise")
    if madvise is None:
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, done = mmap.PAGESIZE, 0
    for t in tensors:
        if t.device.type != "cpu":
            continue
        start = t.data_ptr()
        a, b = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
        if b > a and madvise(a, b - a, _MADV_PAGEOUT) == 0:
            done += b - a
    return done


def _onednn_linear() -> bool:
    """Whether oneDNN's linear is here; if so, PyTorch's FLOP counter is taught to count it (cost.py's MFU)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    target = torch.ops.mkldnn._linear_pointwise
    if target not in flop_registry:
        def linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
            """2 m k n for x (..., k) and W (n, k), as for ``aten.addmm`` (the bias is not counted there either)."""
            m = 1
            for d in x_shape[:-1]:
                m *= d
            return 2 * m * x_shape[-1] * w_shape[0]

        register_flop_formula(target)(linear_flops)
    return True


def frozen_linear_class(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """Make every plain frozen ``nn.Linear`` a :class:`FrozenLinear`; return (module, original class) pairs."""
    swapped = []
    for mod in model.modules():
        if type(mod) is nn.Linear and not any(p.requires_grad for p in mod.parameters(recurse=False)):
            swapped.append((mod, type(mod)))
            mod.__class__ = FrozenLinear
    return swapped


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen bf16 W and b, by oneDNN with the bias added inside the product (no pass to
    broadcast it into the output first, as ``addmm`` makes); dL/dx = dL/dy W, and nothing for W and b."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)                     # a frozen parameter: no activation memory held
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return torch.matmul(grad.to(weight.dtype), weight), None, None


class FrozenLinear(nn.Linear):
    """``nn.Linear`` whose frozen bf16 weights go through :class:`_FrozenLinear` on CPU (same parameters, same
    state dict; the class is swapped in place by :func:`frozen_linear_class` and back by ``restore``)."""

    def onednn_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` in the weights' dtype where the product goes to oneDNN (frozen bf16 weights and bias on CPU, ``x``
        bf16 or under bf16 autocast), else None."""
        w, b = self.weight, self.bias
        if (x.device.type == "cpu" and w.dtype == torch.bfloat16 and not w.requires_grad
                and (b is None or (b.dtype == w.dtype and not b.requires_grad))
                and (x.dtype == w.dtype or (torch.is_autocast_enabled("cpu")
                                            and torch.get_autocast_dtype("cpu") == w.dtype))):
            copy = getattr(x, BF16_COPY, None)        # a prediction sublayer end's bf16 rounding of x (same bits)
            return copy if copy is not None else x.to(w.dtype)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = self.onednn_input(x)
        return super().forward(x) if xb is None else _FrozenLinear.apply(xb, self.weight, self.bias)


class _LoraLinear(torch.autograd.Function):
    """PEFT's LoRA linear y = x W^T + b + s (drop(x) A^T) B^T, for a frozen bf16 W and b (:class:`FrozenLinear`'s
    oneDNN product) and fp32 x, A (r, k), B (n, r), under bf16 autocast, in fewer passes over (tokens, n):

    * forward: the LoRA update is added into the frozen product in place (``addmm_``, accumulated in fp32
      and rounded once) instead of PEFT's product, scaling and sum (three bf16 roundings, two more passes);
      drop(x) is :class:`_Dropout`'s (the same mask for the same seed) in one pass; with AVX-512 BF16, x's bf16
      copy, drop(x) and U = drop(x) A^T come from one pass over x and the update is added by one more
      (:func:`masks.lora_input`, :func:`masks.lora_output`);
    * backward, with g = bf16(dy): dU = s g B, dB = s (U^T g)^T, dA = dU^T drop(x), and the input gradient
      dx = g W + (dU A) m / (1 - p) summed in fp32 in one pass (:func:`masks.dropout_add`), where autograd
      would cast both parts to fp32 and add them in two more; with AVX-512 all but g W in one pass over the
      rows (:func:`masks.lora_backward`: dU kept in fp32, five products and the sum in one kernel).
    Saved: drop(x) and U = drop(x) A^T, as PEFT's modules save them, and the mask's seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, p, scaling):
        bf = torch.bfloat16
        a16, b16 = lora_a.to(bf), lora_b.to(bf)
        ctx.threshold, ctx.scale = _threshold(p), 1.0 / (1.0 - p)
        ctx.seed = masks.new_seed() if p > 0.0 else 0           # no dropout (or eval): no numbers drawn
        if masks.lora_kernels_available(weight.shape[0], x.shape[-1], a16.shape[0]):
            xb, dropped, u = masks.lora_input(x.contiguous(), a16, ctx.seed, ctx.threshold, ctx.scale, p > 0.0)
            y = torch.ops.mkldnn._linear_pointwise(xb, weight, bias, "none", [], "")
            masks.lora_output(y, u, b16, scaling)
        else:
            xb = x.to(bf).contiguous()
            y = torch.ops.mkldnn._linear_pointwise(xb, weight, bias, "none", [], "")
            dropped = masks.dropout(x.contiguous(), torch.empty(x.shape, dtype=bf), ctx.seed, ctx.threshold,
                                    ctx.scale) if p > 0.0 else xb
            u = torch.matmul(dropped, a16.t())
            y.view(-1, y.shape[-1]).addmm_(u.view(-1, u.shape[-1]), b16.t(), alpha=scaling)
        ctx.save_for_backward(weight, a16, b16, dropped, u)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, a16, b16, dropped, u = ctx.saved_tensors
        g = dy.to(torch.bfloat16).reshape(-1, dy.shape[-1])
        u2, d2 = u.view(-1, u.shape[-1]), dropped.view(-1, dropped.shape[-1])
        need_x, _, _, need_a, need_b, _, _ = ctx.needs_input_grad
        if masks.lora_kernels_available(g.shape[1], d2.shape[1], a16.shape[0]) and g.is_contiguous():
            gw = torch.mm(g, weight) if need_x else None
            d_a, d_b, dx = masks.lora_backward(g, b16, u2, d2, a16, gw, ctx.scaling, ctx.seed, ctx.threshold, ctx.scale)
            return (None if dx is None else dx.view(dropped.shape)), None, None, d_a if need_a else None, \
                d_b if need_b else None, None, None
        du = torch.mm(g, b16).mul_(ctx.scaling)
        d_b = torch.mm(u2.t(), g).t().float().mul_(ctx.scaling) if need_b else None   # (U^T g)^T: the faster layout
        d_a = torch.mm(du.t(), d2).float() if need_a else None
        dx = None
        if need_x:                           # not for the first layer's input (the embeddings do not train)
            dx = masks.dropout_add(torch.mm(g, weight), torch.mm(du, a16), ctx.seed, ctx.threshold, ctx.scale)
            dx = dx.view(dropped.shape)
        return dx, None, None, d_a, d_b, None, None


def _lora_parts(mod: nn.Module):
    """(A, B, dropout p, scaling) when a PEFT LoRA linear can take :class:`_LoraLinear` now, else None."""
    if mod.disable_adapters or mod.merged or len(mod.active_adapters) != 1:
        return None
    name = mod.active_adapters[0]
    if name not in mod.lora_A or name in getattr(mod, "lora_variant", {}):
        return None
    a, b, drop = mod.lora_A[name], mod.lora_B[name], mod.lora_dropout[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return None
    if isinstance(drop, FastDropout):
        p = drop.p if drop.training else 0.0
    elif isinstance(drop, nn.Identity):
        p = 0.0
    else:
        return None
    if a.weight.dtype != torch.float32 or b.weight.dtype != torch.float32 or not 0.0 <= p < 1.0:
        return None
    return a.weight, b.weight, p, mod.scaling[name]


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    parts = None if args or kwargs else _lora_ready(self, x)
    if parts is not None:
        a, b, p, scaling = parts
        base = self.base_layer
        return _LoraLinear.apply(x, base.weight, base.bias, a, b, p, scaling)
    return self._fused_from.forward(self, x, *args, **kwargs)


class _LoraLinears(torch.autograd.Function):
    """G PEFT LoRA linears on one input x (BERT's query, key and value), each :class:`_LoraLinear`'s maths
    y_e = x W_e^T + b_e + s (drop_e(x) A_e^T) B_e^T, computed together:

    * forward: the G frozen products and the G updates as one product (oneDNN),
          [bf16(x) | U_1 .. U_G | 0] [[W_1 | s B_1 | 0 .. | 0]; ..; [W_G | 0 .. | s B_G | 0]]^T + [b_1 .. b_G],
      its depth k + G r padded to a multiple of 32 (MiniLM's three at 3,200 tokens: 1.07 ms, as the frozen
      product alone, where three products took 1.45 ms at 4,096 and adding the updates 0.68 ms more), x's bf16
      copy, each linear's dropout and U_e made in one pass over x (:func:`masks.lora_input` with G linears and
      ``width``); each update is summed in fp32 with the frozen product and rounded once, as :class:`_LoraLinear`'s,
      with s B_e rounded to bf16 (exact for a power-of-two s, as PEFT's default alpha = r gives);
    * backward, with g = [g_1 .. g_G] the output gradients side by side (bf16, m x G n_e): one input-gradient
      product g [W_1; ..; W_G] where autograd makes G and adds their fp32 results in G - 1 more passes, and
      dx = g W + sum_e (dU_e A_e) m_e / (1 - p) in one pass with every dA_e and dB_e (:func:`masks.lora_backward`
      with G linears). g W is rounded once to bf16, where the linears one at a time round each g_e W_e.

    The masks are drawn from G seeds taken in the linears' order, as the linears one at a time take them.
    Returns the G outputs as views (B, heads, T, d) of one (B, T, G n_e) bf16 tensor: what BERT's self-attention
    makes of each output, so that their gradients arrive in the layout the attention's backward writes.
    Only where :func:`masks.lora_kernels_available` (the caller checks)."""

    @staticmethod
    def forward(ctx, x, weight, folded, bias, p, scaling, heads, *lora):
        bf = torch.bfloat16
        groups = len(lora) // 2
        a16 = [t.to(bf) for t in lora[:groups]]
        b16 = [t.to(bf) for t in lora[groups:]]
        (gn, k), r = weight.shape, a16[0].shape[0]
        n = gn // groups
        for e, b in enumerate(lora[groups:]):                  # this step's s B_e into the folded weight
            folded[e * n:(e + 1) * n, k + e * r:k + (e + 1) * r] = b.detach() * scaling
        ctx.threshold, ctx.scale = _threshold(p), 1.0 / (1.0 - p)
        ctx.seeds = [masks.new_seed() if p > 0.0 else 0 for _ in range(groups)]
        xw, dropped, u = masks.lora_input(x.contiguous(), a16, ctx.seeds, ctx.threshold, ctx.scale, p > 0.0,
                                          width=folded.shape[1])
        y = torch.ops.mkldnn._linear_pointwise(xw, folded, bias, "none", [], "")
        ctx.save_for_backward(weight, *a16, *b16, *dropped, *u)
        ctx.scaling, ctx.groups = scaling, groups
        b, t = x.shape[:2]
        y = y.view(b, t, groups, heads, n // heads)
        return tuple(y[:, :, e].transpose(1, 2) for e in range(groups))

    @staticmethod
    def backward(ctx, *grads):
        groups = ctx.groups
        weight, *rest = ctx.saved_tensors
        a16, b16, dropped, u = (rest[i * groups:(i + 1) * groups] for i in range(4))
        b, h, t, d = next(ge for ge in grads if ge is not None).shape
        g = None if any(ge is None or ge.dtype != torch.bfloat16 for ge in grads) else joint_view(*grads)
        if g is None:            # the gradients side by side as the attention's backward writes them, else copied so
            g = torch.empty((b, t, groups, h, d), dtype=torch.bfloat16)
            for e, ge in enumerate(grads):                    # None: an output unused (its gradient zero)
                if ge is None:
                    g[:, :, e].zero_()
                else:
                    g[:, :, e].copy_(ge.transpose(1, 2))
            g = g.view(b * t, groups * h * d)
        need_x = ctx.needs_input_grad[0]
        gw = torch.mm(g, weight) if need_x else None
        m = b * t
        d_a, d_b, dx = masks.lora_backward(g, list(b16), [x.view(m, -1) for x in u],
                                           [x.reshape(m, x.shape[-1]) for x in dropped], list(a16), gw, ctx.scaling,
                                           ctx.seeds, ctx.threshold, ctx.scale)
        need = ctx.needs_input_grad[7:]
        lora_grads = [d if need[i] else None for i, d in enumerate([*d_a, *d_b])]
        return (None if dx is None else dx.view(b, t, -1)), None, None, None, None, None, None, *lora_grads


def _lora_ready(mod: nn.Module, x: torch.Tensor):
    """:func:`_lora_parts` of a class-swapped LoRA linear over a bf16 :class:`FrozenLinear` about to take fp32 ``x``
    on CPU under bf16 autocast (:class:`_LoraLinear`'s case), else None."""
    base = getattr(mod, "base_layer", None)
    if (x.dtype == torch.float32 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and type(base) is FrozenLinear
            and base.weight.dtype == torch.bfloat16 and (base.bias is None or base.bias.dtype == torch.bfloat16)):
        return _lora_parts(mod)
    return None


def _stacked(mod: nn.Module, linears, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The frozen bf16 weights and biases of G ``linears`` stacked: W = [W_1; ..; W_G] (G n x k), the folded
    weight [W | 0] (G n x k', k' = k + G r rounded up to a multiple of 32; :class:`_LoraLinears` writes each
    step's s B_e into it) and [b_1 .. b_G]; kept on ``mod`` and made again only when one of them is another
    tensor or was changed in place."""
    parts = [lin.base_layer.weight for lin in linears] + [lin.base_layer.bias for lin in linears]
    key = (r, *(None if t is None else (t.data_ptr(), t._version) for t in parts))
    held = mod.__dict__.get("_stacked_weights")
    if held is None or held[0] != key:
        biases = parts[len(linears):]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        weight = torch.cat([w.detach() for w in parts[:len(linears)]])
        gn, k = weight.shape
        folded = weight.new_zeros((gn, -(-(k + len(linears) * r) // 32) * 32))
        folded[:, :k] = weight
        held = (key, weight, folded, bias)
        mod.__dict__["_stacked_weights"] = held
    return held[1:]


#: a self-attention's query, key and value linears, its heads' attribute and the linear its forward ends with (None:
#: its caller applies it), by the forward's code: BERT's (and its copies: RoBERTa, CamemBERT, ...) and DistilBERT's
QKV_LAYOUTS = {"bert": (("query", "key", "value"), "num_attention_heads", None),
               "distilbert": (("q_lin", "k_lin", "v_lin"), "n_heads", "out_lin")}


def _qkv_layout(mod: nn.Module) -> str | None:
    """:data:`QKV_LAYOUTS`' key of ``mod`` where its forward is BERT's or DistilBERT's self-attention and its query,
    key and value are all PEFT LoRA linears over frozen linears (:class:`FrozenLinear`), else None."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.models.bert.modeling_bert import BertSelfAttention
    from transformers.models.distilbert.modeling_distilbert import DistilBertSelfAttention

    for kind, cls in (("bert", BertSelfAttention), ("distilbert", DistilBertSelfAttention)):
        names, heads, _ = QKV_LAYOUTS[kind]
        lins = [getattr(mod, name, None) for name in names]
        if (all(isinstance(lin, LoraLinear) and type(getattr(lin, "base_layer", None)) is FrozenLinear for lin in lins)
                and isinstance(getattr(mod, heads, None), int) and _same_code(type(mod).forward, cls.forward)):
            return kind
    return None


def _qkv_parts(self, x: torch.Tensor):
    """(stacked weight, folded weight, stacked bias, p, scaling, A_q, A_k, A_v, B_q, B_k, B_v) when the
    self-attention ``self`` (:data:`QKV_LAYOUTS`) can make its query, key and value by :class:`_LoraLinears`: all
    three class-swapped LoRA linears in :class:`_LoraLinear`'s case with the same rank, dropout, scaling and shapes,
    biases all or none, the kernels there for them, x (B, T, k); else None."""
    names, heads, _ = QKV_LAYOUTS[self._qkv_layout]
    linears = [getattr(self, name, None) for name in names]
    if x.dim() != 3 or not all(hasattr(type(lin), "_fused_from") for lin in linears):
        return None
    parts = [_lora_ready(lin, x) for lin in linears]
    if any(pt is None for pt in parts):
        return None
    (a0, b0, p, scaling), shape = parts[0], linears[0].base_layer.weight.shape
    if any(pt[2] != p or pt[3] != scaling or pt[0].shape != a0.shape or pt[1].shape != b0.shape for pt in parts) \
            or any(lin.base_layer.weight.shape != shape for lin in linears) \
            or len({lin.base_layer.bias is None for lin in linears}) != 1 \
            or shape[0] % getattr(self, heads) or x.shape[-1] != shape[1] \
            or not masks.lora_kernels_available(shape[0], shape[1], a0.shape[0]):
        return None
    weight, folded, bias = _stacked(self, linears, a0.shape[0])
    return weight, folded, bias, p, scaling, *(pt[0] for pt in parts), *(pt[1] for pt in parts)


def _qkv_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
    """BERT's self-attention (``BertSelfAttention.forward`` and its copies) or DistilBERT's with query, key and value
    made by :class:`_LoraLinears` where it can (no cache, no packed notes, an attention function transformers
    registers); the original forward otherwise."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    parts = None
    if (not args and kwargs.get("cache") is None and kwargs.get("past_key_values") is None
            and kwargs.get(STARTS) is None and self.config._attn_implementation in ALL_ATTENTION_FUNCTIONS):
        parts = _qkv_parts(self, hidden_states)
    if parts is None:
        return self._fused_from.forward(self, hidden_states, attention_mask, *args, **kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    weight, folded, bias, p, scaling, *lora = parts
    _, heads, last = QKV_LAYOUTS[self._qkv_layout]
    query, key, value = _LoraLinears.apply(hidden_states, weight, folded, bias, p, scaling, getattr(self, heads), *lora)
    interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = interface(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.dropout.p, scaling=self.scaling, **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return (out if last is None else getattr(self, last)(out)), weights


class _DropoutAddNorm(torch.autograd.Function):
    """y = LayerNorm(drop(h) + r) for a frozen LayerNorm, h bf16 and r fp32 (the end of a BERT sublayer under
    bf16 autocast), in one pass forward and one backward (:func:`masks.dropout_add_norm`).

    Unfused, the same maths takes five passes over the (B, T, H) values forward (draw the mask, scale,
    zero, add, normalise) and four back. drop(h) is :class:`_Dropout`'s (the same mask for the same seed, the
    same bf16 rounding), and z = drop(h) + r is the same fp32 sum; the LayerNorm sums in another order
    (its output and gradients within fp32 rounding of PyTorch's). Kept for the backward pass: z and each
    row's mean and 1 / std (what ``native_layer_norm`` keeps) and the mask's seed. Gradients:
        dz = rstd (g - mean(g) - x mean(g x)),  g = dy w,  x = (z - mean) rstd,
        dr = dz,  dh = bf16(bf16(dz) m / (1 - p)).
    """

    @staticmethod
    def forward(ctx, h, r, weight, bias, eps, p):
        ctx.seed, ctx.threshold, ctx.scale = masks.new_seed(), _threshold(p), 1.0 / (1.0 - p)
        y, z, stats = masks.dropout_add_norm(h.contiguous(), r.contiguous(), weight, bias, eps, ctx.seed,
                                             ctx.threshold, ctx.scale)
        ctx.save_for_backward(z, stats, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        z, stats, weight = ctx.saved_tensors
        dh, dr = masks.dropout_add_norm_backward(dy.float().contiguous(), z, stats, weight, ctx.seed, ctx.threshold,
                                                 ctx.scale, need_residual=ctx.needs_input_grad[1])
        return dh, dr, None, None, None, None


#: the attribute under which a prediction sublayer end's fp32 output carries its bf16 rounding
#: (:func:`_sublayer_end_forward`), for the bf16 products that read it (:meth:`FrozenLinear.onednn_input`)
BF16_COPY = "_clintune_bf16"


def _kernel_norm(ln: nn.LayerNorm, n: int) -> bool:
    """Whether the compiled LayerNorm (:func:`masks.add_norm`, :func:`masks.embed_norm`) computes ``ln`` over
    rows of ``n`` values: an affine fp32 LayerNorm over the last dim, rows the kernels take."""
    return (ln.weight is not None and ln.bias is not None and ln.weight.dtype == ln.bias.dtype == torch.float32
            and tuple(ln.normalized_shape) == (n,) and masks.fused_rows_available(n))


def _sublayer_end_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    """BERT's ``LayerNorm(dropout(dense(x)) + input)``: by :class:`_DropoutAddNorm` in training, and by one
    pass (:func:`masks.add_norm`) in prediction, where they apply."""
    h = self.dense(hidden_states)
    ln, drop = self.LayerNorm, self.dropout
    if (h.dtype == torch.bfloat16 and input_tensor.dtype == torch.float32 and h.device.type == "cpu"
            and h.shape == input_tensor.shape and _kernel_norm(ln, h.shape[-1])
            and not (ln.weight.requires_grad or ln.bias.requires_grad)):
        if drop.training and 0.0 < drop.p < 1.0:
            return _DropoutAddNorm.apply(h, input_tensor, ln.weight, ln.bias, ln.eps, drop.p)
        if not drop.training and not (torch.is_grad_enabled() and (h.requires_grad or input_tensor.requires_grad)):
            # bf16 products read y next (the next layer's query, key and value; the feed-forward block's first
            # linear): its bf16 rounding from the same pass, which FrozenLinear.onednn_input takes; int8
            # (quantize.Int8Linear) codes y from fp32, or reads its codes on a calibrated range (int8-static:
            # codes_next, quantize.set_static) from the same pass
            codes = getattr(self, "codes_next", None)
            bf16_next = codes is None and type(self.dense) is FrozenLinear
            return _carrying(masks.add_norm(h.contiguous(), input_tensor.contiguous(), ln.weight, ln.bias, ln.eps,
                                            bf16_next, codes), bf16_next, codes)
    return ln(drop(h) + input_tensor)


def _carrying(out, bf16: bool, codes: tuple[float, int] | None) -> torch.Tensor:
    """The fp32 output y of :func:`masks.add_norm` or :func:`masks.embed_norm`, carrying what the same pass wrote
    for the products that read y next: its bf16 rounding (:data:`BF16_COPY`, ``bf16``) or its uint8 codes on
    the range ``codes`` (:data:`masks.U8_CODES`)."""
    if bf16:
        y, yb = out
        setattr(y, BF16_COPY, yb)
        return y
    if codes is not None:
        y, q = out
        setattr(y, masks.U8_CODES, (q, codes))
        return y
    return out


def _embeddings_forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                        cache_length: int = 0) -> torch.Tensor:
    """BERT's (and RoBERTa's) embeddings ``dropout(LayerNorm(word(ids) + type(types) + position(positions)))`` in
    prediction: one pass (:func:`masks.embed_norm`) for the three gathers, the two adds and the LayerNorm (dropout
    is the identity there), on fp32 tables on CPU; under bf16 autocast the output carries its bf16 rounding from
    the same pass for the first layer's bf16 products (:data:`BF16_COPY`). Positions and types as the model's
    code takes them (``position_ids`` None: BERT's 0, 1, ... from ``cache_length``, RoBERTa's from its padding
    index on; ``token_type_ids`` None: the all-zero buffer's). Training, anything else, and ids outside a table
    (PyTorch's own error) take the original forward."""
    out = _embed_norm(self, input_ids, token_type_ids, position_ids, inputs_embeds, cache_length)
    if out is not None:
        return out
    return self._fused_from.forward(self, input_ids, token_type_ids, position_ids, inputs_embeds, cache_length)


def _distilbert_embeddings_forward(self, input_ids, inputs_embeds=None, position_ids=None) -> torch.Tensor:
    """DistilBERT's embeddings ``dropout(LayerNorm(word(ids) + position(positions)))``, as
    :func:`_embeddings_forward` (no token types)."""
    out = _embed_norm(self, input_ids, None, position_ids, inputs_embeds, 0)
    if out is not None:
        return out
    return self._fused_from.forward(self, input_ids, inputs_embeds, position_ids)


def _embed_norm(self, input_ids, token_type_ids, position_ids, inputs_embeds, cache_length: int):
    """The fused embeddings' output where they apply, else None (:func:`_embeddings_forward`)."""
    ln = self.LayerNorm
    typ = getattr(self, "token_type_embeddings", None)
    tables = (self.word_embeddings, self.position_embeddings) + (() if typ is None else (typ,))
    if not (input_ids is not None and inputs_embeds is None and input_ids.dim() == 2 and input_ids.device.type == "cpu"
            and (not self.dropout.training or self.dropout.p == 0.0)
            and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
            and all(type(e) is nn.Embedding and e.weight.dtype == torch.float32 and e.weight.is_contiguous()
                    for e in tables)
            and _kernel_norm(ln, self.word_embeddings.embedding_dim)):
        return None
    batch, t = input_ids.shape
    if position_ids is None:
        if getattr(self, "_positions_from_ids", False):                          # RoBERTa's numbering
            position_ids = self.create_position_ids_from_input_ids(input_ids, self.padding_idx, cache_length)
        else:
            position_ids = self.position_ids[:, cache_length:cache_length + t]
    types = token_type_ids
    if typ is None:                                     # DistilBERT: a zero row, (w + 0) + p = w + p
        typ_weight = torch.zeros(1, self.word_embeddings.embedding_dim)
    else:
        typ_weight = typ.weight
        if types is None and getattr(self, "token_type_ids", None) is not None and bool(self.token_type_ids.any()):
            types = torch.gather(self.token_type_ids.expand(position_ids.shape[0], -1), 1, position_ids)
        if types is not None:
            types = types.to(torch.int64).expand(batch, t).contiguous()
    codes = getattr(self, "codes_next", None)              # int8-static: the first layer reads y's codes
    bf16 = codes is None and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    out = masks.embed_norm(input_ids.to(torch.int64).contiguous(),
                           position_ids.to(torch.int64).expand(batch, t).contiguous(), types,
                           self.word_embeddings.weight, self.position_embeddings.weight, typ_weight,
                           ln.weight, ln.bias, ln.eps, bf16_copy=bf16, codes=codes)
    return None if out is None else _carrying(out, bf16, codes)


class _GeluKeepGrad(torch.autograd.Function):
    """GELU(x) = x Phi(x) for bf16 x, keeping GELU'(x) = Phi(x) + x phi(x) (bf16, the memory x took)
    from the same pass (:func:`masks.gelu_and_grad`), so the backward is one product dx = dy GELU'(x)
    instead of erf and exp again. GELU'(x) is rounded to bf16 before that product: dx within one more
    bf16 rounding of PyTorch's ``gelu_backward``."""

    @staticmethod
    def forward(ctx, x):
        y, d = masks.gelu_and_grad(x.contiguous())
        ctx.save_for_backward(d)
        return y

    @staticmethod
    def backward(ctx, dy):
        (d,) = ctx.saved_tensors
        return masks.mul(dy.to(d.dtype).contiguous(), d)


def _gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.requires_grad and torch.is_grad_enabled():
        return _GeluKeepGrad.apply(x)
    return self._fused_from.forward(self, x)


def _ffn_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """BERT's intermediate layer GELU(dense(x)) without gradients, its dense a bf16 :class:`FrozenLinear`: oneDNN
    applies the GELU to the product as it writes it (a post-op, as ``--quantize int8`` does: the same function
    of the fp32 sums rather than of their bf16 rounding, and one pass over the 4H-wide activations fewer).
    Training, and anything else, takes the original forward."""
    dense = self.dense
    if type(dense) is FrozenLinear and not (torch.is_grad_enabled() and hidden_states.requires_grad):
        xb = dense.onednn_input(hidden_states)     # None: not oneDNN's product (e.g. fp32); int8 has its own GELU
        if xb is not None:
            return torch.ops.mkldnn._linear_pointwise(xb, dense.weight, dense.bias, "gelu", [], self._gelu_algorithm)
    return self._fused_from.forward(self, hidden_states)


def _same_code(f, g) -> bool:
    """Whether two functions are the same code (a transformers model's "Copied from" classes are). Decorated
    functions are compared by what they wrap: transformers wraps many ``forward`` methods in one generic
    ``wrapper``, whose code is the same for every model."""
    f, g = (inspect.unwrap(x) if callable(x) else x for x in (f, g))
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_names == b.co_names
            and a.co_consts == b.co_consts and a.co_varnames == b.co_varnames)


def exact_gelu(mod: nn.Module) -> bool:
    """Whether ``mod`` is transformers' exact (erf) GELU (``hidden_act="gelu"``), class-swapped here or not."""
    from transformers.activations import GELUActivation

    return isinstance(mod, GELUActivation) and getattr(mod, "act", None) is nn.functional.gelu


def gelu_algorithm(act: nn.Module) -> str | None:
    """oneDNN's GELU algorithm computing ``act`` exactly: "none" for the exact (erf) GELU, "tanh" for its tanh
    approximation; None for any other activation (left as it is)."""
    from transformers.activations import GELUTanh

    if exact_gelu(act):
        return "none"
    if type(act) is GELUTanh and isinstance(act.act, partial) and act.act.func is nn.functional.gelu \
            and act.act.keywords == {"approximate": "tanh"} and not act.act.args:
        return "tanh"
    if type(act) is nn.GELU:
        return act.approximate
    return None


def _fusable(mod: nn.Module) -> str | None:
    """"sublayer_end" for a module whose forward is BERT's ``BertSelfOutput.forward`` (dense, dropout,
    LayerNorm of the sum; also RoBERTa's, CamemBERT's ... copies), "gelu" for transformers' exact GELU,
    "lora" for PEFT's LoRA linear over a :class:`FrozenLinear`, "qkv" for BERT's self-attention (and its copies)
    or DistilBERT's whose query, key and value are all such (:func:`_qkv_forward`), "ffn" for BERT's intermediate
    layer (and its copies) over a :class:`FrozenLinear` with a GELU oneDNN computes (exact or tanh;
    :func:`_ffn_forward`),
    "embeddings" for BERT's or RoBERTa's embeddings (and copies; :func:`_embeddings_forward`),
    "distilbert_embeddings" for DistilBERT's (:func:`_distilbert_embeddings_forward`)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertIntermediate, BertSelfOutput
    from transformers.models.distilbert.modeling_distilbert import Embeddings as DistilBertEmbeddings
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    if exact_gelu(mod):
        return "gelu"
    if (isinstance(getattr(mod, "LayerNorm", None), nn.LayerNorm)
            and isinstance(getattr(mod, "dropout", None), (nn.Dropout, FastDropout))
            and all(isinstance(getattr(mod, name, None), nn.Embedding) for name in ("word_embeddings", "position_embeddings"))):
        code = type(mod).forward
        if isinstance(getattr(mod, "token_type_embeddings", None), nn.Embedding):
            if _same_code(code, BertEmbeddings.forward) and isinstance(getattr(mod, "position_ids", None), torch.Tensor):
                return "embeddings"
            if _same_code(code, RobertaEmbeddings.forward) and mod.padding_idx is not None:
                mod._positions_from_ids = True                      # what _embed_norm numbers positions by
                return "embeddings"
        elif _same_code(code, DistilBertEmbeddings.forward) and isinstance(getattr(mod, "position_ids", None), torch.Tensor):
            return "distilbert_embeddings"
    if type(mod) is LoraLinear and type(getattr(mod, "base_layer", None)) is FrozenLinear:
        return "lora"
    layout = _qkv_layout(mod)
    if layout is not None:
        mod._qkv_layout = layout                                    # what _qkv_forward reads its linears by
        return "qkv"
    if (type(getattr(mod, "dense", None)) is FrozenLinear and _same_code(type(mod).forward, BertIntermediate.forward)
            and isinstance(getattr(mod, "intermediate_act_fn", None), nn.Module)):
        kind = gelu_algorithm(mod.intermediate_act_fn)
        if kind is not None:
            mod._gelu_algorithm = kind                               # what _ffn_forward asks oneDNN for
            return "ffn"
    if (isinstance(getattr(mod, "LayerNorm", None), nn.LayerNorm) and isinstance(getattr(mod, "dense", None), nn.Module)
            and isinstance(getattr(mod, "dropout", None), (nn.Dropout, FastDropout))
            and _same_code(type(mod).forward, BertSelfOutput.forward)):
        return "sublayer_end"
    return None


def _original(mod: nn.Module, method: str):
    """``mod``'s class's ``method`` as transformers wrote it: that of the class :func:`fuse_passes` swapped out,
    where it swapped one in."""
    cls = type(mod)
    return getattr(getattr(cls, "_fused_from", cls), method, None)


_FUSED_FORWARDS = {"sublayer_end": _sublayer_end_forward, "gelu": _gelu_forward, "lora": _lora_forward,
                   "qkv": _qkv_forward,
                   "ffn": _ffn_forward, "embeddings": _embeddings_forward,
                   "distilbert_embeddings": _distilbert_embeddings_forward}
_fused_classes: dict[tuple[type, str], type] = {}


def fuse_passes(model: nn.Module, skip=()) -> dict[str, list[tuple[nn.Module, type]]]:
    """Class-swap PEFT's LoRA linears over a :class:`FrozenLinear` to :class:`_LoraLinear`, BERT sublayer ends
    to :class:`_DropoutAddNorm` (:func:`masks.add_norm` in prediction) and exact GELUs to
    :class:`_GeluKeepGrad` (in bf16 on CPU; the original forward otherwise), the embeddings to one pass in
    prediction (:func:`_embeddings_forward`); return, per kind, the (module,
    original class) pairs. Nothing where the kernels are not compiled, and none of the kinds in ``skip``."""
    swapped: dict[str, list] = {kind: [] for kind in _FUSED_FORWARDS if kind not in skip}
    if masks.compiled() is None:
        return swapped
    for mod in model.modules():
        kind = None if hasattr(type(mod), "_fused_from") else _fusable(mod)
        if kind is None or kind in skip:
            continue
        cls = type(mod)
        if (cls, kind) not in _fused_classes:
            _fused_classes[(cls, kind)] = type(f"Fused{cls.__name__}", (cls,),
                                               {"forward": _FUSED_FORWARDS[kind], "_fused_from": cls})
        swapped[kind].append((mod, cls))
        mod.__class__ = _fused_classes[(cls, kind)]
    return swapped


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory(limit: int = 32 << 20) -> bool:
    """Ask glibc's malloc to keep freed blocks of up to ``limit`` bytes for reuse (``mallopt``).

    By default glibc maps large blocks (a layer's activations, attention scores, dropout masks) afresh with
    ``mmap`` and unmaps them on free until its adaptive threshold catches up, so steps page-fault and zero
    hundreds of MB again (15-25% of the early LoRA steps of MiniLM on 2 cores, profiled). Served from the
    heap instead, the blocks are reused; peak RSS stays about the same (measured). Process-wide, for the
    rest of the process; a no-op (False) where the C library has no ``mallopt``.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(limit))) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def trim_heap() -> bool:
    """Hand the free memory held in glibc's heap back to the system (``malloc_trim(0)``), e.g. a training's
    working memory once it is over (:func:`reuse_freed_memory` keeps it otherwise); False without glibc."""
    malloc_trim = _libc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


class Speedups:
    """What :func:`accelerate` changed, and :meth:`restore` to put the original weights and attention back.

    Restoring before saving and merging keeps the trained model bit-for-bit what a reload builds: LoRA
    and IA3 merge into the original fp32 weights, and saved configs name a standard attention.
    """

    def __init__(self) -> None:
        self.report: dict = {}
        self._weights: list = []
        self._configs: list = []
        self._classes: list = []
        self.arena: Arena | None = None       # for training's saved tensors (:func:`clintune.arena.saving_into`)

    def restore(self) -> None:
        if self.report.get("reuse_freed_memory") and self._weights:
            trim_heap()        # the training's free heap back first: reading the paged-out originals adds no peak
        for p, original in self._weights:
            p.data = original
        for cfg, impl in self._configs:
            cfg._attn_implementation = impl
        for mod, cls in self._classes:
            mod.__class__ = cls
            mod.__dict__.pop("_stacked_weights", None)     # _qkv_forward's copy of the frozen weights
        self._weights, self._configs, self._classes = [], [], []
        if self.arena is not None:
            self.report["arena"] = self.arena.report()
            self.arena.release()
        if self.report.get("block_cache") is True:
            self.report["block_cache"] = blocks.stats()
            blocks.uninstall()


def fingerprint(on: bool, off, device: torch.device) -> dict:
    """How this process computes a model's outputs, beyond its weights and inputs: whether the fast path runs and
    which parts are left out, whether its compiled kernels are built (``CLINTUNE_NO_KERNELS``, no compiler), and
    the hardware whose kernels round (the CPU's instruction set and AMX, or the GPU). Each changes the low-order
    bits of bf16 outputs, so the feature cache keys its entries by it (:mod:`clintune.cache`)."""
    out = {"fast": bool(on), "off": sorted(off or ()) if on else []}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    else:
        out.update(isa=torch.backends.cpu.get_cpu_capability(), amx=_amx(),
                   kernels=bool(on) and masks.compiled() is not None,
                   # prediction's bf16 attention: the kernels' AVX-512 or AMX form, else SDPA (AMX) or chunked
                   attention=("clintune-amx" if _amx() else "clintune") if _attention_kernels()
                   else "sdpa" if _amx() else "clintune")
    return out


def accelerate(model: nn.Module, runtime, restorable: bool = True, off=()) -> Speedups:
    """Apply the CPU speed-ups to a model about to train or predict (nothing on GPUs).

    ``restorable=False`` (a model that only predicts, :class:`~clintune.modeling.Classifier`): the fp32
    originals of the weights stored in bf16 are let go rather than kept for :meth:`Speedups.restore`, which
    then puts back the attention and the classes only. ``off`` names :data:`PARTS` to leave out
    (``--fast-off``): each keeps the maths up to rounding and the masks' draws, so leaving parts out one at a
    time tells which, if any, changes a model's accuracy.
    """
    off = set(off or ())
    unknown = off - set(PARTS)
    if unknown:
        raise ValueError(f"unknown --fast-off part(s) {sorted(unknown)}; known: {', '.join(PARTS)}")
    sp = Speedups()
    if runtime.device.type != "cpu":
        return sp
    if off:
        sp.report["off"] = sorted(off)
    register()
    impl = NO_KERNEL if "attention_kernel" in off else ATTENTION
    if "attention" not in off:
        for mod in model.modules():
            cfg = getattr(mod, "config", None)
            if cfg is not None and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager"):
                sp._configs.append((cfg, cfg._attn_implementation))
                cfg._attn_implementation = impl
    sp.report["attention"] = impl if sp._configs else "unchanged"
    if "dropout" not in off:
        sp.report["fast_dropout_modules"] = replace_dropout(model)
        sp.report["dropout_masks"] = "splitmix64-c" if masks.compiled() is not None else "numpy-sfc64"
    if "memory" not in off:
        sp.report["reuse_freed_memory"] = reuse_freed_memory()
    if "arena" not in off and restorable:        # restorable: a model about to train
        sp.arena = Arena()
    if "blocks" not in off and restorable:
        sp.report["block_cache"] = blocks.install()
    if runtime.precision == "bf16":
        if "bf16_weights" not in off:
            weights = frozen_linears_to(model, torch.bfloat16)
            sp.report["bf16_frozen_linear_tensors"] = len(weights)
            if restorable:
                sp._weights = weights
                sp.report["paged_out_fp32_mb"] = round(page_out(t for _, t in weights) / 2 ** 20, 1)
            if _onednn_linear():
                swapped = frozen_linear_class(model)
                sp._classes += swapped
                sp.report["onednn_frozen_linears"] = len(swapped)
        skip = (off | ({"lora", "sublayer_end"} if "dropout" in off else set()) | ({"ffn"} if "gelu" in off else set())
                | ({"qkv"} if off & {"lora", "dropout"} else set())
                | ({"distilbert_embeddings"} if "embeddings" in off else set()))
        fused = fuse_passes(model, skip)
        for pairs in fused.values():
            sp._classes += pairs
        sp.report["fused_passes"] = {kind: len(pairs) for kind, pairs in fused.items()}
    return sp
