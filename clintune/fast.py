"""CPU speed-ups that keep the training maths unchanged (profiled; see benchmarks/speed.py).

A LoRA step of a BERT-size encoder on CPU spends most of its time not in matrix products but in
dropout: ``torch.bernoulli_`` draws about 0.2 G numbers/s per core, and BERT drops out every attention
probability (B x heads x T x T of them per layer) as well as hidden states and LoRA inputs. And
PyTorch's fused attention (SDPA) falls back to an unfused path whenever attention dropout is on.

* :func:`keep_mask` draws the same Bernoulli(1 - p) keep-mask from 16-bit uniform integers taken four
  at a time out of 64-bit ``random_()`` draws (about 5x faster than ``bernoulli_``): keep iff u >= p * 2^16,
  so the drop probability is p rounded to a multiple of 2^-16 (0.1 -> 0.100006). Seeded by the usual
  ``torch.manual_seed``.
* :class:`FastDropout` is ``nn.Dropout`` with that mask: y = x * m / (1 - p).
* :func:`attention` is an attention function for transformers' ``AttentionInterface``: without
  gradients (inference) it is SDPA (fused); when training it computes
  softmax(Q K^T * scale + mask) in bf16/fp32 as autocast gives it, applies the fast keep-mask to the
  probabilities, multiplies by V and rescales the (much smaller) output by 1 / (1 - p).
* :func:`frozen_linears_to` stores frozen ``nn.Linear`` weights in bf16, exactly what autocast would
  cast them to at every call, minus the cast (and half the memory). Trainable parameters stay fp32.

On CUDA none of this is needed (SDPA's fused kernels do dropout themselves), so :func:`accelerate`
only rewrites models that train on CPU.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ATTENTION = "clintune"
_registered = False


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask, True with probability 1 - p (p quantised to 2^-16)."""
    n = math.prod(shape)
    # The full int64 range: plain random_() stops at 2^63, which would leave every fourth int16 non-negative.
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    u = bits.view(torch.int16)[:n].view(shape)                                    # 16-bit uniforms, signed
    return u >= (int(round(p * 65536)) - 32768)


class FastDropout(nn.Module):
    """Inverted dropout y = x * m / (1 - p), m ~ Bernoulli(1 - p), drawn by :func:`keep_mask`."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return torch.where(keep_mask(x.shape, self.p, x.device), x, 0) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """(B, h, T, d) query/key/value -> ((B, T, h, d) output, None); mask: bool (B, 1, T, T), True = attend.

    Without gradients: PyTorch's fused SDPA. With gradients: the unfused form (on CPU the fused kernel's
    backward is slower than two matrix products, softmax and their gradients), plus dropout if training.
    """
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if not needs_grad:
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    if not module.training:
        dropout = 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(-1, -2))                    # (B, h, T, T)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout == 0.0:
        return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), None
    probs = torch.where(keep_mask(probs.shape, dropout, probs.device), probs, 0)
    out = torch.matmul(probs.to(value.dtype), value) * (1.0 / (1.0 - dropout))    # (B, h, T, d)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="clintune"`` available to transformers models (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _registered = True


def replace_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` (hidden states, LoRA inputs, heads) for :class:`FastDropout`; return how many."""
    n = 0
    for mod in model.modules():
        for name, child in list(mod.named_children()):
            if type(child) is nn.Dropout:
                setattr(mod, name, FastDropout(child.p))
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


class Speedups:
    """What :func:`accelerate` changed, and :meth:`restore` to put the original weights and attention back.

    Restoring before saving and merging keeps the trained model bit-for-bit what a reload builds: LoRA
    and IA3 merge into the original fp32 weights, and saved configs name a standard attention.
    """

    def __init__(self) -> None:
        self.report: dict = {}
        self._weights: list = []
        self._configs: list = []

    def restore(self) -> None:
        for p, original in self._weights:
            p.data = original
        for cfg, impl in self._configs:
            cfg._attn_implementation = impl
        self._weights, self._configs = [], []


def accelerate(model: nn.Module, runtime) -> Speedups:
    """Apply the CPU speed-ups to a model about to train (nothing on GPUs)."""
    sp = Speedups()
    if runtime.device.type != "cpu":
        return sp
    register()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager"):
            sp._configs.append((cfg, cfg._attn_implementation))
            cfg._attn_implementation = ATTENTION
    sp.report["attention"] = ATTENTION if sp._configs else "unchanged"
    sp.report["fast_dropout_modules"] = replace_dropout(model)
    if runtime.precision == "bf16":
        sp._weights = frozen_linears_to(model, torch.bfloat16)
        sp.report["bf16_frozen_linear_tensors"] = len(sp._weights)
    return sp
