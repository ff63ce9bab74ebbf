"""int8 prediction on CPU (``--quantize int8``): the backbone's linear layers and attention in 8-bit integers.

A linear layer y = x W^T + b becomes

    y[i, j] = s_x s_w[j] sum_k (q_x[i, k] - z_x) q_w[j, k] + b[j]

* weights per output channel, symmetric: s_w[j] = max_k |W[j, k]| / 127, q_w = round(W / s_w) in [-127, 127],
  done once when the model is loaded;
* activations per tensor, asymmetric uint8, from each batch's own range ("dynamic" quantisation):
  s_x = (max(x, 0) - min(x, 0)) / 255, z_x = round(-min(x, 0) / s_x) (:func:`clintune.masks.quantize_u8`);
* the integer products and the rescale by oneDNN (``torch.ops.onednn.qlinear_pointwise``, what PyTorch's x86
  quantisation lowers to), written in bf16 under bf16 autocast (the run's precision), else fp32.

This is the scheme of PyTorch's dynamic quantisation and of Q8BERT (Zafrir et al., arXiv 1910.06188; Jacob et
al., CVPR 2018, for the affine mapping), with per-channel weights. On CPUs with AVX-512 VNNI an int8 product does
four multiply-adds per 32-bit lane where bf16 does two: measured on 2 Zen 4 cores, MiniLM's products ran at
0.74-0.88 int8 TOPS against 0.38-0.41 bf16 TFLOP/s. Several linears reading one tensor (query, key and value)
quantise it once. A linear followed by a GELU in the feed-forward block (BERT's intermediate layer, DistilBERT's
``lin1``) applies the GELU inside oneDNN's product as it writes its output (a post-op: the same function, of
the fp32 sums rather than of their bf16 rounding, and one pass over the 4H-wide activations fewer).

Self-attention's two products, Q K^T and P V, run in int8 too (:func:`clintune.masks.attention_int8`, on CPUs
with AVX-512 BF16 and VNNI, head size 32 or 64; elsewhere the bf16 kernel): per example and head, each query and
key row and each value column coded symmetrically from its own range, the softmax computed in fp32 and its
unnormalised weights e = exp(s - max s) in [0, 1] coded as round(255 e), the weight that coding leaves out given
to the mean value row. Measured on 2 Zen 4 cores (16 x 12 heads x 256 tokens x 32): 4.6 ms against 7.1 ms for the
bf16 kernel.

Only the encoder is quantised; the head keeps its precision. Predictions may change: a value's error is at most
s_x / 2 before the product, so check the metrics (``clintune evaluate --quantize int8``) before relying on it.
Prediction only: training is unaffected and nothing quantised is saved.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from . import masks
from .errors import ClintuneError, ConfigError


@functools.lru_cache(maxsize=None)
def int8_available() -> bool:
    """Whether PyTorch's oneDNN int8 linear runs here (x86 CPU builds): tried once on a tiny layer."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")
            and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return False
    try:
        lin = Int8Linear.from_linear(nn.Linear(8, 4), _SharedInput())
        lin(torch.ones(2, 8))
    except (RuntimeError, NotImplementedError):
        return False
    return True


class _SharedInput:
    """The last input quantised by a model's :class:`Int8Linear` layers and its codes: a layer given the same
    tensor object reuses them, as the query, key and value layers of a block do. Keyed on x itself (a weak
    reference: x is not kept alive; a reshaped view is a new object) and, outside inference mode, on x's
    version counter (a change in place since makes them quantise again); in inference mode, which keeps no
    counter, the encoders' forwards read a layer's input without changing it in between. The entry is one
    tuple, replaced whole, so threads predicting at once never get each other's codes."""

    def __init__(self) -> None:
        self.entry: tuple | None = None

    def codes_of(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        version = -1 if x.is_inference() else x._version    # inference tensors keep no version counter
        entry = self.entry
        if entry is not None and entry[0]() is x and entry[1] == version:
            return entry[2]
        codes = masks.quantize_u8(x.contiguous())
        self.entry = (weakref.ref(x), version, codes)
        return codes


class Int8Linear(nn.Module):
    """A frozen linear layer for prediction with int8 weights and dynamically quantised uint8 inputs (the
    module docstring gives the maths). No gradients: for :class:`~clintune.modeling.Classifier` only."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                 out_features: int, shared: _SharedInput) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gelu: str | None = None          # "none" (exact, erf) or "tanh": GELU applied to the output by oneDNN
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("zeros", torch.zeros(out_features, dtype=torch.int32), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self._shared = shared

    @classmethod
    def from_linear(cls, lin: nn.Linear, shared: _SharedInput) -> "Int8Linear":
        w = lin.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(q, None)
        bias = None if lin.bias is None else lin.bias.detach().float().contiguous()
        return cls(packed, scales.contiguous(), bias, lin.in_features, lin.out_features, shared)

    def extra_repr(self) -> str:
        gelu = "" if self.gelu is None else f", then GELU (approximate={self.gelu!r})"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{gelu}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"Int8Linear: fp32 or bf16 input, not {x.dtype}")
        q, scale, zero = self._shared.codes_of(x)        # keyed on x itself: a reshaped view is a new object
        out = (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype)
        y = torch.ops.onednn.qlinear_pointwise(q.view(-1, self.in_features), scale, zero, self.packed, self.scales,
                                               self.zeros, self.bias, 1.0, 0, out,
                                               "none" if self.gelu is None else "gelu", [], self.gelu or "")
        return y.view(*x.shape[:-1], self.out_features)


def require_cpu(quantize: str, device: torch.device) -> None:
    """Refuse ``quantize`` other than "none" for prediction on anything but the CPU (one line to the user)."""
    if quantize != "none" and device.type != "cpu":
        raise ConfigError(f"--quantize {quantize}: CPU prediction only, not {device.type}; use --device cpu "
                          "(device='cpu' from Python) or drop --quantize")


def _gelu_kind(act: nn.Module) -> str | None:
    """oneDNN's GELU algorithm computing ``act`` exactly: "none" for the exact (erf) GELU, "tanh" for its tanh
    approximation; None for any other activation (left as it is)."""
    from transformers.activations import GELUTanh

    from .fast import exact_gelu

    if exact_gelu(act):
        return "none"
    if type(act) is GELUTanh and isinstance(act.act, functools.partial) and act.act.func is nn.functional.gelu \
            and act.act.keywords == {"approximate": "tanh"} and not act.act.args:
        return "tanh"
    if type(act) is nn.GELU:
        return act.approximate
    return None


def _linear_then_gelu(encoder: nn.Module):
    """(module, linear's name, activation's name, algorithm) for each feed-forward block whose code is a linear
    then its activation and whose activation is a GELU: BERT's intermediate layer (and its copies in RoBERTa,
    CamemBERT ...: the same code), DistilBERT's FFN."""
    from transformers.models.bert.modeling_bert import BertIntermediate
    from transformers.models.distilbert.modeling_distilbert import FFN

    from .fast import _same_code

    shapes = (("forward", BertIntermediate.forward, "dense", "intermediate_act_fn"),
              ("ff_chunk", FFN.ff_chunk, "lin1", "activation"))
    for mod in encoder.modules():
        for method, code, lin, act in shapes:
            if _same_code(getattr(type(mod), method, None), code) and isinstance(getattr(mod, act, None), nn.Module):
                kind = _gelu_kind(getattr(mod, act))
                if kind is not None and isinstance(getattr(mod, lin, None), Int8Linear):
                    yield mod, lin, act, kind


def quantize_int8(encoder: nn.Module) -> int:
    """Replace every plain linear layer of ``encoder`` (``nn.Linear`` or clintune's ``FrozenLinear``, not
    subclasses whose weights their parents read directly, as ``nn.MultiheadAttention``'s) by an
    :class:`Int8Linear`, with a GELU that follows it in a feed-forward block moved into the product, and mark
    its self-attention modules for the int8 attention kernel (``int8_attention``, read by
    :func:`clintune.fast.attention`); return how many linears. The bf16/fp32 weights are let go."""
    from .fast import FrozenLinear

    if not int8_available():
        raise ClintuneError("--quantize int8: this PyTorch has no oneDNN int8 linear (x86 CPU builds have it); "
                            "use --quantize none")
    shared = _SharedInput()
    targets = [(name, mod) for name, mod in encoder.named_modules() if type(mod) in (nn.Linear, FrozenLinear)]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        setattr(parent, attr, Int8Linear.from_linear(mod, shared))
    for mod, lin, act, kind in list(_linear_then_gelu(encoder)):
        getattr(mod, lin).gelu = kind
        setattr(mod, act, nn.Identity())
    for mod in encoder.modules():
        if getattr(mod, "is_causal", None) is False:     # what clintune's attention takes (clintune.fast.attention)
            mod.int8_attention = True
    return len(targets)
